"""Search latency of the demonstration store at scale, flat against HNSW.

Fills a store with N random unit vectors spread over T tasks, then, for each index kind
(flat, IVF, HNSW), times `DemonstrationStore.search` (FAISS search plus the SQLite fetch
of the hits) with and without an exclusion filter, and the approximate kinds' recall@k
against exact search. Also times flat search at smaller sizes, which is how
AUTO_APPROX_MIN_ROWS was chosen.

    python bench/store_search.py                 # 100,000 vectors, as in docs/retrieval.md
    python bench/store_search.py --n 20000 --queries 200    # a quick look

Prints a summary and writes bench/results/store_search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import store as store_mod
from retrieval import store_limits
from retrieval.store import INDEX_FILE, DemonstrationStore
from retrieval.store_types import NewDemo

FAMILY = 5
KINDS = ("flat", "ivf", "hnsw")
TARGET_P50_MS = 2.0
TARGET_P99_MS = 10.0


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def fill(path: Path, n: int, dim: int, tasks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N vectors over T tasks, added in MAX_ADD batches. Tasks come in families of 5 (as
    BIG-bench's do: ten MC-TACO subtasks, seven QASC ones...): same task ~0.55 cosine,
    same family ~0.27, otherwise ~0, about what all-MiniLM-L6-v2 gives real tasks."""
    rng = np.random.default_rng(seed)
    families = unit(rng.standard_normal((max(1, tasks // FAMILY), dim)))
    centers = unit(rng.standard_normal((tasks, dim)))
    task_of = rng.integers(0, tasks, n)
    vectors = unit(
        0.7 * families[(task_of // FAMILY) % len(families)]
        + 0.7 * centers[task_of]
        + 0.9 * unit(rng.standard_normal((n, dim)))
    )
    with DemonstrationStore.open(path, dim, "flat") as store:
        for start in range(0, n, store_limits.MAX_ADD):
            stop = min(n, start + store_limits.MAX_ADD)
            records = [
                NewDemo(
                    task=f"task{task_of[i]:03d}",
                    definition=f"Definition of task {task_of[i]}.",
                    input=f"input {i}",
                    output=f"output {i}",
                    source="bench",
                )
                for i in range(start, stop)
            ]
            store.add(records, vectors[start:stop])
    return vectors, task_of


def time_searches(
    store: DemonstrationStore, queries: np.ndarray, k: int, excludes: list[list[str]]
) -> dict[str, Any]:
    """Latency of store.search; `excludes[i]` is query i's exclusion list."""
    for q, ex in zip(queries[:20], excludes, strict=False):  # Warm caches.
        store.search(q, k, min_score=-1.0, exclude_tasks=ex)
    latencies = []
    short = 0
    for q, ex in zip(queries, excludes, strict=False):
        t0 = time.perf_counter()
        hits = store.search(q, k, min_score=-1.0, exclude_tasks=ex)
        latencies.append((time.perf_counter() - t0) * 1000)
        short += len(hits) < k
    ms = np.array(latencies)
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "queries_short_of_k": short,
    }


def recall(
    store: DemonstrationStore, exact: DemonstrationStore, queries: np.ndarray, k: int,
    excludes: list[list[str]],
) -> float:  # fmt: skip
    found = total = 0
    for q, ex in zip(queries, excludes, strict=False):
        truth = {h.id for h in exact.search(q, k, min_score=-1.0, exclude_tasks=ex)}
        got = {h.id for h in store.search(q, k, min_score=-1.0, exclude_tasks=ex)}
        found += len(truth & got)
        total += len(truth)
    return round(found / max(total, 1), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--exclude", type=int, default=10, help="tasks excluded per query")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument(
        "--flat-sizes",
        default="5000,10000,15000,20000,25000,50000",
        help="extra flat sizes to time",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kinds", type=lambda v: v.split(","), default=list(KINDS), help="flat must be first"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/store_search.json"))
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="store-search-"))
    path = work / "store"
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(args.seed + 1)
    result: dict[str, Any] = {
        "n": args.n,
        "dim": args.dim,
        "tasks": args.tasks,
        "excluded_tasks_per_query": args.exclude,
        "k": args.k,
        "queries": args.queries,
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "loadavg_at_start": os.getloadavg(),
        },
    }
    try:
        t0 = time.perf_counter()
        vectors, task_of = fill(path, args.n, args.dim, args.tasks, args.seed)
        result["fill_seconds"] = round(time.perf_counter() - t0, 1)
        result["db_mb"] = round(sum(f.stat().st_size for f in path.iterdir()) / 2**20, 1)
        # Queries: stored vectors nudged, so each has a true neighbourhood. Two exclusion
        # cases of `--exclude` tasks each: `other` excludes tasks far from the query (a
        # filter that rarely bites); `own` includes the query's own task, as a
        # leave-one-task-out evaluation does, so every nearest vector is filtered out.
        picks = rng.integers(0, args.n, args.queries)
        queries = unit(vectors[picks] + 0.3 * unit(rng.standard_normal((args.queries, args.dim))))
        none: list[list[str]] = [[] for _ in picks]
        half = args.tasks // 2
        other = [
            [f"task{(task_of[p] + half + j) % args.tasks:03d}" for j in range(args.exclude)]
            for p in picks
        ]
        own = [[f"task{task_of[p]:03d}", *ex[1:]] for p, ex in zip(picks, other, strict=True)]
        del vectors

        kinds: dict[str, Any] = {}
        stores: dict[str, DemonstrationStore] = {}
        for kind in args.kinds:
            # Build (from the database) and persist the kind's index, then search it
            # through a read-only open, so all three can be open at once.
            t0 = time.perf_counter()
            DemonstrationStore.open(path, args.dim, kind).close()
            build_s = time.perf_counter() - t0
            # The serialized index has the in-memory layout: its size is the memory the
            # index takes (RSS deltas are blurred by memory freed after the build).
            index_mb = (path / INDEX_FILE).stat().st_size / 2**20
            store = DemonstrationStore.open(path, args.dim, kind, read_only=True)
            stores[kind] = store
            kinds[kind] = {
                "build_seconds": round(build_s, 1),
                "index_memory_mb": round(index_mb, 1),
                "index_memory_mb_per_100k": round(index_mb * 100_000 / args.n, 1),
                "no_filter": time_searches(store, queries, args.k, none),
                "exclude_other_tasks": time_searches(store, queries, args.k, other),
                "exclude_own_task": time_searches(store, queries, args.k, own),
            }
            print(kind, json.dumps(kinds[kind]), flush=True)
        sample = queries[: min(200, args.queries)]
        for kind in [k for k in args.kinds if k != "flat"]:
            kinds[kind]["recall_at_k"] = {
                name: recall(stores[kind], stores["flat"], sample, args.k, ex)
                for name, ex in (("no_filter", none), ("exclude_other_tasks", other),
                                 ("exclude_own_task", own))
            }  # fmt: skip
            print(kind, "recall", json.dumps(kinds[kind]["recall_at_k"]), flush=True)
        for store in stores.values():
            store.close()
        result["kinds"] = kinds

        flat_curve = {}
        for size in [int(s) for s in args.flat_sizes.split(",") if s]:
            if size >= args.n:
                continue
            sub = work / f"flat-{size}"
            shutil.rmtree(sub, ignore_errors=True)
            fill(sub, size, args.dim, args.tasks, args.seed)
            with DemonstrationStore.open(sub, args.dim, "flat") as store:
                flat_curve[size] = time_searches(store, queries[:300], args.k, own)
            shutil.rmtree(sub, ignore_errors=True)
            print("flat", size, json.dumps(flat_curve[size]), flush=True)
        flat_curve[args.n] = kinds["flat"]["exclude_own_task"]
        result["flat_exclude_own_task_by_size"] = flat_curve
        result["auto_approx_min_rows"] = store_mod.AUTO_APPROX_MIN_ROWS
        result["auto_approx_kind"] = store_mod.AUTO_APPROX_KIND
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        result["targets"] = {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS} | {
            f"met_{kind}_{case}": kinds[kind][case]["p50_ms"] <= TARGET_P50_MS
            and kinds[kind][case]["p99_ms"] <= TARGET_P99_MS
            for kind in args.kinds
            for case in ("no_filter", "exclude_other_tasks", "exclude_own_task")
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
