"""B2, drift streams with delayed labels: River streams with one abrupt drift, through the service.

Each stream joins two River generators: `before` samples of the first concept, then `after`
samples of the second, so the drift is exactly abrupt at sample `before` (River's
`ConceptDriftStream` with `width=1` overflows for positions above ~178). A small MLP (no
BatchNorm; standardisation is a fixed affine map inside it) is trained on the first `train`
samples of the first concept, saved with safetensors and served by the real app, in process
(`service.app.create_app` under its lifespan, an httpx client on an ASGI transport), with the
micro-batcher's wait at 0 and the in-process store. The first 2,000 training samples are the
service's reference data (`model.reference_data`): the error memory centres its keys on their
mean feature, the output corrector scales by their outputs. Online conformal calibration is off
(it adds sets and intervals, changes no prediction, and B3 measures it); everything else is at the
service's defaults.

The protocol is prequential with delayed labels. Samples go to ``POST /v1/predict`` in order,
`request` samples per request; each prediction is scored against the true label when it is made;
the label of sample i goes back through ``POST /v1/feedback`` once sample i + `delay` has been
predicted. Reported per stream and configuration:

- prequential accuracy (classification) or MAE (regression) over the whole stream, over the
  1,000 samples before the drift, the 1,000 after it, the stream's last 1,000 (where it
  settled), and all samples after the drift;
- recovery: samples from the drift to the end of the first window of 500 post-drift samples whose
  accuracy is within 2 points of the pre-drift level (accuracy over the last 5,000 samples before
  the drift); "never" if no window within the stream gets there. The smallest possible value is
  the window, 500; the static model, which cannot learn, recovers only if the drift hardly hurts.
  A recovery marked "not held" ends in a window that noise lifted over the bar: the stream's last
  1,000 samples are more than 2 points below the level;
- regression: the MAE over all samples after the drift, relative to the static model's;
- with a drift policy on: detection delay (samples from the drift to the first `drift_alarm`
  event, positioned by the service's served-sample clock) and false alarms per 10,000 samples
  before the drift, read from ``GET /v1/events``.

Streams (first concept -> second):

    sea          SEA variant 0 -> 3: class x0 + x1 > 8 -> > 9.5; 3 features in [0, 10]
    sine         Sine function 0 -> 2: boundary x0 = sin(x1) -> x0 = 0.5 + 0.3 sin(3 pi x1)
    hyperplane   Hyperplane seed 1 -> seed 2: a new random hyperplane over 10 features, 4% noise
    rbf          RandomRBF seed 1 -> seed 2: 50 new centroids, 10 features, 2 classes
    agrawal      Agrawal function 1 -> 2: (age, salary) rule -> (age, education level) rule;
                 9 features, the categorical ones as their integer codes
    friedman-gra FriedmanDrift 'gra': the relevant features swap places (global abrupt)
    friedman-lea FriedmanDrift 'lea' at its widest: the target changes in two regions, x1, x2
                 < 0.3 and > 0.7, 18% of the space (local abrupt); Gaussian noise sd 1

Configurations (service settings; in every one the online mixture is off, on by default for these
tabular models since stop 28 and measured by B6); a configuration whose settings this checkout
does not have yet is skipped with a note:

    static            adapter none, nothing learns from labels, drift monitoring off
    compensation      ReLoop2 error memory, exact top-K (`error_memory.kind = "exact"`), policy off
    hashed            the same memory, SimHash buckets (`error_memory.kind = "hashed"`)
    correction        regression only: ADCSD output correction, no memory
    comp+drift        compensation with drift monitoring and its policy at the service defaults
                      (an alarm on the labelled signal trims the memory to its newest rows and
                      boosts learning rates; a label-free alarm boosts only)
    correction+drift  regression only: the corrector, its learning rate boosted on alarms
    all               regression only: compensation, correction and the drift policy
    supervised        the supervised step on labels: low-rank adapters trained on joined labels
                      (`[supervised]`), nothing else
    comp+sup          classification only: compensation and the supervised step, policy off
    comp+sup+drift    classification only: the same with drift monitoring and its policy

Their parameters are `MEMORY`, `CORRECTION`, `DRIFT` and `SUPERVISED` below, printed with every
table.

    python -m bench.drift_streams                          # every stream and configuration
    python -m bench.drift_streams --quick                  # 3,000 + 3,000 samples, for a look
    python -m bench.drift_streams --streams sea,friedman-gra --configs static,compensation
    python -m bench.drift_streams --delay 500 --json b2.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from river.datasets import synth

SEED = 2024
TRAIN = 8_000
BEFORE = 10_000
AFTER = 10_000
DELAY = 100
REQUEST = 16
EDGE = 1_000  # samples on each side of the drift for the before / after columns
LEVEL = 5_000  # samples before the drift that set the pre-drift level
WINDOW = 500  # rolling window of the recovery test
TOLERANCE = 0.02  # recovered: within 2 accuracy points of the pre-drift level
HIDDEN = 64

# The error memory (ReLoop2's ranges: K 70 to 180, lambda 0.4 to 0.9, tau about 0.1, gamma 1).
# Classification needs lambda > 0.5: with gamma 1 the output is (1 - lambda) ŷ + lambda ȳ, so
# below that the neighbours' labels cannot overturn a confident prediction. Regression keeps 0.5:
# the neighbours' noisy labels add error wherever the model is right (before the drift). 2,000
# rows, a fifth of the post-drift stream, so the old concept leaves the memory.
MEMORY = {
    "classification": {"k": 100, "temperature": 0.1, "gamma": 1.0, "weight": 0.9,
                       "capacity": 2_000},
    "regression": {"k": 100, "temperature": 0.1, "gamma": 1.0, "weight": 0.5, "capacity": 2_000},
}
# ADCSD's output corrector: the reference's learning rate (AGCRN, 0.003) and each step over the
# newest 256 labels (with the service's defaults, 1e-3 and 64, the post-drift MAE on the Friedman
# streams is 10-16% higher)
CORRECTION: dict[str, Any] = {"learning_rate": 0.003, "window": 256}
DRIFT: dict[str, Any] = {}  # the drift policy at the service's defaults
# the supervised step on labels: low-rank adapters (rank 16) beside all three of the MLP's linear
# layers, at the service's learning-rate cap, a step per 32 labels (rank 4 on the last two
# layers moved Hyperplane from 70 to 89% after the drift but not back to its 95%; at a base
# rate of 0.002 that the policy's boost can raise, the policy sped Hyperplane's recovery up
# 1.7 times and slowed SEA's)
SUPERVISED: dict[str, Any] = {"train": "lowrank", "layers": 3, "rank": 16, "learning_rate": 0.01,
                              "batch_size": 32}


# --- the model ----------------------------------------------------------------------------------

class StreamMLP(nn.Module):
    """Two hidden ReLU layers between a fixed standardisation of the inputs and of the target.

    The statistics are buffers, so they travel with the weights in the safetensors file and the
    factories below need no arguments. The last `nn.Linear` reads the second hidden layer: those
    64 features are the error memory's keys.
    """

    def __init__(self, inputs: int, outputs: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(inputs))
        self.register_buffer("input_scale", torch.ones(inputs))
        self.register_buffer("output_mean", torch.zeros(outputs))
        self.register_buffer("output_scale", torch.ones(outputs))
        self.body = nn.Sequential(
            nn.Linear(inputs, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body((x - self.input_mean) / self.input_scale)
        return z * self.output_scale + self.output_mean


def sea_mlp() -> StreamMLP:
    return StreamMLP(3, 2)


def sine_mlp() -> StreamMLP:
    return StreamMLP(2, 2)


def mlp_10_2() -> StreamMLP:
    """Hyperplane and RandomRBF: 10 features, 2 classes."""
    return StreamMLP(10, 2)


def agrawal_mlp() -> StreamMLP:
    return StreamMLP(9, 2)


def friedman_mlp() -> StreamMLP:
    return StreamMLP(10, 1)


def train_mlp(factory: Callable[[], StreamMLP], x: np.ndarray, y: np.ndarray, task: str,
              epochs: int = 10, seed: int = SEED) -> StreamMLP:
    """A new model from `factory`, trained by Adam on mini-batches of 64 (cross-entropy, or MSE
    on the standardised target); seeded, so its initial weights and batches repeat."""
    torch.manual_seed(seed)
    model = factory()
    inputs = torch.from_numpy(x).float()
    model.input_mean.copy_(inputs.mean(0))
    model.input_scale.copy_(inputs.std(0).clamp_min(1e-6))
    if task == "classification":
        targets = torch.from_numpy(y).long()
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    else:
        targets = torch.from_numpy(y).float()[:, None]
        model.output_mean.copy_(targets.mean(0))
        model.output_scale.copy_(targets.std(0))
        targets = (targets - model.output_mean) / model.output_scale
        loss_fn = nn.functional.mse_loss
    optimizer = torch.optim.Adam(model.body.parameters(), lr=3e-3)
    z = (inputs - model.input_mean) / model.input_scale
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(z)).split(64):
            if len(batch) < 2:  # a BatchNorm layer cannot train on one sample
                continue
            optimizer.zero_grad()
            loss_fn(model.body(z[batch]), targets[batch]).backward()
            optimizer.step()
    return model.eval()


# --- the streams --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stream:
    """Two concepts of one River family (each a fresh seeded generator per call), and the model
    that serves them."""

    name: str
    task: str
    features: int
    classes: int | None
    model: Callable[[], StreamMLP]  # a factory at module level, so the service can import it
    first: Callable[[], Iterable[tuple[dict, Any]]]
    second: Callable[[], Iterable[tuple[dict, Any]]]

    @property
    def factory(self) -> str:
        # named by its import path, not `__name__`, which is "__main__" under `python -m`
        return f"bench.drift_streams:{self.model.__name__}"


# 'gra' drifts at its first position and recurs at its second; positions far out keep one concept
_NEVER = 10**12

STREAMS: dict[str, Stream] = {
    "sea": Stream("sea", "classification", 3, 2, sea_mlp,
                  lambda: synth.SEA(variant=0, seed=1),
                  lambda: synth.SEA(variant=3, seed=2)),
    "sine": Stream("sine", "classification", 2, 2, sine_mlp,
                   lambda: synth.Sine(classification_function=0, seed=1),
                   lambda: synth.Sine(classification_function=2, seed=2)),
    "hyperplane": Stream("hyperplane", "classification", 10, 2, mlp_10_2,
                         lambda: synth.Hyperplane(seed=1, n_features=10),
                         lambda: synth.Hyperplane(seed=2, n_features=10)),
    "rbf": Stream("rbf", "classification", 10, 2, mlp_10_2,
                  lambda: synth.RandomRBF(seed_model=1, seed_sample=1, n_features=10),
                  lambda: synth.RandomRBF(seed_model=2, seed_sample=2, n_features=10)),
    "agrawal": Stream("agrawal", "classification", 9, 2, agrawal_mlp,
                      lambda: synth.Agrawal(classification_function=1, seed=1),
                      lambda: synth.Agrawal(classification_function=2, seed=2)),
    "friedman-gra": Stream(
        "friedman-gra", "regression", 10, None, friedman_mlp,
        lambda: synth.FriedmanDrift("gra", position=(_NEVER, _NEVER + 1), seed=1),
        lambda: synth.FriedmanDrift("gra", position=(0, _NEVER), seed=2)),
    "friedman-lea": Stream(
        "friedman-lea", "regression", 10, None, friedman_mlp,
        lambda: synth.FriedmanDrift("lea", position=(_NEVER, _NEVER + 1, _NEVER + 2), seed=1),
        # from its third sample on, 'lea' is at its widest regions
        lambda: itertools.islice(synth.FriedmanDrift("lea", position=(0, 1, 2), seed=2), 2,
                                 None)),
}


def _take(dataset: Iterable[tuple[dict, Any]], count: int, skip: int = 0,
          ) -> tuple[np.ndarray, np.ndarray]:
    rows: Iterator[tuple[dict, Any]] = iter(dataset)
    for _ in range(skip):
        next(rows)
    x, y = [], []
    for _ in range(count):
        features, target = next(rows)
        x.append(list(features.values()))
        y.append(target)
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float64)


def stream_data(stream: Stream, train: int, before: int, after: int
                ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(training x, y) and (stream x, y): the first concept's first `train` samples train the
    model, its next `before` open the stream, then `after` of the second concept (one seeded
    generator per concept, so Hyperplane keeps its weights between training and stream)."""
    x_train, y_train = _take(stream.first(), train)
    x_before, y_before = _take(stream.first(), before, skip=train)
    x_after, y_after = _take(stream.second(), after)
    x = np.concatenate([x_before, x_after])
    y = np.concatenate([y_before, y_after])
    if stream.task == "classification":
        y_train, y = y_train.astype(np.int64), y.astype(np.int64)
    return (x_train, y_train), (x, y)


