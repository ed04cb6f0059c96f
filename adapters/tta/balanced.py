"""Test-time statistics that a run of one class cannot drag, and RoTTA's class-balanced memory.

Real traffic arrives in runs: a camera sees one kind of object for minutes, a user sends the same
image again and again. Test-time BatchNorm that averages the stream as it comes (`norm = "robust"`)
then normalises by the statistics of one class, which removes exactly the features that tell the
classes apart: on Digits-C with a Dirichlet(0.1) class schedule, `bn` loses its whole gain.

RoTTA (Yuan et al., "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023; code:
BIT-DA/RoTTA, `core/utils/memory.py`, `core/utils/bn_layers.py`) updates its BN statistics only
from a category-balanced memory of recent samples (CSTU: category-balanced sampling with
timeliness and uncertainty). Each sample x with pseudo-label y = argmax p(x) and uncertainty
u = H(p(x)) / log C gets the score

    s(age, u) = lambda_t / (1 + exp(-age / N)) + lambda_u * u          N: the memory's capacity

(older and less certain is higher) and enters the memory when
- its class holds fewer than N / C items and the memory is not full: it is simply added;
- its class holds fewer than N / C and the memory is full: the highest-scoring item of the
  majority classes leaves, if that score is above the new sample's;
- its class is full: the highest-scoring item of its own class leaves, if above the new sample's.
Every sample offered ages every item by one. Reference defaults: N = 64, lambda_t = lambda_u = 1,
statistics momentum 0.05 per update, one update per 64 samples.

Here `BalancedMemory` is RoTTA's memory (`adapters.tta.rotta`). `BalancedStatistics` is what
`norm = "balanced"` gives every other method: class-wise averages of the statistics, mixed by the
classes' long-run shares (its docstring has the equations). It was measured against feeding the
statistics from this memory instead, which lost (BENCHMARKS.md, B1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from adapters.tta.norm import RobustBatchNorm


@dataclass
class _Item:
    x: torch.Tensor
    uncertainty: float
    born: int
    key: bytes


class BalancedMemory:
    """RoTTA's CSTU memory: at most `capacity` samples, `capacity / num_classes` per class, the
    oldest and least certain out first.

    >>> import torch
    >>> memory = BalancedMemory(capacity=4, num_classes=2)
    >>> for _ in range(10):  # a run of class 0: it takes only its share of the memory
    ...     _ = memory.add(torch.randn(3), label=0, uncertainty=0.1)
    >>> memory.per_class()
    [2, 0]
    >>> memory.add(torch.randn(3), label=1, uncertainty=0.5), memory.per_class()
    (True, [2, 1])
    """

    def __init__(self, capacity: int = 64, num_classes: int = 1, lambda_t: float = 1.0,
                 lambda_u: float = 1.0) -> None:
        if capacity < 1 or num_classes < 1:
            raise ValueError("a balanced memory needs capacity >= 1 and num_classes >= 1")
        self.capacity = capacity
        self.num_classes = num_classes
        self.per_class_capacity = capacity / num_classes
        self.lambda_t = lambda_t
        self.lambda_u = lambda_u
        self.items: list[list[_Item]] = [[] for _ in range(num_classes)]
        self.keys: set[bytes] = set()
        self.clock = 0  # samples offered so far; an item's age is clock - born

    def __len__(self) -> int:
        return sum(len(items) for items in self.items)

    def per_class(self) -> list[int]:
        return [len(items) for items in self.items]

    def classes_held(self) -> int:
        return sum(1 for items in self.items if items)

    def score(self, age: int, uncertainty: float) -> float:
        """Timeliness plus uncertainty: the item with the highest score leaves first."""
        return (self.lambda_t / (1.0 + math.exp(-age / self.capacity))
                + self.lambda_u * uncertainty)

    def add(self, x: torch.Tensor, label: int, uncertainty: float) -> bool:
        """Offer one sample (its pseudo-label, its uncertainty in [0, 1]); True if it was kept.
        An input identical to one held is not kept twice."""
        key = hashlib.blake2b(x.detach().contiguous().numpy().tobytes(), digest_size=16).digest()
        kept = key not in self.keys and self._make_room(label, self.score(0, uncertainty))
        if kept:
            self.items[label].append(_Item(x.detach().clone(), uncertainty, self.clock, key))
            self.keys.add(key)
        self.clock += 1
        return kept

    def _make_room(self, label: int, new_score: float) -> bool:
        if len(self.items[label]) < self.per_class_capacity:
            if len(self) < self.capacity:
                return True
            counts = self.per_class()
            most = max(counts)
            return self._evict([c for c, n in enumerate(counts) if n == most], new_score)
        return self._evict([label], new_score)

    def _evict(self, classes: list[int], new_score: float) -> bool:
        """Remove the highest-scoring item of `classes` if it scores above the newcomer."""
        worst: tuple[float, int, int] | None = None
        for c in classes:
            for index, item in enumerate(self.items[c]):
                s = self.score(self.clock - item.born, item.uncertainty)
                if worst is None or s >= worst[0]:
                    worst = (s, c, index)
        if worst is None:
            return True
        if worst[0] <= new_score:
            return False
        removed = self.items[worst[1]].pop(worst[2])
        self.keys.discard(removed.key)
        return True

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held inputs stacked, and their ages over the capacity (RoTTA's `get_memory`)."""
        held = [item for items in self.items for item in items]
        if not held:
            raise ValueError("the memory is empty")
        ages = torch.tensor([(self.clock - item.born) / self.capacity for item in held])
        return torch.stack([item.x for item in held]), ages

    def clear(self) -> None:
        self.items = [[] for _ in range(self.num_classes)]
        self.keys.clear()
        self.clock = 0


