"""Drift detectors from `river.drift`, each watching one named signal, with a JSON state.

A `SignalDetector` wraps one River detector (ADWIN, Page-Hinkley, KSWIN, or the binary DDM, EDDM,
HDDM_A, HDDM_W) on one signal and turns River's protocol (``update(x)`` returns nothing; read
``drift_detected`` afterwards) into ``update(values) -> Alarm | None`` over a batch of values.

Signals, by name (`entropy`, `confidence` and `feature_mean` below compute them from outputs):

* label-free: ``entropy`` (per-sample entropy of the predicted distribution, nats), ``confidence``
  (per-sample max probability), ``feature_mean`` (per-sample mean of the features entering the last
  layer);
* labelled: ``error`` (0/1, one per joined label), ``residual`` (absolute, one per joined label).

What a detector is fed. Each value is one River update, except where ``chunk`` > 1: then the
detector sees the mean of each run of ``chunk`` consecutive values (a partial chunk waits in the
state for the next batch), counted in values, not requests, so the summary does not change with how
the micro-batcher cut the traffic. Only KSWIN is chunked by default (16): its two-sample KS test
costs about 0.3 ms per update against about 1 µs for the others. Chunking a mean-shift signal
costs delay (measured: ADWIN on ``feature_mean``, 78 samples fed per value, 264 in chunks of
16), so the feature statistic is fed per sample too; a caller that has only one statistic per batch
passes that, and then samples count batches.
Non-finite values are skipped and counted; the binary detectors accept only 0 and 1.

Scale. ADWIN's cut bound assumes values in [0, 1] and Page-Hinkley's ``delta`` and ``threshold``
are in the signal's units, so a parameter set tuned on one model's entropy means nothing on
another's. Continuous signals are therefore standardised: the first ``warmup`` (100) values
estimate the signal's mean and standard deviation, and the detector then sees asinh of the
z-scores against them (linear near 0, logarithmic in the tails, so one rare extreme value does not
pass for a shift of the mean; estimates in alarms are mapped back to signal units, a typical
level rather than the exact mean). The 0/1
error is fed as it is. Measured (ADWIN, delta 0.002, clock 1): median delay on the bench's
confidence stream 145 samples raw, 70 standardised; entropy 70 and 66.

State. ``state()`` is a JSON-safe dict (non-finite floats written as "inf", "-inf", "nan", by
`store.encoding`) with the detector's name, signal, parameters, counts, warm-up, the last alarm
(`Alarm.to_json`) and the River detector's internals; ``load_state`` (or
``SignalDetector.from_state``) rebuilds the River object from its parameters and writes the
internals back, and the restored detector raises exactly the alarms the original would have. River
has no public state API, so the internals are read and written attribute by attribute, with no
pickle, by `drift.persistence` (river 0.26's layout; should a later river change it, ``state()``
keeps everything but the internals: ``"internals": null``, with the reason under
``internals_lost``, and the restored detector starts afresh on the same standardisation).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import river
from river import drift
from river.drift import binary

from drift.persistence import dump_internals, load_internals, read_count, read_finite
from store.encoding import NonFinite, float_from_json, from_json_safe, json_float, json_safe

STATE_FORMAT = 1


@dataclass(frozen=True)
class Signal:
    name: str
    labelled: bool
    binary: bool
    warmup: int
    description: str


SIGNALS: dict[str, Signal] = {
    "entropy": Signal("entropy", False, False, 100,
                      "per-sample entropy of the predicted distribution, in nats"),
    "confidence": Signal("confidence", False, False, 100,
                         "per-sample max probability of the predicted distribution"),
    "feature_mean": Signal("feature_mean", False, False, 100,
                           "per-sample mean of the features entering the last layer"),
    "error": Signal("error", True, True, 0, "0/1 error of a labelled prediction"),
    "residual": Signal("residual", True, False, 100,
                       "absolute residual of a labelled prediction"),
}


@dataclass(frozen=True)
class DetectorKind:
    name: str
    cls: type
    binary: bool
    min_chunk: int = 1


DETECTORS: dict[str, DetectorKind] = {
    "adwin": DetectorKind("adwin", drift.ADWIN, False),
    "page_hinkley": DetectorKind("page_hinkley", drift.PageHinkley, False),
    # a KS test per sample costs ~0.5 ms: KSWIN always sees chunk means
    "kswin": DetectorKind("kswin", drift.KSWIN, False, min_chunk=16),
    "ddm": DetectorKind("ddm", binary.DDM, True),
    "eddm": DetectorKind("eddm", binary.EDDM, True),
    "hddm_a": DetectorKind("hddm_a", binary.HDDMA, True),
    "hddm_w": DetectorKind("hddm_w", binary.HDDMW, True),
}

class Default(NamedTuple):
    detector: str
    params: dict[str, Any]
    chunk: int | None = None


# Chosen from measured false alarms and delays, not from River's defaults, by
#     python -m bench.drift_detectors          (river 0.26.1; 10 seeds; streams in that module)
# the setting with the shortest median delay among those with <= 1 false alarm per 10,000
# stationary samples (on long runs and in the first 5,000 samples after a start), no misses and a
# median delay <= 250 samples on its signal's abrupt change. Measured (on asinh of the z-scores),
# per signal:
#   error         0.00 / 0.00 false alarms per 10k (p = 0.1 / 0.3), delay 110 on 0.1 -> 0.3
#                 (HDDM_A 0.001: 0.02 / 0.14, 120; DDM: 2.4 per 10k after a start; EDDM: 20)
#   entropy       0.00, delay 66 on a +0.7 sd shift (clock 8: 80)
#   confidence    0.00, delay 70 on a -0.7 sd shift (raw values, not standardised: 145)
#   residual      0.04, delay 102 on a +0.66 sd shift
#   feature_mean  0.00, delay 87 on a +0.5 sd shift (in chunks of 16: 264)
# Page-Hinkley, even on z-scores, reaches 1 false alarm per 10k at the delays where it beats
# ADWIN (0.3/20: 1.1 to 1.3, delay 24 to 48); River's defaults give it 6.2 to 6.6.
DEFAULT_DETECTORS: dict[str, Default] = {
    "error": Default("adwin", {"delta": 0.002, "clock": 1}),
    "entropy": Default("adwin", {"delta": 0.002, "clock": 1}),
    "confidence": Default("adwin", {"delta": 0.002, "clock": 1}),
    "residual": Default("adwin", {"delta": 0.002, "clock": 1}),
    "feature_mean": Default("adwin", {"delta": 0.002, "clock": 1}),
}


class StateMismatch(ValueError):
    """A saved state that does not belong to this detector, or does not hold together."""


@dataclass(frozen=True)
class Alarm:
    """One drift alarm: which detector on which signal, where in its stream, and what it saw.

    ``sample`` counts the values this detector has been given (1-based, the value that raised the
    alarm); ``statistic`` is the detector's test statistic where it has one (ADWIN has none: it
    tests every cut of its window), ``estimate`` its current estimate of the signal's level.
    ``detail["direction"]`` says which way the signal moved, "up" or "down", where the detector
    tells (ADWIN, and the binary detectors, which only alarm on a rise of the error rate).
    """

    detector: str
    signal: str
    labelled: bool
    sample: int
    update: int
    time: float
    statistic: float | None
    estimate: float | None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self, nonfinite: NonFinite = "text") -> dict[str, Any]:
        """The alarm as plain JSON, the one shape it is saved and shown in.

        The default writes non-finite floats as "inf", "-inf" or "nan", which `from_json` reads
        back (a detector's saved ``last_alarm``, the policy's pending alarms); ``"null"`` writes
        None instead, for what is served (``/v1/state``, events), where a field is a number or
        null. The ``kind`` marks the record as an alarm; `from_json` ignores it.

        >>> alarm = Alarm("adwin", "error", True, sample=900, update=900, time=1.0,
        ...               statistic=None, estimate=float("inf"), detail={"width": 120})
        >>> alarm.to_json()["estimate"], alarm.to_json(nonfinite="null")["estimate"]
        ('inf', None)
        >>> Alarm.from_json(alarm.to_json()) == alarm
        True
        """
        def number(value: float | None) -> float | None:
            # always a float, as saved alarms have always held (an int clock's 7 is saved as 7.0)
            return None if value is None else float(value)

        return json_safe({"time": number(self.time), "kind": "drift_alarm",
                          "detector": self.detector, "signal": self.signal,
                          "labelled": self.labelled, "sample": self.sample, "update": self.update,
                          "statistic": number(self.statistic), "estimate": number(self.estimate),
                          "detail": dict(self.detail)}, nonfinite=nonfinite)

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Alarm:
        """The alarm `to_json` wrote; ValueError, TypeError or KeyError if it does not hold.

        Also reads what earlier versions saved: their policy state held the fields without
        ``kind``, with None for a non-finite number.
        """
        detail = fields["detail"]
        if not isinstance(detail, dict):
            raise TypeError(f"an alarm's detail is an object, got {detail!r}")
        return cls(fields["detector"], fields["signal"], bool(fields["labelled"]),
                   read_count(fields["sample"]), read_count(fields["update"]),
                   read_finite(fields["time"]), float_from_json(fields["statistic"]),
                   float_from_json(fields["estimate"]), from_json_safe(detail))


# ---- signals from model outputs ------------------------------------------------------------------

def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per-row entropy, in nats, of a (batch, classes) array of probabilities.

    >>> entropy(np.array([[0.5, 0.5], [1.0, 0.0]])).round(4).tolist()
    [0.6931, 0.0]
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return 0.0 - terms.sum(axis=-1)  # 0.0 -, not unary minus: no -0.0 for a certain prediction


def confidence(probabilities: np.ndarray) -> np.ndarray:
    """Per-row max probability.

    >>> confidence(np.array([[0.2, 0.8], [0.6, 0.4]])).tolist()
    [0.8, 0.6]
    """
    return np.asarray(probabilities, dtype=np.float64).max(axis=-1)


def feature_mean(features: np.ndarray) -> np.ndarray:
    """Per-row mean of a (batch, features) array.

    >>> feature_mean(np.array([[1.0, 3.0], [0.0, 0.0]])).tolist()
    [2.0, 0.0]
    """
    features = np.asarray(features, dtype=np.float64)
    return features.reshape(features.shape[0], -1).mean(axis=1)


# ---- the detector --------------------------------------------------------------------------------

class SignalDetector:
    """One River drift detector on one named signal, fed batches of values.

    Parameters
    ----------
    detector
        A key of `DETECTORS`: adwin, page_hinkley, kswin, ddm, eddm, hddm_a, hddm_w.
    signal
        A key of `SIGNALS`: entropy, confidence, feature_mean, error, residual.
    params
        Constructor arguments of the River class (River's own defaults where left out; KSWIN's
        ``seed`` defaults to 0 so a run replays).
    chunk
        Values per detector update (their mean); None: 1, or KSWIN's minimum of 16.
    warmup
        Updates used to estimate the signal's mean and standard deviation before the detector
        sees anything; afterwards it is fed z-scores against that estimate, so one parameter set
        suits any scale. 0 feeds the raw values (the 0/1 error signal). None: the signal's own.

    Examples
    --------
    >>> import numpy as np
    >>> detector = SignalDetector("adwin", "error", {"delta": 0.002})
    >>> rng = np.random.default_rng(0)
    >>> detector.update((rng.random(2000) < 0.1).astype(float)) is None
    True
    >>> alarm = detector.update((rng.random(2000) < 0.5).astype(float))
    >>> alarm.detector, alarm.signal, 2000 < alarm.sample < 2200
    ('adwin', 'error', True)
    >>> restored = SignalDetector.from_state(detector.state())
    >>> restored.counts == detector.counts
    True
    """

    def __init__(self, detector: str, signal: str, params: dict[str, Any] | None = None,
                 chunk: int | None = None, warmup: int | None = None) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"unknown drift detector {detector!r}: use one of {sorted(DETECTORS)}")
        if signal not in SIGNALS:
            raise ValueError(f"unknown drift signal {signal!r}: use one of {sorted(SIGNALS)}")
        self.kind = DETECTORS[detector]
        self.signal = SIGNALS[signal]
        if self.kind.binary and not self.signal.binary:
            raise ValueError(f"{detector} is a detector for 0/1 streams; signal {signal!r} is not "
                             "one: use it on 'error', or pick adwin, page_hinkley or kswin")
        self.params = _checked_params(self.kind, dict(params or {}))
        if chunk is None:
            chunk = self.kind.min_chunk
        if chunk < self.kind.min_chunk or chunk < 1:
            raise ValueError(f"{detector} needs chunk >= {self.kind.min_chunk}, got {chunk}")
        self.chunk = int(chunk)
        warmup = self.signal.warmup if warmup is None else int(warmup)
        if warmup < 0 or (warmup and self.kind.binary):
            raise ValueError(f"warmup {warmup}: >= 0, and 0 for {detector}, which needs 0/1 values")
        if warmup == 1:
            raise ValueError("warmup 1 cannot estimate a standard deviation: use 0 or >= 2")
        self.warmup = warmup
        self.samples = 0
        self.updates = 0
        self.alarms = 0
        self.skipped = 0
        self.last_alarm: Alarm | None = None
        self._chunk_sum = 0.0
        self._chunk_count = 0
        # Welford's running mean and sum of squares over the warm-up, then the frozen centre/scale
        self._warm_n, self._warm_mean, self._warm_m2 = 0, 0.0, 0.0
        self.center: float | None = None if warmup else 0.0
        self.scale: float | None = None if warmup else 1.0
        self._river = self.kind.cls(**self.params)

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def counts(self) -> dict[str, int]:
        return {"samples": self.samples, "updates": self.updates, "alarms": self.alarms,
                "skipped": self.skipped}

    @property
    def labelled(self) -> bool:
        return self.signal.labelled

    @property
    def warm(self) -> bool:
        return self.scale is not None

    def measure(self) -> dict[str, Any]:
        """The detector's test statistic, and its estimate of the signal's level (signal units)."""
        measured = _MEASURES[self.kind.name](self._river, self.params)
        if measured.get("estimate") is not None and self.warm:
            level = measured["estimate"]
            if self.warmup:  # the detector sees asinh of z-scores
                level = math.sinh(min(max(level, -700.0), 700.0))
            measured["estimate"] = level * self.scale + self.center
        return measured

    def update(self, values: np.ndarray, now: float | None = None) -> Alarm | None:
        """Feed a batch of values; the first alarm it raised, if any (all are counted)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(values)
        if not finite.all():
            self.skipped += int((~finite).sum())
            values = values[finite]
        if self.kind.binary and values.size and not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(f"{self.kind.name} takes 0/1 errors; got values other than 0 and 1 "
                             f"on signal {self.signal.name!r}")
        detector = self._river
        level = _LEVELS.get(self.kind.name)
        first: Alarm | None = None
        for value in values.tolist():
            self.samples += 1
            if self.chunk > 1:
                self._chunk_sum += value
                self._chunk_count += 1
                if self._chunk_count < self.chunk:
                    continue
                value = self._chunk_sum / self._chunk_count
                self._chunk_sum, self._chunk_count = 0.0, 0
            if self.scale is None:
                self._warm_up(value)
                continue
            before = None if level is None else level(detector)
            z = (value - self.center) / self.scale
            if self.warmup:
                # asinh: linear near 0, logarithmic in the tails. ADWIN's bound assumes a bounded
                # stream, and a confident classifier's entropy is mostly ~0 with rare large
                # values, each of which passed for a shift of the mean (false alarms on a
                # stationary stream of real outputs); a clip at 3 sd did as well there but hid
                # every later level shift of a trending series
                z = math.asinh(z)
            detector.update(z)
            self.updates += 1
            if detector.drift_detected:
                self.alarms += 1
                direction = "up" if self.kind.binary else None
                if level is not None and before is not None:
                    # ADWIN drops the old part of its window at an alarm: its estimate moves from
                    # the mean of old and new to the mean of the new part
                    direction = "up" if level(detector) > before else "down"
                self.last_alarm = self._alarm(time.time() if now is None else now, direction)
                if first is None:
                    first = self.last_alarm
        return first

    def _warm_up(self, value: float) -> None:
        self._warm_n += 1
        delta = value - self._warm_mean
        self._warm_mean += delta / self._warm_n
        self._warm_m2 += delta * (value - self._warm_mean)
        if self._warm_n >= self.warmup:
            deviation = math.sqrt(self._warm_m2 / (self._warm_n - 1))
            # a signal constant through the warm-up (say confidence 1.0) keeps its own units
            self.center, self.scale = self._warm_mean, deviation if deviation > 1e-12 else 1.0

    def _alarm(self, now: float, direction: str | None = None) -> Alarm:
        measured = self.measure()
        statistic = measured.pop("statistic", None)
        estimate = measured.pop("estimate", None)
        if direction is not None:
            measured["direction"] = direction
        return Alarm(self.kind.name, self.signal.name, self.signal.labelled, self.samples,
                     self.updates, now, statistic, estimate, measured)

    def describe(self) -> dict[str, Any]:
        return {"detector": self.kind.name, "signal": self.signal.name,
                "labelled": self.signal.labelled, "params": dict(self.params),
                "chunk": self.chunk, "warmup": self.warmup, "center": self.center,
                "scale": self.scale, **self.counts, **self.measure(),
                "last_alarm": None if self.last_alarm is None
                else self.last_alarm.to_json(nonfinite="null")}

    # ---- state -----------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {"detector": self.kind.name, "signal": self.signal.name,
                # sorted: the saved state reads the same whatever order the caller passed
                "params": json_safe(dict(sorted(self.params.items())), nonfinite="text"),
                "chunk": self.chunk, "warmup": self.warmup}

    def state(self) -> dict[str, Any]:
        """A JSON-safe dict from which `load_state` (or `from_state`) rebuilds this detector."""
        internals, lost = dump_internals(self.kind.name, self._river, self.params)
        state: dict[str, Any] = {
            "format": STATE_FORMAT, "river": river.__version__, **self._identity(),
            "counts": self.counts,
            "partial_chunk": {"sum": json_float(self._chunk_sum), "count": self._chunk_count},
            "standardize": {"n": self._warm_n, "mean": json_float(self._warm_mean),
                            "m2": json_float(self._warm_m2), "center": json_float(self.center),
                            "scale": json_float(self.scale)},
            "last_alarm": None if self.last_alarm is None else self.last_alarm.to_json(),
            "internals": internals,
        }
        if lost:
            state["internals_lost"] = lost
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SignalDetector:
        try:
            if not isinstance(state["params"], dict):
                raise TypeError(f"parameters {state['params']!r}, not an object")
            params = from_json_safe(state["params"])
            detector = cls(state["detector"], state["signal"], params, state["chunk"],
                           state["warmup"])
        except (KeyError, TypeError, AttributeError) as error:
            raise StateMismatch(f"not a drift detector state: {error!r}") from error
        detector.load_state(state)
        return detector

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a state saved by `state()`; StateMismatch if it is another detector's."""
        try:
            if state.get("format") != STATE_FORMAT:
                raise StateMismatch(f"drift detector state format {state.get('format')!r}; this "
                                    f"version reads format {STATE_FORMAT}")
            mine = self._identity()
            theirs = {key: state[key] for key in mine}
            if mine != theirs:
                raise StateMismatch(
                    f"the saved state is for {theirs}, this detector is {mine}: build it with "
                    "SignalDetector.from_state, or discard the state")
            fresh = self.kind.cls(**self.params)
            if state["internals"] is not None:
                load_internals(self.kind.name, fresh, self.params, state["internals"])
            counts = {key: read_count(state["counts"][key])
                      for key in ("samples", "updates", "alarms", "skipped")}
            partial = state["partial_chunk"]
            chunk_sum, chunk_count = read_finite(partial["sum"]), read_count(partial["count"])
            if chunk_count >= self.chunk:
                raise StateMismatch(f"a partial chunk of {chunk_count} values, chunk is "
                                    f"{self.chunk}")
            warm = state["standardize"]
            warm_n = read_count(warm["n"])
            warm_mean, warm_m2 = read_finite(warm["mean"]), read_finite(warm["m2"])
            center, scale = float_from_json(warm["center"]), float_from_json(warm["scale"])
            if (center is None) != (scale is None) or (scale is not None and not scale > 0):
                raise StateMismatch("a standardisation with a centre but no positive scale")
            if scale is None and warm_n >= self.warmup:
                raise StateMismatch("a finished warm-up without a scale")
            last_alarm = (None if state["last_alarm"] is None
                          else Alarm.from_json(state["last_alarm"]))
        except StateMismatch:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
            raise StateMismatch(f"drift detector state does not hold together: {error!r}") \
                from error
        self._river = fresh
        self.samples, self.updates = counts["samples"], counts["updates"]
        self.alarms, self.skipped = counts["alarms"], counts["skipped"]
        self._chunk_sum, self._chunk_count = chunk_sum, chunk_count
        self._warm_n, self._warm_mean, self._warm_m2 = warm_n, warm_mean, warm_m2
        self.center, self.scale = center, scale
        self.last_alarm = last_alarm


