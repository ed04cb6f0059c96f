"""Online conformal calibration: a threshold on nonconformity scores, learnt from the labels as
they arrive, so that prediction sets (or intervals) keep covering 1 − α of the truths while the
stream shifts.

A score s measures how badly a label fits a prediction: LAC's 1 − p_y, APS's ranked probability
mass up to y, a regression residual |y − ŷ| (optionally divided by a scale). The set served for a
sample is every candidate whose score is at most the current threshold q_t; once the label
arrives, `update(s_t)` moves q_t. Every calibrator here speaks the same small vocabulary:
`threshold`, `update(score, signal=None, served=None)`, `threshold_for(signal)`, `alpha`, `alpha_t`,
`state()` / `from_state()` / `load_state()`, `reset()`. Counters `steps` and `misses` count the
labels seen and those that fell above the threshold served for them.

- `SplitConformal`: q_t = the ⌈(n+1)(1−α)⌉-th smallest of the last `window` scores. Exact
  coverage on exchangeable streams, none after a shift.
- `ACI` (Gibbs & Candès 2021, "Adaptive conformal inference under distribution shift"): with
  β_t the share of past scores ≥ s_t, err_t = 1{α_t > β_t} and α_{t+1} = α_t + γ(α − err_t);
  q_t = the (1 − α_t) quantile of past scores. Deterministically, on any stream,
  |mean(err) − α| ≤ (max(α_1, 1 − α_1) + γ) / (γT).
- `FACI` (Gibbs & Candès 2022, "Conformal inference for online prediction with arbitrary
  distribution shifts"; the same idea as Zaffran et al. 2022's AgACI): eight ACI experts,
  γ_k = 0.001·2^k, mixed by exponential weights on the pinball loss of α_k against β_t, with a
  fixed share σ of the weight spread evenly.
- `SFOGD` (Orabona & Pál 2016, "Scale-free online learning"): learns q directly by online
  gradient descent on the pinball loss at level 1 − α, q ← max(0, q − D/√(3 Σ g²) · g).
- `SAOCP` (Bhatnagar, Wang, Xiong & Bai 2023, "Improved online conformal prediction via strongly
  adaptive online learning"): a new SF-OGD expert starts at every step j and lives
  `lifetime · 2^u(j)` steps (u(j): how often 2 divides j), so O(log t) are alive; they are mixed
  by coin betting (Jun et al. 2017, CBCE) with prior ∝ 1/(j² (1 + ⌊log₂ j⌋)). Coverage then holds
  on every interval of time, not only on average.
- `DtACI` (Gibbs & Candès 2022, "Conformal inference for online prediction with arbitrary
  distribution shifts", Algorithm 1, as the authors' R code `dtaci` runs it): FACI's experts and
  mixture with the authors' σ = 1/1000 and η = 2.72 (or η re-tuned from the last losses), over a
  window of 500 scores so its state stays under 20 KB.
- `PID` (Angelopoulos, Candès & Tibshirani 2023, "Conformal PID control for time series
  prediction"; aangelopoulos/conformal-time-series): quantile tracking with a step proportional
  to the recent score range (P), a saturating integrator of the errors (I), and a scorecaster
  (D) that here reads a label-free signal instead of forecasting scores. The only calibrator
  with `uses_signal`: the threshold served for a batch depends on the signal it was served with
  (`threshold_for(signal)`; a replica computes it from `signal_table()` alone, with
  `served_threshold`), and `update(score, signal)` learns how far the scores of batches unlike
  the labelled past run. Every other calibrator takes the signal and ignores it. Its deviations
  from the reference (a cold start at the top of the scale, a log scale for probability scores,
  late errors judged against the current threshold) are listed in its docstring.

Reference: salesforce/online_conformal (PyPI `online-conformal` 1.0.2), whose behaviour this
follows except where a service needs otherwise, on purpose:
- ACI's (and FACI's experts') α_t is not clipped to [0, 1]. The Gibbs–Candès recursion keeps it
  in [−γ, 1 + γ] by itself, and that is what the bound above needs: with the reference's clip,
  a stream whose every score is a new maximum makes err_t alternate 0, 1, 0, ... (half the labels
  missed at α = 0.1). The quantile is still read at clip(α_t, 0, 1): α_t ≤ 0 serves the largest
  past score, not an infinite set (the reference's choice), and ACI counts that step as covered,
  as its infinite set would have been; `misses` counts what was actually served. For FACI this
  changes the numbers: on B3's shifted stream the reference's clipped FACI covers 0.892 with a
  worst 100-step window of 0.70, the unclipped one 0.901 and 0.815 (clipped experts stuck at
  α_k = 0 forget how far behind they are).
- SAOCP's default `lifetime` is 32, not 8: on that stream 8 covers 0.886 (outside B3's ±1 point),
  32 covers 0.894, in the reference as here.
- The quantile at level 1 − a of n scores is the ⌈a·n⌉-th largest (the reference takes numpy's
  "inverted_cdf", which is the next smaller one when a·n is a whole number). With it,
  err_t = 1{α_t > β_t} is exactly "s_t fell above the threshold served" whenever 0 < α_t ≤ 1.
- Past scores live in a bounded window (ACI and FACI: the last 2,000; `window=None` keeps all,
  as the reference does), so memory, update time and the saved state stay bounded. A window
  keeps its scores at float32 precision, each rounded up (so a repeated score is covered by the
  threshold it set, as at full precision), and a state stores them as base64 of float32, 4 bytes
  a score (the reference keeps float64 in memory and saves nothing): ACI's and FACI's full
  windows are about 11 KB of state. A state saved with another window loads, keeping the
  newest scores that fit.
- Split conformal uses the finite-sample ⌈(n+1)(1−α)⌉ rank (the reference takes the plain 1 − α
  quantile), and while n < (1 − α)/α that rank exceeds n: the threshold is then the largest score
  seen, not +∞.
- With no score yet, every threshold is 0 (the reference's quantile of nothing): a class set is
  then the argmax class alone, an interval has zero width.
- Everything is plain floats and small numpy arrays (the reference runs pandas on every update);
  one update costs microseconds.
"""

