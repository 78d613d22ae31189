from __future__ import annotations

import threading
import time

from retrieval.rwlock import RWLock


def test_readers_share() -> None:
    lock = RWLock()
    readers = 3
    # Each reader waits inside the lock for all the others, so the barrier opens only when
    # every reader holds the lock at once; a lock that lets one in at a time breaks it.
    inside = threading.Barrier(readers, timeout=5)
    through: list[int] = []
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        # A thread's exception never reaches pytest: it is handed to the main thread here.
        try:
            with lock.read():
                inside.wait()
            through.append(i)
        except BaseException as exc:
            errors.append(exc)

    # Daemon threads: one stuck for good in the lock cannot keep the test run from exiting.
    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not [t.name for t in threads if t.is_alive()], "readers still blocked in the lock"
    assert errors == [], f"the readers were not all inside at once: {errors!r}"
    assert sorted(through) == list(range(readers))


def test_writer_excludes_readers_and_is_not_starved() -> None:
    lock = RWLock()
    events: list[str] = []
    reader_in = threading.Event()
    release_reader = threading.Event()

    def long_reader() -> None:
        with lock.read():
            reader_in.set()
            release_reader.wait(5)
            events.append("reader1 out")

    def writer() -> None:
        with lock.write():
            events.append("writer")

    def late_reader() -> None:
        with lock.read():
            events.append("reader2")

    first = threading.Thread(target=long_reader)
    first.start()
    reader_in.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.05)  # The writer is now waiting for reader1.
    late = threading.Thread(target=late_reader)
    late.start()
    time.sleep(0.05)
    assert events == []  # The late reader queues behind the waiting writer.
    release_reader.set()
    for t in (first, w, late):
        t.join(5)
    assert events == ["reader1 out", "writer", "reader2"]
