"""The running service's parts, wired together at start-up and taken apart at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from adapters import Adapter, build_adapter
from adapters.conformal import CALIBRATORS
from adapters.guard import CollapseGuard, SourceComparison, effective_classes
from adapters.labels.lowrank import SupervisedStep, inject_lowrank
from adapters.labels.online_learner import AUTO as AUTO_LEARNERS
from adapters.labels.online_learner import OnlineLearner
from adapters.labels.output_corrector import OutputCorrector
from adapters.memory.adanpc import AdaNPC
from adapters.memory.error_memory import build_error_memory
from adapters.mixture import FixedShareMixture
from adapters.tta.eata import ETA
from adapters.tta.norm import (
    RobustBatchNorm,
    class_run_scales,
    grade_momenta,
    normalisation_affines,
    normalises_over_positions,
)
from adapters.tta.runs import ClassRunFilter
from service.batcher import MicroBatcher
from service.calibration import Conformal
from service.engine import (
    NEWEST_LABEL,
    RECENT_RESIDUAL,
    AnyErrorMemory,
    Engine,
    RecentInputs,
    learner_names,
)
from service.events import EventLog, json_safe
from service.feedback import FeedbackService, RollingQuality
from service.gateway import StoreGateway
from service.history import History
from service.label_stream import LabelStreamConsumer, default_consumer_name
from service.metrics import Metrics
from service.model import LoadedModel, load_model
from service.monitor import DriftMonitor
from service.predict_body import parse_worker_started
from service.predictor import PredictionRow, Predictor
from service.reference import (
    ReferenceData,
    feature_width,
    load_reference_data,
    served_entropy,
    source_features,
    source_predictions,
)
from service.settings import TABULAR_FEATURES, Settings
from service.state_sync import StateSync
from store import MemoryStore, Store, StoreUnavailable, open_store

log = logging.getLogger("adaptd")

DRIFT_STATE = "drift"
# the mixture's newest label as a replica joined it last, saved with the drift state: a restart
# or a new replica starts its newest-label candidate there, not at the reference data's last
MIXTURE_STATE = "mixture"
PARSE_PROCESS_TRIES = 3  # parse processes started and failed before large bodies stay here


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    model: LoadedModel
    adapter: Adapter
    engine: Engine
    store: StoreGateway
    sync: StateSync
    batcher: MicroBatcher[PredictionRow]
    feedback: FeedbackService
    quality: RollingQuality
    events: EventLog
    stream: LabelStreamConsumer | None = None
    conformal: Conformal | None = None
    history: History = field(default_factory=History)
    _chores: asyncio.Task[None] | None = None
    _checkpointed: tuple[int, ...] = (0,)
    _newest_saved: int = 0  # `engine.newest_joins` when the newest label was saved last
    _parsers: ProcessPoolExecutor | None = None
    _parser_failures: int = 0
    _stopping: bool = False

    def parse_process(self, body_bytes: int) -> ProcessPoolExecutor | None:
        """The process a body of this size is parsed in (started at the first such body), or
        None: parse it here. A parse holds this process's GIL for its whole length (25 ms for a
        64-image ResNet body of 4 MB), and the engine thread needs the GIL between the model's
        operations: a forward pass ran at 211 samples/s instead of 1,873 while another thread
        parsed such bodies, and at 1,988 while another process did (BENCHMARKS.md B4). Event
        loop only."""
        threshold = self.settings.batcher.parse_process_bytes
        if (threshold is None or body_bytes <= threshold or self._stopping
                or self._parser_failures >= PARSE_PROCESS_TRIES
                or len(os.sched_getaffinity(0)) < 2):
            return None
        if self._parsers is None:
            # spawn, not fork: this process runs threads (the engine's, torch's)
            self._parsers = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"),
                initializer=parse_worker_started)
        return self._parsers

    def parse_process_failed(self, parsers: ProcessPoolExecutor, error: BaseException) -> None:
        """`parsers` could not start or died (the OS killed it): a new one starts at the next
        large body, up to PARSE_PROCESS_TRIES in all; then every body is parsed here. A report
        about a pool already replaced changes nothing."""
        if parsers is not self._parsers:
            return
        self._parsers = None
        parsers.shutdown(wait=False, cancel_futures=True)
        self._parser_failures += 1
        if self._parser_failures >= PARSE_PROCESS_TRIES:
            log.error("the parse process failed %d times (last: %r); large bodies are parsed in "
                      "this process from now on", self._parser_failures, error)
        else:
            log.warning("the parse process failed (%r); a new one starts at the next large "
                        "body", error)

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Runtime:
        events = EventLog(metrics, replica=settings.feedback.stream_consumer
                          or default_consumer_name())
        torch.set_num_threads(torch_threads(settings))  # for the process: the engine's and all
        engine = await asyncio.to_thread(build_engine, settings, metrics, events)
        settings = engine.settings or settings  # `auto` made concrete for the model
        model, adapter = engine.model, engine.adapter
        store = StoreGateway(_open_store(settings), metrics)
        if isinstance(store.raw, MemoryStore):
            log.info("in-process store: %d MiB reserved for up to %d records of %d MiB "
                     "(store.max_records, store.max_bytes) and their ids",
                     store.raw.reserved_bytes >> 20, settings.store.max_records,
                     settings.store.max_bytes >> 20)
        await asyncio.to_thread(_load_snapshot, settings, store)
        learnt = settings.adapter.restore and await _restore_adapter(engine, store)
        if engine.drift is not None:
            await _restore_drift(engine, store)
        await _restore_newest_label(engine, store)
        persisted = persisted_memories(settings, engine)
        for memory in engine.memories():
            if memory.name in persisted:
                reloaded = await _reload_memory(engine, store, memory)
                # AdaNPC's vote counts from 0 again whatever its rows: only the error memory's
                # rows change what it serves before a label
                learnt = learnt or (reloaded and memory is engine.error_memory)
        if learnt and engine.mixture is not None:
            # what was learnt before this start makes the stages differ from the source before
            # any label: the source goes to the floor, as beside an adapter (_mixture)
            await engine.run(engine.mixture.lower, "source")
        conformal = _conformal(settings, engine, store, reference_max_scale(settings, engine))
        if conformal is not None:
            await conformal.refresh()
            if not store.up:
                log.warning("the store is unreachable: sets start from the calibrator as built")
        sync = StateSync(engine, store, persisted, conformal)
        predictor = Predictor(engine, sync, store, metrics, conformal)
        batcher: MicroBatcher[PredictionRow] = MicroBatcher(
            predictor.run_batch,
            predictor.run_alone,
            max_batch_size=settings.batcher.max_batch_size,
            max_wait_ms=settings.batcher.max_wait_ms,
            metrics=metrics,
            max_queued_samples=settings.batcher.queued_samples_limit,
            max_inflight_requests=settings.batcher.max_inflight_requests,
        )
        batcher.start()
        quality = RollingQuality(settings.feedback.rolling_window)
        history = History()
        feedback = FeedbackService(store, sync, metrics, quality, engine, persisted, conformal,
                                   history)
        stream = None
        if settings.feedback.stream:
            stream = LabelStreamConsumer(store, feedback, model, settings.feedback, metrics)
            stream.start()
        log.info("serving %s (%s, adapter %s) on the %s store", model.version, model.task,
                 settings.adapter.name, store.backend)
        log.info("learning: %s", json.dumps(json_safe(engine.describe_learning())))
        log.info("torch computes on %d thread(s) (torch_threads)", torch.get_num_threads())
        for warning in engine.warnings:
            log.warning("inert: %s", warning)
        runtime = cls(settings, metrics, model, adapter, engine, store, sync, batcher, feedback,
                      quality, events, stream, conformal, history)
        runtime._checkpointed = await engine.run(engine.learned_version)
        runtime._chores = asyncio.create_task(runtime._keep_state(), name="adaptd-state")
        return runtime

    async def flush_events(self) -> None:
        """Hand new events to the store's shared log (kept for the next try if it is down)."""
        events = self.events.take_unsaved()
        if not events:
            return
        try:
            await self.store.append_events(events, self.settings.drift.events_kept)
        except StoreUnavailable:
            self.events.put_back(events)

    async def save_drift(self) -> None:
        """Save the drift detectors' and policy's state, so a restart resumes them."""
        if self.engine.drift is None:
            return
        state = await self.engine.run(self.engine.drift.state)
        blob = json.dumps(json_safe(state), separators=(",", ":")).encode()
        try:
            await self.store.save_state(DRIFT_STATE, blob)
        except StoreUnavailable:
            pass

    async def save_newest_label(self) -> None:
        """Save the newest label this process joined, so a restart or a new replica's mixture
        starts its newest-label candidate there (`MIXTURE_STATE`)."""
        # only when a label was joined here since the last save: the key is the last writer's,
        # and a replica whose labels stopped would otherwise overwrite a newer one another saved
        joins = self.engine.newest_joins
        if joins == self._newest_saved:
            return
        row = await self.engine.run(self.engine.newest_label_row)
        if row is None:
            return
        blob = json.dumps({"newest_label": row}, separators=(",", ":")).encode()
        try:
            await self.store.save_state(MIXTURE_STATE, blob)
        except StoreUnavailable:
            return
        self._newest_saved = joins

    async def checkpoint(self) -> tuple[int, int]:
        """Save the learned state to the store as a new version; returns the version and its
        size in bytes. Raises `StoreUnavailable`."""
        learned = await self.engine.run(self.engine.learned_version)
        blob = await self.engine.run(self.engine.checkpoint)
        version = await self.store.save_adapter(blob)
        self._checkpointed = learned
        return version, len(blob)

    async def _checkpoint_if_learned(self) -> None:
        if not self.settings.adapter.checkpoint_every_s:
            return
        if await self.engine.run(self.engine.learned_version) == self._checkpointed:
            return
        try:
            await self.checkpoint()
        except StoreUnavailable as error:
            log.warning("adapter checkpoint not saved: %s", error)

    async def write_snapshot(self) -> None:
        """The in-process store's lasting state to its snapshot file, if one is configured."""
        path = self.settings.store.snapshot_path
        if path is not None:
            await asyncio.to_thread(_write_snapshot, path, self.store)

    async def _keep_state(self) -> None:
        """Every second: events to the store; every drift.save_every_s: the drift state and the
        mixture's newest label; every store.snapshot_every_s: the embedded store's snapshot."""
        saved_at = snapshot_at = checkpoint_at = time.monotonic()
        checkpoint_every = self.settings.adapter.checkpoint_every_s
        while True:
            await asyncio.sleep(1.0)
            await self._chore("send events to the store", self.flush_events)
            # what the engine changed while the store was away
            await self._chore("write the engine's changes to the store", self.sync.flush)
            due = checkpoint_every > 0 and time.monotonic() - checkpoint_at >= checkpoint_every
            if due:
                checkpoint_at = time.monotonic()
                await self._chore("checkpoint the adapter", self._checkpoint_if_learned)
            if time.monotonic() - saved_at >= self.settings.drift.save_every_s:
                saved_at = time.monotonic()
                await self._chore("save the drift state", self.save_drift)
                await self._chore("save the newest label", self.save_newest_label)
            if time.monotonic() - snapshot_at >= self.settings.store.snapshot_every_s:
                snapshot_at = time.monotonic()
                await self._chore("write the store snapshot", self.write_snapshot)

    async def _chore(self, what: str, chore: Callable[[], Awaitable[object]]) -> None:
        """One chore; a failure is logged and the chore runs again at its next turn, so one bad
        moment never stops the others (or this one) for the rest of the process's life."""
        try:
            await chore()
        except Exception:
            log.exception("could not %s; trying again at its next turn", what)

    async def stop(self) -> None:
        """Take the parts apart and save what must outlive the process. Every step runs even
        when one before it failed (a failure is logged with its traceback), so a crashed label
        consumer or a full store never costs the checkpoint or the snapshot."""
        self._stopping = True  # a body that arrives from now on starts no parse process
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("stop the label stream consumer", self._stop_stream),
            ("stop the state chores", self._stop_chores),
            ("stop the batcher", self.batcher.stop),
            ("hand events to the store", self.flush_events),
            ("save the drift state", self.save_drift),
            ("save the newest label", self.save_newest_label),
            ("save the adapter checkpoint", self._checkpoint_if_learned),
            ("write the store snapshot", self.write_snapshot),
            ("close the engine", self._close_engine),
            ("close the store", self._close_store),
            ("stop the parse process", self._stop_parsers),
        ]
        for what, step in steps:
            try:
                await step()
            except Exception:
                log.exception("at stop, could not %s; going on with the rest", what)

    async def _stop_stream(self) -> None:
        if self.stream is not None:
            await self.stream.stop()

    async def _stop_chores(self) -> None:
        if self._chores is not None:
            self._chores.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._chores

    async def _close_engine(self) -> None:
        self.engine.close()

    async def _close_store(self) -> None:
        self.store.close()

    async def _stop_parsers(self) -> None:
        if self._parsers is not None:
            parsers, self._parsers = self._parsers, None
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(parsers.shutdown, wait=True, cancel_futures=True), 10.0)
            except TimeoutError:
                log.error("the parse process did not stop within 10 s; leaving it")


