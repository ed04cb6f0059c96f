"""The adapter interface every online method shares.

An adapter owns a model and turns a batch into outputs, possibly updating the model on the way:
`adapt(x)` predicts and may take a step (the outputs are always the ones computed *before* any
update, as the reference implementations return them), `infer(x)` predicts without touching any
state, `reset()` returns to the source weights, and `state_dict()`/`load_state_dict()` carry
whatever the method learned so a checkpoint can restore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax, -(softmax(z) * log_softmax(z)).sum(1), as in Tent."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@dataclass
class AdaptOutput:
    """One batch through an adapter: the outputs it returned and what the step did."""

    outputs: torch.Tensor
    stepped: bool = False
    backward_samples: int = 0
    loss: float | None = None


class Adapter:
    """Base class: subclasses implement `adapt`, and override the rest when they hold state."""

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("classification", "regression")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps = 0
        self.backward_samples = 0
        self.version = 0

    @property
    def learning_rate(self) -> float:
        return 0.0

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
