from __future__ import annotations

import threading
import time

from retrieval.rwlock import RWLock


def test_readers_share() -> None:
    lock = RWLock()
    inside = threading.Barrier(3, timeout=5)

    def reader() -> None:
        with lock.read():
            inside.wait()  # All three are inside at once, or this times out.

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


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
