"""Drift detectors on synthetic signals and annotated real series: false alarms, delay, cost.

For every detector and parameter setting in `CANDIDATES`, on every signal it applies to, through
`drift.detectors.SignalDetector` (so chunking and the wrapper's cost are included), fed batches of
64 values:

- false alarms per 10,000 samples on stationary streams (``--seeds`` runs of 50,000 samples; the
  error signal at p = 0.1 and at p = 0.3, both reported), and separately over the 5,000 samples
  before the change in the delay runs: a detector starts afresh after every alarm, and some (DDM,
  EDDM) raise most of their false alarms in their first few hundred samples;
- detection delay on an abrupt change after 5,000 samples: samples from the change to the first
  alarm at or after it (median over seeds; a miss, no alarm in the 5,000 samples after the change,
  counts as infinitely late), and the number of misses;
- microseconds per sample and per detector update (20,000 stationary samples, timed alone).

The streams, per signal (before -> after the change):

    error         Bernoulli(0.1) -> Bernoulli(0.3)
    entropy       Gamma(2, 0.25) -> Gamma(2, 0.375)        mean 0.50 -> 0.75  (+0.71 sd)
    confidence    Beta(8, 2) -> Beta(5, 2)                 mean 0.80 -> 0.71  (-0.71 sd)
    residual      |N(0, 1)| -> |N(0, 1.5)|                 mean 0.80 -> 1.20  (+0.66 sd)
    feature_mean  N(0, 1) -> N(0.5, 1)                        mean 0 -> 0.5      (+0.5 sd)

Continuous signals reach the detector as z-scores against the mean and standard deviation of the
first 100 values (`SignalDetector`'s warm-up); rows marked "raw" feed the values as they are. A
shift of d standard deviations takes roughly 1/d^2 as many samples to see, so these delays hold for
shifts of half a standard deviation or more.

Then, per signal, the default: among settings with the signal's standard warm-up, at most 1 false
alarm per 10,000 stationary samples on every stationary stream of the signal and after a start,
no misses and a median delay <= 250 samples,
those with at most 0.5 (half the budget, for the noise in the estimate) first, the shortest median
delay. It prints the table and the `DEFAULT_DETECTORS` entries for `drift/detectors.py`.

Then real series with annotated change points: the seven that River ships in
`river.drift.datasets` (from the Turing Change Point Dataset; Apple and Brent resampled as TCPD
does, see `SERIES`), each with five annotators. The shipped defaults watch each series as the
service would watch a signal of its own: the `feature_mean` default (ADWIN) on its level, the
row mean of its dimensions as z-scores, and the `residual` default (ADWIN) on the absolute error
of a last-value forecast; River's Page-Hinkley defaults on the level for comparison (KSWIN is left
out: the wrapper feeds it means of 16 values, a handful of updates on these series). The series
are short (105 to 822 values), so the warm-up is 20 values (``--warmup``), not 100; change points
inside it are not counted. An alarm at position a is right if some annotator put a change point c
with c <= a <= c + T (``--tolerance``, 20): precision pools the annotators, recall is each
annotator's, averaged over annotators, as TCPD's benchmark averages it; next to precision, what
as many alarms at random times would score. Detectors run on after an alarm, as in the service.

    python -m bench.drift_detectors                  # both parts, 10 seeds (a few minutes)
    python -m bench.drift_detectors --seeds 3        # quicker, coarser
    python -m bench.drift_detectors --part datasets  # the real series alone (a second)
    python -m bench.drift_detectors --part synthetic --signals error --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import river

from drift.detectors import DEFAULT_DETECTORS, DETECTORS, Default, SignalDetector

STATIONARY = 50_000
CHANGE_AT = 5_000
AFTER = 5_000
BATCH = 64
MAX_FA = 1.0
MAX_DELAY = 250


def _stream(signal: str, regime: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if signal == "error":
        p = {"p=0.1": 0.1, "p=0.3": 0.3, "after": 0.3}[regime]
        return (rng.random(size) < p).astype(np.float64)
    after = regime == "after"
    if signal == "entropy":
        return rng.gamma(2.0, 0.375 if after else 0.25, size)
    if signal == "confidence":
        return rng.beta(5.0 if after else 8.0, 2.0, size)
    if signal == "residual":
        return np.abs(rng.normal(0.0, 1.5 if after else 1.0, size))
    if signal == "feature_mean":
        return rng.normal(0.5 if after else 0.0, 1.0, size)
    raise ValueError(signal)


STATIONARY_REGIMES = {"error": ["p=0.1", "p=0.3"]}
CHANGE_REGIME = {"error": "p=0.1"}
SIGNALS = ["error", "entropy", "confidence", "residual", "feature_mean"]

def candidates(signal: str) -> list[tuple[str, dict[str, Any], int | None, int | None]]:
    """Settings to measure. Continuous signals reach the detector as z-scores (a warm-up of 100
    updates estimates the scale), so Page-Hinkley's delta and threshold, in the signal's units,
    are in standard deviations here, and one grid serves every continuous signal. Each comes
    with a chunk and a warm-up (None: the detector's and signal's defaults); a few rows feed the
    raw values (warm-up 0) to show what standardising buys."""
    found: list[tuple[str, dict[str, Any]]] = []
    for delta in (0.002, 0.0002):
        for clock in (32, 8, 1):
            found.append(("adwin", {"delta": delta, "clock": clock}))
    found.append(("page_hinkley", {}))
    ph = ((0.1, 50.0), (0.2, 30.0), (0.25, 25.0), (0.3, 20.0))
    if signal == "error":  # raw 0/1 values: deviations of a few tenths
        ph = ((0.02, 25.0), (0.05, 25.0), (0.05, 15.0))
    found += [("page_hinkley", {"delta": d, "threshold": t}) for d, t in ph]
    for alpha in (0.005, 0.0001):
        found.append(("kswin", {"alpha": alpha}))
    if signal == "error":
        found += [("ddm", {"drift_threshold": t}) for t in (3.0, 4.0, 5.0)]
        found += [("eddm", {"alpha": a, "beta": b}) for a, b in ((0.95, 0.9), (0.9, 0.8),
                                                                  (0.85, 0.7))]
        found += [("hddm_a", {"drift_confidence": c}) for c in (0.001, 0.0001, 0.00001)]
        found += [("hddm_w", {"drift_confidence": c, "lambda_val": lam})
                  for c in (0.001, 0.0001) for lam in (0.05, 0.01)]
    rows: list[tuple[str, dict[str, Any], int | None, int | None]] = [
        (name, params, None, None) for name, params in found]
    if signal != "error":
        rows.append(("adwin", {"delta": 0.002, "clock": 1}, None, 0))
    if signal == "feature_mean":  # per sample (the default), or means of chunks of samples
        rows += [(name, params, chunk, None) for chunk in (4, 16)
                 for name, params in (("adwin", {"delta": 0.002, "clock": 8}),
                                      ("adwin", {"delta": 0.002, "clock": 1}),
                                      ("page_hinkley", {"delta": 0.2, "threshold": 30.0}),
                                      ("page_hinkley", {"delta": 0.3, "threshold": 20.0}))]
    return rows


@dataclass
class Row:
    signal: str
    detector: str
    params: dict[str, Any]
    chunk: int
    warmup: int
    false_alarms: dict[str, float]
    early_false_alarms: float
    delays: list[float]
    misses: int
    seeds: int
    us_per_sample: float
    us_per_update: float

    @property
    def worst_false_alarms(self) -> float:
        return max(*self.false_alarms.values(), self.early_false_alarms)

    @property
    def median_delay(self) -> float:
        return float(np.median(self.delays))

    @property
    def eligible(self) -> bool:
        return (self.worst_false_alarms <= MAX_FA and self.misses == 0
                and self.median_delay <= MAX_DELAY)


def _feed(detector: SignalDetector, values: np.ndarray) -> list[int]:
    alarms = []
    for start in range(0, len(values), BATCH):
        before = detector.alarms
        first = detector.update(values[start:start + BATCH], now=0.0)
        if first is not None:
            alarms.append(first.sample)
            # later alarms in the same batch: counted, positions not needed here
            alarms += [first.sample] * (detector.alarms - before - 1)
    return alarms


def measure(signal: str, name: str, params: dict[str, Any], chunk: int | None,
            warmup: int | None, seeds: int) -> Row:
    probe = SignalDetector(name, signal, params, chunk, warmup)
    chunk, warmup = probe.chunk, probe.warmup
    false_alarms: dict[str, float] = {}
    for regime in STATIONARY_REGIMES.get(signal, ["stationary"]):
        alarms = 0
        for seed in range(seeds):
            rng = np.random.default_rng([seed, SIGNALS.index(signal), 1])
            values = _stream(signal, regime, STATIONARY, rng)
            alarms += len(_feed(SignalDetector(name, signal, params, chunk, warmup), values))
        false_alarms[regime] = alarms / (seeds * STATIONARY) * 10_000
    delays, misses, early = [], 0, 0
    for seed in range(seeds):
        rng = np.random.default_rng([seed, SIGNALS.index(signal), 2])
        before = _stream(signal, CHANGE_REGIME.get(signal, "before"), CHANGE_AT, rng)
        after = _stream(signal, "after", AFTER, rng)
        detector = SignalDetector(name, signal, params, chunk, warmup)
        # fed apart so that no batch straddles the change
        alarms = _feed(detector, before) + _feed(detector, after)
        late = [a for a in alarms if a > CHANGE_AT]
        early += len(alarms) - len(late)
        if late:
            delays.append(float(late[0] - CHANGE_AT))
        else:
            delays.append(math.inf)
            misses += 1
    early_rate = early / (seeds * CHANGE_AT) * 10_000
    return Row(signal, name, params, chunk, warmup, false_alarms, early_rate, delays, misses,
               seeds, math.nan, math.nan)


def cost(row: Row, samples: int = 20_000) -> None:
    """Microseconds per sample and per update, timed alone (not beside the worker processes)."""
    values = _stream(row.signal, STATIONARY_REGIMES.get(row.signal, ["stationary"])[0], samples,
                     np.random.default_rng(0))
    detector = SignalDetector(row.detector, row.signal, row.params, row.chunk, row.warmup)
    start = time.perf_counter()
    _feed(detector, values)
    elapsed = time.perf_counter() - start
    row.us_per_sample = elapsed / detector.samples * 1e6
    row.us_per_update = elapsed / max(detector.updates, 1) * 1e6


def _resolved(signal: str, name: str, params: dict[str, Any], chunk: int | None,
              warmup: int | None) -> tuple:
    probe = SignalDetector(name, signal, params, chunk, warmup)
    return (signal, name, probe.params, probe.chunk, probe.warmup)


def choose(rows: list[Row]) -> Row | None:
    eligible = [row for row in rows if row.eligible
                and row.warmup == SignalDetector(row.detector, row.signal).warmup]
    if not eligible:
        return None
    return min(eligible, key=lambda r: (r.worst_false_alarms > MAX_FA / 2, r.median_delay,
                                        r.us_per_sample))


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "river defaults"


def table(rows: list[Row], chosen: dict[str, Row | None]) -> str:
    lines = ["| signal | detector | params | chunk | warm-up | false alarms / 10k | "
             "after a start | median delay | misses | µs / sample | µs / update |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        fa = " / ".join(f"{v:.2f}" for v in row.false_alarms.values())
        delay = "∞" if math.isinf(row.median_delay) else f"{row.median_delay:.0f}"
        mark = " **(default)**" if chosen.get(row.signal) is row else ""
        lines.append(f"| {row.signal} | {row.detector}{mark} | {_params(row.params)} | "
                     f"{row.chunk} | {row.warmup or 'raw'} | {fa} | "
                     f"{row.early_false_alarms:.2f} | {delay} | "
                     f"{row.misses}/{row.seeds} | "
                     f"{row.us_per_sample:.1f} | {row.us_per_update:.1f} |")
    return "\n".join(lines)


# ---- annotated real change points: river.drift.datasets ---------------------------------------

# River ships seven series of the Turing Change Point Dataset (van den Burg & Williams 2020, "An
# evaluation of change point detection algorithms"; alan-turing-institute/TCPD) with every
# annotator's change points, as 0-based indices into the TCPD series. For two of them River's CSV
# is not that series: Apple is the daily series (TCPD drops the first day and keeps every 3rd) and
# Brent the daily series since 1987 (TCPD keeps every 10th day, from the first kept day of 2000).
# `load_series` rebuilds TCPD's series, so that the annotations point where they should (Apple's
# unanimous 319 is then the crash of 2000-09-29; on River's raw rows it would fall in 1998).
SERIES: dict[str, tuple[str, list[str] | None]] = {  # name: (river class, columns; None: target)
    "airline_passengers": ("AirlinePassengers", None),
    "apple": ("Apple", ["Close", "Volume"]),
    "bitcoin": ("Bitcoin", None),
    "brent_spot": ("BrentSpotPrice", None),
    "occupancy": ("Occupancy", ["V1", "V2", "V3", "V4"]),
    "run_log": ("RunLog", ["Pace", "Distance"]),
    "uk_coal_employ": ("UKCoalEmploy", None),
}
SERIES_WARMUP = 20
TOLERANCE = 20


@dataclass(frozen=True)
class Series:
    name: str
    values: np.ndarray  # (samples, dimensions)
    annotations: dict[str, list[int]]  # annotator: 0-based change points

    def level(self, warmup: int) -> np.ndarray:
        """Each dimension as z-scores against its first `warmup` values, averaged over dimensions
        (the `feature_mean` of the row): the series itself when it has one dimension."""
        return _standardised(self.values, warmup).mean(axis=1)

    def residual(self, warmup: int) -> np.ndarray:
        """The absolute error of the last-value forecast ŷ_t = y_{t−1}, in the same z-scores,
        averaged over dimensions; NaN at t = 0, which has no forecast (the detector skips it)."""
        z = _standardised(self.values, warmup)
        return np.r_[np.nan, np.abs(np.diff(z, axis=0)).mean(axis=1)]


def _standardised(values: np.ndarray, warmup: int) -> np.ndarray:
    head = values[:warmup]
    spread = head.std(axis=0, ddof=1)
    return (values - head.mean(axis=0)) / np.where(spread > 0, spread, 1.0)


def load_series(name: str) -> Series:
    """One of River's annotated series, as TCPD defines it (see `SERIES`)."""
    from river.drift import datasets

    class_name, columns = SERIES[name]
    dataset = getattr(datasets, class_name)()
    rows = list(dataset)
    if name == "apple":
        rows = rows[1::3]
    elif name == "brent_spot":
        rows = rows[::10]
        rows = rows[next(i for i, (x, _) in enumerate(rows) if x["day"].year >= 2000):]
    if columns is None:
        values = [[float(y)] for _, y in rows]
    else:
        values = [[float(y[column]) for column in columns] for _, y in rows]
    return Series(name, np.asarray(values), {k: list(v) for k, v in dataset.annotations.items()})


