"""Labels arriving later: the join with their predictions, and the rolling quality they reveal."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from service.calibration import STATE, SUMMARY, Conformal
from service.engine import Engine, Housekeeping, LabelledBatch
from service.gateway import StoreGateway, housekeep
from service.metrics import Metrics
from store import (
    JoinResult,
    LabelEffects,
    LabelValue,
    PartialJoin,
    PredictionRecord,
    StoreUnavailable,
)


class RollingQuality:
    """Error rate (classification) or mean absolute error (regression) over the last labels.

    A multi-output regressor's error is the mean absolute error over its outputs.

    >>> quality = RollingQuality("classification", window=3)
    >>> for prediction, label in [(1, 1), (2, 0), (3, 3), (4, 0)]:
    ...     quality.update(prediction, label)
    >>> quality.value, quality.count
    (0.6666666666666666, 3)
    >>> regression = RollingQuality("regression", window=3)
    >>> regression.update([1.0, 2.0], [2.0, 4.0]); regression.value
    1.5
    """

    def __init__(self, task: str, window: int) -> None:
        self.task = task
        self.errors: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.seen = 0
        self._lock = threading.Lock()

    def update(self, prediction: LabelValue, label: LabelValue) -> None:
        if self.task == "classification":
            error = float(int(prediction) != int(label))  # type: ignore[arg-type]
        else:
            error = float(np.mean(np.abs(np.asarray(prediction, np.float64)
                                         - np.asarray(label, np.float64))))
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
    """Joins labels to their predictions exactly once and feeds what the joins reveal onwards.

    The error memory's rows and the shared calibrator's new state are written by the join itself
    (`LabelEffects`), so a label's effects in the store land with it or not at all, and a label
    delivered again (an HTTP retry, a stream entry redelivered after a crash) is a duplicate that
    changes nothing. The in-process parts then learn on the engine thread: the error memory's
    index, the output corrector, the supervised step, the labelled drift detectors. Records made
    by another model version count towards quality, coverage and drift, not learning.
    """

    def __init__(self, store: StoreGateway, metrics: Metrics, quality: RollingQuality,
                 engine: Engine, persisted: frozenset[str] = frozenset(),
                 conformal: Conformal | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.quality = quality
        self.engine = engine
        self.persisted = persisted
        self.conformal = conformal

    async def apply(self, labels: Sequence[tuple[str, LabelValue]]) -> JoinResult:
        """Join validated labels. When the store is down: `StoreUnavailable`, nothing applied; or
        `PartialJoin` when it failed part-way, with the labels joined before applied."""
        compensation = self.engine.compensation
        stores_rows = compensation is not None and compensation.name in self.persisted
        calibrators = (STATE, SUMMARY) if self.conformal is not None else ()
        written: dict[str, bytes] = {}

        def effects(joined: list[PredictionRecord],
                    states: dict[str, bytes | None]) -> LabelEffects:
            """What the join writes with the labels: the error memory's rows, the calibrator."""
            out = LabelEffects()
            records = self._usable(joined)
            if stores_rows and records is not None:
                rows = self._compensation_rows(records)
                if rows is not None:
                    out.memories.append((compensation.name, rows, compensation.capacity))
            scorable = self._scorable(joined)
            if self.conformal is not None and scorable:
                out.calibrators = self.conformal.effects(
                    scorable, states, self.conformal.scores(scorable)).calibrators
                written.clear()
                written.update(out.calibrators)
            return out

        try:
            result = await self.store.call(
                "join_labels", self.store.store.join_labels, list(labels),
                effects if stores_rows or calibrators else None, calibrators)
        except PartialJoin as partial:
            await self._absorb(partial.result)  # joined before the failure: apply them, then report
            raise
        await self._absorb(result)
        if SUMMARY in written and self.conformal is not None:
            self.conformal.read_summary(written[SUMMARY])  # this replica just moved it
        return result

    def _scorable(self, joined: list[PredictionRecord]) -> list[PredictionRecord]:
        """Records whose outputs fit this model (an older model's may have other classes)."""
        width = self.engine.model.num_classes or self.engine.model.num_outputs
        return [r for r in joined if r.outputs.size == width]

    def _usable(self, joined: list[PredictionRecord]) -> list[PredictionRecord] | None:
        """The records this model made, with features: those the label path can learn from."""
        model = self.engine.model
        usable = [r for r in joined if r.model_version == model.version]
        return usable or None

    def _compensation_rows(self, records: list[PredictionRecord]) -> np.ndarray | None:
        compensation = self.engine.compensation
        if compensation is None or any(r.features is None for r in records):
            return None
        features = torch.from_numpy(np.stack([r.features for r in records]))
        base = torch.from_numpy(np.stack([r.arrays.get("base", r.outputs) for r in records]))
        labels = torch.from_numpy(self._labels(records))
        if self.engine.model.task == "classification":
            labels = labels.long()
        return compensation.pack(features, labels, base)

    def _labels(self, records: list[PredictionRecord]) -> np.ndarray:
        """Class indices (n,), or values (n, outputs) for a regressor."""
        if self.engine.model.task == "classification":
            return np.array([r.label for r in records], dtype=np.float32)
        return np.array([np.atleast_1d(r.label) for r in records], dtype=np.float32)

    async def _absorb(self, result: JoinResult) -> None:
        self._record(result)
        scorable = self._scorable(result.joined)
        if self.conformal is not None and scorable:
            self.conformal.observe(scorable, self.conformal.scores(scorable))
        errors = self._errors(scorable) if scorable else None
        records = self._usable(result.joined)
        if records is None:
            if errors is not None:
                work = await self.engine.run(self.engine.observe_errors, errors)
                await self._housekeep(work)
            return
        batch = LabelledBatch(labels=self._labels(records), errors=errors)
        if all(r.features is not None for r in records):
            batch.features = np.stack([r.features for r in records])
            batch.compensation_rows = self._compensation_rows(records)
        if self.engine.correction is not None:
            batch.raw = np.stack([r.arrays.get("raw", r.outputs) for r in records])
        if self.engine.supervised is not None and all("inputs" in r.arrays for r in records):
            batch.inputs = np.stack([r.arrays["inputs"] for r in records])
        await self._housekeep(await self.engine.run(self.engine.learn, batch))

    def _errors(self, records: list[PredictionRecord]) -> np.ndarray:
        """The labelled drift signal: 0/1 errors of the served class, or absolute residuals of
        the served values (the mean over a multi-output regressor's outputs)."""
        if self.engine.model.task == "classification":
            return np.array([float(int(r.prediction) != int(r.label))  # type: ignore[arg-type]
                             for r in records])
        served = np.stack([r.outputs for r in records]).astype(np.float64)
        return np.abs(self._labels(records).astype(np.float64) - served).mean(axis=1)

    async def _housekeep(self, work: Housekeeping) -> None:
        if not work:
            return
        try:
            await housekeep(self.store, work, self.persisted, self.conformal)
        except StoreUnavailable:
            pass  # the in-process state changed; the store catches up at the next trim or reset

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
            if self.engine.model.task == "classification" or record.outputs.size == 1:
                self.quality.update(record.prediction, record.label)
            else:
                self.quality.update(record.outputs.tolist(), record.label)
        value = self.quality.value
        if value is not None:
            self.metrics.rolling_error.set(value)
        self.metrics.rolling_labels.set(self.quality.count)
