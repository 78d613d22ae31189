"""Training prompts are the server's prompts, token for token.

The server side runs for real (serve.pipeline.Pipeline.prepare, with serve.engine.Engine's
own tokenizing methods on the real tokenizer); only vLLM and the store are stood in for.
If either side changes how a prompt is laid out, this fails, and an adapter would
otherwise be trained for prompts it never sees.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.prompt import Demonstration
from retrieval.sources import Example, Task
from retrieval.store_types import Hit
from routing.training.data import render_ids, training_prompt
from routing.training.recipe import DataConfig
from serve.engine.engine import Engine
from serve.engine.types import GenerationParams
from serve.metrics import Metrics
from serve.pipeline import CrosstaskOptions, GenerationRequest, Message, Pipeline
from serve.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFINITION = "Given a sentence, answer with the number of animals it mentions."
INPUT = "I saw a cat, two dogs and a horse."
HITS = [
    Hit("d1", "counting", "Count the objects.", "a pen and a cup", "2", 0.9, "bigbench"),
    Hit("d2", "counting", "Count the objects.", "a car", "1", 0.8, "bigbench"),
    Hit("d3", "colours", "Name the colour.", "the sky", "blue", 0.7, "bigbench"),
]


def _home() -> Path:
    return Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    folder = _home() / "models" / "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.fail(f"base model missing at {folder}: run `make test`", pytrace=False)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class _TokenizingEngine:
    """Engine's own render_chat and encode on the real tokenizer; no vLLM."""

    render_chat = Engine.render_chat
    encode = Engine.encode

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = 8192
        self.errored = False
        self.config = type("Config", (), {"served_name": "smollm2-135m-instruct"})()

    def check_params(self, params: GenerationParams) -> None:
        pass


class _Retriever:
    def __init__(self, hits: Sequence[Hit]) -> None:
        self.hits = list(hits)

    async def embed(self, text: str) -> np.ndarray:
        return np.ones(4, dtype=np.float32) / 2

    async def search(
        self, vector: np.ndarray, k: int, min_score: float, exclude: Sequence[str]
    ) -> list[Hit]:
        return [h for h in self.hits if h.task not in exclude][:k]


def _served(tokenizer: Any, k: int, prompt_format: str) -> list[int]:
    settings = Settings(prompt_format=prompt_format)  # type: ignore[arg-type]
    pipeline = Pipeline(
        settings,
        _TokenizingEngine(tokenizer),  # type: ignore[arg-type]
        Metrics(),
        _Retriever(HITS),  # type: ignore[arg-type]
    )
    request = GenerationRequest(
        model="smollm2-135m-instruct",
        params=GenerationParams(max_tokens=16, temperature=0.0),
        max_tokens=16,
        # As clients and `crosstask eval` ask: the definition as the system message.
        messages=[Message("system", DEFINITION), Message("user", INPUT)],
        options=CrosstaskOptions(k=k, exclude_tasks=["animals"]),
    )
    prepared = asyncio.run(pipeline.prepare(request))
    assert len(prepared.annotation.demonstrations) == min(k, len(HITS))
    return prepared.prompt_token_ids


def _trained(tokenizer: Any, k: int, prompt_format: str) -> list[int]:
    task = Task("animals", DEFINITION, [Example(INPUT, "4", ["4"])])
    demos = [Demonstration(h.task, h.definition, h.input, h.output) for h in HITS[:k]]
    data = DataConfig(prompt_format=prompt_format)  # type: ignore[arg-type]
    return render_ids(tokenizer, training_prompt(task, task.examples[0], demos, data))


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_training_prompt_is_the_served_prompt(tokenizer: Any, k: int, prompt_format: str) -> None:
    served = _served(tokenizer, k, prompt_format)
    assert _trained(tokenizer, k, prompt_format) == served
    text = tokenizer.decode(served)
    assert INPUT in text and DEFINITION in text
    if k:
        assert "Count the objects." in text
