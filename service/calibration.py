"""Online conformal calibration in the service: one calibrator per deployment, shared through the
store, a set or an interval on every prediction, and the coverage it achieves as metrics.

The calibrator's full state lives in the store under ``conformal`` and a small summary (the
threshold, α_t, the number of updates) under ``conformal.threshold``; both are rewritten by the
join that brings the labels (`Store.join_labels` effects), so with Redis every replica's labels
update one calibrator atomically, exactly once per label, and every replica reads the threshold
of the summary before each batch it serves. When the store does not answer, a replica serves with
the last threshold it read.

Scores: LAC (1 − p_y) or APS for classification, on the probabilities served; for regression the
absolute residual |y − ŷ| (for a multi-output regressor the largest over its outputs, so the
intervals of one sample cover all of its outputs together). A prediction's record keeps the
threshold it was served with, so coverage is measured on what callers actually got.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from adapters.conformal import Calibrator, build_calibrator
from service.gateway import StoreGateway
from service.metrics import Metrics
from service.model import LoadedModel
from service.settings import ConformalSettings
from store import PredictionRecord, StoreUnavailable

STATE = "conformal"
SUMMARY = "conformal.threshold"
WINDOWS = (100, 1000)


class Conformal:
    """The calibrator of one deployment: its threshold for serving, the sets or intervals it
    shapes, the state a join writes with its labels, the coverage it achieves here, and its reset.
    The store holds its bytes; what they mean is decided here only."""

    # the calibrator states a join reads and rewrites with the labels
    names = (STATE, SUMMARY)

    def __init__(self, settings: ConformalSettings, model: LoadedModel, metrics: Metrics,
                 store: StoreGateway, max_scale: float | None) -> None:
        self.settings = settings
        self.task = model.task
        self.metrics = metrics
        self.store = store
        self.method = settings.method
        self.score = settings.score if settings.score != "auto" else self.task.scores_known[0]
        self.alpha = settings.alpha
        options: dict[str, Any] = dict(settings.options)
        if self.method in ("sfogd", "saocp"):
            options.setdefault("max_scale", max_scale)
        self.options = options
        self.fresh().state()  # refuse bad options at start-up, not at the first label
        self.threshold = 0.0  # what this replica serves with: the store's, as last read
        self.alpha_t = self.alpha
        self.steps = 0
        self._covered: dict[int, deque[bool]] = {w: deque(maxlen=w) for w in WINDOWS}
        self._sizes: deque[float] = deque(maxlen=max(WINDOWS))
        self._lock = threading.Lock()
        # the state bytes this replica wrote last, and the calibrator that holds them; a join
        # takes it (leaving None) so no two joins update one object
        self._cache: tuple[bytes | None, Calibrator] = (None, self.fresh())
        self._publish()

    def fresh(self) -> Calibrator:
        return build_calibrator(self.method, self.alpha, **self.options)

    # --- serving ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Adopt the shared threshold from the store (the last one read when it does not
        answer)."""
        try:
            self.read_summary(await self.store.load_calibrator(SUMMARY))
        except StoreUnavailable:
            pass

    def refresh_soon(self) -> asyncio.Task[None]:
        """`refresh` as a task, to overlap the read with a forward pass."""
        return asyncio.ensure_future(self.refresh())

    def read_summary(self, summary: bytes | None) -> None:
        """Adopt a threshold summary (None: no label yet, the calibrator as built)."""
        if summary is None:
            calibrator = self.fresh()
            threshold, alpha_t, steps = calibrator.threshold, calibrator.alpha_t, 0
        else:
            values = json.loads(summary)
            threshold, alpha_t, steps = values["threshold"], values["alpha_t"], values["steps"]
        self.threshold, self.alpha_t, self.steps = float(threshold), float(alpha_t), int(steps)
        self._publish()

    def shape(self, outputs: np.ndarray) -> tuple[list[list[int]] | None, list | None]:
        """Sets (classification) or intervals (regression) for a batch of served outputs, at
        the threshold in force."""
        sets, intervals, sizes = self.task.calibrated(outputs, self.threshold, self.score)
        with self._lock:
            self._sizes.extend(sizes)
        return sets, intervals

    # --- labels -----------------------------------------------------------------------------

    def effects(self, records: Sequence[PredictionRecord],
                states: dict[str, bytes | None]) -> dict[str, bytes]:
        """The calibrator's new state and summary after these records' labels, in order: what
        the join writes with them (it may call this again if another replica wrote first)."""
        scores = self.task.scores(records, self.score)
        raw = states.get(STATE)
        with self._lock:
            # taken, not shared: two joins of this replica may compute effects at once
            cached_state, cached = self._cache
            self._cache = (None, cached)
        if raw is not None and raw == cached_state:
            # the state this replica wrote last, unchanged since: no need to parse it again
            calibrator = cached
        else:
            calibrator = self.fresh()
            if raw is not None:
                try:
                    calibrator.load_state(json.loads(raw))
                except (ValueError, KeyError, TypeError):
                    # made by another method or options (a redeploy): start again rather than
                    # fail every label
                    calibrator = self.fresh()
        for score in scores:
            calibrator.update(float(score))
        state = json.dumps(calibrator.state(), separators=(",", ":")).encode()
        with self._lock:
            # the object now holds exactly `state`: if this write loses a race, the next try
            # reads other bytes and parses them
            self._cache = (state, calibrator)
        summary = {"threshold": calibrator.threshold, "alpha_t": calibrator.alpha_t,
                   "steps": calibrator.steps}
        return {STATE: state, SUMMARY: json.dumps(summary).encode()}

    def adopt(self, written: dict[str, bytes]) -> None:
        """This replica's join just wrote these states: serve with their threshold at once."""
        if SUMMARY in written:
            self.read_summary(written[SUMMARY])

    def observe(self, records: Sequence[PredictionRecord]) -> None:
        """Coverage of the sets and intervals these records were served with: the label in the
        set served (which holds the predicted class even when no class's score is within the
        threshold), or the value within the interval."""
        if not records:
            return
        scores = self.task.scores(records, self.score)
        with self._lock:
            for record, score in zip(records, scores, strict=True):
                served = record.extra.get("q")
                if served is None:
                    continue
                if "set" in record.extra:
                    covered = int(record.label) in record.extra["set"]  # type: ignore[arg-type]
                else:
                    covered = bool(score <= served + 1e-9)
                for window in self._covered.values():
                    window.append(covered)
        self._publish()

    async def reset(self) -> None:
        """Forget the shared calibrator (a drift action): its stored state goes, and this replica
        serves with the calibrator as built. Raises `StoreUnavailable`."""
        for name in self.names:
            await self.store.clear_calibrator(name)
        self.read_summary(None)

    # --- reporting --------------------------------------------------------------------------

    def coverage(self, window: int) -> float | None:
        with self._lock:
            kept = self._covered[window]
            return sum(kept) / len(kept) if kept else None

    @property
    def mean_size(self) -> float | None:
        with self._lock:
            return float(np.mean(self._sizes)) if self._sizes else None

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method, "score": self.score, "target": 1 - self.alpha,
            "alpha_t": self.alpha_t, "threshold": self.threshold, "updates": self.steps,
            "coverage": {str(w): self.coverage(w) for w in WINDOWS},
            "labels": {str(w): len(self._covered[w]) for w in WINDOWS},
            self.task.size_name: self.mean_size,
        }

    def _publish(self) -> None:
        m, name = self.metrics, self.method
        m.conformal_threshold.labels(name).set(self.threshold)
        m.conformal_alpha.labels(name).set(self.alpha_t)
        m.conformal_target.labels(name).set(1 - self.alpha)
        for window in WINDOWS:
            value = self.coverage(window)
            if value is not None:
                m.conformal_coverage.labels(name, str(window)).set(value)
        size = self.mean_size
        if size is not None and math.isfinite(size):
            m.conformal_size.labels(name).set(size)