# label, signal, which view of the series it watches, detector (None chunk: the detector's own)
SERIES_DETECTORS: list[tuple[str, str, str, Default]] = [
    ("feature_mean default", "feature_mean", "level", DEFAULT_DETECTORS["feature_mean"]),
    ("residual default", "residual", "residual", DEFAULT_DETECTORS["residual"]),
    ("Page-Hinkley, river defaults", "feature_mean", "level", Default("page_hinkley", {})),
]


def series_alarms(detector: SignalDetector, signal: np.ndarray) -> list[int]:
    """0-based positions in `signal` of every alarm, fed one value at a time."""
    positions = []
    for position, value in enumerate(signal.tolist()):
        before = detector.alarms
        detector.update(np.array([value]), now=0.0)
        positions += [position] * (detector.alarms - before)
    return positions


@dataclass
class SeriesScore:
    alarms: int
    explained: int  # alarms within [c, c + T] of some annotated c (any annotator)
    recall: float  # mean over annotators of their share of change points alarmed within T
    points: int  # distinct annotated change points after the warm-up (union of annotators)
    excluded: int  # distinct annotated change points inside the warm-up, not counted
    chance: float  # the precision of alarms at random times after the warm-up

    @property
    def precision(self) -> float:
        return self.explained / self.alarms if self.alarms else math.nan


