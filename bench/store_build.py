"""How fast the default demonstration store is built, torch against ONNX, in one run.

Builds the default store (the seen tasks, 60 examples a task: about 5,900) end to end
with `build_store`, once per embedder backend: torch as the store used to be built (the
baseline: sentence-transformers, bfloat16 where the CPU has it) and the ONNX backends
(float32 and int8 weights, the project's own export). Each build's vectors are kept, so
quality costs no extra encoding: the cosine of each backend's vector with torch's for
every stored example, and for the dev tasks' queries the overlap of the top-4 neighbours
(each backend searching its own store, as a server would).

    python bench/store_build.py                      # the default build, every backend
    python bench/store_build.py --per-task 10        # a quick look
    python bench/store_build.py --matrix             # plus embed-only settings

Wall-clock examples/s on a shared machine moves with whatever else runs; the CPU seconds
the build used (`examples_per_cpu_s`) move much less, so both are reported, with the load
average, and torch builds again at the end (speedups are against the mean of its two).
Run it under `flock /tmp/crosstask-cpu.lock` where others benchmark too.
Needs BIG-bench (the sdist cached in CROSSTASK_HOME/bigbench, or --sdist: the sdist or a
checkout). Prints a summary and writes bench/results/store_build.json.
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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Models load from local folders only.

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.build import build_store, sample_examples
from retrieval.embedder import Embedder, default_num_threads
from retrieval.query import query_text
from retrieval.sources import (
    TaskSource,
    default_dev_tasks,
    default_seen_tasks,
    open_bigbench,
    read_task_list,
)

TARGET_EXAMPLES_PER_S = 400.0
DEFAULT_PER_TASK = 60  # serve/defaults.py DEFAULT_PER_TASK: the default store.
DEV_PER_TASK = 40  # The quality target samples 40 examples per dev task.
TOP_K = 4
BACKENDS = {
    "torch": {"backend": "torch"},
    "onnx-float32": {"backend": "onnx", "quantize": "none"},
    "onnx-int8": {"backend": "onnx", "quantize": "int8"},
}


class Recorder:
    """An embedder that keeps every text and vector it makes (the build's own output)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.name = inner.name
        self.identity = inner.identity
        self.max_seq_length = inner.max_seq_length
        self.dtype = inner.dtype
        self.texts: list[str] = []
        self.vectors: list[np.ndarray] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = self.inner.encode(texts)
        self.texts.extend(texts)
        self.vectors.append(out)
        return out


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
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def build_once(
    label: str, options: dict[str, Any], source: TaskSource, names: list[str], args: Any
) -> dict[str, Any]:
    """One end-to-end default build; returns its figures and (privately) its vectors."""
    work = Path(tempfile.mkdtemp(prefix="store-build-"))
    try:
        t0 = time.perf_counter()
        embedder = Embedder(cache_dir=args.cache, **options)
        load_s = time.perf_counter() - t0
        recorder = Recorder(embedder)
        load_before = os.getloadavg()[0]
        cpu0 = time.process_time()
        report = build_store(work / "store", source, names, recorder, args.per_task)
        cpu = time.process_time() - cpu0
        row: dict[str, Any] = {
            "backend": embedder.backend,
            "quantize": embedder.quantize,
            "dtype": embedder.dtype,
            "threads": default_num_threads(),
            "max_seq_length": embedder.max_seq_length,
            "embedder_load_seconds": round(load_s, 2),
            "examples": report.examples,
            "seconds": round(report.seconds, 2),
            "embed_seconds": round(report.embed_seconds, 2),
            "examples_per_s": round(report.examples_per_s, 1),
            "examples_per_s_embedding_only": round(report.examples / report.embed_seconds, 1),
            "cpu_seconds": round(cpu, 2),
            "examples_per_cpu_s": round(report.examples / cpu, 1),
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "index_kind": report.index_kind,
            "store_mb": round(sum(f.stat().st_size for f in (work / "store").iterdir()) / 2**20, 2),
        }
        print(f"build {label}", json.dumps(row), flush=True)
        row["_texts"] = recorder.texts
        row["_vectors"] = np.concatenate(recorder.vectors)
        row["_embedder"] = embedder
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def top_k(store: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ store.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def quality(
    reference: dict[str, Any], other: dict[str, Any], dev_texts: list[str], tasks: list[str]
) -> dict[str, Any]:
    """`other`'s vectors against `reference`'s: per stored example, and top-k agreement
    for the dev queries, each side searching its own vectors with its own queries."""
    assert reference["_texts"] == other["_texts"], "the two builds embedded different texts"
    assert len(tasks) == len(reference["_texts"]), "the task labels do not match the build"
    cos = np.sum(reference["_vectors"] * other["_vectors"], axis=1)
    ref_hits = top_k(reference["_vectors"], reference["_embedder"].encode(dev_texts), TOP_K)
    got_hits = top_k(other["_vectors"], other["_embedder"].encode(dev_texts), TOP_K)
    overlap = np.array(
        [len(set(a) & set(b)) / TOP_K for a, b in zip(ref_hits, got_hits, strict=True)]
    )
    # Cross-task retrieval cares first which tasks the demonstrations come from: the
    # share of the top-k's task labels (as a multiset) that both sides agree on.
    task_overlap = np.array(
        [
            sum((Counter(tasks[i] for i in a) & Counter(tasks[i] for i in b)).values()) / TOP_K
            for a, b in zip(ref_hits, got_hits, strict=True)
        ]
    )
    return {
        "stored_cosine": {
            "min": round(float(cos.min()), 4),
            "p01": round(float(np.percentile(cos, 1)), 4),
            "mean": round(float(cos.mean()), 5),
        },
        f"dev_top{TOP_K}_overlap": {
            "queries": len(dev_texts),
            "mean": round(float(overlap.mean()), 3),
            "all_same": round(float((overlap == 1.0).mean()), 3),
            "at_least_3_of_4": round(float((overlap >= 0.75).mean()), 3),
            "top1_same": round(float((ref_hits[:, 0] == got_hits[:, 0]).mean()), 3),
            "task_labels_mean": round(float(task_overlap.mean()), 3),
            "top1_task_same": round(
                float(
                    np.mean(
                        [
                            tasks[a] == tasks[b]
                            for a, b in zip(ref_hits[:, 0], got_hits[:, 0], strict=True)
                        ]
                    )
                ),
                3,
            ),
        },
    }


def matrix(
    texts: list[str], baseline: dict[str, Any], dev_texts: list[str], args: Any
) -> list[dict[str, Any]]:
    """Embed-only throughput of other settings on the same texts (quality vs torch)."""
    reference = baseline["_vectors"]
    ref_hits = top_k(reference, baseline["_embedder"].encode(dev_texts), TOP_K)
    settings: list[dict[str, Any]] = [
        {"backend": "onnx", "quantize": "int8", "num_threads": t, "max_seq_length": m}
        for m in (256, 128)
        for t in sorted({1, default_num_threads()})
    ]
    rows = []
    for options in settings:
        embedder = Embedder(cache_dir=args.cache, **options)
        embedder.encode(texts[:32])
        t0, c0 = time.perf_counter(), time.process_time()
        vectors = embedder.encode(texts)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        cos = np.sum(vectors * reference, axis=1)
        hits = top_k(vectors, embedder.encode(dev_texts), TOP_K)
        overlap = np.mean(
            [len(set(a) & set(b)) / TOP_K for a, b in zip(ref_hits, hits, strict=True)]
        )
        row = {
            **options,
            "examples_per_s": round(len(texts) / seconds, 1),
            "examples_per_cpu_s": round(len(texts) / cpu, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "cosine_vs_torch": {
                "min": round(float(cos.min()), 4),
                "mean": round(float(cos.mean()), 5),
            },
            f"dev_top{TOP_K}_overlap_vs_torch": round(float(overlap), 3),
        }
        print("embedder", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def token_lengths(embedder: Embedder, texts: list[str]) -> dict[str, Any]:
    """What the store embeds, in tokens (untruncated), and how much a window keeps."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(embedder.model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch([t.strip() for t in texts])])
    return {
        "percentiles": {str(p): int(np.percentile(lengths, p)) for p in (10, 50, 90, 99, 100)},
        "mean": round(float(lengths.mean()), 1),
        "mean_within": {
            str(m): round(float(np.minimum(lengths, m).mean()), 1) for m in (64, 128, 256)
        },
        "share_cut_at": {str(m): round(float((lengths > m).mean()), 3) for m in (64, 128, 256)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, default=os.environ.get("CROSSTASK_BIGBENCH"))
    parser.add_argument("--tasks", type=Path, default=None, help="task list (default: seen)")
    parser.add_argument("--per-task", type=int, default=DEFAULT_PER_TASK)
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated, from {', '.join(BACKENDS)}; torch always runs first",
    )
    parser.add_argument("--matrix", action="store_true", help="also time embed-only settings")
    parser.add_argument(
        "--no-baseline-again", action="store_true", help="skip the second torch build"
    )
    parser.add_argument("--cache", type=Path, default=None, help="ONNX export cache folder")
    parser.add_argument("--out", type=Path, default=Path("bench/results/store_build.json"))
    args = parser.parse_args()

    home = Path(os.environ.get("CROSSTASK_HOME") or Path.home() / ".cache" / "crosstask")
    args.cache = args.cache or home / "embedders"
    source = open_bigbench(args.sdist, home / "bigbench")
    names = read_task_list(args.tasks) if args.tasks else default_seen_tasks()
    labels = ["torch", *(b for b in args.backends.split(",") if b and b != "torch")]
    result: dict[str, Any] = {
        "machine_at_start": machine(),
        "per_task": args.per_task,
        "tasks": len(names),
        "target_examples_per_s": TARGET_EXAMPLES_PER_S,
    }

    # Reading and sampling alone: a floor under any build's time (build_store overlaps
    # it with embedding in a reader thread).
    t0 = time.perf_counter()
    pairs = [
        (task.name, query_text(task.definition, ex.input))
        for task in source.tasks(names)
        for ex in sample_examples(task, args.per_task, seed=0)
    ]
    text_tasks = [name for name, _ in pairs]
    texts = [text for _, text in pairs]
    result["read_and_sample_seconds"] = round(time.perf_counter() - t0, 2)
    dev_texts = [
        query_text(task.definition, ex.input)
        for task in source.tasks(default_dev_tasks())
        for ex in sample_examples(task, DEV_PER_TASK, seed=0)
    ]

    builds = {label: build_once(label, BACKENDS[label], source, names, args) for label in labels}
    baseline = builds["torch"]
    # The load on a shared machine drifts during a run: torch runs again last, and the
    # speedups divide by the mean of its two runs.
    torch_rates = [baseline["examples_per_s"]]
    torch_cpu_rates = [baseline["examples_per_cpu_s"]]
    if not args.no_baseline_again and len(labels) > 1:
        again = build_once("torch-again", BACKENDS["torch"], source, names, args)
        torch_rates.append(again["examples_per_s"])
        torch_cpu_rates.append(again["examples_per_cpu_s"])
        result["torch_again"] = {k: v for k, v in again.items() if not k.startswith("_")}
    torch_rate = sum(torch_rates) / len(torch_rates)
    torch_cpu_rate = sum(torch_cpu_rates) / len(torch_cpu_rates)
    result["torch_examples_per_s_mean"] = round(torch_rate, 1)
    result["tokens"] = token_lengths(baseline["_embedder"], texts)
    result["builds"] = {}
    for label, row in builds.items():
        public = {k: v for k, v in row.items() if not k.startswith("_")}
        public["speedup_vs_torch"] = round(row["examples_per_s"] / torch_rate, 2)
        public["cpu_speedup_vs_torch"] = round(row["examples_per_cpu_s"] / torch_cpu_rate, 2)
        if label != "torch":
            public["quality_vs_torch"] = quality(baseline, row, dev_texts, text_tasks)
        result["builds"][label] = public
        print(label, json.dumps(public), flush=True)

    if args.matrix:
        result["embedder_matrix"] = matrix(texts, baseline, dev_texts, args)

    default = Embedder(cache_dir=args.cache, backend="auto")
    result["default_backend"] = f"{default.backend}-{default.quantize}"
    chosen = next(
        (
            r
            for r in result["builds"].values()
            if (r["backend"], r["quantize"]) == (default.backend, default.quantize)
        ),
        None,
    )
    if chosen is not None:
        result["default_build_examples_per_s"] = chosen["examples_per_s"]
        result["target_met"] = chosen["examples_per_s"] >= TARGET_EXAMPLES_PER_S
        # With the CPU to itself (2 cores), a build runs at about this rate.
        result["default_build_examples_per_cpu_s_x_cores"] = round(
            chosen["examples_per_cpu_s"] * default_num_threads(), 1
        )
    result["machine_at_end"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
