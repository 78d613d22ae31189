"""crosstask_adapter.json: round trip, and a clear refusal of every kind of broken file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from routing.adapter_meta import (
    META_FILE,
    AdapterMeta,
    Prototype,
    base_signature,
    read_meta,
    write_meta,
)

BASE = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}


def _meta() -> AdapterMeta:
    return AdapterMeta(
        name="spec-0-mctaco",
        kind="specialist",
        tasks=["natural_instructions/subtask010_mctaco_answer_generation_event_duration"],
        rank=4,
        base_model=dict(BASE),
        prototype=Prototype("all-MiniLM-L6-v2", 1, [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], [5, 3]),
        recipe={"settings": {"rank": 4}, "fingerprint": "abc"},
    )


def test_round_trip(tmp_path: Path) -> None:
    meta = _meta()
    path = write_meta(tmp_path, meta)
    assert path == tmp_path / META_FILE
    assert read_meta(tmp_path) == meta
    assert read_meta(tmp_path).prototype.dim == 3
    # Nothing but the file itself is left behind (the write is atomic via a temp file).
    assert [p.name for p in tmp_path.iterdir()] == [META_FILE]


def test_missing_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing"):
        read_meta(tmp_path)


def test_unreadable_json_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        read_meta(tmp_path)


def _broken(tmp_path: Path, change: dict[str, Any]) -> str:
    raw = _meta().to_json()
    for key, value in change.items():
        if "." in key:
            outer, inner = key.split(".")
            raw[outer][inner] = value
        elif value is _DELETE:
            del raw[key]
        else:
            raw[key] = value
    (tmp_path / META_FILE).write_text(json.dumps(raw))
    with pytest.raises(ValueError) as info:
        read_meta(tmp_path)
    return str(info.value)


_DELETE = object()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "a/b"}, "name"),
        ({"kind": "expert"}, "kind"),
        ({"tasks": []}, "tasks"),
        ({"tasks": [1]}, "tasks"),
        ({"rank": 0}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": "8"}, "rank"),
        ({"base_model": {"model_type": "llama"}}, "base_model"),
        ({"prototype": _DELETE}, "prototype"),
        ({"prototype.embedder": ""}, "prototype.embedder"),
        ({"prototype.query_text_version": "1"}, "query_text_version"),
        ({"prototype.centroids": []}, "centroids"),
        ({"prototype.centroids": [[1.0, 0.0, 0.0], [1.0, 0.0]]}, "differ in length"),
        ({"prototype.centroids": [[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]]}, "unit length"),
        ({"prototype.centroids": [[math.nan, 0.0, 0.0], [1.0, 0.0, 0.0]]}, "non-finite"),
        ({"prototype.centroids": [["x", 0.0, 0.0], [1.0, 0.0, 0.0]]}, "numbers"),
        ({"prototype.counts": [5]}, "counts"),
        ({"prototype.counts": [5, 0]}, "counts"),
        ({"recipe": []}, "recipe"),
        ({"created": 5}, "created"),
    ],
)
def test_broken_fields_are_refused_by_name(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    message = _broken(tmp_path, change)
    assert field in message
    assert str(tmp_path / META_FILE) in message


def test_write_refuses_what_read_would_refuse(tmp_path: Path) -> None:
    bad = AdapterMeta(
        name="x",
        kind="specialist",
        tasks=["t"],
        rank=2,
        base_model=dict(BASE),
        prototype=Prototype("e", 1, [[3.0, 4.0]], [1]),
    )
    with pytest.raises(ValueError, match="unit length"):
        write_meta(tmp_path, bad)
    assert not (tmp_path / META_FILE).exists()


def test_base_signature(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "architectures": ["X"]}))
    assert base_signature(tmp_path) == BASE
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="hidden_size"):
        base_signature(tmp_path)
    with pytest.raises(ValueError, match="cannot read"):
        base_signature(tmp_path / "nowhere")
