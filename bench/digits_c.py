"""B1, Digits-C: continual test-time adaptation on a stream of corrupted handwritten digits.

The demo CNN, trained on one half of scikit-learn's digits, meets the other half under ten
corruptions in a row (fresh randomness per domain, shuffled, no reset between domains), then the
clean half again, which shows what the stream did to clean accuracy (forgetting).

Two ways through the stream:
- in process, chunks of `--request-sizes` samples (64 by default) through the same engine the
  service runs (`service.runtime.build_engine`), one `engine.forward` per chunk in stream order,
  for each method and each test-time normalisation (`batch`: the references' batch statistics;
  `robust`: the service default; `balanced`: robust statistics fed by a class-balanced memory);
- through the running service (a fresh `adaptd serve` per run, on a free loopback port or
  `--port`), that many samples per `POST /v1/predict` (one by default), `--concurrency`
  requests in flight, so the micro-batcher and the adaptation buffer do what they do in
  production. Only here can labels go back (`--label-fraction`, `--label-delay`, through
  `POST /v1/feedback`).

The traffic axis: `--orders` changes the order of the samples within each corrupted domain:

    iid             shuffled (the stream as it always was)
    dirichlet:A     RoTTA's LabelDirichletDomainSequence (BIT-DA/RoTTA, core/data/ttasampler.py):
                    per corrupted domain, as many time slots as classes; each class's samples
                    split over the slots by shares drawn from Dirichlet([A] * slots), one draw per
                    class; the slots in time order, within a slot the class chunks in random
                    order. A = 1, 0.1, 0.01: ever longer runs of one class. Seeded by `--seed` and
                    the domain's name; `clean_after` stays i.i.d.
    repeat          one image (the first sample of the first corrupted domain) 1,000 times, then
                    the clean half i.i.d.; reported: the share of the 1,000 answers that differ
                    from the source model's answer for that image, and the clean error after
    mixed           every corruption at once (SAR's "mixed shifts", Niu et al., ICLR 2023): the ten
                    corrupted domains' samples shuffled together into one domain, `mixed`
    mixed:A         the same samples with their classes in runs: `dirichlet:A` over the whole
                    mixed stream (ten time slots), so each run of a class mixes corruptions
    imbalanced:R    a long tail of classes (label shift): each corrupted domain shuffled, class
                    k of a random ranking (seeded per domain) keeping R^(-k/(K-1)) of its
                    samples, so the most frequent class has R times the samples of the rarest
    spike:V         an input that overflows the training range: the clean half i.i.d. (domain
                    `spike`), its sample 50 with one value set to V (a pixel of 1e3 in a [0, 1]
                    image), then the clean half again; the spike domain's error against the
                    source's shows what one such sample did to the samples after it

    python -m bench.digits_c                       # in process, every method, both norms
    python -m bench.digits_c --service             # and through the service, one per request
    python -m bench.digits_c --methods none,tent --norms batch
    python -m bench.digits_c --methods none,bn --norms robust --orders iid,dirichlet:0.1 \\
        --request-sizes 1
    python -m bench.digits_c --service-only --methods bn --request-sizes 16 \\
        --label-fraction 0.1 --label-delay 100 --set ADAPTD_ERROR_MEMORY__KIND=exact

Prints a markdown table: one row per method, norm, order, request size and labels, with the
error per domain (%), the mean over the corrupted domains, the clean error after the stream,
the number of corrupted domains where the method's error exceeds that of adapter `none` on the
same order and request size (`none` is run for the comparison when --methods lacks it, or when
--set or labels would change what it serves: the baseline is the source model as trained, with
no --set and no labels; marked "(baseline)"), and backward samples (samples that entered a
gradient step). Runs of the `repeat` order get a table of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.corruptions import DOMAINS, corrupt
from bench.served import free_port
from service.demo import digits_split
from service.replay import label_positions  # shared with `adaptd replay`

METHODS = ["none", "bn", "tent", "eta", "eata", "psmt", "adanpc", "eata+adanpc"]
SEED = 2024
CLEAN = "clean_after"
REPEAT = "repeat"
REPEATS = 1_000  # times the `repeat` order sends its image
SPIKE = "spike"
MIXED = "mixed"
IMBALANCED = "imbalanced"
SPIKE_AT = 50  # the `spike:V` order's sample with one value set to V
ORDERS = ["iid", "dirichlet:1", "dirichlet:0.1", "dirichlet:0.01", REPEAT, "spike:1000", "mixed",
          "mixed:0.1", "imbalanced:100"]
NO_BN_STATISTICS = ("none", "adanpc")  # methods the test-time BatchNorm mode does not touch


@dataclass
class Domain:
    name: str
    inputs: np.ndarray
    labels: np.ndarray


@dataclass
class Result:
    method: str
    mode: str
    errors: dict[str, float] = field(default_factory=dict)
    backward_samples: int = 0
    seconds: float = 0.0
    norm: str = "robust"
    order: str = "iid"
    request_size: int = 64
    service: bool = False
    baseline: bool = False  # adapter `none` run only for the comparison (not in --methods)
    worse_than_source: int | None = None  # corrupted domains where the error exceeds none's
    changed_answers: float | None = None  # `repeat`: % of the answers unlike the source's
    label_fraction: float = 0.0
    label_delay: int = 0
    labels_sent: int = 0
    labels_joined: int = 0
    label_outcomes: dict[str, int] = field(default_factory=dict)  # joined, unknown, ...
    overrides: dict[str, str] = field(default_factory=dict)  # --set
    clients: int = 1  # --clients: the stream dealt to this many callers, interleaved
    client_groups: bool = False  # each caller's requests name its group
    groups_followed: int = 0  # through the service: the groups its class-run filter followed

    @property
    def mean_error(self) -> float:
        return float(np.mean([v for k, v in self.errors.items() if k != CLEAN]))

    @property
    def labels(self) -> str:
        """The labels column: none, or the share, the delay and what became of them."""
        if not self.label_fraction:
            return "—"
        return (f"{100 * self.label_fraction:g}% +{self.label_delay}: {self.labels_sent:,} sent, "
                f"{self.labels_joined:,} joined")


# --- the stream and its orders ------------------------------------------------------------------

def stream(seed: int = SEED) -> list[Domain]:
    """The continual stream: every corruption of the test half, then the clean test half."""
    _, _, x_test, y_test = digits_split()
    domains = []
    for index, name in enumerate([*DOMAINS, CLEAN]):
        rng = np.random.default_rng(seed + index)
        order = rng.permutation(len(x_test))
        x = x_test[order] if name == CLEAN else corrupt(name, x_test[order], rng)
        domains.append(Domain(name, x, y_test[order]))
    return domains


def parse_order(spec: str) -> str:
    """`iid`, `repeat`, `mixed`, `dirichlet:A` or `mixed:A` with A > 0, `imbalanced:R` with
    R ≥ 1 or `spike:V` with V finite, as given; ValueError otherwise.

    >>> parse_order("imbalanced:0.5")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown order 'imbalanced:0.5': use iid, repeat, mixed, dirichlet:A or ...
    """
    if spec in ("iid", REPEAT, MIXED):
        return spec
    kind, _, value = spec.partition(":")
    valid = {SPIKE: np.isfinite, "dirichlet": lambda v: v > 0, MIXED: lambda v: v > 0,
             IMBALANCED: lambda v: np.isfinite(v) and v >= 1}
    if kind in valid:
        try:
            if valid[kind](float(value)):
                return spec
        except ValueError:
            pass
    raise ValueError(f"unknown order {spec!r}: use iid, repeat, mixed, dirichlet:A or mixed:A "
                     f"with A > 0, imbalanced:R with R >= 1 or spike:V with V finite (for "
                     f"example {', '.join(ORDERS)})")


def dirichlet_order(labels: np.ndarray, alpha: float, rng: np.random.Generator,
                    slots: int | None = None) -> np.ndarray:
    """A permutation of `labels`' positions in RoTTA's LabelDirichletDomainSequence order.

    `slots` time slots (default: the number of classes); each class's positions, in their
    current order, are split over the slots by shares from Dirichlet([alpha] * slots), one draw
    per class; the slots follow each other, and within a slot the classes' chunks come in a
    random order.

    >>> labels = np.repeat(np.arange(3), 4)
    >>> order = dirichlet_order(labels, 0.01, np.random.default_rng(0))
    >>> sorted(order.tolist()) == list(range(12))
    True
    """
    classes = np.unique(labels)
    slots = slots or len(classes)
    shares = rng.dirichlet([alpha] * slots, len(classes))
    in_slot: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for c, share in zip(classes, shares, strict=True):
        ids = np.flatnonzero(labels == c)
        cuts = (np.cumsum(share)[:-1] * len(ids)).astype(int)
        for s, chunk in enumerate(np.split(ids, cuts)):
            in_slot[s].append(chunk)
    out = [chunks[i] for chunks in in_slot for i in rng.permutation(len(chunks))]
    return np.concatenate(out).astype(np.int64)


def domain_rng(seed: int, name: str) -> np.random.Generator:
    """The order's randomness for one domain: the same for a seed and a domain's name, whichever
    other domains the stream holds."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def order_stream(domains: Sequence[Domain], order: str, seed: int = SEED) -> list[Domain]:
    """The stream in `order` (see the module's docstring); the clean domain is left as it is."""
    order = parse_order(order)
    if order == "iid":
        return list(domains)
    if order == REPEAT:
        first = next(d for d in domains if d.name != CLEAN)
        repeated = Domain(REPEAT, np.repeat(first.inputs[:1], REPEATS, axis=0),
                          np.repeat(first.labels[:1], REPEATS))
        return [repeated, *(d for d in domains if d.name == CLEAN)]
    kind, _, value = order.partition(":")
    if kind == SPIKE:
        clean = next(d for d in domains if d.name == CLEAN)
        inputs = clean.inputs.copy()
        flat = inputs[SPIKE_AT].reshape(-1)  # a view: one value of one sample
        flat[flat.size // 3] = float(value)
        return [Domain(SPIKE, inputs, clean.labels.copy()), clean]
    if kind == MIXED or order == MIXED:
        corrupted = [d for d in domains if d.name != CLEAN]
        inputs = np.concatenate([d.inputs for d in corrupted])
        labels = np.concatenate([d.labels for d in corrupted])
        rng = domain_rng(seed, MIXED)
        index = (rng.permutation(len(labels)) if order == MIXED
                 else dirichlet_order(labels, float(value), rng))
        return [Domain(MIXED, inputs[index], labels[index]),
                *(d for d in domains if d.name == CLEAN)]
    out = []
    for d in domains:
        if d.name == CLEAN:
            out.append(d)
            continue
        rng = domain_rng(seed, d.name)
        index = (imbalanced_order(d.labels, float(value), rng) if kind == IMBALANCED
                 else dirichlet_order(d.labels, float(value), rng))
        out.append(Domain(d.name, d.inputs[index], d.labels[index]))
    return out


def imbalanced_order(labels: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Positions of `labels` shuffled, class k of a random ranking keeping the first
    round(n_k * ratio^(-k/(K-1))) of its positions (at least one): a long tail whose most
    frequent class has `ratio` times the share of the rarest.

    >>> labels = np.repeat(np.arange(3), 100)
    >>> kept = labels[imbalanced_order(labels, 100.0, np.random.default_rng(0))]
    >>> sorted(np.bincount(kept, minlength=3).tolist())
    [1, 10, 100]
    """
    classes = np.unique(labels)
    ranks = rng.permutation(len(classes))
    steps = max(len(classes) - 1, 1)
    kept = []
    for c, rank in zip(classes, ranks, strict=True):
        ids = np.flatnonzero(labels == c)
        keep = max(1, round(len(ids) * ratio ** (-rank / steps)))
        kept.append(ids[:keep])
    chosen = np.concatenate(kept)
    return chosen[rng.permutation(len(chosen))].astype(np.int64)


def mean_run_length(labels: np.ndarray) -> float:
    """The mean length of the runs of equal consecutive labels (1 when no two neighbours agree).

    >>> mean_run_length(np.array([1, 1, 2, 3, 3, 3]))
    2.0
    """
    if len(labels) == 0:
        return 0.0
    runs = 1 + int(np.count_nonzero(labels[1:] != labels[:-1]))
    return len(labels) / runs


# --- settings -----------------------------------------------------------------------------------

def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """`--set NAME=VALUE` items as {NAME: VALUE}; NAME an ADAPTD_ variable (upper-cased).

    >>> parse_sets(["adaptd_error_memory__kind=exact"])
    {'ADAPTD_ERROR_MEMORY__KIND': 'exact'}
    """
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().upper()
        if not sep or not name.startswith("ADAPTD_") or name == "ADAPTD_":
            raise ValueError(f"--set {item!r}: write ADAPTD_SECTION__FIELD=VALUE, for example "
                             "ADAPTD_ERROR_MEMORY__KIND=exact")
        if name == "ADAPTD_ADAPTER__NAME":
            raise ValueError("--set ADAPTD_ADAPTER__NAME: the methods come from --methods")
        out[name] = value
    return out


def sections(overrides: dict[str, str]) -> dict[str, Any]:
    """Environment-style overrides as `load_settings` keyword sections: ADAPTD_A__B=v is
    {"a": {"b": "v"}}. Values stay strings (pydantic reads "10", "true" and "0.1" as it reads
    the environment), but a JSON object or list is decoded, as the environment's are.

    >>> sections({"ADAPTD_ADAPTER__NORM": "balanced", "ADAPTD_ADAPTER__MEMORY__K": "10"})
    {'adapter': {'norm': 'balanced', 'memory': {'k': '10'}}}
    """
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        path = name[len("ADAPTD_"):].lower().split("__")
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {name}: {key} is set both as a value and as a section")
        parsed: Any = value
        if value.lstrip().startswith(("{", "[")):
            parsed = json.loads(value)
        node[path[-1]] = parsed
    return out


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def method_settings(method: str, norm: str, overrides: dict[str, str] | None = None,
                    **extra: object):
    """The settings of one run: adapter `method` with test-time BatchNorm `norm`, no restore,
    then the `--set` overrides (environment names) on top."""
    from service.settings import load_settings

    adapter = {"name": method, "norm": norm, "restore": False, **extra}
    return load_settings(None, **_merged({"adapter": adapter}, sections(overrides or {})))


def statistics_label(norm: str, learning: dict[str, Any]) -> str:
    """The mode column's statistics, from what the engine says it built (`/v1/state`'s
    `learning`): "robust BN", and ", graded" where the layers' momenta differ, ", runs filter"
    where the class-run filter serves."""
    momenta = learning.get("adapter", {}).get("norm_momenta") or []
    graded = ", graded" if len(set(momenta)) > 1 else ""
    runs = ", runs filter" if "runs" in learning else ""
    return f"{norm} BN{graded}{runs}"


def effective_norm(norm: str, overrides: dict[str, str] | None) -> str:
    """The BatchNorm mode a run gets: `norm`, unless --set names another."""
    return (overrides or {}).get("ADAPTD_ADAPTER__NORM", norm)


# --- runs ---------------------------------------------------------------------------------------

def _changed_share(predictions: np.ndarray, source_answer: int | None) -> float | None:
    if source_answer is None:
        return None
    return 100.0 * float((predictions != source_answer).mean())


def source_answer(image: np.ndarray) -> int:
    """What the source model (adapter `none`, no overrides) answers for one image."""
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine

    metrics = Metrics()
    engine = build_engine(method_settings("none", "robust"), metrics, EventLog(metrics))
    try:
        return int(engine.forward(image[None], adapt=False).predictions[0])
    finally:
        engine.close()


def client_requests(count: int, clients: int, request_size: int, rng: np.random.Generator
                    ) -> list[tuple[int, int, int]]:
    """One domain's samples dealt to `clients` callers, each a contiguous share in stream order
    (so each keeps the domain's runs), sent in requests of `request_size`: (client, start, end)
    in the order the service gets them, the next request drawn from a caller at random in
    proportion to the requests it has left (seeded), each caller's own in order."""
    shares = np.array_split(np.arange(count), max(1, min(clients, count)))
    queues = [[(c, int(s[i]), int(s[min(i + request_size, len(s)) - 1]) + 1)
               for i in range(0, len(s), request_size)] for c, s in enumerate(shares)]
    order = []
    while any(queues):
        left = np.array([len(q) for q in queues], dtype=np.float64)
        client = int(rng.choice(len(queues), p=left / left.sum()))
        order.append(queues[client].pop(0))
    return order


def client_group(client: int) -> str:
    return f"client-{client}"


def run_in_process(method: str, norm: str, domains: list[Domain], batch_size: int = 64, *,
                   order: str = "iid", overrides: dict[str, str] | None = None,
                   source: int | None = None, label_fraction: float = 0.0,
                   label_delay: int = 0, clients: int = 1, client_groups: bool = False,
                   seed: int = SEED) -> Result:
    """`engine.forward` on chunks of `batch_size` samples of each domain, in stream order, or
    with `clients` > 1 dealt to that many callers (`client_requests`), each request naming its
    caller's group with `client_groups`. `source`: the `repeat` order's image's source answer."""
    if label_fraction or label_delay:
        raise ValueError("labels go back through POST /v1/feedback, which only the service has: "
                         "run with --service-only, or leave --label-fraction at 0")
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine

    norm = effective_norm(norm, overrides)
    metrics = Metrics()
    engine = build_engine(method_settings(method, norm, overrides), metrics, EventLog(metrics))
    label = statistics_label(norm, engine.describe_learning())
    result = Result(method, f"in process, batch {batch_size}{_callers(clients, client_groups)}, "
                    f"{label}", norm=norm, order=order, request_size=batch_size,
                    overrides=dict(overrides or {}), clients=clients,
                    client_groups=client_groups)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    try:
        for domain in domains:
            predictions = np.empty(len(domain.labels), dtype=np.int64)
            for client, start, end in client_requests(len(domain.labels), clients, batch_size,
                                                      rng):
                named = ({"groups": [client_group(client)] * (end - start)} if client_groups
                         else {})
                predictions[start:end] = engine.forward(domain.inputs[start:end], adapt=True,
                                                        **named).predictions
            result.errors[domain.name] = 100.0 * float((predictions != domain.labels).mean())
            if domain.name == REPEAT:
                result.changed_answers = _changed_share(predictions, source)
        result.seconds = time.perf_counter() - started
        result.backward_samples = engine.adapter.backward_samples
    finally:
        engine.close()
    return result


@dataclass
class Served:
    """What the service answered over a stream."""

    predictions: dict[tuple[str, int], int]
    labels_sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def _callers(clients: int, groups: bool) -> str:
    if clients <= 1:
        return ""
    return f", {clients} callers" + (" naming their groups" if groups else "")


def run_through_service(method: str, domains: list[Domain], concurrency: int = 8,
                        port: int | None = None, *, norm: str = "robust", request_size: int = 1,
                        order: str = "iid", overrides: dict[str, str] | None = None,
                        source: int | None = None, label_fraction: float = 0.0,
                        label_delay: int = 0, seed: int = SEED, clients: int = 1,
                        client_groups: bool = False) -> Result:
    """`request_size` samples per request to a fresh `adaptd serve`, `concurrency` requests in
    flight, in order; with `label_fraction`, a seeded share of the samples get their label back
    through POST /v1/feedback once `label_delay` more samples have been predicted. With
    `clients` > 1, each domain dealt to that many callers (`client_requests`), each with one
    request in flight (so `clients` in all), naming its group with `client_groups`; the callers
    move to the next domain together."""
    import httpx

    norm = effective_norm(norm, overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env |= {"ADAPTD_ADAPTER__NAME": method, "ADAPTD_ADAPTER__NORM": norm,
            "ADAPTD_ADAPTER__RESTORE": "false", "ADAPTD_LOG_LEVEL": "warning"}
    env |= overrides or {}
    adaptd = str(Path(sys.executable).with_name("adaptd"))
    # a port nothing listens on unless one was given: with a fixed one, a second run started
    # beside the first failed to bind and measured the first run's service instead
    port = free_port() if port is None else port
    server = subprocess.Popen([adaptd, "serve", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    total = sum(len(d.labels) for d in domains)
    labelled = label_positions(total, label_fraction, seed) if label_fraction else None
    try:
        _wait_ready(base, server)
        samples = "1 sample" if request_size == 1 else f"{request_size} samples"
        learning = httpx.get(f"{base}/v1/state", timeout=10).json().get("learning", {})
        label = statistics_label(norm, learning)
        flight = clients if clients > 1 else concurrency
        result = Result(method, f"service, {samples}/request, {flight} in flight"
                        f"{_callers(clients, client_groups)}, {label}",
                        norm=norm, order=order, request_size=request_size, service=True,
                        label_fraction=label_fraction, label_delay=label_delay,
                        overrides=dict(overrides or {}), clients=clients,
                        client_groups=client_groups)
        started = time.perf_counter()
        served = asyncio.run(_send_stream(base, domains, concurrency, request_size, labelled,
                                          label_delay, clients, client_groups, seed))
        result.seconds = time.perf_counter() - started
        for domain in domains:
            got = np.array([served.predictions[(domain.name, i)]
                            for i in range(len(domain.labels))])
            result.errors[domain.name] = 100.0 * float((got != domain.labels).mean())
            if domain.name == REPEAT:
                result.changed_answers = _changed_share(got, source)
        state = httpx.get(f"{base}/v1/state", timeout=10).json()
        result.backward_samples = state["adapter"]["backward_samples"]
        result.groups_followed = (state.get("learning", {}).get("runs") or {}).get("groups", 0)
        result.labels_sent = served.labels_sent
        result.labels_joined = served.outcomes.get("joined", 0)
        result.label_outcomes = dict(served.outcomes)
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_ready(base: str, server: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"adaptd serve exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("adaptd serve was not ready within 120 s")


async def _post(client, path: str, body: dict) -> dict:
    """POST, waiting out 503s (an overloaded batcher says when to retry); other errors raise
    with the service's message."""
    for _ in range(60):
        reply = await client.post(path, json=body)
        if reply.status_code == 503:
            await asyncio.sleep(float(reply.headers.get("retry-after", 1)))
            continue
        if reply.status_code != 200:
            raise RuntimeError(f"{path} answered {reply.status_code}: {reply.text[:500]}")
        return reply.json()
    raise RuntimeError(f"{path} answered 503 for a minute")


async def _send_stream(base: str, domains: list[Domain], concurrency: int,
                       request_size: int = 1, labelled: np.ndarray | None = None,
                       delay: int = 0, clients: int = 1, client_groups: bool = False,
                       seed: int = SEED) -> Served:
    """The stream in requests of `request_size` samples (never two domains in one), `concurrency`
    in flight, or with `clients` > 1 dealt to that many callers, each sending its own in order.
    The label of stream position i in `labelled` is sent (with the id the prediction came back
    with) once every sample up to i + `delay` has been predicted."""
    import httpx

    served = Served({})
    total = sum(len(d.labels) for d in domains)
    truth = np.concatenate([d.labels for d in domains]) if domains else np.zeros(0, np.int64)
    ids: list[str | None] = [None] * total
    done = np.zeros(total, dtype=bool)
    due = list(labelled) if labelled is not None else []
    cursor = {"prefix": 0, "label": 0}  # samples predicted in a row from the start; labels sent
    if clients > 1:
        concurrency = clients  # one request in flight a caller
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        def labels_due() -> list[dict]:
            while cursor["prefix"] < total and done[cursor["prefix"]]:
                cursor["prefix"] += 1
            first = cursor["label"]
            last = first
            while last < len(due) and due[last] < cursor["prefix"] - delay:
                last += 1
            cursor["label"] = last
            return [{"id": ids[i], "label": int(truth[i])} for i in due[first:last]]

        async def one(domain: Domain, start: int, end: int, position: int,
                      group: str | None = None) -> None:
            try:
                body: dict[str, object] = {"inputs": domain.inputs[start:end].tolist()}
                if group is not None:
                    body["group"] = group
                rows = (await _post(client, "/v1/predict", body))["predictions"]
                for k, row in enumerate(rows):
                    served.predictions[(domain.name, start + k)] = row["prediction"]
                    ids[position + k] = row["id"]
                done[position:position + end - start] = True
                labels = labels_due()
                for at in range(0, len(labels), 10_000):
                    reply = await _post(client, "/v1/feedback", {"labels": labels[at:at + 10_000]})
                    served.labels_sent += len(labels[at:at + 10_000])
                    for outcome, value in reply.items():
                        count = value if isinstance(value, int) else len(value)
                        served.outcomes[outcome] = served.outcomes.get(outcome, 0) + count
            finally:
                gate.release()

        if clients > 1:
            rng = np.random.default_rng(seed)
            position = 0
            for domain in domains:
                mine: dict[int, list[tuple[int, int]]] = {}
                for caller_at, start, end in client_requests(len(domain.labels), clients,
                                                             request_size, rng):
                    mine.setdefault(caller_at, []).append((start, end))

                async def caller(client: int, requests: list[tuple[int, int]],
                                 domain: Domain = domain, at: int = position) -> None:
                    group = client_group(client) if client_groups else None
                    for start, end in requests:
                        await gate.acquire()  # released by `one`
                        await one(domain, start, end, at + start, group)

                await asyncio.gather(*(caller(c, r) for c, r in mine.items()))
                position += len(domain.labels)
            return served
        tasks = []
        position = 0
        for domain in domains:
            for start in range(0, len(domain.inputs), request_size):
                end = min(start + request_size, len(domain.inputs))
                await gate.acquire()  # keep the stream's order up to `concurrency` in flight
                tasks.append(asyncio.create_task(one(domain, start, end, position)))
                position += end - start
        await asyncio.gather(*tasks)
    return served


# --- the grid -----------------------------------------------------------------------------------

def _pairs(methods: Sequence[str], norms: Sequence[str], none_is_source: bool = True
           ) -> list[tuple[str, str, bool]]:
    """(method, norm, baseline) in run order: `none` first (added as the baseline when
    `methods` lacks it, or when `none_is_source` is false: `--set` or labels change what `none`
    serves, and the baseline is the source model as trained), then by norm and method; methods
    that use no test-time BatchNorm statistics are not run with `batch`, the robust run has
    them."""
    pairs = [(m, n, False) for n in norms for m in methods
             if not (n == "batch" and m in NO_BN_STATISTICS)]
    nones = [p for p in pairs if p[0] == "none"]
    if nones and none_is_source:
        pairs.remove(nones[0])
        return [nones[0], *pairs]
    norm = next((n for n in norms if n != "batch"), "robust")
    return [("none", norm, True), *pairs]


def compare(result: Result, baseline: Result) -> None:
    """Fill `result.worse_than_source`: corrupted domains where its error exceeds `baseline`'s."""
    result.worse_than_source = sum(
        1 for name, error in result.errors.items()
        if name != CLEAN and name in baseline.errors and error > baseline.errors[name] + 1e-9)


def run_grid(domains: list[Domain], methods: Sequence[str], norms: Sequence[str],
             orders: Sequence[str] = ("iid",), request_sizes: Sequence[int] = (64,), *,
             service: bool = False, concurrency: int = 8, seed: int = SEED,
             overrides: dict[str, str] | None = None, label_fraction: float = 0.0,
             label_delay: int = 0, progress: Callable[[Result], None] | None = None,
             port: int | None = None, clients: int = 1,
             client_groups: Sequence[bool] = (False,)) -> list[Result]:
    """Every method × norm on every order and request size, in process or through the service,
    each compared with adapter `none` on the same order and request size (run once per order
    and size, first; marked `baseline` when `methods` lacks it). With `clients` > 1 every run
    is repeated for each of `client_groups` (whether the callers name their groups); the
    baseline, which has no filter, once."""
    results = []
    for order in orders:
        ordered = order_stream(domains, order, seed)
        source = source_answer(ordered[0].inputs[0]) if parse_order(order) == REPEAT else None
        for size in request_sizes:
            baseline = None
            plain = not overrides and not label_fraction
            runs = [(m, n, b, g) for m, n, b in _pairs(methods, norms, none_is_source=plain)
                    for g in (client_groups if clients > 1 and not b else (False,))]
            for method, norm, is_baseline, groups in runs:
                # the baseline is the source model as trained: no --set, no labels
                sets = None if is_baseline else overrides
                fraction = 0.0 if is_baseline else label_fraction
                if service:
                    result = run_through_service(
                        method, ordered, concurrency, port, norm=norm, request_size=size,
                        order=order,
                        overrides=sets, source=source, label_fraction=fraction,
                        label_delay=label_delay if fraction else 0, seed=seed,
                        clients=clients, client_groups=groups)
                else:
                    result = run_in_process(method, norm, ordered, size, order=order,
                                            overrides=sets, source=source,
                                            label_fraction=fraction,
                                            label_delay=label_delay if fraction else 0,
                                            clients=clients, client_groups=groups, seed=seed)
                result.baseline = is_baseline
                baseline = baseline or result  # `none` runs first
                compare(result, baseline)
                results.append(result)
                if progress is not None:
                    progress(result)
    return results


# --- the report ---------------------------------------------------------------------------------

def _domain_names(results: Sequence[Result], domains: Sequence[Domain] | None) -> list[str]:
    """The domain columns: the stream's domains, in order, that some result has (all of them
    when none has yet), then any other a result has (the `spike` order's)."""
    names: dict[str, None] = {}
    for r in results:
        names |= dict.fromkeys(k for k in r.errors if k not in (CLEAN, REPEAT))
    if domains is None:
        return list(names)
    streamed = [d.name for d in domains if d.name not in (CLEAN, REPEAT)]
    ordered = [n for n in streamed if n in names] or ([] if names else streamed)
    return ordered + [n for n in names if n not in streamed]


def _row(r: Result, names: Sequence[str]) -> str:
    method = f"{r.method} (baseline)" if r.baseline else r.method
    worse = "—" if r.worse_than_source is None else str(r.worse_than_source)
    clean = f"{r.errors[CLEAN]:.1f}" if CLEAN in r.errors else "—"
    if r.order == REPEAT:
        changed = "—" if r.changed_answers is None else f"{r.changed_answers:.1f}"
        middle = [changed, f"{r.errors.get(REPEAT, float('nan')):.1f}"]
    else:
        middle = [f"{r.errors[n]:.1f}" if n in r.errors else "—" for n in names]
        middle.append(f"**{r.mean_error:.1f}**")
    cells = [method, r.mode, r.order, r.labels, *middle, clean, worse,
             f"{r.backward_samples:,}", f"{r.seconds:.1f}"]
    return "| " + " | ".join(cells) + " |"


def _header(middle: Sequence[str]) -> list[str]:
    header = ["method", "mode", "order", "labels", *middle, "clean after",
              "domains worse than source", "backward samples", "seconds"]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def table(results: list[Result], domains: list[Domain] | None = None) -> str:
    """The markdown table of `results`; runs of the `repeat` order in a second table, whose
    domain cells are the share of answers that differ from the source model's."""
    streamed = [r for r in results if r.order != REPEAT]
    repeated = [r for r in results if r.order == REPEAT]
    parts = []
    if streamed:
        names = _domain_names(streamed, domains)
        parts.append("\n".join([*_header([*names, "mean"]),
                                *(_row(r, names) for r in streamed)]))
    if repeated:
        middle = ["changed answers %", f"error on the image ({REPEATS:,}x)"]
        parts.append("\n".join([*_header(middle), *(_row(r, []) for r in repeated)]))
    return "\n\n".join(parts)


def _sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    sizes = [int(s) for s in text.split(",") if s]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"request sizes are positive integers, not {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list; stacks like eata+adanpc too")
    parser.add_argument("--norms", default="batch,robust",
                        help="test-time BatchNorm modes in process: batch, robust, balanced, "
                        "source (passed through as adapter.norm)")
    parser.add_argument("--service-norms", default="robust",
                        help="the same for the service runs")
    parser.add_argument("--orders", default="iid",
                        help=f"comma list of {', '.join(ORDERS)} (dirichlet:A, mixed:A: any "
                        "A > 0; imbalanced:R: any R >= 1; spike:V: any finite V)")
    parser.add_argument("--request-sizes", type=_sizes, default=None,
                        help="comma list of samples per engine.forward in process and per POST "
                        "/v1/predict through the service (default: --batch-size in process, "
                        "1 through the service)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="in process, when --request-sizes is not given")
    parser.add_argument("--service", action="store_true", help="also through the service")
    parser.add_argument("--service-only", action="store_true",
                        help="through the service only, no in-process runs")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--port", type=int, default=None,
                        help="the port of the `adaptd serve` the service runs start (default: "
                        "a free one for each run)")
    parser.add_argument("--label-fraction", type=float, default=0.0,
                        help="service only: this seeded share of the samples get their true "
                        "label back through POST /v1/feedback (default 0: no labels); needs "
                        "--service-only")
    parser.add_argument("--label-delay", type=int, default=0,
                        help="service only: a label goes back once this many more samples have "
                        "been predicted after its sample")
    parser.add_argument("--set", action="append", default=[], metavar="ADAPTD_SECTION__FIELD=V",
                        help="a service setting, as its environment variable (repeatable): the "
                        "service's environment, and in process the same as load_settings "
                        "sections, e.g. ADAPTD_ERROR_MEMORY__KIND=exact, "
                        "ADAPTD_SUPERVISED__ENABLED=true, ADAPTD_ADAPTER__NORM=balanced")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="the seed of the orders and of which samples are labelled")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in process (0: torch's default; 1 suits a shared "
                        "machine: the model is tiny)")
    parser.add_argument("--clients", type=int, default=1,
                        help="deal each domain to this many callers, each a contiguous share "
                        "(its runs kept), interleaved: in process at random, through the "
                        "service each caller with one request in flight")
    parser.add_argument("--client-groups", choices=("off", "on", "both"), default="off",
                        help="with --clients: whether each caller's requests name its group "
                        "(`group`), which the class-run filter follows apart; both: each run twice")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    methods = [m for m in args.methods.split(",") if m]
    try:
        orders = [parse_order(o) for o in args.orders.split(",") if o]
        overrides = parse_sets(args.set)
    except ValueError as error:
        parser.error(str(error))
    in_process = not args.service_only
    service = args.service or args.service_only
    labels = args.label_fraction > 0
    if not 0.0 <= args.label_fraction <= 1.0:
        parser.error("--label-fraction is a share from 0 to 1")
    if args.label_delay < 0:
        parser.error("--label-delay counts samples: 0 or more")
    if args.clients < 1:
        parser.error("--clients counts callers: 1 or more")
    named = {"off": (False,), "on": (True,), "both": (False, True)}[args.client_groups]
    if (labels or args.label_delay) and in_process:
        parser.error("labels go back through POST /v1/feedback, so only the service takes them: "
                     "add --service-only (in-process runs cannot take labels)")

    domains = stream()

    def progress(r: Result) -> None:
        print(_row(r, _domain_names([r], domains)), flush=True)

    started = time.perf_counter()
    results: list[Result] = []
    if in_process:
        results += run_grid(domains, methods, args.norms.split(","), orders,
                            args.request_sizes or [args.batch_size], seed=args.seed,
                            overrides=overrides, progress=progress, clients=args.clients,
                            client_groups=named)
    if service:
        results += run_grid(domains, methods, args.service_norms.split(","), orders,
                            args.request_sizes or [1], service=True,
                            concurrency=args.concurrency, seed=args.seed, overrides=overrides,
                            label_fraction=args.label_fraction, label_delay=args.label_delay,
                            progress=progress, port=args.port, clients=args.clients,
                            client_groups=named)
    wall = time.perf_counter() - started

    command = " ".join(["python -m bench.digits_c", *(argv if argv is not None else sys.argv[1:])])
    import torch

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{torch.get_num_threads()} torch threads in process")
    header = (f"Digits-C, {len(domains) - 1} domains x {len(domains[0].labels)} samples, "
              f"continual; error %; orders seeded {args.seed}"
              + (f"; --set {' '.join(f'{k}={v}' for k, v in overrides.items())}"
                 if overrides else "")
              + f"; {machine}, {time.strftime('%Y-%m-%d %H:%M %Z')}, wall {wall:.0f} s\n"
              f"`{command}`")
    print(f"\n{header}\n")
    print(table(results, domains))
    if args.json:
        args.json.write_text(json.dumps(
            {"header": header, "command": command, "machine": machine,
             "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": args.seed,
             "results": [asdict(r) | {"mean_error": r.mean_error} for r in results]},
            indent=1))


if __name__ == "__main__":
    main()
