"""Build a demonstration store from task data: sample, embed, add.

The store appears at `out_dir` only once complete: it is built in a temporary folder
beside it and renamed into place, so an interrupted build never leaves a half store that
a later `make serve` would take for a finished one.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue
from typing import Any, Protocol, TypeVar

import numpy as np

from retrieval import store_limits as limits
from retrieval.durable import replace_dir
from retrieval.query import QUERY_TEXT_VERSION, query_text
from retrieval.sources import Example, Task, TaskSource
from retrieval.store import DB_FILE, DemonstrationStore
from retrieval.store_db import make_self_contained
from retrieval.store_types import NewDemo

T = TypeVar("T")

# Sampled tasks read ahead of the embedder. Only the picked examples are kept (a whole
# task holds up to tens of thousands), so the reader can run far ahead: one chunk of
# DEFAULT_CHUNK examples spans about 17 tasks at 60 a task, and a reader only 4 ahead
# spent most of each chunk's embedding waiting.
PREFETCH_TASKS = 64
# Examples embedded and added per round trip. Large enough that length bucketing inside
# one encode() call finds texts of similar length; small enough for steady progress.
DEFAULT_CHUNK = 1024


class TextEncoder(Protocol):
    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class BuildProgress:
    task: str
    tasks_done: int
    tasks_total: int
    examples_done: int
    elapsed_s: float
    examples_per_s: float


@dataclass(frozen=True, slots=True)
class BuildReport:
    path: Path
    tasks: int
    examples: int
    skipped_examples: int
    seconds: float
    embed_seconds: float
    examples_per_s: float
    index_kind: str


@dataclass(frozen=True, slots=True)
class _Sampled:
    """What the build keeps of a task once the reader thread has sampled it."""

    name: str
    definition: str
    skipped: int
    picked: list[Example]


def usable_examples(task: Task) -> list[Example]:
    """The task's examples minus exact duplicates and any outside the store's limits."""
    return list({(e.input, e.output): e for e in task.examples if _fits(task, e)}.values())


def sample_examples(task: Task, per_task: int | None, seed: int) -> list[Example]:
    """Up to `per_task` usable examples of `task`, the same ones for the same seed on
    any machine (a string seed hashes with SHA-512, not Python's salted hash)."""
    unique = usable_examples(task)
    if per_task is None or per_task >= len(unique):
        return unique
    rng = random.Random(f"{seed}:{task.name}")
    picked = sorted(rng.sample(range(len(unique)), per_task))
    return [unique[i] for i in picked]


def build_store(
    out_dir: Path | str,
    source: TaskSource,
    task_names: Sequence[str],
    embedder: TextEncoder,
    per_task: int | None,
    exclude_tasks: Iterable[str] = (),
    seed: int = 0,
    progress: Callable[[BuildProgress], None] | None = None,
    *,
    index_kind: str = "auto",
    overwrite: bool = False,
    chunk: int = DEFAULT_CHUNK,
    source_name: str = "bigbench",
) -> BuildReport:
    """Build a store at `out_dir` from `task_names` minus `exclude_tasks`.

    Each demonstration is embedded as `query_text(definition, input)`, exactly as the
    server embeds a request. Raises before any work if a task name is unknown, and if
    `out_dir` exists unless `overwrite` (then it is replaced only once the new store is
    complete).
    """
    if per_task is not None and per_task < 1:
        raise ValueError("per_task must be at least 1 (or None for every example)")
    if not 1 <= chunk <= limits.MAX_ADD:
        raise ValueError(f"chunk must be between 1 and {limits.MAX_ADD}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    excluded = set(exclude_tasks)
    names = [n for n in dict.fromkeys(task_names) if n not in excluded]
    source.check_names(names)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    started = time.perf_counter()
    embed_seconds = 0.0
    done = skipped = tasks_done = 0
    try:
        with DemonstrationStore.open(work, embedder.dim, index_kind) as store:
            pending: list[NewDemo] = []

            def flush() -> None:
                nonlocal embed_seconds, done
                if not pending:
                    return
                t0 = time.perf_counter()
                vectors = embedder.encode([query_text(d.definition, d.input) for d in pending])
                embed_seconds += time.perf_counter() - t0
                store.add(pending, vectors)
                done += len(pending)
                pending.clear()

            # Reading (gunzip, JSON, sampling) runs in a thread beside the embedding:
            # zlib and the embedder release the GIL, so reading, a small share of the seen
            # tasks' build, mostly hides behind embedding (docs/retrieval.md, "The
            # default store").
            sampled = prefetched(
                (
                    _Sampled(
                        task.name,
                        task.definition,
                        len(task.examples) - len(usable_examples(task)),
                        sample_examples(task, per_task, seed),
                    )
                    for task in source.tasks(names)
                ),
                depth=PREFETCH_TASKS,
            )
            with contextlib.closing(sampled):  # An error here stops the reader too.
                for task in sampled:
                    skipped += task.skipped
                    for ex in task.picked:
                        pending.append(
                            NewDemo(
                                task=task.name,
                                definition=task.definition,
                                input=ex.input,
                                output=ex.output,
                                source=source_name,
                            )
                        )
                        if len(pending) >= chunk:
                            flush()
                    tasks_done += 1
                    if progress is not None:
                        elapsed = time.perf_counter() - started
                        progress(
                            BuildProgress(
                                task=task.name,
                                tasks_done=tasks_done,
                                tasks_total=len(names),
                                examples_done=done,
                                elapsed_s=elapsed,
                                examples_per_s=done / elapsed if elapsed > 0 else 0.0,
                            )
                        )
            flush()
            store.set_metadata(
                **{
                    "embedder": str(getattr(embedder, "name", type(embedder).__name__)),
                    # Backend and quantization: what the server must embed queries with
                    # for its vectors to compare (open_retriever).
                    **dict(getattr(embedder, "identity", {})),
                },
                embedder_dim=str(embedder.dim),
                embedder_max_seq_length=str(getattr(embedder, "max_seq_length", "")),
                embedder_dtype=str(getattr(embedder, "dtype", "")),
                query_text_version=str(QUERY_TEXT_VERSION),
                source=source_name,
                tasks="\n".join(names),
                per_task="" if per_task is None else str(per_task),
                seed=str(seed),
            )
            kind = store.index_kind
        make_self_contained(work / DB_FILE)
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    return BuildReport(
        path=out,
        tasks=tasks_done,
        examples=done,
        skipped_examples=skipped,
        seconds=seconds,
        embed_seconds=embed_seconds,
        examples_per_s=done / seconds if seconds > 0 else 0.0,
        index_kind=kind,
    )


def prefetched(items: Iterator[T], depth: int) -> Generator[T, None, None]:
    """`items`, produced up to `depth` ahead by a background thread. An exception in the
    producer is raised here; closing this generator early stops the producer."""
    queue: Queue[tuple[str, Any]] = Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put((kind, value), timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as exc:
            put("error", exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # A generator's cleanup (e.g. an open file) runs in its own thread.

    worker = threading.Thread(target=produce, name="store-build-reader", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


def _fits(task: Task, ex: Example) -> bool:
    """Within the store's limits, so one odd example cannot fail a whole batch."""
    return (
        0 < len(task.name) <= limits.MAX_TASK_CHARS
        and len(task.definition) <= limits.MAX_DEFINITION_CHARS
        and bool(ex.input.strip())
        and len(ex.input) <= limits.MAX_INPUT_CHARS
        and bool(ex.output.strip())
        and len(ex.output) <= limits.MAX_OUTPUT_CHARS
        and "\x00" not in ex.input + ex.output + task.definition
    )
