"""B6, real streams: River's bundled datasets and B2's drift streams, through the service and River.

A small torch MLP with BatchNorm is trained on the first slice of each stream; the rest goes
through the real app in process, prequentially, with labels back at once or 100 samples late.
Beside it, on the same rows in the same order with the same delayed labels, River's Hoeffding
tree, Hoeffding adaptive tree and adaptive random forest (classifiers or regressors), and the
no-change baseline.

Streams:

- real, River's datasets that ship inside the package and load offline:

      phishing        1,250 web pages, 9 features, phishing or not
      bananas         5,300 points, 2 features, 2 classes (the banana-shaped clusters)
      image-segments  2,310 outdoor image regions, 18 features, 7 classes
      shuttle         Statlog shuttle, 9 features, 2 classes (River's binary form); 49,097 rows,
                      the first `max_rows` used
      trump-approval  1,001 days, 6 features (the date and five pollsters), approval rating
      sp500           1,257 days, the returns of 10 stocks, the S&P 500's return
      water-flow      1,268 hours, the flow through a pipe; the only feature is the time, given
                      here as the hour of day and the weekday, each as (cos, sin)

  Left out: `AirlinePassengers` (144 rows: 29 to train on), `ChickWeights` (its rows run chick
  by chick, and the chick's number is an identifier, not a quantity), `SolarFlare` and `Yeast`
  (several targets per row: River's three learners are single-target), and every dataset River
  downloads (`Elec2`, `Higgs`, `CreditCard`, `Insects`, `MaliciousURL`, ...: the benchmark
  runs offline).
- synthetic: B2's streams (`bench/drift_streams.py`: SEA, Sine, Hyperplane, RandomRBF,
  Agrawal; FriedmanDrift `gra` and `lea` for regression), one abrupt drift in the middle, the
  model trained on the first concept.

The model is `TabularMLP`: two hidden layers of 64 units, each Linear followed by BatchNorm and
ReLU, with the standardisation of the inputs (and of a regression target) computed on the
training slice and kept inside the module as buffers, so what is served takes raw features, as
docs/configuration.md advises. It is trained by B2's `train_mlp` (Adam, batches of 64, about
1,500 steps, at most 200 epochs: 800 steps on the smallest training slices). A real stream's
first `train_share` (20%) of its rows train it; the rest is the stream. B2's streams train on
the first `--synthetic` count of samples of the first concept. The first 2,000 training rows
are the service's reference data.

Protocol (B2's): `request` (16) samples per ``POST /v1/predict``; the label of sample i goes back
through ``POST /v1/feedback`` once sample i + `delay` has been predicted, so with delay 0 a label
is back before the next request. River's learners get exactly the same schedule: they learn the
training slice first (as the MLP did), then for each block of `request` rows predict every row,
then learn the labels that are due. The no-change baseline predicts the newest label available
when the request is made (the last training label until then). `--label-fraction F` sends back
the labels of a share F of the samples only (drawn with the bench's seed), and `--delay-spread
exponential` draws each label's delay from an exponential distribution whose mean is the
`--delays` value, so labels also come back out of order; the service, River and the baseline
get the same labels at the same points. River sees the features
standardised with the training slice's statistics, the MLP's own (trees do not care; the linear
models in a regression tree's leaves do).

Scores are prequential over the whole stream and over its last half; each learner is also scored
from the first sample served once a label was back (`after_first_label` in `--json`; with
`--from-first-label` the leads table compares those): before it the service can only serve the
model as trained, with at most the reference data's last label beside it, while River's learners
and the no-change baseline each commit to their own guess from the first sample, so this score
leaves out the wait for the first label (16 samples with labels at once, 112 with labels 100
late) and keeps everything after it.

Configurations (service settings; each sets only what its name says and leaves everything else
at the service's defaults, which are printed with the tables, except the online mixture: on by
default for these tabular models since stop 28, it is off in every column but `defaults`,
`defaults-nodrift` and those that set it; conformal calibration is off in every one, as in B2:
it changes no prediction):

    source              adapter none, error memory off, supervised step off, mixture off,
                        drift off: the trained model as it is
    defaults            nothing set (since stop 28, for these tabular models: the model in an
                        online mixture with River's adaptive Hoeffding tree, and since stop 33
                        its Hoeffding tree too, `mixture.learner`)
    defaults-nodrift    drift monitoring off
    bn                  adapter `bn` (test-time BatchNorm statistics)
    memory              the error memory, exact (`error_memory.kind = "exact"`, other knobs at
                        their defaults)
    supervised          the supervised step on labels at its defaults
    bn+mem+sup          all three of the above
    bn+mem+sup-nodrift  the same, drift monitoring off
    lowrank16           the supervised step as docs/configuration.md advises after abrupt
                        changes (B2's: low-rank adapters of rank 16 beside all three Linear
                        layers, learning rate 0.01, a step per 32 labels)
    tent, eata          classification only; eata with `d_margin = 1.0` on two-class streams, as
                        docs/adaptation.md advises for few classes

Reported, per stream, delay and learner: prequential accuracy (or MAE) over the whole stream and
over its last half, and milliseconds per sample (the stream's wall time over its samples: for the
service the requests and labels, HTTP in process included; for River predict_one and learn_one).
For the service also: label-free drift alarms (`drift_alarm` events whose detector watches a
label-free signal) per 10,000 samples, over the whole stream for a real one (no drift is known
there) and before the drift for B2's (false alarms proper); labelled alarms; and how often the
guards reset what learned (`collapse` and `shadow` events).

    python -m bench.real_streams                                   # everything; ~45 min
    python -m bench.real_streams --quick                           # a look, ~6 min
    python -m bench.real_streams --streams phishing,sea --configs source,bn --learners HT \\
        --delays 0 100 --json b6.json
    python -m bench.real_streams --report real.json b2.json        # the tables of saved runs
    python -m bench.real_streams --runs 400 ...                    # classes in runs (below)
    python -m bench.real_streams --label-fraction 0.1 --delays 100 --delay-spread exponential

`--runs BLOCK` serves each stream with its classes in runs: the served rows cut into
len // BLOCK equal blocks (BLOCK to 2 × BLOCK − 1 rows each), each sorted by label (a
regressor's by value, so its target climbs through each block), the traffic where a candidate
that learns each run from late labels looks best just as the run ends; the stream's own drift
stays where it was, give or take a block. The streams are named NAME-runs.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from bench.drift_streams import (
    HIDDEN,
    StreamMLP,
    label_batches,
    saved_model,
    serve_prequential,
    stream_data,
    train_mlp,
)
from bench.drift_streams import STREAMS as DRIFT_STREAMS
from bench.drift_streams import SUPERVISED as LOWRANK_16

SUPERVISED_ALL = {"train": "all", "replay": 2000, "replay_steps": 10, "reference_batch": 256}

SEED = 2024
TRAIN_SHARE = 0.2  # of a real stream's rows, to train on
MAX_ROWS = 6_000  # rows read from a real dataset (Shuttle has 49,097)
SYNTHETIC = {"train": 2_000, "before": 2_000, "after": 2_000}  # B2's streams, shortened
REQUEST = 16
DELAYS = (0, 100)
TRAIN_STEPS = 1_500  # Adam steps on the training slice, about; between 10 and 200 epochs
LABEL_FREE_SIGNALS = ("entropy", "confidence", "feature_mean")


# --- the model ----------------------------------------------------------------------------------

class TabularMLP(StreamMLP):
    """B2's MLP with BatchNorm after each hidden Linear: Linear-BN-ReLU, Linear-BN-ReLU, Linear.

    The standardisation buffers and `body` are B2's, so `train_mlp` trains it as it is. Built by
    name for the service (a factory takes no arguments): ``bench.real_streams:tabular_mlp_9x2``
    is a model of 9 inputs and 2 outputs.

    >>> from service.model import import_factory
    >>> import_factory(factory_name(9, 2))()(torch.zeros(3, 9)).shape
    torch.Size([3, 2])
    """

    def __init__(self, inputs: int, outputs: int, hidden: int = HIDDEN) -> None:
        super().__init__(inputs, outputs, hidden)
        self.body = nn.Sequential(
            nn.Linear(inputs, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, outputs),
        )


_FACTORY = re.compile(r"tabular_mlp_(\d+)x(\d+)")


def __getattr__(name: str) -> Callable[[], TabularMLP]:
    # `tabular_mlp_<inputs>x<outputs>`: one factory per shape, without writing each out
    if (match := _FACTORY.fullmatch(name)) is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return partial(TabularMLP, int(match[1]), int(match[2]))


def factory_name(inputs: int, outputs: int) -> str:
    # by import path, not `__name__`, which is "__main__" under `python -m`
    return f"bench.real_streams:tabular_mlp_{inputs}x{outputs}"


# --- the streams --------------------------------------------------------------------------------

def _water_flow_features(x: dict) -> list[float]:
    # the hour of day and the weekday on circles; no running time, which a network trained on
    # the first fifth would only extrapolate (a first run with hours since the first row: MAE
    # 105 against the no-change baseline's 1.8)
    moment = x["Time"]
    hour, weekday = moment.hour + moment.minute / 60, moment.weekday()
    return [math.cos(2 * math.pi * hour / 24), math.sin(2 * math.pi * hour / 24),
            math.cos(2 * math.pi * weekday / 7), math.sin(2 * math.pi * weekday / 7)]


@dataclass(frozen=True)
class RealStream:
    """One of River's bundled datasets, by class name, and how its rows become numbers."""

    name: str
    dataset: str  # the class in `river.datasets`
    task: str
    features: Callable[[dict], list[float]] | None = None  # default: the values, in order

    def rows(self, limit: int) -> Iterator[tuple[list[float], Any]]:
        from river import datasets

        for x, y in itertools.islice(getattr(datasets, self.dataset)(), limit):
            yield (list(map(float, x.values())) if self.features is None
                   else self.features(x)), y


