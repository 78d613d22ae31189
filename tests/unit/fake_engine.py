"""A small stand-in for serve.engine.Engine, for unit tests of the HTTP layer only."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from serve.engine.types import EngineConfig, GenerationParams, InvalidParamsError, OutputDelta
from serve.runtime import Startup


class FakeTokenizer:
    def __len__(self) -> int:
        return 1000


class FakeEngine:
    """Echoes the words of the prompt back, one word per step."""

    def __init__(self, config: EngineConfig, max_model_len: int = 64) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.tokenizer = FakeTokenizer()
        self.errored = False
        self.last_prompt: list[int] = []
        self.preemptions = 0
        self.prefix_cache = (0, 0)

    def queue_lengths(self) -> tuple[int, int]:
        return (0, 0)

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]

    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return [1] + [len(w) for m in messages for w in m["content"].split()]

    def check_params(self, params: GenerationParams) -> None:
        if params.n > 1 and params.temperature == 0:
            raise InvalidParamsError("n must be 1 when using greedy sampling")

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: GenerationParams,
        request_id: str,
        lora: object = None,
    ) -> AsyncIterator[list[OutputDelta]]:
        self.last_prompt = prompt_token_ids
        for step in range(params.max_tokens):
            await asyncio.sleep(0)
            last = step == params.max_tokens - 1
            yield [
                OutputDelta(
                    index=i,
                    text=f"w{step} ",
                    token_ids=[step],
                    logprobs=None,
                    finish_reason="length" if last else None,
                )
                for i in range(params.n)
            ]

    def shutdown(self) -> None:
        pass


def fake_config() -> EngineConfig:
    return EngineConfig(model_dir=Path("/models/fake"), served_name="fake-model")


class BlockingStarter:
    """An engine starter that waits until released, to observe start-up behaviour."""

    def __init__(self, fail: bool = False) -> None:
        self.release = threading.Event()
        self.fail = fail
        self.engine: FakeEngine | None = None

    def __call__(self, config: EngineConfig) -> FakeEngine:
        self.release.wait(timeout=30)
        if self.fail:
            raise RuntimeError("no weights")
        self.engine = FakeEngine(config)
        return self.engine


def fake_startup(
    start_engine: Callable[[EngineConfig], object] | None = None,
    open_retriever: Callable[[], object] | None = None,
) -> Startup:
    """The app's start-up steps with the fake engine (and no vLLM import at all)."""
    return Startup(
        fake_config(),
        start_engine=start_engine or FakeEngine,  # type: ignore[arg-type]
        open_retriever=open_retriever or (lambda: None),  # type: ignore[arg-type]
        import_libraries=lambda: None,
    )
