"""The guards of every learning part: notice when what is served has become worse than the
source model, and say so, so that everything that learns is reset to it.

Two guards, one without labels and one with them.

`CollapseGuard` (label-free). Entropy minimisation has a degenerate optimum: one class for
everything, with total confidence; continual adaptation drifts towards it on long streams (Wang et
al. 2022; Niu et al. 2023), and a supervised step with too high a rate, or a memory that only ever
votes one way, gets there too. For a classifier the guard compares the diversity of the last
`window` predictions of what learns with the source model's on the same inputs (the engine runs a
frozen copy of the source beside the adapted model): with E = exp(H(predicted-class histogram)),
the effective number of classes, it reports a collapse when

    E_source − 1 ≥ min_source_excess   and   E_learnt − 1 < min_ratio · (E_source − 1).

Counting the diversity above one class makes the rule mean the same for two classes as for ten
(the older rule, E < min_ratio · E_source, could never fire for two: E ≥ 1 > 0.3 · 2). Judging
against the source on the same window, and only where the source itself spreads over classes
(`min_source_excess`, 0.2: a 90/10 mix has E − 1 = 0.38, a run of one class with 3% stray
predictions 0.15), keeps it quiet when the traffic comes in runs of one class: a model that gets a
one-class run right is not collapsed. Without a source copy it falls back to the source's
diversity on the reference data, and one-class runs can trigger it.

For a regressor (only with the source copy) it compares, output by output, the values of what
learns with the source's on the same inputs: a collapse when their spread over the window falls
below `min_ratio` times the source's spread over the same window (a constant output; not judged
where the source's own spread is nil, a repeated input), a divergence when their root mean square
distance exceeds `max_divergence` times the source's spread (over the window, or on the reference
data where that is wider: narrow traffic does not make a small move a divergence).

`SourceComparison` (labels). Every joined label is scored twice: against what learns and against
the source model's outputs for the same input (kept in the record), as losses in [0, 1] (0/1
errors, or |e| / (|e| + s) of the absolute residual e for a regressor, s the source's spread on
the reference data, or 1 without it). With d_t = ℓ_learnt − ℓ_source
∈ [−1, 1], it runs, for a few bet sizes λ, the CUSUM e-detector of Shin, Ramdas and Rinaldo
(2023, "E-detectors: a nonparametric framework for sequential change detection"):

    M_t = max(M_{t−1}, 1) · (1 + λ d_t),

and reports that what learns is worse once some M_t ≥ `evidence` · (number of λs), with at least
`min_labels` labels since the last reset. Under no harm (E[d_t] ≤ 0 at every step, whatever the
dependence) each M is a nonnegative supermartingale restarted at 1, so the mean number of labels
before a false report is at least `evidence` (the e-CUSUM's average run length); a paired test,
so a stream that gets harder for both models is no reason, only learning that hurt is.

The other way, the labels show what learns *better* than the source when, over the window's d,
mean(d) < −3 · sd(d) / √n with at least `min_labels` labels (`better()`); then the label-free
guard stands down. This test is not anytime-valid (it is re-run after every join), on purpose: a
false "better" only quiets the label-free guard, and the comparison itself still watches.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


def effective_classes(predictions: np.ndarray, num_classes: int) -> float:
    """exp of the entropy of the predicted-class histogram: 1 for one class, C for uniform.

    >>> effective_classes(np.array([0, 1, 2, 3]), 4)
    4.0
    >>> effective_classes(np.array([2, 2, 2]), 4)
    1.0
    """
    counts = np.bincount(predictions.astype(np.int64), minlength=num_classes).astype(np.float64)
    shares = counts[counts > 0] / counts.sum()
    return float(round(math.exp(-(shares * np.log(shares)).sum()), 12))


class CollapseGuard:
    """Reports a collapse once the last `window` predictions of what learns have lost the
    diversity the source model's have on the same inputs (a regressor's: collapsed to a
    constant, or far from the source's values).

    >>> guard = CollapseGuard(num_classes=2, window=20, min_ratio=0.3)
    >>> source = np.arange(20) % 2
    >>> guard.observe(source, source)
    False
    >>> guard.observe(np.zeros(20, dtype=int), source)
    True
    >>> guard.clear(); guard.observe(np.zeros(20, dtype=int), np.zeros(20, dtype=int))
    False
    """

    min_source_excess = 0.2  # E_source − 1 below which a window is one class: nothing to judge

    def __init__(
        self,
        num_classes: int | None,
        window: int = 512,
        min_ratio: float = 0.3,
        source_effective: float | None = None,
        max_divergence: float = 3.0,
        source_spread: np.ndarray | float = 0.0,
    ) -> None:
        self.num_classes = num_classes
        self.window = window
        self.min_ratio = min_ratio
        self.max_divergence = max_divergence
        # the source on the reference data: the baseline when no source copy runs beside, and
        # the floor of a regressor's divergence threshold (per output)
        self.source_effective = source_effective or float(num_classes or 1)
        self.source_spread = np.atleast_1d(np.asarray(source_spread, dtype=np.float64))
        self.learnt: deque[np.ndarray] = deque(maxlen=window)
        self.source: deque[np.ndarray] = deque(maxlen=window)
        self.last: dict[str, object] = {}

    @property
    def discrete(self) -> bool:
        return self.num_classes is not None

    def observe(self, learnt: np.ndarray, source: np.ndarray | None) -> bool:
        """Add a batch of predictions of what learns (classes, or values (n,) / (n, k)) and the
        source's for the same inputs (None without a source copy); True when the full window
        has collapsed (or diverged)."""
        count = len(learnt)
        self.learnt.extend(np.asarray(learnt, np.float64).reshape(count, -1))
        if source is not None:
            self.source.extend(np.asarray(source, np.float64).reshape(count, -1))
        else:
            self.source.clear()  # never compare windows of different samples
        if len(self.learnt) < self.window or self.min_ratio <= 0:
            return False
        paired = len(self.source) == len(self.learnt)
        if self.discrete:
            return self._collapsed(paired)
        return paired and self._diverged()

    def _collapsed(self, paired: bool) -> bool:
        assert self.num_classes is not None
        learnt = effective_classes(np.concatenate(self.learnt).astype(np.int64),
                                   self.num_classes)
        source = (effective_classes(np.concatenate(self.source).astype(np.int64),
                                    self.num_classes) if paired else self.source_effective)
        threshold = 1 + self.min_ratio * (source - 1)
        self.last = {"effective_classes": learnt, "source_effective_classes": source,
                     "threshold": threshold}
        return source - 1 >= self.min_source_excess and learnt < threshold

    def _diverged(self) -> bool:
        learnt, source = np.stack(self.learnt), np.stack(self.source)  # (window, outputs)
        spread, source_spread = learnt.std(0), source.std(0)
        floor = np.maximum(source_spread, np.resize(self.source_spread, source_spread.shape))
        distance = np.sqrt(np.mean((learnt - source) ** 2, axis=0))
        collapsed = (source_spread > 0) & (spread < self.min_ratio * source_spread)
        diverged = (floor > 0) & (distance > self.max_divergence * floor)
        worst = int(np.argmax(distance / np.where(floor > 0, floor, np.inf)))
        self.last = {"spread": spread.tolist(), "source_spread": source_spread.tolist(),
                     "distance": distance.tolist(), "threshold": (self.max_divergence
                                                                  * floor).tolist(),
                     "outputs": np.flatnonzero(collapsed | diverged).tolist() or [worst]}
        return bool((collapsed | diverged).any())

    def clear(self) -> None:
        self.learnt.clear()
        self.source.clear()
        self.last = {}

    def describe(self) -> dict[str, object]:
        rule = ("E_learnt − 1 < min_ratio·(E_source − 1), where E_source − 1 ≥ "
                f"{self.min_source_excess}" if self.discrete else
                "per output: spread < min_ratio·source spread, or RMS distance from the source "
                "> max_divergence·source spread")
        return {"window": self.window, "min_ratio": self.min_ratio, "rule": rule,
                **({} if self.discrete else {"max_divergence": self.max_divergence}),
                "reference_effective_classes": self.source_effective if self.discrete else None,
                "last": self.last or None}


class _CusumEDetector:
    """Shin, Ramdas and Rinaldo's CUSUM e-detector for a positive mean of d ∈ [−1, 1], mixed
    over bet sizes: M_λ ← max(M_λ, 1) · (1 + λ d) for each λ; the evidence is the largest."""

    bets = (0.05, 0.1, 0.2, 0.4)

    def __init__(self) -> None:
        self.wealth = np.ones(len(self.bets))
        self._bets = np.asarray(self.bets)

    def update(self, d: np.ndarray) -> float:
        for value in d:
            self.wealth = np.maximum(self.wealth, 1.0) * (1.0 + self._bets * value)
        return float(self.wealth.max())

    @property
    def evidence(self) -> float:
        return float(self.wealth.max())

    def clear(self) -> None:
        self.wealth[:] = 1.0


class SourceComparison:
    """Losses of what learns against the source model's on the same joined labels; reports
    when what learns is worse, anytime-valid (see the module docstring).

    >>> comparison = SourceComparison(min_labels=50, evidence=1000.0)
    >>> comparison.observe(np.ones(200), np.zeros(200))
    True
    >>> comparison.clear(); comparison.observe(np.zeros(200), np.ones(200)), comparison.better()
    (False, True)
    """

    better_z = 3.0  # how sure the labels must be that what learns beats the source

    def __init__(self, window: int = 1000, min_labels: int = 200,
                 evidence: float = 100_000.0, scale: float | None = None) -> None:
        if min_labels > window:
            raise ValueError(f"min_labels ({min_labels}) cannot exceed window ({window})")
        if not evidence > 1:
            raise ValueError(f"evidence must exceed 1, got {evidence}")
        self.window = window
        self.min_labels = min_labels
        self.evidence = evidence
        self.scale = scale  # a regressor's: its losses are |e| / (|e| + scale); None: 0/1 errors
        self.learnt: deque[float] = deque(maxlen=window)  # errors, for the rolling means shown
        self.source: deque[float] = deque(maxlen=window)
        self.diffs: deque[float] = deque(maxlen=window)  # d, the bounded loss differences
        self.labels = 0  # since the last reset
        self._worse = _CusumEDetector()

    def observe(self, learnt: np.ndarray, source: np.ndarray) -> bool:
        """Add the errors of joined labels (0/1, or absolute residuals), of what learns and of
        the source, aligned; True when the labels show what learns worse than the source."""
        learnt, source = np.asarray(learnt, np.float64), np.asarray(source, np.float64)
        if learnt.shape != source.shape:
            raise ValueError(f"{learnt.shape} errors of what learns, {source.shape} of the "
                             "source: they must be aligned")
        self.learnt.extend(learnt.tolist())
        self.source.extend(source.tolist())
        self.labels += len(learnt)
        d = self._bounded(learnt) - self._bounded(source)
        self.diffs.extend(d.tolist())
        worse = self._worse.update(d)
        return self.labels >= self.min_labels and worse >= self.evidence * len(self._worse.bets)

    def _bounded(self, errors: np.ndarray) -> np.ndarray:
        if self.scale is None:
            return np.clip(errors, 0.0, 1.0)
        return errors / (errors + max(self.scale, 1e-12))

    def better(self) -> bool:
        """Whether the labels say that what learns beats the source: then the label-free guard
        does not reset it (a level the source misses by far, which the labels teach, is no
        collapse)."""
        n = len(self.diffs)
        if self.labels < self.min_labels or n < 2:
            return False
        d = np.fromiter(self.diffs, np.float64)
        return float(d.mean()) < -self.better_z * float(d.std(ddof=1)) / math.sqrt(n)

    @property
    def learnt_error(self) -> float | None:
        return float(np.mean(self.learnt)) if self.learnt else None

    @property
    def source_error(self) -> float | None:
        return float(np.mean(self.source)) if self.source else None

    def clear(self) -> None:
        self.learnt.clear()
        self.source.clear()
        self.diffs.clear()
        self.labels = 0
        self._worse.clear()

    def describe(self) -> dict[str, object]:
        return {"window": self.window, "min_labels": self.min_labels,
                "evidence": self.evidence, "labels": self.labels,
                "adapted_error": self.learnt_error, "source_error": self.source_error,
                "worse_evidence": self._worse.evidence}
