"""The diagonal Fisher information that EATA and PSMT use to keep important weights near source.

As in the EATA reference (mr-eggplant/EATA): for each batch of in-distribution data, the gradient
of the batch-mean cross-entropy against the model's own argmax predictions, squared elementwise;
the Fisher is the mean of these squares over batches. Test-time statistics are frozen meanwhile,
so estimating the Fisher never moves the robust BN averages.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters.tta.norm import frozen_statistics


def fisher_information(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: torch.Tensor,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradients of CE(model(x), argmax model(x)), per parameter.

    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> params = dict(model.named_parameters())
    >>> fisher = fisher_information(model, params, torch.randn(10, 3), batch_size=5)
    >>> sorted(fisher), tuple(fisher["0.weight"].shape)
    (['0.bias', '0.weight'], (2, 3))
    """
    if len(inputs) == 0:
        raise ValueError("the Fisher needs in-distribution data; got no samples")
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    wanted = {name: p.requires_grad for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    batches = 0
    with frozen_statistics(model), torch.enable_grad():
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size]
            outputs = model(x)
            loss = F.cross_entropy(outputs, outputs.argmax(1))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), grad in zip(params.items(), grads, strict=True):
                if grad is not None:
                    fisher[name] += grad.detach() ** 2
            batches += 1
    for name, p in params.items():
        p.requires_grad_(wanted[name])
    return {name: value / batches for name, value in fisher.items()}
