"""The engine: the single writer of the model.

One worker thread owns the model and its adapter. Every forward pass, every adaptation step and
every reset runs on that thread, in the order it was submitted, so the model never sees two writers
and an adapter needs no locks. Async code hands work over with `Engine.run`.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from adapters import Adapter
from adapters.adanpc import AdaNPC
from adapters.guard import CollapseGuard
from service.events import EventLog
from service.metrics import Metrics
from service.model import FeatureTap, LoadedModel

T = TypeVar("T")


@dataclass
class BatchOutput:
    """One forward pass, as numpy rows: what the caller gets and what the record keeps."""

    predictions: np.ndarray
    outputs: np.ndarray
    features: np.ndarray | None
    entropy: np.ndarray | None
    adapter_version: int
    # rows this batch added to the memory (for the store), and whether the memory was reset first
    memory_rows: np.ndarray | None = None
    memory_reset: bool = False


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes: a little-endian u64 header length, then JSON."""
    if len(blob) < 8:
        raise ValueError("not a safetensors checkpoint: too short")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("not a safetensors checkpoint: header runs past the end")
    return json.loads(blob[8:8 + size]).get("__metadata__", {})


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        adapter: Adapter,
        metrics: Metrics,
        events: EventLog,
        guard: CollapseGuard | None = None,
        memory: AdaNPC | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.metrics = metrics
        self.events = events
        self.guard = guard
        self.memory = memory
        self._memory_reset = False
        self.tap = FeatureTap(model.module)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptd-engine")
        metrics.learning_rate.set(adapter.learning_rate)

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
        if self.model.task != "classification":
            return BatchOutput(predictions=outputs[:, 0].numpy(), outputs=outputs.numpy(),
                               features=features_np, entropy=None, adapter_version=version)
        probabilities = outputs.softmax(1)
        memory_rows = None
        if self.memory is not None and features is not None:
            # AdaNPC: the memory's vote replaces the model's softmax; confident samples join it
            probabilities = self.memory.vote(features)
            if adapt:
                before = self.memory.observed
                if self.memory.observe(features, probabilities):
                    memory_rows = self.memory.rows(since=before)
                self.metrics.memory_size.labels(self.memory.name).set(len(self.memory))
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1)
        self.metrics.mean_entropy.set(float(entropy.mean()))
        predictions = probabilities.argmax(1).numpy()
        if adapt and self.guard is not None and self.guard.observe(predictions):
            self._reset_after_collapse()
        memory_reset, self._memory_reset = self._memory_reset, False
        return BatchOutput(predictions=predictions, outputs=probabilities.numpy(),
                           features=features_np, entropy=entropy.numpy(), adapter_version=version,
                           memory_rows=None if memory_reset else memory_rows,
                           memory_reset=memory_reset)

    def _reset_after_collapse(self) -> None:
        assert self.guard is not None
        effective = self.guard.last_effective
        self._reset("collapse")
        self.events.record(
            "collapse", "guard", "adapter_reset", effective_classes=effective,
            threshold=self.guard.threshold, window=self.guard.window,
        )

    def reset_adapter(self, source: str = "operator") -> bool:
        """Engine thread only. Back to the source weights (and the memory to its seed), recorded
        as an event. True when a memory was reset, so the caller clears its stored rows too."""
        self._reset(source)
        self.events.record("reset", source, "adapter_reset")
        memory_reset, self._memory_reset = self._memory_reset, False
        return memory_reset

    def _reset(self, reason: str) -> None:
        self.adapter.reset()
        if self.guard is not None:
            self.guard.clear()
        if self.memory is not None:
            self.memory.reset()
            self._memory_reset = True
            self.metrics.memory_size.labels(self.memory.name).set(len(self.memory))
        self.metrics.adapter_resets.labels(reason).inc()
        self.metrics.learning_rate.set(self.adapter.learning_rate)

    def checkpoint(self) -> bytes:
        """Engine thread only. The adapter's learned state as safetensors bytes, tagged with the
        model version and adapter name so it is never restored onto another model."""
        from safetensors.torch import save

        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter.state_dict().items()}
        return save(state, metadata={"model_version": self.model.version,
                                     "adapter": self.adapter.name,
                                     "norm": str(getattr(self.adapter, "norm", ""))})

    def restore(self, blob: bytes) -> bool:
        """Engine thread only. Load a checkpoint made by `checkpoint`; False if it was made for
        another model version, method or normalisation, or does not fit (then nothing changes)."""
        from safetensors.torch import load

        metadata = safetensors_metadata(blob)
        if (metadata.get("model_version"), metadata.get("adapter"), metadata.get("norm")) != (
            self.model.version, self.adapter.name, str(getattr(self.adapter, "norm", ""))
        ):
            return False
        current = self.adapter.state_dict()
        try:
            self.adapter.load_state_dict(load(blob))
        except (ValueError, RuntimeError, KeyError):
            self.adapter.load_state_dict(current)  # a checkpoint that does not fit changes nothing
            return False
        self.metrics.learning_rate.set(self.adapter.learning_rate)
        return True

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
