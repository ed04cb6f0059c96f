"""EATA and ETA: entropy minimisation on reliable, non-redundant samples, with and without a Fisher
anchor to the source (Niu et al., "Efficient Test-Time Model Adaptation without Forgetting",
ICML 2022).

Reference: mr-eggplant/EATA (`eata.py`). The same parameters as Tent train (the normalisation
affines); per batch, with p_i = softmax(z_i) and H_i its entropy:

    reliable    S1 = {i : H_i < E0},  E0 = e_margin_factor * ln(C)           (Eqn. 3)
    selected    S2 = {i in S1 : |cos(m, p_i)| < d_margin}  (S2 = S1 while m is unset)  (Eqn. 5)
    m          <- 0.9 m + 0.1 mean_{i in S2} p_i   (first time: mean_{i in S1} p_i)     (Eqn. 4)
    loss        = mean_{i in S2} exp(E0 - H_i) H_i        (the weight is detached)      (Eqn. 6)
                  + beta * sum F (theta - theta0)^2       (EATA only)                   (Eqn. 8)

and the optimizer steps only when S2 is not empty: skipping the backward pass for unreliable and
redundant samples is what makes the method cheaper than Tent. F is the diagonal Fisher of the
source model (`adapters.tta.fisher.fisher_information`: squared gradients of the batch-mean
cross-entropy against the model's own argmax labels, averaged over batches of in-distribution
data, 2,000 samples) and theta0 the source values of the trained parameters. ETA is EATA without
the Fisher term, and so needs no in-distribution data.

Defaults follow the CIFAR-10 configuration of mariodoebler/test-time-adaptation (Adam, lr 1e-3,
betas 0.9/0.999, d_margin 0.4, beta 1, 2,000 Fisher samples), because the served demo has ten
classes. The ImageNet configuration of the reference is beta 2000, d_margin 0.05, SGD lr 0.00025
with momentum 0.9, batch 64; E0 = 0.4 ln(C) in both.

Deliberate deviations, for a service: as in `adapters.tta.tent`, only normalisation changes its
test-time behaviour (the reference's `model.train()` would also switch dropout on); `norm="batch"`
normalises by each batch as the reference does, and the default `norm="robust"` uses robust
test-time statistics and steps once `adapt_batch_size` samples have arrived (see
`adapters.tta.base.GradientAdapter`). The Fisher is estimated with the adapter's own normalisation
(the reference uses batch statistics, which `norm="batch"` reproduces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Unpack

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters.tta.base import AdaptOutput, CommonKnobs, GradientAdapter, softmax_entropy
from adapters.tta.fisher import fisher_information
from adapters.tta.norm import normalisation_affines

MODEL_PROBS_KEY = "eata.model_probs"


@dataclass
class Selection:
    """Which samples of a batch EATA learns from, and how much each one counts.

    `reliable` and `selected` index the batch (selected is a subset of reliable); `weights` are
    exp(E0 - H_i) for the selected samples, in the same order; `entropy` covers the whole batch.
    """

    entropy: torch.Tensor
    reliable: torch.Tensor
    selected: torch.Tensor
    weights: torch.Tensor


class ETA(GradientAdapter):
    """Sample-efficient entropy minimisation: only confident, non-redundant samples take a step.

    Parameters: `num_classes` C sets the entropy margin E0 = `e_margin_factor` * ln(C);
    `d_margin` is the cosine-similarity threshold of the redundancy filter; `learning_rate` is
    Adam's; the remaining keywords (`norm`, `norm_momentum`, `adapt_batch_size`,
    `max_learning_rate`) go to `GradientAdapter`.

    Examples:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    >>> eta = ETA(model, num_classes=3, norm="batch")
    >>> round(eta.e_margin, 4)  # 0.4 ln 3
    0.4394
    >>> logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # H = 0.177 and ln 3
    >>> selection = eta.select(logits)
    >>> selection.selected.tolist(), round(float(selection.weights[0]), 4)  # exp(E0 - H)
    ([0], 1.2997)
    >>> eta.adapt(torch.randn(16, 4)).outputs.shape
    torch.Size([16, 3])
    >>> eta.reset(); eta.current_model_probs is None
    True

    References: Niu et al., ICML 2022; mr-eggplant/EATA.
    """

    name = "eta"
    tasks = ("classification",)

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        learning_rate: float = 1e-3,
        e_margin_factor: float = 0.4,
        d_margin: float = 0.4,
        **common: Unpack[CommonKnobs],
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"{self.name} needs num_classes of at least 2, got {num_classes}")
        super().__init__(model, num_classes=num_classes, **common)
        self.params, self.param_names = normalisation_affines(self.model)
        if not self.params:
            raise ValueError(
                f"{self.name} adapts normalisation layers (BatchNorm, LayerNorm, GroupNorm) and "
                "this model has none; serve it with adapter 'none'"
            )
        for param in self.params:
            param.requires_grad_(True)
        self.num_classes = num_classes
        self.e_margin = e_margin_factor * math.log(num_classes)
        self.d_margin = d_margin
        self.current_model_probs: torch.Tensor | None = None
        self.reliable_samples = 0
        self.optimizer = torch.optim.Adam(self.params, lr=learning_rate, betas=(0.9, 0.999))
        self.snapshot_source()

    @torch.no_grad()
    def select(self, outputs: torch.Tensor) -> Selection:
        """The reliable samples (H < E0), those of them far from the moving average m, and their
        weights exp(E0 - H). Reads m, never changes it."""
        if outputs.dim() != 2 or outputs.shape[1] != self.num_classes:
            raise ValueError(f"{self.name} was built for {self.num_classes} classes; the model "
                             f"returned outputs of shape {tuple(outputs.shape)}")
        entropy = softmax_entropy(outputs)
        reliable = torch.nonzero(entropy < self.e_margin).flatten()
        selected = reliable
        if self.current_model_probs is not None:
            probs = outputs[reliable].softmax(1)
            cosine = F.cosine_similarity(self.current_model_probs.unsqueeze(0), probs, dim=1)
            selected = reliable[cosine.abs() < self.d_margin]
        weights = torch.exp(self.e_margin - entropy[selected])
        return Selection(entropy, reliable, selected, weights)

    @torch.no_grad()
    def update_model_probs(self, probs: torch.Tensor) -> None:
        """m <- 0.9 m + 0.1 mean(probs) over the selected samples; m = mean(probs) the first time
        (then every reliable sample is selected); unchanged when no sample was selected."""
        if len(probs) == 0:
            return
        if self.current_model_probs is None:
            self.current_model_probs = probs.mean(0)
        else:
            self.current_model_probs = 0.9 * self.current_model_probs + 0.1 * probs.mean(0)

    @torch.no_grad()
    def selection_rate(self, outputs: torch.Tensor, batch: int = 64) -> float:
        """The share of these outputs' samples that the two filters would select, in batches of
        `batch` in order, once the first batch has started the moving average m (from none);
        the adapter's own state is left as it was. On
        the source's outputs for in-distribution data it says how often the method can step:
        with few classes every probability vector lies close to their mean (two classes: the
        cosine of any vector with (½, ½) is at least 0.71), so d_margin 0.4 selects almost none.
        """
        kept, self.current_model_probs = self.current_model_probs, None
        selected = seen = 0
        try:
            for start in range(0, len(outputs), batch):
                chunk = outputs[start:start + batch]
                selection = self.select(chunk)
                if self.current_model_probs is not None:  # the first batch only starts m
                    selected += len(selection.selected)
                    seen += len(chunk)
                self.update_model_probs(chunk[selection.selected].softmax(1))
        finally:
            self.current_model_probs = kept
        return selected / seen if seen else 1.0

    def loss(self, outputs: torch.Tensor, selection: Selection) -> torch.Tensor:
        """mean over the selected samples of exp(E0 - H_i) * H_i, the weights held constant."""
        entropy = softmax_entropy(outputs[selection.selected])
        return (selection.weights * entropy).mean(0)

    def forward_and_adapt(self, x: torch.Tensor) -> AdaptOutput:
        with torch.enable_grad():
            outputs = self.model(x)
            selection = self.select(outputs)
            self.reliable_samples += len(selection.reliable)
            self.update_model_probs(outputs.detach()[selection.selected].softmax(1))
            objective = None
            # the reference steps only if a sample was selected
            if len(selection.selected) > 0:
                objective = self.loss(outputs, selection)
                objective.backward()
        if objective is None:
            self.optimizer.zero_grad(set_to_none=True)
            return AdaptOutput(outputs=outputs.detach(), backward_samples=0)
        stepped = self.take_step(objective)  # none on a NaN or infinite loss or gradient
        return AdaptOutput(outputs=outputs.detach(), stepped=stepped, skipped=not stepped,
                           backward_samples=len(selection.selected), loss=objective.item())

    def reset(self) -> None:
        """Source weights and optimizer (see `GradientAdapter.reset`), and m unset again."""
        super().reset()
        self.current_model_probs = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.current_model_probs is not None:
            state[MODEL_PROBS_KEY] = self.current_model_probs.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        probs = state.get(MODEL_PROBS_KEY)
        if probs is not None and tuple(probs.shape) != (self.num_classes,):
            raise ValueError(f"{self.name} checkpoint holds a moving average over "
                             f"{tuple(probs.shape)} classes; this adapter has {self.num_classes}")
        super().load_state_dict(state)
        self.current_model_probs = None if probs is None else probs.clone()

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "reliable_samples": self.reliable_samples}


class EATA(ETA):
    """ETA plus the anti-forgetting term beta * sum F (theta - theta0)^2 towards the source.

    `reference` holds in-distribution inputs (the reference data); the first `fisher_samples` of
    them, in batches of `fisher_batch_size`, give the Fisher F. `fisher_beta` is beta. Other
    parameters as `ETA`.

    Examples:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    >>> eata = EATA(model, num_classes=3, reference=torch.randn(32, 4), norm="batch")
    >>> sorted(eata.fisher), eata.fisher_penalty().item()  # at the source the term is zero
    (['1.bias', '1.weight'], 0.0)
    >>> eata.adapt(torch.randn(16, 4)).outputs.shape
    torch.Size([16, 3])

    References: Niu et al., ICML 2022; mr-eggplant/EATA.
    """

    name = "eata"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        learning_rate: float = 1e-3,
        e_margin_factor: float = 0.4,
        d_margin: float = 0.4,
        fisher_beta: float = 1.0,
        reference: torch.Tensor | None = None,
        fisher_samples: int = 2000,
        fisher_batch_size: int = 64,
        **common: Unpack[CommonKnobs],
    ) -> None:
        # checked before the model is touched, so a failed construction leaves it as it was
        if reference is None or len(reference) == 0:
            raise ValueError(
                "eata needs `reference`: in-distribution inputs (for example a slice of the "
                "training data) to estimate the Fisher information; without them use adapter "
                "'eta', which is EATA without the Fisher term"
            )
        if fisher_samples < 1 or fisher_batch_size < 1:
            raise ValueError("fisher_samples and fisher_batch_size must be at least 1")
        super().__init__(model, num_classes, learning_rate, e_margin_factor, d_margin, **common)
        self.fisher_beta = fisher_beta
        named = dict(zip(self.param_names, self.params, strict=True))
        self.fisher = fisher_information(
            self.model, named, torch.as_tensor(reference)[:fisher_samples], fisher_batch_size
        )
        self.source_params = {name: p.detach().clone() for name, p in named.items()}
        # taken again after the Fisher pass (ETA took one), so reset returns to this exact state
        self.snapshot_source()

    def fisher_penalty(self) -> torch.Tensor:
        """beta * sum over trained parameters of F * (theta - theta0)^2, elementwise."""
        penalty = torch.stack([
            (self.fisher[name] * (param - self.source_params[name]) ** 2).sum()
            for name, param in zip(self.param_names, self.params, strict=True)
        ]).sum()
        return self.fisher_beta * penalty

    def loss(self, outputs: torch.Tensor, selection: Selection) -> torch.Tensor:
        return super().loss(outputs, selection) + self.fisher_penalty()

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "fisher_beta": self.fisher_beta}
