"""PSMT: a mean teacher that protects critical parameters (Tian and Lyu, "Parameter-Selective
Continual Test-Time Adaptation", ACCV 2024, arXiv 2407.02253).

This module follows the semantics of the OFFICIAL CODE (JiaxuTian/PSMT,
`classification/methods/psmt.py`), which differs from the paper. Per batch x, with student
f_s (parameters θ, every weight and bias), teacher f_t (parameters θ_t), source values θ0 and a
source Fisher F (diagonal, from in-distribution data, as EATA computes it):

    z_s = f_s(x),  z_t = f_t(x),  p = softmax
    SCE_i = -(1 - α) Σ_c p(z_t)_ic log p(z_s)_ic  -  α Σ_c p(z_s)_ic log p(z_t)_ic      α = 0.5
    L = mean_i SCE_i  +  λ Σ_j F_j (θ_j - θ0_j)²                                         λ = 500
    g_j² = (∂L/∂θ_j)²  after backward, over all trained entries at once
    M = the ⌊r N⌋ entries with the smallest g²  (N trained entries in all, r = 0.03)
    θ ← Adam step on L;  then θ_j ← θ0_j for j ∈ M
    θ_t,j ← θ_j for j ∈ M;  θ_t,j ← m² θ_t,j + (1 - m²) θ_j otherwise                   m = 0.999
    output = z_t + z_s  (both from before the step)

Where the official code differs from the paper: the paper regularises the student towards its
*previous* parameters with a Fisher taken on the test stream (Σ F (θ_t - θ_{t-1})²) and its
masked EMA *keeps* the teacher's own value on masked entries; the code instead anchors to the
source weights with a source Fisher (the EATA/EWC term), restores the lowest-g² entries of the
student to source after the step (a deterministic CoTTA-style restore), and copies them into the
teacher; it uses a symmetric rather than a plain cross-entropy; and it sums teacher and student
logits for the output.

Quirks of the official code, reproduced or deliberately dropped:
- The teacher's EMA runs twice per step on unmasked entries (a plain EMA, then the masked one), so
  their effective momentum is m² = 0.998001. Reproduced: `mean_teacher_update` gets `m²`.
- Both SCE targets are soft (teacher probabilities), no argmax; the teacher carries no gradient,
  while the student's gradient flows through both terms, including its softmax in the second.
- Its loss averages SCE over the test batch and over an "augmented" batch, but the augmentation is
  overwritten by the plain batch, and the anchor model's 32-fold augmentation averaging forwards
  the unaugmented batch too: both are inert, so neither is built here (one forward each).
- The mask is `g² < quantile(g², r)` with a linearly interpolated quantile, which selects
  ⌊r (N - 1)⌋ + 1 entries when the values are distinct (one fewer if r (N - 1) is whole), and
  fewer under ties at the threshold (none at all when more than r N gradients are exactly zero).
  Here the mask is exactly the ⌊r N⌋ smallest, ties broken by `torch.topk`.
- The official Fisher uses 10,000 source samples; here `fisher_samples` (2,000 by default, as in
  EATA) caps the reference inputs the caller passes. The optimizer is the code's default config
  (Adam, lr 1e-3, betas 0.9/0.999, no weight decay; no psmt.yaml was found in the repository).
- Single-sample mode there predicts with the teacher alone; here `predict` (used for buffered
  small batches and `infer`) returns teacher + student logits, like the batch path.

Normalisation statistics, for a service (see `adapters.tta.base` and `adapters.tta.norm`):
teacher and student each own their robust BN averages. The teacher commits its statistics whenever
the student does (predictions and full-batch steps) and never when the student's are frozen (the
step over a buffer, `infer`), so no sample counts twice in either model.
"""

from __future__ import annotations

import copy
import math
from typing import Unpack

import torch
import torch.nn as nn

