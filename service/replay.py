"""`adaptd replay`: a stream through running services, its labels back late, and a report.

The stream is a named benchmark stream (Digits-C, River's drift streams, River's real datasets)
or a file of samples and labels. It goes to each service (`--url`, or several `--target NAME=URL`
side by side, each sent the same samples in the same order) in requests of `request_size`
samples, one request in flight per service, at most `rate` samples a second. The label of stream
position i goes back through ``POST /v1/feedback`` once position i + `label_delay` has been
predicted; the labels still held at the end go back then. ``GET /v1/state`` (the learning rate)
and ``GET /v1/events`` (drift alarms, placed by the service's served-sample clock) are read about
once a second, not per request.

Error and coverage are measured here, from the answers and the labels the replay holds, over a
rolling window of labels; the report is a PNG (rolling error, rolling coverage against the
target, set size or interval width, learning rate; drift alarms as vertical lines) and the same
numbers as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import importlib
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DIGITS_C = "digits-c"
REQUEST_SIZE = 16
LABEL_DELAY = 100  # samples
WINDOW = 500  # labels (error, coverage) or samples (set size) per rolling window
POLL_S = 1.0  # GET /v1/state answers from a cache up to 1 s old anyway
SERIES_POINTS = 1_000  # points per series in the JSON report
MAX_LABELS_PER_REQUEST = 10_000  # feedback.max_labels_per_request's default
FILE_SUFFIXES = (".csv", ".ndjson", ".jsonl")
EVENT_KINDS = ("drift_alarm", "drift_action", "collapse", "shadow", "reset")


class ReplayError(Exception):
    """Something the user can change: a file, a stream name, a service that does not fit."""


# --- the stream ---------------------------------------------------------------------------------

@dataclass
class Stream:
    """Samples in serving order, their labels, and where each part of the stream begins."""

    name: str
    inputs: np.ndarray  # (N, *sample_shape) float32
    labels: np.ndarray  # (N,) class indices or targets, or (N, outputs) for several targets
    parts: list[tuple[int, str]]  # (first position, name): Digits-C's domains, a drift point
    task: str | None = None  # "classification" or "regression"; None: as the service says
    description: str = ""

    @property
    def sample_shape(self) -> list[int]:
        return list(self.inputs.shape[1:])

    def __len__(self) -> int:
        return len(self.inputs)

    def head(self, limit: int | None) -> Stream:
        if limit is None or limit >= len(self):
            return self
        return Stream(self.name, self.inputs[:limit], self.labels[:limit],
                      [p for p in self.parts if p[0] < limit], self.task, self.description)

    def requests(self, size: int) -> list[tuple[int, int]]:
        """(start, end) of each request: `size` samples, never two parts in one."""
        edges = [p[0] for p in self.parts if 0 < p[0] < len(self)] + [len(self)]
        out, start = [], 0
        for edge in edges:
            while start < edge:
                out.append((start, min(start + size, edge)))
                start = out[-1][1]
        return out


def _bench(module: str) -> Any:
    # by name: `bench` is outside what mypy checks (pyproject's [tool.mypy] files), and it loads
    # torch and River, which only the named streams need
    return importlib.import_module(f"bench.{module}")


def river_stream_names() -> list[str]:
    return list(_bench("real_streams").STREAM_NAMES)


def load_stream(spec: str, order: str = "iid", seed: int = 2024) -> Stream:
    """`digits-c`, a River stream's name, or a .csv or .ndjson file."""
    if spec == DIGITS_C:
        return digits_c_stream(order, seed)
    if order != "iid":
        raise ReplayError(f"--order {order} reorders Digits-C only; leave it out for {spec}")
    path = Path(spec)
    if path.suffix.lower() in FILE_SUFFIXES:
        if not path.is_file():
            raise ReplayError(f"no such file: {path}")
        return csv_stream(path) if path.suffix.lower() == ".csv" else ndjson_stream(path)
    names = river_stream_names()
    if spec in names:
        return river_stream(spec)
    raise ReplayError(f"unknown stream {spec!r}: use {DIGITS_C}, one of {', '.join(names)}, or a "
                      "path to a .csv or .ndjson file")


