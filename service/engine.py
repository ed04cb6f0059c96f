"""The engine: the single writer of the model.

One worker thread owns the model and everything that learns online: the test-time adapter, the
AdaNPC memory, the error memory (ReLoop2 compensation), the output corrector and the supervised
step. Every forward pass, every adaptation step, every update from labels and every reset runs on
that thread, in the order it was submitted, so the model never sees two writers and none of these
parts needs a lock. Async code hands work over with `Engine.run`.

A batch goes: the model (logits or values, and the features entering its last linear layer), the
test-time adapter's step, AdaNPC's vote (classification), the output corrector (regression), then
the error memory's compensation. What the label path needs later (the outputs before each
correction, the inputs for a supervised step) comes back in `BatchOutput.arrays` for the records.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from adapters import Adapter
from adapters.labels.lowrank import SupervisedStep
from adapters.labels.output_corrector import OutputCorrector
from adapters.memory.adanpc import AdaNPC
from adapters.memory.error_memory import ErrorMemory, HashedErrorMemory
from adapters.tta.guard import CollapseGuard
from drift import Action
from service.events import EventLog
from service.metrics import Metrics
from service.model import FeatureTap, LoadedModel
from service.monitor import DriftMonitor

T = TypeVar("T")


@dataclass
class Housekeeping:
    """Store work that follows what the engine did: memories reset (clear their stored rows) or
    trimmed by a drift action (keep their newest rows), the calibrator reset by one."""

    cleared: tuple[str, ...] = ()
    trimmed: dict[str, int] = field(default_factory=dict)
    calibrator_reset: bool = False

    def __bool__(self) -> bool:
        return bool(self.cleared or self.trimmed or self.calibrator_reset)


@dataclass
class BatchOutput:
    """One forward pass, as numpy rows: what the caller gets and what the record keeps."""

    predictions: np.ndarray
    outputs: np.ndarray
    features: np.ndarray | None
    entropy: np.ndarray | None
    adapter_version: int
    # rows this batch added to the AdaNPC memory (for the store)
    memory_rows: np.ndarray | None = None
    # store work after resets and drift actions since the last report
    housekeeping: Housekeeping = field(default_factory=Housekeeping)
    # per-sample vectors the label path needs, (n, ...) each: "base" (the outputs before the error
    # memory's compensation), "raw" (a regressor's values before the corrector), "inputs"
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class LabelledBatch:
    """Joined labels as the engine learns from them; rows are aligned, absent parts are None."""

    labels: np.ndarray
    features: np.ndarray | None = None
    compensation_rows: np.ndarray | None = None  # packed by the error memory, already stored
    raw: np.ndarray | None = None
    inputs: np.ndarray | None = None
    errors: np.ndarray | None = None  # the labelled drift signal of every joined label


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes: a little-endian u64 header length, then JSON."""
    if len(blob) < 8:
        raise ValueError("not a safetensors checkpoint: too short")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("not a safetensors checkpoint: header runs past the end")
    return json.loads(blob[8:8 + size]).get("__metadata__", {})


