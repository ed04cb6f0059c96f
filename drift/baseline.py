"""Class baselines: a label-free signal measured against the level of the class predicted.

Where classes arrive in runs (a camera that sees one kind of object for minutes, a burst of one
fraud pattern, a sensor stream sorted by its target), a label-free signal such as the mean of a
sample's features or the entropy of its prediction follows the class mix: each class has its own
level, so a run of one class moves the signal's mean as a real shift of the inputs would, and
ADWIN alarms at runs that change nothing the model does (B6, stop 39: 10 to 45 label-free alarms
per 10,000 samples on its streams in runs, none on the same streams in order).

`ClassBaseline` keeps, for each signal, a running level per predicted class and hands the detector
each value's distance from the level of its own class instead of the value:

    e_c   = (min(n_c, span) m_c + prior g) / (min(n_c, span) + prior)    expected value, class c
    r_i   = x_i - e_{c_i}                                                fed to the detector

where ``c_i`` is the class the model predicted for sample i, ``m_c`` the running level of the
values of that class and ``n_c`` how many there were, and ``g`` the running level of all values.
A class seen rarely is shrunk towards the overall level (``prior`` = 5 samples' weight), so a
rare class's first samples are not compared with a level estimated from one or two of them. The
levels are running means over the last ``span`` (1,000) values of their class: exact means until
``span`` values, then exponentially weighted with rate 1/``span``. Values of one batch are measured
against the levels as they stood before it, then the levels take the batch in (a batch is at most
the micro-batcher's size, small against ``span``; a batch of more than ``span`` values of a class
sets its level to their mean). Non-finite values pass through unchanged (the
detector skips and counts them) and move no level.

What it removes and what it keeps. A run of one class leaves the residuals centred, so the class
mix alone raises no alarm; a shift of the inputs that moves the samples of every class moves their
residuals too, and is still seen. What it cannot tell from a run: a shift that only changes which
class the model predicts (a prior shift: the detectors on the labelled error see that one). Where
the classes' levels differ little the residuals are the values less a constant, and the detectors
see what they saw before. Measured (B6, stop 40): on the nine classification streams in runs,
label-free alarms per 10,000 samples 35 → 0 (Agrawal), 45 → 0 (Hyperplane), 20 → 0 (Phishing),
16 → 5 (ImageSegments), 15 → 0 (SEA), 10 → 0 (RandomRBF), but Shuttle 0 → 6 in order and 25 → 31
in runs (its feature mean is heavy-tailed within its majority class, and the alarms come where
the far-out samples cluster); B2's real drifts were detected at the same sample
(RandomRBF's label-free alarm 32 samples after it), and B1's digits served `bn` the same.

The class is the one the watched model predicted: the shadow's frozen copy of the source where
one runs (`service.monitor`), which need not be the class served.

A regressor has no predicted class: its signals reach the detectors as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from store.encoding import float_from_json, json_float

SPAN = 1000  # values of a class its level is a running mean over (B6, stop 40: over 200 values
#              Shuttle raised 23 false alarms per 10,000 in order, over 1,000 6; Hyperplane in
#              runs 5 against 10)
PRIOR = 5  # samples' weight of the overall level in a class's expected value (B6, stop 40:
#            20 left Hyperplane in runs 10 false alarms per 10,000 where 5 left none; its
#            pull, prior / (n_c + prior) of the way to the overall level, fades slower)


class _Levels:
    """One signal's running levels: overall, and per class."""

    def __init__(self, classes: int) -> None:
        self.count = 0
        self.level = 0.0
        self.counts = np.zeros(classes, dtype=np.int64)
        self.levels = np.zeros(classes, dtype=np.float64)

    def expected(self, classes: np.ndarray, span: int, prior: float) -> np.ndarray:
        weight = np.minimum(self.counts[classes], span).astype(np.float64)
        return (weight * self.levels[classes] + prior * self.level) / (weight + prior)

    def take(self, values: np.ndarray, classes: np.ndarray, span: int) -> None:
        """The batch's finite values into the levels, as running means over `span`."""
        if len(values) == 0:
            return
        self.count += len(values)
        # a batch of more than `span` values replaces the level (a rate above 1 would overshoot)
        self.level += (values.mean() - self.level) * min(len(values) / min(self.count, span), 1.0)
        width = len(self.counts)
        added = np.bincount(classes, minlength=width)
        sums = np.bincount(classes, weights=values, minlength=width)
        seen = added > 0
        self.counts[seen] += added[seen]
        rate = added[seen] / np.minimum(self.counts[seen], span)
        self.levels[seen] += (sums[seen] / added[seen] - self.levels[seen]) * np.minimum(rate, 1.0)

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "level": json_float(self.level),
                "counts": self.counts.tolist(), "levels": [json_float(v) for v in self.levels]}

    def load_state(self, state: dict[str, Any]) -> None:
        counts = np.asarray(state["counts"], dtype=np.int64)
        levels = np.asarray([float_from_json(v) for v in state["levels"]], dtype=np.float64)
        if counts.shape != self.counts.shape or levels.shape != self.levels.shape:
            raise ValueError(f"levels of {len(counts)} classes for a model of {len(self.counts)}")
        if (counts < 0).any() or not np.isfinite(levels).all():
            raise ValueError("class levels must be counted from 0 and finite")
        level = float_from_json(state["level"])
        if level is None or not np.isfinite(level) or int(state["count"]) < 0:
            raise ValueError("the overall level must be finite and counted from 0")
        self.count, self.level = int(state["count"]), level
        self.counts, self.levels = counts, levels