def build_engine(settings: Settings, metrics: Metrics, events: EventLog) -> Engine:
    """The model, its reference data, the adapter and the guard, composed as the service runs
    them (the benchmarks build theirs here too, so what they measure is what is served)."""
    model = load_model(settings.model)
    settings = resolve_auto(settings, model)
    reference = load_reference_data(settings, model)
    # the shadow: the source model as loaded, before any part changes it (or hooks into it);
    # where nothing changes the model itself (no adapter, no supervised step: what learns acts on
    # its outputs), the served module is its own source and no copy or second forward is needed
    learns = _learns(settings)
    source = None
    if learns and settings.shadow.enabled:
        changes_model = settings.adapter.method != "none" or settings.supervised.enabled
        source = _source_copy(model) if changes_model else model.module
    spread = _source_spread(model, reference)
    guard = _collapse_guard(settings, model, reference, spread, source is not None) if (
        learns) else None
    adanpc = _adanpc(settings, model, reference)  # seeded by the source model, before adaptation
    error_memory = _error_memory(settings, model, reference)
    output_corrector = _output_corrector(settings, model, reference)
    # injects its low-rank layers before the adapter
    supervised = _supervised(settings, model, reference)
    _grade(settings, model, reference)
    try:
        adapter = build_adapter(
            settings.adapter, model.module, model.task, num_classes=model.num_classes,
            reference=None if reference is None else reference.inputs,
        )
    except ValueError as error:
        if reference is None and "reference" in str(error):
            raise ValueError(
                f"adapter {settings.adapter.method!r} needs in-distribution reference data: set "
                "model.reference_data to a safetensors file with an `inputs` tensor "
                "(N, *input_shape)"
            ) from error
        raise
    drift = (DriftMonitor(settings.drift, model.task, metrics, events)
             if settings.drift.enabled else None)
    engine = Engine(model, adapter, metrics, events, guard=guard, adanpc=adanpc,
                    error_memory=error_memory, output_corrector=output_corrector,
                    supervised=supervised, supervised_batch=settings.supervised.batch_size,
                    drift=drift, source=source, comparison=_comparison(settings, model, spread),
                    mixture=_mixture(settings, source is not None, model, spread),
                    online=_online_learners(settings, model, reference),
                    # only what learns without labels needs to know a repeat (labels teach as ever)
                    recent=RecentInputs(settings.adapter.repeat_memory) if (
                        settings.adapter.name != "none" and settings.adapter.repeat_memory)
                    else None,
                    runs=_runs(settings, model, adapter),
                    memory_wakes_on_labels=settings.error_memory.kind == "auto")
    if (settings.mixture.newest_from_reference and reference is not None
            and reference.last_label is not None
            and engine.seed_newest_label(reference.last_label)):
        log.info("mixture: the newest label starts as the reference data's last")
    engine.warnings = inert_settings(settings, engine, reference)
    engine.settings = settings
    return engine


