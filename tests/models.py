"""Small models for the tests, importable by factory string (`tests.models:...`)."""

from __future__ import annotations

import torch
import torch.nn as nn

POISON = 13.0


class Poisoned(nn.Module):
    """An MLP classifier over 4 features that raises on any sample holding the value 13.0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == POISON).any()):
            raise ValueError("poisoned sample")
        return self.body(x)


def poisoned() -> nn.Module:
    return Poisoned()


def regressor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))


class _Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(1, keepdim=True) * 2


def no_linear() -> nn.Module:
    """A regressor with no nn.Linear at all, so it has no features to key a memory by."""
    return _Doubler()


def forecaster() -> nn.Module:
    """A regressor of two values per sample (two horizons)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))


def binary() -> nn.Module:
    """A two-class classifier over 4 features, with BatchNorm for a test-time adapter to train;
    on standard normal inputs it predicts both classes about evenly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():  # class 0 iff the features sum above 0
        eye = torch.eye(4)
        model[0].weight.copy_(torch.cat([eye, -eye]))
        model[0].bias.zero_()
        model[3].weight.copy_(torch.tensor([[1.0] * 4 + [-1.0] * 4, [-1.0] * 4 + [1.0] * 4]))
        model[3].bias.zero_()
    return model.eval()
