"""The bundled demo: a small BatchNorm CNN on scikit-learn's handwritten digits, upsampled to 16x16.

`adaptd serve` with no configuration serves this model, so a newcomer sees the whole loop with no
network, no Redis and no model of their own. The weights ship with the package
(`service/assets/digits_cnn.safetensors`); `train_digits_cnn` rebuilds them deterministically in a
few seconds on two cores, and `python -m service.demo` rewrites the shipped file.

The data split is the one the Digits-C benchmark uses: `load_digits`, pixel values scaled to [0, 1],
bilinear upsampling to 16x16, split in half, stratified, with a fixed seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 16, 16)
NUM_CLASSES = 10
WEIGHTS_PATH = Path(__file__).parent / "assets" / "digits_cnn.safetensors"
SPLIT_SEED = 0


def digits_cnn() -> nn.Module:
    """Three conv-BatchNorm-ReLU blocks, global average pooling and one linear classifier.

    >>> digits_cnn()(torch.zeros(2, *INPUT_SHAPE)).shape
    torch.Size([2, 10])
    """
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16, 1), *block(16, 32, 2), *block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, NUM_CLASSES),
    )


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 16, 16) in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=INPUT_SHAPE[1:], mode="bilinear", align_corners=False)
    x_train, x_test, y_train, y_test = train_test_split(
        images.numpy(), digits.target.astype(np.int64),
        test_size=0.5, stratify=digits.target, random_state=SPLIT_SEED,
    )
    return x_train, y_train, x_test, y_test


def train_digits_cnn(epochs: int = 15, seed: int = 0) -> nn.Module:
    """Train the demo CNN on the training half; deterministic for a given torch build."""
    torch.manual_seed(seed)
    x_train, y_train, _, _ = digits_split()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description="Retrain the demo CNN and write its weights.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    model = train_digits_cnn(args.epochs)
    _, _, x_test, y_test = digits_split()
    with torch.inference_mode():
        accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {"model": "digits_cnn", "test_accuracy": f"{accuracy:.4f}"}
    save_file(state, str(args.out), metadata=metadata)
    print(f"wrote {args.out} (test accuracy {accuracy:.4f})")


if __name__ == "__main__":
    main()
