"""Immutable snapshots of a demonstration store, for one writer and many read-only
replicas sharing a volume (deploy/README.md, "The demonstration store with several
replicas").

Layout of a store folder with snapshots (the live store stays at the top, see store.py):
- `snapshots/<id>/`: `demos.sqlite3` (rollback mode, never written again) and
  `index.faiss` (same generation), each fsynced before the folder is renamed into place.
- `CURRENT`: the id of the newest complete snapshot, switched atomically after it.

SQLite's locking is unreliable on network file systems, so a reader never opens a file
that is still being written: it opens what `CURRENT` names, immutable. A folder without
`CURRENT` is a flat store (the single-server layout), read as it is.

The writer (SnapshotPublisher) publishes from a background thread, at most once per
`min_interval` and never spending more than PUBLISH_MAX_SHARE of its time on it, so
writes are not slowed by copying a large store; the latest acknowledged state is always
published eventually. Readers (SnapshotFollower) poll `CURRENT` and swap a newly opened
snapshot in between requests.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from retrieval.durable import fsync_dir, replace_dir, write_atomic
from retrieval.store import DB_FILE, DemonstrationStore
from retrieval.store_db import read_metadata
from retrieval.store_types import StoreError

log = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
SNAPSHOTS_DIR = "snapshots"
# Publications being written: `snapshots/.tmp-*`. One writer holds the store's LOCK, so
# any such folder that is not its own publication in progress is a crash's leftover.
_TMP_PREFIX = ".tmp-"
_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,99}")

# At most one publication per this many seconds: bursts of writes share one copy.
PUBLISH_MIN_INTERVAL = 5.0
# ... and at most this share of the time spent publishing, for stores so large that a
# copy takes a while: the interval grows to last duration / share.
PUBLISH_MAX_SHARE = 0.1
# A replaced snapshot is kept this long (besides the current and the previous one, which
# are always kept): readers poll CURRENT every CROSSTASK_STORE_RELOAD_SECONDS (30 s by
# default), then open the new snapshot while still serving the old one.
DEFAULT_GRACE_SECONDS = 120.0


class SnapshotError(StoreError):
    """CURRENT or a snapshot cannot be used."""


def current_id(root: Path) -> str | None:
    """The snapshot id `root/CURRENT` names; None if there is no CURRENT (a flat store)."""
    try:
        text = (Path(root) / CURRENT_FILE).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"cannot read {Path(root) / CURRENT_FILE}: {exc}") from exc
    if not _ID.fullmatch(text):
        raise SnapshotError(f"{Path(root) / CURRENT_FILE} does not name a snapshot: {text[:80]!r}")
    return text


def snapshot_dir(root: Path, snapshot_id: str) -> Path:
    return Path(root) / SNAPSHOTS_DIR / snapshot_id


def resolve(root: Path) -> tuple[Path, str | None]:
    """What a reader opens: (the folder CURRENT names, its id), or (root, None) for a
    flat store."""
    found = current_id(root)
    return (Path(root), None) if found is None else (snapshot_dir(root, found), found)


def snapshot_metadata(folder: Path) -> dict[str, str]:
    """A snapshot's store metadata (store_uid, generation, ...); empty if unreadable."""
    return read_metadata(Path(folder) / DB_FILE, immutable=True)


def _new_id(generation: int) -> str:
    # Readable (when, which generation) and unique (a rebuilt store restarts generations).
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-g{generation}-{secrets.token_hex(3)}"


