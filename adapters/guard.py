"""The collapse guard: notice when adaptation has collapsed and say so, so the adapter is reset.

Entropy minimisation has a degenerate optimum: predict one class for everything, with total
confidence. Continual adaptation drifts towards it on long streams (Wang et al. 2022; Niu et al.
2023). The guard watches the diversity of recent predictions, as the effective number of
predicted classes exp(H(histogram of the last `window` predictions)), and reports a collapse when it
falls below `min_ratio` times the source model's on in-distribution data.
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
    """Reports a collapse once the last `window` predictions are far less diverse than the source's.

    >>> guard = CollapseGuard(num_classes=10, window=20, min_ratio=0.3, source_effective=9.0)
    >>> guard.observe(np.arange(20) % 10)
    False
    >>> guard.observe(np.zeros(20, dtype=int))
    True
    """

    def __init__(
        self,
        num_classes: int,
        window: int = 512,
        min_ratio: float = 0.3,
        source_effective: float | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.window = window
        self.min_ratio = min_ratio
        self.source_effective = source_effective or float(num_classes)
        self.recent: deque[int] = deque(maxlen=window)
        self.last_effective: float | None = None

    @property
    def threshold(self) -> float:
        return self.min_ratio * self.source_effective

    def observe(self, predictions: np.ndarray) -> bool:
        """Add a batch of predicted classes; True when the full window has collapsed."""
        self.recent.extend(int(p) for p in predictions)
        if len(self.recent) < self.window or self.min_ratio <= 0:
            return False
        self.last_effective = effective_classes(np.fromiter(self.recent, int), self.num_classes)
        return self.last_effective < self.threshold

    def clear(self) -> None:
        self.recent.clear()
        self.last_effective = None

    def describe(self) -> dict[str, object]:
        return {"window": self.window, "threshold": self.threshold,
                "source_effective_classes": self.source_effective,
                "effective_classes": self.last_effective}
