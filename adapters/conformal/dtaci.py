"""DtACI: dynamically tuned adaptive conformal inference (Gibbs & Candès 2022)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from adapters.conformal.base import _check_positive
from adapters.conformal.faci import ACIExperts


class DtACI(ACIExperts):
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
    unclipped, as in `ACI`. The window of past scores defaults to 500 (ACI's and FACI's: 2,000),
    about 3 KB of stored state; `eta_lookback` adds its losses to it as JSON numbers (about 19
    bytes each), so keep it under about 900 for a state under 20 KB.

    Parameters: `alpha` target miscoverage; `sigma`, `eta`, `eta_lookback` as above; `window`
    how many recent scores β_t and q_t are taken over.

    >>> dtaci = DtACI(alpha=0.1)
    >>> for score in np.abs(np.random.default_rng(0).normal(size=500)):
    ...     dtaci.update(score)
    >>> round(1 - dtaci.miscoverage, 2)
    0.9
    """

    name = "dtaci"
    _losses: deque[float]  # set by reset()

    def __init__(self, alpha: float = 0.1, sigma: float = 0.001, eta: float = 2.72,
                 eta_lookback: int = 0, window: int | None = 500) -> None:
        self.sigma = _check_positive("sigma", sigma)
        if self.sigma >= 1:
            raise ValueError(f"sigma is the share of weight spread evenly, below 1; got {sigma}")
        self.eta = _check_positive("eta", eta)
        if int(eta_lookback) != eta_lookback or eta_lookback < 0:
            raise ValueError(f"eta_lookback must be a whole number ≥ 0 (0: η fixed); "
                             f"got {eta_lookback}")
        self.eta_lookback = int(eta_lookback)
        super().__init__(alpha, window)

    def _eta_now(self, losses: np.ndarray) -> float:
        if not self.eta_lookback:
            return self.eta
        self._losses.append(float(self._weights @ losses))
        lookback = self.eta_lookback
        if len(self._losses) == lookback:
            squares = sum(loss * loss for loss in self._losses)
            if squares > 0:
                return math.sqrt((math.log(2 * len(self.gammas) * lookback) + 1) / squares)
        return self.eta

    def reset(self) -> None:
        self._losses = deque(maxlen=self.eta_lookback or None)
        super().reset()

    def _dynamic_state(self) -> dict[str, Any]:
        return {**super()._dynamic_state(), "losses": list(self._losses)}

    def _load_dynamic_state(self, state: dict[str, Any]) -> None:
        super()._load_dynamic_state(state)
        self._losses.extend(float(v) for v in state["losses"])