def build_detector(name: str, signal: str, chunk: int | None = None, warmup: int | None = None,
                   **params: Any) -> SignalDetector:
    """A detector by name on a signal, with River constructor arguments as keywords.

    >>> build_detector("page_hinkley", "entropy", threshold=20.0).params["threshold"]
    20.0
    """
    return SignalDetector(name, signal, params, chunk, warmup)


def default_detector(signal: str) -> SignalDetector:
    """The measured default for a signal (`DEFAULT_DETECTORS`).

    >>> default_detector("error").name
    'adwin'
    """
    if signal not in DEFAULT_DETECTORS:
        raise ValueError(f"unknown drift signal {signal!r}: use one of {sorted(DEFAULT_DETECTORS)}")
    default = DEFAULT_DETECTORS[signal]
    return SignalDetector(default.detector, signal, dict(default.params), default.chunk)


def _checked_params(kind: DetectorKind, params: dict[str, Any]) -> dict[str, Any]:
    accepted = set(inspect.signature(kind.cls).parameters) - {"window"}
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"{kind.name} has no parameter {sorted(unknown)}: it takes "
                         f"{sorted(accepted)}")
    if kind.name == "kswin":
        params.setdefault("seed", 0)
    for key, value in params.items():
        if not isinstance(value, bool | int | float | str | None):
            raise ValueError(f"{kind.name} parameter {key}={value!r}: numbers, strings, booleans")
    return params


