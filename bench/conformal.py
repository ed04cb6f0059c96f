"""B3, online conformal calibration: coverage, its worst stretches, set sizes and update cost.

Two streams, target coverage 90% (α = 0.1):
- synthetic scores, |N(0,1)| for 2,000 steps then |N(0,3)| for 2,000, mean of 10 seeds, the
  stream on which METHODS.md quotes salesforce/online_conformal (its numbers are in the last
  column); D (`max_scale`) = 5 for SF-OGD and SAOCP;
- Digits-C classification (B1's stream: ten corruptions, then clean data), through the same
  in-process engine the service runs, with EATA adapting in batches of 64. Each sample's set is
  predicted at the calibrator's current threshold, then its label's score updates it, in stream
  order; LAC (1 − p_y) and randomised APS scores, D = 1 (both lie in [0, 1]).

Regression streams (B2's intervals, residual scores) come with the drift-stream issue.

    python -m bench.conformal                    # both tables
    python -m bench.conformal --part synthetic   # or: --part digits

Prints markdown tables: long-run coverage, the worst coverage over any window of 100 and 500
steps, mean threshold or set size, and the median time of one `update` in µs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass

import numpy as np

from adapters.conformal import (
    Calibrator,
    aps_scores,
    aps_set,
    build_calibrator,
    lac_scores,
    lac_set,
)

ALPHA = 0.1
SEEDS = range(10)
SHIFT_AT = 2000

# (label, calibrator name, options, reference package's coverage / worst 100 from METHODS.md)
SYNTHETIC_ROWS: list[tuple[str, str, dict, str]] = [
    ("split, last 1,000", "split", {"window": 1000}, ""),
    ("split, all scores", "split", {"window": None}, "0.78 / 0.37"),
    ("ACI, γ = 0.005", "aci", {"gamma": 0.005}, "0.897 / 0.70"),
    ("FACI", "faci", {}, "0.892 / 0.70"),
    ("SF-OGD", "sfogd", {"max_scale": 5.0}, "0.896 / 0.76"),
    ("SAOCP, lifetime 8", "saocp", {"max_scale": 5.0, "lifetime": 8}, "0.886 / 0.815"),
    ("SAOCP, lifetime 32", "saocp", {"max_scale": 5.0, "lifetime": 32}, "0.894 / 0.821"),
]

DIGITS_ROWS: list[tuple[str, str, dict]] = [
    ("split, last 1,000", "split", {"window": 1000}),
    ("ACI, γ = 0.005", "aci", {"gamma": 0.005}),
    ("FACI", "faci", {}),
    ("SF-OGD", "sfogd", {"max_scale": 1.0}),
    ("SAOCP, lifetime 8", "saocp", {"max_scale": 1.0, "lifetime": 8}),
    ("SAOCP, lifetime 32", "saocp", {"max_scale": 1.0, "lifetime": 32}),
]


def shifted_scores(seed: int, steps: int = SHIFT_AT) -> np.ndarray:
    """|N(0,1)| for `steps` steps, then |N(0,3)| for as many: an abrupt shift of the score scale."""
    rng = np.random.default_rng(seed)
    return np.abs(np.concatenate([rng.normal(0.0, 1.0, steps), rng.normal(0.0, 3.0, steps)]))


def worst_window(covered: np.ndarray, width: int) -> float:
    """The lowest coverage over any `width` consecutive steps."""
    if len(covered) < width:
        return float(np.mean(covered))
    sums = np.convolve(covered.astype(np.float64), np.ones(width), mode="valid")
    return float(sums.min() / width)


@dataclass
class Run:
    covered: np.ndarray
    thresholds: np.ndarray
    update_ns: np.ndarray


def run_scores(calibrator: Calibrator, scores: np.ndarray) -> Run:
    """Serve the current threshold for each score, then update with it, timing each update."""
    covered = np.empty(len(scores), dtype=bool)
    thresholds = np.empty(len(scores))
    update_ns = np.empty(len(scores), dtype=np.int64)
    clock = time.perf_counter_ns
    for step, score in enumerate(scores.tolist()):
        threshold = calibrator.threshold
        thresholds[step] = threshold
        covered[step] = score <= threshold
        started = clock()
        calibrator.update(score)
        update_ns[step] = clock() - started
    return Run(covered, thresholds, update_ns)


def synthetic_table() -> str:
    header = ["method", "coverage", "worst 100", "worst 500", "worst 100 after the shift",
              "mean threshold", "µs / update", "reference: coverage / worst 100"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    streams = [shifted_scores(seed) for seed in SEEDS]
    for label, name, options, reference in SYNTHETIC_ROWS:
        runs = [run_scores(build_calibrator(name, ALPHA, **options), s) for s in streams]
        cells = [
            label,
            f"{np.mean([r.covered.mean() for r in runs]):.3f}",
            f"{np.mean([worst_window(r.covered, 100) for r in runs]):.3f}",
            f"{np.mean([worst_window(r.covered, 500) for r in runs]):.3f}",
            f"{np.mean([worst_window(r.covered[SHIFT_AT:], 100) for r in runs]):.3f}",
            f"{np.mean([r.thresholds.mean() for r in runs]):.2f}",
            f"{np.median(np.concatenate([r.update_ns for r in runs])) / 1e3:.1f}",
            reference,
        ]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def digits_probabilities(batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of the whole Digits-C stream, in order, from EATA as served."""
    from bench.digits_c import stream
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine
    from service.settings import load_settings

    metrics = Metrics()
    engine = build_engine(load_settings(None, adapter={"name": "eata"}), metrics,
                          EventLog(metrics))
    probabilities, labels = [], []
    try:
        for domain in stream():
            for start in range(0, len(domain.inputs), batch_size):
                out = engine.forward(domain.inputs[start:start + batch_size])
                probabilities.append(out.outputs)
                labels.append(domain.labels[start:start + batch_size])
    finally:
        engine.close()
    return np.concatenate(probabilities).astype(np.float64), np.concatenate(labels)


