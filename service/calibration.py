"""Online conformal calibration in the service: one calibrator per deployment, shared through the
store, a set or an interval on every prediction, and the coverage it achieves as metrics.

The calibrator's full state lives in the store under ``conformal`` and a small summary (the
threshold, α_t, the number of updates) under ``conformal.threshold``; both are rewritten by the
join that brings the labels (`Store.join_labels` effects), so with Redis every replica's labels
update one calibrator atomically, exactly once per label, and every replica reads the threshold
of the summary before each batch it serves. When the store does not answer, a replica serves with
the last threshold it read. A replica never serves a threshold older than its own last completed
join or reset (see `Conformal.adopt`), so what it serves is what the calibrator computes, label
by label in the order the labels came (tests/test_conformal_replay.py replays one stream both
ways).

With `conformal.mondrian`, one calibrator per class (taught by the labels of that class) or per
group the caller names (taught by that group's labels) besides the shared one: their states are
one JSON object by key under ``conformal.groups``, their thresholds and label counts part of the
summary, and a candidate class (or a group's row) is served its own threshold once its own
calibrator has learnt from `mondrian_min_labels` labels.

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

from adapters.conformal import Calibrator, SignalTable, build_calibrator, served_threshold
from adapters.conformal.mondrian import Mondrian, threshold_of
from service.gateway import StoreGateway
from service.metrics import Metrics
from service.model import LoadedModel
from service.settings import ConformalSettings
from store import PredictionRecord, StoreUnavailable

STATE = "conformal"
SUMMARY = "conformal.threshold"
# the per-class or per-group calibrators' states (conformal.mondrian), as one JSON object by key
GROUPS = "conformal.groups"
WINDOWS = (100, 1000)
# summaries a join computed and this replica has not adopted yet (retried attempts never are)
MAX_NUMBERED = 64


class Conformal:
    """The calibrator of one deployment: its threshold for serving, the sets or intervals it
    shapes, the state a join writes with its labels, the coverage it achieves here, and its reset.
    The store holds its bytes; what they mean is decided here only."""

    # the calibrator states a join reads and rewrites with the labels
    names: tuple[str, ...] = (STATE, SUMMARY)

    def __init__(self, settings: ConformalSettings, model: LoadedModel, metrics: Metrics,
                 store: StoreGateway, max_scale: float | None,
                 reference_entropy: float | None = None, auto: str | None = None) -> None:
        self.settings = settings
        self.task = model.task
        self.metrics = metrics
        self.store = store
        # other replicas move the threshold only through a store they share (Redis)
        self.shared = store.backend != "memory"
        self.method = settings.method
        self.score = settings.score if settings.score != "auto" else self.task.scores_known[0]
        self.alpha = settings.alpha
        options: dict[str, Any] = dict(settings.options)
        if self.method in ("sfogd", "saocp") or (self.method == "pid" and max_scale is not None):
            options.setdefault("max_scale", max_scale)  # PID's K_I: 1 when the range is unknown
        if self.method == "pid" and self.score in ("lac", "aps"):
            options.setdefault("transform", "log")  # probability scores crowd just below 1
        self.options = options
        self.fresh().state()  # refuse bad options at start-up, not at the first label
        self.threshold = 0.0  # what this replica serves with: the store's, as last read
        # a method that reads the label-free signal serves from this table (the summary's)
        self.signal_table: SignalTable | None = None
        self.reference_entropy = reference_entropy
        self.auto = auto  # why `method = "auto"` picked this method, when it did
        self.uses_signal = self.fresh().uses_signal and reference_entropy is not None
        classes = model.num_classes or 0
        self._entropy_scale = math.log(classes) if model.task.discrete and classes > 1 else 1.0
        self.alpha_t = self.alpha
        self.steps = 0
        self._covered: dict[int, deque[bool]] = {w: deque(maxlen=w) for w in WINDOWS}
        self._sizes: deque[float] = deque(maxlen=max(WINDOWS))
        self._lock = threading.Lock()
        # the state bytes this replica wrote last, and the calibrator that holds them; a join
        # takes it (leaving None) so no two joins update one object
        self._cache: tuple[bytes | None, Calibrator] = (None, self.fresh())
        # Which threshold is newest, as this replica knows: every state a join computes (and
        # every reset) takes the next number; a join's effects run inside its atomic step, so
        # the numbers of the states written follow the order they were written in. `adopt`
        # skips a state older than the one in force, and a `refresh` whose read began before
        # an adopt or reset of this replica is dropped, so no batch is served with a threshold
        # older than the last completed join's.
        self._numbered: dict[bytes, int] = {}  # summary -> its number, until adopted
        self._numbers = 0
        self._in_force = 0  # the number of the threshold served now (0: read from the store)
        self._adoptions = 0  # adopts and resets so far: a read begun before one is stale
        # Mondrian: one calibrator per class or per named group besides the shared one
        self.mondrian = settings.mondrian
        self.max_groups = settings.mondrian_max_groups
        self.min_labels = settings.mondrian_min_labels
        self.num_classes = model.num_classes or 0
        self._check_mondrian()
        if self.mondrian != "none":
            self.names = (STATE, SUMMARY, GROUPS)
        self.groups: dict[str, dict[str, Any]] = {}  # key -> threshold, steps: the summary's
        # the groups' states this replica wrote last, the calibrators holding them, and each
        # key's state as JSON (only the keys a join changes are written out again)
        self._groups_cache: tuple[bytes | None, Mondrian, dict[str, bytes]] = (
            None, self.fresh_groups(), {})
        # coverage per class (or per group), for the classes of a model with at most
        # mondrian_max_groups of them, or the groups that have a calibrator
        self.coverage_by = "group" if self.mondrian == "group" else (
            "class" if self.task.discrete and 0 < self.num_classes <= self.max_groups else None)
        self._group_covered: dict[str, deque[bool]] = {}
        self._publish()

    def fresh(self) -> Calibrator:
        return build_calibrator(self.method, self.alpha, **self.options)

    def fresh_groups(self) -> Mondrian:
        return Mondrian(self.fresh, self.max_groups, self.min_labels)

    def _check_mondrian(self) -> None:
        if self.mondrian == "class" and not self.task.discrete:
            raise ValueError("conformal.mondrian = 'class' needs classes: a regressor can be "
                             "calibrated per group the caller names (mondrian = 'group')")
        if self.mondrian == "class" and self.num_classes > self.max_groups:
            raise ValueError(f"conformal.mondrian = 'class': the model has {self.num_classes} "
                             f"classes, more than conformal.mondrian_max_groups "
                             f"({self.max_groups}); raise it, or use mondrian = 'none'")

    # --- serving ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Adopt the shared threshold from the store (the last one read when it does not
        answer)."""
        adoptions = self._adoptions
        try:
            summary = await self.store.load_calibrator(SUMMARY)
        except StoreUnavailable:
            return
        if adoptions == self._adoptions:  # else this replica adopted a newer one meanwhile
            self.read_summary(summary)

    def refresh_soon(self) -> asyncio.Task[None] | None:
        """`refresh` as a task, to overlap the read with a forward pass; None when the store is
        this process's own (in-process): its threshold changes only by this replica's joins and
        resets, which adopt theirs at once, so a read per batch would only hand work to a
        thread and back."""
        if not self.shared:
            return None
        return asyncio.ensure_future(self.refresh())

    def read_summary(self, summary: bytes | None) -> None:
        """Adopt a threshold summary (None: no label yet, the calibrator as built)."""
        if summary is None:
            calibrator = self.fresh()
            threshold, alpha_t, steps = calibrator.threshold, calibrator.alpha_t, 0
            table = calibrator.signal_table()
        else:
            values = json.loads(summary)
            threshold, alpha_t, steps = values["threshold"], values["alpha_t"], values["steps"]
            table = values.get("signal")
        self.groups = {} if summary is None else values.get("groups", {})
        self.threshold, self.alpha_t, self.steps = float(threshold), float(alpha_t), int(steps)
        self.signal_table = table if self.uses_signal else None
        self._publish()

    def signal(self, entropy: np.ndarray | None) -> float | None:
        """The label-free signal of a served batch, for a method that reads one: its mean
        entropy minus the reference data's, over log K (None for other methods, regressors, or
        without reference data)."""
        if not self.uses_signal or entropy is None or not len(entropy):
            return None
        assert self.reference_entropy is not None
        return (float(np.mean(entropy)) - self.reference_entropy) / self._entropy_scale

    def threshold_for(self, signal: float | None) -> float:
        """The threshold a batch with this label-free signal is served with."""
        return served_threshold(self.threshold, self.signal_table, signal)

    def thresholds(self, count: int, signal: float | None = None,
                   groups: Sequence[str | None] | None = None) -> list[Any]:
        """The threshold each of `count` rows is served with: the shared one; with Mondrian by
        class, one per class (candidate y's); by group, its group's. A class or group whose own
        calibrator has not learnt from `mondrian_min_labels` labels yet gets the shared one."""
        shared = self.threshold_for(signal)
        if self.mondrian == "class":
            per_class = [threshold_of(self.groups, str(c), shared, self.min_labels)
                         for c in range(self.num_classes)]
            return [per_class] * count
        if self.mondrian == "group":
            named = groups or [None] * count
            return [threshold_of(self.groups, group, shared, self.min_labels)
                    for group in named]
        return [shared] * count

    def shape(self, outputs: np.ndarray, signal: float | None = None,
              groups: Sequence[str | None] | None = None
              ) -> tuple[list[list[int]] | None, list | None]:
        """Sets (classification) or intervals (regression) for a batch of served outputs, at
        the thresholds in force (`thresholds`)."""
        served: float | np.ndarray = self.threshold_for(signal)
        if self.mondrian != "none":
            served = np.asarray(self.thresholds(len(outputs), signal, groups), dtype=np.float64)
            if self.mondrian == "group" and self.task.discrete:
                served = served[:, None]  # one per row, for every candidate of the row
        sets, intervals, sizes = self.task.calibrated(outputs, served, self.score)
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
        # the threshold each label's prediction was served with, for `pid`'s served-coverage
        # loop; not under Mondrian, where a row's threshold may have been its class's or group's
        shared = self.mondrian == "none"
        for record, score in zip(records, scores, strict=True):
            signal, served = record.extra.get("signal"), record.extra.get("q")
            if not shared or not isinstance(served, (int, float)):  # a foreign record's: none
                served = None
            calibrator.update(float(score), None if signal is None else float(signal),
                              served=None if served is None else float(served))
        state = json.dumps(calibrator.state(), separators=(",", ":")).encode()
        with self._lock:
            # the object now holds exactly `state`: if this write loses a race, the next try
            # reads other bytes and parses them
            self._cache = (state, calibrator)
        values: dict[str, Any] = {"threshold": calibrator.threshold,
                                  "alpha_t": calibrator.alpha_t, "steps": calibrator.steps}
        table = calibrator.signal_table()
        if table is not None:  # what a replica needs to serve by signal, not the full state
            values["signal"] = table
        written: dict[str, bytes] = {STATE: state}
        if self.mondrian != "none":
            values["groups"], written[GROUPS] = self._group_effects(records, scores,
                                                                     states.get(GROUPS))
        summary = json.dumps(values).encode()
        with self._lock:
            self._numbers += 1
            self._numbered[summary] = self._numbers
            while len(self._numbered) > MAX_NUMBERED:  # attempts a store retried, never adopted
                del self._numbered[next(iter(self._numbered))]
        return {**written, SUMMARY: summary}

    def group_key(self, record: PredictionRecord) -> str | None:
        """The class (its label) or the group a joined record's label teaches (None: none)."""
        if self.mondrian == "group" or self.coverage_by == "group":
            group = record.extra.get("group")
            return None if group is None else str(group)
        return None if record.label is None else str(int(record.label))  # type: ignore[arg-type]

    def _group_effects(self, records: Sequence[PredictionRecord], scores: np.ndarray,
                       raw: bytes | None) -> tuple[dict[str, dict[str, Any]], bytes]:
        """The per-class or per-group calibrators after these labels: their summary, and their
        states as one JSON object (only the keys these labels taught are serialised again)."""
        with self._lock:
            cached_state, cached, fragments = self._groups_cache
            self._groups_cache = (None, cached, fragments)
        if raw is not None and raw == cached_state:
            mondrian = cached
        else:
            mondrian, fragments = self.fresh_groups(), {}
            if raw is not None:
                try:
                    mondrian.load_state(json.loads(raw))
                except (ValueError, KeyError, TypeError):  # another method or options
                    mondrian = self.fresh_groups()
        for record, score in zip(records, scores, strict=True):
            key = self.group_key(record)
            if key is not None:
                signal = record.extra.get("signal")
                mondrian.update(key, float(score), None if signal is None else float(signal))
        fragments = {key: fragments[key] for key in mondrian.calibrators
                     if key in fragments and key not in mondrian.changed}
        for key in mondrian.changed:
            fragments[key] = json.dumps(mondrian.calibrators[key].state(),
                                        separators=(",", ":")).encode()
        mondrian.changed.clear()
        state = b"{" + b",".join(json.dumps(key).encode() + b":" + fragments[key]
                                 for key in mondrian.calibrators) + b"}"
        with self._lock:
            self._groups_cache = (state, mondrian, fragments)
        return mondrian.summary(), state

    def adopt(self, written: dict[str, bytes]) -> None:
        """This replica's join just wrote these states: serve with their threshold at once."""
        summary = written.get(SUMMARY)
        if summary is None:
            return
        with self._lock:
            number = self._numbered.pop(summary, None)
            if number is None or number < self._in_force:
                return  # a later join of this replica (or a reset) is in force already
            self._in_force = number
            self._adoptions += 1
        self.read_summary(summary)

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
                key = None if self.coverage_by is None else self.group_key(record)
                kept = None if key is None else self._group_covered.get(key)
                if kept is None and key is not None and (
                        len(self._group_covered) < self.max_groups):
                    kept = self._group_covered[key] = deque(maxlen=max(WINDOWS))
                if kept is not None:
                    kept.append(covered)
        self._publish()

    async def reset(self) -> None:
        """Forget the shared calibrator (a drift action): its stored state goes, and this replica
        serves with the calibrator as built. Raises `StoreUnavailable`."""
        for name in self.names:
            await self.store.clear_calibrator(name)
        with self._lock:
            self._numbers += 1
            self._in_force = self._numbers
            self._adoptions += 1
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

    def group_coverage(self) -> dict[str, tuple[float, int]]:
        """Coverage over the last 1,000 labels of each class or group, and how many there were."""
        with self._lock:
            return {key: (sum(kept) / len(kept), len(kept))
                    for key, kept in self._group_covered.items() if kept}

    def describe_groups(self) -> dict[str, Any] | None:
        if self.coverage_by is None:
            return None
        coverage = self.group_coverage()
        keys = sorted(set(coverage) | set(self.groups),
                      key=lambda k: (int(k) if k.isdigit() else -1, k))
        groups = {}
        for key in keys:
            own = self.groups.get(key)
            groups[key] = {
                "threshold": None if own is None else own["threshold"],
                "updates": 0 if own is None else own["steps"],
                "served_own": own is not None and own["steps"] >= self.min_labels,
                "coverage": coverage[key][0] if key in coverage else None,
                "labels": coverage[key][1] if key in coverage else 0,
            }
        return {"mondrian": self.mondrian, "by": self.coverage_by,
                "max_groups": self.max_groups, "min_labels": self.min_labels, "groups": groups}

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method, "auto": self.auto, "score": self.score,
            "target": 1 - self.alpha, "signal": self.uses_signal,
            "alpha_t": self.alpha_t, "threshold": self.threshold, "updates": self.steps,
            "coverage": {str(w): self.coverage(w) for w in WINDOWS},
            "labels": {str(w): len(self._covered[w]) for w in WINDOWS},
            self.task.size_name: self.mean_size,
            "per_group": self.describe_groups(),
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
        if self.coverage_by is not None:
            for key, (value, _) in self.group_coverage().items():
                m.conformal_group_coverage.labels(name, self.coverage_by, key).set(value)
            for key, own in self.groups.items():
                m.conformal_group_threshold.labels(name, self.coverage_by, key).set(
                    own["threshold"])
