"""Fixtures for the retrieval unit tests: a fake BIG-bench sdist and the real embedder."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Never reach for a model hub: the embedder loads from the packaged folder only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
LONG_NI = "natural_instructions/subtask008_mctaco_wrong_answer_generation_transient_stationary"

FAKE_TASKS: dict[str, dict[str, Any]] = {
    "object_counting": {
        "name": "object_counting",
        "description": "Questions that involve enumerating objects",
        "prefix": "",
        "examples": [
            {"input": "I have a violin and a flute. How many instruments?", "target": ["two", "2"]},
            {"input": "I have a car. How many objects?", "target": ["one", "1"]},
            {"input": "", "target": "dropped: no input"},
            {"input": "Nothing to say", "target": [""]},
        ],
    },
    "arithmetic": {"name": "arithmetic", "description": "Perform arithmetic"},
    "arithmetic/1_digit_addition": {
        "name": "1_digit_addition",
        "description": "1-digit addition.",
        "examples": [
            {
                "input": "What is 0 plus 0?",
                "target": "0",
                "target_scores": {"2": 0.0, "banana": 0.0, "0": 1.0},
            },
            {"input": "What is 1 plus 2?", "target": "3"},
        ],
    },
    "date_understanding": {
        "name": "date_understanding",
        "description": "Infer the date from context",
        "task_prefix": "   ",
        "examples": [
            {
                "input": "Yesterday was April 30, 2021. What is the date today?",
                "target_scores": {"04/29/2021": 0, "05/01/2021": 1, "05/02/2021": 0},
            },
            {
                "input": "Pick the even ones.",
                "target_scores": {"one": 0, "two": 1, "four": 1},
            },
        ],
    },
    "cause_and_effect/one_sentence": {
        "name": "one_sentence",
        "description": "Answer multiple-choice questions distinguishing cause and effect",
        "task_prefix": "Which of the following sentences makes more sense?",
        "examples": [
            {
                "input": "",
                "target_scores": {
                    "The child cried because it hurt its knee.": 1.0,
                    "The child hurt its knee because it cried.": 0.0,
                },
            }
        ],
    },
    "natural_instructions/subtask046_miscellaenous_question_typing": {
        "name": "subtask046_miscellaenous_question_typing",
        "description": "Definition: Generate the type of the given question-answer pair (cut",
        "task_prefix": "Definition: Generate the type of the given question-answer pair. "
        "Things to Avoid: none. Prompt: Generate the type.",
        "examples": [
            {"input": "Question: When was it built? (Answer: 1922).", "target": ["Date."]},
            {"input": "Question: Who wrote it? (Answer: Ann).", "target": ["Humans.", "Law."]},
        ],
    },
    LONG_NI: {
        "name": LONG_NI.split("/")[1],
        "description": "Definition: write an implausible answer",
        "task_prefix": "Definition: write an implausible answer to the question.",
        "examples": [
            {"input": "Sentence: It rained. Question: Is it raining?", "target": ["always."]}
        ],
    },
}


def write_fake_sdist(path: Path, tasks: dict[str, dict[str, Any]] = FAKE_TASKS) -> Path:
    """A .tar.gz laid out like the real bigbench-1.0.0 sdist, with non-task files mixed in."""

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        add(tar, "bigbench-1.0.0/PKG-INFO", b"Name: bigbench\n")
        add(tar, f"{ROOT}/README.md", b"# tasks\n")
        add(tar, f"{ROOT}/some_programmatic_task/task.py", b"print('hi')\n")
        for name, data in tasks.items():
            add(tar, f"{ROOT}/{name}/README.md", b"about\n")
            add(tar, f"{ROOT}/{name}/task.json", json.dumps(data).encode())
        add(tar, "bigbench-1.0.0/bigbench/task.json", b"{}")  # Not under benchmark_tasks.
    return path


@pytest.fixture
def fake_sdist(tmp_path: Path) -> Path:
    return write_fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")


@pytest.fixture
def make_sdist() -> Callable[..., Path]:
    """write_fake_sdist(path, tasks=FAKE_TASKS), for tests that need their own tasks."""
    return write_fake_sdist


@pytest.fixture(scope="session")
def embedder() -> Iterator[Any]:
    from retrieval.embedder import Embedder

    # One thread: the suite shares the CPU with whatever else runs; tests are no benchmark.
    yield Embedder(num_threads=1)


def _unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def unit_vectors() -> Callable[..., np.ndarray]:
    """unit_vectors(n, dim, seed=0): random L2-normalized float32 rows."""
    return _unit_vectors
