"""A short, bounded history of what the labels showed, for the status page's charts.

The rolling error, the served coverage and the mean set size (or interval width) are numbers of
*now*; a chart needs them over time, whether or not anyone was watching. So each label join
records one `HistoryPoint` (the numbers after it, with the time, the labels joined so far, the
sample clock and the learning rate) into `History`, a ring of at most `capacity` points, one per
`spacing_s` at most: joins within one spacing replace the newest point, so it always holds the
latest numbers. When the ring is full every other point goes and the spacing doubles, so the
history always reaches back to the first labels this process joined, at a resolution that
coarsens as it grows (1,000 points at 1 s: about 17 minutes; at 64 s: about 18 hours).

It lives in the process only: a restart starts it empty, and each replica keeps its own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.calibration import Conformal
    from service.engine import Engine
    from service.feedback import RollingQuality

CAPACITY = 1000
SPACING_S = 1.0
# the served coverage a point holds: over the last this many labels (Conformal keeps 100 and 1000)
COVERAGE_WINDOW = 100


@dataclass(frozen=True)
class HistoryPoint:
    """The label loop's numbers at one moment; None where there is nothing to tell yet (no label,
    calibration off, no drift monitor for the sample clock)."""

    time: float
    labels: int
    samples: int | None
    rolling_error: float | None
    coverage: float | None
    size: float | None
    learning_rate: float


class History:
    """At most `capacity` points, at least `spacing_s` apart, oldest first; thread-safe.

    >>> history = History(capacity=4, spacing_s=1.0)
    >>> for t in [0.0, 0.5, 1.0, 2.0, 3.0, 4.0]:
    ...     history.record(HistoryPoint(t, int(t * 10), None, 0.1, 0.9, 1.5, 0.0))
    >>> [(p.time, p.labels) for p in history.points()], history.spacing_s
    ([(1.0, 10), (3.0, 30), (4.0, 40)], 2.0)
    """

    def __init__(self, capacity: int = CAPACITY, spacing_s: float = SPACING_S) -> None:
        if capacity < 2 or spacing_s <= 0:
            raise ValueError("a history needs a capacity of at least 2 points and a positive "
                             "spacing")
        self.capacity = capacity
        self.spacing_s = spacing_s
        self._points: list[HistoryPoint] = []
        self._opened = 0.0  # when the newest point's slot began: it takes joins until one spacing
        self._lock = threading.Lock()

    def record(self, point: HistoryPoint) -> None:
        with self._lock:
            if self._points and point.time - self._opened < self.spacing_s:
                self._points[-1] = point
                return
            if len(self._points) >= self.capacity:
                # of each pair (paired from the newest) the later stays: its numbers are newer
                self._points = self._points[len(self._points) % 2 + 1::2]
                self.spacing_s *= 2
            self._points.append(point)
            self._opened = point.time

    def points(self) -> list[HistoryPoint]:
        with self._lock:
            return list(self._points)


def point_now(quality: RollingQuality, conformal: Conformal | None, engine: Engine) -> HistoryPoint:
    """The numbers as they are now. Runs on the event loop: it reads the engine's clock and
    learning rate (plain numbers the engine thread writes) and never writes anything of it."""
    drift = engine.drift
    return HistoryPoint(
        time=time.time(),
        labels=quality.seen,
        samples=None if drift is None else drift.samples,
        rolling_error=quality.value,
        coverage=None if conformal is None else conformal.coverage(COVERAGE_WINDOW),
        size=None if conformal is None else conformal.mean_size,
        learning_rate=engine.adapter.learning_rate,
    )
