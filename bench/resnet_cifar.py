"""A compute-bound model for serving benchmarks: CIFAR-style ResNets on 3x32x32 images.

The demo CNN takes about 1.5M multiply-adds a sample, so serving it measures the server more than
the model. These are He et al.'s ResNets for CIFAR-10 (a 3x3 stem, three stages of basic blocks
with 16/32/64 channels, BatchNorm after every convolution, global pooling, one linear layer):
ResNet-8 here (one block a stage, 78k parameters, about 12M multiply-adds a sample, what
`bench.serve` serves). A batch of 64 takes a good fraction of a second on two CPU cores, so a
server's own cost can be read against the model's.

The weights are random, drawn from a fixed seed (the same on every call and in every process, so
that servers in different processes answer alike): throughput does not depend on them, and the
benchmarks check that servers agree, not that the answers are right.

    ADAPTD_MODEL__INPUT_SHAPE="[3,32,32]" adaptd serve --model-factory bench.resnet_cifar:resnet8

References: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, section 4.2 (the CIFAR-10 networks, option A shortcuts replaced by 1x1 projections).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
SEED = 0


class BasicBlock(nn.Module):
    """Two 3x3 conv-BatchNorm layers and a shortcut (a 1x1 projection where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(blocks_per_stage: int) -> nn.Module:
    """A CIFAR ResNet with `blocks_per_stage` basic blocks in each of its three stages (depth
    6n + 2), seeded random weights, in eval mode.

    >>> model = resnet(1)
    >>> model(torch.zeros(2, *INPUT_SHAPE)).shape
    torch.Size([2, 10])
    >>> torch.equal(model[0].weight, resnet(1)[0].weight)
    True
    """
    def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [BasicBlock(c_in, c_out, stride),
                *(BasicBlock(c_out, c_out, 1) for _ in range(blocks_per_stage - 1))]

    # the global generator is left as it was: the seed is the model's own
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            *stage(16, 16, 1), *stage(16, 32, 2), *stage(32, 64, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, NUM_CLASSES),
        )
    return model.eval()


def resnet8() -> nn.Module:
    """ResNet-8: one basic block a stage (the factory `bench.serve` serves)."""
    return resnet(1)


def sample_images(count: int, seed: int = 1) -> torch.Tensor:
    """`count` images (count, 3, 32, 32) of seeded Gaussian noise, rounded to 3 decimals so that
    their JSON is short and every server parses the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(count, *INPUT_SHAPE, generator=generator), decimals=3)
