"""The metadata file of a crosstask adapter: `crosstask_adapter.json`, stored beside PEFT's
own files in each adapter folder:

    <root>/<name>/adapter_config.json
    <root>/<name>/adapter_model.safetensors
    <root>/<name>/crosstask_adapter.json

It says what the router and the registry need without opening the weights: which tasks
the adapter was trained on (so `exclude_tasks` can rule it out), its rank, the base model
it belongs to (so an adapter for another base is refused) and its routing prototype: the
centroids of its training queries, embedded exactly as requests are.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from retrieval.durable import write_atomic

META_FILE = "crosstask_adapter.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
KINDS = ("generalist", "specialist")
# The base config.json fields that must match for an adapter to fit a model: they fix
# the shapes of every LoRA factor (and the vocabulary its training saw).
BASE_SIGNATURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
# Centroids must be unit length; allow for float rounding in the JSON round trip.
_NORM_TOLERANCE = 1e-3

Kind = Literal["generalist", "specialist"]


@dataclass(frozen=True)
class Prototype:
    """Where an adapter sits in query-embedding space: the L2-normalized centroids of its
    embedded training queries and how many queries each one summarizes."""

    embedder: str
    query_text_version: int
    centroids: list[list[float]]
    counts: list[int]

    @property
    def dim(self) -> int:
        return len(self.centroids[0])


@dataclass(frozen=True)
class AdapterMeta:
    name: str
    kind: Kind
    tasks: list[str]
    rank: int
    base_model: dict[str, Any]
    prototype: Prototype
    recipe: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def base_signature(model_dir: Path | str) -> dict[str, Any]:
    """The fields of a base model's config.json that an adapter must match."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the base model config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    # Multimodal configs nest the language model's fields; SmolLM2 keeps them at the top.
    text = config.get("text_config")
    source = {**config, **text} if isinstance(text, dict) else config
    missing = [f for f in BASE_SIGNATURE_FIELDS if f not in source]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return {f: source[f] for f in BASE_SIGNATURE_FIELDS}


def write_meta(folder: Path | str, meta: AdapterMeta) -> Path:
    """Write `<folder>/crosstask_adapter.json` atomically (after validating it)."""
    _validate(meta.to_json(), Path(folder) / META_FILE)
    text = json.dumps(meta.to_json(), indent=2, ensure_ascii=False) + "\n"
    target = Path(folder) / META_FILE
    write_atomic(target, lambda fh: fh.write(text.encode("utf-8")))
    return target


def read_meta(folder: Path | str) -> AdapterMeta:
    """The metadata of the adapter in `folder`; ValueError naming the file and the field
    when it is missing, unreadable or malformed."""
    path = Path(folder) / META_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: missing (not a crosstask adapter folder)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable: {exc}") from exc
    return _validate(raw, path)


def _validate(raw: object, path: Path) -> AdapterMeta:
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}")

    if not isinstance(raw, dict):
        raise bad("not a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name or name in (".", ".."):
        raise bad("`name` must be a non-empty string without '/'")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise bad(f"`kind` must be one of {', '.join(KINDS)}, not {kind!r}")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise bad("`tasks` must be a non-empty list of task names")
    rank = raw.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad(f"`rank` must be a positive integer, not {rank!r}")
    base = raw.get("base_model")
    if not isinstance(base, dict) or any(f not in base for f in BASE_SIGNATURE_FIELDS):
        raise bad(f"`base_model` must hold {', '.join(BASE_SIGNATURE_FIELDS)}")
    prototype = _prototype(raw.get("prototype"), bad)
    recipe = raw.get("recipe", {})
    if not isinstance(recipe, dict):
        raise bad("`recipe` must be an object")
    created = raw.get("created")
    if not isinstance(created, str):
        raise bad("`created` must be a string")
    return AdapterMeta(
        name=name,
        kind=cast(Kind, kind),
        tasks=list(tasks),
        rank=rank,
        base_model={f: base[f] for f in base},
        prototype=prototype,
        recipe=recipe,
        created=created,
    )


def _prototype(raw: object, bad: Any) -> Prototype:
    if not isinstance(raw, dict):
        raise bad("`prototype` must be an object")
    embedder = raw.get("embedder")
    if not isinstance(embedder, str) or not embedder:
        raise bad("`prototype.embedder` must name the embedder")
    version = raw.get("query_text_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("`prototype.query_text_version` must be an integer")
    centroids = raw.get("centroids")
    counts = raw.get("counts")
    if not isinstance(centroids, list) or not centroids:
        raise bad("`prototype.centroids` must be a non-empty list of vectors")
    if not isinstance(counts, list) or len(counts) != len(centroids):
        raise bad("`prototype.counts` must give one count per centroid")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts):
        raise bad("`prototype.counts` must be positive integers")
    dim = None
    rows: list[list[float]] = []
    for i, vector in enumerate(centroids):
        if not isinstance(vector, list) or not vector:
            raise bad(f"`prototype.centroids[{i}]` must be a non-empty list of numbers")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
            raise bad(f"`prototype.centroids[{i}]` must hold numbers only")
        values = [float(x) for x in vector]
        if not all(math.isfinite(x) for x in values):
            raise bad(f"`prototype.centroids[{i}]` holds a non-finite number")
        if dim is None:
            dim = len(values)
        elif len(values) != dim:
            raise bad("`prototype.centroids` differ in length")
        norm = math.sqrt(sum(x * x for x in values))
        if abs(norm - 1.0) > _NORM_TOLERANCE:
            raise bad(f"`prototype.centroids[{i}]` is not unit length (norm {norm:.4f})")
        rows.append(values)
    return Prototype(
        embedder=embedder, query_text_version=version, centroids=rows, counts=list(counts)
    )


def packaged_library_dir() -> Path:
    """The default adapter library shipped inside the package (routing/library)."""
    import importlib.resources

    return Path(str(importlib.resources.files("routing").joinpath("library")))
