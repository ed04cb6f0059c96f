"""The calibrator interface every online conformal method shares, its argument checks, and
the bounded window of past scores the quantile-based methods read."""

from __future__ import annotations

import base64
import bisect
import inspect
import math
import struct
from collections import deque
from typing import Any, ClassVar

import numpy as np


def _check_alpha(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha is the target miscoverage and lies in (0, 1); got {alpha}")
    return float(alpha)


def _check_window(window: int | None, at_least: int = 1) -> int | None:
    if window is not None and (int(window) != window or window < at_least):
        raise ValueError(f"window must be a whole number ≥ {at_least} (or None for every past "
                         f"score); got {window}")
    return None if window is None else int(window)


def _check_positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite; got {value}")
    return float(value)


def _check_score(score: float) -> float:
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"scores must be finite; got {score}")
    return score


def expert_losses(beta: float, alphas: np.ndarray, alpha: float) -> np.ndarray:
    """Each ACI expert's pinball loss at level α for its α_k against β_t, the share of past
    scores at least the new one (Gibbs & Candès 2022): α·(β − α_k) − min(0, β − α_k)."""
    gap = beta - alphas
    return alpha * gap - np.minimum(0.0, gap)


def fixed_share(weights: np.ndarray, losses: np.ndarray, eta: float, share: float
                ) -> np.ndarray:
    """Exponential weights on one round's losses, then a fixed share σ of the weight spread
    evenly (Herbster & Warmuth 1998), as FACI and DtACI mix their experts.

    >>> fixed_share(np.array([0.5, 0.5]), np.array([0.0, 1.0]), eta=1.0, share=0.1).round(3)
    array([0.708, 0.292])
    """
    weights = weights * np.exp(-eta * (losses - losses.min()))
    weights *= (1.0 - share) / weights.sum()
    return weights + share / len(weights)


def _ceil(x: float) -> int:
    """⌈x⌉, forgiving the float error that turns a whole n·a into n·a + 1e-15."""
    return math.ceil(x - 1e-9)


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32 = struct.Struct("<f")
_BITS32 = struct.Struct("<i")


def float32_at_least(score: float) -> float:
    """The smallest float32 ≥ `score` (clipped to float32's range): what a window keeps, so a
    threshold taken from it is never below the score it came from, and the same score again is
    covered by it, as it was at full precision.

    >>> float32_at_least(0.7) >= 0.7, float32_at_least(0.5) == 0.5, float32_at_least(-0.7) >= -0.7
    (True, True, True)
    """
    if not -_FLOAT32_MAX <= score <= _FLOAT32_MAX:
        if score != score:
            raise ValueError("scores must be finite; got nan")
        return _FLOAT32_MAX if score > 0 else -_FLOAT32_MAX
    packed = _FLOAT32.pack(score)  # rounded to the nearest float32
    rounded = _FLOAT32.unpack(packed)[0]
    if rounded >= score:
        return rounded
    if rounded == 0.0:  # 0 or -0 below a tiny positive score: the smallest positive float32
        return _FLOAT32.unpack(_BITS32.pack(1))[0]
    # one step up: a positive float's bit pattern grows with it, a negative one's shrinks
    bits = _BITS32.unpack(packed)[0]
    return _FLOAT32.unpack(_BITS32.pack(bits + 1 if rounded > 0 else bits - 1))[0]


