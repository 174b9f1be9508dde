"""The grid's one progress display: runs done / running / failed / queued and an estimate of the time left,
one line whenever a run ends, whichever executor trains them."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class GridProgress:
    """Counts the grid's runs by state. The estimate is the rate at which runs have ended so far (runs per
    second over the whole grid, so parallel executors count as such) applied to the runs not yet ended."""

    def __init__(self, done: int, queued: int, echo: Callable[[str], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.done, self.queued, self.running, self.failed = done, queued, 0, 0
        self._ended, self._echo, self._clock, self._start = 0, echo, clock, clock()

    def started(self, _job: Any = None) -> None:
        self.queued -= 1
        self.running += 1

    def finished(self, failed: bool) -> None:
        self.running -= 1
        self._ended += 1
        if failed:
            self.failed += 1
        else:
            self.done += 1
        self._echo(self.line())

    def line(self) -> str:
        counts = f"grid: {self.done} done, {self.running} running, {self.failed} failed, {self.queued} queued"
        left = self.running + self.queued
        if not left or not self._ended:
            return counts
        rate = self._ended / max(self._clock() - self._start, 1e-9)
        return f"{counts}; about {_duration(left / rate)} left (estimate)"
