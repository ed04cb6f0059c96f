"""In-distribution reference data: what the source model saw, for methods that need a baseline.

EATA and PSMT estimate a Fisher on it, AdaNPC seeds its memory with it, the collapse guard
measures the source model's prediction diversity on it, the error memory centres its keys on its
features and conformal calibration takes a regressor's score range from its labels. The demo model
uses its own training split; a user model names (`model.reference_data`) a safetensors file with an
`inputs` tensor (N, *input_shape) and, optionally, `labels` (N,).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from service.model import LoadedModel, ModelLoadError
from service.settings import DEMO_FACTORY, Settings


@dataclass
class ReferenceData:
    inputs: torch.Tensor
    labels: torch.Tensor | None
    # the file's last label, a batch of one, whatever `model.reference_samples` keeps: where the
    # rows are in time order, the newest label known before the stream (the mixture's newest
    # label starts as it, `mixture.newest_from_reference`)
    last_label: torch.Tensor | None = None


def load_reference_data(settings: Settings, model: LoadedModel) -> ReferenceData | None:
    """The configured reference data, at most `model.reference_samples` rows, or None."""
    limit = settings.model.reference_samples
    path = settings.model.reference_data
    if path is None:
        if settings.model.factory != DEMO_FACTORY:
            return None
        from service.demo import digits_split

        x_train, y_train, _, _ = digits_split()
        return ReferenceData(torch.from_numpy(x_train[:limit]), torch.from_numpy(y_train[:limit]),
                             torch.from_numpy(y_train[-1:]))
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelLoadError(f"model.reference_data {path} does not exist")
    tensors = load_file(str(path))
    if "inputs" not in tensors:
        raise ModelLoadError(f"{path} has no tensor named 'inputs' (it has {sorted(tensors)})")
    inputs = tensors["inputs"].float()[:limit]
    if tuple(inputs.shape[1:]) != model.input_shape:
        raise ModelLoadError(
            f"{path}: inputs have shape {list(inputs.shape[1:])} per sample, the model takes "
            f"{list(model.input_shape)}"
        )
    labels = tensors.get("labels")
    last = None
    if labels is not None:
        if len(labels) != len(tensors["inputs"]):
            raise ModelLoadError(f"{path}: {len(labels)} labels for {len(tensors['inputs'])} "
                                 "inputs")
        labels = labels.long() if model.task.discrete else labels.float()
        last = labels[-1:]
        labels = labels[:limit]
    return ReferenceData(inputs, labels, last)


@torch.inference_mode()
def source_predictions(model: LoadedModel, reference: ReferenceData) -> torch.Tensor:
    """The source model's predicted classes on the reference data (model still in eval mode)."""
    return torch.cat([model.module(reference.inputs[i:i + 256]).argmax(1)
                      for i in range(0, len(reference.inputs), 256)])


@torch.inference_mode()
def source_features(model: LoadedModel, reference: ReferenceData) -> torch.Tensor | None:
    """The input of the last `nn.Linear` for the reference data, from the source model."""
    from service.model import FeatureTap

    tap = FeatureTap(model.module)
    if tap.layer_name is None:
        return None
    batches = []
    for start in range(0, len(reference.inputs), 256):
        tap.arm()
        model.module(reference.inputs[start:start + 256])
        features = tap.take()
        assert features is not None  # the tap is armed and the model has its layer
        batches.append(features)
    tap.remove()
    return torch.cat(batches)


@torch.inference_mode()
def feature_width(model: LoadedModel) -> int | None:
    """The width of the features entering the last `nn.Linear` (a dry run on zeros); None when
    the model has no linear layer."""
    from service.model import FeatureTap

    tap = FeatureTap(model.module)
    if tap.layer_name is None:
        return None
    model.module(torch.zeros(2, *model.input_shape))
    features = tap.take()
    tap.remove()
    return None if features is None else int(features.shape[1])


@torch.inference_mode()
def served_entropy(model: LoadedModel, reference: ReferenceData,
                   infer: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
    """The mean entropy (nats) of the probabilities `infer` (the adapter's inference, as served)
    gives the reference data: the level a served batch's entropy is measured against by a
    calibrator that reads it. None for a regressor."""
    if not model.task.discrete or not len(reference.inputs):
        return None
    total = 0.0
    for start in range(0, len(reference.inputs), 256):
        raw = infer(reference.inputs[start:start + 256]).float()
        entropy = model.task.entropy(model.task.served(raw.reshape(len(raw), -1)))
        assert entropy is not None  # a classifier's probabilities
        total += float(entropy.sum())
    return total / len(reference.inputs)