# ---- statistics at an alarm ---------------------------------------------------------------------

def _measure_adwin(detector: drift.ADWIN, params: dict) -> dict[str, Any]:
    return {"statistic": None, "estimate": detector.estimation, "width": int(detector.width)}


def _measure_page_hinkley(detector: drift.PageHinkley, params: dict) -> dict[str, Any]:
    increase = detector._sum_increase - detector._min_increase
    decrease = detector._max_decrease - detector._sum_decrease
    statistic = {"up": increase, "down": decrease}.get(detector.mode, max(increase, decrease))
    return {"statistic": statistic if math.isfinite(statistic) else None,
            "estimate": detector._x_mean.get(), "threshold": detector.threshold}


def _measure_kswin(detector: drift.KSWIN, params: dict) -> dict[str, Any]:
    window = list(detector.window)
    return {"statistic": float(detector.p_value),
            "estimate": float(np.mean(window)) if window else None, "alpha": detector.alpha}


def _measure_ddm(detector: binary.DDM, params: dict) -> dict[str, Any]:
    p, n = detector._p.get(), detector._p.n
    s = math.sqrt(p * (1 - p) / n) if n else 0.0
    statistic = None
    if detector._s_min and detector._p_min is not None:  # both set at once, on the first update
        # (p + s - p_min) / s_min: DDM alarms above drift_threshold
        statistic = (p + s - detector._p_min) / detector._s_min
    return {"statistic": statistic, "estimate": p, "threshold": detector.drift_threshold}


