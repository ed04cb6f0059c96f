"""From a batch of inputs to per-sample predictions with records kept for the labels to come."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service.calibration import SUMMARY, Conformal
from service.engine import BatchOutput, Engine, Housekeeping
from service.gateway import StoreGateway, housekeep
from service.metrics import Metrics
from store import PredictionRecord, StoreUnavailable

T = TypeVar("T")


@dataclass
class PredictionRow:
    id: str
    prediction: int | float | list[float]
    probabilities: list[float] | None
    set: list[int] | None
    interval: list[float] | list[list[float]] | None
    level: float | None
    model_version: str
    adapter_version: int


class Predictor:
    """Runs batches on the engine, keeps a record per sample, and shapes the rows."""

    def __init__(self, engine: Engine, store: StoreGateway, metrics: Metrics,
                 persisted: frozenset[str] = frozenset(),
                 conformal: Conformal | None = None) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.persisted = persisted  # the memories whose rows live in the store
        self.conformal = conformal

    async def _calibrated(self, outputs: np.ndarray,
                          summary: asyncio.Future[bytes | None] | None
                          ) -> tuple[list | None, list | None]:
        """Sets or intervals at the shared calibrator's current threshold (the last one read
        when the store does not answer)."""
        assert self.conformal is not None
        if summary is not None:
            try:
                self.conformal.read_summary(await summary)
            except StoreUnavailable:
                pass
        return self.conformal.shape(outputs)

    async def run_batch(self, inputs: np.ndarray, ids: list[str]) -> list[PredictionRow]:
        return await self._run(inputs, ids, adapt=True)

    async def run_alone(self, inputs: np.ndarray, ids: list[str]) -> list[PredictionRow]:
        """The fallback for a failed batch: the same model, no adaptation step."""
        return await self._run(inputs, ids, adapt=False)

    async def _run(self, inputs: np.ndarray, ids: list[str], adapt: bool) -> list[PredictionRow]:
        summary = self._read_summary()  # while the model runs
        try:
            out = await self.engine.predict(inputs, adapt=adapt)
        except BaseException:
            if summary is not None:
                summary.cancel()
                await asyncio.gather(summary, return_exceptions=True)
            raise
        return await self._finish(out, ids, summary)

    def _read_summary(self) -> asyncio.Future[bytes | None] | None:
        """Start reading the shared calibrator's threshold, to overlap with the forward pass."""
        if self.conformal is None:
            return None
        return asyncio.ensure_future(self.store.call(
            "load_calibrator", self.store.store.load_calibrator, SUMMARY))

    async def _persist_memory(self, out: BatchOutput) -> None:
        """Share what the memories learned: reset ones are cleared in the store, AdaNPC's new rows
        go to it, trimmed ones are trimmed there, for replicas and restarts (a failure loses them
        only there; the in-process memory keeps them). The error memory's rows reach the store
        with their labels."""
        work = out.housekeeping
        try:
            await housekeep(self.store, Housekeeping(cleared=work.cleared), self.persisted,
                            self.conformal)
            memory = self.engine.memory
            if (memory is not None and memory.name in self.persisted
                    and out.memory_rows is not None and len(out.memory_rows)):
                await self.store.call("append_memory", self.store.store.append_memory,
                                      memory.name, out.memory_rows, memory.capacity)
            await housekeep(self.store, Housekeeping(trimmed=work.trimmed,
                                                     calibrator_reset=work.calibrator_reset),
                            self.persisted, self.conformal)
        except StoreUnavailable:
            pass

    async def _finish(self, out: BatchOutput, ids: list[str],
                      summary: asyncio.Future[bytes | None] | None = None
                      ) -> list[PredictionRow]:
        model = self.engine.model
        sets: list | None = None
        intervals: list | None = None
        extra: dict = {}
        if self.conformal is not None:
            sets, intervals = await self._calibrated(out.outputs, summary)
            extra = {"q": self.conformal.threshold}
        now = time.time()
        records = [
            PredictionRecord(
                id=sample_id,
                created_at=now,
                prediction=float(out.predictions[i]),
                outputs=out.outputs[i],
                features=None if out.features is None else out.features[i],
                model_version=model.version,
                adapter_version=out.adapter_version,
                arrays={name: values[i] for name, values in out.arrays.items()},
                extra=extra if sets is None else {**extra, "set": sets[i]},
            )
            for i, sample_id in enumerate(ids)
        ]
        try:
            await self.store.call("put_predictions", self.store.store.put_predictions, records)
        except StoreUnavailable:
            # predictions go on without the store; their labels will count as unknown
            pass
        await self._persist_memory(out)
        self.metrics.predictions.inc(len(ids))
        classification = model.task == "classification"
        rows = []
        for i, sample_id in enumerate(ids):
            values = out.outputs[i].tolist()
            if classification:
                prediction: int | float | list[float] = int(out.predictions[i])
            else:
                prediction = values[0] if len(values) == 1 else values
            rows.append(PredictionRow(
                id=sample_id,
                prediction=prediction,
                probabilities=values if classification else None,
                set=None if sets is None else sets[i],
                interval=None if intervals is None else intervals[i],
                level=None if self.conformal is None else 1 - self.conformal.alpha,
                model_version=model.version,
                adapter_version=out.adapter_version,
            ))
        return rows