def resolve_auto(settings: Settings, model: LoadedModel) -> Settings:
    """`settings` with `adapter.name = "auto"` made concrete for `model`: `bn` where a BatchNorm
    layer normalises over positions (a convolutional network: B1's digits went from 71% to 44%
    wrong), `none` otherwise (a tabular MLP's BatchNorm1d: on 10 of B6's 14 streams test-time
    statistics served worse than the model as trained). Stacked memories stay ('auto+adanpc').
    `error_memory.kind = "auto"` stays (an exact memory that waits for its first label) where
    the model has features to key it by, and becomes "off" where it has no nn.Linear. The
    mixture's `auto` settings are made concrete by `_resolve_mixture`."""
    if settings.error_memory.kind == "auto" and feature_width(model) is None:
        settings = settings.model_copy(update={"error_memory": settings.error_memory.model_copy(
            update={"kind": "off"})})
    first, *rest = settings.adapter.name.split("+")
    if first == "auto":  # first: the mixture's recent residual depends on whether it adapts
        spatial = normalises_over_positions(model.module, model.input_shape)
        name = "+".join((["bn"] if spatial else []) + rest) or "none"
        log.info("adapter auto: %s (%s)", name, "a BatchNorm layer normalises over positions"
                 if spatial else "no BatchNorm layer normalises over positions")
        settings = settings.model_copy(update={"adapter": settings.adapter.model_copy(
            update={"name": name})})
    return _resolve_mixture(settings, model)


def tabular(model: LoadedModel) -> bool:
    """Whether each sample is one vector of at most `TABULAR_FEATURES` numbers."""
    return len(model.input_shape) == 1 and model.input_shape[0] <= TABULAR_FEATURES