class BalancedStatistics:
    """Class-wise test statistics, mixed by the classes' long-run shares: a run of one class moves
    only its own part.

    The model must have been configured with `configure_norm(model, "balanced")`: its robust BN
    layers then normalise by `mean`/`square` alone, which only `observe` changes. A sample's
    instance statistics s (per channel, its mean and second moment over the spatial positions) are
    filed under its class k (its prediction: the argmax of the outputs served for it). Per layer,
    for a batch, with m_k the mean of s over the batch's n_k samples of class k and n its size:

        mu_k <- mu_k + (1 - (1 - momentum)^(n_k / pi_k)) (m_k - mu_k)     every class k in the batch
        pi   <- (1 - r)^n pi + (1 - (1 - r)^n) histogram of the batch's classes    (r = 1 / window)
        mean = sum_k pi_k mu_k              (the same for the second moments)

    (pi_k floored at r): a class whose samples make a share pi_k of the stream moves its average
    per own sample as far as `robust` moves in 1 / pi_k samples, so every class's average spans
    about the same stretch of the stream (with C equal classes, C samples' worth per sample; a
    class of 80% about `robust`'s own pace). Every class starts at the source's statistics, with
    weight 1/C. A run of class k moves mu_k to the run, but its weight grows only to its share of
    the last `window` samples; a shift that sends every prediction to one class still moves the
    statistics fully within `window` samples. A regressor has one class: this is then `robust`'s
    average, except that a batch is never normalised by its own statistics (they count from the
    next batch on).

    Measured alternatives that did worse on B1 (BENCHMARKS.md): a memory of recent samples
    balanced by RoTTA's rule as the statistics' source (its uncertainty score keeps the previous
    domain's confident samples after a shift), a shared shift that moves every class by part of
    each class's surprise, and class offsets from the reference data subtracted from each sample
    (wrong as soon as the predictions are).

    >>> import torch, torch.nn as nn
    >>> from adapters.tta.norm import configure_norm
    >>> model = configure_norm(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),
    ...                        "balanced")
    >>> stats = BalancedStatistics(model, num_classes=3)
    >>> x = torch.randn(8, 4)
    >>> stats.observe(x, model(x))
    >>> stats.observed
    8
    """

    def __init__(self, model: nn.Module, num_classes: int | None = None, momentum: float = 0.02,
                 window: int = 500) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, RobustBatchNorm)]
        self.num_classes = num_classes if num_classes is not None and num_classes > 1 else 1
        self.momentum = momentum
        self.window = window
        self.observed = 0
        self.mirrors: list[list[RobustBatchNorm]] = []
        for layer in self.layers:
            layer.keep_class_statistics(self.num_classes)

    def mirror(self, model: nn.Module) -> None:
        """Copy the mixed statistics into `model`'s robust BN layers too (a teacher beside a
        student normalises as the student does)."""
        layers = [m for m in model.modules() if isinstance(m, RobustBatchNorm)]
        if len(layers) != len(self.layers):
            raise ValueError("a mirrored model needs the same robust BN layers")
        for layer in layers:
            layer.classes, layer.captured = 0, None  # it only takes copies: it captures nothing
        self.mirrors.append(layers)

    def begin(self) -> None:
        """Forget any capture a forward left that no `observe` took (a step that raised), so the
        next `observe` files only the samples it is given."""
        for layer in self.layers:
            layer.captured = None

    @torch.no_grad()
    def observe(self, x: torch.Tensor, outputs: torch.Tensor) -> None:
        """File the last committed forward's per-sample statistics under the classes its outputs
        predict, then mix. Samples whose outputs or statistics are not finite are left out."""
        captured = [layer.captured for layer in self.layers]
        for layer in self.layers:
            layer.captured = None
        count = outputs.shape[0]
        if not self.layers or any(c is None or c[0].shape[0] != count for c in captured):
            return  # no committed forward of these samples (an inference, a frozen step)
        outputs = outputs.detach().float().reshape(count, -1)
        finite = torch.isfinite(outputs).all(1)
        for mean, square in captured:  # type: ignore[misc]
            finite &= torch.isfinite(mean).all(1) & torch.isfinite(square).all(1)
        n = int(finite.sum())
        if n == 0:
            return
        labels = (outputs.argmax(1) if self.num_classes > 1
                  else torch.zeros(count, dtype=torch.long, device=outputs.device))[finite]
        counts = torch.bincount(labels, minlength=self.num_classes).float()
        seen = counts > 0
        mix_step = 1.0 - (1.0 - 1.0 / self.window) ** n
        for layer, stats in zip(self.layers, captured, strict=True):
            # a class's samples arrive at its share of the stream: its average moves by as much
            # per own sample as `robust` does in 1 / share samples, so every class's average
            # spans about the same stretch of the stream
            share = layer.class_weight[seen].clamp_min(1.0 / self.window)
            step = (1.0 - (1.0 - self.momentum) ** (counts[seen] / share)).unsqueeze(1)
            layer.class_weight.mul_(1.0 - mix_step).add_(mix_step * counts / n)
            for index, classes in enumerate((layer.class_mean, layer.class_square)):
                samples = stats[index][finite].float()  # type: ignore[index]
                sums = torch.zeros_like(classes).index_add_(0, labels, samples)
                classes[seen] += step * (sums[seen] / counts[seen].unsqueeze(1) - classes[seen])
            layer.mean.copy_(layer.class_weight @ layer.class_mean)
            layer.square.copy_(layer.class_weight @ layer.class_square)
        for mirrored in self.mirrors:
            for layer, copy in zip(self.layers, mirrored, strict=True):
                copy.mean.copy_(layer.mean)
                copy.square.copy_(layer.square)
        self.observed += n

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset_statistics()
        for mirrored in self.mirrors:
            for layer in mirrored:
                layer.reset_statistics()
        self.observed = 0

    def describe(self) -> dict[str, object]:
        if not self.layers:
            return {"observed": self.observed}
        weights = self.layers[0].class_weight
        effective = float(torch.exp(-(weights * weights.clamp_min(1e-12).log()).sum()))
        return {"observed": self.observed, "effective_classes": round(effective, 2)}
