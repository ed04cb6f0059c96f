"""Loading the served model: a factory, optional safetensors weights, and a check that it fits.

A model is named by a factory (`package.module:function` returning an `nn.Module`) so any ordinary
PyTorch model works unchanged; weights come only from safetensors files, never from pickles. The
features that memory-based adapters use are the input of the model's last `nn.Linear`, taken by a
forward hook (`FeatureTap`).
"""

from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from adapters.task import Task, task_named
from service.settings import DEMO_FACTORY, ModelSettings


class ModelLoadError(RuntimeError):
    """The configured model cannot be served; the message says what to change."""


# the square root of float32's largest value: a value up to this can be squared without overflow
SQRT_FLOAT32_MAX = math.sqrt(float(torch.finfo(torch.float32).max))
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LoadedModel:
    module: nn.Module
    name: str
    task: Task
    input_shape: tuple[int, ...]
    num_classes: int | None
    class_names: list[str] | None
    version: str
    num_outputs: int
    # the largest |value| an input may hold (model.max_abs_input, or `input_bound` of the model)
    max_abs_input: float = SQRT_FLOAT32_MAX

    @property
    def width(self) -> int:
        """Outputs per sample as served: the class count, or the regressor's values."""
        return self.num_classes or self.num_outputs


class FeatureTap:
    """Keeps the input of the last `nn.Linear` from the most recent forward pass.

    >>> model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    >>> tap = FeatureTap(model)
    >>> _ = model(torch.zeros(4, 3)); _ = model(torch.zeros(9, 3))
    >>> tap.layer_name, tuple(tap.features.shape)
    ('2', (4, 5))
    """

    def __init__(self, model: nn.Module) -> None:
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        self.features: torch.Tensor | None = None
        self.layer_name: str | None = None
        self.armed = True
        self._handle = None
        if linears:
            self.layer_name, layer = linears[-1]
            self._handle = layer.register_forward_hook(self._keep)

    def remove(self) -> None:
        """Detach the hook (a tap used once, at start-up)."""
        if self._handle is not None:
            self._handle.remove()

    def arm(self) -> None:
        """Keep only the next forward's features: an adapter may run more forwards in one call
        (a step over its buffer), and the features that matter are those of the prediction."""
        self.features = None
        self.armed = True

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        if self.armed:
            self.features = inputs[0].detach()
            self.armed = False

    def take(self) -> torch.Tensor | None:
        """The features of the last forward, flattened per sample; clears them."""
        features, self.features = self.features, None
        return None if features is None else features.reshape(features.shape[0], -1)


def import_factory(spec: str):
    """Resolve `package.module:function`."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelLoadError(f"model.factory {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} for model.factory: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ModelLoadError(f"module {module_name!r} has no {attribute!r}") from None


def weights_version(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def load_model(settings: ModelSettings) -> LoadedModel:
    """Build, load and dry-run the configured model; raise `ModelLoadError` with a fix otherwise."""
    from safetensors.torch import load_file

    factory = import_factory(settings.factory)
    module = factory()
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{settings.factory} returned {type(module).__name__}, not nn.Module")
    weights = settings.weights
    if weights is None and settings.factory == DEMO_FACTORY:
        from service.demo import WEIGHTS_PATH

        weights = WEIGHTS_PATH
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise ModelLoadError(f"model.weights {weights} does not exist")
        try:
            state = load_file(str(weights))
            module.load_state_dict(state, strict=True)
        except Exception as exc:  # safetensors and torch both raise plain exceptions here
            raise ModelLoadError(f"cannot load {weights} into {settings.factory}: {exc}") from exc
        version = f"{settings.name}@{weights_version(weights)}"
    else:
        version = f"{settings.name}@init"
    module.eval()
    num_outputs = _dry_run(module, settings)
    task = task_named(settings.task)
    max_abs_input = settings.max_abs_input
    if max_abs_input is None:
        max_abs_input = input_bound(module)
    return LoadedModel(
        module=module,
        name=settings.name,
        task=task,
        input_shape=tuple(settings.input_shape),
        num_classes=settings.num_classes if task.discrete else None,
        class_names=settings.class_names,
        version=version,
        num_outputs=num_outputs,
        max_abs_input=max_abs_input,
    )


def input_bound(module: nn.Module) -> float:
    """The largest |x| an input may hold so that the model's first weight layer cannot overflow
    float32, even when a following normalisation squares its outputs: sqrt(float32 max) over the
    largest L1 norm of one output unit's weights plus |its bias|, over the first `nn.Linear` or
    `nn.Conv1d/2d/3d` in module order (sqrt(float32 max) when the model has none).

    >>> layer = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5]])), layer.bias.fill_(1.0)
    >>> f"{input_bound(nn.Sequential(layer, nn.ReLU())):.3g}"  # sqrt(3.4e38) / (1 + 2 + 1)
    '4.61e+18'
    """
    layer = next((m for m in module.modules() if isinstance(m, WEIGHT_LAYERS)), None)
    if layer is None:
        return SQRT_FLOAT32_MAX
    with torch.no_grad():
        weight = layer.weight.detach().double()
        norms = weight.abs().reshape(weight.shape[0], -1).sum(1)
        if layer.bias is not None:
            norms = norms + layer.bias.detach().double().abs()
        largest = float(norms.max()) if norms.numel() else 0.0
    if not math.isfinite(largest):
        raise ModelLoadError(f"the model's first weight layer {type(layer).__name__} holds a "
                             "weight that is not finite")
    return SQRT_FLOAT32_MAX / largest if largest > 0 else SQRT_FLOAT32_MAX


def _dry_run(module: nn.Module, settings: ModelSettings) -> int:
    """One forward on zeros, so a wrong input shape or class count fails at start-up, not later."""
    try:
        with torch.inference_mode():
            outputs = module(torch.zeros(2, *settings.input_shape))
    except Exception as exc:
        raise ModelLoadError(
            f"the model fails on input shape {settings.input_shape}: {exc}; "
            "set model.input_shape to the shape of one sample"
        ) from exc
    if not isinstance(outputs, torch.Tensor) or outputs.shape[0] != 2:
        raise ModelLoadError("the model must return one tensor with a row per sample")
    outputs = outputs.reshape(2, -1)
    if task_named(settings.task).discrete and outputs.shape[1] != settings.num_classes:
        raise ModelLoadError(
            f"the model returns {outputs.shape[1]} scores per sample, "
            f"model.num_classes says {settings.num_classes}"
        )
    return int(outputs.shape[1])