REAL_STREAMS: dict[str, RealStream] = {s.name: s for s in [
    RealStream("phishing", "Phishing", "classification"),
    RealStream("bananas", "Bananas", "classification"),
    RealStream("image-segments", "ImageSegments", "classification"),
    RealStream("shuttle", "Shuttle", "classification"),
    RealStream("trump-approval", "TrumpApproval", "regression"),
    RealStream("sp500", "SP500Stocks", "regression"),
    RealStream("water-flow", "WaterFlow", "regression", _water_flow_features),
]}
STREAM_NAMES = [*REAL_STREAMS, *DRIFT_STREAMS]


@dataclass
class StreamData:
    """A stream split into what trains the model and what is served."""

    name: str
    task: str
    x_train: np.ndarray  # float32
    y_train: np.ndarray  # class indices (int64) or targets (float64)
    x: np.ndarray
    y: np.ndarray
    classes: int | None
    drift_at: int | None = None  # B2's streams: where the second concept starts

    @property
    def outputs(self) -> int:
        return self.classes or 1


def load_stream(name: str, max_rows: int = MAX_ROWS, train_share: float = TRAIN_SHARE,
                synthetic: dict[str, int] = SYNTHETIC) -> StreamData:
    """The named stream: a real one cut at `max_rows`, its first `train_share` to train on, or
    one of B2's with `synthetic`'s train, before and after counts."""
    if name in DRIFT_STREAMS:
        stream = DRIFT_STREAMS[name]
        (x_train, y_train), (x, y) = stream_data(stream, **synthetic)
        return StreamData(name, stream.task, x_train, y_train, x, y, stream.classes,
                          drift_at=synthetic["before"])
    real = REAL_STREAMS[name]
    rows = list(real.rows(max_rows))
    inputs = np.asarray([features for features, _ in rows], dtype=np.float32)
    targets = [target for _, target in rows]
    classes = None
    if real.task == "classification":
        names, labels = np.unique(np.asarray([str(t) for t in targets]), return_inverse=True)
        values, classes = labels.astype(np.int64), len(names)
    else:
        values = np.asarray(targets, dtype=np.float64)
    train = round(train_share * len(rows))
    return StreamData(name, real.task, inputs[:train], values[:train], inputs[train:],
                      values[train:], classes)


