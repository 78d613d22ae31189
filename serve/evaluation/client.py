"""The requests of an evaluation, through the official `openai` client as a user's would
go, and what came back for each."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serve.evaluation.config import EvalConfig
from serve.evaluation.items import Item
from serve.evaluation.modes import Variant, chat_messages, plain_prompt, shaped_messages
from serve.evaluation.scoring import exact_match, first_line, rouge_l

if TYPE_CHECKING:
    from openai import AsyncOpenAI

AUTO_MODEL = "auto"


class EvalError(RuntimeError):
    """The evaluation cannot start: no model to ask."""


@dataclass(slots=True)
class Outcome:
    """What came back for one item: the raw answer, or why there is none."""

    item: Item
    raw: str | None = None
    error: str | None = None
    status: int | None = None
    prediction: str = ""
    rouge_l: float = 0.0
    exact_match: float = 0.0

    def score(self) -> None:
        # A failed request scores 0 rather than being left out: leaving it out would let a
        # mode that fails on its hard examples look better than one that answers them.
        if self.raw is None:
            return
        self.prediction = first_line(self.raw)
        self.rouge_l = rouge_l(self.prediction, self.item.targets)
        self.exact_match = exact_match(self.prediction, self.item.targets)


@dataclass(slots=True)
class VariantRun:
    variant: Variant
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    @property
    def failed_requests(self) -> int:
        return sum(o.raw is None for o in self.outcomes)


@dataclass(frozen=True, slots=True)
class RequestSettings:
    model: str
    max_tokens: int
    concurrency: int


def api_base(url: str) -> str:
    """The openai client wants the `/v1` root; accept `http://host:port` as vLLM's bench does."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def make_client(config: EvalConfig) -> AsyncOpenAI:
    from openai import AsyncOpenAI

    # The SDK insists on a key; a server without auth ignores whatever is sent.
    key = config.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    return AsyncOpenAI(base_url=api_base(config.base_url), api_key=key, timeout=config.timeout)


def error_message(exc: BaseException) -> str:
    """The server's own message when it sent an OpenAI error body, else the exception."""
    body = getattr(exc, "body", None)
    status = getattr(exc, "status_code", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
        return f"{status}: {message}" if status else message
    return str(exc) or type(exc).__name__


async def _complete(
    client: AsyncOpenAI, settings: RequestSettings, variant: Variant, item: Item
) -> str:
    extra_body = {"crosstask": variant.extension(item.task)}
    if variant.endpoint == "completions":
        completion = await client.completions.create(
            model=settings.model,
            prompt=plain_prompt(item.definition, item.input),
            temperature=0.0,
            max_tokens=settings.max_tokens,
            # No "\n\n" stop: the model often opens with a blank line, and first_line()
            # already keeps only the answer line.
            extra_body=extra_body,
        )
        return completion.choices[0].text or ""
    chat = await client.chat.completions.create(
        model=settings.model,
        messages=(shaped_messages if variant.endpoint == "shaped" else chat_messages)(
            item.definition, item.input
        ),  # type: ignore[arg-type]
        temperature=0.0,
        max_tokens=settings.max_tokens,
        extra_body=extra_body,
    )
    return chat.choices[0].message.content or ""


async def _attempt(
    client: AsyncOpenAI, settings: RequestSettings, variant: Variant, item: Item
) -> Outcome:
    import openai

    try:
        return Outcome(item=item, raw=await _complete(client, settings, variant, item))
    except openai.APIError as exc:
        return Outcome(
            item=item, error=error_message(exc), status=getattr(exc, "status_code", None)
        )
    except IndexError:  # A 200 without choices: the server's fault, but this example's loss.
        return Outcome(item=item, error="the response has no choices")


async def run_variant(
    client: AsyncOpenAI, settings: RequestSettings, variant: Variant, items: Sequence[Item]
) -> VariantRun:
    """Send every item in this variant's way, `concurrency` at a time.

    The first item goes alone: a server that does not support the mode answers it 400,
    and then the mode is recorded as an error without sending the rest. A mode whose every
    request failed (for whatever reason) is an error too.
    """
    run = VariantRun(variant=variant)
    started = time.perf_counter()
    if not items:
        return run
    probe = await _attempt(client, settings, variant, items[0])
    if probe.status == 400:
        run.outcomes = [probe]
        run.error = probe.error
        run.seconds = time.perf_counter() - started
        return run
    semaphore = asyncio.Semaphore(max(1, settings.concurrency))

    async def bounded(item: Item) -> Outcome:
        async with semaphore:
            return await _attempt(client, settings, variant, item)

    rest = await asyncio.gather(*(bounded(item) for item in items[1:]))
    run.seconds = time.perf_counter() - started
    run.outcomes = [probe, *rest]
    for outcome in run.outcomes:
        outcome.score()
    if run.failed_requests == len(run.outcomes):
        common = Counter(o.error for o in run.outcomes).most_common(1)[0][0]
        run.error = f"every request failed, e.g. {common}"
    return run


async def resolve_model(client: AsyncOpenAI) -> str:
    """The base model's id: the first model that is neither `auto` nor an adapter (an
    adapter names its base in `parent`); the first non-`auto` one if all have a parent."""
    models = [m async for m in client.models.list()]
    candidates = [m for m in models if m.id != AUTO_MODEL]
    for model in candidates:
        if not getattr(model, "parent", None):
            return model.id
    if candidates:
        return candidates[0].id
    raise EvalError("GET /v1/models lists no model other than `auto`")