Compensation = ErrorMemory | HashedErrorMemory


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        adapter: Adapter,
        metrics: Metrics,
        events: EventLog,
        guard: CollapseGuard | None = None,
        memory: AdaNPC | None = None,
        compensation: Compensation | None = None,
        correction: OutputCorrector | None = None,
        supervised: SupervisedStep | None = None,
        supervised_batch: int = 32,
        drift: DriftMonitor | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.metrics = metrics
        self.events = events
        self.guard = guard
        self.memory = memory
        self.compensation = compensation
        self.correction = correction
        self.supervised = supervised
        self.supervised_batch = supervised_batch
        self._supervised_inputs: list[torch.Tensor] = []
        self._supervised_labels: list[torch.Tensor] = []
        self.drift = drift
        self._cleared: set[str] = set()
        self._trimmed: dict[str, int] = {}
        self._calibrator_reset = False
        # every learning part's own rate, which a drift boost multiplies
        self._base_rates = {part: part.learning_rate for part in (adapter, supervised, correction)
                            if part is not None and part.learning_rate > 0}
        self._factor = 1.0
        self._resets = 0
        self.tap = FeatureTap(model.module)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptd-engine")
        metrics.learning_rate.set(adapter.learning_rate)
        self._report_memories()

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run `fn` on the engine thread, after everything submitted before it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    async def predict(self, inputs: np.ndarray, adapt: bool = True) -> BatchOutput:
        return await self.run(self.forward, inputs, adapt)

    def forward(self, inputs: np.ndarray, adapt: bool = True) -> BatchOutput:
        """Engine thread only. Predict a batch; with `adapt`, let the adapter take its step."""
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        version = self.adapter.version
        self.tap.arm()
        if adapt:
            result = self.adapter.adapt(x)
            outputs = result.outputs
            if result.stepped:
                self.metrics.adaptation_steps.inc()
                self.metrics.adaptation_samples.inc(result.backward_samples)
                self.metrics.learning_rate.set(self.adapter.learning_rate)
        else:
            outputs = self.adapter.infer(x)
        features = self.tap.take()
        outputs = outputs.detach().float().reshape(x.shape[0], -1)
        features_np = None if features is None else features.float().numpy()
        arrays: dict[str, np.ndarray] = {}
        if self.supervised is not None:
            arrays["inputs"] = x.reshape(x.shape[0], -1).numpy()
        if self.model.task != "classification":
            if self.correction is not None:
                arrays["raw"] = outputs.numpy()
                outputs = self.correction.correct(features, outputs)
            outputs = self._compensated(features, outputs, arrays)
            if adapt:
                self._watch(None, features_np, len(outputs))
            return BatchOutput(predictions=outputs[:, 0].numpy(), outputs=outputs.numpy(),
                               features=features_np, entropy=None, adapter_version=version,
                               housekeeping=self._take_housekeeping(), arrays=arrays)
        probabilities = outputs.softmax(1)
        # the drift detectors watch the model's own distribution: the memories' votes and
        # corrections change by themselves as they fill, which is no drift of the inputs
        model_probabilities = probabilities.numpy()
        memory_rows = None
        if self.memory is not None and features is not None:
            # AdaNPC: the memory's vote replaces the model's softmax; confident samples join it
            probabilities = self.memory.vote(features)
            if adapt:
                before = self.memory.observed
                if self.memory.observe(features, probabilities):
                    memory_rows = self.memory.rows(since=before)
                self.metrics.memory_size.labels(self.memory.name).set(len(self.memory))
        probabilities = self._compensated(features, probabilities, arrays)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1)
        self.metrics.mean_entropy.set(float(entropy.mean()))
        predictions = probabilities.argmax(1).numpy()
        if adapt and self.guard is not None and self.guard.observe(predictions):
            self._reset_after_collapse()
        if adapt:
            self._watch(model_probabilities, features_np, len(predictions))
        housekeeping = self._take_housekeeping()
        return BatchOutput(predictions=predictions, outputs=probabilities.numpy(),
                           features=features_np, entropy=entropy.numpy(), adapter_version=version,
                           memory_rows=None if AdaNPC.name in housekeeping.cleared
                           else memory_rows, housekeeping=housekeeping, arrays=arrays)

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
                for memory in (self.memory, self.compensation):
                    if memory is not None:
                        memory.trim(keep)
                        self._trimmed[memory.name] = keep
                self._report_memories()
            elif action.name == "reset_calibrator":
                self._calibrator_reset = True
        self._apply_rates()

    def resume_rates(self) -> None:
        """Engine thread only. The learning rates the drift policy wants now (after a restore)."""
        self._apply_rates(force=True)

    def _apply_rates(self, force: bool = False) -> None:
        """Every learning part at its base rate times the drift boost (capped by its setter)."""
        factor = 1.0 if self.drift is None else self.drift.factor()
        if factor == self._factor and not force:
            return
        self._factor = factor
        for part, base in self._base_rates.items():
            part.set_learning_rate(base * factor)
        self.metrics.learning_rate.set(self.adapter.learning_rate)

    def _compensated(self, features: torch.Tensor | None, outputs: torch.Tensor,
                     arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """ReLoop2: the error memory's correction of the outputs; the base kept for the labels."""
        if self.compensation is None or features is None:
            return outputs
        arrays["base"] = outputs.numpy()
        return self.compensation.compensate(features, outputs)

    def learn(self, batch: LabelledBatch) -> Housekeeping:
        """Engine thread only. What joined labels teach: rows for the error memory (already in
        the store), a step of the output corrector, labelled samples for the supervised step,
        and the labelled drift signal. Returns the store work its drift actions left."""
        if self.compensation is not None and batch.compensation_rows is not None:
            self.compensation.add_rows(batch.compensation_rows)
        if self.correction is not None and batch.raw is not None:
            features = None if batch.features is None else torch.from_numpy(batch.features)
            self.correction.learn(features, torch.from_numpy(batch.raw),
                                  torch.from_numpy(batch.labels.astype(np.float32)))
            self.metrics.correction_steps.inc()
        if self.supervised is not None and batch.inputs is not None:
            self._supervised_inputs.append(torch.from_numpy(batch.inputs))
            self._supervised_labels.append(torch.from_numpy(batch.labels))
            self._supervised_step()
        self._report_memories()
        if self.drift is not None and batch.errors is not None and len(batch.errors):
            self._act(self.drift.observe_labels(batch.errors))
        return self._take_housekeeping()

    def observe_errors(self, errors: np.ndarray) -> Housekeeping:
        """Engine thread only. The labelled drift signal of labels this model cannot learn from
        (an older model's records): the detectors still see them."""
        if self.drift is not None and len(errors):
            self._act(self.drift.observe_labels(errors))
        return self._take_housekeeping()

    def _supervised_step(self) -> None:
        assert self.supervised is not None
        waiting = sum(len(x) for x in self._supervised_inputs)
        if waiting < self.supervised_batch:
            return
        inputs = torch.cat(self._supervised_inputs).reshape(-1, *self.model.input_shape)
        labels = torch.cat(self._supervised_labels)
        self._supervised_inputs.clear()
        self._supervised_labels.clear()
        if self.model.task == "classification":
            labels = labels.reshape(-1).long()
        else:
            labels = labels.reshape(len(inputs), -1).float()
        armed, self.tap.armed = self.tap.armed, False  # the step's forward keeps no features
        try:
            self.supervised.step(inputs, labels)
        finally:
            self.tap.armed = armed
        self.metrics.supervised_steps.inc()

    def _report_memories(self) -> None:
        for memory in (self.memory, self.compensation):
            if memory is not None:
                self.metrics.memory_size.labels(memory.name).set(len(memory))

    def _take_housekeeping(self) -> Housekeeping:
        work = Housekeeping(tuple(sorted(self._cleared)), self._trimmed, self._calibrator_reset)
        self._cleared, self._trimmed, self._calibrator_reset = set(), {}, False
        return work

    def _reset_after_collapse(self) -> None:
        assert self.guard is not None
        effective = self.guard.last_effective
        self._reset("collapse")
        self.events.record(
            "collapse", "guard", "adapter_reset", effective_classes=effective,
            threshold=self.guard.threshold, window=self.guard.window,
        )

    def reset_adapter(self, source: str = "operator") -> Housekeeping:
        """Engine thread only. Back to the source weights, the memories to their seed (or empty),
        recorded as an event. Returns the store work: the memories reset, whose stored rows the
        caller clears too."""
        self._reset(source)
        self.events.record("reset", source, "adapter_reset")
        return self._take_housekeeping()

    def _reset(self, reason: str) -> None:
        self.adapter.reset()
        if self.guard is not None:
            self.guard.clear()
        if self.supervised is not None:
            self.supervised.reset()
            self._supervised_inputs.clear()
            self._supervised_labels.clear()
        if self.correction is not None:
            self.correction.reset()
        # the memories hold what the old model did: the AdaNPC memory goes back to its seed, the
        # error memory (errors of the old model's outputs) empties
        for memory in (self.memory, self.compensation):
            if memory is not None:
                memory.reset()
                self._cleared.add(memory.name)
        self._resets += 1
        self._report_memories()
        self.metrics.adapter_resets.labels(reason).inc()
        self._apply_rates(force=True)  # a reset restores base rates; a boost in force stays
        self.metrics.learning_rate.set(self.adapter.learning_rate)

    def learned_version(self) -> tuple[int, ...]:
        """Engine thread only. Changes whenever a learned weight may have: steps of the adapter,
        the supervised step and the corrector, and resets."""
        if not self.adapter.state_dict() and self.supervised is None and self.correction is None:
            return (0,)  # nothing a checkpoint would hold
        return (self.adapter.version, self.adapter.steps,
                0 if self.supervised is None else self.supervised.steps,
                0 if self.correction is None else self.correction.steps, self._resets)

    def _learned(self) -> dict[str, object]:
        """Everything whose weights a checkpoint holds, by key prefix."""
        parts: dict[str, object] = {"": self.adapter}
        if self.supervised is not None:
            parts["supervised."] = self.supervised
        if self.correction is not None:
            parts["correction."] = self.correction
        return parts

    def checkpoint(self) -> bytes:
        """Engine thread only. The learned state (the adapter's, and the supervised step's and
        the output corrector's where configured) as safetensors bytes, tagged with the model
        version and the parts, so it is never restored onto another model or composition."""
        from safetensors.torch import save

        state: dict[str, torch.Tensor] = {}
        for prefix, part in self._learned().items():
            for key, value in part.state_dict().items():  # type: ignore[attr-defined]
                state[prefix + key] = value.detach().contiguous().cpu()
        return save(state, metadata=self._checkpoint_tags())

    def _checkpoint_tags(self) -> dict[str, str]:
        return {"model_version": self.model.version,
                "adapter": self.adapter.name,
                "norm": str(getattr(self.adapter, "norm", "")),
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
        current = {prefix: part.state_dict() for prefix, part in parts.items()}  # type: ignore
        try:
            for prefix, part in sorted(parts.items(), key=lambda item: -len(item[0])):
                own = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)
                       and not any(k.startswith(p) for p in parts if len(p) > len(prefix))}
                part.load_state_dict(own)  # type: ignore[attr-defined]
        except (ValueError, RuntimeError, KeyError):
            for prefix, part in parts.items():  # a checkpoint that does not fit changes nothing
                part.load_state_dict(current[prefix])  # type: ignore[attr-defined]
            return False
        self.metrics.learning_rate.set(self.adapter.learning_rate)
        return True

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
