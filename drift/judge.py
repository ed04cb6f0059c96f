"""The drift policy's judge: each action kind is judged by what the labels show after it,
against alarms where it was held back, and one that hurts is no longer taken at most alarms.

Why controls. An action is taken at a drift, and a drift moves the labelled loss by itself: the
loss after a boost may rise because the stream changed, not because of the boost, and may fall
because the model learns the new concept, boost or not. A before/after comparison of acted alarms
alone cannot tell these apart. So the judge holds back a share of the actions the policy would
take, drawn at random (a randomised controlled trial whose units are the alarms), and compares
what happened after acted alarms with what happened after held ones.

The outcome of one alarm at sample ``t`` (the policy's clock, samples this process served) is the
change of the mean labelled loss of what was served,

    y = mean(loss of samples served in (t, t + horizon]) − mean(loss of those in (t − horizon, t]),

where the service scores a label's loss as the error of what was served less the source model's
error on the same sample wherever the record kept the source's outputs (the shadow's copy): what
made a sample hard for both models is no action's doing, and taking it out narrows the outcomes
(a regressor's residuals whose level moves with its target's runs were too spread to judge a
harmful reset without it, BENCHMARKS.md B6, stop 32).

a difference in differences once the two arms are compared: what the drift does to the loss is in
both arms; what the action does is in one. A label counts for the sample clock its sample was
served at (the record keeps it, with a token of the process that served it), not for when it
came, and only where this process served it: another replica's records, or this one's before a
restart, were served by models this alarm's action never touched. An outcome with fewer than
``min_labels`` labels on either side is reported and not counted (labels that never come, or
come more than ``horizon`` samples after the after window closed).

Each action kind keeps the last ``kept`` outcomes of each arm. Its verdict compares them with
Welch's statistic,

    z = (mean(acted) − mean(held)) / sqrt(var(acted) / n_acted + var(held) / n_held),

``hurts`` once both arms have ``min_trials`` outcomes and z ≥ ``z``, ``helps`` at z ≤ −``z``,
``unclear`` otherwise. The verdict decides the arms: at each eligible alarm an action kind goes
to its minority arm with chance 1 / ``holdout``, drawn for that action and that alarm alone (so
the arms of two actions taken at one alarm are independent, and one action's effect falls on
both arms of the other's alike). The minority arm is ``held`` while the verdict is not ``hurts``
and ``acted`` once it is: an action that hurts is still taken at one alarm in ``holdout``, to
notice when it stops hurting (slowly: its acted outcomes then come at that rate), and an action
that helps keeps its controls. ``holdout = 0`` turns the judge off: every action is taken and
nothing is judged. The verdict is re-read at every alarm, so with no effect at all it still says
``hurts`` at some time in a long run now and then (outcomes of pure noise, the defaults: in 2.5%
of 40-alarm runs and 7% of 200-alarm runs, at z = 2.5 in 5% and 20%); the cost of that error is
the action taken less often until the verdict turns back.

What it does not do. An action is not reverted: the verdict needs several alarms, by when a boost
has long decayed and a reset or trim is history; the judge decides the next alarms, not the past
one. The action kinds judged are those that change what is served (``boost_lr``,
``trim_memory``, ``reset_adapter``); ``reset_calibrator`` changes only the conformal sets, which
the labelled loss does not see. A verdict needs ``min_trials`` held alarms, about ``holdout ×
min_trials`` alarms of that action (16 at the defaults); with the policy's cool-down of 2,000
samples that is a long stream, so on short ones the judge only holds one action in ``holdout``
back.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

JUDGED = ("boost_lr", "trim_memory", "reset_adapter")
SPREAD_FLOOR = 1e-9


@dataclass(eq=False)  # trials are told apart by identity: two may hold the same fields
class Trial:
    """One alarm's action, taken or held, waiting for the labels of its two windows."""

    action: str
    at: int
    acted: bool
    detector: str
    signal: str
    served: list[np.ndarray] = field(default_factory=list)  # the sample each label's was served at
    losses: list[np.ndarray] = field(default_factory=list)


