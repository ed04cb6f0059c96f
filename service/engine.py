"""The engine: the single writer of the model.

One worker thread owns the model and everything that learns online: the test-time adapter, the
AdaNPC memory, the error memory (ReLoop2), the output corrector and the supervised step. Every
forward pass, every adaptation step, every update from labels and every reset runs on that thread,
in the order it was submitted, so the model never sees two writers and none of these parts needs a
lock. Async code hands work over with `Engine.run`.

A batch goes through one pipeline, whatever the task: the model (its outputs, and the features
entering its last linear layer), the test-time adapter's step, what the task serves (softmax
probabilities, or values), AdaNPC's vote (built for classifiers only), the output corrector (built
for regressors only), then the error memory's compensation. What the label path needs later (the
outputs before each correction, the inputs for a supervised step) comes back in
`BatchOutput.arrays` for the records.

The engine has no store. What it changes that the store must follow (memory rows added, a memory
reset or trimmed, the calibrator reset by a drift action) it lists, in order, as `StateChange`s;
`service.state_sync.StateSync` takes them after each call and writes them.

Outputs or features that are not finite never leave the engine: `forward` raises
`NonFiniteOutputs` before any memory, corrector, guard or detector sees the batch, and the
micro-batcher runs each request again alone, without adaptation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import functools
import hashlib
import json
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from adapters import Adapter
from adapters.guard import CollapseGuard, SourceComparison
from adapters.labels.lowrank import SupervisedStep
from adapters.labels.online_learner import OnlineLearner
from adapters.labels.output_corrector import OutputCorrector
from adapters.learner import Learner
from adapters.memory.adanpc import AdaNPC
from adapters.memory.error_memory import ErrorMemory, HashedErrorMemory
from adapters.mixture import FixedShareMixture
from adapters.tta.norm import RobustBatchNorm
from adapters.tta.runs import ClassRunFilter
from drift import Action
from service.events import EventLog
from service.metrics import Metrics
from service.model import FeatureTap, LoadedModel
from service.monitor import DriftMonitor
from service.settings import Settings

log = logging.getLogger("adaptd")

T = TypeVar("T")

# the array names a record keeps for the label path
BEFORE_ERROR_MEMORY = "before_error_memory"  # the outputs the error memory corrected
BEFORE_CORRECTOR = "before_corrector"  # a regressor's values before the output corrector
INPUTS = "inputs"  # the flattened inputs, for the supervised step
SOURCE_OUTPUTS = "source_outputs"  # what the source model served for the same input (the shadow)
# what learns, before the class-run filter (kept with the shadow and no mixture): the comparison
# with the source judges the learning parts, not the filter's use of the stream's order
BEFORE_RUNS = "before_runs"
# where the class-run filter placed the sample in its sequence (its token and the row's
# position, `ClassRunFilter.filter_and_place`; -1 for a repeated input, which moved no
# sequence): the sample's label, when it comes, tells the filter whether the classes themselves
# come in runs
RUNS_PLACE = "runs_place"
# which learning the sample was served by: a token drawn anew at start and at every reset, so
# labels of samples served before a reset, by another replica or by an earlier process never
# count for the comparison with the source (a float32 holds it exactly: below 2**24)
EPOCH = "epoch"
# the mixture's candidate that is no stage of the pipeline: the label that arrived last, served for
# every sample (one-hot for a classifier), for streams whose labels persist (runs of one class, a
# level that moves slowly)
NEWEST_LABEL = "newest_label"
# a regressor's candidate that is no stage either: the last stage's values plus its mean residual
# (label less what it served) over the last RESIDUAL_LABELS labels, for streams whose model errs
# alike for a while (a level the model misses); the error memory's correction by recency alone
RECENT_RESIDUAL = "recent_residual"
RESIDUAL_LABELS = 16
# the mixture's candidates that River's online learners make from the inputs
# (`mixture.learner`), each named by its kind, `learner.<kind>` (`learner_names`): what another
# process's learner guessed for a record is never scored as this one's
LEARNER = "learner"
# the mixture's other candidates: after the test-time adapter, and after the memories and the
# corrector (the source's are SOURCE_OUTPUTS)
CANDIDATE_ARRAYS = {"source": SOURCE_OUTPUTS, "adapted": "candidate.adapted",
                    "compensated": "candidate.compensated",
                    NEWEST_LABEL: "candidate.newest_label",
                    RECENT_RESIDUAL: "candidate.recent_residual"}
# what each of the mixture's rates served (with several `mixture.eta`), (rates × width) a row:
# the rates are weighed on what they served, the label delay included
MIXTURE_RATES = "mixture.rates"
# kept instead of the learner's candidate while it slept (one 1 a row): the join makes the
# guess it would have made (`Engine.guess_asleep`)
LEARNER_ASLEEP = "learner_asleep"


def learner_names(kinds: Sequence[str]) -> list[str]:
    """The mixture's candidate names of River's learners of these kinds.

    >>> learner_names(["hat", "ht"])
    ['learner.hat', 'learner.ht']
    """
    return [f"{LEARNER}.{kind}" for kind in kinds]


def candidate_array(name: str) -> str:
    """The array a record keeps a candidate's outputs in (`CANDIDATE_ARRAYS`; a learner's,
    `candidate.learner.<kind>`)."""
    return CANDIDATE_ARRAYS.get(name, f"candidate.{name}")


class NonFiniteOutputs(ValueError):
    """The model gave NaN or infinite outputs (or features) for some rows of a batch: nothing of
    the batch is served, remembered or watched. `rows` index the batch passed to `forward`."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows
        named = ", ".join(f"inputs[{row}]" for row in rows[:10])
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        verb, its = ("gives a non-finite output", "its") if len(rows) == 1 else (
            "give non-finite outputs", "their")
        super().__init__(f"{named}{more} {verb} (NaN or infinity) from the model; check the "
                         f"scale of {its} values")


def non_finite_rows(outputs: torch.Tensor, features: torch.Tensor | None) -> list[int]:
    """The rows whose outputs or features hold a NaN or an infinity.

    >>> non_finite_rows(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), None)
    [1]
    """
    count = outputs.shape[0]
    bad = ~torch.isfinite(outputs.reshape(count, -1)).all(1)
    if features is not None:
        finite = torch.isfinite(features.reshape(features.shape[0], -1)).all(1)
        if len(finite) == count:
            bad |= ~finite
        elif not bool(finite.all()):  # features not one row per sample: every row is suspect
            bad[:] = True
    if not bool(bad.any()):
        return []
    return [int(i) for i in torch.nonzero(bad).flatten()]


