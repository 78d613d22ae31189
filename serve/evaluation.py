"""`crosstask eval`: score a running server on unseen BIG-bench tasks, mode by mode.

Every example goes through the public HTTP API with the official `openai` client, exactly
as a user's request would, so the numbers measure the server as deployed (prompt
assembly, retrieval, routing) and not some in-process shortcut. Each evaluated task is
always in `crosstask.exclude_tasks`: the task must be unseen for whatever helps the model.

The modes, and what each sends (`K` is `--k`):

- `zero`: no help at all, in two prompt formats, both reported: `zero_plain` (a
  `/v1/completions` prompt "Definition/Input/Output") and `zero_chat` (`/v1/chat/completions`
  with the definition as the system message). `zero` is the better of the two.
- `retrieval`: the chat messages, with K retrieved demonstrations, base model.
- `adapter`: no demonstrations, `routing.mode = "auto"` (the router picks adapters).
- `generalist`: no demonstrations, the adapter named `generalist` alone (`routing.mode =
  "adapter"`): the reference the router's choices are measured against.
- `auto`: K demonstrations and `routing.mode = "auto"`.
- `fusion`: no demonstrations, `routing.mode = "fuse"`.

A mode the server refuses (400 on its first request) is reported as `{"error": ...}` and
the others still run. The heavy imports (openai, rouge-score, matplotlib) happen inside
the functions that need them, so `crosstask --help` and `crosstask serve` do not pay them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Protocol

from retrieval.durable import write_atomic
from retrieval.sources import Task

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from rouge_score.rouge_scorer import RougeScorer

MODES = ("zero", "retrieval", "adapter", "auto", "fusion")
# Extra modes that run only when asked for by name.
EXTRA_MODES = ("generalist",)
GENERALIST_ADAPTER = "generalist"
ZERO_VARIANTS = ("zero_plain", "zero_chat")
# What `--modes` accepts: the public modes, plus the two zero-shot formats on their own.
KNOWN_MODES = (*MODES, *EXTRA_MODES, *ZERO_VARIANTS)

DEFAULT_LIMIT = 40
DEFAULT_K = 6
DEFAULT_MAX_TOKENS = 64
DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT = 300.0
AUTO_MODEL = "auto"
# The plain prompt's answer ends at the first blank line: the next "Input:" block would
# otherwise be invented by the model and scored as part of the answer.


class EvalError(RuntimeError):
    """The evaluation cannot start: no model to ask."""


class TaskSource(Protocol):
    """Where tasks come from: `retrieval.sources.BigBenchSource`, or a fake in tests."""

    def tasks(self, names: Sequence[str]) -> Iterable[Task]: ...


# --------------------------------------------------------------------------- scoring


def first_line(text: str) -> str:
    """The first non-empty line, stripped: BIG-bench answers are one line, and a model that
    keeps talking after it must not be penalised (or rewarded) for the rest."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, targets: Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised target, else 0."""
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalized == normalize_answer(t) for t in targets) else 0.0


@lru_cache(maxsize=1)
def _rouge_scorer() -> RougeScorer:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, targets: Sequence[str]) -> float:
    """ROUGE-L F1 (0 to 100), the best over the accepted targets."""
    scorer = _rouge_scorer()
    best = max((scorer.score(t, prediction)["rougeL"].fmeasure for t in targets), default=0.0)
    return 100.0 * best


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True, slots=True)
class Item:
    """One example to send: `index` is its position in the task, for the predictions file."""

    task: str
    definition: str
    index: int
    input: str
    targets: tuple[str, ...]


