"""RoTTA: robust test-time adaptation in dynamic scenarios (Yuan et al., CVPR 2023).

Reference: BIT-DA/RoTTA (`core/adapter/rotta.py`, `core/utils/memory.py`,
`core/utils/bn_layers.py`, `configs/adapter/rotta.yaml`). A teacher f_t (an exponential moving
average of a student f_s) serves; a category-balanced memory M of recent samples (CSTU,
`adapters.tta.balanced.BalancedMemory`) is all the student ever learns from. Per incoming sample x:

    z = f_t(x),  p = softmax(z)                  served, with no statistics update
    M.add(x, label = argmax p, uncertainty = H(p) / log C)

and every `update_every` samples (64), over the memory's inputs m_i and ages a_i (in units of
the capacity N = 64, as `BalancedMemory.samples` gives them):

    robust BN of f_t and f_s:   μ ← (1 - α) μ + α μ_batch,  σ² likewise          α = 0.05
    z_t = f_t(m),  z_s = f_s(A(m))               A: a strong random augmentation
    w_i = exp(-a_i) / (1 + exp(-a_i))            timeliness: older samples weigh less
    L   = mean_i w_i · (-Σ_c softmax(z_t)_ic log softmax(z_s)_ic)
    θ_s ← Adam step on L                         lr 1e-3, betas (0.9, 0.999), no weight decay
    θ_t ← (1 - ν) θ_t + ν θ_s                    ν = 0.001

The memory admits a sample by class quota (N / C per class) and evicts the highest
λ_t / (1 + exp(-age / N)) + λ_u · uncertainty (λ_t = λ_u = 1); see `adapters.tta.balanced`. The
trained parameters are the affine weight and bias of the BatchNorm layers (the reference sets
`requires_grad` on its RobustBN layers only); the teacher's statistics are its own, moved only by
the memory's forwards, never averaged from the student.

What differs from the reference, each for a service or a generic model:
- Normalisation: the service's `RobustBatchNorm`, held still except on the memory's forwards,
  whatever `norm` asks: `robust` and `balanced` run alike (`describe` says "balanced"; the base's
  class-wise "balanced" statistics are not used, RoTTA's memory is what balances), and `batch`
  and `source` are refused, since per-batch or frozen statistics are not RoTTA. The layer
  averages the first and second moments rather than the mean and the variance, so the variance
  it uses also holds the spread between the memory's mean and the old average (α(1 - α)
  (μ_batch - μ)² more per channel per update).
- The reference's strong augmentation is torchvision's image pipeline for CIFAR (colour jitter
  with saturation, hue and gamma, ±15° affine, blur, horizontal flip, noise 0.005, clip to
  [0, 1]). `strong_augment` writes a subset in plain torch: for image-shaped inputs
  (N, C, H, W) brightness × U(0.6, 1.4), contrast × U(0.7, 1.3), a random affine (±15°, scale
  0.9 to 1.1, shift ±1/16, borders repeated) and Gaussian noise of 0.005 × the memory's value
  range, clipped to that range; no flip (a digit or a letter is not symmetric), blur or hue. Any
  other floating input gets Gaussian noise of `feature_noise` (0.1) × the memory's per-feature
  standard deviation; integer inputs (token ids) are not augmented.
- Batching: the reference adds a batch of 64 to the memory sample by sample and updates at every
  64th; here any batch size does the same, one request at a time included, so there is no
  adaptation buffer (`adapt_batch_size` is ignored). `update_every` counts the samples offered;
  a sample whose input or output is not finite is not offered. The memory, not the served model,
  holds its inputs (on the CPU); a repeated identical input is held once (`BalancedMemory`).
- Roles: `self.model`, the module the adapter was given, is the teacher, the model that serves
  (the service's feature tap and its supervised step hook into that module, so they see the
  served forward); `self.student` is a copy, the one the optimizer trains.
- The reference's `model.train()` would switch dropout on during an update; here only the
  statistics move. An update whose loss or gradient is not finite (`take_step`) changes nothing:
  no step, no teacher average, and both models' statistics are put back.
- The memory is not checkpointed: after `load_state_dict` or `reset` it refills from the stream.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypedDict, Unpack

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters.tta.balanced import BalancedMemory
from adapters.tta.base import (
    AdaptOutput,
    GradientAdapter,
    companion_keys,
    companion_state,
    load_companion_state,
)
from adapters.tta.norm import RobustBatchNorm


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample -Σ softmax(z_t) log softmax(z_s): the reference's `softmax_entropy(x, x_ema)`,
    the teacher's probabilities as soft targets for the student."""
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)