class SnapshotPublisher:
    """The writer's side: publishes the store as a new snapshot after writes, coalesced.

    `start()` subscribes to the store's writes and starts the publishing thread (and
    publishes at once if CURRENT does not show the store as it is); `close()` publishes
    what is still unpublished and stops it. `publish()` publishes synchronously.
    """

    def __init__(
        self,
        store: DemonstrationStore,
        root: Path | None = None,
        *,
        min_interval: float = PUBLISH_MIN_INTERVAL,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.root = Path(root if root is not None else store.path)
        self.min_interval = min_interval
        self.grace_seconds = grace_seconds
        self.published = 0
        self.last_seconds = 0.0
        self._clock = clock  # For the grace period only (tests move it).
        self._cond = threading.Condition()
        self._dirty = False
        self._stopping = False
        self._next_at = 0.0  # time.monotonic() before which the thread does not publish
        self._publish_lock = threading.Lock()
        try:
            self._current = current_id(self.root)
        except SnapshotError as exc:
            log.warning("%s; the next publication replaces it", exc)
            self._current = None
        self._previous: str | None = None
        # When prune() first saw each replaced snapshot: the grace period runs from then.
        self._seen: dict[str, float] = {}
        # When the next of them is due for deletion (clock time), so that the thread
        # deletes it then even if no write comes to trigger a publication.
        self._prune_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="snapshot-publisher", daemon=True)

    @property
    def current(self) -> str | None:
        return self._current

    def start(self) -> None:
        self.store.subscribe(self.notify)
        # Checked after subscribing, so a write in between is not missed either.
        if not self.up_to_date():
            self.notify()
        self._thread.start()

    def notify(self) -> None:
        """A write was acknowledged: publish (soon) a snapshot that includes it."""
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Publish what is unpublished (without waiting for the interval), then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def up_to_date(self) -> bool:
        """Whether CURRENT names a snapshot of this store at its present generation."""
        if self._current is None:
            return False
        recorded = snapshot_metadata(snapshot_dir(self.root, self._current))
        meta = self.store.metadata()
        return all(recorded.get(key) == meta.get(key) for key in ("store_uid", "generation"))

    def publish(self) -> str:
        """Write a new snapshot, switch CURRENT to it, prune old ones; return its id.

        A crash before the switch leaves the previous snapshot current and a complete
        but unnamed folder, which prune() removes after the grace period.
        """
        with self._publish_lock:
            started = time.monotonic()
            folder = self.root / SNAPSHOTS_DIR
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                fsync_dir(self.root)
            tmp = folder / f"{_TMP_PREFIX}{secrets.token_hex(6)}"
            tmp.mkdir()
            try:
                generation = self.store.snapshot(tmp)
                snapshot_id = _new_id(generation)
                replace_dir(tmp, folder / snapshot_id)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            write_atomic(self.root / CURRENT_FILE, lambda fh: fh.write(f"{snapshot_id}\n".encode()))
            self._previous, self._current = self._current, snapshot_id
            self.published += 1
            removed = self.prune()
            self.last_seconds = time.monotonic() - started
            with self._cond:
                self._next_at = time.monotonic() + max(
                    self.min_interval, self.last_seconds / PUBLISH_MAX_SHARE
                )
                self._cond.notify_all()  # The thread's next prune may have moved.
        log.info(
            "Published store snapshot %s (%d demonstrations) in %.2f s%s",
            snapshot_id,
            self.store.count(),
            self.last_seconds,
            f"; removed {len(removed)} old" if removed else "",
        )
        return snapshot_id

    def prune(self) -> list[str]:
        """Delete snapshots other than the current and the previous one once they have
        been replaced for `grace_seconds` (readers may still have them open), and any
        leftover of a publication that crashed. Returns the snapshot ids deleted."""
        folder = self.root / SNAPSHOTS_DIR
        if not folder.is_dir():
            return []
        now = self._clock()
        keep = {self._current, self._previous}
        removed: list[str] = []
        present: set[str] = set()
        for entry in folder.iterdir():
            name = entry.name
            if name.startswith("."):
                # Not a publication in progress: those run under _publish_lock, as we do.
                shutil.rmtree(entry, ignore_errors=True)
                continue
            present.add(name)
            if name in keep or not entry.is_dir():
                continue
            if now - self._seen.setdefault(name, now) >= self.grace_seconds:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(name)
        self._seen = {k: v for k, v in self._seen.items() if k in present and k not in removed}
        waiting = [v for k, v in self._seen.items() if k not in keep]
        self._prune_at = min(waiting) + self.grace_seconds if waiting else None
        return removed

    def _prune_wait(self) -> float | None:
        """Seconds until a replaced snapshot is due for deletion; None if none waits."""
        return None if self._prune_at is None else max(0.0, self._prune_at - self._clock())

    def _run(self) -> None:
        while True:
            with self._cond:
                # Sleep until a write, close(), or a replaced snapshot's grace period ends.
                while not self._dirty and not self._stopping and self._prune_wait() != 0.0:
                    self._cond.wait(self._prune_wait())
                if not self._dirty and self._stopping:
                    return  # Everything is published.
                publishing = self._dirty
                # Coalesce: writes until the interval is over join this publication.
                while publishing and not self._stopping:
                    wait = self._next_at - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                # Cleared before the copy pins the database: a write acknowledged after
                # the pin sets it again and gets its own publication.
                self._dirty = False
                stopping = self._stopping
            if not publishing:
                self._prune_alone()
                continue
            try:
                self.publish()
            except Exception:
                log.exception(
                    "Publishing a store snapshot failed; readers keep the previous one"
                    + ("" if stopping else f"; retrying in {self.min_interval:.0f} s")
                )
                if stopping:
                    return
                with self._cond:
                    self._dirty = True
                    self._next_at = time.monotonic() + self.min_interval

    def _prune_alone(self) -> None:
        with self._publish_lock:
            try:
                self.prune()
            except OSError:
                log.exception("Removing old store snapshots failed; retrying later")
                self._prune_at = self._clock() + self.grace_seconds


