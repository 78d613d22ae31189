"""The embedded defaults under CROSSTASK_HOME, prepared once and reused: the converted
model and the demonstration store built from the seen tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from retrieval.sources import TaskList, TaskSource, local_bigbench
from serve.default_model import ensure_default_model
from serve.progress import ProgressBar

log = logging.getLogger(__name__)

# Examples per seen task in the default store: ~6,000 in all, enough for every task to be
# found, and quick to build on a small CPU (docs/retrieval.md, "The default store").
DEFAULT_PER_TASK = 60
DEFAULT_SEED = 0
# The `source` recorded by the empty default store made where BIG-bench cannot be had.
PLACEHOLDER_SOURCE = "none"


@dataclass(frozen=True)
class Defaults:
    model_dir: Path
    store_dir: Path


def default_store_dir(home: Path) -> Path:
    return home / "store"


def bigbench_cache(home: Path) -> Path:
    return home / "bigbench"


def embedder_cache(home: Path) -> Path:
    """Where the embedder's ONNX exports are cached (keyed by model content)."""
    return home / "embedders"


def ensure_defaults(
    home: Path, embedder_dir: Path | None = None, bigbench: Path | None = None
) -> Defaults:
    model_dir = ensure_default_model(home)
    store_dir = default_store_dir(home)
    if not store_dir.exists():
        build_default_store(home, store_dir, embedder_dir, bigbench)
    elif is_placeholder_store(store_dir) and local_bigbench(bigbench, bigbench_cache(home)):
        # BIG-bench has been supplied since the empty store was made, and nobody has
        # added to that store: build the real one over it.
        build_default_store(home, store_dir, embedder_dir, bigbench, overwrite=True)
    ensure_store_embedder(home, store_dir, embedder_dir)
    return Defaults(model_dir=model_dir, store_dir=store_dir)


def ensure_store_embedder(home: Path, store_dir: Path, embedder_dir: Path | None) -> None:
    """Export the ONNX model the store was embedded with, if it is not cached (the cache
    may have been cleared since the build), so the server never exports at start-up."""
    from retrieval.embedder import default_model_dir, store_backend
    from retrieval.onnx_export import ensure_export
    from retrieval.retriever import recorded_metadata

    backend, quantize = store_backend(recorded_metadata(store_dir))
    if backend != "onnx":
        return
    try:
        ensure_export(embedder_dir or default_model_dir(), embedder_cache(home), quantize)
    except Exception as exc:  # Not fatal here: opening the store says it plainly.
        log.warning("Cannot export the store's %s ONNX embedder: %s", quantize, exc)


def build_default_store(
    home: Path,
    out: Path,
    embedder_dir: Path | None,
    bigbench: Path | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """The store of the seen tasks; where BIG-bench cannot be had, an empty store, so the
    server still starts and `POST /v1/demonstrations` can fill it."""
    from retrieval.sources import BigBenchUnavailable, default_seen_tasks, open_bigbench

    log.info("Building the default demonstration store from the seen tasks into %s", out)
    try:
        build_task_store(
            out=out,
            source=open_bigbench(bigbench, bigbench_cache(home)),
            tasks=default_seen_tasks(),
            exclude=[],
            per_task=DEFAULT_PER_TASK,
            home=home,
            embedder_dir=embedder_dir,
            seed=DEFAULT_SEED,
            overwrite=overwrite,
        )
    except BigBenchUnavailable as exc:
        if overwrite:
            raise
        log.warning(
            "%s\nThe default store is created EMPTY: requests get no demonstrations until "
            "examples are added (POST /v1/demonstrations, or `crosstask store build --from "
            "FILE.jsonl`); with BIG-bench supplied, `crosstask prepare` builds it.",
            exc,
        )
        build_task_store(
            out=out,
            source=TaskList([], origin="no tasks"),
            tasks=[],
            exclude=[],
            per_task=None,
            home=home,
            embedder_dir=embedder_dir,
            seed=DEFAULT_SEED,
            overwrite=False,
            source_name=PLACEHOLDER_SOURCE,
        )


def is_placeholder_store(store_dir: Path) -> bool:
    """The empty store made for want of BIG-bench, still empty."""
    from retrieval.retriever import recorded_metadata
    from retrieval.store import DB_FILE
    from retrieval.store_db import demo_count

    return (
        recorded_metadata(store_dir).get("source") == PLACEHOLDER_SOURCE
        and demo_count(store_dir / DB_FILE) == 0
    )


def build_task_store(
    *,
    out: Path,
    source: TaskSource,
    tasks: list[str],
    exclude: list[str],
    per_task: int | None,
    home: Path,
    embedder_dir: Path | None,
    seed: int,
    overwrite: bool,
    backend: str = "auto",
    quantize: str | None = None,
    source_name: str = "bigbench",
) -> None:
    """Build a store from `source`'s tasks, showing progress (tasks, examples/s)."""
    from retrieval.build import BuildProgress, build_store
    from retrieval.embedder import Embedder

    # Unknown names fail here, before the embedder takes ten seconds to load.
    source.check_names([t for t in tasks if t not in set(exclude)])
    if quantize is None:  # The onnx backend's default is its measured fast setting.
        quantize = "int8" if backend == "onnx" else "none"
    embedder = Embedder(
        embedder_dir, backend=backend, quantize=quantize, cache_dir=embedder_cache(home)
    )
    log.info("Embedder: %s on %s, %s weights", embedder.name, embedder.backend, embedder.quantize)
    bar = ProgressBar("store build", "tasks", total=len(tasks), period=10.0)

    def progress(p: BuildProgress) -> None:
        bar.advance(postfix={"examples": str(p.examples_done), "per s": f"{p.examples_per_s:.0f}"})

    report = build_store(
        out,
        source,
        tasks,
        embedder,
        per_task,
        exclude,
        seed,
        progress,
        overwrite=overwrite,
        source_name=source_name,
    )
    bar.close()
    log.info(
        "Built %s: %d tasks, %d examples in %.1f s (%.0f examples/s, %s index)",
        report.path,
        report.tasks,
        report.examples,
        report.seconds,
        report.examples_per_s,
        report.index_kind,
    )
