"""Drift detectors on synthetic signals: false alarms, detection delay, misses, cost.

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

    python -m bench.drift_detectors                  # 10 seeds, every candidate (a few minutes)
    python -m bench.drift_detectors --seeds 3        # quicker, coarser
    python -m bench.drift_detectors --signals error --json results.json
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

from drift.detectors import DEFAULT_DETECTORS, DETECTORS, SignalDetector

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


def _run(job: tuple[str, str, dict[str, Any], int | None, int | None, int]) -> Row:
    return measure(*job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--signals", default=",".join(SIGNALS))
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
