"""How fast a demonstration store is built from the real BIG-bench seen tasks.

Builds a store from the first examples of the default seen tasks (20 a task: about
2,000) with the default embedder, then times the embedder alone in other settings
(threads, dtype, sequence length) on the same texts, with each setting's cosine
agreement against float32 at 256 tokens.

    python bench/store_build.py                     # ~2,000 examples, full matrix
    python bench/store_build.py --per-task 5 --no-matrix    # a quick look

Needs the bigbench sdist (downloaded once into ~/.cache/crosstask/bigbench, or pass
--sdist / set CROSSTASK_BIGBENCH_SDIST). Prints a summary and writes
bench/results/store_build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Models load from local folders only.

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.build import build_store, sample_examples
from retrieval.embedder import Embedder, default_num_threads
from retrieval.query import query_text
from retrieval.sources import (
    BigBenchSource,
    default_seen_tasks,
    ensure_bigbench_sdist,
    read_task_list,
)

TARGET_EXAMPLES_PER_S = 400.0


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if "model name" in ln), "")
    except OSError:
        pass
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": model or platform.processor(),
        "loadavg": os.getloadavg(),
    }


def time_encoder(texts: list[str], reference: np.ndarray | None, **options: Any) -> dict[str, Any]:
    embedder = Embedder(**options)
    embedder.encode(texts[:32])  # Warm up (first batches allocate).
    t0 = time.perf_counter()
    vectors = embedder.encode(texts)
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {
        **options,
        "dtype": embedder.dtype,
        "examples_per_s": round(len(texts) / seconds, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if reference is not None:
        cos = np.sum(vectors * reference, axis=1)
        row["cosine_vs_reference"] = {
            "min": round(float(cos.min()), 4),
            "mean": round(float(cos.mean()), 4),
        }
    return row | {"_vectors": vectors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, default=os.environ.get("CROSSTASK_BIGBENCH_SDIST"))
    parser.add_argument("--tasks", type=Path, default=None, help="task list (default: seen)")
    parser.add_argument("--per-task", type=int, default=20)
    parser.add_argument("--no-matrix", action="store_true", help="skip the embedder matrix")
    parser.add_argument("--out", type=Path, default=Path("bench/results/store_build.json"))
    args = parser.parse_args()

    sdist = args.sdist or ensure_bigbench_sdist(Path.home() / ".cache" / "crosstask" / "bigbench")
    source = BigBenchSource(sdist)
    names = read_task_list(args.tasks) if args.tasks else default_seen_tasks()
    result: dict[str, Any] = {"machine_at_start": machine(), "per_task": args.per_task}

    t0 = time.perf_counter()
    texts = [
        query_text(task.definition, ex.input)
        for task in source.tasks(names)
        for ex in sample_examples(task, args.per_task, seed=0)
    ]
    result["read_and_sample_seconds"] = round(time.perf_counter() - t0, 2)
    result["examples"] = len(texts)

    # End to end, with the defaults `crosstask store build` uses.
    work = Path(tempfile.mkdtemp(prefix="store-build-"))
    try:
        t0 = time.perf_counter()
        embedder = Embedder()
        load_s = time.perf_counter() - t0
        report = build_store(work / "store", source, names, embedder, args.per_task)
        result["build"] = {
            "embedder_load_seconds": round(load_s, 2),
            "embedder": {
                "threads": default_num_threads(),
                "dtype": embedder.dtype,
                "max_seq_length": embedder.max_seq_length,
                "batch_size": embedder.batch_size,
            },
            "examples": report.examples,
            "seconds": round(report.seconds, 2),
            "embed_seconds": round(report.embed_seconds, 2),
            "examples_per_s": round(report.examples_per_s, 1),
            "examples_per_s_embedding_only": round(report.examples / report.embed_seconds, 1),
            "index_kind": report.index_kind,
            "store_mb": round(sum(f.stat().st_size for f in (work / "store").iterdir()) / 2**20, 2),
        }
        print("build", json.dumps(result["build"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if not args.no_matrix:
        rows = []
        reference = None
        settings = [
            {"num_threads": t, "dtype": d, "max_seq_length": m}
            for d in ("float32", "bfloat16")
            for m in (256, 128)
            for t in sorted({1, default_num_threads()})
        ]
        for options in settings:
            row = time_encoder(texts, reference, **options)
            vectors = row.pop("_vectors")
            if reference is None:
                reference = vectors
            rows.append(row)
            print("embedder", json.dumps(row), flush=True)
        result["embedder_matrix"] = rows

    best = max(
        [
            result["build"]["examples_per_s"],
            *(r["examples_per_s"] for r in result.get("embedder_matrix", [])),
        ]
    )
    result["target_examples_per_s"] = TARGET_EXAMPLES_PER_S
    result["target_met"] = result["build"]["examples_per_s"] >= TARGET_EXAMPLES_PER_S
    result["best_examples_per_s_seen"] = best
    result["machine_at_end"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