def run_sets(calibrator: Calibrator, probs: np.ndarray, labels: np.ndarray, score: str,
             uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's set at the current threshold, then its label's score: (covered, set sizes)."""
    covered = np.empty(len(labels), dtype=bool)
    sizes = np.empty(len(labels), dtype=np.int64)
    if score == "LAC":
        scores = lac_scores(probs, labels)
    else:
        scores = aps_scores(probs, labels, u=uniforms)
    for i in range(len(labels)):
        threshold = calibrator.threshold
        if score == "LAC":
            members = lac_set(probs[i], threshold)
        else:
            members = aps_set(probs[i], threshold, u=uniforms[i])
        covered[i] = members[labels[i]]
        sizes[i] = members.sum()
        calibrator.update(float(scores[i]))
    return covered, sizes


def digits_table() -> str:
    probs, labels = digits_probabilities()
    uniforms = np.random.default_rng(0).random(len(labels))
    accuracy = float((probs.argmax(1) == labels).mean())
    header = ["score", "method", "coverage", "worst 500", "worst 100", "mean set size"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             f"| - | top-1 only (EATA's accuracy) | {accuracy:.3f} | "
             f"{worst_window(probs.argmax(1) == labels, 500):.3f} | "
             f"{worst_window(probs.argmax(1) == labels, 100):.3f} | 1.00 |"]
    for score in ("LAC", "APS"):
        for label, name, options in DIGITS_ROWS:
            covered, sizes = run_sets(build_calibrator(name, ALPHA, **options), probs, labels,
                                      score, uniforms)
            cells = [score, label, f"{covered.mean():.3f}", f"{worst_window(covered, 500):.3f}",
                     f"{worst_window(covered, 100):.3f}", f"{sizes.mean():.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    print(f"\n{len(labels):,} labels, 10 classes", flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["synthetic", "digits", "both"], default="both")
    args = parser.parse_args()
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{time.strftime('%Y-%m-%d')}")
    tables = []
    if args.part in ("synthetic", "both"):
        tables.append(f"Synthetic |N(0,1)| → |N(0,3)| at step {SHIFT_AT}, target 0.9, mean of "
                      f"{len(SEEDS)} seeds; {machine}\n\n{synthetic_table()}")
    if args.part in ("digits", "both"):
        tables.append(f"Digits-C (EATA, batch 64), sets at the current threshold, target 0.9; "
                      f"{machine}\n\n{digits_table()}")
    print("\n\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
