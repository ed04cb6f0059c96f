"""Corruptions of 16x16 grey digits in [0, 1], the domains of the Digits-C stream.

Each takes a batch (N, 1, 16, 16) float32 and a numpy Generator (fresh randomness per domain) and
returns the corrupted batch, clipped to [0, 1]. Severities are chosen so the source model's error
lands between a few and ninety percent, as CIFAR-10-C's level 5 does for its models.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, sigma: float = 0.3) -> np.ndarray:
    return x + rng.normal(0.0, sigma, x.shape)


def shot_noise(x: np.ndarray, rng: np.random.Generator, photons: float = 4.0) -> np.ndarray:
    return rng.poisson(x * photons) / photons


def salt_and_pepper(x: np.ndarray, rng: np.random.Generator, amount: float = 0.12) -> np.ndarray:
    out = x.copy()
    hit = rng.random(x.shape)
    out[hit < amount / 2] = 0.0
    out[hit > 1 - amount / 2] = 1.0
    return out


def speckle_noise(x: np.ndarray, rng: np.random.Generator, sigma: float = 0.6) -> np.ndarray:
    return x + x * rng.normal(0.0, sigma, x.shape)


def gaussian_blur(x: np.ndarray, rng: np.random.Generator, sigma: float = 1.2) -> np.ndarray:
    radius = 3
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = torch.from_numpy(np.outer(taps, taps) / np.outer(taps, taps).sum()).float()
    images = torch.from_numpy(x).float()
    blurred = F.conv2d(F.pad(images, [radius] * 4, mode="replicate"), kernel[None, None])
    return blurred.numpy()


def pixelate(x: np.ndarray, rng: np.random.Generator, size: int = 6) -> np.ndarray:
    images = torch.from_numpy(x).float()
    small = F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="nearest").numpy()


def contrast(x: np.ndarray, rng: np.random.Generator, factor: float = 0.3) -> np.ndarray:
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * factor + mean


def brightness(x: np.ndarray, rng: np.random.Generator, shift: float = 0.4) -> np.ndarray:
    return x + shift


def rotation(x: np.ndarray, rng: np.random.Generator, degrees: float = 25.0) -> np.ndarray:
    """Each image turned by ±`degrees` (the sign drawn per image)."""
    angles = np.deg2rad(degrees) * rng.choice([-1.0, 1.0], size=len(x))
    cos, sin = np.cos(angles), np.sin(angles)
    theta = torch.tensor(np.stack([np.stack([cos, -sin, 0 * cos], 1),
                                   np.stack([sin, cos, 0 * cos], 1)], 1), dtype=torch.float32)
    images = torch.from_numpy(x).float()
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros").numpy()


def zoom(x: np.ndarray, rng: np.random.Generator, scale: float = 1.5) -> np.ndarray:
    """Magnified about the centre, so strokes thicken and the digit's edges leave the frame."""
    theta = torch.tensor([[1 / scale, 0, 0], [0, 1 / scale, 0]], dtype=torch.float32)
    images = torch.from_numpy(x).float()
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False).numpy()


DOMAINS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "salt_pepper": salt_and_pepper,
    "speckle_noise": speckle_noise,
    "blur": gaussian_blur,
    "pixelate": pixelate,
    "contrast": contrast,
    "brightness": brightness,
    "rotation": rotation,
    "zoom": zoom,
}


def corrupt(name: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One domain of the stream, clipped back to the input range.

    >>> x = np.full((2, 1, 16, 16), 0.5, dtype=np.float32)
    >>> corrupt("contrast", x, np.random.default_rng(0)).shape
    (2, 1, 16, 16)
    """
    out = DOMAINS[name](x, rng)
    assert math.isfinite(float(np.abs(out).max()))
    return np.clip(out, 0.0, 1.0).astype(np.float32)
