"""No adaptation: the source model, frozen, in evaluation mode (the baseline every method beats)."""

from __future__ import annotations

import torch
import torch.nn as nn

from adapters.tta.base import Adapter, AdaptOutput


class NoAdaptation(Adapter):
    """Serve the model as trained: evaluation mode, no gradients, no state.

    >>> import torch, torch.nn as nn
    >>> adapter = NoAdaptation(nn.Linear(3, 2))
    >>> adapter.adapt(torch.zeros(4, 3)).outputs.shape
    torch.Size([4, 2])
    """

    name = "none"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        model.eval()
        model.requires_grad_(False)

    def adapt(self, x: torch.Tensor) -> AdaptOutput:
        return AdaptOutput(outputs=self.infer(x))
