"""Kill a writing process at a random moment; every acknowledged add must survive and
the add in flight must be wholly there or wholly absent."""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import retrieval
from retrieval.store import DB_FILE, DemonstrationStore

DIM = 16
BATCH = 200

WRITER = """
import sys
import numpy as np
from retrieval import store as m
from retrieval.store_types import NewDemo

m.PERSIST_MIN_CHANGES = 300  # Persist the index often, so kills land mid-persist too.
path, kind, seed, run, dim, size = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
store = m.DemonstrationStore.open(path, dim, kind)
rng = np.random.default_rng(seed)
print("ready", flush=True)
batch = 0
while True:
    v = rng.standard_normal((size, dim)).astype("float32")
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    records = [
        NewDemo(task=f"t{batch % 3}", input=f"r{run} b{batch} i{i}", output="o")
        for i in range(size)
    ]
    ids = store.add(records, v)
    print(f"ack {batch} {ids[0]} {ids[-1]}", flush=True)
    batch += 1
"""


def _run_and_kill(path: Path, kind: str, seed: int, run: int) -> list[tuple[int, str, str]]:
    env = {**os.environ, "PYTHONPATH": str(Path(retrieval.__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), kind, str(seed), str(run), str(DIM), str(BATCH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    acked = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("ack"):
                acked.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not acked.wait(120):
        proc.kill()
        pytest.fail(f"writer never acknowledged: {proc.stderr.read() if proc.stderr else ''}")
    # A random moment: mid-commit, mid-index-update, mid-persist or between adds.
    time.sleep(random.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    reader.join(10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    acks = []
    for line in lines[1:]:
        match = re.fullmatch(r"ack (\d+) (\S+) (\S+)", line)
        if match:  # A line cut short by the kill is no acknowledgement.
            acks.append((int(match[1]), match[2], match[3]))
    return acks


@pytest.mark.parametrize(("kind", "seed"), [("flat", 1), ("ivf", 2), ("hnsw", 3)])
def test_sigkill_during_adds_loses_nothing_acknowledged(
    tmp_path: Path, kind: str, seed: int
) -> None:
    path = tmp_path / "store"
    acks: dict[int, list[tuple[int, str, str]]] = {}
    # Two runs: the second starts from whatever the first left (index file included).
    for run in range(2):
        acks[run] = _run_and_kill(path, kind, seed * 10 + run, run)

    with sqlite3.connect(path / DB_FILE) as conn:
        inputs = [r[0] for r in conn.execute("SELECT input FROM demos")]
    rows = Counter(tuple(map(int, re.findall(r"\d+", s)[:2])) for s in inputs)
    for run, run_acks in acks.items():
        present = sorted(b for (r, b) in rows if r == run)
        last_acked = run_acks[-1][0]
        # Every acknowledged batch is there; at most the one in flight beyond them.
        assert present == list(range(len(present)))
        assert last_acked + 1 <= len(present) <= last_acked + 2
        for batch in present:
            assert rows[(run, batch)] == BATCH, f"run {run} batch {batch} is torn"

    with DemonstrationStore.open(path, DIM, kind) as store:
        assert store.count() == len(inputs)
        for _, first, last in acks[0] + acks[1]:
            assert len(store.get([first, last])) == 2, f"acknowledged {first}..{last} lost"
        probe = np.ones(DIM, dtype=np.float32)
        assert len(store.search(probe, 10, min_score=-1.0, exclude_tasks=["t0"])) == 10
