"""Mondrian (class- or group-conditional) online conformal calibration: one calibrator per class
or per group, so that coverage holds within each, not only on average over all of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters.conformal.base import Calibrator


class Mondrian:
    """One online calibrator per key, a class or a group the caller names (Vovk et al. 2005,
    "Algorithmic learning in a random world", §4.5, Mondrian conformal predictors; class-
    conditional online: Ding et al. 2023, "Class-conditional conformal prediction with many
    classes"). A label's score teaches only its key's calibrator: with LAC, class y's threshold
    q_y is learnt from the scores 1 − p_y of the samples whose label is y, and candidate y is in
    a set iff 1 − p_y ≤ q_y. Where one class dominates the traffic, one shared threshold covers
    1 − α on average and less on the rare classes; the per-class ones cover each.

    The price is labels: every threshold learns from its own key's labels only, so a rare key's
    threshold moves slowly. A key is served with the shared (marginal) threshold until its own
    calibrator has learnt from `min_labels` labels. At most `max_groups` keys get a calibrator,
    the first ones whose labels arrive; the labels of any other key teach only the marginal one.

    Parameters: `build` makes one calibrator (the deployment's method and options);
    `max_groups` the most keys kept; `min_labels` the labels a key needs before its own
    threshold is served.

    >>> from adapters.conformal import build_calibrator
    >>> mondrian = Mondrian(lambda: build_calibrator("aci", 0.1, gamma=0.05), max_groups=2,
    ...                     min_labels=3)
    >>> [mondrian.update(key, 0.5) for key in ["a", "a", "a", "b", "c"]]
    [True, True, True, True, False]
    >>> mondrian.summary()["a"]["steps"], sorted(mondrian.summary())
    (3, ['a', 'b'])
    >>> served = mondrian.summary()
    >>> threshold_of(served, "a", 0.9, 3), threshold_of(served, "b", 0.9, 3)
    (0.5, 0.9)
    """

    def __init__(self, build: Callable[[], Calibrator], max_groups: int, min_labels: int) -> None:
        if max_groups < 1:
            raise ValueError(f"max_groups must be at least 1; got {max_groups}")
        if min_labels < 0:
            raise ValueError(f"min_labels must be 0 or more; got {min_labels}")
        self.build = build
        self.max_groups = max_groups
        self.min_labels = min_labels
        self.calibrators: dict[str, Calibrator] = {}
        self.changed: set[str] = set()  # keys updated since `changed` was last cleared

    def update(self, key: str, score: float, signal: float | None = None) -> bool:
        """Teach `key`'s calibrator the score of one of its labels; False (and nothing learnt)
        when `key` is new and `max_groups` keys are kept already."""
        calibrator = self.calibrators.get(key)
        if calibrator is None:
            if len(self.calibrators) >= self.max_groups:
                return False
            calibrator = self.calibrators[key] = self.build()
        calibrator.update(score, signal)
        self.changed.add(key)
        return True

    def summary(self) -> dict[str, dict[str, Any]]:
        """What a replica serves with: each key's threshold and how many labels taught it."""
        return {key: {"threshold": c.threshold, "steps": c.steps}
                for key, c in self.calibrators.items()}

    def state(self) -> dict[str, dict[str, Any]]:
        """Every key's calibrator state, as JSON values."""
        return {key: c.state() for key, c in self.calibrators.items()}

    def load_state(self, state: dict[str, dict[str, Any]]) -> None:
        """Carry on from `state` (keys beyond `max_groups`, from a larger cap before, are
        dropped); raises `ValueError` for states of another method or options."""
        calibrators = {}
        for key, saved in list(state.items())[:self.max_groups]:
            calibrator = self.build()
            calibrator.load_state(saved)
            calibrators[str(key)] = calibrator
        self.calibrators = calibrators
        self.changed = set(calibrators)


def threshold_of(summary: dict[str, dict[str, Any]], key: str | None, marginal: float,
                 min_labels: int) -> float:
    """The threshold `key` is served with: its own, once `min_labels` labels taught it, else the
    marginal one (also for no key, or a key with no calibrator)."""
    own = None if key is None else summary.get(key)
    if own is None or own["steps"] < min_labels:
        return marginal
    return float(own["threshold"])
