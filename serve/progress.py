"""The one progress display of the command line (batch jobs, store builds, adapter training):
a tqdm bar on a terminal, a log line every `period` seconds elsewhere (a Kubernetes Job's
log), each with the rate and, once the total is known, an ETA."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("crosstask")


class ProgressBar:
    def __init__(
        self,
        label: str,
        unit: str,
        total: int | None = None,
        initial: int = 0,
        enabled: bool = True,
        period: float = 30.0,
    ) -> None:
        self.label = label
        self.unit = unit
        self.total = total
        self.done = initial
        self.period = period
        self.enabled = enabled
        self._initial = initial
        self.started = time.monotonic()
        self._last_log = self.started
        self._postfix: dict[str, str] = {}
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=label, unit=unit, dynamic_ncols=True
            )

    def set_total(self, total: int) -> None:
        """The total, when it is known only after the work began."""
        self.total = max(total, self.done)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far (this run's: work resumed from `initial` is not
        counted as speed); None without a total or before any progress."""
        elapsed = time.monotonic() - self.started
        progressed = self.done - self._initial
        if self.total is None or progressed <= 0 or elapsed <= 0:
            return None
        return max(self.total - self.done, 0) / (progressed / elapsed)

    def advance(self, count: int = 1, postfix: Mapping[str, str] | None = None) -> None:
        self.done += count
        if postfix is not None:
            self._postfix = dict(postfix)
        if self._bar is not None:
            self._bar.update(count)
            if self._postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            return
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if self.enabled and (now - self._last_log >= self.period or finished):
            self._last_log = now
            log.info("%s", self.describe())

    def describe(self) -> str:
        """One line: `label: done[/total] unit, key value..., elapsed, ETA`."""
        elapsed = time.monotonic() - self.started
        total = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.label}: {self.done}{total} {self.unit}"]
        parts += [f"{key} {value}" for key, value in self._postfix.items()]
        parts.append(f"{elapsed:.0f} s elapsed")
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"ETA {eta:.0f} s")
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
