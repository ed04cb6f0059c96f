"""SAR: sharpness-aware and reliable entropy minimisation, with model recovery (Niu et al.,
"Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023).

Reference: mr-eggplant/SAR (`sar.py`, `sam.py`, `main.py`). The normalisation affines θ train;
per batch, with H_i(θ) the softmax entropy of sample i and C the number of classes:

    reliable      S1 = {i : H_i(θ) < E0},  E0 = 0.4 ln C                              (Eqn. 2)
    first pass    L1 = mean_{i in S1} H_i(θ),  g = ∂L1/∂θ
    perturbation  ε = ρ g / ‖g‖,  ‖g‖ over every trained entry at once,  ρ = 0.05     (Eqn. 4)
    second pass   S2 = {i in S1 : H_i(θ + ε) < E0},  L2 = mean_{i in S2} H_i(θ + ε)
    step          θ ← SGD step (momentum 0.9) on ∂L2/∂θ taken at θ + ε, applied to θ   (Eqn. 5)
    recovery      e_m ← 0.9 e_m + 0.1 L2 (e_m = L2 the first time);
                  when e_m < e_0 = 0.2: θ and the optimizer back to the source, e_m unset

The outputs returned are those of the first forward, before the step. The second forward sees the
whole batch (as the reference's, so batch statistics are the batch's) and S2 is re-filtered on
the perturbed model's entropies: a sample counts only if it is reliable in both passes.
`backward_samples` counts S2, the samples whose gradient makes the step (`reliable_samples`
counts S1; a step costs backward passes over S1 and S2).

Learning rate: the reference (`main.py`) sets, for a batch of b samples, 0.00025 for ResNets when
b >= 32 and 0.00025 · 2b / 64 below (0.001 · b / 64 for ViT-Base). Here a step sees
`adapt_batch_size` samples (64 by default: 0.00025), so the ResNet rule applied to it is the
default (`reference_learning_rate`); `learning_rate` overrides it. The CIFAR port of
mariodoebler/test-time-adaptation steps SGD at 1e-3 (momentum 0.9) on batches of 200.

Trained parameters: the reference leaves the deepest stage frozen, by module name (`layer4` of a
ResNet, `blocks.9` to `blocks.11` and the final `norm` of a ViT-Base). A generic model has no
such names, and which stage is "deepest" cannot be told from an arbitrary module tree, so here
every normalisation affine trains except those under modules the reference's names match
(`skip_top_layers`, on by default): on a torchvision ResNet or a timm ViT-Base this is the
reference's set, on any other model (the served demo included) it is every affine, as in Tent.

Deliberate deviations from the reference code, for a service:
- No reliable sample in the first pass, or none left in the second: no step. The reference runs
  both passes anyway on the mean of nothing (NaN, with zero gradients) and calls SGD, whose
  momentum then moves θ along its old direction; here θ and the momentum stay as they are, as
  in EATA's reference, which skips such batches.
- Non-finite: a first pass whose loss or gradient is NaN or infinite takes no perturbation and no
  step; a second pass that is not finite restores θ exactly (the saved copy, not θ + ε - ε) and
  takes no step (`GradientAdapter.take_step`). Either counts in `skipped_steps` and leaves e_m as
  it was (the reference skips e_m only on a NaN L2).
- Recovery restores the trained parameters and the optimizer's momentum, and keeps the test-time
  normalisation statistics (the reference reloads the whole model, but with batch statistics it
  holds none), the adaptation buffer and the learning rate in force (a drift boost stays). It
  unsets e_m, as the reference's `reset()` and the CIFAR port do; the reference's `forward` then
  writes the old e_m back, so there the next batches keep resetting until new losses lift the
  average above e_0. The reference compares with a hard-coded 0.2; here with `reset_constant`.
  Recoveries are counted (`recoveries`); `reset()` is the operator's full reset of the base.
- Normalisation as in `adapters.tta.tent`: only normalisation changes its test-time behaviour
  (the reference's `model.train()` would also switch dropout on); `norm="batch"` normalises by
  each batch as the reference does; the second forward never moves robust statistics, so no
  sample counts twice.
- e_0 = 0.2 was chosen for ImageNet (C = 1000, E0 = 2.76) and is not scaled with C. On the demo
  (C = 10, E0 = 0.92) L2 averages about 0.3 on clean digits and 0.55 on Digits-C, so recovery
  never fired there; with two classes (E0 = 0.28) a confident model's L2 can sit below 0.2 and
  recover at every step. `reset_constant` is an option for that reason.
"""

