"""Tent: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021).

Reference: DequanWang/tent. Only the affine weight and bias of the normalisation layers train;
BatchNorm normalises with the current batch's statistics (running buffers dropped); the loss is the
batch mean of the softmax entropy; Adam (lr 1e-3, betas 0.9/0.999) takes one step per batch; the
outputs returned are those of the forward that produced the loss, before the step.

Deliberate deviation: the reference calls `model.train()`, which also switches dropout on. A
service must not answer with dropout noise, so only the normalisation layers go to train mode and
everything else stays in evaluation mode (identical for models without dropout).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from adapters.base import Adapter, AdaptOutput, softmax_entropy

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def configure_model(model: nn.Module) -> nn.Module:
    """Freeze everything but normalisation affines; BatchNorm uses batch statistics only."""
    model.eval()
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            module.requires_grad_(True)
        if isinstance(module, BATCH_NORMS):
            module.train()
            # as the reference: normalise by the test batch, never by (or into) running buffers
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
    return model


def collect_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The affine weight and bias of every normalisation layer, with their qualified names."""
    params, names = [], []
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            for param_name, param in module.named_parameters(recurse=False):
                if param_name in ("weight", "bias"):
                    params.append(param)
                    names.append(f"{module_name}.{param_name}")
    return params, names


class Tent(Adapter):
    """Entropy minimisation on normalisation affines, one Adam step per batch.

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    >>> tent = Tent(model)
    >>> result = tent.adapt(torch.randn(16, 4))
    >>> result.stepped, result.backward_samples, tent.steps
    (True, 16, 1)
    >>> tent.reset(); tent.steps
    0
    """

    name = "tent"
    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__(configure_model(model))
        self.params, self.param_names = collect_params(model)
        if not self.params:
            raise ValueError(
                "tent adapts normalisation layers (BatchNorm, LayerNorm, GroupNorm) and this model "
                "has none; serve it with adapter 'none'"
            )
        self.optimizer = torch.optim.Adam(self.params, lr=learning_rate, betas=betas)
        self.source_model_state = copy.deepcopy(model.state_dict())
        self.source_optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def adapt(self, x: torch.Tensor) -> AdaptOutput:
        with torch.enable_grad():
            outputs = self.model(x)
            loss = softmax_entropy(outputs).mean(0)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.backward_samples += x.shape[0]
        self.version += 1
        return AdaptOutput(
            outputs=outputs.detach(), stepped=True, backward_samples=x.shape[0], loss=loss.item()
        )

    def reset(self) -> None:
        """Restore the source weights and a fresh optimizer, exactly as at construction."""
        self.model.load_state_dict(self.source_model_state, strict=True)
        self.optimizer.load_state_dict(copy.deepcopy(self.source_optimizer_state))
        super().reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(zip(self.param_names, self.params, strict=True))
        state = {f"param.{name}": p.detach().clone() for name, p in params.items()}
        for index, param_state in self.optimizer.state_dict()["state"].items():
            for key, value in param_state.items():
                state[f"optim.{index}.{key}"] = torch.as_tensor(value).clone()
        state["steps"] = torch.tensor(self.steps)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"param.{name}" for name in self.param_names}
        missing = expected - state.keys()
        if missing:
            raise ValueError(
                f"tent checkpoint lacks {sorted(missing)}; was it made for this model?"
            )
        with torch.no_grad():
            for name, param in zip(self.param_names, self.params, strict=True):
                param.copy_(state[f"param.{name}"])
        optim_state = self.optimizer.state_dict()
        optim_state["state"] = {}
        for key, value in state.items():
            if key.startswith("optim."):
                _, index, field = key.split(".", 2)
                optim_state["state"].setdefault(int(index), {})[field] = value.clone()
        self.optimizer.load_state_dict(optim_state)
        self.steps = int(state.get("steps", torch.tensor(0)))
        self.version += 1