def digits_c_stream(order: str = "iid", seed: int = 2024) -> Stream:
    """Digits-C (bench/digits_c.py): ten corruptions of the digits' test half, then the clean
    half, the samples of each domain in `order`."""
    digits_c = _bench("digits_c")
    try:
        order = digits_c.parse_order(order)
    except ValueError as error:
        raise ReplayError(str(error)) from None
    domains = digits_c.order_stream(digits_c.stream(seed), order, seed)
    parts, start = [], 0
    for domain in domains:
        parts.append((start, domain.name))
        start += len(domain.labels)
    return Stream(DIGITS_C, np.concatenate([d.inputs for d in domains]).astype(np.float32),
                  np.concatenate([d.labels for d in domains]), parts, "classification",
                  f"Digits-C, order {order}")


def river_stream(name: str) -> Stream:
    """A River stream as B6 serves it (bench/real_streams.py): what follows its training slice."""
    data = _bench("real_streams").load_stream(name)
    parts = [(0, name)] if data.drift_at is None else [(0, "first concept"),
                                                      (data.drift_at, "second concept")]
    return Stream(name, data.x.astype(np.float32), data.y, parts, data.task,
                  f"{name} (River), after its training slice")


def csv_stream(path: Path) -> Stream:
    """A header row, numeric feature columns and a `label` column (a class index or a target)."""
    with path.open(newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if not header:
            raise ReplayError(f"{path} is empty: it needs a header row with a 'label' column")
        header = [h.strip() for h in header]
        if "label" not in header:
            raise ReplayError(f"{path} has no 'label' column; its header is {', '.join(header)}")
        where = header.index("label")
        features, labels = [], []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ReplayError(f"{path} line {line} has {len(row)} fields; the header has "
                                  f"{len(header)}")
            values = []
            for column, text in zip(header, row, strict=True):
                try:
                    value = float(text)
                except ValueError:
                    raise ReplayError(f"{path} line {line}: column {column!r} holds {text!r}, "
                                      "not a number; every column must be numeric") from None
                if not math.isfinite(value):
                    raise ReplayError(f"{path} line {line}: column {column!r} is not finite")
                values.append(value)
            labels.append(values.pop(where))
            features.append(values)
    if not features:
        raise ReplayError(f"{path} holds a header and no rows")
    if len(header) < 2:
        raise ReplayError(f"{path} has a 'label' column and no feature column")
    return Stream(path.name, np.asarray(features, dtype=np.float32), np.asarray(labels),
                  [(0, path.name)], description=f"{path.name}, {len(header) - 1} features")


def ndjson_stream(path: Path) -> Stream:
    """One JSON object a line: `inputs` (one sample, nested to the model's input shape) and
    `label` (a class index, a target, or a list of targets)."""
    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with path.open() as file:
        for line, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ReplayError(f"{path} line {line} is not JSON: {error.msg}") from None
            if not isinstance(row, dict) or "inputs" not in row or "label" not in row:
                raise ReplayError(f"{path} line {line}: each line is an object with 'inputs' "
                                  "and 'label'")
            try:
                sample = np.asarray(row["inputs"], dtype=np.float32)
                label = np.asarray(row["label"], dtype=np.float64)
            except (TypeError, ValueError):
                raise ReplayError(f"{path} line {line}: 'inputs' must be a regular nested list "
                                  "of numbers and 'label' a number or a list of numbers") from None
            if inputs and sample.shape != inputs[0].shape:
                raise ReplayError(f"{path} line {line}: inputs of shape {list(sample.shape)}; "
                                  f"line 1's are {list(inputs[0].shape)}")
            if labels and label.shape != labels[0].shape:
                raise ReplayError(f"{path} line {line}: a label of shape {list(label.shape)}; "
                                  f"the first line's is {list(labels[0].shape)}")
            inputs.append(sample)
            labels.append(label)
    if not inputs:
        raise ReplayError(f"{path} holds no samples: write one JSON object a line")
    x = np.stack(inputs)
    if not np.isfinite(x).all():
        raise ReplayError(f"{path}: an input is not finite (or beyond float32)")
    return Stream(path.name, x, np.stack(labels), [(0, path.name)],
                  description=f"{path.name}, samples of shape {list(x.shape[1:])}")


def label_positions(total: int, fraction: float, seed: int = 2024) -> np.ndarray:
    """The stream positions whose labels go back: round(fraction × total), seeded, sorted."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the label fraction is a share from 0 to 1, not {fraction}")
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(total, size=round(fraction * total), replace=False))


# --- the service --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One configuration of the comparison: a name for the report and the service's URL."""

    name: str
    url: str


def parse_target(text: str) -> Target:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"--target {text!r}: write NAME=URL, for example "
                                         "bn=http://127.0.0.1:8001")
    return Target(name, url.rstrip("/"))