@dataclass(frozen=True)
class MemoryRowsAdded:
    """Rows a memory took in at test time (AdaNPC's confident samples), packed for the store."""

    name: str
    rows: np.ndarray
    capacity: int


@dataclass(frozen=True)
class MemoryCleared:
    """A memory went back to its seed (or empty): its stored rows go too."""

    name: str


@dataclass(frozen=True)
class MemoryTrimmed:
    """A drift action kept only a memory's newest `keep` rows."""

    name: str
    keep: int


@dataclass(frozen=True)
class CalibratorReset:
    """A drift action reset the shared conformal calibrator."""


StateChange = MemoryRowsAdded | MemoryCleared | MemoryTrimmed | CalibratorReset


@dataclass
class BatchOutput:
    """One forward pass, as numpy rows: what the caller gets and what the record keeps."""

    predictions: np.ndarray
    outputs: np.ndarray
    features: np.ndarray | None
    entropy: np.ndarray | None
    adapter_version: int
    # per-sample vectors the label path needs, (n, ...) each, named by the constants above
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # whether the records keep `features`: decided with the pass (an `auto` error memory that
    # wakes while the batch is being recorded must not get rows it did not correct)
    keep_features: bool = False
    # where the drift policy runs: the token of the process that served the batch and its sample
    # clock after the batch, kept in each record (`extra["served"]`), so that a label counts for
    # when its sample was served, and only in the process that served it (for the policy's
    # judge, and the boost that what learns from the label takes)
    served: tuple[int, int] | None = None