def _resolve_mixture(settings: Settings, model: LoadedModel) -> Settings:
    """`mixture.enabled = "auto"` (the default): on for a tabular model where River's learners
    are candidates; `mixture.learner = "auto"` (the default): River's Hoeffding adaptive tree
    and Hoeffding tree, each a candidate, for a tabular model they can learn (a classifier, or
    a regressor of one value) under `mixture.enabled = "auto"`, else off (`enabled = true` mixes
    the stages alone, as before `auto`). B6 measured the model and HAT ahead of River's
    Hoeffding tree on 13 of 14 streams with labels at once and on 11 of 14 with labels 100 late
    (BENCHMARKS.md), where the model alone was behind it on 8 of 14; with HT as a candidate too
    the mixture was ahead of that pair on 31 of B6's 56 runs and behind on 13 (stop 33). With
    classes in runs and labels 100 late one rate (η = 2) served bananas 7.7 points worse
    than the model alone; the two rates judged on what they served (`mixture.eta`) hold that to
    1.3 (0.3 over the last half). ARF was further ahead on most streams and costs
    three times as much a sample, and fell behind the model with classes in runs and labels
    late, so it is the recipe for labels that come back promptly, not the default."""
    m = settings.mixture
    rows = tabular(model)
    learnable = (model.num_classes or 0) >= 2 if model.task.discrete else model.width == 1
    learner = m.learner
    if learner == "auto":  # only with the mixture's own auto: `true` keeps its stages alone
        learner = list(AUTO_LEARNERS) if rows and learnable and m.enabled == "auto" else "off"
    # auto never turns the mixture on for images: a learner named there is said inert
    enabled = m.enabled if m.enabled != "auto" else rows and learner != "off"
    if (learner, enabled) != (m.learner, m.enabled):
        why = (f"not a tabular model: input_shape {list(model.input_shape)}, where a tabular "
               f"one is one dimension of at most {TABULAR_FEATURES}" if not rows else
               f"a tabular model of {model.input_shape[0]} features" if learnable else
               f"a tabular model, but River's regressors predict one value and it predicts "
               f"{model.width}")
        log.info("mixture: %s, learner %s (%s)", "on" if enabled else "off", learner, why)
    return settings.model_copy(update={"mixture": m.model_copy(
        update={"learner": learner, "enabled": enabled, "newest_label": newest_label(settings),
                "recent_residual": recent_residual(settings)})})


