"""The adapter interface every online method shares, and the machinery gradient methods share.

An adapter owns a model and turns a batch into outputs, possibly updating the model on the way:
`adapt(x)` predicts and may take a step (the outputs are always the ones computed *before* any
update, as the reference implementations return them), `infer(x)` predicts without touching any
state, `reset()` returns to the source weights, and `state_dict()`/`load_state_dict()` carry
whatever the method learned so a checkpoint can restore it.

`GradientAdapter` is where a service goes beyond the papers. The references take one step per
batch of 64 to 200 samples; a service also sees single requests. So a batch of at least
`adapt_batch_size` samples takes the reference path (one forward, predict then step on it), and
smaller batches are predicted at once and kept in a buffer until `adapt_batch_size` samples have
arrived, when one step is taken on the buffer. Normalisation uses robust test-time statistics by
default (see `adapters.tta.norm`), so one-at-a-time and batched streams see nearly the same model.

Nothing is learned from what is not finite: the buffer takes only the samples whose outputs are
finite, and every method steps through `GradientAdapter.take_step`, which takes no step when the
loss or a gradient is NaN or infinite (`skipped_steps` counts those); robust BatchNorm keeps its
average when a batch's statistics are not finite.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, TypedDict

import torch
import torch.nn as nn

from adapters.learner import (
    load_optimizer_tensors,
    optimizer_tensors,
    set_capped_learning_rate,
    step_if_finite,
)
from adapters.tta.balanced import BalancedStatistics
from adapters.tta.norm import STATISTICS_BUFFERS, configure_norm, frozen_statistics


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax, -(softmax(z) * log_softmax(z)).sum(1), as in Tent."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@dataclass
class AdaptOutput:
    """One batch through an adapter: the outputs it returned and what the step did (`skipped`:
    a step was due but not taken, its loss or a gradient not finite)."""

    outputs: torch.Tensor
    stepped: bool = False
    backward_samples: int = 0
    loss: float | None = None
    skipped: bool = False


def balanced_statistics(model: nn.Module, norm: str, momentum: float, num_classes: int | None,
                        window: int) -> BalancedStatistics | None:
    """The class-balanced statistics that `norm = "balanced"` normalises by."""
    if norm != "balanced":
        return None
    return BalancedStatistics(model, num_classes, momentum, window)


def companion_state(model: nn.Module, params: dict[str, nn.Parameter], prefix: str
                    ) -> dict[str, torch.Tensor]:
    """A second model's trained parameters and test-time statistics, each under `prefix.` (a
    teacher beside a student: PSMT's, RoTTA's), for a checkpoint."""
    state = {f"{prefix}.{name}": p.detach().clone() for name, p in params.items()}
    state.update({f"{prefix}.{name}": b.detach().clone() for name, b in model.named_buffers()
                  if name.endswith(STATISTICS_BUFFERS)})
    return state


def companion_keys(state: dict[str, torch.Tensor], expected: set[str], prefix: str,
                   method: str) -> None:
    """Refuse a checkpoint that lacks any of the second model's keys, before anything loads."""
    missing = expected - state.keys()
    if missing:
        raise ValueError(f"{method} checkpoint lacks the {prefix}'s {sorted(missing)[:5]}; was it "
                         f"made by {method} for this model?")


def load_companion_state(model: nn.Module, state: dict[str, torch.Tensor], expected: set[str],
                         prefix: str) -> None:
    """Copy what `companion_state` saved back into the second model."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for key in expected:
            tensors[key.removeprefix(f"{prefix}.")].copy_(state[key])


class Adapter:
    """Base class: subclasses implement `adapt`, and override the rest when they hold state."""

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("classification", "regression")
    # which normalisation statistics it runs with ("robust", "balanced", "batch", "source"); "" for
    # none
    norm: str = ""
    # whether its steps are taken on a class-balanced memory rather than on the batch served: the
    # engine then leaves its rate alone where classes come in runs (`Engine._runs_scale`)
    balanced_steps: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps = 0
        self.backward_samples = 0
        self.version = 0

    @property
    def learning_rate(self) -> float:
        return 0.0

    def set_learning_rate(self, learning_rate: float) -> float:
        """Methods without an optimizer ignore this; returns the rate in force."""
        return self.learning_rate

    def adapt(self, x: torch.Tensor) -> AdaptOutput:
        raise NotImplementedError

    @torch.inference_mode()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def reset(self) -> None:
        self.steps = 0
        self.version += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"adapter {self.name!r} holds no state, got keys {sorted(state)}")

    def describe(self) -> dict[str, object]:
        """The adapter's public state for `/v1/state` and the metrics."""
        return {
            "name": self.name,
            "learning_rate": self.learning_rate,
            "steps": self.steps,
            "backward_samples": self.backward_samples,
            "version": self.version,
        }


class CommonKnobs(TypedDict, total=False):
    """`GradientAdapter`'s keyword arguments, which each gradient method passes on as `**common`."""

    norm: str
    norm_momentum: float
    adapt_batch_size: int
    max_learning_rate: float
    norm_window: int


