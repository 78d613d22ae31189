"""The `crosstask` command: the process environment, then one module per command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from serve.cli.adapters import add_adapters_parser
from serve.cli.batch import add_batch_merge_parser, add_batch_parser
from serve.cli.eval import add_eval_parser
from serve.cli.prepare import add_prepare_parser
from serve.cli.serve import add_serve_parser
from serve.cli.store import add_store_parser
from serve.engine import heap_trim

log = logging.getLogger("crosstask")

# Compiled oneDNN primitives kept per cache; see process_environment.
PRIMITIVE_CACHE_CAPACITY = 128


def process_environment() -> None:
    # Nothing may come from a model hub at run time, and vLLM must not report usage home.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"):
        os.environ.setdefault(name, "1")
    # Logs go to stderr, vLLM's included: stdout carries results (batch summary, search hits).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # oneDNN compiles a matmul primitive per row count (the tokens of an engine step, the
    # rows of an embedder batch) and keeps up to 1,024 of them process-wide; torch keeps as
    # many more (ideep, LRU_CACHE_CAPACITY). On a server the counts keep changing, so both
    # caches grow resident memory for a long time; bounded small they cost little speed
    # (docs/memory.md). vLLM's processes inherit this environment; a value set outside wins.
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(PRIMITIVE_CACHE_CAPACITY))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosstask",
        description="An OpenAI-compatible server for instruction-driven language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_prepare_parser(sub)
    add_store_parser(sub)
    add_batch_parser(sub)
    add_batch_merge_parser(sub)
    add_eval_parser(sub)
    add_adapters_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    process_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["batch", "merge"]:
        argv = ["batch-merge", *argv[2:]]
    args = build_parser().parse_args(argv)
    try:
        # Read again in each of vLLM's processes, where a bad value would be a traceback.
        heap_trim.trim_interval()
        return int(args.func(args))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        # A user's mistake (unknown task, existing folder, mismatched store) or a failed
        # setup step: one clear line, not a traceback. --log-level debug shows the rest.
        log.debug("command failed", exc_info=True)
        print(f"crosstask {args.command}: error: {exc}", file=sys.stderr)
        return 2
