"""SAOCP: strongly adaptive online conformal prediction (Bhatnagar et al. 2023)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from adapters.conformal.base import Calibrator, _check_positive
from adapters.conformal.scores import pinball_loss

# rows of SAOCP's expert table, one column per live expert
_START, _LIFE, _PRIOR, _YHAT, _GRAD_SQ, _Z, _WZ, _AGE, _BET, _WEIGHT, _FLOOR = range(11)
_SAVED_ROWS = {"expert_start": _START, "expert_threshold": _YHAT, "expert_grad_sq": _GRAD_SQ,
               "expert_z": _Z, "expert_wz": _WZ, "expert_age": _AGE}
# a newcomer's Σg² starts here rather than at 0, so g/√Σg² is 0 (not 0/0) until its first
# non-zero gradient, which then swamps it: the reference's "no step while Σg² = 0", branch-free
_TINY = 1e-300


class SAOCP(Calibrator):
    """Strongly adaptive online conformal prediction (Bhatnagar et al. 2023), as
    salesforce/online_conformal's SAOCP.

    Step t: the served threshold ŝ_t = Σ_j p_j q_j over the live experts; experts older than their
    lifetime retire; a new SF-OGD expert starts at q = ŝ_t and lives `lifetime`·2^u(t) steps. Each
    expert j keeps coin-betting wealth: with its bet w_j = (z_j / age_j)·(1 + wz_j) (0 when new),
    g_j = clip((ℓ(meta) − ℓ(q_j)) / (D · max(α, 1 − α)), −1{w_j > 0}, 1), z_j += g_j,
    wz_j += g_j w_j, where ℓ is the pinball loss at 1 − α and meta the mixture after the new
    expert joined; then q_j takes its SF-OGD step. The mixture weights are p_j ∝ π_j · max(0, w_j)
    with prior π_j ∝ 1/(j² (1 + ⌊log₂ j⌋)), or π itself when no bet is positive.

    The live experts, O(`lifetime` · log t) of them, are the columns of one numpy table, so an
    update is a fixed number of vector operations; with an even `lifetime` exactly one expert
    retires at each step once the stream is long enough, and the newcomer takes its column.

    Parameters: `alpha` target miscoverage; `max_scale` D, as in `SFOGD` (it matters most: set it
    to the real score range); `lifetime` g, the base lifetime. The default is 32, not the
    reference's 8: on B3's shifted stream the reference itself covers 0.886 with 8 and 0.894 with
    32 (target 0.9 ± 0.01), with the same worst 100-step window.

    >>> saocp = SAOCP(alpha=0.1, max_scale=5.0)
    >>> scores = np.abs(np.random.default_rng(0).normal(size=1000))
    >>> for score in scores:
    ...     saocp.update(score)
    >>> round(saocp.threshold, 1), round(1 - saocp.miscoverage, 2), saocp.live_experts
    (1.9, 0.9, 112)
    """

    name = "saocp"
    # set by reset()
    _t: int
    _threshold: float
    # step at which an expert retires -> its slots in the table
    _retiring: dict[int, list[int]]

    def __init__(self, alpha: float = 0.1, max_scale: float = 1.0, lifetime: int = 32) -> None:
        super().__init__(alpha)
        self.max_scale = _check_positive("max_scale", max_scale)
        if int(lifetime) != lifetime or lifetime < 1:
            raise ValueError(f"lifetime must be a whole number ≥ 1; got {lifetime}")
        self.lifetime = int(lifetime)
        # constants as 0-d arrays: numpy multiplies by them faster than by Python floats
        self._alpha = np.array(self.alpha)
        self._level = 1.0 - self.alpha
        self._base_lr = np.array(self.max_scale / math.sqrt(3.0))
        self._loss_scale = np.array(1.0 / (self.max_scale * max(self.alpha, 1.0 - self.alpha)))
        self._one = np.array(1.0)
        self._zero = np.array(0.0)
        self.reset()

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def live_experts(self) -> int:
        return self._table.shape[1]

    def _newcomer(self, start: int, threshold: float) -> np.ndarray:
        twos = (start & -start).bit_length() - 1  # how often 2 divides the start time
        life = self.lifetime * 2**twos
        prior = 1.0 / (start * start * start.bit_length())  # bit_length = 1 + ⌊log₂ start⌋
        return np.array((start, life, prior, threshold, _TINY, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))

    def _use_table(self, table: np.ndarray) -> None:
        self._table = table
        self._rows = tuple(table)  # views, made once per table rather than at every step

    def _mixture(self) -> float:
        _, _, prior, yhat, _, _, _, _, _, weight, _ = self._rows
        total = np.add.reduce(weight)
        if total > 0:
            return float(weight @ yhat / total)
        return float(prior @ yhat / np.add.reduce(prior)) if prior.size else 0.0

    def _learn(self, score: float) -> None:
        t = self._t
        newcomer = self._newcomer(t, self._threshold)
        retiring = self._retiring.pop(t, ())
        if len(retiring) == 1:  # the steady state for an even lifetime: a column changes hands
            slot = retiring[0]
            self._table[:, slot] = newcomer
        else:
            table = np.delete(self._table, retiring, axis=1) if retiring else self._table
            self._use_table(np.concatenate((table, newcomer[:, None]), axis=1))
            slot = self._table.shape[1] - 1
            if retiring:
                self._index_retirements()
        self._retiring.setdefault(t + int(newcomer[_LIFE]) + 1, []).append(slot)
        # the reference scores its experts against the mixture after the retirements and the
        # newcomer joined (its bet is 0), not against the threshold it served
        meta_loss = pinball_loss(score, self._mixture(), self._level)

        _, _, _, yhat, grad_sq, z, wz, age, bet, _, floor = self._rows
        gap = score - yhat
        direction = np.sign(gap)
        # the pinball gradient at level 1 − α: −(1 − α) above, α below, 0 on the threshold
        gradient = self._alpha * np.abs(direction) - (direction > 0)
        g = (meta_loss + gap * gradient) * self._loss_scale  # (ℓ(meta) − ℓ(q_j)) / (D·max(α,1−α))
        np.minimum(g, self._one, out=g)
        np.maximum(g, floor, out=g)
        z += g
        wz += g * bet
        age += self._one
        grad_sq += gradient * gradient
        step = gradient / np.sqrt(grad_sq)
        step *= self._base_lr
        yhat -= step
        np.maximum(yhat, self._zero, out=yhat)
        self._settle_bets()
        self._threshold = self._mixture()
        self._t = t + 1

    def _settle_bets(self) -> None:
        """Bets from wealth, and what follows from them: mixture weights and g's lower clip."""
        _, _, prior, _, _, z, wz, age, bet, weight, floor = self._rows
        np.multiply(z, self._one + wz, out=bet)
        bet /= age
        np.maximum(bet, self._zero, out=weight)
        weight *= prior
        np.sign(weight, out=floor)
        np.negative(floor, out=floor)

    def _index_retirements(self) -> None:
        self._retiring = {}
        for slot, (start, life) in enumerate(zip(self._table[_START], self._table[_LIFE],
                                                 strict=True)):
            self._retiring.setdefault(int(start + life) + 1, []).append(slot)

    def reset(self) -> None:
        super().reset()
        self._t = 1
        self._use_table(np.zeros((11, 0)))
        self._retiring = {}
        self._threshold = 0.0

    def _dynamic_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"t": self._t}
        for key, row in _SAVED_ROWS.items():
            values = self._table[row].tolist()
            state[key] = [int(v) for v in values] if row in (_START, _AGE) else values
        return state

    def _load_dynamic_state(self, state: dict[str, Any]) -> None:
        self._t = int(state["t"])
        columns = [self._newcomer(int(start), 0.0) for start in state["expert_start"]]
        self._use_table(np.stack(columns, axis=1) if columns else np.zeros((11, 0)))
        for key, row in _SAVED_ROWS.items():
            self._table[row] = np.asarray(state[key], dtype=np.float64)
        if columns:
            self._settle_bets()
        self._index_retirements()
        self._threshold = self._mixture()