def torch_threads(settings: Settings) -> int:
    """`torch_threads`, or one fewer than the CPUs this process may run on (at least 1): the
    event loop and the parsing threads keep a core while the model computes. torch's own
    default, every core, costs single-sample forwards most where the cores are busy (B4)."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    return max(1, len(os.sched_getaffinity(0)) - 1)


def mixture_candidates(settings: Settings, shadow: bool) -> list[str]:
    """The newest label (with `mixture.newest_label`), River's online learners (with
    `mixture.learner`), then the stages of this pipeline that
    differ: the source (with its copy), the adapted model (when an adapter changes it), the
    compensated outputs (AdaNPC, the corrector, the error memory). The last is what learns."""
    stages = ["source"] if shadow else []
    if settings.adapter.method != "none" or settings.supervised.enabled:
        stages.append("adapted")
    if (settings.adapter.memories or settings.error_memory.kind != "off"
            or settings.output_corrector.enabled):
        stages.append("compensated")
    if not stages:  # nothing learns and no shadow: the model as served is the one stage
        stages = ["adapted"]
    learners = learner_names(settings.mixture.learners)
    return ([NEWEST_LABEL] if newest_label(settings) != "off" else []) + (
        [RECENT_RESIDUAL] if recent_residual(settings) == "on" else []) + learners + stages


def recent_residual(settings: Settings) -> str:
    """`mixture.recent_residual` as built: `auto` is on for a regressor whose last stage is the
    model as trained (B6 through the service: MAE lower on 13 of its 20 regressor runs, higher
    on 4), off for a classifier and wherever something changes the model (an adapter, the
    supervised step, the output corrector, the error memory): the residuals are of the last
    stage as it served, and where it learns from labels they are stale once it has learnt
    them, so the candidate corrects twice (B6: the supervised recipe with the drift policy's
    boosts served TrumpApproval 8.8% worse than with the policy off, and the candidate off
    0.7%)."""
    residual = settings.mixture.recent_residual
    if residual == "on" and settings.model.task != "regression":
        raise ValueError("mixture.recent_residual = 'on' adds a regressor's mean residual to its "
                         "values; a classifier has none: set it to 'auto' or 'off'")
    if residual != "auto":
        return residual
    learns = (settings.adapter.method != "none" or settings.supervised.enabled
              or settings.output_corrector.enabled or settings.error_memory.kind != "off")
    return "on" if settings.model.task == "regression" and not learns else "off"


def newest_label(settings: Settings) -> str:
    """`mixture.newest_label` as built (`_resolve_mixture` makes it concrete at start-up):
    `auto` is on for a regressor, whose level persists, and on probation for a tabular
    classifier, whose classes persist only where they come in runs, and whose newest label is
    then wrong for as long as the label delay after each change (B6, where it was measured);
    off for any other classifier (an image model's mixture, set on by hand, keeps to its
    stages)."""
    newest = settings.mixture.newest_label
    if newest != "auto":
        return newest
    if settings.model.task == "regression":
        return "on"
    shape = settings.model.input_shape
    return "probation" if len(shape) == 1 and shape[0] <= TABULAR_FEATURES else "off"


def _graded(settings: Settings, model: LoadedModel, reference: ReferenceData | None) -> bool:
    """Whether robust BN layers move by graded momenta: `adapter.norm_layers` graded (or auto)
    for a classifier, robust statistics that move per sample (not `none`, whose model keeps its
    own, nor RoTTA, whose memory moves them) and reference data to measure the grades on."""
    return (settings.adapter.norm_layers != "same" and settings.adapter.norm == "robust"
            and settings.adapter.method not in ("none", "rotta")
            and model.task.discrete and reference is not None)


def _grade(settings: Settings, model: LoadedModel, reference: ReferenceData | None) -> None:
    """Mark the model's BatchNorm layers with their momentum scales (`_graded`), or with none.
    A model whose layers cannot be measured (a layer that no forward reaches, or one reached
    twice) keeps the same momentum everywhere, said in the log."""
    scales = None
    if _graded(settings, model, reference):
        assert reference is not None
        try:
            scales = class_run_scales(model.module, reference.inputs, reference.labels)
        except (RuntimeError, ValueError, IndexError) as error:
            log.warning("adapter.norm_layers: the reference data could not grade this model's "
                        "BatchNorm layers (%s); every layer moves by norm_momentum", error)
    grade_momenta(model.module, scales)


def _runs(settings: Settings, model: LoadedModel, adapter: Adapter) -> ClassRunFilter | None:
    """The class-run filter, for a classifier with `adapter.runs = "filter"`, or `auto` and an
    adapter that changes the model (test-time BatchNorm statistics or a gradient step: over the
    source model alone the filter lost on B1). A regressor has no classes to run:
    `inert_settings` says so when the filter was asked for."""
    classes = model.num_classes or 0
    statistics = settings.adapter.method != "none" and settings.adapter.norm != "source" and any(
        isinstance(m, (RobustBatchNorm, _BatchNorm)) for m in model.module.modules())
    adapts = adapter.learning_rate > 0 or statistics
    wanted = settings.adapter.runs == "filter" or (settings.adapter.runs == "auto" and adapts)
    if not wanted or not model.task.discrete or classes < 2:
        return None
    return ClassRunFilter(classes, window=settings.adapter.runs_window,
                          groups=settings.adapter.runs_groups,
                          settle_rows=settings.adapter.runs_settle)


def _mixture(settings: Settings, shadow: bool, model: LoadedModel, spread: np.ndarray | None
             ) -> FixedShareMixture | None:
    m = settings.mixture
    names = mixture_candidates(settings, shadow)
    if not m.enabled or len(names) < 2:
        return None
    scale = _loss_scale(model, spread)
    # with an adapter the source starts at the floor: until labels say otherwise what is served
    # is what this configuration makes, the adapter's answers. Where only labels change the
    # model (the supervised step, adapter none) the source and the adapted model agree until the
    # first label, and the source starts level with it, so that the mixture can return to the
    # model as trained as soon as labels show what was learnt worse (SP500 with its target in
    # runs, labels 100 late: 0.810 from the floor, 0.700 level; BENCHMARKS.md B6, stop 30).
    # The newest label and the online learner serve nothing before the first label; then they
    # start at a prior of 0.05 each
    # (adapters.mixture.UNTRIED), neither half the say against one stage while the first labels
    # of mixed predictions are on their way (labels late) nor the floor, from which a regressor
    # needed hundreds of labels to raise them (BENCHMARKS.md B6, stop 29). Until then each
    # repeats the last stage (engine._mixed), so what is served without labels is unchanged
    # where the stages agree before labels, as they do on a fresh start: nothing but labels
    # separates them (a checkpoint restored or the error memory's rows reloaded at start do:
    # `Runtime.start` then lowers the source to the floor)
    return FixedShareMixture(names, eta=m.eta, share=m.share,
                             scale=1.0 if scale is None else scale,
                             start_low=("source",) if settings.adapter.method != "none" else (),
                             start_untried=(NEWEST_LABEL, RECENT_RESIDUAL,
                                            *learner_names(settings.mixture.learners)),
                             probation=(NEWEST_LABEL,) if NEWEST_LABEL in names
                             and newest_label(settings) == "probation" else ())


def _online_learners(settings: Settings, model: LoadedModel, reference: ReferenceData | None
                     ) -> dict[str, OnlineLearner]:
    """River's learners, each a candidate of the mixture (`mixture.learner`) by its name, where
    the mixture is on (a fixed seed, 42, for their random parts); each first learns the
    reference data where that has labels, as the model did, so it does not start from
    nothing."""
    kinds = settings.mixture.learners
    if not kinds or not settings.mixture.enabled:
        return {}
    regression = not model.task.discrete
    learners = {}
    for name, kind in zip(learner_names(kinds), kinds, strict=True):
        learner = OnlineLearner(kind, regression,
                                model.width if regression else int(model.num_classes or 0))
        if reference is not None and reference.labels is not None:
            learner.learn(reference.inputs.numpy(), reference.labels.numpy())
            log.info("mixture.learner %s: learnt %d labelled reference rows", learner.kind,
                     learner.learnt)
        learners[name] = learner
    return learners


def inert_settings(settings: Settings, engine: Engine, reference: ReferenceData | None
                   ) -> list[str]:
    """What this configuration sets up that will do nothing, each said in one sentence with
    what to change: the start-up log warns of them and `/v1/state` lists them."""
    said: list[str] = []
    adapter, policy = engine.adapter, settings.drift.policy
    if isinstance(adapter, ETA) and reference is not None:
        source = engine.source_module()  # never the served model: a forward moves its statistics
        with torch.inference_mode():
            outputs = torch.cat([source(reference.inputs[i:i + 256]).float()
                                 for i in range(0, len(reference.inputs), 256)])
        rate = adapter.selection_rate(outputs, settings.adapter.adapt_batch_size)
        if rate < 0.05:
            said.append(
                f"{adapter.name}'s filters select {rate:.1%} of the reference data's samples "
                f"(d_margin {adapter.d_margin} with {adapter.num_classes} classes): it will "
                "rarely step and serves like bn; set adapter.options.d_margin higher (1.0 turns "
                "the redundancy filter off) or choose bn")
    s = settings.supervised
    if not s.enabled and (s.replay or s.reference_batch or s.average or s.train == "all"):
        said.append("supervised.train, replay, reference_batch and average shape the "
                    "supervised step, which is off: set supervised.enabled = true")
    if s.enabled and s.reference_batch and settings.adapter.norm == "batch":
        said.append("supervised.reference_batch normalises the reference samples by the "
                    "source's statistics, which adapter.norm = 'batch' does not keep: each "
                    "reference batch is normalised by itself")
    if settings.mixture.learners and not engine.online:
        said.append(f"mixture.learner = {settings.mixture.learner!r} names candidates of the "
                    "mixture, which is off: set mixture.enabled = true")
    if settings.mixture.enabled and engine.mixture is None:
        names = mixture_candidates(settings, engine.source is not None)
        said.append(f"mixture.enabled has {len(names)} candidate(s) ({', '.join(names) or 'none'})"
                    ": it needs two of the newest label (mixture.newest_label), River's "
                    "learners (mixture.learner, for a tabular model), the source "
                    "(shadow.enabled), an adapter other than none or the supervised step, and a "
                    "memory or the output corrector")
    if settings.adapter.norm == "balanced":
        statistics = getattr(adapter, "statistics", None)
        if not engine.task.discrete:
            said.append("adapter.norm = 'balanced' balances the statistics over predicted "
                        "classes, and a regressor has none: it runs as 'robust'; set norm 'robust'")
        elif adapter.name in ("none", "rotta"):
            said.append(f"adapter.norm = 'balanced' does nothing for adapter {adapter.name!r}, "
                        "which keeps its own statistics (none: the source's)")
        elif statistics is not None and not statistics.layers:
            said.append("adapter.norm = 'balanced' has no BatchNorm layer to balance in this "
                        "model; set norm 'robust'")
    if settings.adapter.norm_layers == "graded" and not _graded(settings, engine.model,
                                                                reference):
        said.append("adapter.norm_layers = 'graded' measures how far a run of one class drags "
                    "each layer, which needs a classifier, adapter.norm = 'robust', an adapter "
                    "whose statistics move per sample (not none or rotta) and "
                    "model.reference_data: every layer moves by norm_momentum")
    if settings.adapter.runs == "filter" and engine.runs is None:
        said.append("adapter.runs = 'filter' follows runs of classes, and a regressor (or a "
                    "one-class model) has none: set adapter.runs 'off'")
    if adapter.name == "bn" and not any(isinstance(m, RobustBatchNorm)
                                        for m in engine.model.module.modules()) \
            and settings.adapter.norm in ("robust", "balanced"):
        said.append("adapter bn finds no BatchNorm layer with running statistics in this model: "
                    "it serves the model as trained; set adapter none, or choose a method that "
                    "learns by gradient")
    if adapter.name == "bn" and settings.adapter.norm == "source":
        said.append("adapter bn with adapter.norm = 'source' keeps the training statistics: it "
                    "serves the source model; choose norm 'robust' or adapter 'none'")
    actions = set(policy.label_free_actions) | set(policy.labelled_actions)
    if settings.drift.enabled:
        rates = [part.learning_rate for part in engine.learners() if part.learning_rate > 0]
        if "boost_lr" in actions and (not rates or all(
                rate * policy.boost > settings.adapter.max_learning_rate for rate in rates)):
            said.append("drift action boost_lr " + (
                "has no learning rate to raise: nothing learns by gradient" if not rates else
                f"is capped at adapter.max_learning_rate ({settings.adapter.max_learning_rate}): "
                f"every rate × boost {policy.boost} exceeds it"))
        if "trim_memory" in actions and not engine.memories():
            said.append("drift action trim_memory has no memory to trim (no adanpc, no "
                        "error_memory)")
        if "reset_adapter" in actions and not _learns(settings):
            said.append("drift action reset_adapter has nothing to reset: nothing learns")
        if "reset_calibrator" in actions and settings.conformal.method == "off":
            said.append("drift action reset_calibrator has no calibrator: conformal is off")
    return said


def _learns(settings: Settings) -> bool:
    """Whether anything can make what is served differ from the source model."""
    return (settings.adapter.name != "none" or settings.error_memory.kind != "off"
            or settings.supervised.enabled or settings.output_corrector.enabled)


def _source_copy(model: LoadedModel) -> torch.nn.Module:
    try:
        return copy.deepcopy(model.module).eval().requires_grad_(False)
    except Exception as error:  # any: a module that will not copy, whatever it raises
        raise ValueError(f"the source copy the guards run beside the model cannot be made "
                         f"({type(error).__name__}: {error}); set shadow.enabled = false"
                         ) from error


def _source_spread(model: LoadedModel, reference: ReferenceData | None) -> np.ndarray | None:
    """A regressor's spread per output on the reference data, from the source model as loaded
    (None for a classifier, or without reference data)."""
    if model.task.discrete or reference is None:
        return None
    with torch.inference_mode():
        values = torch.cat([model.module(reference.inputs[i:i + 256]).float()
                            for i in range(0, len(reference.inputs), 256)])
    return values.reshape(len(values), -1).std(0).numpy().astype(np.float64)


def _loss_scale(model: LoadedModel, spread: np.ndarray | None) -> float | None:
    """A regressor's loss scale s in |e| / (|e| + s): the source's mean spread per output on the
    reference data, 1 without it; None for a classifier (0/1 errors)."""
    if model.task.discrete:
        return None
    return float(spread.mean()) if spread is not None and spread.mean() > 0 else 1.0


def _comparison(settings: Settings, model: LoadedModel, spread: np.ndarray | None
                ) -> SourceComparison:
    s = settings.shadow
    return SourceComparison(window=s.window, min_labels=s.min_labels, evidence=s.evidence,
                            scale=_loss_scale(model, spread))


def _error_memory(settings: Settings, model: LoadedModel, reference: ReferenceData | None
                  ) -> AnyErrorMemory | None:
    """ReLoop2's error memory, keyed by the model's features (centred on the reference data's)."""
    c = settings.error_memory
    if c.kind == "off":
        return None
    features = source_features(model, reference) if reference is not None else None
    width = features.shape[1] if features is not None else feature_width(model)
    if width is None:
        raise ValueError("the error memory is keyed by the features entering the last "
                         "nn.Linear, and the model has none: set error_memory.kind = 'off'")
    kind = "exact" if c.kind == "auto" else c.kind
    options: dict[str, object] = {"feature_dim": width, "task": model.task,
                                  "output_dim": model.num_classes or model.num_outputs,
                                  "gamma": c.gamma, "compensation_weight": c.weight,
                                  "capacity": c.capacity}
    if kind == "exact":
        options.update(k=c.k, temperature=c.temperature, half_life=c.half_life)
    elif c.half_life is not None:
        raise ValueError("error_memory.half_life weighs the exact memory's rows by age; the "
                         "hashed memory keeps sums per bucket, not rows: set kind = 'exact' or "
                         "unset half_life")
    clash = sorted(set(c.options) & (set(options) | {"feature_mean"}))
    if clash:
        raise ValueError(f"error_memory.options {clash}: set these as [error_memory] keys (or "
                         "they come from the model); options are the hashed memory's own knobs")
    options.update(c.options)
    if c.center and features is not None:
        options["feature_mean"] = features.mean(0)
    return build_error_memory(kind, **options)


def _output_corrector(settings: Settings, model: LoadedModel, reference: ReferenceData | None
                      ) -> OutputCorrector | None:
    """ADCSD's output corrector for a regressor, standardised like the source model's outputs."""
    c = settings.output_corrector
    if not c.enabled:
        return None
    width = feature_width(model) if c.use_features else 0
    mean, scale = 0.0, 1.0
    if reference is not None:
        with torch.inference_mode():
            values = torch.cat([model.module(reference.inputs[i:i + 256]).float()
                                for i in range(0, len(reference.inputs), 256)])
        mean, scale = float(values.mean()), float(values.std()) or 1.0
    return OutputCorrector(output_dim=model.num_outputs, feature_dim=width or 0, hidden=c.hidden,
                           learning_rate=c.learning_rate, steps=c.steps, window=c.window,
                           loss=c.loss, output_mean=mean, output_scale=scale,
                           max_learning_rate=settings.adapter.max_learning_rate)


def _supervised(settings: Settings, model: LoadedModel, reference: ReferenceData | None
                ) -> SupervisedStep | None:
    """The supervised step on labels: normalisation affines where the model has them (auto), a
    low-rank adapter injected beside its last linear layers, or every parameter; with replay and
    the reference data's labelled samples where configured."""
    s = settings.supervised
    if not s.enabled:
        return None
    has_norm = bool(normalisation_affines(model.module)[0])
    train = s.train if s.train != "auto" else ("norm" if has_norm else "lowrank")
    if train == "norm" and not has_norm:
        raise ValueError("supervised.train = 'norm', but the model has no normalisation "
                         "layer: use 'lowrank' (or 'auto')")
    rehearsed = None
    if s.reference_batch:
        if reference is None or reference.labels is None:
            raise ValueError("supervised.reference_batch needs labelled reference data: set "
                             "model.reference_data to a safetensors file with `inputs` and "
                             "`labels`, or supervised.reference_batch = 0")
        rehearsed = (reference.inputs, model.task.label_tensor(reference.labels,
                                                               len(reference.inputs)))
    if train == "lowrank":
        inject_lowrank(model.module, rank=s.rank, layers=s.layers)
    return SupervisedStep(model.module, model.task, learning_rate=s.learning_rate, prefer=train,
                          max_learning_rate=settings.adapter.max_learning_rate,
                          replay=s.replay, replay_steps=s.replay_steps, reference=rehearsed,
                          reference_batch=s.reference_batch, input_shape=model.input_shape,
                          replay_batch=s.batch_size, average=s.average)


def _adanpc(settings: Settings, model: LoadedModel, reference: ReferenceData | None
            ) -> AdaNPC | None:
    """AdaNPC's memory, seeded with the reference data's features and labels, when configured."""
    if "adanpc" not in settings.adapter.memories:
        return None
    if not model.task.discrete or model.num_classes is None:
        raise ValueError("adanpc votes over classes; it serves classification models only")
    if reference is None:
        raise ValueError("adanpc seeds its memory with in-distribution data: set "
                         "model.reference_data to a safetensors file with `inputs` (and "
                         "`labels`, else the source model's predictions stand in)")
    features = source_features(model, reference)
    if features is None:
        raise ValueError("adanpc needs features: the model has no nn.Linear layer to read")
    labels = reference.labels
    if labels is None:  # no true labels: the source model's own predictions stand in
        labels = source_predictions(model, reference)
    m = settings.adapter.memory
    memory = AdaNPC(model.num_classes, features.shape[1], k=m.k, temperature=m.temperature,
                    confidence_threshold=m.confidence_threshold, capacity=m.capacity,
                    policy=m.policy, vote_window=m.vote_window, min_labels=m.min_labels)
    memory.seed(features, labels)
    return memory


def _collapse_guard(
    settings: Settings, model: LoadedModel, reference: ReferenceData | None,
    spread: np.ndarray | None, shadow: bool,
) -> CollapseGuard | None:
    """The label-free guard of everything that learns. It judges the predictions of what learns
    against the source's on the same inputs; the reference data gives the baseline for when no
    source copy runs (a classifier's diversity) and the floor of a regressor's divergence. A
    regressor has no guard without the source copy: there is nothing to judge its values by."""
    a = settings.adapter
    if a.collapse_min_ratio <= 0 or (not model.task.discrete and not shadow):
        return None
    source_effective = None
    if reference is not None and model.task.discrete:
        assert model.num_classes is not None
        predictions = source_predictions(model, reference).numpy()
        source_effective = effective_classes(predictions, model.num_classes)
    return CollapseGuard(model.num_classes if model.task.discrete else None, a.collapse_window,
                         a.collapse_min_ratio, source_effective, a.collapse_max_divergence,
                         0.0 if spread is None else spread)


def _conformal(settings: Settings, engine: Engine, store: StoreGateway,
               max_scale: float | None) -> Conformal | None:
    c = settings.conformal
    if c.method == "off":
        return None
    why = None  # what auto picked, and why
    if c.method == "auto":
        method, why = auto_method(engine.model.task.discrete,
                                  max_scale is not None or "max_scale" in c.options)
        c = c.model_copy(update={"method": method})
        log.info("conformal: method auto is %s (%s)", method, why)
    if c.method in ("sfogd", "saocp") and max_scale is None and "max_scale" not in c.options:
        raise ValueError(
            f"conformal.method {c.method!r} learns its threshold over the score range D: set "
            "conformal.max_scale (about √3 × the largest residual you expect), give "
            "model.reference_data with labels, or choose method 'aci' (scale-free)"
        )
    reference_entropy = None
    if CALIBRATORS[c.method].uses_signal:
        reference = load_reference_data(settings, engine.model)
        if reference is None:
            log.info("conformal: no reference data, so %s serves without its label-free "
                     "signal", c.method)
        else:
            reference_entropy = served_entropy(engine.model, reference, engine.adapter.infer)
    return Conformal(c, engine.model, engine.metrics, store, max_scale, reference_entropy,
                     auto=why)


def auto_method(discrete: bool, range_known: bool) -> tuple[str, str]:
    """What `conformal.method = "auto"` runs, and why: the measured best of BENCHMARKS.md B3."""
    if discrete:
        return "pid", ("classification: conformal PID with its entropy scorecaster held B3's "
                       "Digits-C targets with labels 32 and 100 samples late")
    if range_known:
        return "saocp", ("regression with a known score range D: SAOCP's worst windows on B3's "
                         "FriedmanDrift streams are at the top")
    return "dtaci", ("regression, no score range known (set conformal.max_scale or give "
                     "labelled reference data for SAOCP): DtACI is scale-free")


def reference_max_scale(settings: Settings, engine: Engine) -> float | None:
    """D for SAOCP and SF-OGD: set, or 1 for probability scores, or √3 × the largest residual of
    the source model on labelled reference data (what the reference package derives)."""
    c = settings.conformal
    if c.max_scale is not None:
        return c.max_scale
    if engine.model.task.discrete:
        return 1.0
    reference = load_reference_data(settings, engine.model)
    if reference is None or reference.labels is None:
        return None
    source = engine.source_module()  # never the served model: a forward moves its statistics
    with torch.inference_mode():
        predicted = torch.cat([source(reference.inputs[i:i + 256]).float()
                               for i in range(0, len(reference.inputs), 256)])
    residuals = (reference.labels.float().reshape(len(predicted), -1) - predicted).abs()
    return float(residuals.max()) * 3 ** 0.5 or 1.0


def persisted_memories(settings: Settings, engine: Engine) -> frozenset[str]:
    """The names of the memories whose rows live in the store."""
    names = set()
    if engine.adanpc is not None and settings.adapter.memory.persist:
        names.add(engine.adanpc.name)
    if engine.error_memory is not None and settings.error_memory.persist:
        names.add(engine.error_memory.name)
    return frozenset(names)


async def _reload_memory(engine: Engine, store: StoreGateway, memory: AdaNPC | AnyErrorMemory
                         ) -> bool:
    """Rows this deployment's replicas added to the memory before, from the store; whether
    any were loaded."""
    try:
        rows = await store.load_memory(memory.name)
    except StoreUnavailable:
        log.warning("the store is unreachable: the %s memory starts from its seed", memory.name)
        return False
    if not rows.size:
        return False
    try:
        await engine.run(memory.load_rows, rows)
    except ValueError as error:  # rows of another model (a new feature width): start afresh
        log.warning("the stored %s memory does not fit this model (%s); it starts empty, and "
                    "the stored rows are cleared", memory.name, error)
        try:
            await store.clear_memory(memory.name)
        except StoreUnavailable:
            pass  # the next reset clears them; until then new rows are refused and dropped
        return False
    log.info("reloaded %d %s memory rows", len(rows), memory.name)
    if memory is engine.error_memory:
        await engine.run(engine.wake_memory)
    return True


async def _stored_json(store: StoreGateway, name: str, instead: str) -> object:
    """The state `name` a replica saved, decoded from JSON; None where there is none, the store
    is unreachable or the blob is no JSON (both logged, with what happens `instead`)."""
    try:
        blob = await store.load_state(name)
    except StoreUnavailable:
        log.warning("the store is unreachable: %s", instead)
        return None
    if blob is None:
        return None
    try:
        return json.loads(blob)
    except (ValueError, RecursionError):
        log.warning("the stored %s state is not JSON; %s", name, instead)
        return None


async def _restore_drift(engine: Engine, store: StoreGateway) -> None:
    """Resume the detectors and the policy where the deployment left them."""
    assert engine.drift is not None
    state = await _stored_json(store, DRIFT_STATE, "drift detectors start afresh")
    if state is None:
        return
    skipped = await engine.run(engine.drift.load_state, state)
    await engine.run(engine.resume_rates)  # a boost in force when the state was saved
    log.info("resumed drift detectors%s", f" (not: {', '.join(skipped)})" if skipped else "")


async def _restore_newest_label(engine: Engine, store: StoreGateway) -> None:
    """The mixture's newest label from where a replica left it (`MIXTURE_STATE`), in place of
    the reference data's last; nothing without the candidate, a saved label or the store."""
    if not engine.has_newest_label:
        return
    state = await _stored_json(store, MIXTURE_STATE,
                              "the mixture's newest label starts as before")
    if state is None:
        return
    row = state.get("newest_label") if isinstance(state, dict) else None
    if row is not None and await engine.run(engine.restore_newest_label, row):
        log.info("mixture: the newest label starts as a replica saved it last")
    else:
        log.warning("the stored newest label is no label of this model; it starts as before")


async def _restore_adapter(engine: Engine, store: StoreGateway) -> bool:
    """Resume from the latest checkpoint in the store, if it was made for this model and method;
    whether one was restored."""
    try:
        latest = await store.load_adapter()
    except StoreUnavailable:
        log.warning("the store is unreachable: the adapter starts from the source weights")
        return False
    if latest is None:
        return False
    version, blob = latest
    if await engine.run(engine.restore, blob):
        log.info("restored adapter checkpoint %d", version)
        return True
    log.info("adapter checkpoint %d was made for another model version, method, norm or "
             "composition (supervised step, output corrector), or does not fit this model; "
             "not restored", version)
    return False


def _load_snapshot(settings: Settings, store: StoreGateway) -> None:
    path = settings.store.snapshot_path
    if path is None or not path.exists():
        return
    try:
        store.restore(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ValueError(f"store.snapshot_path {path}: {error}; move it away to start "
                         "afresh") from error
    log.info("restored the in-process store from %s", path)


def _write_snapshot(path: Path, store: StoreGateway) -> None:
    """Atomically: a half-written snapshot never replaces a whole one."""
    blob = store.snapshot()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(blob)
    os.replace(partial, path)


def _open_store(settings: Settings) -> Store:
    s = settings.store
    options: dict[str, object] = {"expired_grace_s": s.expired_grace_s}
    if s.url.startswith("memory"):
        options["max_records"] = s.max_records
        options["max_bytes"] = s.max_bytes
        options["reserve"] = True  # memory that does not grow with traffic (docs/operations.md)
    return open_store(s.url, namespace=settings.namespace, record_ttl_s=s.record_ttl_s, **options)