from __future__ import annotations

from typing import Any

from adapters.conformal.aci import ACI
from adapters.conformal.base import (
    Calibrator,
    ScoreWindow,
    SignalTable,
    from_log_scale,
    served_threshold,
    to_log_scale,
)
from adapters.conformal.dtaci import DtACI
from adapters.conformal.faci import FACI
from adapters.conformal.pid import PID
from adapters.conformal.saocp import SAOCP
from adapters.conformal.scores import (
    aps_scores,
    aps_set,
    interval,
    lac_scores,
    lac_set,
    pinball_loss,
    residual_scores,
)
from adapters.conformal.sfogd import SFOGD
from adapters.conformal.split import SplitConformal

CALIBRATORS: dict[str, type[Calibrator]] = {
    SplitConformal.name: SplitConformal,
    ACI.name: ACI,
    FACI.name: FACI,
    SFOGD.name: SFOGD,
    SAOCP.name: SAOCP,
    DtACI.name: DtACI,
    PID.name: PID,
}


def build_calibrator(name: str, alpha: float = 0.1, **options: Any) -> Calibrator:
    """The calibrator called `name` (split, aci, faci, dtaci, sfogd, saocp, pid) at target
    miscoverage α.

    >>> build_calibrator("saocp", 0.1, max_scale=5.0, lifetime=32)
    SAOCP(alpha=0.1, max_scale=5.0, lifetime=32)
    """
    try:
        kind = CALIBRATORS[name]
    except KeyError:
        raise ValueError(f"unknown calibrator {name!r}; choose one of: "
                         f"{', '.join(CALIBRATORS)}") from None
    allowed = [option for option in kind.option_names() if option != "alpha"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"calibrator {name!r} takes the options {allowed}; got {unknown}")
    return kind(alpha=alpha, **options)


__all__ = [
    "ACI", "CALIBRATORS", "PID", "Calibrator", "DtACI", "FACI", "SAOCP", "SFOGD", "ScoreWindow",
    "SignalTable", "SplitConformal", "aps_scores", "aps_set", "build_calibrator", "from_log_scale",
    "interval",
    "lac_scores", "lac_set", "pinball_loss", "residual_scores", "served_threshold", "to_log_scale",
]