def timeliness_weight(ages: torch.Tensor) -> torch.Tensor:
    """exp(-a) / (1 + exp(-a)), a = age / capacity: 0.5 for a fresh sample, less as it ages.

    >>> timeliness_weight(torch.tensor([0.0, 1.0])).tolist()
    [0.5, 0.2689414322376251]
    """
    return torch.exp(-ages) / (1.0 + torch.exp(-ages))


@contextmanager
def moving_statistics(model: nn.Module, momentum: float) -> Iterator[None]:
    """Within this block each robust BN layer of `model` moves its averages by `momentum` per
    forward, towards that forward's batch (the reference's RobustBN in training mode); outside it
    they stay as `RoTTA` holds them (momentum 0, no commit). The memory's samples are not the
    rows served: the layers report no shift for them (`RobustBatchNorm.watch` off)."""
    layers = [m for m in model.modules() if isinstance(m, RobustBatchNorm)]
    held = [(layer.fixed_momentum, layer.commit, layer.watch) for layer in layers]
    for layer in layers:
        layer.fixed_momentum, layer.commit, layer.watch = momentum, True, False
    try:
        yield
    finally:
        for layer, (fixed_momentum, commit, watch) in zip(layers, held, strict=True):
            layer.fixed_momentum, layer.commit, layer.watch = fixed_momentum, commit, watch