class ScoreWindow:
    """The last `size` scores, in arrival order and sorted, for O(log n) ranks and counts.

    Scores are kept at float32 precision, each rounded up (`float32_at_least`: a score and
    the threshold taken from it compare as they did at full precision), so a window is stored
    exactly in 4 bytes a score: `encoded()` is their base64 text, about 5.3 KB per 1,000
    scores where a JSON list of float64 text takes about 19 KB.

    >>> window = ScoreWindow(size=3)
    >>> for s in [0.4, 0.1, 0.3, 0.2]:
    ...     window.add(s)
    >>> [round(s, 6) for s in window.scores()], round(window.largest(1), 6)
    ([0.1, 0.3, 0.2], 0.3)
    >>> window.count_at_least(0.25), ScoreWindow.decoded(window.encoded()) == window.scores()
    (1, True)
    """

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.arrivals: deque[float] = deque(maxlen=size)
        self.ordered: list[float] = []

    def __len__(self) -> int:
        return len(self.arrivals)

    def add(self, score: float) -> None:
        score = float32_at_least(score)
        if self.size is not None and len(self.arrivals) == self.size:
            del self.ordered[bisect.bisect_left(self.ordered, self.arrivals[0])]
        self.arrivals.append(score)
        bisect.insort(self.ordered, score)

    def count_at_least(self, score: float) -> int:
        return len(self.ordered) - bisect.bisect_left(self.ordered, score)

    def largest(self, k: int) -> float:
        """The k-th largest score, k clipped to [1, n]; 0 when there is none."""
        n = len(self.ordered)
        return self.ordered[n - min(max(k, 1), n)] if n else 0.0

    def scores(self) -> list[float]:
        return list(self.arrivals)

    def encoded(self) -> str:
        """The scores in arrival order as base64 of little-endian float32: what a state keeps."""
        return base64.b64encode(np.asarray(self.arrivals, dtype="<f4").tobytes()).decode("ascii")

    @staticmethod
    def decoded(saved: str | list[float]) -> list[float]:
        """Scores from `encoded()`, or from the plain JSON list that states saved before;
        ValueError for anything else, or for a score that is not finite."""
        if isinstance(saved, str):
            scores = np.frombuffer(base64.b64decode(saved, validate=True), dtype="<f4").tolist()
        elif isinstance(saved, list):
            scores = [float(score) for score in saved]
        else:
            raise ValueError(f"a saved window is base64 text or a list; got {type(saved)}")
        if not all(math.isfinite(score) for score in scores):
            raise ValueError("a saved window holds a score that is not finite")
        return scores

    def load(self, saved: str | list[float]) -> None:
        """Add the scores of a saved window (`encoded()` or a JSON list), oldest first."""
        for score in self.decoded(saved):
            self.add(score)

    def clear(self) -> None:
        self.arrivals.clear()
        self.ordered.clear()


SignalTable = dict[str, Any]


# the log scale's floor: 1 − s below this counts as this (u = −log(1e-12) ≈ 27.6 at most)
LOG_FLOOR = 1e-12


def to_log_scale(score: float) -> float:
    """u = −log(1 − s) for a score s in [0, 1] (LAC's u is −log p_y), floored at 1e-12."""
    return -math.log(max(1.0 - score, LOG_FLOOR))


def from_log_scale(u: float) -> float:
    """The score s with −log(1 − s) = u: thresholds on the log scale back to the score's."""
    return -math.expm1(-u)


def served_threshold(threshold: float, table: SignalTable | None, signal: float | None) -> float:
    """The threshold to serve a batch with label-free signal `signal`, from a calibrator's
    `threshold` and `signal_table()` alone (what a replica holds):
    max(0, base + slope · max(0, |signal − center| / spread − band)), at most max(base, top),
    back from the log scale if the table says so (`PID`'s scorecaster); the plain `threshold`
    without a table or a signal.

    >>> table = {"base": 0.5, "center": 0.1, "spread": 0.05, "band": 3.0, "slope": 0.2,
    ...          "top": 1.0, "transform": "none"}
    >>> served_threshold(0.5, table, 0.3), served_threshold(0.5, table, 0.2)  # 4 and 2 spreads
    (0.7, 0.5)
    >>> served_threshold(0.5, table, None)
    0.5
    """
    if table is None or signal is None or not math.isfinite(signal):
        return threshold
    beyond = max(0.0, abs(signal - table["center"]) / table["spread"] - table["band"])
    base = table["base"]
    tau = max(0.0, min(base + table["slope"] * beyond, max(base, table["top"])))
    return from_log_scale(tau) if table.get("transform") == "log" else tau


