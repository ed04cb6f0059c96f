"""Drift monitoring in the service: River detectors on the prediction and label paths, and the
policy that turns their alarms into actions on the engine.

Engine thread only (the engine owns the monitor, as it owns the model), so nothing here locks.
The clock is the number of samples served: label-free alarms (raised while predicting) and
labelled ones (raised when late labels are joined) sit on one time line, and the policy's
cool-down, boost half-life and confirmation window are counted in samples.

The policy runs with a base learning rate of 1, so its rate *is* the boost factor: the engine
multiplies the test-time adapter's own base rate by it as it stands (`factor`), and the supervised
step's and the output corrector's, for each labelled batch, by the factor as it stood when those
labels' samples were served (`factor_served`), through their capped setters.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import numpy as np

from adapters.task import Task
from drift import (
    DEFAULT_DETECTORS,
    Action,
    ActionJudge,
    Alarm,
    ClassBaseline,
    DriftPolicy,
    SignalDetector,
    StateMismatch,
    confidence,
    entropy,
    feature_mean,
)
from drift.judge import JUDGED
from service.events import EventLog
from service.metrics import Metrics
from service.settings import DetectorSettings, DriftSettings
from store.encoding import json_safe

# the label-free signals watched by default: the model's own entropy needs class probabilities
DEFAULT_LABEL_FREE = {True: ("entropy", "feature_mean"), False: ("feature_mean",)}
# the signals that need class probabilities
PROBABILITY_SIGNALS = ("entropy", "confidence", "error")
STATE_VERSION = 1
VERDICT_VALUE = {"hurts": 1, "unclear": 0, "helps": -1}
# the way a signal moves when the model gets worse; feature_mean has no good or bad way
HARMFUL = {"entropy": "up", "error": "up", "residual": "up", "confidence": "down"}


def _detectors(specs: list[DetectorSettings] | None, task: Task, labelled: bool
               ) -> list[SignalDetector]:
    if specs is None:
        specs = [DetectorSettings(detector=DEFAULT_DETECTORS[signal].detector, signal=signal,
                                  params=dict(DEFAULT_DETECTORS[signal].params),
                                  chunk=DEFAULT_DETECTORS[signal].chunk)
                 for signal in ((task.signal,) if labelled
                                else DEFAULT_LABEL_FREE[task.discrete])]
    detectors = []
    for spec in specs:
        if not task.discrete and spec.signal in PROBABILITY_SIGNALS:
            raise ValueError(f"drift signal {spec.signal!r} needs class probabilities; a "
                             "regressor has feature_mean and residual")
        if task.discrete and spec.signal == "residual":
            raise ValueError("drift signal 'residual' is a regressor's; a classifier has 'error'")
        detectors.append(SignalDetector(spec.detector, spec.signal, dict(spec.params),
                                        spec.chunk, spec.warmup))
    return detectors


class DriftMonitor:
    """The detectors of both paths, the policy, and the sample clock they share."""

    def __init__(self, settings: DriftSettings, task: Task, metrics: Metrics,
                 events: EventLog) -> None:
        self.task = task
        self.metrics = metrics
        self.events = events
        self._label_free_specs = settings.label_free
        self.label_free = _detectors(settings.label_free, task, labelled=False)
        self.labelled = _detectors(settings.labelled, task, labelled=True)
        p = settings.policy
        j = p.judge
        self.judge = ActionJudge(holdout=j.holdout, horizon=j.horizon, min_trials=j.min_trials,
                                 z=j.z, kept=j.kept, min_labels=j.min_labels, seed=j.seed)
        self.policy = DriftPolicy(
            base_learning_rate=1.0, boost=p.boost, half_life=p.half_life, cooldown=p.cooldown,
            label_free_actions=p.label_free_actions, labelled_actions=p.labelled_actions,
            confirmation=p.confirmation, confirm_window=p.confirm_window,
            trim_keep=p.trim_keep, judge=self.judge if self.judge.enabled else None,
        )
        self.act_on = settings.act_on
        # a classifier's label-free values measured against its predicted class's level; built
        # at the first batch, when the width of the probabilities says how many classes
        self.by_class = (settings.label_free_baseline == "class" and task.discrete
                         and bool(self.label_free))
        self.baseline: ClassBaseline | None = None
        self.samples = 0
        # tells this process's records from another replica's or an earlier process's (their
        # samples were served by models this process's actions never touched); below 2**31, and
        # exact in the float64 the label path reads it back as
        self.token = secrets.randbelow(2**31)
        # which model's outputs and features the label-free detectors are fed: the engine sets
        # "source copy" where the shadow runs one (`Engine.forward`); a saved state of the other
        # kind holds statistics of other values, and its label-free detectors start afresh
        self.watches = "model"
        # every series a dashboard's increase() needs exists from the start, at 0
        for detector in (*self.label_free, *self.labelled):
            source = (detector.name, detector.signal.name)
            metrics.drift_alarms.labels(*source)
            metrics.events.labels("drift_alarm", "/".join(source), "none")
            metrics.events.labels("drift_change", "/".join(source), "none")
            actions = p.labelled_actions if detector.labelled else [
                *p.label_free_actions, *(p.labelled_actions if p.confirmation == "labelled"
                                         else [])]
            for action in actions:
                metrics.drift_actions.labels(action, *source)
                metrics.events.labels("drift_action", "/".join(source), action)
        if self.judge.enabled:
            for judged in JUDGED:
                metrics.drift_held.labels(judged)
                metrics.drift_verdict.labels(judged)
        metrics.drift_boost.set(self.factor())

    # --- the two paths ----------------------------------------------------------------------

    def observe_batch(self, probabilities: np.ndarray | None,
                      features: np.ndarray | None, count: int) -> list[Action]:
        """Label-free signals of one served batch; the actions its alarms call for."""
        self.samples += count
        watched = {detector.signal.name for detector in self.label_free}
        signals = {"entropy": (entropy, probabilities), "confidence": (confidence, probabilities),
                   "feature_mean": (feature_mean, features)}
        values = {name: None if source is None else compute(source)  # only what is watched
                  for name, (compute, source) in signals.items() if name in watched}
        if self.by_class and probabilities is not None:
            probabilities = np.asarray(probabilities)
            width = probabilities.shape[-1]
            if self.baseline is not None and self.baseline.classes != width:
                # levels of another model (resumed from a state of one with other classes): the
                # label-free detectors' statistics are of residuals against them, so both go
                self.label_free = _detectors(self._label_free_specs, self.task, labelled=False)
                self.baseline = None
            if self.baseline is None:
                self.baseline = ClassBaseline(width)
            baseline, predicted = self.baseline, probabilities.argmax(axis=-1)
            values = {name: None if v is None else baseline.residuals(name, v, predicted)
                      for name, v in values.items()}
        return self._update(self.label_free, values)

    def observe_labels(self, errors: np.ndarray, served: np.ndarray | None = None,
                       judged: np.ndarray | None = None) -> list[Action]:
        """The labelled signal (0/1 errors or absolute residuals) of joined labels, in order,
        and where each one's sample was served, (process token, sample clock) rows as
        `served()` gave them: the judge counts those this process served."""
        errors = np.asarray(errors, dtype=np.float64)
        served_from = None
        if served is not None and len(served) == len(errors):
            here = np.asarray(served, dtype=np.float64).reshape(len(errors), 2)
            mine = here[:, 0] == self.token
            losses = errors if judged is None else np.asarray(judged, dtype=np.float64)
            self.judge.observe(here[mine, 1], losses[mine])
            clocks = here[mine, 1][np.isfinite(here[mine, 1])]
            served_from = float(clocks.min()) if len(clocks) else None
        return self._update(self.labelled, {self.task.signal: errors}, served_from)

    def served(self) -> tuple[int, int]:
        """What a record keeps of where its batch was served, for the judge and for the boost
        of what learns from its label (`factor_served`): this process's token and the sample
        clock after the batch."""
        return (self.token, self.samples)

    def factor(self) -> float:
        """The learning-rate multiplier now: 1, or a boost decaying back to 1."""
        return self.policy.learning_rate(self.samples)

    def factor_served(self, served: np.ndarray | None, count: int) -> float:
        """The learning-rate multiplier for learning from `count` labels whose samples were
        served where `served` says ((process token, sample clock) rows as `served()` gave them,
        NaN where a record does not say): the mean of the boost as it stood when each of this
        process's samples was served (`DriftPolicy.learning_rate_served`); a row served by
        another process, or not known, counts at the multiplier now."""
        now = self.factor()
        if served is None or count <= 0 or np.size(served) != 2 * count:
            return now
        here = np.asarray(served, dtype=np.float64).reshape(count, 2)
        base = self.policy.base_learning_rate
        factors = [self.policy.learning_rate_served(clock) / base
                   if token == self.token and np.isfinite(clock) else now
                   for token, clock in here]
        return float(np.mean(factors))

    def _update(self, detectors: list[SignalDetector], values: dict[str, np.ndarray | None],
                served_from: float | None = None) -> list[Action]:
        actions: list[Action] = []
        now = time.time()
        for detector in detectors:
            stream = values.get(detector.signal.name)
            if stream is None or not len(stream):
                continue
            alarm = detector.update(stream, now=now)
            if alarm is not None:
                actions += self._on_alarm(alarm, served_from)
        self.policy.advance(self.samples)
        self._publish()
        return actions

    def _on_alarm(self, alarm: Alarm, served_from: float | None = None) -> list[Action]:
        direction = alarm.detail.get("direction")
        harmful = HARMFUL.get(alarm.signal)
        if self.act_on == "harm" and direction and harmful and direction != harmful:
            # the signal moved the harmless way: a change worth a line, not an action
            self.events.record("drift_change", f"{alarm.detector}/{alarm.signal}", None,
                               detector=alarm.detector, signal=alarm.signal,
                               labelled=alarm.labelled, sample=alarm.sample, at=self.samples,
                               statistic=alarm.statistic, estimate=alarm.estimate,
                               direction=direction)
            return []
        self.metrics.drift_alarms.labels(alarm.detector, alarm.signal).inc()
        actions = self.policy.on_alarm(alarm, now=self.samples, served_from=served_from)
        for action in actions:
            self.metrics.drift_actions.labels(action.name, action.detector, action.signal).inc()
        return actions

    def _publish(self) -> None:
        for event in self.policy.take_events():
            detail = {k: v for k, v in event.items()
                      if k not in ("time", "kind", "action", "detail")}
            detail.update(event.get("detail") or {})
            self.events.record(event["kind"], f"{event['detector']}/{event['signal']}",
                               event.get("action"), **detail)
            if event["kind"] == "drift_alarm":
                for held in detail.get("held", ()):
                    self.metrics.drift_held.labels(held).inc()
            elif event["kind"] == "drift_judged":
                self._publish_verdict(event["action"])
        self.metrics.drift_boost.set(self.factor())

    def _publish_verdict(self, action: str) -> None:
        judged = self.judge.describe()["actions"][action]
        self.metrics.drift_verdict.labels(action).set(VERDICT_VALUE[judged["verdict"]])
        for arm in ("acted", "held"):
            if judged[arm]["mean"] is not None:
                self.metrics.drift_effect.labels(action, arm).set(judged[arm]["mean"])

    # --- state ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "samples": self.samples, "watches": self.watches,
                "label_free": [d.state() for d in self.label_free],
                "labelled": [d.state() for d in self.labelled],
                "policy": self.policy.state(),
                "baseline": None if self.baseline is None else self.baseline.state()}

    def load_state(self, state: dict[str, Any]) -> list[str]:
        """Restore what a restart would lose; returns what did not fit (then left as built)."""
        skipped: list[str] = []
        if state.get("version") != STATE_VERSION:
            return ["the whole state (another format)"]
        paths = ["label_free", "labelled"]
        watched = state.get("watches", "model")  # states saved before the copy was watched
        if watched != self.watches:
            paths.remove("label_free")
            skipped.append(f"label_free (saved watching the {watched}, now the {self.watches})")
        elif self.by_class and state.get("baseline") is not None:
            # the detectors' statistics are of residuals against these levels: both or neither
            try:
                baseline = ClassBaseline(int(state["baseline"]["classes"]))
                baseline.load_state(state["baseline"])
                self.baseline = baseline
            except (ValueError, KeyError, TypeError, MemoryError):
                paths.remove("label_free")
                skipped.append("label_free (their class baseline did not fit)")
        elif self.by_class != (state.get("baseline") is not None) and int(
                state.get("samples", 0)) > 0:
            # saved measuring the values as they are and now against class levels (a state
            # saved before label_free_baseline existed, or with "none"), or the other way
            # round: the detectors' statistics are of other values
            paths.remove("label_free")
            skipped.append("label_free (saved without class levels)" if self.by_class
                           else "label_free (saved with class levels)")
        for path in paths:
            detectors = getattr(self, path)
            saved = state.get(path) or []
            for detector, kept in zip(detectors, saved, strict=False):
                try:
                    detector.load_state(kept)
                except (StateMismatch, ValueError, KeyError, TypeError):
                    skipped.append(f"{path} {detector.name} on {detector.signal.name}")
            if len(saved) != len(detectors):
                skipped.append(f"{path}: {len(saved)} saved detectors for {len(detectors)}")
        try:
            self.policy.load_state(state["policy"])
        except (ValueError, KeyError):
            skipped.append("policy")
        if self.judge.enabled:
            for action in JUDGED:
                self._publish_verdict(action)
        self.samples = max(self.samples, int(state.get("samples", 0)))
        self.metrics.drift_boost.set(self.factor())
        return skipped

    def describe(self) -> list[dict[str, Any]]:
        return [json_safe({**detector.describe(), "warm": detector.warm})
                for detector in (*self.label_free, *self.labelled)]

    def describe_policy(self) -> dict[str, Any]:
        return json_safe({**self.policy.describe(), "samples": self.samples,
                          "learning_rate_factor": self.factor(), "watches": self.watches,
                          "label_free_baseline": "class" if self.by_class else "none",
                          "class_levels": (None if self.baseline is None
                                           else self.baseline.describe())})

