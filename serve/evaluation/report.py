"""What `crosstask eval` writes: REPORT.json (per-task means and their macro average, one
entry per mode), the predictions file (JSON lines) and the ROUGE-L bar chart (PNG)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from retrieval.durable import write_atomic
from serve.evaluation.client import Outcome, VariantRun
from serve.evaluation.config import EvalConfig
from serve.evaluation.modes import ZERO_VARIANTS


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _round(value: float) -> float:
    return round(value, 4)


def summarize(run: VariantRun, task_order: Sequence[str]) -> dict[str, Any]:
    """The report entry of one variant: per-task means and their macro average."""
    if run.error is not None:
        return {"error": run.error}
    by_task: dict[str, list[Outcome]] = {}
    for outcome in run.outcomes:
        by_task.setdefault(outcome.item.task, []).append(outcome)
    tasks: dict[str, dict[str, Any]] = {}
    for name in task_order:
        outcomes = by_task.get(name, [])
        if outcomes:
            tasks[name] = {
                "rougeL": _round(_mean(o.rouge_l for o in outcomes)),
                "exact_match": _round(_mean(o.exact_match for o in outcomes)),
                "n": len(outcomes),
            }
    # Macro average over tasks: a task with many examples must not outweigh the others.
    per_task = [by_task[n] for n in task_order if by_task.get(n)]
    return {
        "rougeL": _round(_mean(_mean(o.rouge_l for o in os_) for os_ in per_task)),
        "exact_match": _round(_mean(_mean(o.exact_match for o in os_) for os_ in per_task)),
        "errors": run.failed_requests,
        "tasks": tasks,
    }


def pick_zero(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """`zero` is the best zero-shot format by mean ROUGE-L (the first of plain, chat,
    shaped on a tie); None when no format ran."""
    options = [
        (name.removeprefix("zero_"), results[name])
        for name in ZERO_VARIANTS
        if name in results and "error" not in results[name]
    ]
    if not options:
        errors = [results[n]["error"] for n in ZERO_VARIANTS if n in results]
        return {"error": "; ".join(errors)} if errors else None
    fmt, best = max(options, key=lambda option: option[1]["rougeL"])  # max keeps the first
    return {"format": fmt, **best}


def build_report(
    config: EvalConfig, model: str, runs: Sequence[VariantRun], task_order: Sequence[str]
) -> dict[str, Any]:
    variant_results = {run.variant.name: summarize(run, task_order) for run in runs}
    results: dict[str, dict[str, Any]] = {}
    for mode in config.modes:
        if mode == "zero":
            zero = pick_zero(variant_results)
            if zero is not None:
                results["zero"] = zero
        elif mode in variant_results:
            results[mode] = variant_results[mode]
    # Both zero-shot formats are reported on their own too, whichever one `zero` is.
    for name in ZERO_VARIANTS:
        if name in variant_results:
            results.setdefault(name, variant_results[name])
    meta = {
        "base_url": config.base_url,
        "model": model,
        "modes": list(config.modes),
        "tasks": list(task_order),
        "limit": config.limit,
        "seed": config.seed,
        "k": config.k,
        "max_tokens": config.max_tokens,
        "concurrency": config.concurrency,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "timings": {run.variant.name: round(run.seconds, 3) for run in runs},
        "requests": {run.variant.name: len(run.outcomes) for run in runs},
        # Only for modes that ran: a refused probe's "rate" would say nothing about speed.
        "requests_per_second": {
            run.variant.name: round(len(run.outcomes) / run.seconds, 3) if run.seconds else 0.0
            for run in runs
            if run.error is None
        },
    }
    return {"meta": meta, "results": results}


def write_report(path: Path, report: dict[str, Any]) -> None:
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def prediction_lines(runs: Sequence[VariantRun]) -> Iterator[dict[str, Any]]:
    """One record per example and variant: what was asked, answered and scored."""
    for run in runs:
        for o in run.outcomes:
            yield {
                "mode": run.variant.name,
                "task": o.item.task,
                "index": o.item.index,
                "input": o.item.input,
                "targets": list(o.item.targets),
                "raw": o.raw,
                "prediction": o.prediction,
                "rougeL": _round(o.rouge_l),
                "exact_match": o.exact_match,
                "error": o.error,
            }


def write_predictions(path: Path, runs: Sequence[VariantRun]) -> None:
    def dump(fh: BinaryIO) -> None:
        for line in prediction_lines(runs):
            fh.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))

    write_atomic(path, dump)


def _short_task_name(name: str, width: int = 28) -> str:
    # `natural_instructions/subtask041_qasc_answer_generation` is too long for an axis.
    leaf = name.rsplit("/", 1)[-1]
    return leaf if len(leaf) <= width else leaf[: width - 1] + "…"


def plot_report(report: dict[str, Any], path: Path) -> None:
    """A grouped bar chart of ROUGE-L: one group per task plus a last group "mean", one bar
    per mode that ran. `zero` is drawn as its two formats (it is a copy of one of them)."""
    import matplotlib

    matplotlib.use("Agg")  # No display on a server; Agg only renders to files.
    import matplotlib.pyplot as plt

    results: dict[str, dict[str, Any]] = report["results"]
    modes = [m for m, r in results.items() if "error" not in r and m != "zero"]
    tasks: list[str] = report["meta"]["tasks"]
    groups = [*map(_short_task_name, tasks), "mean"]
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2.0), 4.8))
    try:
        for i, mode in enumerate(modes):
            entry = results[mode]
            values = [entry["tasks"].get(t, {}).get("rougeL", math.nan) for t in tasks]
            xs = [g + (i - (len(modes) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [*values, entry["rougeL"]], width, label=mode)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ROUGE-L")
        ax.set_ylim(0, 100)
        zero = results.get("zero", {})
        note = f" (zero = {zero['format']})" if "format" in zero else ""
        ax.set_title(f"ROUGE-L per task, {report['meta']['model']}{note}")
        if modes:
            ax.legend(fontsize=8)
        failed = [m for m, r in results.items() if "error" in r]
        if failed:  # Say so, or a missing bar reads as a score of 0.
            fig.text(0.01, 0.01, f"failed (see report): {', '.join(failed)}", fontsize=7)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    finally:
        plt.close(fig)