from __future__ import annotations

import copy
import math
from typing import Unpack

import torch
import torch.nn as nn

from adapters.tta.base import AdaptOutput, CommonKnobs, GradientAdapter, softmax_entropy
from adapters.tta.norm import normalisation_affines, served_statistics

EMA_KEY = "sar.ema"
RECOVERIES_KEY = "sar.recoveries"


def reference_learning_rate(batch_size: int) -> float:
    """mr-eggplant/SAR's SGD rate for ResNets (BN and GN) at a batch of `batch_size` samples.

    >>> reference_learning_rate(64), reference_learning_rate(16)
    (0.00025, 0.000125)
    """
    return 0.00025 if batch_size >= 32 else 0.00025 / 64 * batch_size * 2


def in_top_layers(module_name: str) -> bool:
    """The reference's rule for the layers it leaves frozen: ResNet's `layer4`, ViT-Base's last
    three blocks and its final norm.

    >>> [in_top_layers(n) for n in ("layer4.2.bn3", "layer3.0.bn1", "blocks.10.norm1", "norm")]
    [True, False, True, True]
    """
    parts = module_name.split(".")
    return ("layer4" in parts or parts[:2] in (["blocks", "9"], ["blocks", "10"], ["blocks", "11"])
            or parts[0] == "norm")


def gradients_finite(loss: torch.Tensor, params: list[nn.Parameter]) -> bool:
    """Whether the loss and every gradient the backward pass left are finite."""
    grads = [p.grad for p in params if p.grad is not None]
    finite = torch.isfinite(loss.detach()).all()
    if grads:
        finite = finite & torch.stack([torch.isfinite(g).all() for g in grads]).all()
    return bool(finite)


