"""The store's command line on the default store (a copy, opened read-write)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_store_search_cli(store_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy, ignore=shutil.ignore_patterns("LOCK"))
    query = "How many objects are there? I have a chair, two tables and a lamp."
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "serve.cli",
            "store",
            "search",
            "--store",
            str(copy),
            "-k",
            "3",
            "--exclude-tasks",
            "object_counting",
            "--",
            query,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == 3
    assert all(h["task"] != "object_counting" for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_store_build_cli_small(tmp_path: Path) -> None:
    import os

    from serve.defaults import bigbench_cache

    home = Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("object_counting\n# a comment\narithmetic/1_digit_addition\n")
    out = tmp_path / "small-store"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "serve.cli",
            "store",
            "build",
            "--out",
            str(out),
            "--tasks",
            str(tasks),
            "--per-task",
            "5",
            "--home",
            str(home),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert (out / "demos.sqlite3").is_file()
    assert bigbench_cache(home).is_dir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "serve.cli",
            "store",
            "search",
            "--store",
            str(out),
            "-k",
            "20",
            "count",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == 10
    assert {h["task"] for h in hits} == {"object_counting", "arithmetic/1_digit_addition"}
    # Unknown task names fail before any work, with a clear message.
    tasks.write_text("no_such_task_anywhere\n")
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "serve.cli",
            "store",
            "build",
            "--out",
            str(tmp_path / "x"),
            "--tasks",
            str(tasks),
            "--home",
            str(home),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode != 0
    assert "no_such_task_anywhere" in failed.stderr
    assert not (tmp_path / "x").exists()