# --- configurations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """A row of the table: what the service runs on top of the stream's frozen model."""

    name: str
    compensation: str = "off"  # the error memory: off, exact or hashed
    correction: bool = False  # ADCSD's output corrector (regression)
    drift_policy: bool = False
    supervised: bool = False  # a low-rank adapter trained on the labels ([supervised])
    shadow: bool = True  # the source copy and its guards ([shadow]), on as the service's default
    tasks: tuple[str, ...] = ("classification", "regression")

    def settings(self, task: str) -> dict[str, Any]:
        """The settings sections this configuration sets, for a model of `task`."""
        sections: dict[str, Any] = {}
        if self.compensation != "off":
            sections["error_memory"] = {"kind": self.compensation, **MEMORY[task]}
        if self.correction:
            sections["output_corrector"] = {"enabled": True, **CORRECTION}
        if self.supervised:
            sections["supervised"] = {"enabled": True, **SUPERVISED}
        # the service watches for drift by default: off unless this configuration is about it
        sections["drift"] = {"enabled": True, **DRIFT} if self.drift_policy else {"enabled": False}
        # conformal sets and intervals change no prediction (B3 measures them), and their update
        # at every label join makes the run twice as slow
        sections["conformal"] = {"method": "off"}
        sections["shadow"] = {"enabled": self.shadow}
        # each row measures its parts alone: the online mixture with River's learner, on by
        # default for these tabular models, is B6's to measure
        sections["mixture"] = {"enabled": False}
        return sections