class ActionJudge:
    """Holds back a share of the drift policy's actions and judges each action kind against them.

    Parameters
    ----------
    holdout
        Each eligible alarm of an action kind goes to the minority arm with chance
        1 / ``holdout``; 0: off.
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
    seed
        Seeds the draws of the arms (each a function of the seed, the action and its count of
        eligible alarms, so a restart that resumes the counts resumes the draws).
    history
        Joined labels kept at most for the before windows of alarms to come (those served
        ``horizon`` or more samples before the clock go first).

    Examples
    --------
    A boost that raises the labelled loss by 0.2 for 10 samples after every alarm where it is
    taken, on a stream whose loss is 0.3 otherwise, one label a sample:

    >>> judge = ActionJudge(holdout=2, horizon=10, min_trials=3, min_labels=5)
    >>> acted_at = []
    >>> for alarm in range(20):
    ...     at = 100 * alarm + 50
    ...     for t in range(100 * alarm, 100 * alarm + 100):
    ...         if t == at and judge.choose("boost_lr", t, "adwin", "error"):
    ...             acted_at.append(t)
    ...         boosted = any(0 < t - a <= 10 for a in acted_at)
    ...         judge.observe(np.array([t]), np.array([0.5 if boosted else 0.3]))
    ...         _ = judge.advance(t)
    >>> judge.verdict("boost_lr")
    'hurts'
    >>> outcomes = judge.describe()["actions"]["boost_lr"]
    >>> round(outcomes["acted"]["mean"], 2), round(outcomes["held"]["mean"], 2)
    (0.2, 0.0)
    """

    def __init__(self, holdout: int = 4, horizon: int = 1000, min_trials: int = 4,
                 z: float = 3.0, kept: int = 20, min_labels: int = 20, seed: int = 0,
                 history: int = 65_536) -> None:
        if holdout < 0 or holdout == 1:
            raise ValueError(f"holdout: an action is held back at one alarm in holdout, so 0 "
                             f"(off) or at least 2, got {holdout}")
        if (horizon <= 0 or min_trials < 2 or kept < min_trials or min_labels < 1 or z <= 0
                or seed < 0):
            raise ValueError("judge: horizon > 0, min_trials >= 2, kept >= min_trials, "
                             "min_labels >= 1, z > 0 and seed >= 0")
        self.holdout = int(holdout)
        self.horizon = int(horizon)
        self.min_trials = int(min_trials)
        self.z = float(z)
        self.kept = int(kept)
        self.min_labels = int(min_labels)
        self.seed = int(seed)
        self.eligible: dict[str, int] = dict.fromkeys(JUDGED, 0)
        self.outcomes: dict[str, dict[str, deque[float]]] = {
            name: {"acted": deque(maxlen=self.kept), "held": deque(maxlen=self.kept)}
            for name in JUDGED}
        self.trials: list[Trial] = []
        self._now = 0
        # labels joined lately, for the before window of an alarm raised after they came: only
        # those served within `horizon` of the clock can still fall in one
        self._recent: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._recent_count = 0
        self._history = int(history)

    @property
    def enabled(self) -> bool:
        return self.holdout > 0

    # ---- alarms ----------------------------------------------------------------------------------

    def choose(self, action: str, now: int, detector: str = "", signal: str = "") -> bool:
        """Whether to take ``action`` at this alarm (True) or hold it back (False); either way a
        trial opens. Actions that are not judged, and every action with the judge off: True."""
        if not self.enabled or action not in JUDGED:
            return True
        draw = np.random.default_rng(
            [self.seed, JUDGED.index(action), self.eligible[action]]).random()
        self.eligible[action] += 1
        minority = draw < 1.0 / self.holdout
        acted = minority if self.verdict(action) == "hurts" else not minority
        trial = Trial(action, int(now), acted, detector, signal)
        self._now = max(self._now, int(now))
        self._prune()
        for served, losses in self._recent:
            self._add(trial, served, losses)
        self.trials.append(trial)
        return acted

    # ---- labels ----------------------------------------------------------------------------------

    def observe(self, served: np.ndarray, losses: np.ndarray) -> None:
        """Joined labels of samples this process served: the sample clock each one's sample was
        served at (after its batch) and its loss (a 0/1 error or an absolute residual, the
        source's on the same sample taken off where the caller has it)."""
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
        self._prune()

    def _prune(self) -> None:
        """Drop the labels no alarm from now on can count (served ``horizon`` or more before the
        clock; labels come about in the order served, so from the oldest batch on), and beyond
        ``history`` labels the oldest."""
        floor = self._now - self.horizon
        while self._recent and (self._recent[0][0].max() <= floor
                                or self._recent_count > self._history):
            self._recent_count -= len(self._recent.popleft()[1])

    def _add(self, trial: Trial, served: np.ndarray, losses: np.ndarray) -> None:
        inside = (served > trial.at - self.horizon) & (served <= trial.at + self.horizon)
        if inside.any():
            trial.served.append(served[inside])
            trial.losses.append(losses[inside])

    def advance(self, now: int) -> list[dict[str, Any]]:
        """Close the trials whose after window ended ``horizon`` samples ago (time enough for its
        labels to come): their outcomes, as dicts for the policy's events."""
        self._now = max(self._now, int(now))
        done = [t for t in self.trials if now >= t.at + 2 * self.horizon]
        if not done:
            return []
        self.trials = [t for t in self.trials if all(t is not d for d in done)]
        return [self._close(trial) for trial in done]

    def _close(self, trial: Trial) -> dict[str, Any]:
        served = np.concatenate(trial.served) if trial.served else np.zeros(0)
        losses = np.concatenate(trial.losses) if trial.losses else np.zeros(0)
        before = losses[served <= trial.at]
        after = losses[served > trial.at]
        arm = "acted" if trial.acted else "held"
        result: dict[str, Any] = {"action": trial.action, "at": trial.at, "arm": arm,
                                  "detector": trial.detector, "signal": trial.signal,
                                  "labels_before": len(before), "labels_after": len(after),
                                  "outcome": None}
        if len(before) >= self.min_labels and len(after) >= self.min_labels:
            outcome = float(after.mean() - before.mean())
            self.outcomes[trial.action][arm].append(outcome)
            result.update(outcome=outcome, loss_before=float(before.mean()),
                          loss_after=float(after.mean()))
        result.update(verdict=self.verdict(trial.action), welch=self.statistic(trial.action))
        return result

    # ---- verdicts --------------------------------------------------------------------------------

    def statistic(self, action: str) -> float | None:
        """Welch's statistic of acted against held outcomes; None before ``min_trials`` each."""
        acted = np.asarray(self.outcomes[action]["acted"], dtype=np.float64)
        held = np.asarray(self.outcomes[action]["held"], dtype=np.float64)
        if len(acted) < self.min_trials or len(held) < self.min_trials:
            return None
        gap = float(acted.mean() - held.mean())
        # a floor on the spread: outcomes that never vary (a stream of identical losses) still
        # give a finite statistic, as large as their gap says
        spread = max(math.sqrt(acted.var(ddof=1) / len(acted) + held.var(ddof=1) / len(held)),
                     SPREAD_FLOOR)
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
        """What outlives a restart: the counts of eligible alarms (so the draws go on where they
        were) and the outcomes. Open trials do not: their labels were served by this process,
        and a restarted one counts only its own."""
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
        if any(count < 0 for count in eligible.values()):
            raise ValueError("drift judge state holds a negative count of alarms")
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
                "z": self.z, "seed": self.seed, "open_trials": len(self.trials),
                "actions": judged}

