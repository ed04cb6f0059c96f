"""From a batch of inputs to per-sample predictions with records kept for the labels to come."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.calibration import Conformal
from service.engine import BatchOutput, Engine
from service.gateway import StoreGateway
from service.metrics import Metrics
from service.state_sync import StateSync
from store import PredictionRecord, StoreUnavailable

# one group (or None) per sample, as the requests named them, or None for none at all
Groups = Sequence[str | None] | None


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

    def __init__(self, engine: Engine, sync: StateSync, store: StoreGateway, metrics: Metrics,
                 conformal: Conformal | None = None) -> None:
        self.engine = engine
        self.sync = sync
        self.store = store
        self.metrics = metrics
        self.conformal = conformal

    async def run_batch(self, inputs: np.ndarray, ids: list[str],
                        groups: Groups = None) -> list[PredictionRow]:
        """`groups`: the group each sample's request named (conformal.mondrian = 'group')."""
        return await self._run(inputs, ids, groups, adapt=True)

    async def run_alone(self, inputs: np.ndarray, ids: list[str],
                        groups: Groups = None) -> list[PredictionRow]:
        """The fallback for a failed batch: the same model, no adaptation step."""
        return await self._run(inputs, ids, groups, adapt=False)

    async def _run(self, inputs: np.ndarray, ids: list[str], groups: Groups,
                   adapt: bool) -> list[PredictionRow]:
        # the shared threshold is read while the model runs
        refresh = None if self.conformal is None else self.conformal.refresh_soon()
        try:
            out = await self.sync.run(self.engine.forward, inputs, adapt, groups)
        except BaseException:
            if refresh is not None:
                refresh.cancel()
                await asyncio.gather(refresh, return_exceptions=True)
            raise
        if refresh is not None:
            await refresh
        return await self._finish(out, ids, groups)

    async def _finish(self, out: BatchOutput, ids: list[str],
                      groups: Groups = None) -> list[PredictionRow]:
        model = self.engine.model
        task = model.task
        sets: list | None = None
        intervals: list | None = None
        extra: dict = {}
        served: list | None = None
        level = None
        if self.conformal is not None:
            # the label-free signal (None unless the method reads one) and the threshold it
            # gets are kept in the record: the join learns from them, coverage measures them
            signal = self.conformal.signal(out.entropy)
            sets, intervals = self.conformal.shape(out.outputs, signal, groups)
            # one threshold per row (per class with Mondrian by class), kept with its group
            served = self.conformal.thresholds(len(ids), signal, groups)
            if signal is not None:
                extra["signal"] = signal
            level = 1 - self.conformal.alpha
        now = time.time()
        if out.served is not None:
            extra["served"] = list(out.served)
        # the features only where a label will learn from them: a demo record is about a quarter
        # smaller without (the in-process store keeps up to store.max_records of them)
        features = out.features if out.keep_features else None
        records = [
            PredictionRecord(
                id=sample_id,
                created_at=now,
                prediction=float(out.predictions[i]),
                outputs=out.outputs[i],
                features=None if features is None else features[i],
                model_version=model.version,
                adapter_version=out.adapter_version,
                arrays={name: values[i] for name, values in out.arrays.items()},
                extra=extra if served is None else {
                    **extra, "q": served[i],
                    **({} if groups is None or groups[i] is None else {"group": groups[i]}),
                    **({} if sets is None else {"set": sets[i]})},
            )
            for i, sample_id in enumerate(ids)
        ]
        try:
            await self.store.put_predictions(records)
        except StoreUnavailable:
            # predictions go on without the store; their labels will count as unknown
            pass
        self.metrics.predictions.inc(len(ids))
        return [
            PredictionRow(
                id=sample_id,
                prediction=task.prediction(out.outputs[i], float(out.predictions[i])),
                probabilities=task.probabilities(out.outputs[i]),
                set=None if sets is None else sets[i],
                interval=None if intervals is None else intervals[i],
                level=level,
                model_version=model.version,
                adapter_version=out.adapter_version,
            )
            for i, sample_id in enumerate(ids)
        ]