CONFIGS: dict[str, Config] = {
    "static": Config("static"),
    "compensation": Config("compensation", compensation="exact"),
    "hashed": Config("hashed", compensation="hashed"),
    "correction": Config("correction", correction=True, tasks=("regression",)),
    "comp+drift": Config("comp+drift", compensation="exact", drift_policy=True),
    "correction+drift": Config("correction+drift", correction=True, drift_policy=True,
                               tasks=("regression",)),
    "all": Config("all", compensation="exact", correction=True, drift_policy=True,
                  tasks=("regression",)),
    "supervised": Config("supervised", supervised=True),
    "comp+sup": Config("comp+sup", compensation="exact", supervised=True,
                       tasks=("classification",)),
    "comp+sup+drift": Config("comp+sup+drift", compensation="exact", supervised=True,
                             drift_policy=True, tasks=("classification",)),
}


def missing_settings(config: Config) -> str | None:
    """Why this checkout cannot run `config` (a settings section it does not have), or None."""
    from pydantic import ValidationError

    from service.settings import load_settings

    task = config.tasks[-1]
    try:
        load_settings(None, model={"task": task}, **config.settings(task))
    except ValidationError as error:
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return None


# --- one run ------------------------------------------------------------------------------------

@dataclass
class Result:
    """One stream through one configuration: scores (accuracy, or absolute error, as means) and
    what the service reported."""

    stream: str
    config: str
    task: str
    samples: int
    drift_at: int
    delay: int
    overall: float  # accuracy, or MAE
    before: float  # over the EDGE samples before the drift
    after: float  # over the EDGE samples after it
    post: float  # over every sample after it
    end: float  # over the last EDGE samples of the stream: where it settled
    level: float  # pre-drift level for the recovery test
    recovery: int | None  # samples; None: never within the stream
    # drift alarms, oldest first: the served-sample count when raised, and which detector/signal
    alarms: list[tuple[int, str]] = field(default_factory=list)
    unjoined_labels: int = 0  # labels the service did not join (unknown, duplicate, expired)
    memory_rows: int = 0  # rows in the service's memories at the end (adaptd_memory_size)
    service_rolling: float | None = None  # the service's own rolling error at the end
    bench_rolling: float | None = None  # the same, computed here from the joined labels
    seconds: float = 0.0  # the service's start, the stream, and the read-outs
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def held(self) -> bool | None:
        """Classification: whether the stream's last EDGE samples are within the tolerance of
        the level too (a recovery that is not held was one lucky window); None for regression."""
        if self.task != "classification":
            return None
        return self.end >= self.level - TOLERANCE

    @property
    def detection_delay(self) -> int | None:
        late = [at - self.drift_at for at, _ in self.alarms if at >= self.drift_at]
        return min(late) if late else None

    @property
    def first_detector(self) -> str | None:
        """The detector/signal of the first alarm at or after the drift."""
        return next((source for at, source in self.alarms if at >= self.drift_at), None)

    @property
    def false_alarms_per_10k(self) -> float:
        return 10_000 * sum(at < self.drift_at for at, _ in self.alarms) / self.drift_at


