"""B3, online conformal calibration: coverage, its worst stretches, set sizes and update cost.

Three kinds of stream, target coverage 90% (α = 0.1):
- synthetic scores, |N(0,1)| for 2,000 steps then |N(0,3)| for 2,000, mean of 10 seeds, the
  stream on which METHODS.md quotes salesforce/online_conformal (its numbers are in the last
  column); D (`max_scale`) = 5 for SF-OGD and SAOCP;
- Digits-C classification (B1's stream: ten corruptions, then clean data), through the same
  in-process engine the service runs, with EATA adapting in batches of 64. Each sample's set is
  predicted at the calibrator's current threshold, then its label's score updates it, in stream
  order; LAC (1 − p_y) and randomised APS scores, D = 1 (both lie in [0, 1]);
- B2's regression streams: River's `FriedmanDrift` (10 uniform features, 5 relevant, noise
  N(0, 1)), 15,000 samples each, mean of 5 stream seeds: `gra` (global, abrupt: the features
  swap roles at 5,000, the first concept returns at 10,000), `lea` (local, abrupt, expanding
  regions at 4,000, 8,000 and 12,000) and `gsg` (global, gradual: concepts mixed for 1,000
  samples from 5,000 and from 10,000). A torch MLP (10-64-64-1) is trained once on 4,000
  samples of the first concept (River's `Friedman`, seed 1,000; 150 epochs, a few seconds on one
  thread); intervals ŷ ∓ q_t from absolute residual scores |y − ŷ|. SF-OGD and SAOCP take
  D = max |residual| over 1,000 held-out samples of the first concept × √3 (the reference
  package's rule, METHODS.md); a second table shows what other D do on `gra`.

Every calibrator starts cold (no score yet, threshold 0), as the service's would.

    python -m bench.conformal                     # every table
    python -m bench.conformal --part synthetic    # or: --part digits, --part regression
    python -m bench.conformal --part regression --delay 100   # labels 100 samples late
    python -m bench.conformal --part equal-coverage   # the default's set sizes against the
                                                      # others' at its coverage (by bisection on α)

Prints markdown tables: long-run coverage, the worst coverage over any window of 100 and 500
steps (labels), mean threshold, set size or interval width, and the median time of one `update`
in µs. With `--delay d` (regression streams only) the interval served for sample t uses the
threshold learnt from the labels of samples up to t − d − 1, as when labels come back late; the
first d samples, served before any label is back (zero width), are left out of the figures.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from adapters.conformal import (
    Calibrator,
    aps_scores,
    aps_set,
    build_calibrator,
    interval,
    lac_scores,
    lac_set,
    residual_scores,
)

if TYPE_CHECKING:
    import torch

ALPHA = 0.1
SEEDS = range(10)
SHIFT_AT = 2000

# (label, calibrator name, options, reference package's coverage / worst 100 from METHODS.md)
SYNTHETIC_ROWS: list[tuple[str, str, dict, str]] = [
    ("split, last 1,000", "split", {"window": 1000}, ""),
    ("split, all scores", "split", {"window": None}, "0.78 / 0.37"),
    ("ACI, γ = 0.005", "aci", {"gamma": 0.005}, "0.897 / 0.70"),
    ("FACI", "faci", {}, "0.892 / 0.70"),
    ("DtACI", "dtaci", {}, ""),
    ("PID (no signal)", "pid", {"max_scale": 5.0}, ""),
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
        calibrator.update(score, served=threshold)
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
        calibrator.update(float(scores[i]), served=threshold)
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


# ---- Digits-C with abrupt switches, through the service, labels late ----------------------------

ABRUPT_DOMAINS = 8  # the first eight corruptions of B1's stream, one after the other
SERVICE_DELAYS = (0, 32, 100)
REQUEST = 32
# (label, conformal.method, conformal.options, conformal.alpha)
SERVICE_ROWS: list[tuple[str, str, dict, float]] = [
    ("split, last 1,000", "split", {"window": 1000}, ALPHA),
    ("ACI, γ = 0.005", "aci", {}, ALPHA),
    ("FACI", "faci", {}, ALPHA),
    # FACI aimed a little higher, for set sizes at PID's coverage (equal coverage)
    ("FACI, α = 0.092", "faci", {}, 0.092),
    ("DtACI", "dtaci", {}, ALPHA),
    ("SAOCP, lifetime 32", "saocp", {}, ALPHA),
    ("PID, no scorecaster", "pid", {"scorecast_lr": 0.0}, ALPHA),
    ("PID, entropy scorecaster", "pid", {}, ALPHA),
    ("auto (the default)", "auto", {}, ALPHA),
]


@dataclass
class Served:
    covered: np.ndarray
    sizes: np.ndarray
    errors: np.ndarray
    state_bytes: int
    method: str
    probabilities: np.ndarray | None = None
    # the calibrator's options as the service built it, and the reference data's entropy its
    # label-free signal is measured against (None: no signal)
    options: dict | None = None
    reference_entropy: float | None = None


def abrupt_digits(domains: int = ABRUPT_DOMAINS, per_domain: int | None = None,
                  seed: int | None = None, order: str = "iid") -> tuple[np.ndarray, np.ndarray]:
    """B1's corrupted domains back to back (no clean stretch between them), each switch abrupt;
    `order` is B1's traffic order within each domain (`iid`, or `dirichlet:A` for classes in
    runs); `per_domain` keeps the first samples of each, in that order (None: all 899); `seed`
    draws other corruption noise and orders (None: B1's)."""
    from bench.digits_c import SEED, order_stream, stream

    drawn = SEED if seed is None else seed
    chosen = [d for d in order_stream(stream(drawn), order, drawn)
              if d.name != "clean_after"][:domains]
    inputs = np.concatenate([d.inputs[:per_domain] for d in chosen])
    labels = np.concatenate([d.labels[:per_domain] for d in chosen])
    return inputs, labels


async def _serve_sets(adapter: str, method: str, options: dict, alpha: float,
                      inputs: np.ndarray, labels: np.ndarray, delay: int, request: int
                      ) -> Served:
    """The stream through the app (in process, its lifespan, an ASGI client), `request` samples
    per request; the labels of samples up to i go back once sample i + `delay` is predicted.
    Covered: the label in the set served, as a caller got it."""
    import httpx

    from service.app import create_app
    from service.settings import load_settings

    settings = load_settings(None, adapter={"name": adapter}, batcher={"max_wait_ms": 0},
                             conformal={"method": method, "options": options,
                                        "alpha": alpha},
                             log_level="warning")
    app = create_app(settings)
    covered = np.zeros(len(labels), dtype=bool)
    sizes = np.zeros(len(labels))
    errors = np.zeros(len(labels), dtype=bool)
    probabilities = np.zeros((len(labels), int(settings.model.num_classes or 0)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://adaptd",
                                     timeout=60) as client:
            labelled = 0
            for start in range(0, len(labels), request):
                end = min(start + request, len(labels))
                ids = [f"s{i}" for i in range(start, end)]
                reply = await client.post("/v1/predict", json={
                    "inputs": inputs[start:end].tolist(), "ids": ids})
                reply.raise_for_status()
                for i, row in enumerate(reply.json()["predictions"], start):
                    probabilities[i] = row["probabilities"]
                    covered[i] = int(labels[i]) in row["set"]
                    sizes[i] = len(row["set"])
                    errors[i] = row["prediction"] != labels[i]
                due = end - delay
                if due > labelled:
                    back = [{"id": f"s{i}", "label": int(labels[i])} for i in range(labelled, due)]
                    (await client.post("/v1/feedback", json={"labels": back})).raise_for_status()
                    labelled = due
            state = (await client.get("/v1/state")).json()["calibrator"]
        stored = await app.state.runtime.store.load_calibrator("conformal")
        conformal = app.state.runtime.conformal
    return Served(covered, sizes, errors, len(stored or b""), state["method"], probabilities,
                  dict(conformal.options),
                  conformal.reference_entropy if conformal.uses_signal else None)


def serve_sets(adapter: str, method: str, options: dict, inputs: np.ndarray, labels: np.ndarray,
               delay: int, request: int = REQUEST, alpha: float = ALPHA) -> Served:
    import asyncio

    return asyncio.run(_serve_sets(adapter, method, options, alpha, inputs, labels, delay,
                                   request))


def service_table(adapters: list[str], delays: list[int], per_domain: int | None = None,
                  seed: int | None = None, methods: list[str] | None = None,
                  order: str = "iid") -> str:
    """One row per adapter, delay and `SERVICE_ROWS` entry (those whose method is in `methods`,
    when given)."""
    inputs, labels = abrupt_digits(per_domain=per_domain, seed=seed, order=order)
    header = ["adapter", "labels late", "method", "coverage", "worst 500", "worst 100",
              "mean set size", "state KB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for adapter in adapters:
        for delay in delays:
            for label, method, options, alpha in SERVICE_ROWS:
                if methods is not None and method not in methods:
                    continue
                served = serve_sets(adapter, method, options, inputs, labels, delay,
                                    alpha=alpha)
                if method == "auto":
                    label = f"{label}: {served.method}"
                cells = [adapter, str(delay), label, f"{served.covered.mean():.3f}",
                         f"{worst_window(served.covered, 500):.3f}",
                         f"{worst_window(served.covered, 100):.3f}",
                         f"{served.sizes.mean():.2f}", f"{served.state_bytes / 1e3:.1f}"]
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], f"(error {served.errors.mean():.3f})", flush=True)
    return "\n".join(lines)


# ---- the default's set sizes against the others' at the same coverage ---------------------------

# the calibrators the default's sets are held against (issue 12: ACI, FACI and SAOCP; DtACI too)
EQUAL_COVERAGE_ROWS: list[tuple[str, str, dict]] = [
    ("ACI, γ = 0.005", "aci", {}),
    ("FACI", "faci", {}),
    ("DtACI", "dtaci", {}),
    ("SAOCP, lifetime 32", "saocp", {"max_scale": 1.0}),
]


def replay_sets(calibrator: Calibrator, probabilities: np.ndarray, labels: np.ndarray,
                delay: int, request: int = REQUEST, reference_entropy: float | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The service's schedule offline, on the probabilities it served: LAC sets per request at
    the calibrator's threshold (for its batch's label-free signal, the mean entropy minus the
    reference data's over log K, when `reference_entropy` is given), then the labels of samples
    up to i once sample i + `delay` is served, each with the threshold it was served, as the
    service tells its calibrator. (covered, set sizes)."""
    scores = lac_scores(probabilities, labels)
    safe = np.clip(probabilities, 1e-300, None)
    entropy = -(probabilities * np.log(safe)).sum(axis=1)
    scale = math.log(probabilities.shape[1])
    covered = np.empty(len(labels), dtype=bool)
    sizes = np.empty(len(labels))
    signals: list[float | None] = []
    served: list[float] = []
    labelled = 0
    for start in range(0, len(labels), request):
        end = min(start + request, len(labels))
        signal = (None if reference_entropy is None
                  else (float(np.mean(entropy[start:end])) - reference_entropy) / scale)
        threshold = calibrator.threshold_for(signal)
        for i in range(start, end):
            members = lac_set(probabilities[i], threshold)
            covered[i], sizes[i] = members[labels[i]], members.sum()
            signals.append(signal)
            served.append(threshold)
        while labelled < end - delay:
            calibrator.update(float(scores[labelled]), signals[labelled],
                              served=served[labelled])
            labelled += 1
    return covered, sizes


def at_coverage(name: str, options: dict, target: float, probabilities: np.ndarray,
                labels: np.ndarray, delay: int) -> tuple[float, np.ndarray, np.ndarray]:
    """The α at which calibrator `name` covers `target` on the replay (bisection to within
    0.0004, or its closest of 16 tries): (α, covered, sizes)."""
    low, high = 0.01, 0.25  # a lower α covers more
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(16):
        alpha = (low + high) / 2
        covered, sizes = replay_sets(build_calibrator(name, alpha, **options), probabilities,
                                     labels, delay)
        if best is None or abs(covered.mean() - target) < abs(best[1].mean() - target):
            best = (alpha, covered, sizes)
        if abs(covered.mean() - target) < 0.0004:
            break
        low, high = (alpha, high) if covered.mean() > target else (low, alpha)
    assert best is not None
    return best


def equal_coverage_table(delays: list[int], seed: int | None = None,
                         per_domain: int | None = None, adapter: str = "auto") -> str:
    """The default configuration through the service (`adapter`: `auto`, which is `bn` for the
    demo CNN; `conformal.method = "auto"`), then each of `EQUAL_COVERAGE_ROWS` replayed offline
    on the probabilities it served, α moved until it covers what the default covered: set sizes
    at equal coverage. The default's own replay must give exactly the sets served (it is
    checked), so the replay is the service."""
    inputs, labels = abrupt_digits(per_domain=per_domain, seed=seed)
    header = ["labels late", "method", "α", "coverage", "worst 500", "mean set size",
              "the default's size against it"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for delay in delays:
        served = serve_sets(adapter, "auto", {}, inputs, labels, delay)
        assert served.probabilities is not None and served.options is not None
        again, again_sizes = replay_sets(
            build_calibrator(served.method, ALPHA, **served.options), served.probabilities,
            labels, delay, reference_entropy=served.reference_entropy)
        if not (np.array_equal(again, served.covered) and np.array_equal(again_sizes,
                                                                         served.sizes)):
            raise RuntimeError("the offline replay of the default differs from what was served")
        target, size = served.covered.mean(), served.sizes.mean()
        lines.append(f"| {delay} | the default ({served.method}), served | {ALPHA} | "
                     f"{target:.4f} | {worst_window(served.covered, 500):.3f} | {size:.3f} | - |")
        print(lines[-1], flush=True)
        for label, name, options in EQUAL_COVERAGE_ROWS:
            alpha, covered, sizes = at_coverage(name, options, target, served.probabilities,
                                                labels, delay)
            lines.append(f"| {delay} | {label} | {alpha:.4f} | {covered.mean():.4f} | "
                         f"{worst_window(covered, 500):.3f} | {sizes.mean():.3f} | "
                         f"{100 * (size / sizes.mean() - 1):+.1f}% |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


# ---- B2's regression streams: FriedmanDrift, a small MLP, intervals from |y − ŷ| ----------------

STREAM_LENGTH = 15_000
# name: (River's drift_type, drift positions, transition window, what happens)
FRIEDMAN_STREAMS: dict[str, tuple[str, tuple[int, ...], int, str]] = {
    "gra": ("gra", (5_000, 10_000), 0, "abrupt at 5,000, the first concept back at 10,000"),
    "lea": ("lea", (4_000, 8_000, 12_000), 0, "abrupt, local, expanding at 4,000/8,000/12,000"),
    "gsg": ("gsg", (5_000, 10_000), 1_000, "gradual over 1,000 samples from 5,000 and 10,000"),
}
STREAM_SEEDS = range(1, 6)
TRAIN_SEED = 1_000
TRAIN_SAMPLES = 4_000
CALIBRATION_SAMPLES = 1_000
CALIBRATION_D = "D"  # stands for the D derived from the calibration residuals
D_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)

REGRESSION_ROWS: list[tuple[str, str, dict]] = [
    ("split, last 1,000", "split", {"window": 1000}),
    ("ACI, γ = 0.005", "aci", {"gamma": 0.005}),
    ("FACI", "faci", {}),
    ("DtACI", "dtaci", {}),
    ("PID (no signal)", "pid", {"max_scale": CALIBRATION_D}),
    ("SF-OGD", "sfogd", {"max_scale": CALIBRATION_D}),
    ("SAOCP, lifetime 8", "saocp", {"max_scale": CALIBRATION_D, "lifetime": 8}),
    ("SAOCP, lifetime 32", "saocp", {"max_scale": CALIBRATION_D, "lifetime": 32}),
]


def friedman_samples(stream: str | None, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`size` samples (features, targets) of a `FRIEDMAN_STREAMS` stream, or of the first concept
    alone (River's stationary `Friedman`, the function every FriedmanDrift variant starts with)
    when `stream` is None."""
    from river.datasets import synth

    if stream is None:
        source = synth.Friedman(seed=seed)
    else:
        drift_type, positions, transition, _ = FRIEDMAN_STREAMS[stream]
        source = synth.FriedmanDrift(drift_type=drift_type, position=positions,
                                     transition_window=transition, seed=seed)
    features = np.empty((size, 10))
    targets = np.empty(size)
    for i, (x, y) in enumerate(source.take(size)):
        features[i] = [x[k] for k in range(10)]
        targets[i] = y
    return features, targets


@dataclass
class FriedmanModel:
    """The MLP trained on the first concept, and its residuals on held-out first-concept data."""

    net: torch.nn.Module
    target_mean: float
    target_std: float
    calibration_residuals: np.ndarray
    train_seconds: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return _forward(self.net, features) * self.target_std + self.target_mean

    @property
    def max_scale(self) -> float:
        """D for SF-OGD and SAOCP: the largest held-out residual × √3, the reference's rule."""
        return float(self.calibration_residuals.max() * math.sqrt(3.0))


def _forward(net: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.as_tensor(features, dtype=torch.float32))[:, 0].double().numpy()


def train_friedman_model(epochs: int = 150, train: int = TRAIN_SAMPLES,
                         calibration: int = CALIBRATION_SAMPLES,
                         seed: int = TRAIN_SEED) -> FriedmanModel:
    """A 10-64-64-1 ReLU MLP fitted to standardised targets of the first concept (Adam 3e-3,
    batches of 128), deterministic: one thread, fixed seeds."""
    import torch

    features, targets = friedman_samples(None, train + calibration, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(),
                                  torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                  torch.nn.Linear(64, 1))
        x = torch.as_tensor(features[:train], dtype=torch.float32)
        y = torch.as_tensor(targets[:train], dtype=torch.float32)
        mean, std = float(y.mean()), float(y.std())
        y = ((y - mean) / std)[:, None]
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for batch in torch.randperm(train, generator=order).split(128):
                loss = torch.nn.functional.mse_loss(net(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        net.eval()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    held_out = _forward(net, features[train:]) * std + mean
    return FriedmanModel(net, mean, std, residual_scores(held_out, targets[train:]), seconds)


def run_intervals(calibrator: Calibrator, predictions: np.ndarray, targets: np.ndarray,
                  delay: int = 0) -> Run:
    """Serve ŷ ∓ q_t for each sample; its residual updates the calibrator once its label is back,
    `delay` samples later (0: before the next sample is served). Times each update."""
    scores = residual_scores(predictions, targets)
    covered = np.empty(len(targets), dtype=bool)
    half_widths = np.empty(len(targets))
    update_ns = []
    pending: deque[tuple[float, float]] = deque()  # a score, and the half-width it was served
    clock = time.perf_counter_ns
    for i, (prediction, target, score) in enumerate(
            zip(predictions.tolist(), targets.tolist(), scores.tolist(), strict=True)):
        threshold = calibrator.threshold
        lower, upper = interval(np.float64(prediction), threshold)
        covered[i] = lower <= target <= upper
        half_widths[i] = threshold
        pending.append((score, threshold))
        if len(pending) > delay:
            late, served = pending.popleft()
            started = clock()
            calibrator.update(late, served=served)
            update_ns.append(clock() - started)
    return Run(covered, half_widths, np.asarray(update_ns, dtype=np.int64))


def _options(options: dict, max_scale: float) -> dict:
    return {k: max_scale if v == CALIBRATION_D else v for k, v in options.items()}


def regression_streams(model: FriedmanModel) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(predictions, targets) per stream and seed."""
    streams = {}
    for stream in FRIEDMAN_STREAMS:
        streams[stream] = []
        for seed in STREAM_SEEDS:
            features, targets = friedman_samples(stream, STREAM_LENGTH, seed)
            streams[stream].append((model.predict(features), targets))
    return streams


def _interval_cells(runs: list[Run], skip: int) -> list[str]:
    """Coverage, worst windows and mean width over the samples after the first `skip`."""
    covered = [r.covered[skip:] for r in runs]
    return [f"{np.mean([c.mean() for c in covered]):.3f}",
            f"{np.mean([worst_window(c, 500) for c in covered]):.3f}",
            f"{np.mean([worst_window(c, 100) for c in covered]):.3f}",
            f"{np.mean([2 * r.thresholds[skip:].mean() for r in runs]):.2f}"]


def regression_table(model: FriedmanModel,
                     streams: dict[str, list[tuple[np.ndarray, np.ndarray]]],
                     delay: int = 0) -> str:
    header = ["stream", "method", "coverage", "worst 500", "worst 100", "mean width",
              "µs / update"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stream, pairs in streams.items():
        for label, name, options in REGRESSION_ROWS:
            options = _options(options, model.max_scale)
            runs = [run_intervals(build_calibrator(name, ALPHA, **options), p, t, delay)
                    for p, t in pairs]
            cells = [stream, label, *_interval_cells(runs, delay),
                     f"{np.median(np.concatenate([r.update_ns for r in runs])) / 1e3:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            if name == "pid":
                bound = [after_first_label(run, FRIEDMAN_STREAMS[stream][1][0], delay)
                         for run in runs]
                cells = [stream, "bound: PID until the drift's first label, then all covered",
                         *_interval_cells(bound, delay)[:3], "-", "-"]
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def after_first_label(run: Run, drift: int, delay: int) -> Run:
    """`run` with every sample covered from the first label of the drifted concept on (sample
    `drift` + `delay`): the best that any calibrator serving as `run` did until then can reach.
    Nothing label-free tells a FriedmanDrift drift (its inputs keep their distribution), so no
    calibrator can do better on the `delay` samples before that label."""
    covered = run.covered.copy()
    covered[drift + delay:] = True
    return Run(covered, run.thresholds, run.update_ns)


def max_scale_table(model: FriedmanModel,
                    streams: dict[str, list[tuple[np.ndarray, np.ndarray]]],
                    stream: str = "gra", delay: int = 0) -> str:
    """SF-OGD and SAOCP on one stream with D a multiple of the calibration-derived D."""
    header = ["D", "method", "coverage", "worst 500", "worst 100", "mean width"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for factor in D_FACTORS:
        max_scale = factor * model.max_scale
        for label, name, options in REGRESSION_ROWS:
            if options.get("max_scale") != CALIBRATION_D:
                continue
            options = _options(options, max_scale)
            runs = [run_intervals(build_calibrator(name, ALPHA, **options), p, t, delay)
                    for p, t in streams[stream]]
            cells = [f"{max_scale:.2f} ({factor:g} × D)", label, *_interval_cells(runs, delay)]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def regression_tables(delay: int, machine: str) -> list[str]:
    model = train_friedman_model()
    residuals = model.calibration_residuals
    print(f"MLP trained in {model.train_seconds:.1f} s; held-out first-concept residuals: mean "
          f"{residuals.mean():.2f}, 90% quantile {np.quantile(residuals, 0.9):.2f}, max "
          f"{residuals.max():.2f}, so D = {model.max_scale:.2f}", flush=True)
    streams = regression_streams(model)
    described = "; ".join(f"{name}: {what}, MLP mean absolute error "
                          f"{np.mean([np.abs(t - p).mean() for p, t in streams[name]]):.2f}"
                          for name, (_, _, _, what) in FRIEDMAN_STREAMS.items())
    intro = (f"FriedmanDrift, {STREAM_LENGTH:,} samples ({described}), mean of "
             f"{len(STREAM_SEEDS)} stream seeds, labels {delay} samples late (figures from sample "
             f"{delay} on); MLP trained on "
             f"{TRAIN_SAMPLES:,} first-concept samples in {model.train_seconds:.1f} s, held-out "
             f"residuals mean {residuals.mean():.2f} / max {residuals.max():.2f}, "
             f"D = max × √3 = {model.max_scale:.2f}; target 0.9; {machine}")
    first, second = FRIEDMAN_STREAMS["gra"][1]
    drifted = max(np.abs(t - p)[first:second].max() for p, t in streams["gra"])
    return [f"{intro}\n\n{regression_table(model, streams, delay)}",
            f"gra, SF-OGD and SAOCP with other D (residuals of the drifted concept reach "
            f"{drifted:.1f}; labels {delay} samples late)\n\n"
            f"{max_scale_table(model, streams, 'gra', delay)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["synthetic", "digits", "service", "equal-coverage",
                                           "regression", "all"], default="all")
    parser.add_argument("--delay", type=int, default=None,
                        help="labels come back this many samples late (regression and service "
                        "parts; default: 0 for regression, 0, 32 and 100 through the service)")
    parser.add_argument("--adapters", default="none,eata",
                        help="service part: the adapters to serve the abrupt Digits-C stream with")
    parser.add_argument("--served-adapter", default="auto",
                        help="equal-coverage part: the adapter the default is served with "
                        "(default auto, the service's: bn for the demo CNN)")
    parser.add_argument("--per-domain", type=int, default=None,
                        help="service and equal-coverage parts: keep this many samples of each "
                        "domain (default all)")
    parser.add_argument("--seed", type=int, default=None,
                        help="service and equal-coverage parts: another draw of the corrupted "
                        "stream (default B1's)")
    parser.add_argument("--methods", default=None,
                        help="service part: only these conformal.method rows, e.g. pid,faci")
    parser.add_argument("--order", default="iid",
                        help="service part: the order within each domain, iid or dirichlet:A "
                        "(B1's classes in runs)")
    args = parser.parse_args()
    if args.delay is not None and args.delay < 0:
        parser.error("--delay counts samples: 0 or more")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{time.strftime('%Y-%m-%d')}")
    started = time.perf_counter()
    tables = []
    drawn = "of B1" if args.seed is None else args.seed
    if args.part in ("synthetic", "all"):
        tables.append(f"Synthetic |N(0,1)| → |N(0,3)| at step {SHIFT_AT}, target 0.9, mean of "
                      f"{len(SEEDS)} seeds; {machine}\n\n{synthetic_table()}")
    if args.part in ("service", "all"):
        delays = list(SERVICE_DELAYS) if args.delay is None else [args.delay]
        methods = None if args.methods is None else args.methods.split(",")
        table = service_table(args.adapters.split(","), delays, args.per_domain, args.seed,
                              methods, args.order)
        tables.append(f"Digits-C, {ABRUPT_DOMAINS} corrupted domains back to back (abrupt "
                      f"switches; stream seed {drawn}, order {args.order}), through the service, "
                      f"{REQUEST} samples per request, sets as "
                      f"served, target 0.9; {machine}\n\n"
                      f"{table}")
    if args.part in ("equal-coverage", "all"):
        delays = list(SERVICE_DELAYS) if args.delay is None else [args.delay]
        adapter = args.served_adapter
        tables.append(f"Digits-C as in the service part (stream seed {drawn}), "
                      f"adapter {adapter} with conformal.method auto served, the others "
                      f"replayed on its probabilities at its coverage; {machine}\n\n"
                      f"{equal_coverage_table(delays, args.seed, args.per_domain, adapter)}")
    if args.part in ("regression", "all"):
        tables += regression_tables(args.delay or 0, machine)
    if args.part in ("digits", "all"):
        tables.append(f"Digits-C (EATA, batch 64), sets at the current threshold, target 0.9; "
                      f"{machine}\n\n{digits_table()}")
    print("\n\n" + "\n\n".join(tables))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