def in_runs(data: StreamData, block: int) -> StreamData:
    """The served rows in runs: each of len // block equal blocks sorted by label (a regressor's
    by value), so that each class comes in one run of about `block` × its share a block, and the
    stream's own drift stays where it was, give or take a block."""
    if block < 1:
        raise ValueError(f"a block holds at least one row, got {block}")
    # len // block blocks of block to 2·block − 1 rows each
    blocks = np.array_split(np.arange(len(data.y)), max(1, len(data.y) // block))
    order = np.concatenate([b[np.argsort(data.y[b], kind="stable")] for b in blocks])
    return replace(data, name=f"{data.name}-runs", x=data.x[order], y=data.y[order])


def train_model(data: StreamData, seed: int = SEED) -> TabularMLP:
    batches = math.ceil(len(data.x_train) / 64)
    epochs = min(200, max(10, round(TRAIN_STEPS / batches)))
    return train_mlp(partial(TabularMLP, data.x.shape[1], data.outputs), data.x_train,
                     data.y_train, data.task, epochs=epochs, seed=seed)


# --- configurations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """A column of the tables: the settings sections the service runs the stream's model with."""

    name: str
    sections: dict[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] = ("classification", "regression")
    two_class_options: dict[str, Any] = field(default_factory=dict)  # adapter options for two
    # the service's own mixture (on, with River's learners, for these tabular models since stop
    # 27): kept by the `defaults` columns; every other column measures its parts without it,
    # as before, unless it sets the mixture itself
    default_mixture: bool = False

    def settings(self, data: StreamData) -> dict[str, Any]:
        sections = copy.deepcopy(self.sections)
        if self.two_class_options and data.classes == 2:
            sections["adapter"]["options"] = dict(self.two_class_options)
        if not self.default_mixture:
            sections.setdefault("mixture", {"enabled": False})
        return sections | {"conformal": {"method": "off"}}


_BN_MEM_SUP = {"adapter": {"name": "bn"}, "error_memory": {"kind": "exact"},
               "supervised": {"enabled": True}}
_OFF = {"drift": {"enabled": False}}
_RESET_POLICY = {"label_free_actions": ["boost_lr", "reset_adapter"]}
CONFIGS: dict[str, Config] = {c.name: c for c in [
    Config("source", {"adapter": {"name": "none"}, "error_memory": {"kind": "off"},
                      "supervised": {"enabled": False}, "output_corrector": {"enabled": False},
                      "mixture": {"enabled": False}, **_OFF}),
    Config("defaults", default_mixture=True),
    Config("defaults-nodrift", _OFF, default_mixture=True),
    # the defaults with River's Hoeffding tree as the mixture's one learner (until stop 33 the
    # default was the adaptive tree alone: `mix+hat`)
    Config("defaults+ht", {"mixture": {"learner": "ht"}}, default_mixture=True),
    # the defaults with the newest label a candidate for a classifier too, served by every
    # rate as it weighs it (a regressor's default); and without it (a classifier's default
    # until stop 34, which put it on probation: served by the fast rate no more than the slow
    # rate weighs it)
    Config("defaults+newest", {"mixture": {"newest_label": "on"}}, default_mixture=True),
    Config("defaults-newest", {"mixture": {"newest_label": "off"}}, default_mixture=True),
    # bn as `auto` picks it for a convolutional model: graded statistics and the class-run
    # filter for a classifier (for these MLPs `auto`, the default, is none)
    Config("bn", {"adapter": {"name": "bn"}}),
    # bn as it was until stop 22: every layer at one momentum, no filter
    Config("bn-plain", {"adapter": {"name": "bn", "norm_layers": "same", "runs": "off"}}),
    Config("bn-balanced", {"adapter": {"name": "bn", "norm": "balanced"}}),
    # the class-run filter over the source's answers
    Config("runs", {"adapter": {"name": "none", "runs": "filter"}}, tasks=("classification",)),
    Config("memory", {"error_memory": {"kind": "exact"}}),
    Config("supervised", {"supervised": {"enabled": True}}),
    Config("bn+mem+sup", _BN_MEM_SUP),
    Config("bn+mem+sup-nodrift", _BN_MEM_SUP | _OFF),
    # its stages as candidates of the online mixture: the source, bn with the supervised step,
    # and the error memory's compensation of it
    Config("bn+mem+sup+mix", _BN_MEM_SUP | {"mixture": {"enabled": True, "learner": "off"}}),
    # the mixture's middle candidate alone: bn with the supervised step
    Config("bn+sup", {"adapter": {"name": "bn"}, "supervised": {"enabled": True}}),
    Config("mem+sup", {"error_memory": {"kind": "exact"}, "supervised": {"enabled": True}}),
    # the source and the error memory's compensation of the supervised model, mixed
    Config("mem+sup+mix", {"error_memory": {"kind": "exact"}, "supervised": {"enabled": True},
                           "mixture": {"enabled": True, "learner": "off"}}),
    # the mixture of the model as served and the label that arrived last (a classifier's on
    # probation since stop 34: these `mix` columns measured before it had none)
    Config("mix", {"mixture": {"enabled": True, "learner": "off"}}),
    # the same with River's online learner as one more candidate (on the model's inputs)
    Config("mix+hat", {"mixture": {"enabled": True, "learner": "hat"}}),
    Config("mix+arf", {"mixture": {"enabled": True, "learner": "arf"}}),
    # the defaults' two trees and ARF, each a candidate
    Config("defaults+arf", {"mixture": {"learner": ["hat", "ht", "arf"]}}, default_mixture=True),
    Config("lowrank16", {"supervised": {"enabled": True, **LOWRANK_16}}),
    # the supervised recipe B1 measured for an image model with few labels: every parameter,
    # the last 2,000 labels rehearsed 10 steps a batch, 256 reference samples in every step
    Config("sup-all", {"supervised": {"enabled": True, **SUPERVISED_ALL}}),
    # the same under the service's mixture (the source, River's learner, the newest label)
    Config("defaults+sup-all", {"supervised": {"enabled": True, **SUPERVISED_ALL}},
           default_mixture=True),
    Config("defaults+sup-all-nodrift", {"supervised": {"enabled": True, **SUPERVISED_ALL}}
           | _OFF, default_mixture=True),
    # the same with drift monitored but no action taken (what monitoring alone changes), and
    # with only the label-free alarms acting: which alarms' actions move the score
    Config("defaults+sup-all-noact", {"supervised": {"enabled": True, **SUPERVISED_ALL},
                                      "drift": {"policy": {"label_free_actions": [],
                                                           "labelled_actions": []}}},
           default_mixture=True),
    Config("defaults+sup-all-lfonly", {"supervised": {"enabled": True, **SUPERVISED_ALL},
                                       "drift": {"policy": {"labelled_actions": []}}},
           default_mixture=True),
    # the recipe as docs/adaptation.md gives it since stop 39: a labelled alarm only trims the
    # memories (with none here, only label-free alarms act); its boost on eleven steps of every
    # parameter a batch served worse than no action on 14 of the 56 runs, better on 3
    Config("defaults+sup-all-trim", {"supervised": {"enabled": True, **SUPERVISED_ALL},
                                     "drift": {"policy": {"labelled_actions": ["trim_memory"]}}},
           default_mixture=True),
    # the same with label-free alarms acting only once a labelled alarm confirms them
    Config("defaults+sup-all-confirm", {"supervised": {"enabled": True, **SUPERVISED_ALL},
                                        "drift": {"policy": {"confirmation": "labelled"}}},
           default_mixture=True),
    # the same with the served weights the moving average of the trained ones (decay 0.9 a
    # step, `supervised.average`)
    Config("defaults+sup-all-avg", {"supervised": {"enabled": True, **SUPERVISED_ALL,
                                                   "average": 0.9}}, default_mixture=True),
    # the supervised recipe without the mixture, under a drift policy that also resets what
    # learnt at every label-free alarm (a setting a user may choose; the defaults do not), with
    # the policy's judge (its default) and without it: whether the judge finds the reset hurting
    Config("sup-all+reset", {"supervised": {"enabled": True, **SUPERVISED_ALL},
                             "drift": {"policy": _RESET_POLICY}}),
    Config("sup-all+reset-nojudge", {
        "supervised": {"enabled": True, **SUPERVISED_ALL},
        "drift": {"policy": _RESET_POLICY | {"judge": {"holdout": 0}}}}),
    Config("mix+arf+sup-all", {"supervised": {"enabled": True, **SUPERVISED_ALL},
                               "mixture": {"enabled": True, "learner": "arf"}}),
    Config("tent", {"adapter": {"name": "tent"}}, tasks=("classification",)),
    # with two classes every softmax is within a cosine of 0.71 of the running mean, so EATA's
    # redundancy filter at 0.4 selects nothing (docs/adaptation.md)
    Config("eata", {"adapter": {"name": "eata"}}, tasks=("classification",),
           two_class_options={"d_margin": 1.0}),
]}
# the pairs whose only difference is drift monitoring: (on at the default, off)
DRIFT_PAIRS = [("defaults", "defaults-nodrift"), ("bn+mem+sup", "bn+mem+sup-nodrift"),
               ("defaults+sup-all", "defaults+sup-all-nodrift"),
               ("defaults+sup-all-trim", "defaults+sup-all-nodrift")]


def service_defaults() -> dict[str, Any]:
    """What the service runs when a configuration leaves a part alone (printed with the tables)."""
    from adapters.tta.norm import normalises_over_positions
    from service.settings import load_settings

    s = load_settings(None)
    adapter = s.adapter.name
    if adapter == "auto":  # what it picks for these MLPs (BatchNorm1d over features)
        adapter = "auto: " + ("bn" if normalises_over_positions(TabularMLP(2, 2), (2,))
                              else "none")
    return {"adapter": adapter, "norm": s.adapter.norm,
            "error_memory": s.error_memory.kind, "supervised": s.supervised.enabled,
            "supervised.train": s.supervised.train, "output_corrector": s.output_corrector.enabled,
            "drift": s.drift.enabled, "shadow": s.shadow.enabled,
            # auto: on, with River's two Hoeffding trees, for these tabular models
            "mixture": s.mixture.enabled, "mixture.learner": s.mixture.learner}


# --- runs ---------------------------------------------------------------------------------------

@dataclass
class Result:
    """One learner on one stream at one label delay."""

    stream: str
    learner: str  # a configuration's name, a River learner's, or "no-change"
    kind: str  # adaptd, river or baseline
    task: str
    delay: int
    samples: int
    score: float  # accuracy, or MAE
    last_half: float  # the same over the stream's second half
    ms_per_sample: float
    # the same over the samples served once a label was back (`first_taught`); None where no
    # label came back before the stream's last request, and in results saved before stop 42
    after_first_label: float | None = None
    # the service only
    label_free_alarms: int = 0
    label_free_per_10k: float | None = None  # before the drift on B2's streams; else all
    labelled_alarms: int = 0
    collapse_resets: int = 0
    shadow_resets: int = 0
    unjoined_labels: int = 0
    warnings: list[str] = field(default_factory=list)
    # the drift policy's actions taken and held back, and its judge's verdicts at the end
    drift_actions: int = 0
    held_actions: int = 0
    verdicts: dict[str, str] = field(default_factory=dict)


def _scores(predictions: np.ndarray, y: np.ndarray, task: str, taught: int = 0
            ) -> tuple[float, float, float | None]:
    """(over the stream, over its last half, from sample `taught` on, None where that leaves no
    sample): accuracy, or mean absolute error."""
    per_sample = ((predictions == y).astype(np.float64) if task == "classification"
                  else np.abs(predictions - y))
    after = per_sample[taught:]
    return (float(per_sample.mean()), float(per_sample[len(per_sample) // 2:].mean()),
            float(after.mean()) if len(after) else None)


def first_taught(samples: int, delay: int, request: int = REQUEST,
                 labels: Labels | None = None) -> int:
    """The first sample served once a label was back: the start of the request after the first
    that sent labels back (`samples` where none comes back). Every learner here gets its labels
    on the same schedule, so each is scored from the same sample.

    >>> first_taught(100, 0, request=16), first_taught(1000, 100, request=16)
    (16, 112)
    >>> first_taught(50, 100, request=16)
    50
    """
    due = (labels or EVERY_LABEL).due(samples, delay)
    batches = label_batches(samples, request, due)
    back = [i for i, batch in enumerate(batches) if len(batch)]
    return min(samples, (back[0] + 1) * request) if back else samples


@dataclass(frozen=True)
class Labels:
    """Which labels come back and when: a share `fraction` of the samples (drawn with the
    bench's seed) get theirs back, each `delay` samples after it was served, or, with `spread`
    "exponential", after a delay drawn from an exponential distribution of mean `delay`
    (rounded to whole samples); the same draws for the service, River and the baseline."""

    fraction: float = 1.0
    spread: str = "fixed"

    def due(self, samples: int, delay: int) -> np.ndarray:
        """due[i]: once this many samples are served, the label of sample i goes back (inf:
        never).

        >>> Labels().due(3, 2).tolist()
        [2.0, 3.0, 4.0]
        >>> Labels(fraction=0.5, spread="exponential").due(4, 10).tolist()
        [inf, 2.0, 4.0, 16.0]
        """
        rng = np.random.default_rng(SEED)
        delays = (rng.exponential(delay, samples).round() if self.spread == "exponential"
                  else np.full(samples, float(delay)))
        due = np.arange(samples) + delays
        if self.fraction < 1:
            due[rng.random(samples) >= self.fraction] = np.inf
        return due

    def describe(self) -> str:
        if self.fraction == 1 and self.spread == "fixed":
            return "every label back, each after the delay"
        return (f"labels back for {self.fraction:.0%} of the samples, each after "
                + ("a delay drawn from an exponential distribution of that mean"
                   if self.spread == "exponential" else "the delay"))


EVERY_LABEL = Labels()


def _alarm_position(event: dict) -> int:
    # the policy's served-sample clock, else the detector's own count
    return int(event["detail"].get("at", event["detail"].get("sample", -1)))


def run_service(data: StreamData, config: Config, weights: Path, reference: Path, delay: int,
                request: int = REQUEST, labels: Labels = EVERY_LABEL) -> Result:
    """The stream through a fresh app with `config`, scored prequentially."""
    from service.settings import load_settings

    model = {"factory": factory_name(data.x.shape[1], data.outputs), "weights": str(weights),
             "task": data.task, "input_shape": [data.x.shape[1]], "name": f"{data.name}-mlp",
             "num_classes": data.classes, "reference_data": str(reference)}
    # log_level error: the start-up's `inert:` warnings come back in /v1/state, reported once
    settings = load_settings(None, model=model, batcher={"max_wait_ms": 0}, log_level="error",
                             **config.settings(data))
    run = asyncio.run(serve_prequential(settings, data.x, data.y, delay, request,
                                        labels.due(len(data.x), delay)))
    score, last_half, after_first_label = _scores(
        run.predictions, data.y, data.task, first_taught(len(data.y), delay, request, labels))
    alarms = [e for e in run.events if e["kind"] == "drift_alarm"]
    label_free = [_alarm_position(e) for e in alarms
                  if e["source"].split("/")[-1] in LABEL_FREE_SIGNALS]
    drift_monitored = bool(run.state.get("detectors"))
    span = data.drift_at or len(data.x)  # before the drift, or the whole stream
    judge = (run.state.get("drift_policy") or {}).get("judge") or {}
    verdicts = {name: (f"{a['verdict']} ({a['acted']['outcomes']} acted, "
                       f"{a['held']['outcomes']} held)")
                for name, a in (judge.get("actions") or {}).items()
                if a["acted"]["outcomes"] or a["held"]["outcomes"]}
    return Result(
        data.name, config.name, "adaptd", data.task, delay, len(data.x), score, last_half,
        1000 * run.seconds / len(data.x), after_first_label,
        label_free_alarms=len(label_free),
        label_free_per_10k=(10_000 * sum(at < span for at in label_free) / span
                            if drift_monitored else None),
        labelled_alarms=len(alarms) - len(label_free),
        collapse_resets=sum(e["kind"] == "collapse" for e in run.events),
        shadow_resets=sum(e["kind"] == "shadow" for e in run.events),
        unjoined_labels=run.unjoined, warnings=list(run.state.get("warnings") or []),
        drift_actions=sum(e["kind"] == "drift_action" for e in run.events),
        held_actions=sum(len(e["detail"].get("held", ())) for e in alarms), verdicts=verdicts)


def _river_learners(task: str) -> dict[str, Callable[[], Any]]:
    """River's three learners, as the service's `mixture.learner` builds them (River's defaults,
    seeded, and the service's memory bound, which no B6 stream is long enough to reach: it is
    checked every 10,000 labels)."""
    from adapters.labels.online_learner import river_model

    regression = task != "classification"
    return {name: partial(river_model, name.lower(), regression, SEED)
            for name in ("HT", "HAT", "ARF")}


RIVER_LEARNERS = ("HT", "HAT", "ARF")


def _river_rows(data: StreamData) -> tuple[list[dict], list[dict]]:
    """Training and stream rows as River's dicts, standardised with the training slice's
    mean and spread (the MLP's own standardisation)."""
    mean = data.x_train.mean(0)
    scale = np.maximum(data.x_train.std(0, ddof=1), 1e-6)

    def as_dicts(x: np.ndarray) -> list[dict]:
        return [dict(enumerate(row)) for row in ((x - mean) / scale).astype(float).tolist()]

    return as_dicts(data.x_train), as_dicts(data.x)


def _label(value: Any, task: str) -> int | float:
    return int(value) if task == "classification" else float(value)


def run_river(data: StreamData, learner: str, delay: int, request: int = REQUEST,
              labels: Labels = EVERY_LABEL) -> Result:
    """River's `learner` on the training slice, then on the stream with the service's schedule:
    each block of `request` rows predicted, then the labels due learnt."""
    model = _river_learners(data.task)[learner]()
    train_rows, rows = _river_rows(data)
    for x, y in zip(train_rows, data.y_train, strict=True):
        model.learn_one(x, _label(y, data.task))
    predictions = np.full(len(rows), np.nan)
    batches = label_batches(len(rows), request, labels.due(len(rows), delay))
    started = time.perf_counter()
    for start, batch in zip(range(0, len(rows), request), batches, strict=True):
        end = min(start + request, len(rows))
        for i in range(start, end):
            guess = model.predict_one(rows[i])
            predictions[i] = np.nan if guess is None else guess
        for i in batch.tolist():
            model.learn_one(rows[i], _label(data.y[i], data.task))
    seconds = time.perf_counter() - started
    score, last_half, after_first_label = _scores(
        predictions, data.y, data.task, first_taught(len(rows), delay, request, labels))
    return Result(data.name, learner, "river", data.task, delay, len(rows), score, last_half,
                  1000 * seconds / len(rows), after_first_label)


def no_change(y_train: np.ndarray, y: np.ndarray, delay: int, request: int = REQUEST,
              labels: Labels = EVERY_LABEL) -> np.ndarray:
    """The no-change baseline: every sample of a request gets back the label that arrived last
    before the request is made (the last training label before any has; within the labels
    that go back together, the last sample's, as the service's newest label).

    >>> no_change(np.array([7]), np.array([1, 2, 3, 4, 5]), delay=0, request=1).tolist()
    [7, 1, 2, 3, 4]
    >>> no_change(np.array([7]), np.array([1, 2, 3, 4, 5]), delay=1, request=2).tolist()
    [7, 7, 1, 1, 3]
    """
    predictions = np.empty(len(y), dtype=np.asarray(y).dtype)
    newest = y_train[-1]
    batches = label_batches(len(y), request, labels.due(len(y), delay))
    for start, batch in zip(range(0, len(y), request), batches, strict=True):
        predictions[start:start + request] = newest
        if len(batch):
            newest = y[batch[-1]]
    return predictions


def run_no_change(data: StreamData, delay: int, request: int = REQUEST,
                  labels: Labels = EVERY_LABEL) -> Result:
    started = time.perf_counter()
    predictions = no_change(data.y_train, data.y, delay, request, labels)
    seconds = time.perf_counter() - started
    score, last_half, after_first_label = _scores(
        predictions, data.y, data.task, first_taught(len(data.y), delay, request, labels))
    return Result(data.name, "no-change", "baseline", data.task, delay, len(data.y), score,
                  last_half, 1000 * seconds / len(data.y), after_first_label)


@contextmanager
def trained(data: StreamData, seed: int = SEED) -> Iterator[tuple[Path, Path]]:
    """The stream's model, trained and saved: (weights, reference data)."""
    with saved_model(train_model(data, seed), data.x_train, data.y_train) as files:
        yield files


def run_stream(data: StreamData, configs: list[Config], learners: Iterable[str],
               delays: Iterable[int], request: int = REQUEST,
               progress: Callable[[Result], None] | None = None,
               labels: Labels = EVERY_LABEL) -> list[Result]:
    """Every configuration, River learner and the no-change baseline on one stream, per delay."""
    results = []
    with trained(data) as (weights, reference):
        for delay in delays:
            runs: list[Callable[[], Result]] = [
                partial(run_service, data, config, weights, reference, delay, request, labels)
                for config in configs if data.task in config.tasks]
            runs += [partial(run_river, data, learner, delay, request, labels)
                     for learner in learners]
            runs.append(partial(run_no_change, data, delay, request, labels))
            for run in runs:
                results.append(run())
                if progress is not None:
                    progress(results[-1])
    return results


# --- the report ---------------------------------------------------------------------------------

def _cell(value: float, task: str) -> str:
    return f"{100 * value:.1f}" if task == "classification" else f"{value:.3g}"


def _lead(ours: Result, theirs: Result, field: str = "score") -> float:
    """How far `ours` is ahead on `field` (`score`, `last_half` or `after_first_label`): accuracy
    points, or MAE lower by (negative: behind)."""
    mine, other = getattr(ours, field), getattr(theirs, field)
    if ours.task == "classification":
        return 100 * (mine - other)
    return other - mine


def _signed(value: float, task: str) -> str:
    return f"{value:+.1f}" if task == "classification" else f"{value:+.3g}"


def _by_stream(results: list[Result], task: str, delay: int) -> dict[str, dict[str, Result]]:
    table: dict[str, dict[str, Result]] = {}
    for r in results:
        if r.task == task and r.delay == delay:
            table.setdefault(r.stream, {})[r.learner] = r
    return table


def _learners(rows: dict[str, dict[str, Result]]) -> list[str]:
    """Every learner in the rows: configurations first, River's, then the baseline."""
    order = [*CONFIGS, *RIVER_LEARNERS, "no-change"]
    names = {name for row in rows.values() for name in row}
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def score_table(results: list[Result], task: str, delay: int) -> str:
    """Streams by learners: the score over the stream (over its last half)."""
    rows = _by_stream(results, task, delay)
    learners = _learners(rows)
    lines = ["| stream | " + " | ".join(learners) + " |", "|---" * (len(learners) + 1) + "|"]
    for stream, row in rows.items():
        cells = [f"{_cell(row[n].score, task)} ({_cell(row[n].last_half, task)})" if n in row
                 else "" for n in learners]
        lines.append(f"| {stream} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_table(results: list[Result], task: str, delay: int, field: str = "score") -> str:
    """Per stream, what the issue's targets compare, as leads of adaptd (negative: behind), on
    `field` (the last half's column on the last half whatever it is); a stream whose learners
    hold no such score (no label came back before its last request) gets empty cells."""
    header = ["stream", "defaults − HT", "defaults − no-change", "best adaptd − best River",
              "worst config − source, last half",
              *(f"{on} − {off}" for on, off in DRIFT_PAIRS)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for stream, row in _by_stream(results, task, delay).items():
        ours = [r for r in row.values() if r.kind == "adaptd"]
        river = [r for r in row.values() if r.kind == "river"]
        scored = all(getattr(r, field) is not None for r in row.values())
        cells = [stream]
        for name, other in (("defaults", "HT"), ("defaults", "no-change")):
            cells.append(_signed(_lead(row[name], row[other], field), task)
                         if scored and name in row and other in row else "")
        if scored and ours and river:
            best_ours = max(ours, key=lambda r: _lead(r, river[0], field))
            best_river = max(river, key=lambda r: _lead(r, ours[0], field))
            cells.append(f"{_signed(_lead(best_ours, best_river, field), task)} "
                         f"({best_ours.learner} "
                         f"vs {best_river.learner})")
        else:
            cells.append("")
        if "source" in row and len(ours) > 1:
            worst = min((r for r in ours if r.learner != "source"),
                        key=lambda r: _lead(r, row["source"], "last_half"))
            cells.append(f"{_signed(_lead(worst, row['source'], 'last_half'), task)} "
                         f"({worst.learner})")
        else:
            cells.append("")
        for on, off in DRIFT_PAIRS:
            cells.append(_signed(_lead(row[on], row[off], field), task)
                         if scored and on in row and off in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def events_table(results: list[Result], delay: int) -> str:
    """Streams by service configurations: label-free alarms per 10k, labelled alarms, resets."""
    rows: dict[str, dict[str, Result]] = {}
    for r in results:
        if r.kind == "adaptd" and r.delay == delay:
            rows.setdefault(r.stream, {})[r.learner] = r
    configs = _learners(rows)
    lines = ["| stream | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
    for stream, row in rows.items():
        cells = []
        for name in configs:
            r = row.get(name)
            if r is None:
                cells.append("")
                continue
            alarms = ("off" if r.label_free_per_10k is None
                      else f"{r.label_free_per_10k:.1f} / {r.labelled_alarms}")
            cells.append(f"{alarms} · {r.collapse_resets} / {r.shadow_resets} · "
                         f"{r.drift_actions} / {r.held_actions}")
        lines.append(f"| {stream} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(results: list[Result]) -> str:
    """Learners by delay: the median over streams of milliseconds per sample."""
    learners = _learners({"": {r.learner: r for r in results}})
    delays = sorted({r.delay for r in results})
    lines = ["| delay | " + " | ".join(learners) + " |", "|---" * (len(learners) + 1) + "|"]
    for delay in delays:
        cells = []
        for name in learners:
            times = [r.ms_per_sample for r in results if r.learner == name and r.delay == delay]
            cells.append(f"{statistics.median(times):.3f}" if times else "")
        lines.append(f"| {delay} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: list[Result], field: str = "score") -> str:
    """Every table; the leads on `field` (`score`, or `after_first_label`: each learner scored
    from the first sample served once a label was back)."""
    scored = ("" if field == "score"
              else ", each scored from the first sample served once a label was back, the last "
                   "half's column over the last half")
    parts = []
    for task, unit in (("classification", "accuracy %"), ("regression", "MAE")):
        for delay in sorted({r.delay for r in results if r.task == task}):
            parts.append(f"{task.capitalize()}, labels {delay} samples late: {unit} over the "
                         f"stream (over its last half)\n\n{score_table(results, task, delay)}")
            parts.append(f"Leads of adaptd, labels {delay} late ("
                         f"{'accuracy points' if task == 'classification' else 'MAE lower by'};"
                         f" negative: adaptd behind{scored})\n\n"
                         f"{verdict_table(results, task, delay, field)}")
    for delay in sorted({r.delay for r in results if r.kind == "adaptd"}):
        parts.append(f"Service events, labels {delay} late: label-free drift alarms per 10,000 "
                     f"samples (before the drift on B2's streams) / labelled alarms · collapse "
                     f"/ shadow resets · drift actions taken / held back by the judge\n\n"
                     f"{events_table(results, delay)}")
    parts.append("Milliseconds per sample, median over streams\n\n" + time_table(results))
    notes = [f"{r.stream}/{r.learner}/{r.delay}: {r.unjoined_labels} labels not joined"
             for r in results if r.unjoined_labels]
    notes += [f"{r.stream}/{r.learner}/{r.delay}: the judge's verdicts: "
              + ", ".join(f"{name} {v}" for name, v in r.verdicts.items())
              for r in results if r.verdicts]
    warned: dict[str, dict[str, None]] = {}  # the service's start-up warnings, by configuration
    for r in results:
        for warning in r.warnings:
            warned.setdefault(warning, {})[r.learner] = None
    notes += [f"{', '.join(configs)}: {warning}" for warning, configs in warned.items()]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


def learner_growth(stream: str, kind: str, samples: int, chunk: int = 10_000) -> list[dict]:
    """River's learner as `mixture.learner` builds it, fed one of B2's streams `samples` long (the
    drift halfway): after each `chunk` of labels, its size and what a label and a guess cost, so
    an operator can see what a replica holds after a long run."""
    from adapters.labels.online_learner import OnlineLearner

    half = samples // 2
    data = load_stream(stream, synthetic={"train": chunk, "before": half, "after": samples - half})
    regression = data.task != "classification"
    learner = OnlineLearner(kind, regression, 1 if regression else int(data.classes or 2))
    rows = []
    for start in range(0, len(data.x), chunk):
        x, y = data.x[start:start + chunk], data.y[start:start + chunk]
        began = time.perf_counter()
        learner.learn(x, y)
        learn = (time.perf_counter() - began) / len(x)
        began = time.perf_counter()
        learner.predict(x[:1000])
        guess = (time.perf_counter() - began) / len(x[:1000])
        model = learner.model
        rows.append({"stream": stream, "kind": kind, "labels": learner.learnt,
                     "nodes": getattr(model, "n_nodes", None),
                     "megabytes": model._raw_memory_usage / 1e6
                     if hasattr(model, "_raw_memory_usage") else None,
                     "learn_ms": 1000 * learn, "guess_ms": 1000 * guess})
    return rows


def growth_table(rows: list[dict]) -> str:
    lines = ["| stream | learner | labels learnt | nodes | memory, MB (River's estimate) | "
             "ms a label | ms a guess |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        nodes = "" if r["nodes"] is None else f"{r['nodes']:,}"
        memory = "" if r["megabytes"] is None else f"{r['megabytes']:.1f}"
        lines.append(f"| {r['stream']} | {r['kind']} | {r['labels']:,} | {nodes} | {memory} | "
                     f"{r['learn_ms']:.3f} | {r['guess_ms']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default=",".join(STREAM_NAMES))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--learners", default=",".join(RIVER_LEARNERS),
                        help="River's: HT, HAT, ARF; empty for none")
    parser.add_argument("--delays", type=int, nargs="+", default=list(DELAYS))
    parser.add_argument("--request", type=int, default=REQUEST, help="samples per request")
    parser.add_argument("--max-rows", type=int, default=MAX_ROWS,
                        help="rows read from a real dataset")
    parser.add_argument("--train-share", type=float, default=TRAIN_SHARE)
    parser.add_argument("--synthetic", type=int, nargs=3, metavar=("TRAIN", "BEFORE", "AFTER"),
                        default=[SYNTHETIC[k] for k in ("train", "before", "after")])
    parser.add_argument("--runs", type=int, metavar="BLOCK",
                        help="classes in runs: len // BLOCK equal blocks of the served rows, "
                             "each sorted by label (streams named NAME-runs)")
    parser.add_argument("--label-fraction", type=float, default=1.0, metavar="F",
                        help="labels come back for this share of the samples (drawn with the "
                             "bench's seed), the rest never")
    parser.add_argument("--delay-spread", choices=("fixed", "exponential"), default="fixed",
                        help="exponential: each label's delay drawn from an exponential "
                             "distribution whose mean is the --delays value")
    parser.add_argument("--quick", action="store_true",
                        help="600 rows of a real dataset, B2's streams 500 + 500 + 500")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--report", type=Path, nargs="+",
                        help="print the tables of --json files together; no run")
    parser.add_argument("--from-first-label", action="store_true",
                        help="the leads table on each learner's score from the first sample "
                             "served once a label was back (the wait for it left out)")
    parser.add_argument("--growth", type=int, metavar="SAMPLES",
                        help="instead: River's learner alone (--growth-learners) on --streams "
                             "(B2's) this long, its size and cost every 10,000 labels")
    parser.add_argument("--growth-learners", default="hat",
                        help="kinds of mixture.learner for --growth: ht, hat, arf")
    args = parser.parse_args()
    if args.growth:
        rows = [row for stream in args.streams.split(",")
                for kind in args.growth_learners.split(",")
                for row in learner_growth(stream, kind, args.growth)]
        print(growth_table(rows))
        return
    field = "after_first_label" if args.from_first_label else "score"
    if args.report:
        saved = [json.loads(path.read_text()) for path in args.report]
        rows = [r for part in saved for r in part["results"]]
        if args.from_first_label and any("after_first_label" not in r for r in rows):
            parser.error("--from-first-label: these results hold no score from the first label "
                         "(saved before stop 42); run them again")
        print("\n\n".join(part["header"] for part in saved) + "\n")
        print(report([Result(**r) for r in rows], field))
        return
    if args.runs is not None and args.runs < 1:
        parser.error(f"--runs: a block holds at least one row, got {args.runs}")
    if not 0 < args.label_fraction <= 1:
        parser.error(f"--label-fraction: a share in (0, 1], got {args.label_fraction}")
    labels = Labels(args.label_fraction, args.delay_spread)
    if args.quick:
        args.max_rows, args.synthetic = 600, [500, 500, 500]
    configs = [CONFIGS[name] for name in args.configs.split(",") if name]
    learners = [name for name in args.learners.split(",") if name]
    for name in learners:
        if name not in RIVER_LEARNERS:
            parser.error(f"unknown River learner {name!r}; choose from {RIVER_LEARNERS}")
    synthetic = dict(zip(("train", "before", "after"), args.synthetic, strict=True))
    torch.set_num_threads(1)  # tiny models; the machine is shared

    def progress(r: Result) -> None:
        print(f"{r.stream:15} delay {r.delay:3} {r.learner:19} {r.score:.4f} "
              f"(last half {r.last_half:.4f}) {r.ms_per_sample:.3f} ms/sample", flush=True)

    started = time.perf_counter()
    results, sizes = [], []
    for name in args.streams.split(","):
        data = load_stream(name, args.max_rows, args.train_share, synthetic)
        if args.runs is not None:
            data = in_runs(data, args.runs)
        sizes.append(f"{name} {len(data.x_train):,} + {len(data.x):,}")
        results += run_stream(data, configs, learners, args.delays, args.request, progress,
                              labels)
    wall = time.perf_counter() - started

    command = "python -m bench.real_streams " + " ".join(sys.argv[1:])
    machine = platform.processor() or platform.machine()
    header = (f"B6 real streams: rows trained on + streamed: {'; '.join(sizes)}. {args.request} "
              f"samples per request; {labels.describe()}; service defaults "
              f"{service_defaults()}; {machine}, "
              f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M %Z')}, wall {wall:.0f} s"
              f"\n`{command.strip()}`")
    print(f"\n{header}\n")
    print(report(results, field))
    if args.json:
        args.json.write_text(json.dumps({"header": header,
                                         "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