def recovery_samples(correct: np.ndarray, drift_at: int, level: float,
                     window: int = WINDOW, tolerance: float = TOLERANCE) -> int | None:
    """Samples from the drift to the end of the first all-post-drift window of `window` samples
    whose accuracy is at least ``level - tolerance``; None if none is.

    >>> correct = np.r_[np.ones(100), np.zeros(50), np.ones(200)]  # 50 misses after the drift
    >>> recovery_samples(correct, drift_at=100, level=1.0, window=50, tolerance=0.0)
    100
    >>> recovery_samples(correct, drift_at=100, level=1.0, window=50, tolerance=0.02)  # 1 miss
    99
    >>> recovery_samples(correct[:160], drift_at=100, level=1.0, window=50) is None
    True
    """
    post = np.asarray(correct[drift_at:], dtype=np.float64)
    if len(post) < window:
        return None
    sums = np.convolve(post, np.ones(window), mode="valid")  # sums[i]: samples i .. i+window-1
    reached = np.flatnonzero(sums / window >= level - tolerance - 1e-12)
    return None if len(reached) == 0 else int(reached[0]) + window


def _settings(stream: Stream, config: Config, weights: Path, reference: Path):
    from service.settings import load_settings

    model = {"factory": stream.factory, "weights": str(weights), "task": stream.task,
             "input_shape": [stream.features], "name": f"{stream.name}-mlp",
             "num_classes": stream.classes}
    model["reference_data"] = str(reference)
    overrides = {"model": model, "adapter": {"name": "none"},
                 "batcher": {"max_wait_ms": 0}, "log_level": "warning"}
    return load_settings(None, **overrides, **config.settings(stream.task))


