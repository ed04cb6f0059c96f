"""Tent: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021).

Reference: DequanWang/tent. Only the affine weight and bias of the normalisation layers train;
the loss is the batch mean of the softmax entropy; Adam (lr 1e-3, betas 0.9/0.999) takes one step
per batch; the outputs returned are those of the forward that produced the loss, before the step.

Deliberate deviations, for a service: the reference calls `model.train()`, which also switches
dropout on, so here only normalisation changes its test-time behaviour; with `norm="batch"` it
normalises by each batch exactly as the reference does, and with the default `norm="robust"` by
robust test-time statistics, taking its step once `adapt_batch_size` samples have arrived (see
`adapters.tta.base.GradientAdapter`).
"""

from __future__ import annotations

from typing import Unpack

import torch
import torch.nn as nn

from adapters.tta.base import AdaptOutput, CommonKnobs, GradientAdapter, softmax_entropy
from adapters.tta.norm import normalisation_affines


class Tent(GradientAdapter):
    """Entropy minimisation on normalisation affines, one Adam step per batch.

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    >>> tent = Tent(model, norm="batch")
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
        num_classes: int | None = None,
        **common: Unpack[CommonKnobs],
    ) -> None:
        super().__init__(model, num_classes=num_classes, **common)
        self.params, self.param_names = normalisation_affines(self.model)
        if not self.params:
            raise ValueError(
                "tent adapts normalisation layers (BatchNorm, LayerNorm, GroupNorm) and this model "
                "has none; serve it with adapter 'none'"
            )
        for param in self.params:
            param.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=learning_rate, betas=betas)
        self.snapshot_source()

    def forward_and_adapt(self, x: torch.Tensor) -> AdaptOutput:
        with torch.enable_grad():
            outputs = self.model(x)
            loss = softmax_entropy(outputs).mean(0)
            loss.backward()
        stepped = self.take_step(loss)  # no step on a NaN or infinite loss or gradient
        return AdaptOutput(outputs=outputs.detach(), stepped=stepped, skipped=not stepped,
                           backward_samples=x.shape[0], loss=loss.item())
