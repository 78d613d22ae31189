"""The store's command line and the default store: built from a JSONL file of one's own,
from a BIG-bench checkout, and made empty where BIG-bench cannot be had."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_DEMONSTRATIONS
from tests.server import crosstask_home


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=check,
    )


def _search(store: Path, *args: str) -> list[dict[str, object]]:
    result = _cli("store", "search", "--store", str(store), *args)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_store_search_cli(store_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy, ignore=shutil.ignore_patterns("LOCK"))
    query = "Which category is a spoon in: fruit, vehicle, animal or tool?"
    assert _search(copy, "-k", "1", "--", query)[0]["task"] == "test/category"
    hits = _search(copy, "-k", "3", "--exclude-tasks", "test/category", "--", query)
    assert len(hits) == 3
    assert all(h["task"] != "test/category" for h in hits)
    scores = [float(h["score"]) for h in hits]  # type: ignore[arg-type]
    assert scores == sorted(scores, reverse=True)


def test_store_build_from_jsonl(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("test/add_numbers\n# a comment\ntest/units\n")
    out = tmp_path / "small-store"
    home = str(crosstask_home())
    _cli(
        "store",
        "build",
        "--out",
        str(out),
        "--from",
        str(TEST_DEMONSTRATIONS),
        "--tasks",
        str(tasks),
        "--per-task",
        "5",
        "--home",
        home,
    )
    hits = _search(out, "-k", "20", "convert 3 kilograms to grams")
    assert len(hits) == 10
    assert {h["task"] for h in hits} == {"test/add_numbers", "test/units"}
    # Unknown task names fail before any work, with a clear message.
    tasks.write_text("no_such_task_anywhere\n")
    _refused(tmp_path / "x", "no_such_task_anywhere", "--from", str(TEST_DEMONSTRATIONS),
             "--tasks", str(tasks), "--home", home)  # fmt: skip
    # A malformed line is named by its number.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TEST_DEMONSTRATIONS.read_text().splitlines()[0] + '\n{"task": "t"}\n')
    _refused(tmp_path / "y", "bad.jsonl:2", "--from", str(bad), "--home", home)


def _refused(out: Path, message: str, *args: str) -> None:
    """`store build --out out ARGS` fails with `message` and leaves nothing at `out`."""
    failed = _cli("store", "build", "--out", str(out), *args, check=False)
    assert failed.returncode != 0
    assert message in failed.stderr
    assert not out.exists()


def _bigbench_checkout(root: Path, names: list[str]) -> Path:
    """A folder laid out as the BIG-bench repository is, two examples a task."""
    for i, name in enumerate(names):
        folder = root / "bigbench" / "benchmark_tasks" / name
        folder.mkdir(parents=True)
        examples = [
            {"input": f"Example {j} of task {i}: what is {i} plus {j}?", "target": str(i + j)}
            for j in range(2)
        ]
        task = {"name": name, "description": f"Task number {i}.", "examples": examples}
        (folder / "task.json").write_text(json.dumps(task))
    return root


def test_store_build_from_a_bigbench_checkout(tmp_path: Path) -> None:
    checkout = _bigbench_checkout(tmp_path / "BIG-bench", ["alpha_task", "group/beta_task"])
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("alpha_task\ngroup/beta_task\n")
    out = tmp_path / "bb-store"
    _cli(
        "store",
        "build",
        "--out",
        str(out),
        "--bigbench",
        str(checkout),
        "--tasks",
        str(tasks),
        "--home",
        str(crosstask_home()),
    )
    hits = _search(out, "-k", "10", "what is 1 plus 1?")
    assert len(hits) == 4
    assert {h["task"] for h in hits} == {"alpha_task", "group/beta_task"}


def test_default_store_without_bigbench_is_empty_until_it_is_supplied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retrieval.sources import default_seen_tasks
    from retrieval.store_db import demo_count
    from serve.defaults import build_default_store, ensure_defaults, is_placeholder_store

    home = tmp_path / "home"
    # No index at all: pip says no at once, as it does where no index serves the sdist.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    store = home / "store"
    build_default_store(home, store, None)
    assert is_placeholder_store(store)
    assert demo_count(store / "demos.sqlite3") == 0
    assert _search(store, "-k", "3", "anything") == []
    # BIG-bench supplied later (here a checkout holding the seen tasks): prepare builds
    # the real store over the empty one.
    checkout = _bigbench_checkout(tmp_path / "BIG-bench", default_seen_tasks())
    # Share the converted model rather than convert it again into this home.
    (home / "models").symlink_to(crosstask_home() / "models", target_is_directory=True)
    ensure_defaults(home, bigbench=checkout)
    assert not is_placeholder_store(store)
    assert demo_count(store / "demos.sqlite3") == 2 * len(default_seen_tasks())
