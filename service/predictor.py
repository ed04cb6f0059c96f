"""From a batch of inputs to per-sample predictions with records kept for the labels to come."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import SupportsIndex, overload

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


# the response header that says a prediction's records may not have reached the store (it refused
# them, was down, or did not answer in time: a write that timed out may still land later), so
# labels sent for those ids will most likely come back `unknown`
RECORDED_HEADER = "Adaptd-Recorded"


class PredictionRows(list[PredictionRow]):
    """A batch's rows, and whether the store took their records (`recorded`); a slice (the rows
    of one of the batch's requests, as the batcher hands them back) says the same."""

    def __init__(self, rows: Iterable[PredictionRow] = (), recorded: bool = True) -> None:
        super().__init__(rows)
        self.recorded = recorded

    @overload
    def __getitem__(self, index: SupportsIndex) -> PredictionRow: ...

    @overload
    def __getitem__(self, index: slice) -> PredictionRows: ...

    def __getitem__(self, index: SupportsIndex | slice) -> PredictionRow | PredictionRows:
        if isinstance(index, slice):
            return PredictionRows(super().__getitem__(index), self.recorded)
        return super().__getitem__(index)


# the header as the OpenAPI schema describes it, for every route that predicts
RECORDED_HEADER_SCHEMA = {RECORDED_HEADER: {
    "description": "`false` when the store refused these predictions' records or did not answer "
                   "in time (Redis full, down, or too slow): their labels will most likely come "
                   "back unknown",
    "schema": {"type": "string", "enum": ["false"]}}}


def recorded_headers(rows: Sequence[PredictionRow]) -> dict[str, str]:
    """The response's headers for its rows: `Adaptd-Recorded: false` where the store did not
    take their records, none otherwise."""
    return {} if getattr(rows, "recorded", True) else {RECORDED_HEADER: "false"}


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
                        groups: Groups = None) -> PredictionRows:
        """`groups`: the group each sample's request named (conformal.mondrian = 'group')."""
        return await self._run(inputs, ids, groups, adapt=True)

    async def run_alone(self, inputs: np.ndarray, ids: list[str],
                        groups: Groups = None) -> PredictionRows:
        """The fallback for a failed batch: the same model, no adaptation step."""
        return await self._run(inputs, ids, groups, adapt=False)

    async def _run(self, inputs: np.ndarray, ids: list[str], groups: Groups,
                   adapt: bool) -> PredictionRows:
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
                      groups: Groups = None) -> PredictionRows:
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
        recorded = True
        try:
            await self.store.put_predictions(records)
        except StoreUnavailable:
            # predictions go on without the store; their labels will count as unknown, and the
            # response says so (`recorded_headers`)
            recorded = False
        self.metrics.predictions.inc(len(ids))
        return PredictionRows((
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
        ), recorded)
