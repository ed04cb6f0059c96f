"""SF-OGD: scale-free online gradient descent on the pinball loss (Orabona & Pál 2016)."""

from __future__ import annotations

import math
from typing import Any

from adapters.conformal.base import Calibrator, _check_positive


class SFOGD(Calibrator):
    """Scale-free online gradient descent on the threshold (Orabona & Pál 2016), as
    salesforce/online_conformal's ScaleFreeOGD: with g = the pinball-loss gradient at level 1 − α
    (−(1 − α) if s > q, α if s < q, 0 if equal), q ← max(0, q − D/√(3 Σ g²) · g), from q = 0.

    Parameters: `alpha` target miscoverage; `max_scale` D, the learning-rate scale: set it to the
    real range of the scores (1 for LAC and APS; the reference derives max |calibration score|·√3).
    Scores are taken to be ≥ 0.

    >>> sfogd = SFOGD(alpha=0.1, max_scale=1.0)
    >>> sfogd.update(0.5)  # above q = 0: g = −0.9, q = 0.9 / √(3 · 0.81) = 1/√3
    >>> round(sfogd.threshold, 4)
    0.5774
    >>> sfogd.update(0.5)  # below: g = 0.1, q = 1/√3 − 0.1/√(3 · 0.82)
    >>> round(sfogd.threshold, 4)
    0.5136
    """

    name = "sfogd"
    # set by reset()
    _threshold: float
    grad_sq_sum: float

    def __init__(self, alpha: float = 0.1, max_scale: float = 1.0) -> None:
        super().__init__(alpha)
        self.max_scale = _check_positive("max_scale", max_scale)
        self.reset()

    @property
    def threshold(self) -> float:
        return self._threshold

    def _learn(self, score: float) -> None:
        q = self._threshold
        gradient = -(1.0 - self.alpha) if score > q else (self.alpha if score < q else 0.0)
        self.grad_sq_sum += gradient * gradient
        if self.grad_sq_sum > 0:
            step = self.max_scale / math.sqrt(3.0 * self.grad_sq_sum)
            self._threshold = max(0.0, q - step * gradient)

    def reset(self) -> None:
        super().reset()
        self._threshold = 0.0
        self.grad_sq_sum = 0.0

    def _dynamic_state(self) -> dict[str, Any]:
        return {"threshold": self._threshold, "grad_sq_sum": self.grad_sq_sum}

    def _load_dynamic_state(self, state: dict[str, Any]) -> None:
        self._threshold = float(state["threshold"])
        self.grad_sq_sum = float(state["grad_sq_sum"])
