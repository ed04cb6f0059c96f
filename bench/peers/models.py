"""The models every server in `bench.serve` serves, built the same way in every process.

Only torch, numpy and safetensors are imported here (and the two factories' modules, which import
no more), so the peers' virtual environment, which has no adaptd installed, can load them with the
repository root on PYTHONPATH.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bench import resnet_cifar
from service import demo

# name -> (factory as `adaptd serve --model-factory` takes it, the served model's name, one
# sample's shape)
MODELS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "demo": ("service.demo:digits_cnn", "digits-cnn", demo.INPUT_SHAPE),
    "resnet": ("bench.resnet_cifar:resnet8", "resnet8-cifar", resnet_cifar.INPUT_SHAPE),
}


def load_model(name: str) -> nn.Module:
    """Model `name` of MODELS in eval mode: the demo CNN with its bundled weights, or ResNet-8
    with its seeded random ones."""
    if name == "demo":
        from safetensors.torch import load_file

        model = demo.digits_cnn()
        model.load_state_dict(load_file(str(demo.WEIGHTS_PATH)))
        return model.eval()
    if name == "resnet":
        return resnet_cifar.resnet8()
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")


def classify(model: nn.Module, inputs: torch.Tensor) -> tuple[list[list[float]], list[int]]:
    """(probabilities, predicted class) per sample, as plain lists for a JSON answer."""
    with torch.inference_mode():
        probabilities = torch.softmax(model(inputs).float(), dim=1)
    return probabilities.tolist(), probabilities.argmax(dim=1).tolist()
