"""ACI: adaptive conformal inference (Gibbs & Candès 2021)."""

from __future__ import annotations

import math
from typing import Any

from adapters.conformal.base import Calibrator, ScoreWindow, _check_positive, _check_window


class ACI(Calibrator):
    """Adaptive conformal inference (Gibbs & Candès 2021), as salesforce/online_conformal runs it
    (its FACI with one step size) but with α_t unclipped (see the module docstring).

    Once more than ⌊1/α⌋ scores are in the window: β_t = share of them ≥ s_t,
    err_t = 1{α_t > β_t}, α_{t+1} = α_t + γ(α − err_t). q_t = the ⌈α_t·n⌉-th largest score in the
    window (the largest when α_t ≤ 0, the smallest when α_t ≥ 1). `errors` / `error_steps` is the
    mean err_t, within (max(α, 1 − α) + γ)/(γ · error_steps) of α on every stream.

    Parameters: `alpha` target miscoverage; `gamma` step size; `window` how many recent scores
    β_t and q_t are taken over (None: all, as the reference; memory then grows without bound).

    >>> aci = ACI(alpha=0.1, gamma=0.05)
    >>> for score in range(1, 16):
    ...     aci.update(float(score))  # every score a new maximum: α_t falls until the set is all
    >>> round(aci.alpha_t, 3), aci.errors, aci.error_steps, aci.threshold
    (-0.03, 3, 4, 15.0)
    """

    name = "aci"
    resizable = ("window",)

    def __init__(self, alpha: float = 0.1, gamma: float = 0.005,
                 window: int | None = 2_000) -> None:
        super().__init__(alpha)
        self.gamma = _check_positive("gamma", gamma)
        # the reference adapts α_t only once more than ⌊1/α⌋ scores are in
        self.warmup = math.floor(1.0 / self.alpha)
        self.window = _check_window(window, at_least=self.warmup + 1)
        self.scores = ScoreWindow(self.window)
        self.reset()

    @property
    def alpha_t(self) -> float:
        return self._alpha_t

    @property
    def threshold(self) -> float:
        return self.scores.largest(math.ceil(self._alpha_t * len(self.scores)))

    def _learn(self, score: float) -> None:
        n = len(self.scores)
        if n > self.warmup:
            beta = self.scores.count_at_least(score) / n
            error = self._alpha_t > beta
            self.errors += error
            self.error_steps += 1
            self._alpha_t += self.gamma * (self.alpha - error)
        self.scores.add(score)

    def reset(self) -> None:
        super().reset()
        self.scores.clear()
        self._alpha_t = self.alpha
        self.errors = 0
        self.error_steps = 0

    def _dynamic_state(self) -> dict[str, Any]:
        return {"alpha_t": self._alpha_t, "errors": self.errors, "error_steps": self.error_steps,
                "scores": self.scores.encoded()}

    def _load_dynamic_state(self, state: dict[str, Any]) -> None:
        self._alpha_t = float(state["alpha_t"])
        self.errors = int(state["errors"])
        self.error_steps = int(state["error_steps"])
        self.scores.load(state["scores"])
