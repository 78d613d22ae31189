"""Request bodies: the one place where chat and completion bodies are built.

The client methods, the streaming variants and the batch helpers all call these, so a body
sent over HTTP and a body written to a batch file are the same for the same arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from pydantic import BaseModel

from .types import Demonstrations, Example, Routing

__all__ = [
    "DemonstrationsArg",
    "ExamplesArg",
    "MessagesArg",
    "PromptArg",
    "RoutingArg",
    "chat_body",
    "completion_body",
    "crosstask_extension",
    "examples_list",
]

MessagesArg = Sequence[Union[Mapping[str, Any], BaseModel]]
PromptArg = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]
DemonstrationsArg = Union[Demonstrations, Mapping[str, Any], None]
RoutingArg = Union[Routing, Mapping[str, Any], None]
ExamplesArg = Sequence[Union[Example, Mapping[str, Any]]]

# Keys of a body that have their own typed argument and may not come in through **sampling.
_RESERVED = frozenset({"crosstask", "model", "messages", "prompt", "stream"})


def crosstask_extension(
    *,
    task: Optional[str] = None,
    demonstrations: DemonstrationsArg = None,
    routing: RoutingArg = None,
    exclude_tasks: Optional[Sequence[str]] = None,
) -> Optional[dict[str, Any]]:
    """The ``crosstask`` object of a request body, or ``None`` when nothing was asked for.

    Fields left ``None`` are omitted so that the server defaults apply.
    """
    extension: dict[str, Any] = {}
    if task is not None:
        extension["task"] = task
    if demonstrations is not None:
        extension["demonstrations"] = Demonstrations.model_validate(
            _plain(demonstrations)
        ).model_dump(exclude_none=True)
    if routing is not None:
        extension["routing"] = Routing.model_validate(_plain(routing)).model_dump(exclude_none=True)
    if exclude_tasks is not None:
        if isinstance(exclude_tasks, str):
            raise TypeError("exclude_tasks must be a list of task names, not a string")
        extension["exclude_tasks"] = list(exclude_tasks)
    return extension or None


def _plain(value: Union[BaseModel, Mapping[str, Any]]) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"expected a model or a mapping, got {type(value).__name__}")


def _messages(messages: MessagesArg) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} messages")
    return [_plain(message) for message in messages]


def _sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    reserved = sorted(_RESERVED.intersection(sampling))
    if reserved:
        raise TypeError(
            f"{', '.join(reserved)} cannot be passed as sampling parameters: use the "
            "typed arguments (model, task, demonstrations, routing, exclude_tasks, stream)"
        )
    return {key: value for key, value in sampling.items() if value is not None}


def _finish(
    body: dict[str, Any],
    *,
    task: Optional[str],
    demonstrations: DemonstrationsArg,
    routing: RoutingArg,
    exclude_tasks: Optional[Sequence[str]],
    stream: bool,
    sampling: Mapping[str, Any],
) -> dict[str, Any]:
    body.update(_sampling(sampling))
    if stream:
        body["stream"] = True
    extension = crosstask_extension(
        task=task, demonstrations=demonstrations, routing=routing, exclude_tasks=exclude_tasks
    )
    if extension is not None:
        body["crosstask"] = extension
    return body


def chat_body(
    messages: MessagesArg,
    model: str = "auto",
    *,
    task: Optional[str] = None,
    demonstrations: DemonstrationsArg = None,
    routing: RoutingArg = None,
    exclude_tasks: Optional[Sequence[str]] = None,
    stream: bool = False,
    sampling: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The body of ``POST /v1/chat/completions``."""
    return _finish(
        {"model": model, "messages": _messages(messages)},
        task=task,
        demonstrations=demonstrations,
        routing=routing,
        exclude_tasks=exclude_tasks,
        stream=stream,
        sampling=sampling or {},
    )


def completion_body(
    prompt: PromptArg,
    model: str = "auto",
    *,
    task: Optional[str] = None,
    demonstrations: DemonstrationsArg = None,
    routing: RoutingArg = None,
    exclude_tasks: Optional[Sequence[str]] = None,
    stream: bool = False,
    sampling: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The body of ``POST /v1/completions``."""
    if isinstance(prompt, (bytes, bytearray)):
        raise TypeError("prompt must be a string, a list of strings, or token ids")
    prompt_value: Any = (
        prompt
        if isinstance(prompt, str)
        else [p if isinstance(p, (str, int)) else list(p) for p in prompt]
    )
    return _finish(
        {"model": model, "prompt": prompt_value},
        task=task,
        demonstrations=demonstrations,
        routing=routing,
        exclude_tasks=exclude_tasks,
        stream=stream,
        sampling=sampling or {},
    )


def examples_list(examples: ExamplesArg) -> list[dict[str, Any]]:
    """Validate store examples into ``[{"input", "output"}, ...]``."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError("examples must be a list of {'input': ..., 'output': ...} pairs")
    return [
        Example.model_validate(_plain(example)).model_dump(exclude_none=True)
        for example in examples
    ]