def score_alarms(alarms: list[int], annotations: dict[str, list[int]], length: int,
                 tolerance: int, first_live: int) -> SeriesScore:
    """An alarm at a explains the change point c when c <= a <= c + tolerance. Precision pools the
    annotators (an alarm is right if it follows anyone's change point); recall is each
    annotator's, averaged over the annotators with a change point the detector could see (at or
    after `first_live`), as TCPD's benchmark averages it."""
    union = sorted({c for points in annotations.values() for c in points})
    live = [c for c in union if c >= first_live]
    covered = np.zeros(length, dtype=bool)
    for c in live:
        covered[c:c + tolerance + 1] = True
    explained = sum(bool(covered[a]) for a in alarms)
    recalls = []
    for points in annotations.values():
        visible = [c for c in points if c >= first_live]
        if visible:
            recalls.append(np.mean([any(c <= a <= c + tolerance for a in alarms)
                                    for c in visible]))
    return SeriesScore(len(alarms), explained, float(np.mean(recalls)) if recalls else math.nan,
                       len(live), len(union) - len(live), float(covered[first_live:].mean()))


@dataclass
class SeriesRun:
    series: Series
    detector: str
    alarms: list[int]
    first_live: int  # the first position at which the detector can alarm
    length: int

    def score(self, tolerance: int) -> SeriesScore:
        return score_alarms(self.alarms, self.series.annotations, self.length, tolerance,
                            self.first_live)