def _uniform(n: int, low: float, high: float, like: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
    return torch.empty(n, device=like.device, dtype=like.dtype).uniform_(low, high,
                                                                         generator=generator)


@torch.no_grad()
def strong_augment(x: torch.Tensor, generator: torch.Generator, noise_std: float = 0.005,
                   feature_noise: float = 0.1) -> torch.Tensor:
    """The student's view of the memory: a random, label-preserving perturbation of each sample.

    Images (N, C, H, W): brightness and contrast jitter, a random rotation, scale and shift, then
    Gaussian noise, clipped to the batch's value range. Other floating inputs: Gaussian noise
    scaled to each feature's spread over the batch. Integer inputs come back unchanged.

    >>> x = torch.rand(8, 1, 16, 16)
    >>> y = strong_augment(x, torch.Generator().manual_seed(0))
    >>> y.shape == x.shape, bool(y.min() >= x.min()), bool(y.max() <= x.max())
    (True, True, True)
    """
    if not x.is_floating_point():
        return x.clone()
    n = x.shape[0]
    if x.dim() != 4:
        spread = x.std(0, correction=0, keepdim=True)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x + feature_noise * spread * noise
    low, high = x.amin(), x.amax()
    brightness = _uniform(n, 0.6, 1.4, x, generator).view(n, 1, 1, 1)
    x = (x * brightness).clamp(low, high)
    contrast = _uniform(n, 0.7, 1.3, x, generator).view(n, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(low, high)
    angle = _uniform(n, -15.0, 15.0, x, generator) * (math.pi / 180.0)
    scale = _uniform(n, 0.9, 1.1, x, generator)
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of 1/16 of the image is
    # 2/16 there, and dividing by the scale enlarges the content by it
    shift = _uniform(2 * n, -2.0 / 16, 2.0 / 16, x, generator).view(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return (x + noise_std * (high - low) * noise).clamp(low, high)


class RoTTAKnobs(TypedDict, total=False):
    """`adapters.tta.base.CommonKnobs` less `num_classes` and `norm`, which RoTTA takes as its own
    arguments (mypy refuses a keyword that is both named and in the `**` TypedDict)."""

    norm_momentum: float
    adapt_batch_size: int
    max_learning_rate: float
    norm_window: int


class RoTTA(GradientAdapter):
    """A mean teacher that serves, and a student trained on a class-balanced memory.

    Parameters: `num_classes` C; `memory_size` N and `update_every` (64 each: one update per
    64 samples offered); `lambda_t`, `lambda_u` (the memory's eviction score); `alpha` (the
    statistics' momentum per update); `nu` (the teacher's EMA rate); `learning_rate` and `beta`
    (Adam's lr and first beta); `noise_std` and `feature_noise` (the augmentation's noise, see
    `strong_augment`); `seed` (the augmentation's generator, reseeded by `reset`). Of the common
    knobs `norm` may be "robust" or "balanced" (both run RoTTA's statistics; "batch" and
    "source" raise ValueError), `max_learning_rate` applies, and `norm_momentum`, `norm_window` and
    `adapt_batch_size` play no part.

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    >>> rotta = RoTTA(model, num_classes=3, memory_size=8, update_every=8)
    >>> results = [rotta.adapt(torch.randn(1, 4)) for _ in range(8)]
    >>> results[0].outputs.shape, [r.stepped for r in results].index(True), rotta.steps
    (torch.Size([1, 3]), 7, 1)
    >>> len(rotta.memory) <= 8
    True
    >>> rotta.reset(); rotta.steps, len(rotta.memory)
    (0, 0)

    References: Yuan, Xie and Li, CVPR 2023; code at github.com/BIT-DA/RoTTA.
    """

    name = "rotta"
    tasks = ("classification",)
    balanced_steps = True  # the student learns from the category-balanced memory alone

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        norm: str = "robust",
        learning_rate: float = 1e-3,
        beta: float = 0.9,
        memory_size: int = 64,
        update_every: int = 64,
        lambda_t: float = 1.0,
        lambda_u: float = 1.0,
        alpha: float = 0.05,
        nu: float = 0.001,
        noise_std: float = 0.005,
        feature_noise: float = 0.1,
        seed: int = 0,
        **common: Unpack[RoTTAKnobs],
    ) -> None:
        if norm not in ("robust", "balanced"):
            raise ValueError(f"rotta normalises by its own robust statistics, moved by its memory; "
                             f"norm {norm!r} cannot serve it: set adapter.norm to 'robust' or "
                             "'balanced' (they run alike for rotta)")
        if num_classes < 2:
            raise ValueError(f"rotta needs num_classes of at least 2, got {num_classes}")
        if memory_size < 1 or update_every < 1:
            raise ValueError("rotta needs memory_size and update_every of at least 1")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be within (0, 1], got {alpha}")
        if not 0.0 <= nu <= 1.0:
            raise ValueError(f"nu must be within [0, 1], got {nu}")
        # robust BN layers, then held still: only `moving_statistics` (the memory's forwards)
        # moves them; the base's own "balanced" statistics would feed them from the stream
        super().__init__(model, norm="robust", num_classes=num_classes, **common)
        for layer in self.model.modules():
            if isinstance(layer, RobustBatchNorm):
                layer.fixed_momentum, layer.commit = 0.0, False
        self.norm = "balanced"
        self.num_classes = num_classes
        self.update_every = update_every
        self.alpha = alpha
        self.nu = nu
        self.noise_std = noise_std
        self.feature_noise = feature_noise
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.memory = BalancedMemory(memory_size, num_classes, lambda_t, lambda_u)
        self.offered = 0  # samples offered to the memory since the start or the last reset
        self.student = copy.deepcopy(self.model)
        names = [f"{layer_name}.{param_name}"
                 for layer_name, layer in self.student.named_modules()
                 if isinstance(layer, RobustBatchNorm) and layer.weight is not None
                 for param_name in ("weight", "bias")]
        if not names:
            raise ValueError("rotta trains the affines of BatchNorm layers and this model has "
                             "none; serve it with adapter 'none'")
        student_params = dict(self.student.named_parameters())
        teacher_params = dict(self.model.named_parameters())
        self.params = {name: student_params[name] for name in names}
        self.teacher_params = {name: teacher_params[name] for name in names}
        for param in self.params.values():
            param.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=learning_rate,
                                          betas=(beta, 0.999), weight_decay=0.0)
        self.source_student_state = copy.deepcopy(self.student.state_dict())
        self.snapshot_source()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's outputs; its statistics stay as they are."""
        with torch.no_grad():
            return self.model(x)

    def adapt(self, x: torch.Tensor) -> AdaptOutput:
        """Serve the teacher's outputs for `x`, offer each sample to the memory, and update at
        every `update_every`-th sample offered (possibly more than once for a large batch)."""
        outputs = self.predict(x)
        if outputs.dim() != 2 or outputs.shape[1] != self.num_classes:
            raise ValueError(f"rotta was built for {self.num_classes} classes; the model gives "
                             f"outputs of shape {tuple(outputs.shape)}")
        probs = outputs.detach().float().softmax(1)
        labels = probs.argmax(1).tolist()
        # the reference's entropy, -Σ p log(p + 1e-6), over log C: the memory's uncertainty
        uncertainty = (-(probs * torch.log(probs + 1e-6)).sum(1)
                       / math.log(self.num_classes)).tolist()
        finite = (torch.isfinite(probs).all(1)
                  & torch.isfinite(x.detach().reshape(x.shape[0], -1)).all(1)).tolist()
        inputs = x.detach().cpu()
        result = AdaptOutput(outputs=outputs)
        for row in range(x.shape[0]):
            if not finite[row]:
                continue
            self.memory.add(inputs[row], labels[row], uncertainty[row])
            self.offered += 1
            if self.offered % self.update_every == 0:
                update = self._account(self.update())
                result.stepped |= update.stepped
                result.skipped |= update.skipped
                result.backward_samples += update.backward_samples
                result.loss = update.loss
        return result

    def update(self) -> AdaptOutput:
        """One update on the memory: both models' statistics move by α on it, the student takes
        a step on the timeliness-weighted soft cross-entropy, the teacher averages it in."""
        device = next(iter(self.params.values())).device
        samples, ages = self.memory.samples()
        samples, ages = samples.to(device), ages.to(device)
        saved = [b.clone() for b in self._statistics()]
        with torch.no_grad(), moving_statistics(self.model, self.alpha):
            teacher_logits = self.model(samples)
        augmented = strong_augment(samples, self._generator(samples.device), self.noise_std,
                                   self.feature_noise)
        with torch.enable_grad(), moving_statistics(self.student, self.alpha):
            student_logits = self.student(augmented)
            weights = timeliness_weight(ages).to(student_logits.dtype)
            loss = (soft_cross_entropy(student_logits, teacher_logits) * weights).mean()
            loss.backward()
        if not self.take_step(loss):
            # nothing of an update that cannot step stays: not the statistics, not the teacher
            with torch.no_grad():
                for buffer, value in zip(self._statistics(), saved, strict=True):
                    buffer.copy_(value)
            return AdaptOutput(outputs=teacher_logits, skipped=True,
                               backward_samples=len(samples), loss=loss.item())
        with torch.no_grad():
            for name, teacher_param in self.teacher_params.items():
                teacher_param.mul_(1.0 - self.nu).add_(self.params[name], alpha=self.nu)
        return AdaptOutput(outputs=teacher_logits, stepped=True, backward_samples=len(samples),
                           loss=loss.item())

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def _statistics(self) -> list[torch.Tensor]:
        """The teacher's and the student's robust BN averages, the buffers themselves."""
        return [b for model in (self.model, self.student)
                for name, b in model.named_buffers() if name.endswith((".mean", ".square"))]

    def reset(self) -> None:
        """Teacher (the base), student, statistics and optimizer back to source; memory emptied;
        the augmentation's generator reseeded."""
        super().reset()
        self.student.load_state_dict(self.source_student_state, strict=True)
        self.memory.clear()
        self.offered = 0
        self.generator = torch.Generator(device=self.generator.device).manual_seed(self.seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base state (the teacher's statistics as "buffer.", the optimizer's moments, the
        steps), the teacher's trained affines as "param." and the student's as "student."."""
        state = super().state_dict()
        state.update({f"param.{name}": p.detach().clone()
                      for name, p in self.teacher_params.items()})
        return state | companion_state(self.student, self.params, "student")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {k for k in self.state_dict() if k.startswith("student.")}
        companion_keys(state, expected, "student", "rotta")
        super().load_state_dict(state)
        load_companion_state(self.student, state, expected, "student")
        self.memory.clear()
        self.offered = 0

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "memory_samples": len(self.memory),
                "memory_per_class": self.memory.per_class(), "samples_offered": self.offered}
