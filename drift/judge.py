"""The drift policy's judge: each action kind is judged by what the labels show after it,
against alarms where it was held back, and one that hurts is no longer taken.

Why controls. An action is taken at a drift, and a drift moves the labelled loss by itself: the
loss after a boost may rise because the stream changed, not because of the boost, and may fall
because the model learns the new concept, boost or not. A before/after comparison of acted alarms
alone cannot tell these apart. So the judge holds back a share of the actions the policy would
take (a randomised controlled trial, with the alarms as its units) and compares what happened
after acted alarms with what happened after held ones.

The outcome of one alarm at sample ``t`` (the policy's clock) is the change of the mean labelled
loss of what was served,

    y = mean(loss of samples served in [t, t + horizon)) − mean(loss of those in [t − horizon, t)),

a difference in differences once the two arms are compared: what the drift does to the loss is in
both arms; what the action does is in one. Samples are placed by the wall time they were served
at (a prediction record's ``created_at``), which the judge maps to its sample clock through the
``tick``s it is given, so a label that arrives late counts for the time its sample was served,
not joined. An outcome with fewer than ``min_labels`` labels on either side is dropped (labels
that never come, or come later than ``horizon`` samples after the window closed).

Each action kind keeps the last ``kept`` outcomes of each arm. Its verdict compares them with
Welch's statistic,

    z = (mean(acted) − mean(held)) / sqrt(var(acted) / n_acted + var(held) / n_held),

``hurts`` once both arms have ``min_trials`` outcomes and z ≥ ``z``, ``helps`` at z ≤ −``z``,
``unclear`` otherwise. The verdict decides the arms: every ``holdout``-th eligible alarm (offset
per action kind, so two actions of one alarm are not held together) goes to the minority arm,
which is ``held`` while the verdict is not ``hurts`` and ``acted`` once it is; so an action that
hurts is taken at one alarm in ``holdout`` only, enough to notice when it stops hurting, and an
action that helps still has its controls. ``holdout = 0`` turns the judge off: every action is
taken and nothing is judged.

What it does not do. An action is not reverted: the verdict needs several alarms, by when a boost
has long decayed and a reset or trim is history; the judge decides the next alarms, not the past
one. The action kinds judged are those that change what is served (``boost_lr``,
``trim_memory``, ``reset_adapter``); ``reset_calibrator`` changes only the conformal sets, which
the labelled loss does not see. A verdict needs ``holdout × min_trials`` alarms at the least (16
by default); with the policy's cool-down of 2,000 samples that is a long stream, so on short ones
the judge only holds back one action in ``holdout``.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

JUDGED = ("boost_lr", "trim_memory", "reset_adapter")
VERDICTS = ("helps", "unclear", "hurts")


@dataclass
class Trial:
    """One alarm's action, taken or held, waiting for the labels of its two windows."""

    action: str
    at: int
    acted: bool
    detector: str
    signal: str
    # the windows by when their batches were served: before (start, middle], after (middle, end]
    start: float  # the batch that served sample `at - horizon`
    middle: float  # the batch that raised the alarm
    end: float | None = None  # the batch that served sample `at + horizon`, once the clock passed
    served: list[np.ndarray] = field(default_factory=list)  # when each label's sample was served
    losses: list[np.ndarray] = field(default_factory=list)


