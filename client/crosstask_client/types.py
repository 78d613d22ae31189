"""Typed request options and response objects.

Request options (:class:`Demonstrations`, :class:`Routing`, :class:`Example`) build the
``crosstask`` extension of a request body. Response objects follow the OpenAI shapes
(``chat.completion``, ``chat.completion.chunk``, ``text_completion``, ``list`` of models)
plus the ``crosstask`` annotation. Every model accepts and keeps fields it does not know
(``extra="allow"``), so a newer server never breaks an older client.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

__all__ = [
    "Adapter",
    "AdapterWeight",
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChunkChoice",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CrosstaskInfo",
    "Delta",
    "DemonstrationHit",
    "DemonstrationRef",
    "Demonstrations",
    "Example",
    "Health",
    "Model",
    "ModelList",
    "Routing",
    "RetrievalInfo",
    "RoutingDecision",
    "Usage",
]


class _Open(BaseModel):
    """Base of every model here: unknown fields are accepted and kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --------------------------------------------------------------------------------------
# Request options: the ``crosstask`` extension of a request body.
# --------------------------------------------------------------------------------------


class Demonstrations(_Open):
    """How many cross-task demonstrations to retrieve and put in the prompt.

    ``k=0`` turns retrieval off; a field left ``None`` leaves the server default.
    ``scope`` is what they are chosen by: ``"task"`` (the task definition: a task's
    requests share them, and their prompt prefix) or ``"input"`` (definition and input).
    """

    k: Optional[int] = Field(default=None, ge=0, description="Demonstrations to retrieve.")
    min_score: Optional[float] = Field(
        default=None, description="Drop demonstrations scoring below this similarity."
    )
    scope: Optional[str] = Field(default=None, description='"task" or "input".')


class Routing(_Open):
    """How the request is routed across LoRA adapters.

    ``mode`` is one of ``"off"`` (base model), ``"adapter"`` (one adapter), ``"merge"``
    (weighted merge of ``adapters`` served as one LoRA), ``"fuse"`` (the listed adapters and
    the base decode in lockstep, their logits fused) or ``"auto"`` (the router decides).
    ``adapters`` and ``weights`` are optional with ``"auto"``.
    """

    mode: Optional[str] = None
    adapters: Optional[list[str]] = None
    weights: Optional[list[float]] = None
    top_k: Optional[int] = Field(default=None, ge=1)


class Example(_Open):
    """One input/output pair of a task, as added to the demonstration store."""

    input: str
    output: str


# --------------------------------------------------------------------------------------
# The crosstask annotation of a response.
# --------------------------------------------------------------------------------------


class DemonstrationRef(_Open):
    """A demonstration that was put in the prompt: its id, task and retrieval score."""

    id: str
    task: Optional[str] = None
    score: Optional[float] = None


class AdapterWeight(_Open):
    """An adapter that took part in generation and its weight."""

    name: str
    weight: Optional[float] = None


class RoutingDecision(_Open):
    """What the router did: the mode used and the adapters with their weights."""

    mode: Optional[str] = None
    adapters: list[AdapterWeight] = Field(default_factory=list)


class RetrievalInfo(_Open):
    """How the demonstrations were chosen: the scope, how many the store offered, the
    score they needed, and why none went in when none did."""

    scope: Optional[str] = None
    considered: int = 0
    min_score: Optional[float] = None
    reason: str = ""


class CrosstaskInfo(_Open):
    """The ``crosstask`` annotation: the demonstrations used and the routing decision."""

    demonstrations: list[DemonstrationRef] = Field(default_factory=list)
    routing: Optional[RoutingDecision] = None
    retrieval: Optional[RetrievalInfo] = None


# --------------------------------------------------------------------------------------
# OpenAI response shapes.
# --------------------------------------------------------------------------------------


class Usage(_Open):
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatMessage(_Open):
    """A chat message; also accepted as input in ``messages``."""

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatChoice(_Open):
    """One choice of a ``chat.completion``."""

    index: int = 0
    message: ChatMessage
    finish_reason: Optional[str] = None
    logprobs: Optional[Any] = None


class ChatCompletion(_Open):
    """A ``chat.completion`` response; ``crosstask`` says what the server did."""

    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str
    choices: list[ChatChoice] = Field(default_factory=list)
    usage: Optional[Usage] = None
    crosstask: Optional[CrosstaskInfo] = None

    @property
    def text(self) -> str:
        """The content of the first choice's message (``""`` if there is none)."""
        if not self.choices:
            return ""
        content = self.choices[0].message.content
        return content if isinstance(content, str) else ""


class Delta(_Open):
    """The increment carried by a streamed chat chunk."""

    role: Optional[str] = None
    content: Optional[str] = None


class ChunkChoice(_Open):
    """One choice of a ``chat.completion.chunk``."""

    index: int = 0
    delta: Delta = Field(default_factory=Delta)
    finish_reason: Optional[str] = None
    logprobs: Optional[Any] = None


class ChatCompletionChunk(_Open):
    """A streamed ``chat.completion.chunk``; the last one carries ``crosstask``."""

    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: Optional[Usage] = None
    crosstask: Optional[CrosstaskInfo] = None


class CompletionChoice(_Open):
    """One choice of a ``text_completion``."""

    index: int = 0
    text: str = ""
    finish_reason: Optional[str] = None
    logprobs: Optional[Any] = None


class Completion(_Open):
    """A ``text_completion`` response; ``crosstask`` says what the server did."""

    id: str
    object: str = "text_completion"
    created: int = 0
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Optional[Usage] = None
    crosstask: Optional[CrosstaskInfo] = None

    @property
    def text(self) -> str:
        """The text of the first choice (``""`` if there is none)."""
        return self.choices[0].text if self.choices else ""


class CompletionChunk(_Open):
    """A streamed ``text_completion`` chunk; the last one carries ``crosstask``."""

    id: str
    object: str = "text_completion"
    created: int = 0
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Optional[Usage] = None
    crosstask: Optional[CrosstaskInfo] = None


class Model(_Open):
    """An entry of ``GET /v1/models``: the base model, an adapter (with ``parent``) or ``auto``."""

    id: str
    object: str = "model"
    created: Optional[int] = None
    owned_by: Optional[str] = None
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(_Open):
    """The OpenAI list of models."""

    object: str = "list"
    data: list[Model] = Field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        """The ids of every listed model."""
        return [model.id for model in self.data]


class Adapter(_Open):
    """A registered LoRA adapter, with its training tasks and rank."""

    name: str = Field(validation_alias=AliasChoices("name", "id", "lora_name"))
    tasks: list[str] = Field(default_factory=list)
    rank: Optional[int] = None
    path: Optional[str] = Field(
        default=None, validation_alias=AliasChoices("path", "lora_path", "root")
    )


class DemonstrationHit(_Open):
    """A demonstration found by a store search, with its similarity score."""

    id: str
    task: Optional[str] = None
    score: float = 0.0
    input: Optional[str] = None
    output: Optional[str] = None
    definition: Optional[str] = None


class Health(_Open):
    """The answer of ``GET /health``; true in a boolean context when the server is ready."""

    ok: bool
    status_code: int
    body: Union[dict[str, Any], str, None] = None

    def __bool__(self) -> bool:
        return self.ok
