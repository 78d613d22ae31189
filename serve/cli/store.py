"""`crosstask store build|search`: demonstration stores."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from serve.cli.common import add_bigbench_flag, configure_logging, settings_from_args


def add_store_parser(sub: Any) -> None:
    p = sub.add_parser("store", help="Build and search demonstration stores.")
    store_sub = p.add_subparsers(dest="store_command", required=True)
    b = store_sub.add_parser(
        "build",
        help="Build a store from BIG-bench tasks or a JSONL file of your own.",
        description="Sample up to --per-task examples of each task, embed each as its "
        "task definition plus input (as requests are embedded), and write a FAISS + SQLite "
        "store to --out (built beside it, renamed into place when complete).",
    )
    b.add_argument("--out", type=Path, required=True, help="Store folder to create.")
    b.add_argument(
        "--tasks",
        type=Path,
        help="Task list, one name a line (default: the seen tasks; with --from, every "
        "task in the file).",
    )
    b.add_argument("--exclude-tasks", type=Path, help="Task list to leave out.")
    b.add_argument(
        "--per-task", type=int, default=None, help="Examples per task (default: 60; 0 = all)."
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--embedder", type=Path, help="sentence-transformers folder.")
    b.add_argument(
        "--embedder-backend",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="auto (default): the measured default backend (torch today; "
        "docs/retrieval.md); onnx: ONNX Runtime on the project's own export, cached in the "
        "home folder. The store records it; the server embeds queries the same way.",
    )
    b.add_argument(
        "--embedder-quantize",
        choices=("none", "int8"),
        default=None,
        help="Weights of the onnx backend (default int8; none = float32).",
    )
    b.add_argument(
        "--from",
        dest="from_jsonl",
        type=Path,
        metavar="FILE.jsonl",
        help="Read tasks from this file instead of BIG-bench: one JSON object a line, "
        'shaped like POST /v1/demonstrations: {"task", "definition", "examples": '
        '[{"input", "output"}]}.',
    )
    add_bigbench_flag(b)
    b.add_argument("--overwrite", action="store_true", help="Replace an existing store.")
    b.add_argument("--home", type=Path, help="Cache folder (default ~/.cache/crosstask).")
    b.set_defaults(func=cmd_store_build)
    q = store_sub.add_parser("search", help="Search a store with a query text.")
    q.add_argument("--store", type=Path, required=True)
    q.add_argument("-k", type=int, default=4)
    q.add_argument("--exclude-tasks", nargs="*", default=[], help="Task names to leave out.")
    q.add_argument("--min-score", type=float, default=0.0)
    q.add_argument("--embedder", type=Path, help="sentence-transformers folder.")
    q.add_argument("query", help="Free text, e.g. a task definition and an input.")
    q.set_defaults(func=cmd_store_search)


def cmd_store_build(args: argparse.Namespace) -> int:
    from retrieval.sources import (
        TaskSource,
        default_seen_tasks,
        open_bigbench,
        read_jsonl_tasks,
        read_task_list,
    )
    from serve.defaults import DEFAULT_PER_TASK, bigbench_cache, build_task_store

    settings = settings_from_args(args, ["home", "embedder", "bigbench"])
    configure_logging(settings.log_level)
    per_task = DEFAULT_PER_TASK if args.per_task is None else (args.per_task or None)
    source: TaskSource
    if args.from_jsonl is not None:
        tasks = read_jsonl_tasks(args.from_jsonl)
        source, names, source_name = tasks, tasks.names(), args.from_jsonl.name
    else:
        source = open_bigbench(settings.bigbench, bigbench_cache(settings.home_dir))
        names, source_name = default_seen_tasks(), "bigbench"
    build_task_store(
        out=args.out,
        source=source,
        tasks=read_task_list(args.tasks) if args.tasks else names,
        exclude=read_task_list(args.exclude_tasks) if args.exclude_tasks else [],
        per_task=per_task,
        home=settings.home_dir,
        embedder_dir=settings.embedder,
        seed=args.seed,
        overwrite=args.overwrite,
        backend=args.embedder_backend,
        quantize=args.embedder_quantize,
        source_name=source_name,
    )
    return 0


def cmd_store_search(args: argparse.Namespace) -> int:
    import json

    from retrieval.query import query_text
    from retrieval.retriever import open_retriever

    configure_logging("warning")
    retriever = open_retriever(args.store, args.embedder)
    try:
        vector = retriever.embedder.encode_one(query_text("", args.query))
        hits = retriever.store.search(vector, args.k, args.min_score, args.exclude_tasks)
    finally:
        retriever.store.close()
    for hit in hits:
        print(
            json.dumps(
                {
                    "id": hit.id,
                    "task": hit.task,
                    "score": round(hit.score, 4),
                    "input": hit.input,
                    "output": hit.output,
                },
                ensure_ascii=False,
            )
        )
    return 0
