"""`adapters train` argument handling and `adapters list` (no training here)."""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import pytest

from routing.adapter_meta import AdapterMeta, Prototype, write_meta
from routing.training.loop import StepReport
from routing.training.recipe import ALL_LINEAR, Recipe, recipe_from_json
from serve.cli.adapters import (
    StepDisplay,
    add_adapters_parser,
    format_table,
    library_rows,
    recipe_from_args,
)
from serve.cli.main import main

BASE = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_adapters_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["adapters", *argv])


def test_train_flags_make_the_recipe(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("alpha\n# a comment\nbeta\n\nalpha\n")
    args = _parse(
        ["train", "--out", str(tmp_path / "lib"), "--tasks", str(tasks), "--groups", "3",
         "--rank", "16", "--specialist-rank", "2", "--per-task", "7", "--seed", "5",
         "--demo-fraction", "0.25", "--lr", "0.002"]
    )  # fmt: skip
    recipe: Recipe = recipe_from_args(args)
    assert recipe.tasks == ("alpha", "beta")
    assert recipe.generalist is not None and recipe.specialists is not None
    assert (recipe.generalist.rank, recipe.generalist.alpha) == (16, 32.0)
    assert recipe.generalist.per_task == 7
    assert recipe.generalist.learning_rate == recipe.specialists.learning_rate == 0.002
    assert (recipe.specialists.rank, recipe.specialists.groups) == (2, 3)
    assert recipe.specialists.grouping_seed == recipe.data.seed == recipe.train.seed == 5
    assert recipe.data.demo_fraction == 0.25
    assert recipe.generalist.target_modules == ALL_LINEAR
    assert recipe_from_json(json.loads(json.dumps(recipe.to_json()))) == recipe


def test_groups_zero_and_no_generalist(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("alpha\n")
    only_generalist = recipe_from_args(
        _parse(["train", "--out", "x", "--tasks", str(tasks), "--groups", "0"])
    )
    assert only_generalist.specialists is None
    only_specialists = recipe_from_args(
        _parse(["train", "--out", "x", "--tasks", str(tasks), "--no-generalist"])
    )
    assert only_specialists.generalist is None


def test_recipe_and_shaping_flags_do_not_mix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["adapters", "train", "--out", str(tmp_path / "o"), "--recipe", "r.json",
                 "--rank", "4"])  # fmt: skip
    assert code == 2
    assert "--rank cannot be combined with --recipe" in capsys.readouterr().err


def _adapter(folder: Path, name: str, rank: int, tasks: list[str], meta: bool = True) -> None:
    path = folder / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank}))
    if meta:
        write_meta(
            path,
            AdapterMeta(
                name=name,
                kind="generalist" if name == "generalist" else "specialist",
                tasks=tasks,
                rank=rank,
                base_model=BASE,
                prototype=Prototype("e", 1, [[1.0, 0.0]], [1]),
            ),
        )


def test_list_shows_every_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _adapter(tmp_path, "generalist", 8, ["a", "b", "c"])
    _adapter(tmp_path, "spec-0-x", 4, ["a"])
    _adapter(tmp_path, "bare", 2, [], meta=False)
    (tmp_path / ".work").mkdir()
    assert library_rows(tmp_path) == [
        ["bare", "no metadata", "2", "-"],
        ["generalist", "generalist", "8", "3"],
        ["spec-0-x", "specialist", "4", "1"],
    ]
    assert main(["adapters", "list", "--adapters", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "kind", "rank", "tasks"]
    assert out[2].split() == ["generalist", "generalist", "8", "3"]


def test_table_aligns_columns() -> None:
    assert format_table(["a", "bb"], [["ccc", "d"]]) == "a    bb\nccc  d"


def test_training_shows_one_bar_per_adapter(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal, even under -s
    display = StepDisplay()
    with caplog.at_level(logging.INFO, logger="crosstask"):
        # The generalist resumed at step 2 of 4; then a specialist from its first step.
        for step in (3, 4):
            display(StepReport("generalist", step, 4, 0.5, 100 * step, float(step)))
        assert display.bar is None  # closed with its last step
        display(StepReport("spec-0", 1, 2, 2.0, 50, 1.0))
        assert display.bar is not None and display.bar.label == "spec-0"
        assert (display.bar.done, display.bar.total) == (1, 2)
        display(StepReport("spec-0", 2, 2, 1.0, 100, 2.0))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # Off a terminal: a line at the end of each (none within 30 s).
    assert lines[0].startswith("generalist: 4/4 step, loss 0.500, tokens/s 100,")
    assert lines[1].startswith("spec-0: 2/2 step, loss 1.000, tokens/s 50,")


def test_training_shows_the_whole_runs_progress_and_eta(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    display = StepDisplay()
    with caplog.at_level(logging.INFO, logger="crosstask"):
        # Two adapters of 2 and 3 steps; the run resumed inside the first, at its step 2.
        display(StepReport("generalist", 2, 2, 0.5, 100, 1.0, 1, 2, 2, 5))
        assert display.run is not None and (display.run.done, display.run.total) == (2, 5)
        for step in (1, 2, 3):
            display(StepReport("spec-0", step, 3, 0.5, 100, 1.0, 2, 2, 2 + step, 5))
            assert display.bar is None or display.bar.label == "spec-0 (2/2)"
        assert display.run is None  # closed with the run's last step
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("all adapters: 5/5 step") for line in lines)