from adapters.tta.base import (
    AdaptOutput,
    CommonKnobs,
    GradientAdapter,
    companion_keys,
    companion_state,
    load_companion_state,
)
from adapters.tta.fisher import fisher_information
from adapters.tta.norm import RobustBatchNorm


def symmetric_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Per-sample -(1-α) Σ p_t log p_s - α Σ p_s log p_t, soft targets both ways.

    The official code's loss: the first term distils the teacher into the student, the second
    (reverse) term punishes the student for mass where the teacher is confident it is not.
    """
    forward = (teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)
    reverse = (student_logits.softmax(1) * teacher_logits.log_softmax(1)).sum(1)
    return -(1.0 - alpha) * forward - alpha * reverse


def smallest_fraction_mask(squared_grads: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Boolean masks marking the ⌊ratio · N⌋ entries with the smallest values, N over all tensors.

    The selection is global, as in the official code (one threshold over every trained entry),
    so a layer whose gradients are all small can be restored almost entirely.

    >>> smallest_fraction_mask([torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.4])], 0.5)
    [tensor([False,  True]), tensor([ True, False])]
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask_ratio must be within [0, 1], got {ratio}")
    flat = torch.cat([g.detach().reshape(-1) for g in squared_grads])
    count = math.floor(round(ratio * flat.numel(), 9))  # 0.29 * 100 is 28.999...
    selected = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if count:
        selected[torch.topk(flat, count, largest=False, sorted=False).indices] = True
    masks, start = [], 0
    for g in squared_grads:
        masks.append(selected[start:start + g.numel()].view_as(g))
        start += g.numel()
    return masks


@torch.no_grad()
def mean_teacher_update(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    masks: list[torch.Tensor],
    momentum: float,
) -> None:
    """In place: masked entries take the student's value, the rest θ_t ← m θ_t + (1 - m) θ_s."""
    for t, s, mask in zip(teacher, student, masks, strict=True):
        t.copy_(torch.where(mask, s, momentum * t + (1.0 - momentum) * s))