class SnapshotFollower:
    """The reader's side: polls CURRENT and hands each new snapshot, opened in a thread,
    to `swap` on the event loop. A snapshot that cannot be opened is logged and skipped:
    the reader keeps serving the one it has."""

    def __init__(
        self,
        root: Path,
        serving: str | None,
        open_snapshot: Callable[[Path], DemonstrationStore],
        seconds: float,
    ) -> None:
        self.root = Path(root)
        self.serving = serving  # The snapshot id in use; None for a flat store.
        self.open_snapshot = open_snapshot
        self.seconds = seconds
        self._failed: str | None = None
        self._problem: str | None = None

    async def run(self, swap: Callable[[DemonstrationStore], None]) -> None:
        while True:
            await asyncio.sleep(self.seconds)
            try:
                await self.check(swap)
            except Exception:  # Polling must outlive any one bad look at the folder.
                log.exception("Checking %s for a new store snapshot failed", self.root)

    async def check(self, swap: Callable[[DemonstrationStore], None]) -> bool:
        """Swap in the snapshot CURRENT names if it is new; True if it was swapped in."""
        try:
            # A file read, but on a network file system it can stall: not on the loop.
            wanted = await asyncio.to_thread(current_id, self.root)
        except SnapshotError as exc:
            if str(exc) != self._problem:
                log.warning("%s; still serving snapshot %s", exc, self.serving)
                self._problem = str(exc)
            return False
        self._problem = None
        if wanted is None or wanted == self.serving or wanted == self._failed:
            return False
        opening = asyncio.ensure_future(
            asyncio.to_thread(self.open_snapshot, snapshot_dir(self.root, wanted))
        )
        try:
            store = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Shutting down mid-open: close the store when the thread is done with it.
            opening.add_done_callback(_close_result)
            raise
        except Exception:
            log.exception(
                "Cannot open store snapshot %s; skipping it, still serving %s",
                wanted,
                self.serving or "the flat store",
            )
            self._failed = wanted
            return False
        swap(store)
        log.info(
            "Store snapshot %s swapped in (%d demonstrations; was %s)",
            wanted,
            store.count(),
            self.serving or "the flat store",
        )
        self.serving = wanted
        return True


def _close_result(future: asyncio.Future[DemonstrationStore]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