def _detail(reply: Any) -> str:
    try:
        return str(reply.json().get("detail", reply.text))[:500]
    except ValueError:
        return reply.text[:500]


def read_state(target: Target, headers: dict[str, str], wait_s: float = 0.0) -> dict[str, Any]:
    """`GET /v1/state` of the target, waiting up to `wait_s` for it to answer (a service that is
    starting refuses connections), or a ReplayError that says how to reach it."""
    import httpx

    deadline = time.monotonic() + wait_s
    while True:
        try:
            reply = httpx.get(f"{target.url}/v1/state", headers=headers, timeout=10)
        except httpx.HTTPError as error:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise ReplayError(f"cannot reach {target.url} ({type(error).__name__}: {error}): "
                              "start `adaptd serve` there, or pass the URL of a running service "
                              "with --url or --target") from None
        if reply.status_code != 503 or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if reply.status_code != 200:
        raise ReplayError(f"{target.url}/v1/state answered {reply.status_code}: {_detail(reply)}")
    try:
        return dict(reply.json())
    except ValueError:
        raise ReplayError(f"{target.url}/v1/state did not answer JSON: is it adaptd?") from None


def check_fits(stream: Stream, state: dict[str, Any], target: Target) -> str:
    """The task the replay scores by; a ReplayError when the stream does not fit the model."""
    model = state.get("model") or {}
    shape = list(model.get("input_shape") or [])
    if shape != stream.sample_shape:
        raise ReplayError(
            f"the stream's samples have shape {stream.sample_shape}; the service at {target.url} "
            f"({model.get('name')}) takes {shape} (GET /v1/state model.input_shape): replay to a "
            "service that serves a model for this stream (adaptd replay --help says how to "
            "start one)")
    task = str(model.get("task"))
    if stream.task is not None and task != stream.task:
        raise ReplayError(f"{stream.name} is a {stream.task} stream; the service at {target.url} "
                          f"serves a {task} model")
    if task == "classification":
        classes = len(model.get("classes") or [])
        labels = stream.labels
        if labels.ndim != 1 or not np.all(labels == np.round(labels)) or labels.min() < 0 \
                or labels.max() >= classes:
            raise ReplayError(f"{stream.name}'s labels are not all class indices from 0 to "
                              f"{classes - 1}, which the service at {target.url} predicts")
    return task


# --- one replay ---------------------------------------------------------------------------------

@dataclass
class Plan:
    """What every target is sent: the same requests and labels."""

    requests: list[tuple[int, int]]
    labelled: np.ndarray  # sorted stream positions whose labels go back
    label_delay: int
    rate: float | None  # samples a second; None: as fast as the service answers
    poll_s: float = POLL_S


@dataclass
class Served:
    """What one target answered over the stream."""

    target: Target
    task: str
    predictions: list[Any]
    sets: list[list[int] | None]
    intervals: list[Any]
    level: float | None = None
    clock_at_start: int = 0
    learning_rate: list[tuple[int, float]] = field(default_factory=list)
    events: dict[int, dict[str, Any]] = field(default_factory=dict)  # by seq
    first_seq: int = 0
    labels_sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    state_after: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    adapter: str = ""


async def _post(client: Any, path: str, body: bytes, url: str) -> dict[str, Any]:
    """POST a JSON body, waiting out 503s (an overloaded batcher says when to retry)."""
    import httpx

    for _ in range(60):
        try:
            reply = await client.post(path, content=body,
                                      headers={"content-type": "application/json"})
        except httpx.HTTPError as error:
            raise ReplayError(f"lost {url} during the replay ({type(error).__name__}: "
                              f"{error})") from None
        if reply.status_code == 503:
            await asyncio.sleep(float(reply.headers.get("retry-after", 1)))
            continue
        if reply.status_code != 200:
            raise ReplayError(f"{url}{path} answered {reply.status_code}: {_detail(reply)}")
        return dict(reply.json())
    raise ReplayError(f"{url}{path} answered 503 for a minute: the service is overloaded")


