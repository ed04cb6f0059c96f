"""What every part that learns online shares: a learning rate the drift policy can scale, state a
checkpoint carries, a reset back to the source, and a description for `/v1/state`.

The test-time adapters (`adapters.tta`), the supervised step (`adapters.labels.lowrank`) and the
output corrector (`adapters.labels.output_corrector`) all implement `Learner`, so the engine boosts,
resets and checkpoints them through one interface. The optimizer helpers below are the machinery
they share: a rate cap that keeps every parameter group's ratio, a step that is not taken when
a loss or gradient is not finite, and an optimizer's moments as plain named tensors so a
checkpoint is safetensors, never a pickle.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Learner(Protocol):
    """A part that learns online: rate, state, reset, description.

    >>> import torch.nn as nn
    >>> from adapters.tta.tent import Tent
    >>> isinstance(Tent(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))), Learner)
    True
    """

    @property
    def learning_rate(self) -> float:
        """The rate in force (0 for a part without an optimizer)."""
        ...

    def set_learning_rate(self, learning_rate: float) -> float:
        """Ask for a rate; returns the rate in force after the part's own cap."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything learned, as named tensors (a checkpoint's contents)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of `state_dict`; raises `ValueError` when the state does not fit."""
        ...

    def reset(self) -> None:
        """Back to the source: nothing learned."""
        ...

    def describe(self) -> dict[str, object]:
        """Public state for `/v1/state` and the start-up log."""
        ...


def set_capped_learning_rate(
    optimizer: torch.optim.Optimizer, learning_rate: float, cap: float
) -> float:
    """Set the first parameter group's rate to `learning_rate` clamped to [0, cap], and scale the
    others so every group keeps its ratio to the rate it started with; returns the rate in force."""
    learning_rate = min(max(learning_rate, 0.0), cap)
    groups = optimizer.param_groups
    for group in groups:
        group.setdefault("initial_lr", group["lr"])
    scale = learning_rate / groups[0]["initial_lr"]
    for group in groups:
        group["lr"] = group["initial_lr"] * scale
    return float(groups[0]["lr"])


def step_if_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
    """The optimizer step on the gradients `loss.backward()` left, unless the loss or any
    gradient is NaN or infinite: then no parameter (nor the optimizer's moments) changes. The
    gradients are cleared either way. True if it stepped."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    finite = torch.isfinite(loss.detach()).all()
    if grads:
        finite = finite & torch.stack([torch.isfinite(g).all() for g in grads]).all()
    stepped = bool(finite)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state (Adam's moments, its step) as flat named tensors,
    `optim.<index>.<field>`, so a checkpoint is plain safetensors."""
    return {f"optim.{index}.{key}": torch.as_tensor(value).clone()
            for index, param_state in optimizer.state_dict()["state"].items()
            for key, value in param_state.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer,
                           state: dict[str, torch.Tensor]) -> None:
    """The inverse of `optimizer_tensors`; keys not starting with `optim.` are ignored."""
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {}
    for key, value in state.items():
        if key.startswith("optim."):
            _, index, field = key.split(".", 2)
            optimizer_state["state"].setdefault(int(index), {})[field] = value.clone()
    optimizer.load_state_dict(optimizer_state)

