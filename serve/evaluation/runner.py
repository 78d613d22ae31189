"""One whole evaluation: every requested mode over the same sampled examples, with a
progress line on stderr as each mode ends."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retrieval.sources import TaskSource
from serve.evaluation.client import (
    RequestSettings,
    VariantRun,
    make_client,
    resolve_model,
    run_variant,
)
from serve.evaluation.config import EvalConfig
from serve.evaluation.console import warn
from serve.evaluation.items import load_items
from serve.evaluation.modes import variants_for
from serve.evaluation.report import build_report, summarize

if TYPE_CHECKING:
    from openai import AsyncOpenAI


@dataclass(slots=True)
class EvalResult:
    report: dict[str, Any]
    runs: list[VariantRun]

    @property
    def every_mode_failed(self) -> bool:
        entries = [self.report["results"].get(m) for m in self.report["meta"]["modes"]]
        return all(e is None or "error" in e for e in entries)


async def run_eval(
    config: EvalConfig, source: TaskSource, client: AsyncOpenAI | None = None
) -> EvalResult:
    """Evaluate every requested mode over the same sampled examples; nothing is written."""
    task_order, items = load_items(source, config.tasks, config.limit, config.seed)
    own_client = client is None
    client = client or make_client(config)
    try:
        model = config.model or await resolve_model(client)
        settings = RequestSettings(model, config.max_tokens, config.concurrency)
        runs: list[VariantRun] = []
        for variant in variants_for(config.modes, config.k):
            run = await run_variant(client, settings, variant, items)
            report_progress(run)
            runs.append(run)
    finally:
        if own_client:
            await client.close()
    return EvalResult(report=build_report(config, model, runs, task_order), runs=runs)


def report_progress(run: VariantRun) -> None:
    name = run.variant.name
    if run.error is not None:
        warn(f"mode {name} failed and is reported as an error: {run.error}")
        return
    entry = summarize(run, sorted({o.item.task for o in run.outcomes}))
    rate = len(run.outcomes) / run.seconds if run.seconds else 0.0
    print(
        f"crosstask eval: {name}: ROUGE-L {entry['rougeL']:.2f}, EM {entry['exact_match']:.2f} "
        f"({len(run.outcomes)} requests, {run.failed_requests} failed, "
        f"{run.seconds:.1f} s, {rate:.2f} req/s)",
        file=sys.stderr,
        flush=True,
    )
    if run.failed_requests:
        first = next(o.error for o in run.outcomes if o.error)
        warn(f"mode {name}: {run.failed_requests} request(s) failed (scored 0), e.g. {first}")