async def _poll(client: Any, served: Served, position: int) -> None:
    """The learning rate now, and the events since the last look (the replica keeps its newest
    1,000, far more than a second brings)."""
    import httpx

    try:
        state = (await client.get("/v1/state")).json()
        events = (await client.get("/v1/events", params={"limit": 1000})).json()["events"]
    except httpx.HTTPError as error:
        raise ReplayError(f"lost {served.target.url} during the replay "
                          f"({type(error).__name__}: {error})") from None
    served.learning_rate.append((position, float(state["adapter"]["learning_rate"])))
    for event in events:
        if event["seq"] > served.first_seq and event["kind"] in EVENT_KINDS:
            served.events[event["seq"]] = event
    served.state_after = state


async def replay_one(stream: Stream, target: Target, task: str, plan: Plan,
                     headers: dict[str, str], advance: Any = None) -> Served:
    """The stream through one target; `advance(samples)` after each request."""
    import httpx
    import orjson

    run = secrets.token_hex(4)  # ids of this run, unlike any earlier run's on the same service
    n = len(stream)
    served = Served(target, task, [None] * n, [None] * n, [None] * n)
    limits = httpx.Limits(max_connections=2)
    async with httpx.AsyncClient(base_url=target.url, headers=headers, timeout=60,
                                 limits=limits) as client:
        try:
            state = (await client.get("/v1/state")).json()
            events = (await client.get("/v1/events", params={"limit": 1}))
            newest = events.json()["events"]
        except (httpx.HTTPError, ValueError, KeyError) as error:
            raise ReplayError(f"lost {target.url} at the start: {error}") from None
        served.first_seq = newest[0]["seq"] if newest else 0
        served.clock_at_start = int((state.get("drift_policy") or {}).get("samples", 0))
        served.model = str(state["model"].get("version"))
        served.adapter = str(state["adapter"].get("name"))
        served.learning_rate.append((0, float(state["adapter"]["learning_rate"])))

        labels_done = 0  # of plan.labelled, those already sent

        async def send_labels(upto: int) -> None:
            # the labels of positions before `upto`, in chunks the route takes
            nonlocal labels_done
            due = plan.labelled[labels_done:]
            due = due[:int(np.searchsorted(due, upto))]
            labels_done += len(due)
            for at in range(0, len(due), MAX_LABELS_PER_REQUEST):
                chunk = due[at:at + MAX_LABELS_PER_REQUEST]
                body = orjson.dumps({"labels": [
                    {"id": f"r{run}-{i}", "label": stream.labels[i].tolist()} for i in chunk]})
                reply = await _post(client, "/v1/feedback", body, target.url)
                served.labels_sent += len(chunk)
                for outcome, value in reply.items():
                    count = value if isinstance(value, int) else len(value)
                    served.outcomes[outcome] = served.outcomes.get(outcome, 0) + count

        started = last_poll = time.monotonic()
        for start, end in plan.requests:
            if plan.rate:
                wait = started + start / plan.rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            body = orjson.dumps({"inputs": stream.inputs[start:end],
                                 "ids": [f"r{run}-{i}" for i in range(start, end)]},
                                option=orjson.OPT_SERIALIZE_NUMPY)
            rows = (await _post(client, "/v1/predict", body, target.url))["predictions"]
            for i, row in enumerate(rows, start=start):
                served.predictions[i] = row["prediction"]
                served.sets[i] = row.get("set")
                served.intervals[i] = row.get("interval")
                served.level = row.get("level")
            await send_labels(end - plan.label_delay)
            if advance is not None:
                advance(end - start)
            if time.monotonic() - last_poll >= plan.poll_s:
                last_poll = time.monotonic()
                await _poll(client, served, end)
        await send_labels(n)
        served.seconds = time.monotonic() - started
        await _poll(client, served, n)
    return served