def series_runs(warmup: int) -> list[SeriesRun]:
    """Every `SERIES_DETECTORS` entry on every series."""
    runs = []
    for name in SERIES:
        series = load_series(name)
        for label, signal, view, default in SERIES_DETECTORS:
            detector = SignalDetector(default.detector, signal, dict(default.params),
                                      default.chunk, warmup)
            values = series.level(warmup) if view == "level" else series.residual(warmup)
            # the residual's first value is skipped, so its detector is live one step later
            first_live = warmup + (view == "residual")
            runs.append(SeriesRun(series, label, series_alarms(detector, values), first_live,
                                  len(values)))
    return runs


def _f1(precision: float, recall: float) -> float:
    if not (precision + recall > 0):
        return math.nan if math.isnan(precision) or math.isnan(recall) else 0.0
    return 2 * precision * recall / (precision + recall)


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _pooled(scores: list[SeriesScore]) -> tuple[float, float, float]:
    """Precision over every alarm of every series, recall averaged over series, and the chance
    precision of as many alarms per series, at random times."""
    alarms = sum(s.alarms for s in scores)
    if not alarms:
        return math.nan, float(np.nanmean([s.recall for s in scores])), math.nan
    return (sum(s.explained for s in scores) / alarms,
            float(np.nanmean([s.recall for s in scores])),
            sum(s.chance * s.alarms for s in scores) / alarms)


