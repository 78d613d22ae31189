"""`crosstask eval`: `add_eval_parser` adds the command to the crosstask CLI
(serve/cli/main.py); the evaluation itself is serve/evaluation/."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.cli.common import add_bigbench_flag, settings_from_args
from serve.evaluation.config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_K,
    DEFAULT_LIMIT,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TIMEOUT,
    EvalConfig,
)
from serve.evaluation.modes import MODES, parse_modes

if TYPE_CHECKING:
    from retrieval.sources import TaskSource


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _modes(text: str) -> list[str]:
    try:
        return parse_modes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `crosstask eval` on the `add_subparsers()` object of the main parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="Score a running server on unseen BIG-bench tasks, mode by mode.",
        description="Send a fixed, seeded sample of each task's examples to a running "
        "server through its OpenAI API (greedy, the task always excluded from retrieval "
        "and routing) and score the first line of each answer: ROUGE-L F1 and SQuAD-style "
        "exact match, 0 to 100, the best over the accepted targets, macro-averaged over "
        "tasks. Modes: zero (no help; plain completion and chat formats, the better one "
        "counts), retrieval (K demonstrations), adapter (routing auto, no demonstrations), "
        "auto (both), fusion (routing fuse); generalist (the adapter named generalist "
        "alone, only when asked for). A mode the server refuses is reported as an "
        "error; the exit code is 1 only if every mode failed.",
    )
    p.add_argument("--base-url", required=True, help="Server URL, e.g. http://127.0.0.1:8000.")
    p.add_argument(
        "--tasks",
        required=True,
        type=Path,
        help="File of BIG-bench task names, one a line (# comments and blank lines ignored).",
    )
    p.add_argument(
        "--modes",
        type=_modes,
        default=list(MODES),
        help=f"Comma-separated modes (default {','.join(MODES)}; zero_plain and zero_chat "
        "also accepted alone).",
    )
    p.add_argument("--out", required=True, type=Path, help="Where to write REPORT.json.")
    p.add_argument("--plot", type=Path, help="Also draw a ROUGE-L bar chart (PNG) here.")
    p.add_argument(
        "--predictions", type=Path, help="Also write every prediction here (JSON lines)."
    )
    p.add_argument(
        "--limit",
        type=_non_negative_int,
        default=DEFAULT_LIMIT,
        help=f"Examples per task (default {DEFAULT_LIMIT}; 0 = all).",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the example sample (default 0).")
    p.add_argument(
        "--k",
        type=_non_negative_int,
        default=DEFAULT_K,
        help=f"Demonstrations for retrieval and auto (default {DEFAULT_K}).",
    )
    p.add_argument(
        "--max-tokens",
        dest="max_tokens",
        type=_positive_int,
        default=DEFAULT_MAX_TOKENS,
        help=f"Tokens per answer (default {DEFAULT_MAX_TOKENS}).",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        help=f"Requests in flight (default {DEFAULT_CONCURRENCY}).",
    )
    p.add_argument(
        "--api-key", dest="api_key", help="Bearer key for the server (default $OPENAI_API_KEY)."
    )
    p.add_argument(
        "--model",
        help="Model to ask (default: the base model, the first of GET /v1/models that is "
        "neither `auto` nor an adapter; routing is chosen through the crosstask extension).",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"Seconds per request (default {DEFAULT_TIMEOUT:g}).",
    )
    add_bigbench_flag(p)
    p.set_defaults(func=cmd_eval)
    return p


def _config_from_args(args: argparse.Namespace, tasks: Sequence[str]) -> EvalConfig:
    return EvalConfig(
        base_url=args.base_url,
        tasks=tasks,
        modes=args.modes,
        limit=args.limit,
        seed=args.seed,
        k=args.k,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        api_key=args.api_key,
        model=args.model,
        timeout=args.timeout,
    )


def cmd_eval(args: argparse.Namespace, source: TaskSource | None = None) -> int:
    """Run `crosstask eval` from parsed arguments; `source` replaces BIG-bench (for tests)."""
    # Imported here: every command builds this parser, and only eval needs the client side.
    import openai

    from retrieval.sources import SourceError, UnknownTaskError, read_task_list
    from serve.evaluation.client import EvalError, error_message
    from serve.evaluation.console import warn
    from serve.evaluation.items import default_task_source
    from serve.evaluation.report import plot_report, write_predictions, write_report
    from serve.evaluation.runner import run_eval

    try:
        tasks = read_task_list(args.tasks)
    except OSError as exc:
        raise SystemExit(f"--tasks {args.tasks}: {exc}") from exc
    if not tasks:
        raise SystemExit(f"--tasks {args.tasks}: no task names in the file")
    config = _config_from_args(args, tasks)
    settings = settings_from_args(args, ["bigbench"])
    try:
        source = source or default_task_source(settings.bigbench, settings.home_dir)
        result = asyncio.run(run_eval(config, source))
    except (SourceError, UnknownTaskError) as exc:
        raise SystemExit(f"crosstask eval: {exc}") from exc
    except (openai.APIError, EvalError) as exc:
        # Listing the models failed: the server is unreachable, not ready or refuses the key.
        raise SystemExit(f"crosstask eval: {config.base_url}: {error_message(exc)}") from exc
    write_report(args.out, result.report)
    if args.predictions is not None:
        write_predictions(args.predictions, result.runs)
    if args.plot is not None:
        plot_report(result.report, args.plot)
    print(f"crosstask eval: report written to {args.out}", file=sys.stderr)
    if result.every_mode_failed:
        warn("every mode failed")
        return 1
    return 0