@dataclass
class ServedRun:
    """What serving a stream prequentially gave: a prediction per sample, and the read-outs."""

    predictions: np.ndarray
    unjoined: int  # labels the service did not join
    events: list[dict]  # every event of GET /v1/events, oldest first
    state: dict  # GET /v1/state at the end
    metrics: dict[str, float]  # /metrics at the end
    seconds: float  # the stream alone: requests and labels, not the start or the read-outs


def label_batches(samples: int, request: int, due: np.ndarray) -> list[np.ndarray]:
    """The samples whose labels go back after each request of `request` samples: label i once
    the samples served pass due[i] (i + its delay; inf: never), in the order of i within a
    request. With due = i + delay, the label of sample i goes back once i + delay is served.

    >>> [batch.tolist() for batch in label_batches(5, 2, np.arange(5) + 1.0)]
    [[0], [1, 2], [3]]
    >>> [batch.tolist() for batch in label_batches(6, 2, np.array([0, np.inf, 5, 3, 4, 5]))]
    [[0], [3], [2, 4, 5]]
    """
    ends = np.minimum(np.arange(1, -(-samples // request) + 1) * request, samples)
    due = np.maximum(due, np.arange(samples))  # never before its sample is served
    after = np.searchsorted(ends, due, side="right")  # the first request whose end passes due
    order = np.argsort(after, kind="stable")
    counts = np.bincount(after, minlength=len(ends) + 1)[:len(ends)]
    return np.split(order[:counts.sum()], np.cumsum(counts)[:-1])


async def serve_prequential(settings, x: np.ndarray, y: np.ndarray, delay: int, request: int,
                            due: np.ndarray | None = None) -> ServedRun:
    """Predictions for every sample, in order, `request` samples per request, with the label of
    sample i returned once sample i + `delay` has been predicted (or once due[i] has: see
    `label_batches`), by a fresh app in process."""
    import httpx

    from service.app import create_app

    app = create_app(settings)
    predictions = np.zeros(len(x), dtype=np.float64)
    unjoined = 0
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://adaptd",
                                     timeout=60) as client:
            batches = label_batches(len(x), request,
                                    np.arange(len(x)) + float(delay) if due is None else due)
            started = time.perf_counter()
            for start, batch in zip(range(0, len(x), request), batches, strict=True):
                end = min(start + request, len(x))
                ids = [f"s{i}" for i in range(start, end)]
                reply = await client.post("/v1/predict",
                                          json={"inputs": x[start:end].tolist(), "ids": ids})
                reply.raise_for_status()
                predictions[start:end] = [p["prediction"] for p in reply.json()["predictions"]]
                if len(batch):
                    labels = [{"id": f"s{i}", "label": float(y[i])} for i in batch.tolist()]
                    reply = await client.post("/v1/feedback", json={"labels": labels})
                    reply.raise_for_status()
                    unjoined += len(labels) - reply.json()["joined"]
            seconds = time.perf_counter() - started
            events = await _events(client)
            state = (await client.get("/v1/state")).json()
            exposition = (await client.get("/metrics")).text
    return ServedRun(predictions, unjoined, events, state, _metric_values(exposition), seconds)


async def _events(client) -> list[dict]:
    """Every event, oldest first (the log pages back, newest first)."""
    events: list[dict] = []
    before = None
    while True:
        params = {"limit": 1000} | ({} if before is None else {"before": before})
        page = (await client.get("/v1/events", params=params)).json()["events"]
        events.extend(page)
        if len(page) < 1000:
            break
        before = page[-1]["seq"]
    return list(reversed(events))


def _metric_values(exposition: str) -> dict[str, float]:
    """Prometheus samples by name and labels, e.g. ``adaptd_memory_size{memory="error_memory"}``."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def _alarm_position(event: dict) -> int:
    """The served-sample count when the alarm was raised (the policy's clock, `at`), else the
    detector's own count."""
    detail = event["detail"]
    return int(detail.get("at", detail.get("sample", -1)))


@dataclass
class Served:
    """A stream ready to serve: its samples, and its trained model and reference data on disk."""

    stream: Stream
    x: np.ndarray
    y: np.ndarray
    drift_at: int
    weights: Path
    reference: Path


@contextmanager
def trained(stream: Stream, train: int = TRAIN, before: int = BEFORE, after: int = AFTER,
            epochs: int = 10, seed: int = SEED) -> Iterator[Served]:
    """The stream's samples and its model, trained on the first concept and saved (with the
    first 2,000 training samples as reference data) in a folder that lives as long as this."""
    (x_train, y_train), (x, y) = stream_data(stream, train, before, after)
    model = train_mlp(stream.model, x_train, y_train, stream.task, epochs=epochs, seed=seed)
    with saved_model(model, x_train, y_train) as (weights, reference):
        yield Served(stream, x, y, before, weights, reference)


@contextmanager
def saved_model(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray
                ) -> Iterator[tuple[Path, Path]]:
    """(weights, reference data): the model as safetensors, and its first 2,000 training samples
    with their labels, in a folder that lives as long as this."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="adaptd-bench-") as folder:
        weights, reference = Path(folder) / "model.safetensors", Path(folder) / "ref.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        save_file({"inputs": torch.from_numpy(x_train[:2000]),
                   "labels": torch.from_numpy(y_train[:2000])}, str(reference))
        yield weights, reference


def run_config(served: Served, config: Config, delay: int = DELAY,
               request: int = REQUEST) -> Result:
    """Serve the stream with `config` (a fresh app) and score the prequential run."""
    stream, x, y, before = served.stream, served.x, served.y, served.drift_at
    settings = _settings(stream, config, served.weights, served.reference)
    started = time.perf_counter()
    run = asyncio.run(serve_prequential(settings, x, y, delay, request))
    seconds = time.perf_counter() - started
    predictions, state, metrics = run.predictions, run.state, run.metrics
    alarms = [e for e in run.events if e["kind"] == "drift_alarm"]

    if stream.task == "classification":
        scores = (predictions == y).astype(np.float64)  # correct, per sample
    else:
        scores = np.abs(predictions - y)  # absolute error, per sample
    edge = min(EDGE, before, len(x) - before)
    level = float(scores[before - min(LEVEL, before):before].mean())
    recovery = None
    if stream.task == "classification":
        recovery = recovery_samples(scores, before, level)
    # the service's rolling error covers the last `rolling_window` joined labels
    joined_end = len(x) - delay
    window = state["quality"]["window"]
    errors = 1.0 - scores if stream.task == "classification" else scores
    bench_rolling = float(errors[max(0, joined_end - window):joined_end].mean())
    return Result(
        stream=stream.name, config=config.name, task=stream.task, samples=len(x),
        drift_at=before, delay=delay, overall=float(scores.mean()),
        before=float(scores[before - edge:before].mean()),
        after=float(scores[before:before + edge].mean()), post=float(scores[before:].mean()),
        end=float(scores[-edge:].mean()),
        level=level, recovery=recovery,
        alarms=[(_alarm_position(e), e["source"]) for e in alarms], unjoined_labels=run.unjoined,
        memory_rows=int(sum(v for k, v in metrics.items() if k.startswith("adaptd_memory_size{"))),
        service_rolling=state["quality"]["rolling_error"], bench_rolling=bench_rolling,
        seconds=seconds, settings=config.settings(stream.task),
    )


def run_stream(stream: Stream, config: Config, train: int = TRAIN, before: int = BEFORE,
               after: int = AFTER, delay: int = DELAY, request: int = REQUEST, epochs: int = 10,
               seed: int = SEED) -> Result:
    """Train the stream's model, serve it with `config`, and score the prequential run."""
    with trained(stream, train, before, after, epochs, seed) as served:
        return run_config(served, config, delay, request)


# --- the report ---------------------------------------------------------------------------------

def _recovery_cell(result: Result) -> str:
    if result.recovery is None:
        return "never"
    return f"{result.recovery:,}" + ("" if result.held else " (not held)")


def classification_table(results: list[Result], with_drift: bool) -> str:
    header = ["stream", "config", "accuracy %", "1k before", "1k after", "1k at end",
              "all after", "pre-drift level", "recovery (samples)", "vs static"]
    if with_drift:
        header += ["detection delay (first alarm by)", "false alarms / 10k"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    static = {r.stream: r for r in results if r.config == "static"}
    for r in results:
        base = static.get(r.stream)
        if r.config == "static" or base is None:
            speedup = "—"
        elif r.recovery is None:
            speedup = "not recovered"
        elif not r.held:
            speedup = "not held"
        elif base.recovery is None:
            speedup = "static never"
        else:
            speedup = f"{base.recovery / r.recovery:.1f}x faster"
        cells = [r.stream, r.config, f"{100 * r.overall:.1f}", f"{100 * r.before:.1f}",
                 f"{100 * r.after:.1f}", f"{100 * r.end:.1f}", f"{100 * r.post:.1f}",
                 f"{100 * r.level:.1f}",
                 _recovery_cell(r), speedup]
        if with_drift:
            cells += _drift_cells(r)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regression_table(results: list[Result], with_drift: bool) -> str:
    header = ["stream", "config", "MAE", "1k before", "1k after", "1k at end", "all after",
              "all after vs static"]
    if with_drift:
        header += ["detection delay (first alarm by)", "false alarms / 10k"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    static = {r.stream: r for r in results if r.config == "static"}
    for r in results:
        base = static.get(r.stream)
        drop = "—"
        if r.config != "static" and base is not None:
            change = (r.post - base.post) / base.post
            drop = f"{100 * abs(change):.1f}% {'lower' if change <= 0 else 'higher'}"
        cells = [r.stream, r.config, f"{r.overall:.3f}", f"{r.before:.3f}", f"{r.after:.3f}",
                 f"{r.end:.3f}", f"{r.post:.3f}", drop]
        if with_drift:
            cells += _drift_cells(r)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _drift_cells(result: Result) -> list[str]:
    if not CONFIGS[result.config].drift_policy:
        return ["—", "—"]
    delay = result.detection_delay
    detected = "missed" if delay is None else f"{delay:,} ({result.first_detector})"
    return [detected, f"{result.false_alarms_per_10k:.1f}"]


def report(results: list[Result]) -> str:
    with_drift = any(CONFIGS[r.config].drift_policy for r in results)
    parts = []
    classification = [r for r in results if r.task == "classification"]
    regression = [r for r in results if r.task == "regression"]
    if classification:
        parts.append(classification_table(classification, with_drift))
    if regression:
        parts.append(regression_table(regression, with_drift))
    notes = [f"{r.stream}/{r.config}: {r.unjoined_labels} labels not joined"
             for r in results if r.unjoined_labels]
    notes += [f"{r.stream}/{r.config}: the service's rolling error {r.service_rolling:.4f} != "
              f"{r.bench_rolling:.4f} computed here" for r in results
              if r.service_rolling is not None and r.bench_rolling is not None
              and abs(r.service_rolling - r.bench_rolling) > 1e-4]
    notes += [f"{r.stream}/{r.config}: no memory rows at the end: is the error memory wired?"
              for r in results if "error_memory" in r.settings and r.memory_rows == 0]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default=",".join(STREAMS))
    parser.add_argument("--configs", help="default: every configuration this checkout supports")
    parser.add_argument("--delay", type=int, default=DELAY, help="label delay, in samples")
    parser.add_argument("--request", type=int, default=REQUEST, help="samples per request")
    parser.add_argument("--before", type=int, default=BEFORE)
    parser.add_argument("--after", type=int, default=AFTER)
    parser.add_argument("--train", type=int, default=TRAIN)
    parser.add_argument("--quick", action="store_true", help="3,000 + 3,000 samples, 4,000 to "
                        "train on")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if args.quick:
        args.before, args.after, args.train = 3_000, 3_000, 4_000
    torch.set_num_threads(1)  # tiny models; the machine is shared

    if args.configs:
        configs = [CONFIGS[name] for name in args.configs.split(",")]
        for config in configs:
            if (why := missing_settings(config)) is not None:
                parser.error(f"configuration {config.name} needs settings this checkout lacks: "
                             f"{why}")
    else:
        configs, skipped = [], []
        for config in CONFIGS.values():
            why = missing_settings(config)
            (configs if why is None else skipped).append(config if why is None else
                                                         f"{config.name} ({why})")
        for note in skipped:
            print(f"skipped: {note}", file=sys.stderr)

    started = time.perf_counter()
    results = []
    for name in args.streams.split(","):
        stream = STREAMS[name]
        with trained(stream, args.train, args.before, args.after) as served:
            for config in configs:
                if stream.task not in config.tasks:
                    continue
                result = run_config(served, config, args.delay, args.request)
                results.append(result)
                print(f"{name:13} {config.name:16} overall {result.overall:.4f} before "
                      f"{result.before:.4f} after {result.after:.4f} recovery "
                      f"{_recovery_cell(result)}, {len(result.alarms)} alarms "
                      f"({result.seconds:.1f} s)", flush=True)
    wall = time.perf_counter() - started

    command = "python -m bench.drift_streams " + " ".join(sys.argv[1:])
    machine = platform.processor() or platform.machine()
    print(f"\nB2 drift streams: {args.before:,} + {args.after:,} samples, drift at "
          f"{args.before:,}, label delay {args.delay}, {args.request} samples per request, model "
          f"trained on {args.train:,}; memory {MEMORY}; correction {CORRECTION}; drift policy "
          f"{DRIFT}; supervised {SUPERVISED}; {machine}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}, wall {wall:.0f} s\n`{command.strip()}`\n")
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(
            [asdict(r) | {"held": r.held, "detection_delay": r.detection_delay,
                          "first_detector": r.first_detector,
                          "false_alarms_per_10k": r.false_alarms_per_10k} for r in results],
            indent=1))


if __name__ == "__main__":
    main()