class ActionJudge:
    """Holds back a share of the drift policy's actions and judges each action kind against them.

    Parameters
    ----------
    holdout
        Every ``holdout``-th eligible alarm of an action kind goes to the minority arm; 0: off.
    horizon
        Samples before and after the alarm whose labels make its outcome.
    min_trials
        Outcomes each arm needs before a verdict.
    z
        Welch's statistic at which the verdict is ``hurts`` (or, negated, ``helps``).
    kept
        Outcomes kept per arm: the verdict follows the stream.
    min_labels
        Labels each window needs for its alarm's outcome to count.
    clock
        Wall time, for the map from samples to when they were served.

    Examples
    --------
    A boost that raises the labelled loss by 0.2 after every alarm where it is taken, on a stream
    whose loss is 0.3 otherwise, with one label a sample served at one sample a second:

    >>> judge = ActionJudge(holdout=2, horizon=10, min_trials=2, min_labels=5)
    >>> acted_at = []
    >>> for alarm in range(8):
    ...     at = 100 * alarm + 50
    ...     for t in range(100 * alarm, 100 * alarm + 100):
    ...         judge.tick(t, float(t))
    ...         if t == at and judge.choose("boost_lr", t, "adwin", "error"):
    ...             acted_at.append(t)
    ...         boosted = any(0 <= t - a < 10 for a in acted_at)
    ...         judge.observe(np.array([float(t)]), np.array([0.5 if boosted else 0.3]))
    ...     _ = judge.advance(100 * alarm + 99)
    >>> judge.verdict("boost_lr"), len(acted_at)
    ('hurts', 4)
    >>> judge.choose("boost_lr", 900, "adwin", "error")  # held, now that it hurts
    False
    """

    def __init__(self, holdout: int = 4, horizon: int = 1000, min_trials: int = 4,
                 z: float = 2.5, kept: int = 20, min_labels: int = 20,
                 clock: Callable[[], float] = time.time, history: int = 65_536) -> None:
        if holdout < 0 or holdout == 1:
            raise ValueError(f"holdout: every holdout-th action is held back, so 0 (off) or at "
                             f"least 2, got {holdout}")
        if horizon <= 0 or min_trials < 2 or kept < min_trials or min_labels < 1 or z <= 0:
            raise ValueError("judge: horizon > 0, min_trials >= 2, kept >= min_trials, "
                             "min_labels >= 1 and z > 0")
        self.holdout = int(holdout)
        self.horizon = int(horizon)
        self.min_trials = int(min_trials)
        self.z = float(z)
        self.kept = int(kept)
        self.min_labels = int(min_labels)
        self.clock = clock
        self.eligible: dict[str, int] = dict.fromkeys(JUDGED, 0)
        self.outcomes: dict[str, dict[str, deque[float]]] = {
            name: {"acted": deque(maxlen=self.kept), "held": deque(maxlen=self.kept)}
            for name in JUDGED}
        self.trials: list[Trial] = []
        # (sample, wall time) at each tick, as far back as an alarm's before window reaches
        self._ticks: deque[tuple[int, float]] = deque()
        # labels joined lately, for the before window of an alarm raised after they came
        self._recent: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._recent_count = 0
        self._history = int(history)

    @property
    def enabled(self) -> bool:
        return self.holdout > 0

    # ---- the clock -------------------------------------------------------------------------------

    def tick(self, now: int, wall: float | None = None) -> None:
        """A batch was served at wall time ``wall`` (default: the clock's), its records'
        `created_at`, and the sample clock reads ``now`` after it."""
        if not self.enabled:
            return
        wall = self.clock() if wall is None else float(wall)
        for trial in self.trials:
            if trial.end is None and now > trial.at + self.horizon and self._ticks:
                trial.end = self._ticks[-1][1]  # the last batch within the after window
        self._ticks.append((int(now), wall))
        while len(self._ticks) > 1 and self._ticks[1][0] <= now - self.horizon:
            self._ticks.popleft()

    def _wall_at(self, sample: int) -> float:
        """When the batch that served sample ``sample`` was served (the last tick at or before
        it); −inf before the first tick kept, where the clock had not run that far."""
        index = bisect_right([s for s, _ in self._ticks], sample) - 1
        return self._ticks[index][1] if index >= 0 else -math.inf

    # ---- alarms ----------------------------------------------------------------------------------

    def choose(self, action: str, now: int, detector: str = "", signal: str = "") -> bool:
        """Whether to take ``action`` at this alarm (True) or hold it back (False); either way a
        trial opens. Actions that are not judged, and every action with the judge off: True."""
        if not self.enabled or action not in JUDGED:
            return True
        turn = self.eligible[action] + JUDGED.index(action)
        self.eligible[action] += 1
        minority = turn % self.holdout == self.holdout - 1
        acted = minority if self.verdict(action) == "hurts" else not minority
        trial = Trial(action, int(now), acted, detector, signal,
                      start=self._wall_at(int(now) - self.horizon), middle=self._wall_at(int(now)))
        for served, losses in self._recent:
            self._add(trial, served, losses)
        self.trials.append(trial)
        return acted

    # ---- labels ----------------------------------------------------------------------------------

    def observe(self, served: np.ndarray, losses: np.ndarray) -> None:
        """Joined labels: when each one's sample was served (wall time) and its loss (what the
        labelled drift signal scores: a 0/1 error or an absolute residual)."""
        if not self.enabled or not len(losses):
            return
        served = np.asarray(served, dtype=np.float64)
        losses = np.asarray(losses, dtype=np.float64)
        keep = np.isfinite(served) & np.isfinite(losses)
        served, losses = served[keep], losses[keep]
        if not len(losses):
            return
        for trial in self.trials:
            self._add(trial, served, losses)
        self._recent.append((served, losses))
        self._recent_count += len(losses)
        while self._recent_count - len(self._recent[0][1]) >= self._history:
            self._recent_count -= len(self._recent.popleft()[1])

    def _add(self, trial: Trial, served: np.ndarray, losses: np.ndarray) -> None:
        inside = served > trial.start
        if trial.end is not None:
            inside &= served <= trial.end
        if inside.any():
            trial.served.append(served[inside])
            trial.losses.append(losses[inside])

    def advance(self, now: int) -> list[dict[str, Any]]:
        """Close the trials whose after window ended ``horizon`` samples ago (time enough for its
        labels to come): their outcomes, as dicts for the policy's events."""
        done = [t for t in self.trials if t.end is not None and now >= t.at + 2 * self.horizon]
        if not done:
            return []
        self.trials = [t for t in self.trials if t not in done]
        return [self._close(trial) for trial in done]

    def _close(self, trial: Trial) -> dict[str, Any]:
        assert trial.end is not None
        served = np.concatenate(trial.served) if trial.served else np.zeros(0)
        losses = np.concatenate(trial.losses) if trial.losses else np.zeros(0)
        before = losses[served <= trial.middle]
        after = losses[(served > trial.middle) & (served <= trial.end)]
        arm = "acted" if trial.acted else "held"
        result: dict[str, Any] = {"action": trial.action, "at": trial.at, "arm": arm,
                                  "detector": trial.detector, "signal": trial.signal,
                                  "labels_before": len(before), "labels_after": len(after)}
        if len(before) < self.min_labels or len(after) < self.min_labels:
            result.update(outcome=None, verdict=self.verdict(trial.action))
            return result
        outcome = float(after.mean() - before.mean())
        self.outcomes[trial.action][arm].append(outcome)
        result.update(outcome=outcome, loss_before=float(before.mean()),
                      loss_after=float(after.mean()), verdict=self.verdict(trial.action),
                      statistic=self.statistic(trial.action))
        return result

    # ---- verdicts --------------------------------------------------------------------------------

    def statistic(self, action: str) -> float | None:
        """Welch's statistic of acted against held outcomes; None before ``min_trials`` each."""
        acted = np.asarray(self.outcomes[action]["acted"], dtype=np.float64)
        held = np.asarray(self.outcomes[action]["held"], dtype=np.float64)
        if len(acted) < self.min_trials or len(held) < self.min_trials:
            return None
        gap = float(acted.mean() - held.mean())
        spread = math.sqrt(acted.var(ddof=1) / len(acted) + held.var(ddof=1) / len(held))
        if spread == 0.0:
            return 0.0 if gap == 0.0 else math.copysign(math.inf, gap)
        return gap / spread

    def verdict(self, action: str) -> str:
        """``hurts``, ``helps`` or ``unclear`` (also for an action that is not judged)."""
        if action not in JUDGED:
            return "unclear"
        statistic = self.statistic(action)
        if statistic is None or abs(statistic) < self.z:
            return "unclear"
        return "hurts" if statistic > 0 else "helps"

    # ---- state -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What outlives a restart: the turns and the outcomes. Open trials do not: their
        samples' wall times are this process's clock."""
        return {"eligible": dict(self.eligible),
                "outcomes": {name: {arm: list(values) for arm, values in arms.items()}
                             for name, arms in self.outcomes.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore `state()`'s dict; ValueError, and nothing changed, if it does not hold."""
        try:
            eligible = {str(k): int(v) for k, v in state["eligible"].items()}
            outcomes = {str(name): {str(arm): [float(v) for v in values]
                                    for arm, values in arms.items()}
                        for name, arms in state["outcomes"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a drift judge state: {error!r}") from error
        if set(eligible) - set(JUDGED) or set(outcomes) - set(JUDGED) or any(
                set(arms) - {"acted", "held"} for arms in outcomes.values()):
            raise ValueError("drift judge state names unknown actions or arms")
        if any(not math.isfinite(v) for arms in outcomes.values() for values in arms.values()
               for v in values):
            raise ValueError("drift judge state holds an outcome that is not finite")
        self.eligible.update(eligible)
        for name, arms in outcomes.items():
            for arm, values in arms.items():
                self.outcomes[name][arm] = deque(values, maxlen=self.kept)

    def describe(self) -> dict[str, Any]:
        judged: dict[str, Any] = {}
        for name in JUDGED:
            arms = self.outcomes[name]
            judged[name] = {
                "verdict": self.verdict(name), "statistic": self.statistic(name),
                **{arm: {"outcomes": len(values),
                         "mean": float(np.mean(values)) if values else None}
                   for arm, values in arms.items()}}
        return {"holdout": self.holdout, "horizon": self.horizon, "min_trials": self.min_trials,
                "z": self.z, "open_trials": len(self.trials), "actions": judged}