class SAR(GradientAdapter):
    """Reliable entropy minimisation with a sharpness-aware SGD step, and recovery to the source
    when the moving average of the loss collapses.

    Parameters: `num_classes` C sets E0 = `e_margin_factor` * ln(C); `learning_rate` is SGD's
    (None: `reference_learning_rate(adapt_batch_size)`); `momentum` SGD's; `rho` the radius ρ of
    the perturbation; `reset_constant` e_0; `skip_top_layers` applies the reference's names of
    frozen layers; the remaining keywords go to `GradientAdapter`.

    Examples:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    >>> sar = SAR(model, num_classes=3, norm="batch")
    >>> round(sar.e_margin, 4), sar.learning_rate  # 0.4 ln 3; the reference's rate at 64
    (0.4394, 0.00025)
    >>> sar.param_names
    ['1.weight', '1.bias']
    >>> sar.adapt(torch.randn(16, 4)).outputs.shape
    torch.Size([16, 3])
    >>> sar.reset(); sar.ema is None, sar.steps
    (True, 0)

    References: Niu et al., ICLR 2023; mr-eggplant/SAR.
    """

    name = "sar"
    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        learning_rate: float | None = None,
        momentum: float = 0.9,
        rho: float = 0.05,
        e_margin_factor: float = 0.4,
        reset_constant: float = 0.2,
        skip_top_layers: bool = True,
        **common: Unpack[CommonKnobs],
    ) -> None:
        # checked before the model is touched, so a failed construction leaves it as it was
        if num_classes < 2:
            raise ValueError(f"sar needs num_classes of at least 2, got {num_classes}")
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        super().__init__(model, num_classes=num_classes, **common)
        params, names = normalisation_affines(self.model)
        kept = [(p, n) for p, n in zip(params, names, strict=True)
                if not (skip_top_layers and in_top_layers(n.rsplit(".", 1)[0]))]
        self.params = [p for p, _ in kept]
        self.param_names = [n for _, n in kept]
        if not self.params:
            raise ValueError(
                "sar adapts normalisation layers (BatchNorm, LayerNorm, GroupNorm) and this model "
                "has none outside the layers it leaves frozen; serve it with adapter 'none'"
            )
        for param in self.params:
            param.requires_grad_(True)
        self.num_classes = num_classes
        self.e_margin = e_margin_factor * math.log(num_classes)
        self.rho = rho
        self.reset_constant = reset_constant
        self.ema: float | None = None
        self.recoveries = 0
        self.reliable_samples = 0
        rate = reference_learning_rate(self.adapt_batch_size) if learning_rate is None \
            else learning_rate
        self.optimizer = torch.optim.SGD(self.params, lr=rate, momentum=momentum)
        self.snapshot_source()

    def entropy(self, outputs: torch.Tensor) -> torch.Tensor:
        if outputs.dim() != 2 or outputs.shape[1] != self.num_classes:
            raise ValueError(f"sar was built for {self.num_classes} classes; the model "
                             f"returned outputs of shape {tuple(outputs.shape)}")
        return softmax_entropy(outputs)

    def reliable(self, entropy: torch.Tensor) -> torch.Tensor:
        """Indices of the samples with H < E0 (a NaN entropy is never reliable)."""
        return torch.nonzero(entropy.detach() < self.e_margin).flatten()

    @torch.no_grad()
    def perturb(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """θ ← θ + ρ g / ‖g‖ with the gradients in place; returns each moved θ with its copy."""
        moved = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in moved if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = self.rho / (norm + 1e-12)
        origin = [(p, p.detach().clone()) for p in moved]
        for p, g in zip(moved, grads, strict=True):
            p.add_(g * scale)
        return origin

    @staticmethod
    @torch.no_grad()
    def restore(origin: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        for param, value in origin:
            param.copy_(value)

    def forward_and_adapt(self, x: torch.Tensor) -> AdaptOutput:
        self.optimizer.zero_grad(set_to_none=True)  # as the reference, should a pass have raised
        with torch.enable_grad():
            outputs = self.model(x)
            first = self.entropy(outputs)
            reliable = self.reliable(first)
            self.reliable_samples += len(reliable)
            if len(reliable) == 0:  # the reference would still step on momentum alone
                return AdaptOutput(outputs=outputs.detach())
            first_loss = first[reliable].mean(0)
            first_loss.backward()
            if not gradients_finite(first_loss, self.params):
                self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                return AdaptOutput(outputs=outputs.detach(), skipped=True)
            origin = self.perturb()
            self.optimizer.zero_grad(set_to_none=True)
            try:
                # normalised as the first pass was: a served batch by the statistics it was
                # served with, which it already moved; a buffer's by the blend, moving nothing
                with served_statistics(self.model):
                    second = self.entropy(self.model(x))[reliable]
                kept = self.reliable(second)  # reliable in both passes
                second_loss = second[kept].mean(0) if len(kept) else None
                if second_loss is not None:
                    second_loss.backward()
            finally:  # whatever happened at θ + ε, the step (if any) starts from θ
                self.restore(origin)
        if second_loss is None:
            return AdaptOutput(outputs=outputs.detach())
        stepped = self.take_step(second_loss)  # none on a NaN or infinite loss or gradient
        result = AdaptOutput(outputs=outputs.detach(), stepped=stepped, skipped=not stepped,
                             backward_samples=len(kept), loss=second_loss.item())
        if stepped:
            self.update_ema(second_loss.item())
        return result

    def update_ema(self, loss: float) -> None:
        """e_m ← 0.9 e_m + 0.1 L2, and recovery to the source once e_m < e_0."""
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if self.ema < self.reset_constant:
            self.recover()

    def recover(self) -> None:
        """The trained parameters and the optimizer's momentum back to the source, e_m unset;
        statistics, buffer and the learning rate in force stay."""
        rate = self.learning_rate
        with torch.no_grad():
            for name, param in zip(self.param_names, self.params, strict=True):
                param.copy_(self.source_model_state[name])
        self.optimizer.load_state_dict(copy.deepcopy(self.source_optimizer_state))
        self.set_learning_rate(rate)
        self.ema = None
        self.recoveries += 1
        self.version += 1

    def reset(self) -> None:
        """Source weights, statistics and optimizer (see `GradientAdapter.reset`), e_m unset."""
        super().reset()
        self.ema = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.ema is not None:
            state[EMA_KEY] = torch.tensor(self.ema, dtype=torch.float64)
        state[RECOVERIES_KEY] = torch.tensor(self.recoveries)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        ema = state.get(EMA_KEY)
        self.ema = None if ema is None else float(ema)
        self.recoveries = int(state.get(RECOVERIES_KEY, torch.tensor(0)))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "reliable_samples": self.reliable_samples,
                "recoveries": self.recoveries, "loss_ema": self.ema}
