"""`crosstask adapters train` and `crosstask adapters list`: `add_adapters_parser` adds the
`adapters` command to the crosstask CLI (serve/cli/main.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.cli.common import add_bigbench_flag, settings_from_args
from serve.progress import ProgressBar

if TYPE_CHECKING:
    from routing.training.loop import StepReport

log = logging.getLogger("crosstask")

# Flags that shape a recipe; with --recipe they would be ambiguous, so they are refused.
_RECIPE_FLAGS = (
    "groups",
    "per_task",
    "rank",
    "specialist_rank",
    "specialist_per_task",
    "epochs",
    "specialist_epochs",
    "lr",
    "seed",
    "demo_fraction",
    "k",
    "max_seq_len",
    "no_generalist",
    "fresh_specialists",
)


def add_adapters_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("adapters", help="Train and list LoRA adapters.")
    sub = p.add_subparsers(dest="adapters_command", required=True)
    _add_train(sub)
    _add_list(sub)
    return p


def _add_train(sub: Any) -> None:
    from routing.training.recipe import AdapterSettings, DataConfig, SpecialistSettings

    general = AdapterSettings()
    special = SpecialistSettings()
    data = DataConfig()
    t = sub.add_parser(
        "train",
        help="Train LoRA adapters (a generalist and grouped specialists) on BIG-bench tasks.",
        description="Train LoRA adapters with PEFT on the CPU, in the prompt format the server "
        "uses (loss on the answer only; part of the examples with retrieved cross-task "
        "demonstrations, their own task excluded). One generalist on every task of --tasks, "
        "and --groups specialists on groups of related tasks (k-means of the tasks' query "
        "embeddings). Resumable: run the same command again after an interruption. "
        "The recipe is written to OUT/recipe.json; --recipe FILE trains a recorded one "
        "(e.g. routing/library/recipe.json, the default library).",
    )
    t.add_argument("--out", type=Path, required=True, help="Adapter library folder to write.")
    source = t.add_mutually_exclusive_group(required=True)
    source.add_argument("--tasks", type=Path, help="Task list, one BIG-bench name a line.")
    source.add_argument("--recipe", type=Path, help="A recipe.json to reproduce.")
    t.add_argument(
        "--groups",
        type=int,
        help=f"Specialist groups (default {special.groups}; 0 = generalist only).",
    )
    t.add_argument(
        "--per-task",
        dest="per_task",
        type=int,
        help=f"Generalist examples per task (default {general.per_task}).",
    )
    t.add_argument("--rank", type=int, help=f"Generalist LoRA rank (default {general.rank}).")
    t.add_argument(
        "--specialist-rank",
        dest="specialist_rank",
        type=int,
        help=f"Specialist LoRA rank (default {special.rank}).",
    )
    t.add_argument(
        "--specialist-per-task",
        dest="specialist_per_task",
        type=int,
        help=f"Specialist examples per task (default {special.per_task}).",
    )
    t.add_argument("--epochs", type=float, help=f"Generalist epochs (default {general.epochs:g}).")
    t.add_argument(
        "--specialist-epochs",
        dest="specialist_epochs",
        type=float,
        help=f"Specialist epochs (default {special.epochs:g}).",
    )
    t.add_argument(
        "--lr",
        type=float,
        help=f"Peak learning rate, both kinds (default {general.learning_rate:g}).",
    )
    t.add_argument("--seed", type=int, help="Seed of everything (default 0).")
    t.add_argument(
        "--demo-fraction",
        dest="demo_fraction",
        type=float,
        help=f"Share of examples with retrieved demonstrations (default {data.demo_fraction:g}).",
    )
    t.add_argument("--k", type=int, help=f"Demonstrations per such example (default {data.k}).")
    t.add_argument(
        "--max-seq-len",
        dest="max_seq_len",
        type=int,
        help=f"Longest training sequence in tokens (default {data.max_seq_len}).",
    )
    t.add_argument(
        "--no-generalist",
        dest="no_generalist",
        action="store_true",
        default=None,
        help="Train the specialists only.",
    )
    t.add_argument(
        "--fresh-specialists",
        dest="fresh_specialists",
        action="store_true",
        default=None,
        help="Train specialists from zero instead of from the generalist.",
    )
    t.add_argument(
        "--only", nargs="+", default=[], metavar="NAME", help="Train only these adapters."
    )
    t.add_argument("--threads", type=int, help="Torch threads (default: every usable core).")
    t.add_argument("--model", type=Path, help="Base model folder (default: the embedded one).")
    t.add_argument(
        "--store",
        type=Path,
        help="Demonstration store to retrieve from (default: CROSSTASK_HOME/store).",
    )
    t.add_argument("--embedder", type=Path, help="sentence-transformers folder.")
    add_bigbench_flag(t)
    t.add_argument("--home", type=Path, help="Cache folder (default ~/.cache/crosstask).")
    t.set_defaults(func=cmd_train)


def _add_list(sub: Any) -> None:
    lst = sub.add_parser(
        "list",
        help="List the adapters of a library folder.",
        description="A table of the adapters in a folder: name, kind, rank, number of "
        "training tasks (from each adapter's crosstask_adapter.json).",
    )
    lst.add_argument(
        "--adapters",
        type=Path,
        help="Adapter folder (default: CROSSTASK_ADAPTERS, else the packaged default library).",
    )
    lst.set_defaults(func=cmd_list)


# --------------------------------------------------------------------------- train


def recipe_from_args(args: argparse.Namespace) -> Any:
    """The recipe a `train --tasks` command line describes (defaults: the dataclasses')."""
    from retrieval.sources import read_task_list
    from routing.training.recipe import (
        AdapterSettings,
        DataConfig,
        Recipe,
        SpecialistSettings,
        TrainConfig,
        check_recipe,
    )

    def given(name: str) -> Any:
        return getattr(args, name, None)

    tasks = read_task_list(args.tasks)
    if not tasks:
        raise ValueError(f"--tasks {args.tasks}: no task names in the file")
    seed = given("seed") if given("seed") is not None else 0
    data = _with(DataConfig(), seed=seed, demo_fraction=given("demo_fraction"), k=given("k"))
    data = _with(data, max_seq_len=given("max_seq_len"))
    generalist: AdapterSettings | None = _with(
        AdapterSettings(),
        rank=given("rank"),
        per_task=given("per_task"),
        epochs=given("epochs"),
        learning_rate=given("lr"),
    )
    if generalist is not None and given("rank") is not None:
        generalist = replace(generalist, alpha=2.0 * generalist.rank)
    if given("no_generalist"):
        generalist = None
    specialists: SpecialistSettings | None = _with(
        SpecialistSettings(),
        groups=given("groups"),
        rank=given("specialist_rank"),
        per_task=given("specialist_per_task"),
        epochs=given("specialist_epochs"),
        learning_rate=given("lr"),
        grouping_seed=seed,
    )
    if specialists is not None and given("specialist_rank") is not None:
        specialists = replace(specialists, alpha=2.0 * specialists.rank)
    if specialists is not None and (given("fresh_specialists") or generalist is None):
        specialists = replace(specialists, init_from_generalist=False)
    if specialists is not None and specialists.groups == 0:
        specialists = None
    recipe = Recipe(
        tasks=tuple(tasks),
        data=data,
        train=TrainConfig(seed=seed),
        generalist=generalist,
        specialists=specialists,
    )
    check_recipe(recipe)
    return recipe


def _with(obj: Any, **changes: Any) -> Any:
    """`obj` with the changes that were given (None = flag left out)."""
    known = {f.name for f in fields(obj)}
    return replace(obj, **{k: v for k, v in changes.items() if v is not None and k in known})


@dataclass
class StepDisplay:
    """The training's progress: one bar per adapter, in steps, from the step it resumed
    at (so the ETA is this run's), with the loss and tokens/s of the latest step; and
    one bar for the whole run (every adapter it trains), whose ETA is the build's."""

    adapter: str | None = None
    bar: ProgressBar | None = None
    run: ProgressBar | None = None

    def __call__(self, report: StepReport) -> None:
        if self.bar is None or report.adapter != self.adapter:
            self.close_adapter()
            self.adapter = report.adapter
            label = report.adapter
            if report.count > 1:
                label = f"{label} ({report.index}/{report.count})"
            self.bar = ProgressBar(label, "step", total=report.steps, initial=report.step - 1)
        if self.run is None and report.run_steps > report.steps:
            self.run = ProgressBar(
                "all adapters", "step", total=report.run_steps, initial=report.run_step - 1
            )
        postfix = {"loss": f"{report.loss:.3f}", "tokens/s": f"{report.tokens_per_s:.0f}"}
        self.bar.advance(report.step - self.bar.done, postfix)
        if self.run is not None:
            self.run.advance(report.run_step - self.run.done)
        if report.step == report.steps:
            self.close_adapter()
        if self.run is not None and report.run_step >= report.run_steps:
            self.run.close()
            self.run = None

    def close_adapter(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.adapter, self.bar = None, None

    def close(self) -> None:
        self.close_adapter()
        if self.run is not None:
            self.run.close()
            self.run = None


def cmd_train(args: argparse.Namespace) -> int:
    from retrieval.sources import open_bigbench
    from routing.training.data import StoreDemoSource
    from routing.training.library import LibraryInputs, build_library
    from routing.training.loop import RunOptions
    from routing.training.recipe import read_recipe
    from serve.cli.common import configure_logging
    from serve.default_model import ensure_default_model
    from serve.defaults import bigbench_cache, default_store_dir

    configure_logging("info")
    # A polite kill (SIGTERM) interrupts like Ctrl-C, so the running adapter saves a
    # checkpoint on the way out and the next run continues from it.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.recipe is not None:
        clashing = [f"--{f.replace('_', '-')}" for f in _RECIPE_FLAGS if getattr(args, f, None)]
        if clashing:
            raise ValueError(
                f"{', '.join(clashing)} cannot be combined with --recipe (the recipe says it)"
            )
        recipe = read_recipe(args.recipe)
    else:
        recipe = recipe_from_args(args)
    settings = settings_from_args(args, ["home", "bigbench"])
    home = settings.home_dir
    model_dir = args.model.expanduser().resolve() if args.model else ensure_default_model(home)
    store_dir = args.store or settings.store or default_store_dir(home)
    if not Path(store_dir).is_dir():
        raise FileNotFoundError(
            f"no demonstration store at {store_dir}: build one with `crosstask prepare` "
            "(the default store) or `crosstask store build`, or pass --store"
        )
    source = open_bigbench(settings.bigbench, bigbench_cache(home))
    demos = StoreDemoSource(Path(store_dir), args.embedder or settings.embedder)
    display = StepDisplay()
    try:
        inputs = LibraryInputs(
            model_dir=model_dir,
            source=source,
            demos=demos,
            embedder_name=demos.embedder_name,
        )
        options = RunOptions(threads=args.threads, progress=display)
        try:
            report = build_library(recipe, args.out, inputs, args.only, options)
        except KeyboardInterrupt:
            print(
                "crosstask adapters: interrupted; the same command continues where it stopped",
                file=sys.stderr,
            )
            return 130
    finally:
        display.close()
        demos.close()
    for result in report.trained:
        print(
            f"{result.name}: {result.steps} steps, loss {result.first_loss:.3f} -> "
            f"{result.last_loss:.3f}, {result.tokens_per_s:.0f} tokens/s, {result.seconds:.0f} s"
        )
    if report.skipped:
        print(f"kept (already trained): {', '.join(report.skipped)}")
    print(
        f"library {report.out}: done in {report.seconds:.0f} s "
        f"({report.data_seconds:.0f} s reading and tokenizing examples)"
    )
    return 0


# --------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    from routing.adapter_meta import packaged_library_dir

    folder = args.adapters or (
        Path(os.environ["CROSSTASK_ADAPTERS"])
        if os.environ.get("CROSSTASK_ADAPTERS")
        else packaged_library_dir()
    )
    rows = library_rows(Path(folder))
    if not rows:
        print(f"no adapters in {folder}")
        return 0
    print(format_table(["name", "kind", "rank", "tasks"], rows))
    return 0


def library_rows(folder: Path) -> list[list[str]]:
    """One row per adapter folder: name, kind, rank, number of tasks. A folder with PEFT
    files but no (or a broken) crosstask_adapter.json is listed as such, not skipped."""
    import json

    from routing.adapter_meta import ADAPTER_CONFIG_FILE, read_meta

    if not folder.is_dir():
        raise FileNotFoundError(f"no adapter folder at {folder}")
    rows = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (sub / ADAPTER_CONFIG_FILE).is_file():
            continue
        try:
            meta = read_meta(sub)
            rows.append([meta.name, meta.kind, str(meta.rank), str(len(meta.tasks))])
        except ValueError as exc:
            try:
                rank = str(json.loads((sub / ADAPTER_CONFIG_FILE).read_text())["r"])
            except (OSError, ValueError, KeyError):
                rank = "?"
            log.debug("%s", exc)
            rows.append([sub.name, "no metadata", rank, "-"])
    return rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