@dataclass
class LabelledBatch:
    """Joined labels as the engine learns from them; rows are aligned, absent parts are None."""

    labels: np.ndarray
    features: np.ndarray | None = None
    error_memory_rows: np.ndarray | None = None  # packed by the error memory, already stored
    before_corrector: np.ndarray | None = None
    inputs: np.ndarray | None = None
    errors: np.ndarray | None = None  # the labelled drift signal of every joined label
    served: np.ndarray | None = None  # (n, 2): where each of those labels' samples was served
    # (n, 2): where each of `labels`' samples was served (process token, sample clock; NaN where
    # the record does not say), whose drift boost what learns from them takes
    learnt_served: np.ndarray | None = None
    judged: np.ndarray | None = None  # what the drift policy's judge scores each label by
    # the shadow comparison: errors of what learns (the last stage before any mixture) and of
    # the source's outputs, and the epoch each record was served in (see EPOCH)
    adapted_errors: np.ndarray | None = None
    source_errors: np.ndarray | None = None
    epochs: np.ndarray | None = None
    # the mixture's candidates' outputs, by candidate name, and their labels (the records that
    # kept every candidate; River's learners' guesses for records served while they slept made
    # at the join, `Engine.guess_asleep`)
    candidates: dict[str, np.ndarray] | None = None
    candidate_labels: np.ndarray | None = None
    candidate_served: np.ndarray | None = None  # (n, 2): where those records were served
    # what each of the mixture's rates served (n, rates, width), and those records' labels
    rates_served: np.ndarray | None = None
    rates_labels: np.ndarray | None = None
    # where the class-run filter placed the records that say (n, 2), and their labels
    runs_places: np.ndarray | None = None
    runs_labels: np.ndarray | None = None


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes: a little-endian u64 header length, then JSON."""
    if len(blob) < 8:
        raise ValueError("not a safetensors checkpoint: too short")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("not a safetensors checkpoint: header runs past the end")
    metadata: dict[str, str] = json.loads(blob[8:8 + size]).get("__metadata__", {})
    return metadata


AnyErrorMemory = ErrorMemory | HashedErrorMemory


class RecentInputs:
    """Digests of the last `capacity` distinct input rows. A row identical to one of them, or to
    an earlier row of its own batch, is served but learnt from by nothing that learns without
    labels (the adapter and its statistics, AdaNPC's pseudo-labels): the same request sent a
    thousand times is one sample, not a run that drags the model. What is served still reaches
    the collapse guard and the drift detectors, and a label for a repeated request still teaches.
    Exact repeats only (the float32 values the model sees): a re-encoded image is a new input.

    >>> recent = RecentInputs(capacity=4)
    >>> rows = np.zeros((3, 2), dtype=np.float32)
    >>> rows[2] = 1.0
    >>> recent.new_rows(rows).tolist(), recent.new_rows(rows).tolist()
    ([True, False, True], [False, False, False])
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self.digests: OrderedDict[bytes, None] = OrderedDict()

    def new_rows(self, inputs: np.ndarray) -> np.ndarray:
        """Which rows are new: the first of their values in the batch, and not among the recent
        ones. Every row becomes the most recent."""
        rows = np.ascontiguousarray(inputs, dtype=np.float32).reshape(len(inputs), -1)
        new = np.zeros(len(rows), dtype=bool)
        for index, row in enumerate(rows):
            digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            new[index] = digest not in self.digests
            self.digests[digest] = None
            self.digests.move_to_end(digest)
        while len(self.digests) > self.capacity:
            self.digests.popitem(last=False)
        return new

    def clear(self) -> None:
        self.digests.clear()


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        adapter: Adapter,
        metrics: Metrics,
        events: EventLog,
        guard: CollapseGuard | None = None,
        adanpc: AdaNPC | None = None,
        error_memory: AnyErrorMemory | None = None,
        output_corrector: OutputCorrector | None = None,
        supervised: SupervisedStep | None = None,
        supervised_batch: int = 32,
        drift: DriftMonitor | None = None,
        source: torch.nn.Module | None = None,
        comparison: SourceComparison | None = None,
        mixture: FixedShareMixture | None = None,
        recent: RecentInputs | None = None,
        runs: ClassRunFilter | None = None,
        memory_wakes_on_labels: bool = False,
        online: dict[str, OnlineLearner] | None = None,
    ) -> None:
        self.model = model
        self.task = model.task
        self.adapter = adapter
        self.metrics = metrics
        self.events = events
        self.guard = guard
        self.adanpc = adanpc
        self.error_memory = error_memory
        self.output_corrector = output_corrector
        self.supervised = supervised
        self.supervised_batch = supervised_batch
        self._supervised_inputs: list[torch.Tensor] = []
        self._supervised_labels: list[torch.Tensor] = []
        self._supervised_served: list[np.ndarray] = []  # where each waiting label's sample was
        self.drift = drift
        # the shadow: a frozen copy of the source model, run on every batch beside the adapted
        # one, for the guard and for the comparison on labels; or the served module itself where
        # nothing changes the model (what learns acts on its outputs): its outputs before the
        # memories and the corrector are the source's, and no second forward runs
        self.source = source
        self.source_is_model = source is not None and source is model.module
        # the shadow copy's own features, for the label-free drift detectors (below; none
        # without drift monitoring, where nothing would read them)
        self.source_tap = (FeatureTap(source) if drift is not None and source is not None
                           and not self.source_is_model else None)
        if self.source_tap is not None:
            self.source_tap.armed = False  # `_source_outputs` arms it; start-up passes keep nothing
            if drift is not None:
                drift.watches = "source copy"
        self._source_features: np.ndarray | None = None
        # `error_memory.kind = "auto"`: the memory sleeps (records keep no features, nothing is
        # compensated) until the first joined label, or rows it loads
        self._memory_asleep = error_memory is not None and memory_wakes_on_labels
        self.comparison = comparison if source is not None else None
        self.mixture = mixture
        # the label that arrived last, as a target row (one-hot, or values): the mixture's
        # NEWEST_LABEL candidate; before this process joins its first label, the one a replica
        # saved in the store last or the reference data's last (`seed_newest_label`), or None
        # (the candidate is then the last stage's outputs)
        self._newest_label: torch.Tensor | None = None
        self._newest_joined = False  # whether a label this process joined set it
        self.newest_joins = 0  # label batches that set it here: the store's copy is saved anew
        # only when this has moved since (`Runtime.save_newest_label`)
        # the last stage's residuals on the last RESIDUAL_LABELS labels (label less its output),
        # oldest first: the mixture's RECENT_RESIDUAL candidate adds their mean to the last stage
        self._residuals: collections.deque[np.ndarray] = collections.deque(
            maxlen=RESIDUAL_LABELS)
        self._residuals_from = -1.0  # the sample clock of the last reset: records served after
        # River's learners, each a candidate of the mixture by its name (`learner_names`):
        # trained on the joined labels' inputs, kept through resets (the mixture's weights judge
        # them, not the guards)
        self.online = {name: learner for name, learner in (online or {}).items()
                       if mixture is not None and name in mixture.names}
        self.online_failures = dict.fromkeys(self.online, 0)
        # asleep (no guesses: a deployment whose labels never come pays nothing for them) until
        # this replica joins its first label; they then keep a copy of themselves as they were,
        # which makes, for records served meanwhile, exactly the guesses they would have made
        # (they learnt nothing while asleep), so the mixture judges them on every label
        self._online_asleep = bool(self.online)
        self._online_dream: dict[str, OnlineLearner] | None = None
        self.recent = recent
        # the class-run filter: the last stage, over what every other stage served
        self.runs = runs
        # the served model's robust BatchNorm layers, whose shifts tell the filter when the
        # statistics are settling after a shift (`RobustBatchNorm.shifts`)
        self._watched_norms = [] if runs is None or not runs.settle_rows else [
            layer for layer in model.module.modules() if isinstance(layer, RobustBatchNorm)]
        self._epoch = secrets.randbelow(2**24)
        # configurations that will do nothing (measured or known at start-up), said at start
        self.warnings: list[str] = []
        # what `build_engine` built it from, `auto` made concrete (None: built by hand)
        self.settings: Settings | None = None
        self._changes: list[StateChange] = []
        self._changes_lock = threading.Lock()
        # every learning part's own rate, which a drift boost multiplies
        self._base_rates: dict[Learner, float] = {
            part: part.learning_rate for part in self.learners() if part.learning_rate > 0}
        self._factors = (1.0, 1.0)  # the drift boost, and the class-run damping of the adapter
        self._resets = 0
        self.tap = FeatureTap(model.module)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptd-engine")
        metrics.learning_rate.set(adapter.learning_rate)
        self._report_memories()

    def learners(self) -> list[Learner]:
        """Every part that learns: the adapter, and the supervised step and the output corrector
        where configured."""
        parts: list[Learner] = [self.adapter]
        parts += [p for p in (self.supervised, self.output_corrector) if p is not None]
        return parts

    def describe_learning(self) -> dict[str, object]:
        """Every part that changes what is served, with its settings as built (what `auto`
        chose included), and the guards; the start-up log and `/v1/state` show it."""
        parts: dict[str, object] = {
            "adapter": {"name": self.adapter.name, "learning_rate": self.adapter.learning_rate,
                        "norm": self.adapter.norm}}
        momenta = [round(layer.momentum, 5) for layer in self.model.module.modules()
                   if isinstance(layer, RobustBatchNorm) and layer.fixed_momentum is None]
        if momenta:  # per layer, where they move per sample: graded ones differ
            parts["adapter"]["norm_momenta"] = momenta  # type: ignore[index]
        if self.adanpc is not None:
            parts["adanpc"] = self.adanpc.describe()
        if self.error_memory is not None:
            parts["error_memory"] = {**self.error_memory.describe(),
                                     "asleep": self._memory_asleep}
        if self.supervised is not None:
            parts["supervised"] = {**self.supervised.describe(), "batch": self.supervised_batch}
        if self.output_corrector is not None:
            parts["output_corrector"] = self.output_corrector.describe()
        parts["collapse_guard"] = self.guard is not None
        parts["shadow"] = self.source is not None
        if self.mixture is not None:
            parts["mixture"] = self.mixture.describe()
        if self.online:
            parts["learners"] = {
                name: {**learner.describe(), "failures": self.online_failures[name],
                       "asleep": self._online_asleep}
                for name, learner in self.online.items()}
        parts["drift"] = self.drift is not None
        if self.runs is not None:
            parts["runs"] = self.runs.describe()
        return parts

    def source_module(self) -> torch.nn.Module:
        """The source model to run beside the served one at start-up (reference data through it
        moves no statistic of the served model): the shadow copy, or a copy made now (also where
        the shadow is the served module itself)."""
        if self.source is not None and not self.source_is_model:
            return self.source
        return copy.deepcopy(self.model.module).eval()

    @property
    def learns_from_features(self) -> bool:
        """Whether joined labels need the features of their predictions (AdaNPC, the error
        memory, the output corrector learn from them): without these, records keep none."""
        memory = None if self._memory_asleep else self.error_memory
        return any(part is not None for part in (self.adanpc, memory, self.output_corrector))

    @property
    def memory_asleep(self) -> bool:
        """Whether the error memory (`kind = "auto"`) waits for its first label."""
        return self._memory_asleep

    def wake_memory(self) -> None:
        """Engine thread only. The error memory learns from now on (a label arrived, or rows were
        loaded): records keep their features, predictions are compensated."""
        if self._memory_asleep:
            self._memory_asleep = False
            log.info("error memory (auto): labels arrive, it learns from them from now on")

    def _unsticky(self) -> float:
        """1 − the class-run filter's stickiness: the chance that the next sample's class is
        drawn afresh. 1 without the filter, and before it has seen a sample since its start or a
        reset (its prior spreads over every stickiness, 0.73 on average, which is no evidence)."""
        if self.runs is None or not self.runs.filtered:
            return 1.0
        return max(0.0, 1.0 - self.runs.stickiness())

    def _memory_scale(self) -> float:
        """How much of the error memory's correction a batch gets: `_unsticky`. Where classes
        come in runs a sample's nearest labelled neighbours are the last run's, whose labels come
        late, and their correction pulls toward the class the stream has left (B6, "The error
        memory asleep until labels": on B1's Dirichlet(0.1) replay `bn` with the memory served
        36.8% wrong undamped, 25.1% damped, 25.6% without the memory)."""
        return self._unsticky()

    def _runs_scale(self) -> float:
        """What the test-time adapter's learning rate is multiplied by: `_unsticky`. A batch
        within a run is mostly one class, and a label-free step on it (entropy, pseudo-labels)
        pulls the shared parameters towards that class, which the next run then pays for: Tent on
        B1 with classes in runs (Dirichlet(0.1), 16 a request) served 33.9% wrong and the clean
        digits after the stream 8.1%, damped 28.3% and 3.0% (the source's 3.1). On shuffled
        traffic it is about 1, but it dips after an abrupt switch of the model's class mix, which
        the filter takes for a run (Tent on B1's shuffled order: 0.92 on average over its steps,
        under 0.9 for one step in ten), where a drift boost may come too. The statistics have
        their own protection (graded momenta, `adapter.norm_layers`); the supervised step and the
        corrector learn from labels and are not damped, nor is an adapter whose steps are taken
        on a class-balanced memory (RoTTA's) rather than on the batch."""
        return 1.0 if self.adapter.balanced_steps else self._unsticky()

    def _outputs_differ(self) -> bool:
        """Whether anything can make what is served differ from the source model's outputs
        (with the shadow being the served module itself)."""
        memory = self.error_memory is not None and not self._memory_asleep
        return memory or self.adanpc is not None or self.output_corrector is not None

    def memories(self) -> list[AdaNPC | AnyErrorMemory]:
        return [m for m in (self.adanpc, self.error_memory) if m is not None]

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run `fn` on the engine thread, after everything submitted before it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    def take_changes(self) -> list[StateChange]:
        """What changed that the store must follow, in order, since the last call (any thread)."""
        with self._changes_lock:
            changes, self._changes = self._changes, []
        return changes

    def _changed(self, change: StateChange) -> None:
        with self._changes_lock:
            self._changes.append(change)

    def forward(self, inputs: np.ndarray, adapt: bool = True,
                groups: Sequence[str | None] | None = None) -> BatchOutput:
        """Engine thread only. Predict a batch; with `adapt`, let the adapter take its step.
        `groups`: the group each row's request named, if any (the class-run filter follows each
        group's rows as a sequence of their own). Raises `NonFiniteOutputs` when a row's
        outputs or features are NaN or infinite."""
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        count = x.shape[0]
        learn = self.recent.new_rows(x.numpy()) if adapt and self.recent is not None else None
        if learn is not None and not learn.all():
            self.metrics.repeated_inputs.inc(int((~learn).sum()))
        version, epoch = self.adapter.version, self._epoch
        if adapt and self.runs is not None and self.adapter in self._base_rates:
            self._apply_rates()  # the stickiness the rows before left: this batch's damping
        watching = adapt and bool(self._watched_norms)
        for layer in self._watched_norms if watching else ():
            layer.watch, layer.shift = True, None
        try:
            raw, features = self._run_adapter(x, adapt, learn)
        finally:
            for layer in self._watched_norms if watching else ():
                layer.watch = False
        shifts = self._shifts(count, learn) if watching else None
        bad = non_finite_rows(raw.detach(), features)
        if bad:  # before any memory, corrector, guard or detector sees the batch
            raise NonFiniteOutputs(bad)
        features_np = None if features is None else features.float().numpy()
        outputs = self.task.served(raw.detach().float().reshape(count, -1))
        if self.source_is_model:  # the model never changes: its own outputs are the source's
            source = outputs.clone() if self._outputs_differ() else None
        else:
            source = self._source_outputs(x, count)
        # the label-free drift detectors watch what the inputs do to a model that does not
        # learn: the shadow's outputs and features where it runs a copy of the source, else the
        # model's own before the memories and the corrector. What learns (the adapter, the
        # supervised step, the memories' votes) changes these by itself, which is no drift of
        # the inputs, and its alarms would boost the very learning that raised them
        model_outputs = outputs.numpy()
        watched: tuple[np.ndarray | None, np.ndarray | None]
        if self.source_tap is None:
            watched = (model_outputs, features_np)
        elif source is None:  # the source's outputs were not finite: the batch adds nothing
            watched = (None, None)
        else:
            watched = (source.numpy(), self._source_features)
        candidates: dict[str, torch.Tensor | None] = {"source": source, "adapted": outputs}
        arrays: dict[str, np.ndarray] = {}
        if source is not None:
            arrays[SOURCE_OUTPUTS] = source.numpy()
            arrays[EPOCH] = np.full(count, epoch, dtype=np.float32)
        if self.supervised is not None or self.online:
            arrays[INPUTS] = x.reshape(count, -1).numpy()
        if self.online and not self._online_asleep:
            candidates.update(self._online_predict(arrays[INPUTS]))
        if self.adanpc is not None and features is not None:
            # AdaNPC: the model's softmax moved towards the memory's vote by the vote's own
            # confidence; confident samples join the memory with their served class
            outputs = self.adanpc.predict(features, outputs)
            rows = slice(None) if learn is None else torch.from_numpy(learn)
            if adapt and (learn is None or learn.any()):
                before = self.adanpc.observed
                if self.adanpc.observe(features[rows], outputs[rows]):
                    self._changed(MemoryRowsAdded(self.adanpc.name, self.adanpc.rows(since=before),
                                                  self.adanpc.capacity))
                self._report_memories()
        if self.output_corrector is not None:
            arrays[BEFORE_CORRECTOR] = outputs.numpy()
            outputs = self.output_corrector.correct(features, outputs)
        if self.error_memory is not None and features is not None and not self._memory_asleep:
            # ReLoop2: the error memory's correction; what it corrected is kept for the labels
            arrays[BEFORE_ERROR_MEMORY] = outputs.numpy()
            outputs = self.error_memory.compensate(features, outputs, scale=self._memory_scale())
        candidates["compensated"] = outputs
        learnt = outputs  # what the guard judges: what learns, not the mixture that hedges it
        mixed = self._mixed(candidates)
        if self.mixture is not None and mixed is not None:  # the source's may not be finite
            for name, values in mixed.items():
                if name in self.online and self._online_asleep:  # their guesses: at the join
                    arrays[LEARNER_ASLEEP] = np.ones((count, 1), dtype=np.float32)
                else:
                    arrays[candidate_array(name)] = values.numpy()
            rates = self.mixture.outputs(mixed)
            if len(rates) > 1:  # what each rate served, judged when the labels come
                arrays[MIXTURE_RATES] = rates.permute(1, 0, 2).reshape(count, -1).float().numpy()
            outputs = self.mixture.serve(rates)
        if self.runs is not None:
            if source is not None and self.mixture is None:
                arrays[BEFORE_RUNS] = outputs.numpy()
            # the rows in the order served; a forward with adapt=False (the batcher's retry of
            # a failed batch, request by request) is filtered without moving the filter, and its
            # rows are placed nowhere
            # rows the engine has seen lately (`learn` False) are served by the filter as it
            # stands and move it not: the same request a thousand times is not a run
            if adapt:
                outputs, arrays[RUNS_PLACE] = self.runs.filter_and_place(outputs, groups, learn,
                                                                         shifts)
            else:
                outputs = self.runs.filter(outputs, commit=False, groups=groups, learn=learn)
        predictions = self.task.predictions(outputs).numpy()
        entropy = self.task.entropy(outputs)
        if entropy is not None:
            self.metrics.mean_entropy.set(float(entropy.mean()))
        if adapt:
            if self.guard is not None and self._collapsed(learnt, source):
                if self.comparison is not None and self.comparison.better():
                    self.guard.clear()  # the labels outrank it: what is served beats the source
                else:
                    self._reset_after_collapse()
            self._watch(watched[0] if self.task.discrete else None, watched[1], count)
        return BatchOutput(predictions=predictions, outputs=outputs.numpy(), features=features_np,
                           entropy=None if entropy is None else entropy.numpy(),
                           adapter_version=version, arrays=arrays,
                           keep_features=self.learns_from_features,
                           # a retry (adapt=False) moves no clock: its samples are not placed
                           served=None if self.drift is None or not adapt
                           else self.drift.served())

    def _shifts(self, count: int, learn: np.ndarray | None) -> np.ndarray | None:
        """Each row's shift, averaged over the watched layers that recorded one for the rows
        learnt from (NaN for a repeated row); None where no layer did (an adapter whose
        served forward moves no statistics, RoTTA's teacher)."""
        learnt = count if learn is None else int(learn.sum())
        recorded = [layer.shift for layer in self._watched_norms
                    if layer.shift is not None and len(layer.shift) == learnt]
        if not recorded or not learnt:
            return None
        mean = torch.stack(recorded).mean(0).cpu().numpy().astype(np.float64)
        if learn is None:
            return mean
        shifts = np.full(count, np.nan)
        shifts[learn] = mean
        return shifts

    def _run_adapter(self, x: torch.Tensor, adapt: bool, learn: np.ndarray | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The adapter's outputs and the tapped features of every row, in order: the rows to learn
        from (all, with `adapt` and no `learn` mask) through `adapt`, the others through `infer`."""
        if not adapt or (learn is not None and not learn.any()):
            self.tap.arm()
            raw = self.adapter.infer(x)
            return raw, self.tap.take()
        keep = None if learn is None or learn.all() else torch.from_numpy(learn)
        self.tap.arm()
        result = self.adapter.adapt(x if keep is None else x[keep])
        learnt_features = self.tap.take()
        if result.stepped:
            self.metrics.adaptation_steps.inc()
            self.metrics.adaptation_samples.inc(result.backward_samples)
            self.metrics.learning_rate.set(self.adapter.learning_rate)
        if result.skipped:
            self.metrics.adaptation_skipped.inc()
        if keep is None:
            return result.outputs, learnt_features
        self.tap.arm()
        repeated = self.adapter.infer(x[~keep])
        repeated_features = self.tap.take()
        raw = torch.empty((len(x), *result.outputs.shape[1:]), dtype=result.outputs.dtype)
        raw[keep], raw[~keep] = result.outputs.detach(), repeated.detach()
        if learnt_features is None or repeated_features is None:
            return raw, None
        features = torch.empty((len(x), *learnt_features.shape[1:]), dtype=learnt_features.dtype)
        features[keep], features[~keep] = learnt_features, repeated_features
        return raw, features

    def _source_outputs(self, x: torch.Tensor, count: int) -> torch.Tensor | None:
        """What the source model serves for these inputs (None without a shadow, or where it is
        not finite: the guard and the comparison then skip the batch)."""
        if self.source is None:
            return None
        if self.source_tap is not None:
            self.source_tap.arm()
        with torch.inference_mode():  # the copy was made before the served model's feature tap
            served = self.task.served(self.source(x).float().reshape(count, -1))
        features = None if self.source_tap is None else self.source_tap.take()
        self._source_features = (features.float().numpy() if features is not None
                                 and bool(torch.isfinite(features).all()) else None)
        return served if bool(torch.isfinite(served).all()) else None

    def _mixed(self, candidates: dict[str, torch.Tensor | None]
               ) -> dict[str, torch.Tensor] | None:
        """The mixture's candidates for this batch, or None without a mixture or with one of
        them missing."""
        if self.mixture is None:
            return None
        mixed = {name: candidates.get(name) for name in self.mixture.names}
        last = candidates.get(self.mixture.names[-1])
        if NEWEST_LABEL in mixed:
            # no label yet (and none seeded from the reference data or the store,
            # `seed_newest_label`): the candidate repeats the last stage, so it moves no weight,
            # and the records still keep every candidate for the mixture and the comparison
            mixed[NEWEST_LABEL] = (last if self._newest_label is None or last is None
                                   else self._newest_label.expand(len(last), -1).clone())
        if RECENT_RESIDUAL in mixed:  # no label yet: the last stage, as the newest label does
            mixed[RECENT_RESIDUAL] = (last if not self._residuals or last is None else
                                      last + torch.from_numpy(np.mean(self._residuals, axis=0)))
        for name in self.online:
            if name in mixed and mixed[name] is None:  # nothing learnt yet, or River failed
                mixed[name] = last
        ready = {name: values for name, values in mixed.items() if values is not None}
        return ready if len(ready) == len(mixed) else None

    def seed_newest_label(self, label: torch.Tensor) -> bool:
        """Before this process joins its first label: the NEWEST_LABEL candidate serves `label`
        (a batch of one label: the labelled reference data's last, `mixture.newest_from_reference`)
        instead of the last stage, so that the first labels that come back judge it against
        the stages rather than find it equal to them; where the reference data ends where the
        stream begins it is the newest label there is. False (nothing set) without that
        candidate, after a joined label, or for a label that is no valid target (not finite, no
        class, not one label)."""
        try:
            target = self.task.targets(label, self.model.width).float()
        except (ValueError, RuntimeError):
            return False
        return self._seed_newest(target)

    def restore_newest_label(self, row: Sequence[float]) -> bool:
        """As `seed_newest_label`, from a target row a replica saved in the store
        (`newest_label_row`): the label that arrived last before this process started, which
        replaces the reference data's."""
        try:
            target = torch.tensor([list(row)], dtype=torch.float32)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            return False
        return self._seed_newest(target)

    def newest_label_row(self) -> list[float] | None:
        """The newest label this process joined, as a target row, for the store; None before
        any (a seed is not saved: it is no label this deployment joined)."""
        if not self._newest_joined or self._newest_label is None:
            return None
        return [float(v) for v in self._newest_label[0].tolist()]

    @property
    def has_newest_label(self) -> bool:
        """Whether the mixture has a NEWEST_LABEL candidate."""
        return self.mixture is not None and NEWEST_LABEL in self.mixture.names

    def _seed_newest(self, target: torch.Tensor) -> bool:
        if not self.has_newest_label or self._newest_joined:
            return False
        if target.shape != (1, self.model.width) or not bool(torch.isfinite(target).all()):
            return False
        # a class's row is a distribution (a one-hot label, or given probabilities)
        if self.task.discrete and (bool((target < 0).any())
                                   or abs(float(target.sum()) - 1.0) > 1e-4):
            return False
        self._newest_label = target
        return True

    def _collapsed(self, learnt: torch.Tensor, source: torch.Tensor | None) -> bool:
        """Whether the guard sees what learns collapsed against the source; a batch whose
        source outputs are not finite is left out (with a source copy)."""
        assert self.guard is not None
        if source is None and self.source is not None:
            return False
        if self.task.discrete:
            theirs = None if source is None else self.task.predictions(source).numpy()
            return self.guard.observe(self.task.predictions(learnt).numpy(), theirs)
        return self.guard.observe(learnt.numpy(), None if source is None else source.numpy())

    # --- drift ------------------------------------------------------------------------------

    def _watch(self, probabilities: np.ndarray | None, features: np.ndarray | None,
               count: int) -> None:
        if self.drift is not None:
            self._act(self.drift.observe_batch(probabilities, features, count))

    def _act(self, actions: list[Action]) -> None:
        """Apply the drift policy's actions, then the learning rates it wants now."""
        for action in actions:
            if action.name == "reset_adapter":
                self._reset("drift")
            elif action.name == "trim_memory":
                keep = int(action.detail.get("keep", 0))
                for memory in self.memories():
                    memory.trim(keep)
                    self._changed(MemoryTrimmed(memory.name, keep))
                self._report_memories()
            elif action.name == "reset_calibrator":
                self._changed(CalibratorReset())
        self._apply_rates()

    def resume_rates(self) -> None:
        """Engine thread only. The learning rates the drift policy wants now (after a restore)."""
        self._apply_rates(force=True)

    def _apply_rates(self, force: bool = False) -> None:
        """The test-time adapter at its base rate times the drift boost now and the class-run
        damping (`_runs_scale`), capped by its setter. What learns from labels stays at its base
        rate here and takes the boost at each labelled batch, by when its samples were served (the
        output corrector through `_label_rate`, the supervised step through
        `SupervisedStep.learn`)."""
        factors = (1.0 if self.drift is None else self.drift.factor(), self._runs_scale())
        if factors == self._factors and not force:
            return
        self._factors = factors
        boost, runs = factors
        for part, base in self._base_rates.items():
            part.set_learning_rate(base * boost * runs if part is self.adapter else base)
        self.metrics.learning_rate.set(self.adapter.learning_rate)

    @contextlib.contextmanager
    def _label_rate(self, part: Learner, served: np.ndarray | None,
                    count: int) -> Iterator[None]:
        """Within this block `part`, which learns from labels, steps at its base rate times the
        drift boost as it stood when those `count` labels' samples were served (`served`, the
        records' (process token, sample clock) rows; `DriftMonitor.factor_served`): a label of
        a sample served before a boost shows the concept before the change, and is not learnt
        faster for arriving after it. The output corrector's: each of its steps trains on its
        window of the newest labelled samples, at the rate of the batch that brought the newest
        (the supervised step's replays likewise, `SupervisedStep.learn`)."""
        base = self._base_rates.get(part)
        if base is None or self.drift is None:
            yield
            return
        part.set_learning_rate(base * self.drift.factor_served(served, count))
        try:
            yield
        finally:
            part.set_learning_rate(base)

    def learn(self, batch: LabelledBatch) -> None:
        """Engine thread only. What joined labels teach: rows for the error memory (already in
        the store), true-label rows for AdaNPC, a step of the output corrector, labelled samples
        for the supervised step, and the labelled drift signal."""
        if self._memory_asleep and len(batch.labels):
            self.wake_memory()
        if self.error_memory is not None and batch.error_memory_rows is not None:
            self.error_memory.add_rows(batch.error_memory_rows)
        if self.adanpc is not None and batch.features is not None:
            # AdaNPC: each labelled sample joins the memory with its true label
            before = self.adanpc.observed
            if self.adanpc.learn(torch.from_numpy(batch.features),
                                 torch.from_numpy(batch.labels.astype(np.int64))):
                self._changed(MemoryRowsAdded(self.adanpc.name, self.adanpc.rows(since=before),
                                              self.adanpc.capacity))
        if self.output_corrector is not None and batch.before_corrector is not None:
            features = None if batch.features is None else torch.from_numpy(batch.features)
            with self._label_rate(self.output_corrector, batch.learnt_served,
                                  len(batch.labels)):
                self.output_corrector.learn(features, torch.from_numpy(batch.before_corrector),
                                            torch.from_numpy(batch.labels.astype(np.float32)))
            self.metrics.correction_steps.inc()
        if self.supervised is not None and batch.inputs is not None:
            self._supervised_inputs.append(torch.from_numpy(batch.inputs))
            self._supervised_labels.append(torch.from_numpy(batch.labels))
            served = batch.learnt_served
            if served is None or np.size(served) != 2 * len(batch.labels):
                served = np.full((len(batch.labels), 2), np.nan)
            self._supervised_served.append(np.asarray(served, dtype=np.float64).reshape(-1, 2))
            self._supervised_step()
        self._report_memories()
        if (self.runs is not None and batch.runs_places is not None
                and batch.runs_labels is not None):
            self.runs.learn_labels(batch.runs_places, batch.runs_labels)
        if batch.errors is not None:
            self.observe_errors(batch.errors, batch.served, batch.judged)
        self._compare(batch)
        if self.has_newest_label and len(batch.labels):
            newest = torch.from_numpy(batch.labels[-1:])
            self._newest_label = self.task.targets(newest, self.model.width).float()
            self._newest_joined = True
            self.newest_joins += 1
        if len(batch.labels):
            self._wake_online()
        if (self.mixture is not None and batch.candidates is not None
                and batch.candidate_labels is not None):
            # a candidate row that is not finite (a guess never made) would make every weight
            # NaN, or (argmax) a classifier's guess of class 0: such rows teach nothing
            finite = np.all([np.isfinite(v.reshape(len(v), -1)).all(axis=1)
                             for v in batch.candidates.values()], axis=0)
            labels = batch.candidate_labels
            self.mixture.learn(self.mixture.losses(
                self.task, {n: v[finite] for n, v in batch.candidates.items()}, labels[finite]))
            if RECENT_RESIDUAL in self.mixture.names:
                self._learn_residuals(batch, finite)
        if (self.mixture is not None and batch.rates_served is not None
                and batch.rates_labels is not None):
            # a row not finite (no stored record has one: such labels are refused) teaches none
            finite = np.isfinite(batch.rates_served.reshape(len(batch.rates_served), -1)).all(1)
            self.mixture.learn_served(self.mixture.served_losses(
                self.task, batch.rates_served[finite], batch.rates_labels[finite]))
        if self.mixture is not None:
            for name, weight in zip(self.mixture.names, self.mixture.weights, strict=True):
                self.metrics.mixture_weight.labels(name).set(weight)
            if len(self.mixture.etas) > 1:
                for eta, share in zip(self.mixture.etas, self.mixture.rate_share, strict=True):
                    self.metrics.mixture_rate_share.labels(f"{eta:g}").set(float(share))

    def _learn_residuals(self, batch: LabelledBatch, finite: np.ndarray) -> None:
        """The last stage's residuals (label less what it served) for the RECENT_RESIDUAL
        candidate: of records this process served since its last reset (where records say;
        another replica's last stage, or the one before a reset, erred otherwise), in order."""
        assert self.mixture is not None and batch.candidates is not None
        keep = finite.copy()
        served = batch.candidate_served
        if self.drift is not None and served is not None and len(served) == len(keep):
            keep &= (served[:, 0] == self.drift.token) & (served[:, 1] > self._residuals_from)
        if not keep.any():
            return
        assert batch.candidate_labels is not None
        last = batch.candidates[self.mixture.names[-1]][keep].reshape(int(keep.sum()), -1)
        targets = self.task.targets(torch.from_numpy(batch.candidate_labels[keep]),
                                    self.model.width)
        self._residuals.extend(targets.float().numpy() - last)

    def _wake_online(self) -> None:
        """River's learners wake at this replica's first joined label, before they learn any,
        and keep a copy of themselves as they slept (`_online_dream`)."""
        if self.online and self._online_asleep:
            self._online_dream = copy.deepcopy(self.online)
            self._online_asleep = False

    def guess_asleep(self, name: str, inputs: np.ndarray) -> np.ndarray | None:
        """Engine thread only. The guesses of learner `name` for records served while it slept
        (on this replica or another with it), made by its copy as it slept: what it would have
        guessed then (it learnt nothing meanwhile). None where that copy guesses nothing
        (nothing learnt, or River failed): the rows then repeat the last stage, as a batch
        served without a guess does, and move no weight. Wakes the learners first, before they
        learn any label: `FeedbackService` asks before the labels are learnt, one learner and
        one slice a job, so predictions run between."""
        self._wake_online()
        dream = (self._online_dream or {}).get(name)
        if dream is None:
            return None
        guesses = self._predict_each({name: dream}, inputs)[name]
        return None if guesses is None else guesses.numpy()

    def _online_predict(self, inputs: np.ndarray) -> dict[str, torch.Tensor | None]:
        """River's learners' predictions, each None (the mixture then repeats the last stage in
        its place) before its first label or when River raises: a candidate is never a reason to
        fail a batch."""
        return self._predict_each(self.online, inputs)

    def _predict_each(self, learners: dict[str, OnlineLearner], inputs: np.ndarray
                      ) -> dict[str, torch.Tensor | None]:
        guesses: dict[str, torch.Tensor | None] = {}
        for name, learner in learners.items():
            try:
                guesses[name] = learner.predict(inputs)
            except Exception as error:  # any: River's code, on inputs the model took
                self._online_failed(name, "predict", error)
                guesses[name] = None
        return guesses

    def learn_online(self, name: str, inputs: np.ndarray, labels: np.ndarray) -> None:
        """Engine thread only. River's learner `name` learns these joined labels (a slice of
        them: `FeedbackService` submits one learner and one slice a job, so predictions run
        between)."""
        if len(labels):
            self._wake_online()
        try:
            self.online[name].learn(inputs, labels)
        except Exception as error:  # any: the labels are joined and taught to the rest
            self._online_failed(name, "learn", error)

    def _online_failed(self, name: str, what: str, error: Exception) -> None:
        self.online_failures[name] += 1
        failures = self.online_failures[name]
        if failures == 1 or failures % 1000 == 0:
            log.warning("mixture.learner: River's %s (%s) failed to %s (%s: %s; %d failures so "
                        "far); the mixture serves the other candidates meanwhile",
                        self.online[name].kind, name, what, type(error).__name__, error,
                        failures)

    def _compare(self, batch: LabelledBatch) -> None:
        """The shadow comparison: reset every learning part when the labels say that what is
        served has become worse than the source model."""
        if (self.comparison is None or batch.adapted_errors is None
                or batch.source_errors is None or batch.epochs is None):
            return
        current = batch.epochs == self._epoch  # served by the learning in force now
        if not current.any():
            return
        worse = self.comparison.observe(batch.adapted_errors[current],
                                        batch.source_errors[current])
        self.metrics.shadow_error.labels("adapted").set(self.comparison.learnt_error or 0.0)
        self.metrics.shadow_error.labels("source").set(self.comparison.source_error or 0.0)
        if worse:
            detail = self.comparison.describe()
            self._reset("shadow")
            self.events.record("shadow", "shadow", "adapter_reset",
                               adapted_error=detail["adapted_error"],
                               source_error=detail["source_error"], labels=detail["labels"],
                               evidence=detail["worse_evidence"])

    def observe_errors(self, errors: np.ndarray, served: np.ndarray | None = None,
                       judged: np.ndarray | None = None) -> None:
        """Engine thread only. The labelled drift signal of joined labels (also of those this
        model cannot learn from, an older model's records: the detectors still see them), and
        by which process and when their samples were served (`BatchOutput.served`; NaN where a
        record does not say), for the drift policy's judge."""
        if self.drift is not None and len(errors):
            self._act(self.drift.observe_labels(errors, served, judged))

    def _supervised_step(self) -> None:
        assert self.supervised is not None
        waiting = sum(len(x) for x in self._supervised_inputs)
        if waiting < self.supervised_batch:
            return
        inputs = torch.cat(self._supervised_inputs).reshape(-1, *self.model.input_shape)
        labels = self.task.label_tensor(torch.cat(self._supervised_labels), len(inputs))
        served = np.concatenate(self._supervised_served) if self._supervised_served else None
        self._supervised_inputs.clear()
        self._supervised_labels.clear()
        self._supervised_served.clear()
        armed, self.tap.armed = self.tap.armed, False  # the step's forward keeps no features
        before = self.supervised.steps
        try:
            # the drift boost as it stood when these labels' samples were served, for the step
            # on them and its replays (`SupervisedStep.learn` says why the replays too)
            boost = 1.0 if self.drift is None else self.drift.factor_served(served, len(inputs))
            self.supervised.learn(inputs, labels, boost=boost)
        finally:
            self.tap.armed = armed
            self.metrics.supervised_steps.inc(max(0, self.supervised.steps - before))

    def _report_memories(self) -> None:
        for memory in self.memories():
            self.metrics.memory_size.labels(memory.name).set(len(memory))

    def _reset_after_collapse(self) -> None:
        assert self.guard is not None
        measured = dict(self.guard.last)
        self._reset("collapse")
        self.events.record("collapse", "guard", "adapter_reset", window=self.guard.window,
                           **measured)

    def reset_adapter(self, source: str = "operator") -> None:
        """Engine thread only. Back to the source weights, the memories to their seed (or empty),
        recorded as an event; the memories' stored rows follow through `take_changes`."""
        self._reset(source)
        self.events.record("reset", source, "adapter_reset")

    def _reset(self, reason: str) -> None:
        for part in self.learners():
            part.reset()
        if self.guard is not None:
            self.guard.clear()
        if self.comparison is not None:
            self.comparison.clear()
        self._epoch = (self._epoch + 1 + secrets.randbelow(2**24 - 1)) % 2**24  # never the same
        self._supervised_inputs.clear()
        self._supervised_labels.clear()
        self._supervised_served.clear()
        self._residuals.clear()  # the residuals of what was reset, not of what serves now
        if self.drift is not None:  # and none of records served before it, however late
            self._residuals_from = float(self.drift.samples)
        if self.recent is not None:  # the source model has learnt from none of them
            self.recent.clear()
        if self.runs is not None:  # the class mix it divides by was the old model's
            self.runs.reset()
        # the memories hold what the old model did: the AdaNPC memory goes back to its seed, the
        # error memory (errors of the old model's outputs) empties
        for memory in self.memories():
            memory.reset()
            self._changed(MemoryCleared(memory.name))
        self._resets += 1
        self._report_memories()
        self.metrics.adapter_resets.labels(reason).inc()
        self._apply_rates(force=True)  # base rates (the filter is reset); a boost in force stays
        self.metrics.learning_rate.set(self.adapter.learning_rate)

    def learned_version(self) -> tuple[int, ...]:
        """Engine thread only. Changes whenever a learned weight may have: steps of the adapter,
        the supervised step and the corrector, and resets."""
        if not self.adapter.state_dict() and len(self.learners()) == 1:
            return (0,)  # nothing a checkpoint would hold
        return (self.adapter.version, self.adapter.steps,
                0 if self.supervised is None else self.supervised.steps,
                0 if self.output_corrector is None else self.output_corrector.steps, self._resets)

    def _learned(self) -> dict[str, Learner]:
        """Everything whose weights a checkpoint holds, by key prefix (the output corrector's
        is "correction.", as in the checkpoints saved before it had that name)."""
        parts: dict[str, Learner] = {"": self.adapter}
        if self.supervised is not None:
            parts["supervised."] = self.supervised
        if self.output_corrector is not None:
            parts["correction."] = self.output_corrector
        return parts

    def checkpoint(self) -> bytes:
        """Engine thread only. The learned state (the adapter's, and the supervised step's and
        the output corrector's where configured) as safetensors bytes, tagged with the model
        version and the parts, so it is never restored onto another model or composition."""
        from safetensors.torch import save

        state: dict[str, torch.Tensor] = {}
        for prefix, part in self._learned().items():
            for key, value in part.state_dict().items():
                state[prefix + key] = value.detach().contiguous().cpu()
        return save(state, metadata=self._checkpoint_tags())

    def _checkpoint_tags(self) -> dict[str, str]:
        return {"model_version": self.model.version,
                "adapter": self.adapter.name,
                "norm": self.adapter.norm,
                "parts": ",".join(sorted(p.rstrip(".") for p in self._learned() if p))}

    def restore(self, blob: bytes) -> bool:
        """Engine thread only. Load a checkpoint made by `checkpoint`; False if it was made for
        another model version, method, normalisation or composition, or does not fit (then
        nothing changes)."""
        from safetensors.torch import load

        metadata = safetensors_metadata(blob)
        tags = self._checkpoint_tags()
        if {k: metadata.get(k, "") for k in tags} != tags:
            return False
        loaded = load(blob)
        parts = self._learned()
        current = {prefix: part.state_dict() for prefix, part in parts.items()}
        try:
            for prefix, part in sorted(parts.items(), key=lambda item: -len(item[0])):
                own = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)
                       and not any(k.startswith(p) for p in parts if len(p) > len(prefix))}
                part.load_state_dict(own)
        except (ValueError, RuntimeError, KeyError):
            for prefix, part in parts.items():  # a checkpoint that does not fit changes nothing
                part.load_state_dict(current[prefix])
            return False
        self.metrics.learning_rate.set(self.adapter.learning_rate)
        return True

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
