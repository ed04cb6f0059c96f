"""FACI: fully adaptive conformal inference, ACI experts mixed by exponential weights
(Gibbs & Candès 2022)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from adapters.conformal.base import (
    Calibrator,
    ScoreWindow,
    _check_window,
    expert_losses,
    fixed_share,
)


class ACIExperts(Calibrator):
    """ACI experts with step sizes `gammas`, mixed by fixed-share exponential weights on their
    pinball losses: what FACI and DtACI share. A subclass sets `eta` and `sigma`; it may
    re-tune η each step (`_eta_now`)."""

    resizable = ("window",)
    gammas: tuple[float, ...] = tuple(0.001 * 2**k for k in range(8))
    eta: float
    sigma: float
    # set by reset()
    _alphas: np.ndarray
    _weights: np.ndarray

    def __init__(self, alpha: float, window: int | None) -> None:
        super().__init__(alpha)
        self.warmup = math.floor(1.0 / self.alpha)  # ACI's warm-up
        self.window = _check_window(window, at_least=self.warmup + 1)
        self.scores = ScoreWindow(self.window)
        self._gammas = np.asarray(self.gammas)
        self.reset()

    @property
    def alpha_t(self) -> float:
        return float(self._weights @ self._alphas)

    @property
    def threshold(self) -> float:
        return self.scores.largest(math.ceil(self.alpha_t * len(self.scores)))

    def _eta_now(self, losses: np.ndarray) -> float:
        """η for this step's losses (before the weights take them)."""
        return self.eta

    def _learn(self, score: float) -> None:
        n = len(self.scores)
        if n > self.warmup:
            beta = self.scores.count_at_least(score) / n
            losses = expert_losses(beta, self._alphas, self.alpha)
            self._weights = fixed_share(self._weights, losses, self._eta_now(losses), self.sigma)
            self._alphas += self._gammas * (self.alpha - (self._alphas > beta))
        self.scores.add(score)

    def reset(self) -> None:
        super().reset()
        self.scores.clear()
        self._alphas = np.full(len(self.gammas), self.alpha)
        self._weights = np.full(len(self.gammas), 1.0 / len(self.gammas))

    def _dynamic_state(self) -> dict[str, Any]:
        return {"alphas": self._alphas.tolist(), "weights": self._weights.tolist(),
                "scores": self.scores.encoded()}

    def _load_dynamic_state(self, state: dict[str, Any]) -> None:
        self._alphas = np.asarray(state["alphas"], dtype=np.float64)
        self._weights = np.asarray(state["weights"], dtype=np.float64)
        self.scores.load(state["scores"])


class FACI(ACIExperts):
    """Fully adaptive conformal inference (Gibbs & Candès 2022): eight ACI experts with
    γ_k = 0.001·2^k, k = 0..7, mixed by exponential weights, as salesforce/online_conformal does.

    Each step (after the same warm-up as ACI) every expert pays the pinball loss at level α of
    its α_k against β_t; weights w_k ∝ w_k·exp(−η·loss_k), then w ← (1 − σ)·w + σ/8, with
    σ = 1/(2I), I = 100 and η = √(3/I)·√((ln(8I) + 2) / (((1−α)²α³ + α²(1−α)³)/3)). Then each α_k
    takes its ACI step (unclipped, as in `ACI`). q_t = the quantile at 1 − Σ_k w_k α_k.

    Parameters: `alpha` target miscoverage; `window` how many recent scores (None: all).

    >>> faci = FACI(alpha=0.1)
    >>> for score in np.abs(np.random.default_rng(0).normal(size=500)):
    ...     faci.update(score)
    >>> round(faci.alpha_t, 2), round(faci.threshold, 2), round(1 - faci.miscoverage, 2)
    (0.09, 1.57, 0.89)
    """

    name = "faci"
    horizon = 100

    def __init__(self, alpha: float = 0.1, window: int | None = 2_000) -> None:
        super().__init__(alpha, window)
        experts = len(self.gammas)
        a = self.alpha
        spread = ((1 - a) ** 2 * a**3 + a**2 * (1 - a) ** 3) / 3
        self.eta = math.sqrt(3 / self.horizon) * math.sqrt(
            (math.log(self.horizon * experts) + 2) / spread)
        self.sigma = 1 / (2 * self.horizon)
