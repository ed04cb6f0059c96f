"""Test-time BatchNorm: the model's normalisation layers use statistics of the test stream, and
nothing else changes (Schneider et al., NeurIPS 2020, "Improving robustness against common
corruptions by covariate shift adaptation"; Nado et al. 2020, "Evaluating prediction-time batch
normalization for robustness under covariate shift").

With the default `norm = "robust"` every BatchNorm layer keeps an exponential moving average of
the test batches' mean and second moment (see `adapters.tta.norm`), and serves each sample of a
batch by the average as it stood after it, so single requests and batches see the same model;
`norm = "batch"` uses each batch's own statistics, as the papers do.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from adapters.tta.base import Adapter, AdaptOutput, balanced_statistics
from adapters.tta.norm import STATISTICS_BUFFERS, RobustBatchNorm, configure_norm, frozen_statistics


class NormStatistics(Adapter):
    """Test-time normalisation statistics only, no gradient (the "BN statistics" baseline).

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    >>> adapter = NormStatistics(model)
    >>> adapter.adapt(torch.randn(1, 4)).outputs.shape
    torch.Size([1, 3])
    """

    name = "bn"

    def __init__(self, model: nn.Module, norm: str = "robust", norm_momentum: float = 0.02,
                 num_classes: int | None = None,
                 norm_window: int = 500) -> None:
        super().__init__(configure_norm(model, norm, norm_momentum))
        model.requires_grad_(False)
        self.norm = norm
        self.statistics = balanced_statistics(self.model, norm, norm_momentum, num_classes,
                                              norm_window)

    def describe(self) -> dict[str, object]:
        described = {**super().describe(), "norm": self.norm}
        if self.statistics is not None:
            described["statistics"] = self.statistics.describe()
        return described

    def adapt(self, x: torch.Tensor) -> AdaptOutput:
        if self.statistics is not None:
            self.statistics.begin()
        with torch.no_grad():
            outputs = self.model(x)
        if self.statistics is not None:
            self.statistics.observe(x, outputs)
        return AdaptOutput(outputs=outputs)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        with frozen_statistics(self.model, own_batch=False):
            return self.model(x)

    def reset(self) -> None:
        for module in self.model.modules():
            if isinstance(module, RobustBatchNorm):
                module.reset_statistics()
        if self.statistics is not None:
            self.statistics.reset()
        super().reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()
                if k.endswith(STATISTICS_BUFFERS)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)
        self.version += 1