class PSMT(GradientAdapter):
    """Parameter-selective mean teacher: SCE to the teacher + EWC to source, lowest-g² restore.

    Parameters: `learning_rate` (Adam), `ema_momentum` m of the teacher, `sce_alpha` α,
    `ewc_lambda` λ, `mask_ratio` r (the share of entries restored to source per step),
    `reference` (in-distribution inputs for the source Fisher; required), `fisher_samples`,
    `fisher_batch_size`, and the common `GradientAdapter` knobs.

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    >>> psmt = PSMT(model, reference=torch.randn(32, 4), norm="batch")
    >>> result = psmt.adapt(torch.randn(16, 4))
    >>> result.outputs.shape, result.stepped, result.backward_samples, psmt.steps
    (torch.Size([16, 3]), True, 16, 1)
    >>> psmt.reset(); psmt.steps
    0

    References: Tian and Lyu, ACCV 2024; code at github.com/JiaxuTian/PSMT.
    """

    name = "psmt"
    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        learning_rate: float = 1e-3,
        ema_momentum: float = 0.999,
        sce_alpha: float = 0.5,
        ewc_lambda: float = 500.0,
        mask_ratio: float = 0.03,
        reference: torch.Tensor | None = None,
        fisher_samples: int = 2000,
        fisher_batch_size: int = 64,
        num_classes: int | None = None,
        **common: Unpack[CommonKnobs],
    ) -> None:
        if reference is None:
            raise ValueError(
                "psmt needs in-distribution inputs for its source Fisher: pass reference= "
                "(for example a few hundred training inputs)"
            )
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be within [0, 1], got {ema_momentum}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be within [0, 1], got {mask_ratio}")
        super().__init__(model, num_classes=num_classes, **common)
        self.ema_momentum = ema_momentum
        self.sce_alpha = sce_alpha
        self.ewc_lambda = ewc_lambda
        self.mask_ratio = mask_ratio
        # the official code trains every module's own weight and bias (CoTTA's choice)
        self.params = {name: p for name, p in self.model.named_parameters()
                       if name.rsplit(".", 1)[-1] in ("weight", "bias")}
        if not self.params:
            raise ValueError("psmt trains weights and biases and this model has none; serve it "
                             "with adapter 'none'")
        for param in self.params.values():
            param.requires_grad_(True)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        if self.statistics is not None:  # balanced BN: the teacher normalises as the student does
            self.statistics.mirror(self.teacher)
        teacher_params = dict(self.teacher.named_parameters())
        self.teacher_params = {name: teacher_params[name] for name in self.params}
        self.source_values = {name: p.detach().clone() for name, p in self.params.items()}
        inputs = torch.as_tensor(reference)[:fisher_samples]
        self.fisher = fisher_information(self.model, self.params, inputs, fisher_batch_size)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=learning_rate,
                                          betas=(0.9, 0.999))
        self.source_teacher_state = copy.deepcopy(self.teacher.state_dict())
        self.snapshot_source()

    def ewc_penalty(self) -> torch.Tensor:
        """λ Σ F (θ - θ0)², summed over every trained entry."""
        return self.ewc_lambda * torch.stack([
            (self.fisher[name] * (p - self.source_values[name]) ** 2).sum()
            for name, p in self.params.items()
        ]).sum()

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's forward; its robust BN commits statistics exactly when the student's do,
        and normalises as the student's do: each served sample by the average after it, an
        adaptation step's batch by the blend with its own statistics, `infer` by the average."""
        student_layers = [m for m in self.model.modules() if isinstance(m, RobustBatchNorm)]
        teacher_layers = [m for m in self.teacher.modules() if isinstance(m, RobustBatchNorm)]
        for s, t in zip(student_layers, teacher_layers, strict=True):
            t.commit, t.fixed_momentum = s.commit, s.fixed_momentum
        with torch.no_grad():
            return self.teacher(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher_logits(x) + self.model(x)

    def forward_and_adapt(self, x: torch.Tensor) -> AdaptOutput:
        teacher_logits = self.teacher_logits(x)
        with torch.enable_grad():
            student_logits = self.model(x)
            loss = (symmetric_cross_entropy(student_logits, teacher_logits, self.sce_alpha).mean()
                    + self.ewc_penalty())
            loss.backward()
        squared_grads = [p.grad ** 2 if p.grad is not None else torch.zeros_like(p)
                         for p in self.params.values()]
        outputs = (teacher_logits + student_logits).detach()
        if not self.take_step(loss):
            # a NaN or infinite loss or gradient: the student does not move, so neither the
            # restore to source nor the teacher's average runs (the teacher never takes it in)
            return AdaptOutput(outputs=outputs, skipped=True, backward_samples=x.shape[0],
                               loss=loss.item())
        masks = smallest_fraction_mask(squared_grads, self.mask_ratio)
        with torch.no_grad():
            for (name, p), mask in zip(self.params.items(), masks, strict=True):
                p.copy_(torch.where(mask, self.source_values[name], p))
        # the official code's two EMA passes on unmasked entries compose to momentum m²
        mean_teacher_update(list(self.teacher_params.values()),
                            [p.detach() for p in self.params.values()],
                            masks, self.ema_momentum ** 2)
        return AdaptOutput(outputs=outputs, stepped=True, backward_samples=x.shape[0],
                           loss=loss.item())

    def reset(self) -> None:
        """Student, optimizer and statistics back to source (the base), and the teacher too."""
        super().reset()
        self.teacher.load_state_dict(self.source_teacher_state, strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base state plus the teacher's trained parameters and statistics ("teacher.")."""
        return super().state_dict() | companion_state(self.teacher, self.teacher_params, "teacher")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {k for k in self.state_dict() if k.startswith("teacher.")}
        companion_keys(state, expected, "teacher", "psmt")
        super().load_state_dict(state)
        load_companion_state(self.teacher, state, expected, "teacher")
