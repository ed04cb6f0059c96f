"""Labels arriving later: the join with their predictions, and the rolling quality they reveal."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from service.calibration import Conformal
from service.engine import (
    BEFORE_CORRECTOR,
    BEFORE_ERROR_MEMORY,
    BEFORE_RUNS,
    EPOCH,
    INPUTS,
    LEARNER_ASLEEP,
    MIXTURE_RATES,
    RUNS_PLACE,
    SOURCE_OUTPUTS,
    Engine,
    LabelledBatch,
    candidate_array,
)
from service.gateway import StoreGateway
from service.history import History, point_now
from service.metrics import Metrics
from service.state_sync import StateSync
from store import (
    JoinResult,
    LabelEffects,
    LabelValue,
    PartialJoin,
    PredictionRecord,
)

log = logging.getLogger("adaptd.feedback")

# how many rejected ids (with their reasons) one log line names
LOGGED_REJECTIONS = 5
# labels one of River's learners takes in one engine job (`FeedbackService._learn_online`)
ONLINE_SLICE = 256


# a record that does not say which process served it at what sample clock (the drift policy off
# when it was served, or, before stop 38, its judge off; or a record from before the judge existed)
NOT_SERVED_HERE = (math.nan, math.nan)


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

    A label whose effects cannot be computed from its record (outputs, features or stored arrays
    that are not finite; a conformal score or an error-memory row that cannot be computed) is
    *rejected*, record by record: the join leaves its record unlabelled and joins the others, so
    one bad record never blocks the labels sent with it.
    """

    def __init__(self, store: StoreGateway, sync: StateSync, metrics: Metrics,
                 quality: RollingQuality, engine: Engine, persisted: frozenset[str] = frozenset(),
                 conformal: Conformal | None = None, history: History | None = None) -> None:
        self.store = store
        self.sync = sync
        self.metrics = metrics
        self.quality = quality
        self.engine = engine
        self.task = engine.task
        self.persisted = persisted
        self.conformal = conformal
        self.history = history  # the status page's charts: one point per join, at most 1 s apart

    async def apply(self, labels: Sequence[tuple[str, LabelValue]]) -> JoinResult:
        """Join validated labels. When the store is down: `StoreUnavailable`, nothing applied; or
        `PartialJoin` when it failed part-way, with the labels joined before applied. Labels
        whose effects cannot be computed come back in `JoinResult.rejected`, not as an error."""
        memory = self.engine.error_memory
        stores_rows = memory is not None and memory.name in self.persisted
        conformal = self.conformal
        written: dict[str, bytes] = {}

        def effects(joined: list[PredictionRecord],
                    states: dict[str, bytes | None]) -> LabelEffects:
            """What the join writes with the labels: the error memory's rows, the calibrator;
            and the records it must not join, because their effects cannot be computed."""
            out = LabelEffects()
            out.rejected = self.refusals(joined)
            records = self._usable([r for r in joined if r.id not in out.rejected])
            if memory is not None and stores_rows and records:
                rows = self._error_memory_rows(records)
                if rows is not None:
                    out.memories.append((memory.name, rows, memory.capacity))
            scorable = self._scorable([r for r in joined if r.id not in out.rejected])
            written.clear()
            if conformal is not None and scorable:
                out.calibrators = conformal.effects(scorable, states)
                written.update(out.calibrators)
            return out

        # always handed to the join, so a record that cannot be used is rejected even where
        # nothing is written besides the labels
        calibrators = () if conformal is None else conformal.names
        try:
            result = await self.store.join_labels(list(labels), effects, calibrators)
        except PartialJoin as partial:
            await self._absorb(partial.result)  # joined before the failure: apply them, then report
            self._remember(partial.result)
            raise
        await self._absorb(result)
        if conformal is not None:
            conformal.adopt(written)  # this replica just moved the threshold
        self._remember(result)
        return result

    def _remember(self, result: JoinResult) -> None:
        if self.history is not None and result.joined:
            self.history.record(point_now(self.quality, self.conformal, self.engine))

    def refusals(self, records: list[PredictionRecord]) -> dict[str, str]:
        """The records whose label cannot be used, by id, with why: checked one by one, so a bad
        record never takes the others with it."""
        refused: dict[str, str] = {}
        if not all_finite(records):  # the common case costs one check for the whole batch
            for record in records:
                problem = record_problem(record)
                if problem is not None:
                    refused[record.id] = problem
        conformal = self.conformal
        scorable = self._scorable([r for r in records if r.id not in refused])
        if conformal is not None and scorable:
            for record, problem in zip(scorable, self._each(
                    scorable, lambda rs: self.task.scores(rs, conformal.score)), strict=True):
                if problem is not None:
                    refused[record.id] = f"its conformal score cannot be computed ({problem})"
        memory = self.engine.error_memory
        usable = [r for r in self._usable(records)
                  if r.id not in refused and r.features is not None]
        if memory is not None and usable:
            for record, problem in zip(usable, self._each(usable, self._packed), strict=True):
                if problem is not None:
                    refused[record.id] = f"its error-memory row cannot be computed ({problem})"
        return refused

    @staticmethod
    def _each(records: list[PredictionRecord],
              compute: Callable[[list[PredictionRecord]], np.ndarray]) -> list[str | None]:
        """What is wrong with each record's row of `compute(records)` (one row per record):
        None where it is finite. When the batch raises, each record is computed alone, so the
        error is pinned on the records that cause it."""
        try:
            rows = np.asarray(compute(records), dtype=np.float64).reshape(len(records), -1)
        except Exception:  # any error: find the records it comes from
            problems: list[str | None] = []
            for record in records:
                try:
                    row = np.asarray(compute([record]), dtype=np.float64)
                except Exception as error:  # this record's own
                    problems.append(f"{type(error).__name__}: {error}")
                else:
                    problems.append(None if np.isfinite(row).all() else "it is not finite")
            return problems
        finite = np.asarray(np.isfinite(rows).all(axis=1), dtype=bool)
        return [None if finite[i] else "it is not finite" for i in range(len(records))]

    def _packed(self, records: list[PredictionRecord]) -> np.ndarray:
        rows = self._error_memory_rows(records)
        return np.zeros((len(records), 0)) if rows is None else rows

    def _scorable(self, joined: list[PredictionRecord]) -> list[PredictionRecord]:
        """Records whose outputs fit this model (an older model's may have other classes)."""
        width = self.engine.model.num_classes or self.engine.model.num_outputs
        return [r for r in joined if r.outputs.size == width]

    def _paired(self, records: list[PredictionRecord], errors: np.ndarray) -> np.ndarray:
        """What the drift policy's judge scores each label by: the error of what was served less
        the source model's on the same sample, where the record kept the source's outputs (the
        shadow's copy); the difference takes out what made the sample hard for both, which is
        no action's doing. Elsewhere the error alone."""
        paired = np.array(errors, dtype=np.float64)
        rows = [i for i, r in enumerate(records) if SOURCE_OUTPUTS in r.arrays]
        if rows:
            shadowed = [records[i] for i in rows]
            paired[rows] -= self.task.output_errors(
                np.stack([r.arrays[SOURCE_OUTPUTS] for r in shadowed]),
                self.task.record_labels(shadowed))
        return paired

    def _usable(self, joined: list[PredictionRecord]) -> list[PredictionRecord]:
        """The records this model made: those the label path can learn from."""
        return [r for r in joined if r.model_version == self.engine.model.version]

    def _error_memory_rows(self, records: list[PredictionRecord]) -> np.ndarray | None:
        """The error memory's rows for the records that kept their features (all but those made
        before an `auto` memory woke), in order; None when there are none."""
        memory = self.engine.error_memory
        records = [r for r in records if r.features is not None]
        if memory is None or not records:
            return None
        features = torch.from_numpy(np.stack([r.features for r in records]))  # type: ignore
        before = torch.from_numpy(np.stack([r.arrays.get(BEFORE_ERROR_MEMORY, r.outputs)
                                            for r in records]))
        labels = self.task.record_labels(records)
        return memory.pack(features, torch.from_numpy(labels), before)

    async def _absorb(self, result: JoinResult) -> None:
        scorable = self._scorable(result.joined)
        errors = self.task.errors(scorable) if scorable else None
        # for the drift policy's judge, where it runs: where each label's sample was served, and
        # the loss the judge scores the label by
        served = judged = None
        drift = self.engine.drift
        if errors is not None and drift is not None:  # where the drift began, for the boost
            served = np.array([r.extra.get("served", NOT_SERVED_HERE) for r in scorable],
                              dtype=np.float64).reshape(len(scorable), 2)
            if drift.judge.enabled:
                judged = self._paired(scorable, errors)
        self._record(result, errors)
        if self.conformal is not None:
            self.conformal.observe(scorable)
        records = self._usable(result.joined)
        if not records:
            if errors is not None:
                await self.sync.run(self.engine.observe_errors, errors, served, judged)
            return
        batch = LabelledBatch(labels=self.task.record_labels(records),
                              errors=errors, served=served, judged=judged)
        if drift is not None:  # where the labels learnt from were served: the boost they take
            batch.learnt_served = np.array(
                [r.extra.get("served", NOT_SERVED_HERE) for r in records],
                dtype=np.float64).reshape(len(records), 2)
        if all(r.features is not None for r in records):
            batch.features = np.stack([r.features for r in records])  # type: ignore[misc]
        batch.error_memory_rows = self._error_memory_rows(records)
        if self.engine.output_corrector is not None:
            batch.before_corrector = np.stack([r.arrays.get(BEFORE_CORRECTOR, r.outputs)
                                               for r in records])
        if self.engine.supervised is not None and all(INPUTS in r.arrays for r in records):
            batch.inputs = np.stack([r.arrays[INPUTS] for r in records])
        placed = [r for r in records if RUNS_PLACE in r.arrays and r.arrays[RUNS_PLACE].size == 2]
        if self.engine.runs is not None and placed:
            batch.runs_places = np.stack([r.arrays[RUNS_PLACE] for r in placed]).reshape(-1, 2)
            batch.runs_labels = self.task.record_labels(placed)
        mixture = self.engine.mixture
        # what learns: the served outputs, under a mixture its last stage, and under the
        # class-run filter the outputs before it
        learnt = (candidate_array(mixture.names[-1]) if mixture is not None
                  else BEFORE_RUNS if self.engine.runs is not None else None)
        shadowed = [r for r in records if SOURCE_OUTPUTS in r.arrays and EPOCH in r.arrays
                    and (learnt is None or learnt in r.arrays)]
        if self.engine.comparison is not None and shadowed:
            labels = self.task.record_labels(shadowed)
            batch.adapted_errors = (self.task.errors(shadowed) if learnt is None else
                                    self.task.output_errors(
                                        np.stack([r.arrays[learnt] for r in shadowed]), labels))
            batch.source_errors = self.task.output_errors(
                np.stack([r.arrays[SOURCE_OUTPUTS] for r in shadowed]), labels)
            batch.epochs = np.array([r.arrays[EPOCH][0] for r in shadowed])
        if mixture is not None:
            await self._candidates(batch, records, mixture.names)
        await self.sync.run(self.engine.learn, batch)
        await self._learn_online(records)

    async def _candidates(self, batch: LabelledBatch, records: list[PredictionRecord],
                          names: list[str]) -> None:
        """What the mixture learns from: the records that kept every candidate. River's
        learners' guesses for the records served while they slept (`LEARNER_ASLEEP`, with their
        inputs) are made now by the engine, before the labels are learnt (`Engine.guess_asleep`),
        in slices of `ONLINE_SLICE` so predictions run between."""
        arrays = {name: candidate_array(name) for name in names}
        learners = [arrays[name] for name in self.engine.online if name in arrays]
        others = [a for a in arrays.values() if a not in learners]
        mixed = [r for r in records if all(a in r.arrays for a in others) and (
            all(a in r.arrays for a in learners)
            or (LEARNER_ASLEEP in r.arrays and INPUTS in r.arrays))]
        if not mixed:
            return
        missing = np.full(self.engine.model.width, np.nan, dtype=np.float32)  # a guess not made
        candidates = {name: [r.arrays.get(a, missing) for r in mixed]
                      for name, a in arrays.items()}
        if learners:
            asleep = [i for i, r in enumerate(mixed) if not all(a in r.arrays for a in learners)]
            last = candidates[names[-1]]
            for start in range(0, len(asleep), ONLINE_SLICE):
                part = asleep[start:start + ONLINE_SLICE]
                inputs = np.stack([mixed[i].arrays[INPUTS] for i in part])
                for name in self.engine.online:  # one learner a job: predictions run between
                    guesses = await self.engine.run(self.engine.guess_asleep, name, inputs)
                    for row, i in enumerate(part):  # none made: the last stage's, as when served
                        candidates[name][i] = last[i] if guesses is None else guesses[row]
        batch.candidates = {name: np.stack(rows) for name, rows in candidates.items()}
        batch.candidate_labels = self.task.record_labels(mixed)
        batch.candidate_served = np.array(
            [r.extra.get("served", NOT_SERVED_HERE) for r in mixed],
            dtype=np.float64).reshape(len(mixed), 2)
        # what each rate served: records kept by this configuration's rates only (a replica or
        # a process with another count of rates is told apart by the length; one with the same
        # count in another order is not: every replica runs one `mixture.eta`)
        mixture = self.engine.mixture
        assert mixture is not None
        size = len(mixture.etas) * self.engine.model.width
        served = [r for r in records if len(r.arrays.get(MIXTURE_RATES, ())) == size]
        if len(mixture.etas) > 1 and served:
            batch.rates_served = np.stack([r.arrays[MIXTURE_RATES] for r in served]).reshape(
                len(served), len(mixture.etas), -1)
            batch.rates_labels = self.task.record_labels(served)

    async def _learn_online(self, records: list[PredictionRecord]) -> None:
        """River's learners (`mixture.learner`) learn the labels of the records that kept their
        inputs (for them or for the supervised step, on any replica), one learner and a slice of
        `ONLINE_SLICE` a job, so that predictions submitted meanwhile run between them: their
        learning is Python, about a millisecond a label for ARF."""
        if not self.engine.online:
            return
        rows = [r for r in records if INPUTS in r.arrays]
        for start in range(0, len(rows), ONLINE_SLICE):
            part = rows[start:start + ONLINE_SLICE]
            inputs = np.stack([r.arrays[INPUTS] for r in part])
            labels = self.task.record_labels(part)
            for name in self.engine.online:  # one learner a job: predictions run between
                await self.engine.run(self.engine.learn_online, name, inputs, labels)

    def _record(self, result: JoinResult, errors: np.ndarray | None) -> None:
        m = self.metrics.labels
        m.labels("joined").inc(len(result.joined))
        m.labels("unknown").inc(len(result.unknown))
        m.labels("duplicate").inc(len(result.duplicate))
        m.labels("expired").inc(len(result.expired))
        m.labels("rejected").inc(len(result.rejected))
        if result.rejected:
            named = list(result.reasons.items())[:LOGGED_REJECTIONS]
            log.warning("rejected %d label(s) whose effects cannot be computed, their predictions "
                        "left unlabelled: %s%s", len(result.rejected),
                        "; ".join(f"{i}: {why}" for i, why in named),
                        " ..." if len(result.reasons) > len(named) else "")
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


def all_finite(records: Sequence[PredictionRecord]) -> bool:
    """Whether every value of these records' outputs, features and named arrays is finite."""
    parts = [a for r in records for a in (r.outputs, r.features, *r.arrays.values())
             if a is not None]
    return not parts or bool(np.isfinite(np.concatenate([p.ravel() for p in parts])).all())


def record_problem(record: PredictionRecord) -> str | None:
    """Why a stored record cannot be learned from or scored, or None: its outputs, features or
    named arrays hold a value that is not finite (NaN, infinity).

    >>> import numpy as np
    >>> record_problem(PredictionRecord(id="a", created_at=0.0, prediction=0.0,
    ...                                 outputs=np.array([np.nan, 1.0], dtype=np.float32)))
    'its stored outputs are not finite'
    """
    if not np.isfinite(record.outputs).all():
        return "its stored outputs are not finite"
    if record.features is not None and not np.isfinite(record.features).all():
        return "its stored features are not finite"
    for name, values in record.arrays.items():
        if not np.isfinite(values).all():
            return f"its stored {name} are not finite"
    return None