class Calibrator:
    """What every online calibrator offers; `Calibrator.from_state(state)` rebuilds any of them.

    `uses_signal`: whether the threshold served for a batch depends on a label-free signal known
    when it is served (`threshold_for`, `signal_table`, and `update(score, signal)` learning how
    the score level follows the signal). Every other method ignores the signal entirely."""

    name: ClassVar[str] = ""
    uses_signal: ClassVar[bool] = False
    # options a saved state may differ in and still load: a state saved with another `window`
    # carries on with the newest scores that fit (a new default, or a replica not yet upgraded)
    resizable: ClassVar[tuple[str, ...]] = ()

    def __init__(self, alpha: float) -> None:
        self.alpha = _check_alpha(alpha)
        self.steps = 0
        self.misses = 0

    @property
    def threshold(self) -> float:
        """q_t: the set for the next sample holds every candidate whose score is ≤ q_t."""
        raise NotImplementedError

    @property
    def alpha_t(self) -> float:
        """The miscoverage level the current threshold aims at (α itself unless it adapts it)."""
        return self.alpha

    @property
    def miscoverage(self) -> float:
        """The share of labels so far that fell above the threshold served for them."""
        return self.misses / self.steps if self.steps else 0.0

    def threshold_for(self, signal: float | None) -> float:
        """The threshold for a batch whose label-free signal (see `uses_signal`) is `signal`;
        the plain `threshold` for methods that read no signal, or when there is none."""
        return self.threshold

    def signal_table(self) -> SignalTable | None:
        """What a replica needs to serve `threshold_for(signal)` without the full state, or None
        for methods that read no signal (then `threshold` is all there is)."""
        return None

    def update(self, score: float, signal: float | None = None,
               served: float | None = None) -> None:
        """Learn from the score of a label that has arrived, scored against the prediction the
        current threshold was served for; `signal` is the label-free signal that prediction was
        served with (ignored by methods that read none); `served`, where the caller knows it,
        the threshold that prediction was served with, which differs from the current one when
        the label comes late (`PID` steers its target by whether the score was within it; the
        others ignore it)."""
        score = _check_score(score)
        self.steps += 1
        self.misses += score > self.threshold_for(signal)
        self._learn(score)

    def _learn(self, score: float) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every score: back to the calibrator as built."""
        self.steps = 0
        self.misses = 0

    # ---- state, as plain JSON values, so a store can keep it (and swap it atomically)

    @classmethod
    def option_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_names()}

    def state(self) -> dict[str, Any]:
        """Everything needed to carry on exactly where this calibrator is, as JSON values."""
        return {"name": self.name, **self.options(), "steps": self.steps,
                "misses": self.misses, **self._dynamic_state()}

    def _dynamic_state(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Calibrator:
        """A calibrator built with the options `state` records and carrying on from it."""
        from adapters.conformal import CALIBRATORS  # the registry imports every calibrator

        kind = CALIBRATORS.get(state.get("name", "")) if cls is Calibrator else cls
        if kind is None:
            raise ValueError(f"state names no known calibrator ({state.get('name')!r}); "
                             f"known: {', '.join(CALIBRATORS)}")
        # an option in `resizable` that an older state lacks takes its default
        calibrator = kind(**{name: state[name] for name in kind.option_names()
                             if name in state or name not in kind.resizable})
        calibrator.load_state(state)
        return calibrator

    def load_state(self, state: dict[str, Any]) -> None:
        """Carry on from `state`, saved by a calibrator of the same kind and options (those
        in `resizable` may differ)."""
        if state.get("name") != self.name:
            raise ValueError(f"state of calibrator {state.get('name')!r} cannot load into "
                             f"{self.name!r}; use Calibrator.from_state(state)")
        saved = {name: state.get(name) for name in self.option_names()}
        mine = self.options()
        if {name for name in mine if saved[name] != mine[name]} - set(self.resizable):
            raise ValueError(f"state saved with {saved}, this calibrator has {mine}; "
                             f"use Calibrator.from_state(state) to build one like it")
        self.reset()
        self.steps = int(state["steps"])
        self.misses = int(state["misses"])
        self._load_dynamic_state(state)

    def _load_dynamic_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({options})"
