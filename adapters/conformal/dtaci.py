"""DtACI: dynamically tuned adaptive conformal inference (Gibbs & Candès 2022)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from adapters.conformal.base import (
    Calibrator,
    ScoreWindow,
    _check_positive,
    _check_window,
    expert_losses,
    fixed_share,
)


class DtACI(Calibrator):
    """Dynamically tuned ACI (Gibbs & Candès 2022, "Conformal inference for online prediction
    with arbitrary distribution shifts", arXiv 2208.08401, Algorithm 1), as the authors' R code
    (`dtaci`) runs it: k ACI experts with step sizes `gammas`, mixed by exponential weights.

    Each step (after ACI's warm-up), with β_t the share of the window's scores ≥ s_t:

        ℓ_i = pinball(β_t − α_i) = α (β_t − α_i) − min(0, β_t − α_i)
        w̄_i = w_i · exp(−η ℓ_i);   w_i ← (1 − σ) w̄_i / Σ w̄ + σ / k
        α_i ← α_i + γ_i (α − 1{α_i > β_t})

    and the level served is the weighted mean α_t = Σ p_i α_i (the R code's deterministic
    output; the paper also allows drawing one expert at random). The authors' defaults: σ = 1/1000,
    η = 2.72; with `eta_lookback` > 0, η is re-tuned every step from the last `eta_lookback`
    mixture losses, η = √((log(2k·L) + 1) / Σ ℓ²) (their `etaAdapt`, L = 500 there). The γ grid
    is the paper's, 0.001·2^i for i = 0..7.

    It differs from `FACI` (the same experts, the salesforce/online_conformal tuning σ = 1/200,
    η from an interval length of 100) by its faster switching (σ = 1/1000) and its η; α_i are left
    unclipped, as in `ACI`. The window of past scores defaults to 500 (not ACI's 10,000) so the
    stored state stays under 20 KB (about 10 KB of JSON); `eta_lookback` adds its losses to it,
    so keep `window` + `eta_lookback` under about 900 for the same bound.

    Parameters: `alpha` target miscoverage; `sigma`, `eta`, `eta_lookback` as above; `window`
    how many recent scores β_t and q_t are taken over.

    >>> dtaci = DtACI(alpha=0.1)
    >>> for score in np.abs(np.random.default_rng(0).normal(size=500)):
    ...     dtaci.update(score)
    >>> round(1 - dtaci.miscoverage, 2)
    0.9
    """

    name = "dtaci"
    gammas = tuple(0.001 * 2**k for k in range(8))
    # set by reset()
    _alphas: np.ndarray
    _weights: np.ndarray
    _losses: deque[float]

    def __init__(self, alpha: float = 0.1, sigma: float = 0.001, eta: float = 2.72,
                 eta_lookback: int = 0, window: int | None = 500) -> None:
        super().__init__(alpha)
        self.sigma = _check_positive("sigma", sigma)
        if self.sigma >= 1:
            raise ValueError(f"sigma is the share of weight spread evenly, below 1; got {sigma}")
        self.eta = _check_positive("eta", eta)
        if int(eta_lookback) != eta_lookback or eta_lookback < 0:
            raise ValueError(f"eta_lookback must be a whole number ≥ 0 (0: η fixed); "
                             f"got {eta_lookback}")
        self.eta_lookback = int(eta_lookback)
        self.warmup = math.floor(1.0 / self.alpha)
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

    def _current_eta(self) -> float:
        lookback = self.eta_lookback
        if lookback and len(self._losses) == lookback:
            squares = sum(loss * loss for loss in self._losses)
            if squares > 0:
                return math.sqrt((math.log(2 * len(self.gammas) * lookback) + 1) / squares)
        return self.eta

    def _learn(self, score: float) -> None:
        n = len(self.scores)
        if n > self.warmup:
            beta = self.scores.count_at_least(score) / n
            losses = expert_losses(beta, self._alphas, self.alpha)
            if self.eta_lookback:
                self._losses.append(float(self._weights @ losses))
            self._weights = fixed_share(self._weights, losses, self._current_eta(), self.sigma)
            self._alphas += self._gammas * (self.alpha - (self._alphas > beta))
        self.scores.add(score)

    def reset(self) -> None:
        super().reset()
        self.scores.clear()
        self._alphas = np.full(len(self.gammas), self.alpha)
        self._weights = np.full(len(self.gammas), 1.0 / len(self.gammas))
        self._losses = deque(maxlen=self.eta_lookback or None)

    def _dynamic_state(self) -> dict[str, Any]:
        return {"alphas": self._alphas.tolist(), "weights": self._weights.tolist(),
                "losses": list(self._losses), "scores": self.scores.scores()}

    def _load_dynamic_state(self, state: dict[str, Any]) -> None:
        self._alphas = np.asarray(state["alphas"], dtype=np.float64)
        self._weights = np.asarray(state["weights"], dtype=np.float64)
        self._losses.extend(float(v) for v in state["losses"])
        for score in state["scores"]:
            self.scores.add(float(score))