class GradientAdapter(Adapter):
    """Shared machinery of methods that take optimizer steps: the buffer, reset, the rate cap.

    Subclasses build `self.optimizer` over their parameters, call `self.snapshot_source()` once at
    the end of their constructor, and implement `predict(x)` (the method's output, no update) and
    `forward_and_adapt(x)` (the reference's per-batch step, returning the pre-update outputs).
    """

    optimizer: torch.optim.Optimizer

    def __init__(
        self,
        model: nn.Module,
        norm: str = "robust",
        norm_momentum: float = 0.02,
        adapt_batch_size: int = 64,
        max_learning_rate: float = math.inf,
        num_classes: int | None = None,
        norm_window: int = 500,
    ) -> None:
        super().__init__(configure_norm(model, norm, norm_momentum))
        model.requires_grad_(False)
        if adapt_batch_size < 1:
            raise ValueError("adapt_batch_size must be at least 1")
        self.norm = norm
        self.statistics = balanced_statistics(self.model, norm, norm_momentum, num_classes,
                                              norm_window)
        self.adapt_batch_size = adapt_batch_size
        self.max_learning_rate = max_learning_rate
        self.buffer: list[torch.Tensor] = []
        self.buffered = 0
        self.skipped_steps = 0

    def snapshot_source(self) -> None:
        """Remember the source state, including the optimizer's, for `reset()`."""
        self.source_model_state = copy.deepcopy(self.model.state_dict())
        self.source_optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        if self.learning_rate > self.max_learning_rate:
            raise ValueError(f"learning rate {self.learning_rate} is above the cap "
                             f"{self.max_learning_rate}")

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_and_adapt(self, x: torch.Tensor) -> AdaptOutput:
        raise NotImplementedError

    def take_step(self, loss: torch.Tensor) -> bool:
        """The optimizer step on the gradients `loss.backward()` left, unless the loss or any
        gradient is NaN or infinite: then no parameter (nor the optimizer's moments) changes and
        `skipped_steps` counts it. The gradients are cleared either way. True if it stepped.

        Every method steps through here, never through `self.optimizer.step()` directly.
        """
        stepped = step_if_finite(self.optimizer, loss)
        if not stepped:
            self.skipped_steps += 1
        return stepped

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_learning_rate(self, learning_rate: float) -> float:
        """Scale every parameter group to `learning_rate` (for the first group), within the cap."""
        return set_capped_learning_rate(self.optimizer, learning_rate, self.max_learning_rate)

    def adapt(self, x: torch.Tensor) -> AdaptOutput:
        if self.statistics is not None:
            self.statistics.begin()
        result = self._adapt(x)
        if self.statistics is not None:
            self.statistics.observe(x, result.outputs)
        return result

    def _adapt(self, x: torch.Tensor) -> AdaptOutput:
        if self.norm == "batch" or (x.shape[0] >= self.adapt_batch_size and not self.buffer):
            return self._account(self.forward_and_adapt(x))
        with torch.no_grad():
            outputs = self.predict(x)
        # only samples the model gives finite outputs for wait for the step
        finite = torch.isfinite(outputs.reshape(outputs.shape[0], -1)).all(1)
        kept = x.detach() if bool(finite.all()) else x.detach()[finite]
        if len(kept):
            self.buffer.append(kept)
            self.buffered += len(kept)
        if self.buffered < self.adapt_batch_size:
            return AdaptOutput(outputs=outputs)
        batch = torch.cat(self.buffer)
        self.buffer, self.buffered = [], 0
        with frozen_statistics(self.model):
            step = self._account(self.forward_and_adapt(batch))
        return dataclasses.replace(step, outputs=outputs)

    def _account(self, result: AdaptOutput) -> AdaptOutput:
        if result.stepped:
            self.steps += 1
            self.version += 1
            self.backward_samples += result.backward_samples
        return result

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        with frozen_statistics(self.model, own_batch=False):
            return self.predict(x)

    def reset(self) -> None:
        """Restore the source weights, statistics and a fresh optimizer; drop the buffer."""
        self.model.load_state_dict(self.source_model_state, strict=True)
        self.optimizer.load_state_dict(copy.deepcopy(self.source_optimizer_state))
        self.buffer, self.buffered = [], 0
        if self.statistics is not None:
            self.statistics.reset()
        super().reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trained parameters, test-time statistics, optimizer moments and the step count."""
        trainable = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        state = {f"param.{name}": p.detach().clone()
                 for name, p in self.model.named_parameters() if id(p) in trainable}
        state.update({f"buffer.{name}": b.detach().clone()
                      for name, b in self.model.named_buffers()
                      if name.endswith(STATISTICS_BUFFERS)})
        state.update(optimizer_tensors(self.optimizer))
        state["steps"] = torch.tensor(self.steps)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {k for k in self.state_dict() if k.startswith(("param.", "buffer."))}
        missing = expected - state.keys()
        if missing:
            raise ValueError(
                f"{self.name} checkpoint lacks {sorted(missing)[:5]}; was it made for this model?"
            )
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for key in expected:
                kind, name = key.split(".", 1)
                (params if kind == "param" else buffers)[name].copy_(state[key])
        load_optimizer_tensors(self.optimizer, state)
        self.steps = int(state.get("steps", torch.tensor(0)))
        self.buffer, self.buffered = [], 0
        self.version += 1

    def describe(self) -> dict[str, object]:
        described = {**super().describe(), "buffered_samples": self.buffered, "norm": self.norm,
                     "skipped_steps": self.skipped_steps}
        if self.statistics is not None:
            described["statistics"] = self.statistics.describe()
        return described
