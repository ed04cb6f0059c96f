"""Labels arriving later: the join with their predictions, and the rolling quality they reveal."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from service.calibration import Conformal
from service.engine import BEFORE_CORRECTOR, BEFORE_ERROR_MEMORY, INPUTS, Engine, LabelledBatch
from service.gateway import StoreGateway
from service.metrics import Metrics
from service.state_sync import StateSync
from store import (
    JoinResult,
    LabelEffects,
    LabelValue,
    PartialJoin,
    PredictionRecord,
)


class RollingQuality:
    """The mean of the last `window` errors a label revealed: the error rate (classification) or
    the mean absolute error (regression; over its outputs for a multi-output regressor).

    >>> quality = RollingQuality(window=3)
    >>> quality.extend([0.0, 1.0, 0.0, 1.0])
    >>> quality.value, quality.count
    (0.6666666666666666, 3)
    """

    def __init__(self, window: int) -> None:
        self.errors: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.seen = 0
        self._lock = threading.Lock()

    def extend(self, errors: Iterable[float]) -> None:
        with self._lock:
            for error in errors:
                if len(self.errors) == self.errors.maxlen:
                    self.total -= self.errors[0]
                self.errors.append(float(error))
                self.total += float(error)
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
    """Joins labels to their predictions exactly once and feeds what the joins reveal onwards.

    The error memory's rows and the shared calibrator's new state are written by the join itself
    (`LabelEffects`), so a label's effects in the store land with it or not at all, and a label
    delivered again (an HTTP retry, a stream entry redelivered after a crash) is a duplicate that
    changes nothing. The in-process parts then learn on the engine thread: the error memory's
    index, the output corrector, the supervised step, the labelled drift detectors. Records made
    by another model version count towards quality, coverage and drift, not learning.
    """

    def __init__(self, store: StoreGateway, sync: StateSync, metrics: Metrics,
                 quality: RollingQuality, engine: Engine, persisted: frozenset[str] = frozenset(),
                 conformal: Conformal | None = None) -> None:
        self.store = store
        self.sync = sync
        self.metrics = metrics
        self.quality = quality
        self.engine = engine
        self.task = engine.task
        self.persisted = persisted
        self.conformal = conformal

    async def apply(self, labels: Sequence[tuple[str, LabelValue]]) -> JoinResult:
        """Join validated labels. When the store is down: `StoreUnavailable`, nothing applied; or
        `PartialJoin` when it failed part-way, with the labels joined before applied."""
        memory = self.engine.error_memory
        stores_rows = memory is not None and memory.name in self.persisted
        conformal = self.conformal
        written: dict[str, bytes] = {}

        def effects(joined: list[PredictionRecord],
                    states: dict[str, bytes | None]) -> LabelEffects:
            """What the join writes with the labels: the error memory's rows, the calibrator."""
            out = LabelEffects()
            records = self._usable(joined)
            if memory is not None and stores_rows and records:
                rows = self._error_memory_rows(records)
                if rows is not None:
                    out.memories.append((memory.name, rows, memory.capacity))
            scorable = self._scorable(joined)
            if conformal is not None and scorable:
                out.calibrators = conformal.effects(scorable, states)
                written.clear()
                written.update(out.calibrators)
            return out

        calibrators = () if conformal is None else conformal.names
        try:
            result = await self.store.join_labels(
                list(labels), effects if stores_rows or calibrators else None, calibrators)
        except PartialJoin as partial:
            await self._absorb(partial.result)  # joined before the failure: apply them, then report
            raise
        await self._absorb(result)
        if conformal is not None:
            conformal.adopt(written)  # this replica just moved the threshold
        return result

    def _scorable(self, joined: list[PredictionRecord]) -> list[PredictionRecord]:
        """Records whose outputs fit this model (an older model's may have other classes)."""
        width = self.engine.model.num_classes or self.engine.model.num_outputs
        return [r for r in joined if r.outputs.size == width]

    def _usable(self, joined: list[PredictionRecord]) -> list[PredictionRecord]:
        """The records this model made: those the label path can learn from."""
        return [r for r in joined if r.model_version == self.engine.model.version]

    def _error_memory_rows(self, records: list[PredictionRecord]) -> np.ndarray | None:
        memory = self.engine.error_memory
        if memory is None or any(r.features is None for r in records):
            return None
        features = torch.from_numpy(np.stack([r.features for r in records]))  # type: ignore
        before = torch.from_numpy(np.stack([r.arrays.get(BEFORE_ERROR_MEMORY, r.outputs)
                                            for r in records]))
        labels = self.task.record_labels(records)
        return memory.pack(features, torch.from_numpy(labels), before)

    async def _absorb(self, result: JoinResult) -> None:
        scorable = self._scorable(result.joined)
        errors = self.task.errors(scorable) if scorable else None
        self._record(result, errors)
        if self.conformal is not None:
            self.conformal.observe(scorable)
        records = self._usable(result.joined)
        if not records:
            if errors is not None:
                await self.sync.run(self.engine.observe_errors, errors)
            return
        batch = LabelledBatch(labels=self.task.record_labels(records),
                              errors=errors)
        if all(r.features is not None for r in records):
            batch.features = np.stack([r.features for r in records])  # type: ignore[misc]
            batch.error_memory_rows = self._error_memory_rows(records)
        if self.engine.output_corrector is not None:
            batch.before_corrector = np.stack([r.arrays.get(BEFORE_CORRECTOR, r.outputs)
                                               for r in records])
        if self.engine.supervised is not None and all(INPUTS in r.arrays for r in records):
            batch.inputs = np.stack([r.arrays[INPUTS] for r in records])
        await self.sync.run(self.engine.learn, batch)

    def _record(self, result: JoinResult, errors: np.ndarray | None) -> None:
        m = self.metrics.labels
        m.labels("joined").inc(len(result.joined))
        m.labels("unknown").inc(len(result.unknown))
        m.labels("duplicate").inc(len(result.duplicate))
        m.labels("expired").inc(len(result.expired))
        now = time.time()
        for record in result.joined:
            lag = (record.labelled_at or now) - record.created_at
            self.metrics.label_lag.observe(max(0.0, lag))
        if errors is not None:
            self.quality.extend(errors.tolist())
        value = self.quality.value
        if value is not None:
            self.metrics.rolling_error.set(value)
        self.metrics.rolling_labels.set(self.quality.count)
