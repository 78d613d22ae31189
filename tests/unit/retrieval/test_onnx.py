"""The embedder's ONNX backend: export, equality with torch, caching, identity checks.

Most tests use a tiny random BERT written here (export in about a second); one uses the
real MiniLM export that `crosstask prepare` caches under CROSSTASK_HOME (exported once,
about 25 s, if the cache is empty).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.build import build_store, prefetched
from retrieval.embedder import (
    Embedder,
    EmbedderError,
    EmbedderMismatchError,
    check_store_metadata,
    store_backend,
)
from retrieval.onnx_export import (
    INFO_FILE,
    OnnxExportError,
    ensure_export,
    export_folder,
    length_buckets,
    load_export,
)
from retrieval.retriever import open_retriever
from retrieval.sources import BigBenchSource
from retrieval.store_types import StoreError

pytest.importorskip("onnxruntime")

WORDS = (
    "the a of to and in is it cat dog kitten sleeps sun sofa how many legs spider what "
    "plus two four translate good morning french sort words pear apple fig ? ' . , :"
)
TEXTS = [
    "how many legs has a spider ?",
    "translate good morning to french",
    "the cat sleeps in the sun on the sofa " * 12,  # Past the tiny model's 48 tokens.
    "sort words : pear apple fig",
    "what is 2 plus 2 ?",
    "",
    "  a kitten  ",
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT as a sentence-transformers folder (mean pooling,
    normalized), written without sentence-transformers so any of its versions reads it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-st")
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split(), *letters]
    vocab += [f"##{c}" for c in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(folder / "vocab.txt"), model_max_length=64)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(folder))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 48, "do_lower_case": False})
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (folder / "2_Normalize").mkdir()
    return folder


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedders")


@pytest.fixture(scope="session")
def tiny_torch(tiny_model: Path) -> Embedder:
    return Embedder(tiny_model, backend="torch", dtype="float32", num_threads=1)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model: Path, tiny_cache: Path) -> Embedder:
    return Embedder(tiny_model, backend="onnx", num_threads=1, cache_dir=tiny_cache)


@pytest.fixture(scope="session")
def tiny_int8(tiny_model: Path, tiny_cache: Path) -> Embedder:
    return Embedder(
        tiny_model, backend="onnx", quantize="int8", num_threads=1, cache_dir=tiny_cache
    )


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.sum(a * b, axis=1))


# ----------------------------------------------------------------------------- equality


def test_float_onnx_equals_torch(tiny_torch: Embedder, tiny_onnx: Embedder) -> None:
    expected = tiny_torch.encode(TEXTS)
    got = tiny_onnx.encode(TEXTS)
    assert got.shape == expected.shape == (len(TEXTS), 32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cosines(got, expected).min() > 0.9999
    assert tiny_onnx.max_seq_length == tiny_torch.max_seq_length == 48


def test_int8_close_to_torch(tiny_torch: Embedder, tiny_int8: Embedder) -> None:
    assert _cosines(tiny_int8.encode(TEXTS), tiny_torch.encode(TEXTS)).min() > 0.97
    assert tiny_int8.identity == {
        "embedder": tiny_int8.name,
        "embedder_backend": "onnx",
        "embedder_quantize": "int8",
    }


def test_real_minilm_int8_close_to_torch(embedder: Any) -> None:
    """The default export (as `crosstask prepare` caches it) against the torch embedder."""
    onnx = Embedder(backend="onnx", quantize="int8", num_threads=1)
    texts = [
        "How many legs does a spider have?",
        "Translate 'good morning' into French.",
        "Sort these words alphabetically: pear apple fig",
        "Definition: Generate the type of the given question-answer pair.\n"
        "Question: When was it built? (Answer: 1922).",
    ]
    assert _cosines(onnx.encode(texts), embedder.encode(texts)).min() > 0.97
    a, b, c = onnx.encode(["a small kitten", "a young cat", "quarterly tax returns"])
    assert float(a @ b) > float(a @ c) + 0.2
    validation = onnx._onnx.export.info["validation"]
    assert validation["passed"] and validation["min_cosine"] >= 0.97


# ----------------------------------------------------------------------------- bucketing


def test_length_buckets_cover_every_index_once_within_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 300, size=500)]
    batches = length_buckets(lengths, batch_tokens=2048, max_batch=64)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 64
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[-1]] == longest
        assert len(batch) == 1 or len(batch) * longest <= 2048
    assert length_buckets([], 2048, 64) == []


def test_bucketing_preserves_order(tiny_onnx: Embedder) -> None:
    # Lengths deliberately out of order: rows must come back in the order given.
    texts = [TEXTS[2], TEXTS[4], TEXTS[0], TEXTS[2][:40], TEXTS[6], TEXTS[3]]
    together = tiny_onnx.encode(texts)
    alone = np.stack([tiny_onnx.encode_one(t) for t in texts])
    assert _cosines(together, alone).min() > 0.99999
    assert tiny_onnx.encode([]).shape == (0, 32)


def test_prefetched_keeps_order_and_raises() -> None:
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("bad task.json")

    got = []
    with pytest.raises(ValueError, match="bad task"):
        for item in prefetched(failing(), depth=2):
            got.append(item)
    assert got == [1]


def test_prefetched_closed_early_stops_the_reader() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    stream = prefetched(endless(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert closed.wait(5)


# ----------------------------------------------------------------------------- cache


def test_export_is_cached_and_keyed_by_content(
    tiny_model: Path, tiny_onnx: Embedder, tmp_path: Path
) -> None:
    cache = tiny_onnx._onnx.export.folder.parent
    first = ensure_export(tiny_model, cache, "none")
    stamp = (first.folder / INFO_FILE).stat().st_mtime_ns
    t0 = time.perf_counter()
    again = ensure_export(tiny_model, cache, "none")
    assert again.folder == first.folder
    assert (again.folder / INFO_FILE).stat().st_mtime_ns == stamp  # Not exported again.
    assert time.perf_counter() - t0 < 2
    assert first.info["validation"]["passed"]
    assert first.info["fused_operators"].get("Attention") == 2
    # Other weights, another key: a changed model never reuses a stale export.
    import shutil

    changed = tmp_path / tiny_model.name
    shutil.copytree(tiny_model, changed)
    config = json.loads((changed / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (changed / "config.json").write_text(json.dumps(config))
    assert export_folder(changed, cache, "none").name != first.folder.name
    assert load_export(changed, cache, "none") is None
    with pytest.raises(OnnxExportError, match="quantize"):
        export_folder(tiny_model, cache, "int4")


def test_unsupported_pooling_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    odd = tmp_path / "max-pooled"
    shutil.copytree(tiny_model, odd)
    (odd / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_max_tokens": True})
    )
    with pytest.raises(EmbedderError, match="pooling"):
        Embedder(odd, backend="onnx", cache_dir=tmp_path / "cache")


def test_auto_falls_back_to_torch(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retrieval.onnx_export as onnx_export

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OnnxExportError("validation failed")

    monkeypatch.setattr(onnx_export, "ensure_export", broken)
    embedder = Embedder(tiny_model, backend="auto", num_threads=1, cache_dir=tmp_path)
    assert (embedder.backend, embedder.quantize) == ("torch", "none")


def test_bad_options(tiny_model: Path) -> None:
    with pytest.raises(EmbedderError, match="quantize"):
        Embedder(tiny_model, backend="torch", quantize="int8")
    with pytest.raises(EmbedderError, match="quantize"):
        Embedder(tiny_model, backend="onnx", quantize="fp4")


# ----------------------------------------------------------------------------- identity


def test_store_metadata_checks(
    tiny_torch: Embedder, tiny_onnx: Embedder, tiny_int8: Embedder
) -> None:
    torch_store = {"embedder": tiny_torch.name}  # A store from before the onnx backend.
    assert store_backend(torch_store) == ("torch", "none")
    check_store_metadata(torch_store, tiny_torch, "s")
    check_store_metadata(torch_store, tiny_onnx, "s")  # float32 ONNX is interchangeable.
    with pytest.raises(EmbedderMismatchError, match="int8"):
        check_store_metadata(torch_store, tiny_int8, "s")
    int8_store = dict(tiny_int8.identity)
    check_store_metadata(int8_store, tiny_int8, "s")
    with pytest.raises(EmbedderMismatchError, match="int8"):
        check_store_metadata(int8_store, tiny_torch, "s")
    with pytest.raises(EmbedderMismatchError, match="embedded with"):
        check_store_metadata({"embedder": "another-model"}, tiny_int8, "s")


def test_open_retriever_follows_the_store_and_refuses_a_mismatch(
    tiny_model: Path,
    tiny_int8: Embedder,
    tiny_cache: Path,
    fake_sdist: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("retrieval.onnx_export.default_cache_root", lambda: tiny_cache)
    out = tmp_path / "store"
    build_store(out, BigBenchSource(fake_sdist), ["object_counting"], tiny_int8, per_task=None)
    retriever = open_retriever(out, tiny_model)
    try:
        assert (retriever.embedder.backend, retriever.embedder.quantize) == ("onnx", "int8")
        meta = retriever.store.metadata()
        assert meta["embedder_backend"] == "onnx" and meta["embedder_quantize"] == "int8"
        vector = retriever.embedder.encode_one("how many legs has a spider ?")
        assert retriever.store.search(vector, 1, 0.0, [])
    finally:
        retriever.store.close()
    with pytest.raises(StoreError, match="int8"):
        open_retriever(out, tiny_model, backend="torch")
    with pytest.raises(StoreError, match="int8"):
        open_retriever(out, tiny_model, backend="onnx", quantize="none")