def sample_items(task: Task, limit: int, seed: int) -> list[Item]:
    """A fixed sample of `limit` examples (all of them when `limit` <= 0 or the task is
    smaller), in task order.

    The generator is seeded from (seed, task name) alone, so the sample is the same for
    every mode, every run, and whatever other tasks are evaluated alongside it. Python
    seeds `random.Random` from a str through SHA-512, not `hash()`, so PYTHONHASHSEED
    does not change it.
    """
    usable = [i for i, ex in enumerate(task.examples) if ex.targets and ex.input.strip()]
    if 0 < limit < len(usable):
        usable = sorted(random.Random(f"{seed}:{task.name}").sample(usable, limit))
    return [
        Item(
            task=task.name,
            definition=task.definition,
            index=i,
            input=task.examples[i].input,
            targets=tuple(task.examples[i].targets),
        )
        for i in usable
    ]


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of asking: an endpoint plus the `crosstask` extension it sends."""

    name: str
    endpoint: Literal["completions", "chat"]
    k: int
    routing: str
    adapters: tuple[str, ...] = ()

    def extension(self, task: str) -> dict[str, Any]:
        routing: dict[str, Any] = {"mode": self.routing}
        if self.adapters:
            routing["adapters"] = list(self.adapters)
        return {
            "demonstrations": {"k": self.k},
            "routing": routing,
            "exclude_tasks": [task],
        }


def parse_modes(text: str) -> list[str]:
    """`zero,retrieval` -> ["zero", "retrieval"]; unknown names raise ValueError."""
    modes: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        if name not in KNOWN_MODES:
            raise ValueError(f"unknown mode {name!r} (known: {', '.join(KNOWN_MODES)})")
        if name not in modes:
            modes.append(name)
    if not modes:
        raise ValueError("no mode given")
    return modes


def variants_for(modes: Sequence[str], k: int) -> list[Variant]:
    """The requests to run for the requested modes (`zero` runs both of its formats)."""
    table = {
        "zero_plain": Variant("zero_plain", "completions", 0, "off"),
        "zero_chat": Variant("zero_chat", "chat", 0, "off"),
        "retrieval": Variant("retrieval", "chat", k, "off"),
        "adapter": Variant("adapter", "chat", 0, "auto"),
        "auto": Variant("auto", "chat", k, "auto"),
        "fusion": Variant("fusion", "chat", 0, "fuse"),
        "generalist": Variant("generalist", "chat", 0, "adapter", (GENERALIST_ADAPTER,)),
    }
    names: list[str] = []
    for mode in modes:
        for name in ZERO_VARIANTS if mode == "zero" else (mode,):
            if name not in names:
                names.append(name)
    return [table[n] for n in names]


def plain_prompt(definition: str, text: str) -> str:
    return f"Definition: {definition}\n\nInput: {text}\nOutput:"


def chat_messages(definition: str, text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": definition}, {"role": "user", "content": text}]


# --------------------------------------------------------------------------- requests


@dataclass(slots=True)
class Outcome:
    """What came back for one item: the raw answer, or why there is none."""

    item: Item
    raw: str | None = None
    error: str | None = None
    status: int | None = None
    prediction: str = ""
    rouge_l: float = 0.0
    exact_match: float = 0.0

    def score(self) -> None:
        # A failed request scores 0 rather than being left out: leaving it out would let a
        # mode that fails on its hard examples look better than one that answers them.
        if self.raw is None:
            return
        self.prediction = first_line(self.raw)
        self.rouge_l = rouge_l(self.prediction, self.item.targets)
        self.exact_match = exact_match(self.prediction, self.item.targets)


@dataclass(slots=True)
class VariantRun:
    variant: Variant
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    @property
    def failed_requests(self) -> int:
        return sum(o.raw is None for o in self.outcomes)


@dataclass(frozen=True, slots=True)
class RequestSettings:
    model: str
    max_tokens: int
    concurrency: int


def _error_message(exc: BaseException) -> str:
    """The server's own message when it sent an OpenAI error body, else the exception."""
    body = getattr(exc, "body", None)
    status = getattr(exc, "status_code", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
        return f"{status}: {message}" if status else message
    return str(exc) or type(exc).__name__


async def _complete(
    client: AsyncOpenAI, settings: RequestSettings, variant: Variant, item: Item
) -> str:
    extra_body = {"crosstask": variant.extension(item.task)}
    if variant.endpoint == "completions":
        completion = await client.completions.create(
            model=settings.model,
            prompt=plain_prompt(item.definition, item.input),
            temperature=0.0,
            max_tokens=settings.max_tokens,
            # No "\n\n" stop: the model often opens with a blank line, and first_line()
            # already keeps only the answer line.
            extra_body=extra_body,
        )
        return completion.choices[0].text or ""
    chat = await client.chat.completions.create(
        model=settings.model,
        messages=chat_messages(item.definition, item.input),  # type: ignore[arg-type]
        temperature=0.0,
        max_tokens=settings.max_tokens,
        extra_body=extra_body,
    )
    return chat.choices[0].message.content or ""


async def _attempt(
    client: AsyncOpenAI, settings: RequestSettings, variant: Variant, item: Item
) -> Outcome:
    import openai

    try:
        return Outcome(item=item, raw=await _complete(client, settings, variant, item))
    except openai.APIError as exc:
        return Outcome(
            item=item, error=_error_message(exc), status=getattr(exc, "status_code", None)
        )
    except IndexError:  # A 200 without choices: the server's fault, but this example's loss.
        return Outcome(item=item, error="the response has no choices")


async def run_variant(
    client: AsyncOpenAI, settings: RequestSettings, variant: Variant, items: Sequence[Item]
) -> VariantRun:
    """Send every item in this variant's way, `concurrency` at a time.

    The first item goes alone: a server that does not support the mode answers it 400,
    and then the mode is recorded as an error without sending the rest. A mode whose every
    request failed (for whatever reason) is an error too.
    """
    run = VariantRun(variant=variant)
    started = time.perf_counter()
    if not items:
        return run
    probe = await _attempt(client, settings, variant, items[0])
    if probe.status == 400:
        run.outcomes = [probe]
        run.error = probe.error
        run.seconds = time.perf_counter() - started
        return run
    semaphore = asyncio.Semaphore(max(1, settings.concurrency))

    async def bounded(item: Item) -> Outcome:
        async with semaphore:
            return await _attempt(client, settings, variant, item)

    rest = await asyncio.gather(*(bounded(item) for item in items[1:]))
    run.seconds = time.perf_counter() - started
    run.outcomes = [probe, *rest]
    for outcome in run.outcomes:
        outcome.score()
    if run.failed_requests == len(run.outcomes):
        common = Counter(o.error for o in run.outcomes).most_common(1)[0][0]
        run.error = f"every request failed, e.g. {common}"
    return run


async def resolve_model(client: AsyncOpenAI) -> str:
    """The base model's id: the first model that is neither `auto` nor an adapter (an
    adapter names its base in `parent`); the first non-`auto` one if all have a parent."""
    models = [m async for m in client.models.list()]
    candidates = [m for m in models if m.id != AUTO_MODEL]
    for model in candidates:
        if not getattr(model, "parent", None):
            return model.id
    if candidates:
        return candidates[0].id
    raise EvalError("GET /v1/models lists no model other than `auto`")


# --------------------------------------------------------------------------- report


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
    """`zero` is the better zero-shot format by mean ROUGE-L (plain on a tie); None when
    neither format ran."""
    options = [
        (fmt, results[name])
        for fmt, name in (("plain", "zero_plain"), ("chat", "zero_chat"))
        if name in results and "error" not in results[name]
    ]
    if not options:
        errors = [results[n]["error"] for n in ZERO_VARIANTS if n in results]
        return {"error": "; ".join(errors)} if errors else None
    fmt, best = max(options, key=lambda option: option[1]["rougeL"])  # max keeps the first
    return {"format": fmt, **best}


@dataclass(frozen=True, slots=True)
class EvalConfig:
    base_url: str
    tasks: Sequence[str]
    modes: Sequence[str] = MODES
    limit: int = DEFAULT_LIMIT
    seed: int = 0
    k: int = DEFAULT_K
    max_tokens: int = DEFAULT_MAX_TOKENS
    concurrency: int = DEFAULT_CONCURRENCY
    api_key: str | None = None
    model: str | None = None
    timeout: float = DEFAULT_TIMEOUT


@dataclass(slots=True)
class EvalResult:
    report: dict[str, Any]
    runs: list[VariantRun]

    @property
    def every_mode_failed(self) -> bool:
        entries = [self.report["results"].get(m) for m in self.report["meta"]["modes"]]
        return all(e is None or "error" in e for e in entries)


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


# --------------------------------------------------------------------------- running


def api_base(url: str) -> str:
    """The openai client wants the `/v1` root; accept `http://host:port` as vLLM's bench does."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def load_items(
    source: TaskSource, names: Sequence[str], limit: int, seed: int
) -> tuple[list[str], list[Item]]:
    """The sampled items, task by task in the order asked (the source may read them in
    another order); tasks without a usable example are dropped with a warning."""
    tasks = {task.name: task for task in source.tasks(names)}
    order: list[str] = []
    items: list[Item] = []
    for name in names:
        sampled = sample_items(tasks[name], limit, seed) if name in tasks else []
        if not sampled:
            warn(f"task {name!r} has no usable example; skipped")
            continue
        order.append(name)
        items.extend(sampled)
    return order, items


def make_client(config: EvalConfig) -> AsyncOpenAI:
    from openai import AsyncOpenAI

    # The SDK insists on a key; a server without auth ignores whatever is sent.
    key = config.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    return AsyncOpenAI(base_url=api_base(config.base_url), api_key=key, timeout=config.timeout)


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


def warn(message: str) -> None:
    print(f"crosstask eval: warning: {message}", file=sys.stderr, flush=True)


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


# --------------------------------------------------------------------------- CLI


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
    p.add_argument(
        "--bigbench-sdist",
        dest="bigbench_sdist",
        type=Path,
        help="The bigbench-1.0.0 sdist to read tasks from (default: downloaded once into "
        "CROSSTASK_HOME/bigbench).",
    )
    p.set_defaults(func=cmd_eval)
    return p


def default_task_source(sdist: Path | None) -> TaskSource:
    from retrieval.sources import BigBenchSource, ensure_bigbench_sdist
    from serve.settings import Settings

    path = sdist if sdist is not None else ensure_bigbench_sdist(Settings().home_dir / "bigbench")
    return BigBenchSource(path)


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
    import openai

    from retrieval.sources import SourceError, UnknownTaskError, read_task_list

    try:
        tasks = read_task_list(args.tasks)
    except OSError as exc:
        raise SystemExit(f"--tasks {args.tasks}: {exc}") from exc
    if not tasks:
        raise SystemExit(f"--tasks {args.tasks}: no task names in the file")
    config = _config_from_args(args, tasks)
    try:
        source = source or default_task_source(args.bigbench_sdist)
        result = asyncio.run(run_eval(config, source))
    except (SourceError, UnknownTaskError) as exc:
        raise SystemExit(f"crosstask eval: {exc}") from exc
    except (openai.APIError, EvalError) as exc:
        # Listing the models failed: the server is unreachable, not ready or refuses the key.
        raise SystemExit(f"crosstask eval: {config.base_url}: {_error_message(exc)}") from exc
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
