"""`crosstask batch` and `crosstask batch merge`: OpenAI batch JSONL files through the
server's own request path, in-process."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from serve.cli.common import ENGINE_FIELDS, add_engine_flags, configure_logging, settings_from_args

log = logging.getLogger("crosstask")


def add_batch_parser(sub: Any) -> None:
    p = sub.add_parser(
        "batch",
        help="Run an OpenAI batch JSONL file through the engine in-process.",
        usage="crosstask batch INPUT.jsonl OUTPUT.jsonl [--shard I/N] [options]\n"
        "       crosstask batch merge --out OUTPUT.jsonl [--input INPUT.jsonl] SHARD.jsonl...",
        description="Serve every line of INPUT ({custom_id, method, url, body}; url "
        "/v1/chat/completions or /v1/completions; the crosstask extension allowed in body) "
        "through the same request path as the server, and write one output line per input "
        "line to OUTPUT ({id, custom_id, line, response: {status_code, request_id, body}, "
        "error}). Output is appended as results complete: rerun with the same OUTPUT to "
        "resume after a crash. Bad lines get an output line with `error` set and never stop "
        "the job. `crosstask batch merge` joins shard outputs in input order. Engine options "
        "are the server's (flags or CROSSTASK_* environment variables).",
    )
    p.add_argument("input", type=Path, metavar="INPUT.jsonl")
    p.add_argument("output", type=Path, metavar="OUTPUT.jsonl")
    p.add_argument(
        "--shard",
        help="I/N: serve only this process's deterministic 1/N of the lines (e.g. "
        "$JOB_COMPLETION_INDEX/4 in a Kubernetes Indexed Job).",
    )
    p.add_argument(
        "--max-in-flight",
        dest="max_in_flight",
        type=int,
        default=512,
        help="Requests handed to the engine at once; keeps it full while bounding memory "
        "(default 512).",
    )
    p.add_argument(
        "--fail-on-error",
        dest="fail_on_error",
        action="store_true",
        help="Exit 1 if any line failed (default: exit 0; failures are in the output).",
    )
    p.add_argument("--summary", type=Path, help="Also write the summary JSON to this file.")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bar.")
    add_engine_flags(p)
    p.set_defaults(func=cmd_batch)


def add_batch_merge_parser(sub: Any) -> None:
    # Reached as `crosstask batch merge ...` (main() routes it here).
    p = sub.add_parser(
        "batch-merge",
        prog="crosstask batch merge",
        help="Join `crosstask batch --shard` outputs in input order.",
        description="Join shard outputs into one file ordered like the input, each line "
        "once. With --input, fail unless every input line has its output line.",
    )
    p.add_argument("--out", type=Path, required=True, help="Merged output file.")
    p.add_argument("--input", type=Path, help="The batch input, to check completeness.")
    p.add_argument("shards", type=Path, nargs="+", metavar="SHARD.jsonl")
    p.set_defaults(func=cmd_batch_merge)


def cmd_batch(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from serve.api.chat_completion.serving import ChatServing
    from serve.api.completion.serving import CompletionServing
    from serve.batch import BatchRunner, Shard
    from serve.cli.preflight import check_shared_memory
    from serve.metrics import Metrics
    from serve.pipeline import Pipeline
    from serve.runtime import Startup

    settings = settings_from_args(args, ENGINE_FIELDS)
    configure_logging(settings.log_level)
    shard = Shard.parse(args.shard) if args.shard else Shard()
    if not args.input.is_file():
        raise SystemExit(f"crosstask batch: no such input file: {args.input}")
    check_shared_memory()
    startup = Startup.from_settings(settings, batch=True)

    async def run() -> dict[str, Any]:
        runtime = await startup.start()
        metrics = Metrics()
        try:
            pipeline = Pipeline(
                settings, runtime.engine, metrics, runtime.retriever, runtime.routing
            )
            runner = BatchRunner(
                ChatServing(pipeline), CompletionServing(pipeline), args.max_in_flight
            )
            log.info("Batch %s -> %s (shard %s)", args.input, args.output, shard)
            summary = await runner.run(args.input, args.output, shard, args.progress)
            report = summary.as_dict()
            searches = metrics.registry.get_sample_value(
                "crosstask_retrieval_latency_seconds_count"
            )
            if searches:
                spent = metrics.registry.get_sample_value("crosstask_retrieval_latency_seconds_sum")
                report["retrieval_ms_per_request"] = round(1000 * (spent or 0.0) / searches, 2)
            return report
        finally:
            await runtime.close()

    summary = asyncio.run(run())
    text = json.dumps(summary, indent=2)
    print(text)
    if args.summary:
        args.summary.write_text(text + "\n")
    return 1 if args.fail_on_error and summary["failed"] else 0


def cmd_batch_merge(args: argparse.Namespace) -> int:
    import json

    from serve.batch import merge_outputs

    configure_logging("info")
    print(json.dumps(merge_outputs(args.out, args.shards, args.input), indent=2))
    return 0