class ClassBaseline:
    """Label-free values as their distance from the level of the class the model predicted.

    A run of class 0 (its values at 1), then one of class 1 (at 3): the values jump by 2, the
    residuals by 0.18, what is left of the shrinkage towards the overall level (2) after 50
    samples of each class; a shift of 1 in both classes' values shows as about 1.

    >>> baseline = ClassBaseline(classes=2)
    >>> values = np.array([1.0] * 50 + [3.0] * 50)
    >>> classes = np.array([0] * 50 + [1] * 50)
    >>> for start in range(0, 100, 16):
    ...     _ = baseline.residuals("feature_mean", values[start:start + 16],
    ...                            classes[start:start + 16])
    >>> baseline.residuals("feature_mean", np.array([1.0, 3.0]), np.array([0, 1])).round(2).tolist()
    [-0.09, 0.09]
    >>> baseline.residuals("feature_mean", np.array([2.0, 4.0]), np.array([0, 1])).round(2).tolist()
    [0.91, 1.09]
    """

    def __init__(self, classes: int, span: int = SPAN, prior: float = PRIOR) -> None:
        if classes < 1 or span < 1 or prior <= 0:
            raise ValueError("a class baseline needs classes >= 1, span >= 1 and prior > 0")
        self.classes = int(classes)
        self.span = int(span)
        self.prior = float(prior)
        self._signals: dict[str, _Levels] = {}

    def residuals(self, signal: str, values: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Each value less the expected value of its class, then the levels updated with them.

        `values` and `classes` (the predicted class of each sample, in [0, classes)) line up; a
        non-finite value comes back as it is. Before any finite value the expected value is the
        batch's own mean.
        """
        values = np.asarray(values, dtype=np.float64)
        classes = np.asarray(classes, dtype=np.int64)
        if values.shape != classes.shape or values.ndim != 1:
            raise ValueError(f"{values.shape} values for {classes.shape} classes")
        if len(classes) and (classes.min() < 0 or classes.max() >= self.classes):
            raise ValueError(f"classes must lie in [0, {self.classes})")
        levels = self._signals.setdefault(signal, _Levels(self.classes))
        finite = np.isfinite(values)
        if levels.count == 0 and finite.any():  # nothing yet: the batch is its own baseline
            levels.level = float(values[finite].mean())
        out = values.copy()
        out[finite] = values[finite] - levels.expected(classes[finite], self.span, self.prior)
        levels.take(values[finite], classes[finite], self.span)
        return out

    def state(self) -> dict[str, Any]:
        """JSON-safe: what a restart needs to measure against the same levels."""
        return {"classes": self.classes, "span": self.span, "prior": self.prior,
                "signals": {name: levels.state() for name, levels in self._signals.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore `state`; ValueError (this baseline unchanged) when it does not fit."""
        if int(state["classes"]) != self.classes:
            raise ValueError(f"a baseline of {state['classes']} classes for {self.classes}")
        signals: dict[str, _Levels] = {}
        for name, saved in dict(state["signals"]).items():
            levels = _Levels(self.classes)
            levels.load_state(saved)
            signals[str(name)] = levels
        self._signals = signals

    def describe(self) -> dict[str, Any]:
        """What `/v1/state` shows: the settings and, per signal, the values taken in, the
        overall level, how many classes have a level and the range of their levels (bounded
        whatever the number of classes)."""
        signals = {}
        for name, levels in self._signals.items():
            seen = levels.counts > 0
            spread = ([float(levels.levels[seen].min()), float(levels.levels[seen].max())]
                      if seen.any() else None)
            # plain floats: the caller's json_safe writes a non-finite one as null
            signals[name] = {"count": levels.count, "level": float(levels.level),
                             "classes_seen": int(seen.sum()), "class_level_range": spread}
        return {"span": self.span, "prior": self.prior, "signals": signals}
