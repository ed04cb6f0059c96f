"""Conformal PID control (Angelopoulos, Candès & Tibshirani 2023), with a scorecaster that reads
a label-free signal instead of forecasting the scores."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from adapters.conformal.base import (
    Calibrator,
    SignalTable,
    _check_positive,
    _check_score,
    from_log_scale,
    to_log_scale,
)

# the tan of the integrator saturates here instead of at ±∞ (one reference variant stops at ±100):
# tan(1.56) ≈ 93, so the integrator alone can still open every set, and thresholds stay finite
_SATURATED = 1.56
_TINY = 1e-12


def _default_c_sat(horizon: float = 10_000, delta: float = 0.01) -> float:
    """C_sat = 2/π · (⌈log(T) · δ⌉ − 1/log(T)), the R package conformalForecast's default."""
    log_t = math.log(horizon)
    return 2 / math.pi * (math.ceil(log_t * delta) - 1 / log_t)


C_SAT = round(_default_c_sat(), 4)  # 0.5675 for T = 10,000


class PID(Calibrator):
    """Conformal PID control (Angelopoulos, Candès & Tibshirani, NeurIPS 2023, arXiv 2307.16895;
    the authors' code: aangelopoulos/conformal-time-series, `quantile_integrator_log_scorecaster`).

    On scores u (the scores themselves, or u = −log(1 − s) with `transform="log"`), the threshold
    served for a batch with label-free signal x (None: no scorecast) is

        τ_t(x) = max(0, p_t + r_t(E_t) + β_t · |x − m_t| / `signal_scale`)

    and q_t(x) = τ_t(x), or 1 − exp(−τ_t(x)) on the log scale.

    - P, quantile tracking: p_{t+1} = p_t + η_t (err_t − α*_t), err_t = 1{u_t > τ_t(x_t)}, with the
      proportional step η_t = `lr` · (max − min of the last `range_window` scores u), as the
      reference's `proportional_lr` (its T_burnin window); `lr` at the first label.
    - I, the saturating error integrator: E_t = Σ_{i≤t} (err_i − α*_i) and
      r_t(E) = K_I · tan(E · log(t + 1) / (C_sat · (t + 1))), K_I = `max_scale`, C_sat = `c_sat`
      (default 2/π · (⌈log T · 0.01⌉ − 1/log T) at T = 10,000, the R package conformalForecast's
      formula; its K_I default is the largest |score|). The tan saturates at an argument of ±1.56
      rather than ±π/2 (±∞), so thresholds stay finite.
    - D, the scorecaster. The reference forecasts the next score from past scores (a Theta or AR
      model fitted offline); here it reads a label-free signal x known when the batch is served
      (in the service: the batch's mean entropy minus the reference data's, over log K). The
      tracker's level was learnt on labelled batches whose signal ran around m_t with spread
      d_t (running means of x and of |x − m| over the last `signal_memory` labels); a batch
      further than `signal_band` spreads from m_t is one that level may not fit yet, and gets

          β_t · z,   z = max(0, |x − m_t| / d_t − `signal_band`)

      on top, up to the top of the scale (K_I, or every class in on the log scale). β_t ≥ 0,
      how much higher scores run per spread beyond the band, is learnt with P's pinball
      gradient, β_{t+1} = max(0, β_t + `scorecast_lr` · η_t (err_t − α) z_t), from the prior
      `slope_start` (a batch unlike anything labelled gets wide sets until labels say
      otherwise). After an abrupt shift the threshold moves at the first batch served, before
      any label of it is back; `scorecast_lr` = 0 turns the scorecaster off (the reference's
      `scorecast=False`).
    - The served-coverage loop. P and I aim at a target α*_t (α*_1 = α), not at α itself: where
      the caller passes the threshold q̂ a label's prediction was served with (the service does:
      the record keeps it), α*_{t+1} = clip(α*_t + `coverage_lr` · (α − 1{s_t > q̂}), 0, 1),
      ACI's step (Gibbs & Candès 2021) on the served verdicts. Scores that were within the
      threshold served raise α*, scores above it lower it, so the thresholds served come to hold
      about 1 − α of the scores whatever the scorecaster added. The verdict is the threshold's,
      not the set's: a set always keeps the predicted class, so an accurate model's sets cover
      more than 1 − α at any threshold, and judged by set membership α* would climb to 1 and the
      threshold to 0, leaving nothing to widen from after a shift. No bound is proven here (α*
      moves the threshold through P and I, not directly as ACI's α_t does); B3 measures it. β is
      still learnt against α itself: against α*, which rises where the served sets over-cover,
      every covered batch far from the labelled past would push β down until the scorecaster is
      off when the next switch comes. `coverage_lr` = 0 turns the loop off, and α* is α again.

    Deviations from the reference, on purpose:
    - Cold start: before the first label p is the top of the scale (K_I, or −log of 1e-12 on the
      log scale: every class in), not 0, so what is served before labels come back covers; over
      the first `range_window` labels (the reference's burn-in) p is the split-conformal
      quantile of the scores so far (the ⌈(n + 1)(1 − α)⌉-th smallest), and tracking starts
      from there.
    - With labels late, err_t is judged against the threshold the sample's signal gets *now*
      (as every calibrator here judges a late score against its current threshold), so late
      misses that a step already answered do not push again, and P learns the level of a new
      regime while the scorecaster still widens its batches. It also counts misses that the
      thresholds served did not make (by the time a batch's labels are judged, the labels before
      them have moved m_t toward its signal and shrunk its widening), which is what the
      served-coverage loop (above, not in the reference) takes back: without it the sets
      served covered 91.4 to 92.2% with labels 32 late where PID counted 90.0% (BENCHMARKS.md
      B3, `bn` on Digits-C, four draws of the stream), and with classes in runs 87.6% (the
      count errs the other way there; 90.6% with the loop).
    - `transform="log"` (for LAC and APS scores in [0, 1]) runs the controller on −log(1 − s):
      the same sets, but a fixed step moves the set size evenly, where on the raw scale a
      confidently wrong model's scores crowd just below 1.

    The state is a few floats and the last `range_window` scores: about 2.5 KB of JSON with the
    defaults; an update costs a few µs. A state saved before the served-coverage loop existed
    (no `coverage_lr`) loads, and carries on with α* = α.

    >>> pid = PID(alpha=0.1)
    >>> for step in range(400):
    ...     pid.update(0.3 + 0.1 * (step % 3), signal=0.01 * (step % 5))  # a calm stretch
    >>> round(pid.threshold_for(0.02), 2), round(pid.threshold_for(0.5), 2)  # then a shift
    (0.5, 1.0)
    """

    name = "pid"
    uses_signal = True
    # a rate, safe to change mid-stream; a state from before the loop has none and loads
    resizable = ("coverage_lr",)
    # set by reset()
    _tracker: float
    _target: float
    _error_sum: float
    _slope: float
    _center: float
    _spread: float
    _signals_seen: int
    _recent: deque[float]

    def __init__(self, alpha: float = 0.1, lr: float = 0.1, range_window: int = 100,
                 max_scale: float = 1.0, c_sat: float = C_SAT, transform: str = "none",
                 scorecast_lr: float = 1.0, signal_band: float = 3.5, signal_memory: int = 64,
                 slope_start: float = 5.0, coverage_lr: float = 0.001) -> None:
        super().__init__(alpha)
        self.lr = _check_positive("lr", lr)
        if int(range_window) != range_window or range_window < 2:
            raise ValueError(f"range_window must be a whole number ≥ 2 (scores whose range "
                             f"scales the step); got {range_window}")
        self.range_window = int(range_window)
        self.max_scale = _check_positive("max_scale", max_scale)
        self.c_sat = _check_positive("c_sat", c_sat)
        if transform not in ("none", "log"):
            raise ValueError(f"transform is 'none' or 'log' (−log(1 − s), for scores in [0, 1]); "
                             f"got {transform!r}")
        self.transform = transform
        for name, value in (("scorecast_lr", scorecast_lr), ("signal_band", signal_band),
                            ("slope_start", slope_start), ("coverage_lr", coverage_lr)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be ≥ 0 and finite; got {value}")
        self.scorecast_lr = float(scorecast_lr)
        self.signal_band = float(signal_band)
        self.slope_start = float(slope_start)
        self.coverage_lr = float(coverage_lr)
        if int(signal_memory) != signal_memory or signal_memory < 1:
            raise ValueError(f"signal_memory must be a whole number ≥ 1 (labels); "
                             f"got {signal_memory}")
        self.signal_memory = int(signal_memory)
        self._top = to_log_scale(1.0) if transform == "log" else self.max_scale
        self.reset()

    # --- the three terms, on the controller's scale -------------------------------------------

    @property
    def alpha_t(self) -> float:
        """α*_t, the miscoverage P and I aim at: α moved by the served-coverage loop."""
        return self._target

    @property
    def integrator(self) -> float:
        """r_t(E_t), the integrator's share of the threshold (on the controller's scale)."""
        t = self.steps
        argument = self._error_sum * math.log(t + 1) / (self.c_sat * (t + 1))
        return self.max_scale * math.tan(min(max(argument, -_SATURATED), _SATURATED))

    def _distance(self, signal: float | None) -> float | None:
        """z: how many spreads beyond the band `signal` lies from the labelled past's."""
        if (signal is None or not self.scorecast_lr or self._signals_seen < 2
                or not math.isfinite(signal)):
            return None
        return max(0.0, abs(signal - self._center) / max(self._spread, _TINY) - self.signal_band)

    def _tau(self, distance: float | None) -> float:
        base = self._tracker + self.integrator
        if distance is None:
            return max(0.0, base)
        # the scorecaster widens up to the top of the scale (every class in, or ±K_I), no further
        return max(0.0, min(base + self._slope * distance, max(base, self._top)))

    def _external(self, tau: float) -> float:
        return from_log_scale(tau) if self.transform == "log" else tau

    @property
    def threshold(self) -> float:
        return self._external(self._tau(None))

    def threshold_for(self, signal: float | None) -> float:
        return self._external(self._tau(self._distance(signal)))

    def signal_table(self) -> SignalTable | None:
        if not self.scorecast_lr or self._signals_seen < 2:
            return None
        return {"base": self._tracker + self.integrator, "center": self._center,
                "spread": max(self._spread, _TINY), "band": self.signal_band,
                "slope": self._slope, "top": self._top, "transform": self.transform}

    # --- learning -----------------------------------------------------------------------------

    def update(self, score: float, signal: float | None = None,
               served: float | None = None) -> None:
        score = _check_score(score)
        # the served verdict, on the caller's scale (where the threshold served was)
        within = None if served is None or not math.isfinite(served) else score <= served + 1e-9
        if self.transform == "log":
            if not 0.0 <= score <= 1.0 + 1e-9:
                raise ValueError(f"transform 'log' takes scores in [0, 1] (LAC, APS); got {score}")
            score = to_log_scale(score)
        distance = self._distance(signal)
        error = score > self._tau(distance)
        self.steps += 1
        self.misses += error
        recent = self._recent
        step = self.lr * (max(recent) - min(recent)) if recent else self.lr
        recent.append(score)
        if self.steps <= self.range_window:
            # burn-in: the split-conformal quantile of the scores so far, the tracker's start
            ordered = sorted(recent)
            n = len(ordered)
            self._tracker = ordered[min(math.ceil((n + 1) * (1 - self.alpha) - 1e-9), n) - 1]
        else:
            self._tracker += step * (error - self._target)
        if distance is not None:
            # against α itself, not α* (the class docstring says why)
            self._slope = max(0.0, self._slope
                              + self.scorecast_lr * step * (error - self.alpha) * distance)
        self._error_sum += error - self._target
        if within is not None and self.coverage_lr:
            self._target = min(max(self._target + self.coverage_lr
                                   * (self.alpha - (not within)), 0.0), 1.0)
        if signal is not None and math.isfinite(signal):
            # the signal of the labelled past, which the tracker's level was learnt on
            if self._signals_seen:
                self._spread += (abs(signal - self._center) - self._spread) / min(
                    self._signals_seen, self.signal_memory)
            self._signals_seen += 1
            self._center += (signal - self._center) / min(self._signals_seen, self.signal_memory)

    def _learn(self, score: float) -> None:  # update() does it all
        raise NotImplementedError

    def reset(self) -> None:
        super().reset()
        self._tracker = self._top
        self._target = self.alpha
        self._error_sum = 0.0
        self._slope = self.slope_start
        self._center = 0.0
        self._spread = 0.0
        self._signals_seen = 0
        self._recent = deque(maxlen=self.range_window)

    def _dynamic_state(self) -> dict[str, Any]:
        return {"tracker": self._tracker, "target": self._target,
                "error_sum": self._error_sum, "slope": self._slope,
                "center": self._center, "spread": self._spread,
                "signals_seen": self._signals_seen,
                "recent": list(self._recent)}

    def _load_dynamic_state(self, state: dict[str, Any]) -> None:
        self._tracker = float(state["tracker"])
        # the loop off (coverage_lr 0, a resizable option): the target is α, whatever was saved
        self._target = float(state.get("target", self.alpha)) if self.coverage_lr else self.alpha
        self._error_sum = float(state["error_sum"])
        self._slope = float(state["slope"])
        self._center = float(state["center"])
        self._spread = float(state["spread"])
        self._signals_seen = int(state["signals_seen"])
        self._recent.extend(float(v) for v in state["recent"])
