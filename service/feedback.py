"""Labels arriving later: the join with their predictions, and the rolling quality they reveal."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

from service.gateway import StoreGateway
from service.metrics import Metrics
from store import JoinResult, PartialJoin, PredictionRecord


class RollingQuality:
    """Error rate (classification) or mean absolute error (regression) over the last labels.

    >>> quality = RollingQuality("classification", window=3)
    >>> for prediction, label in [(1, 1), (2, 0), (3, 3), (4, 0)]:
    ...     quality.update(prediction, label)
    >>> quality.value, quality.count
    (0.6666666666666666, 3)
    """

    def __init__(self, task: str, window: int) -> None:
        self.task = task
        self.errors: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.seen = 0
        self._lock = threading.Lock()

    def update(self, prediction: float, label: float) -> None:
        if self.task == "classification":
            error = float(int(prediction) != int(label))
        else:
            error = abs(float(prediction) - float(label))
        with self._lock:
            if len(self.errors) == self.errors.maxlen:
                self.total -= self.errors[0]
            self.errors.append(error)
            self.total += error
            self.seen += 1
            if self.seen % 4096 == 0:  # re-sum now and then so float drift never accumulates
                self.total = float(sum(self.errors))

    @property
    def count(self) -> int:
        return len(self.errors)

    @property
    def value(self) -> float | None:
        with self._lock:
            return self.total / len(self.errors) if self.errors else None


class FeedbackService:
    """Joins labels to their predictions exactly once and feeds what the joins reveal onwards."""

    def __init__(self, store: StoreGateway, metrics: Metrics, quality: RollingQuality) -> None:
        self.store = store
        self.metrics = metrics
        self.quality = quality

    async def apply(self, labels: Sequence[tuple[str, float]]) -> JoinResult:
        """Join validated labels. When the store is down: `StoreUnavailable`, nothing applied; or
        `PartialJoin` when it failed part-way, with the labels joined before applied."""
        try:
            result = await self.store.call("join_labels", self.store.store.join_labels,
                                           list(labels))
        except PartialJoin as partial:
            self._record(partial.result)  # joined before the failure: apply them, then report
            raise
        self._record(result)
        return result

    def _record(self, result: JoinResult) -> None:
        self._account(result.joined)
        m = self.metrics.labels
        m.labels("joined").inc(len(result.joined))
        m.labels("unknown").inc(len(result.unknown))
        m.labels("duplicate").inc(len(result.duplicate))
        m.labels("expired").inc(len(result.expired))

    def _account(self, joined: list[PredictionRecord]) -> None:
        now = time.time()
        for record in joined:
            lag = (record.labelled_at or now) - record.created_at
            self.metrics.label_lag.observe(max(0.0, lag))
            self.quality.update(record.prediction, record.label)
        value = self.quality.value
        if value is not None:
            self.metrics.rolling_error.set(value)
        self.metrics.rolling_labels.set(self.quality.count)