async def replay_all(stream: Stream, targets: Sequence[Target], tasks: Sequence[str],
                     plan: Plan, headers: dict[str, str], progress: bool = True
                     ) -> list[Served]:
    """Every target at once, each its own client and pace; a rich progress bar per target."""
    if not progress:
        return list(await asyncio.gather(*(replay_one(stream, t, task, plan, headers)
                                           for t, task in zip(targets, tasks, strict=True))))
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("samples"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        runs = []
        for target, task in zip(targets, tasks, strict=True):
            job = bar.add_task(target.name, total=len(stream))
            runs.append(replay_one(stream, target, task, plan, headers,
                                   lambda k, job=job: bar.advance(job, k)))
        return list(await asyncio.gather(*runs))


# --- the numbers --------------------------------------------------------------------------------

def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and up to `window` - 1 before it (fewer at the start).

    >>> rolling_mean(np.array([1.0, 0.0, 1.0, 1.0]), 2).tolist()
    [1.0, 0.5, 0.5, 1.0]
    """
    total = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (total[ends] - total[starts]) / (ends - starts)


def _thinned(x: np.ndarray, y: np.ndarray, points: int = SERIES_POINTS) -> list[list[float]]:
    if len(x) > points:
        keep = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
        x, y = x[keep], y[keep]
    return [[int(a), round(float(b), 6)] for a, b in zip(x, y, strict=True)]


@dataclass
class Measured:
    """One target's per-sample numbers: what the report plots and sums up."""

    positions: np.ndarray  # labelled stream positions
    error: np.ndarray  # per labelled sample: 0/1 wrong (classification) or absolute error
    covered: np.ndarray | None  # per labelled sample: the label in the set or interval
    size: np.ndarray | None  # per sample: set size or mean interval width


def measure(stream: Stream, served: Served, labelled: np.ndarray) -> Measured:
    """Errors and coverage from the answers and the labels this replay holds."""
    truth = stream.labels[labelled]
    if served.task == "classification":
        predicted = np.asarray([served.predictions[i] for i in labelled], dtype=np.int64)
        error = (predicted != truth).astype(np.float64)
        sets = [served.sets[i] for i in labelled]
        covered = (None if not sets or sets[0] is None else np.asarray(
            [int(y) in s for y, s in zip(truth, sets, strict=True)], dtype=np.float64))
        size = (None if served.sets[0] is None
                else np.asarray([len(s or ()) for s in served.sets], dtype=np.float64))
        return Measured(labelled, error, covered, size)
    predicted = np.asarray([served.predictions[i] for i in labelled], dtype=np.float64)
    targets = np.asarray(truth, dtype=np.float64).reshape(predicted.shape)
    error = np.abs(predicted - targets).reshape(len(labelled), -1).mean(axis=1)
    if served.intervals[0] is None:
        return Measured(labelled, error, None, None)
    bounds = np.asarray([served.intervals[i] for i in labelled], dtype=np.float64)
    bounds = bounds.reshape(len(labelled), -1, 2)
    flat = targets.reshape(len(labelled), -1)
    inside = ((bounds[..., 0] <= flat) & (flat <= bounds[..., 1])).all(axis=1)
    widths = np.asarray(served.intervals, dtype=np.float64).reshape(len(stream), -1, 2)
    width: np.ndarray = (widths[..., 1] - widths[..., 0]).mean(axis=1)
    hits: np.ndarray = np.asarray(inside, dtype=np.float64)
    return Measured(labelled, error, hits, width)


def alarm_positions(served: Served) -> list[int]:
    """Drift alarms by stream position: the service's sample clock less its clock at start."""
    return sorted(int(e["detail"]["at"]) - served.clock_at_start for e in served.events.values()
                  if e["kind"] == "drift_alarm" and "at" in e["detail"])


def summary(stream: Stream, served: Served, measured: Measured, window: int) -> dict[str, Any]:
    """One configuration's numbers and series for the JSON report."""
    m = measured
    rolling_error = rolling_mean(m.error, window)
    out: dict[str, Any] = {
        "url": served.target.url, "model": served.model, "adapter": served.adapter,
        "samples": len(stream), "seconds": round(served.seconds, 3),
        "samples_per_second": round(len(stream) / served.seconds, 1) if served.seconds else None,
        "labels_sent": served.labels_sent, "label_outcomes": dict(served.outcomes),
        "metric": "error rate" if served.task == "classification" else "mean absolute error",
        "error": float(m.error.mean()) if len(m.error) else None,
        "target_coverage": served.level,
        "coverage": None, "worst_window_coverage": None,
        "mean_set_size" if served.task == "classification" else "mean_interval_width":
            None if m.size is None else float(m.size.mean()),
        "alarms": len(alarm_positions(served)), "alarm_positions": alarm_positions(served),
        "events": [{"kind": e["kind"], "source": e["source"], "action": e["action"],
                    "at": (int(e["detail"]["at"]) - served.clock_at_start
                           if "at" in e["detail"] else None)}
                   for _, e in sorted(served.events.items())],
        "service": {"quality": served.state_after.get("quality"),
                    "calibrator_coverage": (served.state_after.get("calibrator") or {})
                    .get("coverage")},
        "series": {"error": _thinned(m.positions, rolling_error),
                   "learning_rate": [[p, r] for p, r in served.learning_rate]},
    }
    if m.covered is not None and len(m.covered):
        out["coverage"] = float(m.covered.mean())
        full = rolling_mean(m.covered, window)[window - 1:] if len(m.covered) >= window else None
        out["worst_window_coverage"] = (float(full.min()) if full is not None
                                        else out["coverage"])
        out["series"]["coverage"] = _thinned(m.positions, rolling_mean(m.covered, window))
    if m.size is not None:
        out["series"]["set_size"] = _thinned(np.arange(len(m.size)), rolling_mean(m.size, window))
    return out


# --- the figure ---------------------------------------------------------------------------------

def plot(path: Path, title: str, stream: Stream, runs: Sequence[tuple[Served, Measured]],
         window: int) -> None:
    """Rolling error, rolling coverage against the target, set size (interval width) and the
    learning rate, one colour per configuration; its drift alarms as dashed vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regression = any(s.task == "regression" for s, _ in runs)
    figure, axes = plt.subplots(4, 1, figsize=(11, 9.5), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (served, m) in enumerate(runs):
        colour = colours[k % len(colours)]
        axes[0].plot(m.positions, rolling_mean(m.error, window), color=colour, lw=1.2,
                     label=served.target.name)
        if m.covered is not None:
            axes[1].plot(m.positions, rolling_mean(m.covered, window), color=colour, lw=1.2)
        if m.size is not None:
            axes[2].plot(np.arange(len(m.size)), rolling_mean(m.size, window), color=colour,
                         lw=1.2)
        steps = served.learning_rate + [(len(stream), served.learning_rate[-1][1])]
        axes[3].step([p for p, _ in steps], [r for _, r in steps], where="post", color=colour,
                     lw=1.2)
        for at in alarm_positions(served):
            for axis in axes:
                axis.axvline(at, color=colour, ls="--", lw=0.8, alpha=0.7)
    level = next((s.level for s, _ in runs if s.level is not None), None)
    if level is not None:
        axes[1].axhline(level, color="black", lw=0.8, ls=":", label=f"target {level:g}")
        axes[1].legend(loc="lower right", fontsize=8)
    for start, name in stream.parts:
        for axis in axes:
            if start > 0:
                axis.axvline(start, color="0.8", lw=0.6, zorder=0)
        if len(stream.parts) > 1:
            axes[0].annotate(name, (start, 1.0), xycoords=("data", "axes fraction"),
                             xytext=(2, -2), textcoords="offset points", fontsize=7,
                             va="top", color="0.4")
    metric = "mean absolute error" if regression else "error rate"
    axes[0].set_ylabel(f"{metric}\n(last {window} labels)")
    axes[1].set_ylabel(f"coverage\n(last {window} labels)")
    axes[2].set_ylabel(f"{'interval width' if regression else 'set size'}\n"
                       f"(last {window} samples)")
    axes[3].set_ylabel("learning rate")
    axes[3].set_xlabel("stream position (samples served)")
    if not any(m.covered is not None for _, m in runs):
        axes[1].text(0.5, 0.5, "conformal calibration off", transform=axes[1].transAxes,
                     ha="center", color="0.4")
    if all(r == 0 for s, _ in runs for _, r in s.learning_rate):
        axes[3].text(0.5, 0.7, "nothing learns by gradient (learning rate 0)",
                     transform=axes[3].transAxes, ha="center", color="0.4")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="0.3", ls="--", lw=0.8))
    labels.append("drift alarm")
    figure.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=8,
                  frameon=False)
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.set_xlim(0, len(stream))
    figure.suptitle(title, x=0.01, ha="left", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- the command --------------------------------------------------------------------------------

STREAMS_HELP = """\
STREAM is one of:
  digits-c       Digits-C (bench/digits_c.py): the demo digits under ten corruptions in a row,
                 then clean; fits `adaptd serve` with no configuration (the demo CNN)
  a River stream one of sea, sine, hyperplane, rbf, agrawal, friedman-gra, friedman-lea
                 (one abrupt drift) or phishing, bananas, image-segments, shuttle,
                 trump-approval, sp500, water-flow (River's datasets); these need a service
                 that serves B6's model for the stream: write it once with
                     adaptd replay phishing --prepare models/phishing
                 then start it with
                     adaptd serve --config models/phishing/adaptd.toml --port 8001
                 and replay with --url http://127.0.0.1:8001
  FILE.csv       a header row, numeric feature columns and a `label` column
  FILE.ndjson    one object a line: {"inputs": <one sample>, "label": <class or target>}

Every service must take the stream's samples: the replay checks its shape against GET /v1/state
model.input_shape before it sends anything. Error and coverage are measured by the replay from
the answers and the labels it holds; drift alarms are read from GET /v1/events. Writes
OUT/replay.png and OUT/replay.json.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stream", metavar="STREAM",
                        help="digits-c, a River stream's name, or a .csv or .ndjson file")
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the service to replay to (default http://127.0.0.1:8000)")
    parser.add_argument("--target", action="append", type=parse_target, default=[],
                        metavar="NAME=URL", help="a configuration to compare, named for the "
                        "report (repeatable; replaces --url): the same samples go to each")
    parser.add_argument("--order", default="iid",
                        help="digits-c: the order within each domain, iid, dirichlet:A "
                        "(runs of one class; smaller A, longer runs) or repeat")
    parser.add_argument("--request-size", type=int, default=REQUEST_SIZE,
                        help=f"samples per POST /v1/predict (default {REQUEST_SIZE})")
    parser.add_argument("--rate", type=float, default=None,
                        help="samples a second per service (default: as fast as it answers)")
    parser.add_argument("--label-delay", type=int, default=LABEL_DELAY,
                        help="a sample's label goes back once this many more samples have been "
                        f"predicted (default {LABEL_DELAY})")
    parser.add_argument("--label-fraction", type=float, default=1.0,
                        help="the seeded share of samples whose label goes back (default 1)")
    parser.add_argument("--limit", type=int, default=None,
                        help="replay only the first LIMIT samples of the stream")
    parser.add_argument("--seed", type=int, default=2024,
                        help="seeds Digits-C's corruptions and order, and which samples are "
                        "labelled")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help=f"labels per rolling window of the report (default {WINDOW})")
    parser.add_argument("--out", type=Path, default=Path("replay"),
                        help="folder for replay.png and replay.json (default ./replay)")
    parser.add_argument("--token", default=os.environ.get("ADAPTD_API_TOKEN"),
                        help="bearer token of the services (default: ADAPTD_API_TOKEN)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for the services to answer (they refuse "
                        "connections while they start; default 0: fail at once)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--prepare", type=Path, metavar="FOLDER",
                        help="River streams: train B6's model for STREAM on its training slice, "
                        "write it with a config to FOLDER, print the `adaptd serve` command "
                        "that serves it, and stop")


def prepare(name: str, folder: Path) -> Path:
    """B6's model for a River stream, trained on its training slice, saved beside a config that
    serves it: the config's path."""
    if name not in river_stream_names():
        raise ReplayError(f"--prepare trains a model for a River stream "
                          f"({', '.join(river_stream_names())}), not {name!r}")
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    real_streams = _bench("real_streams")
    data = real_streams.load_stream(name)
    model = real_streams.train_model(data)
    factory = real_streams.factory_name(data.x.shape[1], data.outputs)
    folder.mkdir(parents=True, exist_ok=True)
    weights, reference = folder / "model.safetensors", folder / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    save_file({"inputs": torch.from_numpy(data.x_train[:2000]),
               "labels": torch.from_numpy(data.y_train[:2000])}, str(reference))
    lines = [f"# written by `adaptd replay {name} --prepare {folder}`: B6's TabularMLP "
             "(bench/real_streams.py) trained on the stream's training slice",
             "[model]", f'name = "{name}-mlp"', f'factory = "{factory}"',
             f'weights = "{weights.resolve()}"', f'task = "{data.task}"',
             f"input_shape = [{data.x.shape[1]}]", f'reference_data = "{reference.resolve()}"']
    if data.classes:
        lines.append(f"num_classes = {data.classes}")
    config = folder / "adaptd.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The replay the arguments describe; the JSON report, also written to OUT."""
    if args.prepare is not None:
        config = prepare(args.stream, args.prepare)
        print(f"wrote {config}; serve it with:\n  adaptd serve --config {config} --port 8001\n"
              f"then: adaptd replay {args.stream} --url http://127.0.0.1:8001")
        return {}
    for value, what in ((args.request_size, "--request-size"), (args.window, "--window")):
        if value < 1:
            raise ReplayError(f"{what} must be 1 or more")
    if args.label_delay < 0:
        raise ReplayError("--label-delay counts samples: 0 or more")
    if not 0.0 <= args.label_fraction <= 1.0:
        raise ReplayError("--label-fraction is a share from 0 to 1")
    if args.rate is not None and args.rate <= 0:
        raise ReplayError("--rate is samples a second, above 0")
    if args.wait < 0:
        raise ReplayError("--wait is seconds: 0 or more")
    if args.limit is not None and args.limit < 1:
        raise ReplayError("--limit must be 1 or more")
    targets = args.target or [Target("service", args.url.rstrip("/"))]
    if len({t.name for t in targets}) < len(targets):
        raise ReplayError("two --target share a name: give each its own")
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    # a file is read first (a bad one fails at once); a named stream takes seconds to build, so
    # the services are asked first
    is_file = Path(args.stream).suffix.lower() in FILE_SUFFIXES
    if not is_file and args.stream != DIGITS_C and args.stream not in river_stream_names():
        load_stream(args.stream)  # says what STREAM may be
    stream = load_stream(args.stream, args.order, args.seed) if is_file else None
    states = [read_state(t, headers, args.wait) for t in targets]
    if stream is None:
        stream = load_stream(args.stream, args.order, args.seed)
    stream = stream.head(args.limit)
    tasks = [check_fits(stream, state, t) for t, state in zip(targets, states, strict=True)]
    if len(set(tasks)) > 1:
        raise ReplayError("the targets serve different tasks: compare like with like")
    if tasks[0] == "classification":
        stream.labels = stream.labels.astype(np.int64)  # class indices, checked above
    plan = Plan(stream.requests(args.request_size),
                label_positions(len(stream), args.label_fraction, args.seed),
                args.label_delay, args.rate)
    served = asyncio.run(replay_all(stream, targets, tasks, plan, headers,
                                    progress=not args.quiet))
    measured = [measure(stream, s, plan.labelled) for s in served]
    labels = (f"labels {100 * args.label_fraction:g}%, {args.label_delay} samples late"
              if len(plan.labelled) else "no labels")
    title = (f"adaptd replay {stream.name}: {stream.description}; {len(stream):,} samples, "
             f"{args.request_size}/request; {labels}")
    report = {
        "stream": {"name": stream.name, "description": stream.description,
                   "samples": len(stream), "sample_shape": stream.sample_shape,
                   "parts": [{"start": s, "name": n} for s, n in stream.parts],
                   "order": args.order if stream.name == DIGITS_C else None,
                   "request_size": args.request_size, "rate": args.rate,
                   "label_fraction": args.label_fraction, "label_delay": args.label_delay,
                   "labels": len(plan.labelled), "seed": args.seed},
        "window": args.window,
        "configurations": {s.target.name: summary(stream, s, m, args.window)
                           for s, m in zip(served, measured, strict=True)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replay.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(args.out / "replay.png", title, stream, list(zip(served, measured, strict=True)),
         args.window)
    return report


def replay_command(args: argparse.Namespace) -> None:
    try:
        report = run(args)
    except ReplayError as problem:
        sys.exit(f"adaptd replay: {problem}")
    if not report:
        return
    for name, numbers in report["configurations"].items():
        coverage, error = numbers["coverage"], numbers["error"]
        print(f"{name}: " + (f"{numbers['metric']} {error:.4g}" if error is not None
                             else "no labels")
              + (f", coverage {coverage:.3f} (worst window {numbers['worst_window_coverage']:.3f})"
                 if coverage is not None else "")
              + f", {numbers['alarms']} drift alarms, {numbers['samples_per_second']:g} samples/s")
    print(f"wrote {args.out / 'replay.png'} and {args.out / 'replay.json'}")