def series_table(runs: list[SeriesRun], tolerance: int) -> str:
    lines = ["| series | samples | annotators | change points | detector | alarms | precision | "
             "recall | F1 | chance precision |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        score = run.score(tolerance)
        points = f"{score.points}" + (f" (+{score.excluded} in warm-up)" if score.excluded else "")
        lines.append(f"| {run.series.name} | {run.length} | {len(run.series.annotations)} | "
                     f"{points} | {run.detector} | {score.alarms} | {_ratio(score.precision)} | "
                     f"{_ratio(score.recall)} | {_ratio(_f1(score.precision, score.recall))} | "
                     f"{score.chance:.2f} |")
    for label, *_ in SERIES_DETECTORS:
        scores = [run.score(tolerance) for run in runs if run.detector == label]
        precision, recall, chance = _pooled(scores)
        lines.append(f"| **all {len(scores)}** | | | | {label} | "
                     f"{sum(s.alarms for s in scores)} | {_ratio(precision)} | {_ratio(recall)} | "
                     f"{_ratio(_f1(precision, recall))} | {_ratio(chance)} |")
    return "\n".join(lines)


def series_report(tolerance: int, warmup: int) -> str:
    started = time.perf_counter()
    runs = series_runs(warmup)
    lines = [f"annotated change points (river.drift.datasets, TCPD's series): an alarm at a is "
             f"right if a change point c of any annotator has c <= a <= c + {tolerance}; "
             f"warm-up {warmup} values (z-scores against them), change points inside it not "
             f"counted; river {river.__version__}, {time.perf_counter() - started:.1f} s\n",
             series_table(runs, tolerance), "",
             "precision: share of alarms that follow some annotated change within the tolerance; "
             "recall: per annotator, share of their change points followed by an alarm within it, "
             "averaged over annotators; chance precision: what as many alarms at random times "
             "after the warm-up would score. The all rows pool alarms over the series for "
             "precision (and chance) and average recall over series. At other tolerances, "
             "pooled precision (chance) / recall:"]
    for other in sorted({5, 10, tolerance, 40}):
        cells = []
        for label, *_ in SERIES_DETECTORS:
            precision, recall, chance = _pooled([run.score(other) for run in runs
                                                 if run.detector == label])
            cells.append(f"{label} {_ratio(precision)} ({_ratio(chance)}) / {_ratio(recall)}")
        lines.append(f"    T = {other}: " + "; ".join(cells))
    return "\n".join(lines)


def _run(job: tuple[str, str, dict[str, Any], int | None, int | None, int]) -> Row:
    return measure(*job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["synthetic", "datasets", "all"], default="all",
                        help="synthetic streams, River's annotated real series, or both")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--signals", default=",".join(SIGNALS))
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write every synthetic-stream row here")
    parser.add_argument("--tolerance", type=int, default=TOLERANCE,
                        help="real series: samples after a change point an alarm may come")
    parser.add_argument("--warmup", type=int, default=SERIES_WARMUP,
                        help="real series: values that set the z-scores before detection starts")
    args = parser.parse_args(argv)
    if args.tolerance < 0 or args.warmup < 2:
        parser.error("--tolerance must be >= 0 and --warmup >= 2")
    if args.part in ("synthetic", "all"):
        run_synthetic(args)
    if args.part in ("datasets", "all"):
        if args.part == "all":
            print()
        print(series_report(args.tolerance, args.warmup))
    return 0


def run_synthetic(args: argparse.Namespace) -> None:
    signals = [s for s in args.signals.split(",") if s]
    wanted = set(args.detectors.split(","))
    jobs = [(signal, name, params, chunk, warmup, args.seeds) for signal in signals
            for name, params, chunk, warmup in candidates(signal) if name in wanted]
    for signal in signals:  # the current defaults are always measured, candidates or not
        current = _resolved(signal, *DEFAULT_DETECTORS[signal], None)
        if not any(_resolved(*job[:5]) == current for job in jobs):
            jobs.append((*current, args.seeds))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(_run, jobs))
    for row in rows:
        cost(row)
    chosen = {signal: choose([r for r in rows if r.signal == signal]) for signal in signals}
    print(f"drift detectors: {args.seeds} seeds x {STATIONARY:,} stationary samples per stream, "
          f"change after {CHANGE_AT:,}, batches of {BATCH}; river {river.__version__}, "
          f"python {platform.python_version()}, {platform.machine()}, "
          f"{time.perf_counter() - started:.0f} s\n")
    print(table(rows, chosen))
    print("\nfalse alarms for error: p=0.1 / p=0.3.  Defaults (<= 1 false alarm / 10k, no misses, "
          f"median delay <= {MAX_DELAY}):")
    for signal, row in chosen.items():
        current = DEFAULT_DETECTORS[signal]
        if row is None:
            print(f"    {signal!r}: none of the candidates qualifies")
            continue
        same = _resolved(signal, *current, None) == _resolved(
            row.signal, row.detector, row.params, row.chunk, row.warmup)
        print(f"    {signal!r}: Default({row.detector!r}, {row.params!r}),  # chunk "
              f"{row.chunk}, false alarms {row.worst_false_alarms:.2f}/10k, median delay "
              f"{row.median_delay:.0f}"
              f"{'' if same else '   (drift/detectors.py has ' + repr(tuple(current)) + ')'}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([{**asdict(r), "median_delay": r.median_delay} for r in rows], out,
                      indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