def _measure_eddm(detector: binary.EDDM, params: dict) -> dict[str, Any]:
    distances = detector._error_distances
    mean = distances.mean.get() if distances.mean.n else None
    statistic = None
    if mean is not None and detector._p2s_prime_max > 0:
        # (mean + 2 sd) of the distance between errors over its maximum: EDDM alarms below beta
        statistic = (mean + 2 * distances.get() ** 0.5) / detector._p2s_prime_max
    return {"statistic": statistic, "estimate": mean, "threshold": detector.beta}


def _measure_hddm_a(detector: binary.HDDMA, params: dict) -> dict[str, Any]:
    return {"statistic": detector._z.get() - detector._x_min.get(),
            "estimate": detector._z.get()}


def _measure_hddm_w(detector: binary.HDDMW, params: dict) -> dict[str, Any]:
    rise = None
    if detector._s1_incr.is_init and detector._s2_incr.is_init:
        rise = detector._s2_incr.ewma - detector._s1_incr.ewma
    return {"statistic": rise, "estimate": detector._total.ewma}


# the level a detector tracks, where reading it costs nothing: compared before and after an
# alarm, it says which way the signal moved (binary detectors only ever alarm on a rise)
_LEVELS: dict[str, Callable[[Any], float]] = {
    "adwin": lambda detector: detector.estimation,
}

_MEASURES: dict[str, Callable[[Any, dict], dict[str, Any]]] = {
    "adwin": _measure_adwin,
    "page_hinkley": _measure_page_hinkley,
    "kswin": _measure_kswin,
    "ddm": _measure_ddm,
    "eddm": _measure_eddm,
    "hddm_a": _measure_hddm_a,
    "hddm_w": _measure_hddm_w,
}
