"""ADCSD: online correction of a frozen regressor's outputs by a small residual network.

"Online Test-time Adaptation of Spatial-Temporal Traffic Flow Forecasting" (Guo et al., 2024,
arXiv 2401.04148), Adaptive Double Correction by Series Decomposition. Reference:
Pengxin-Guo/ADCSD (`ADCSDModule` and the `ADCSD` test loop in `libcity/executor/`).

The reference keeps the forecaster f frozen and puts a lite network after it. Its output o = f(x)
(a forecast over a horizon) is split into a trend-cyclical part, a moving average along the
horizon (kernel 5, edges repeated), and a seasonal part, the rest; each part goes through its own
correction branch g = Linear(C, 128) -> LayerNorm -> GELU -> Linear(128, C), and

    ŷ = o + λ_s ⊙ g_s(o_seasonal) + λ_t ⊙ g_t(o_trend)

with the gates λ_s, λ_t zero-initialised (one per node), so the corrected forecaster starts as the
frozen one exactly. Each test entry is predicted first; once its label is observed, one Adam step
on that entry alone (batch 1) trains g_s, g_t, λ_s and λ_t on the model's training loss, at the
model's training learning rate (0.003 in the reference's AGCRN configuration).

What this module does, for a service:

* The same gated residual form, with one gate per output value (the D outputs play the role of
  the reference's nodes): ``corrected = ŷ + λ ⊙ g(ŷ)``, λ = 0 at start and after `reset`, so
  `correct` returns its input bit for bit until `learn` has taken a step.
* Predictions (n, D) have no horizon to decompose (the moving average of one step is itself), so
  they get one branch, the paper's ablation without decomposition. Forecasts (n, H, D) with
  ``horizon=H >= 2`` get the two branches and the reference's decomposition.
* The LayerNorm normalises each position's hidden units, with an affine per step of the
  horizon. The reference's LayerNorm([horizon, nodes, hidden]) normalises a sample's whole block
  at once, which ties the correction to one input layout; its per-step affine, which lets the
  correction differ along the horizon, is kept.
* Optionally the model's features (n, F) join each branch's input (`feature_dim > 0`); the paper
  feeds only the output.
* The reference's networks run in the scaler's standardised units. Here inputs are
  ``(ŷ - output_mean) / output_scale`` and the correction is multiplied by `output_scale`: give
  the training targets' mean and standard deviation when outputs are far from unit scale. The
  loss is measured in those standardised units too.
* `learn` keeps the newest `window` labelled triples and takes `steps` Adam steps, each on the
  whole window (``window=1, steps=1`` is the reference's one step per new entry); a window smooths
  the noise of single labels when labels arrive in batches. Loss ``"mse"`` by default (the paper's
  analysis), ``"mae"`` (the reference code's default) or ``"huber"``.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters.learner import load_optimizer_tensors, optimizer_tensors, set_capped_learning_rate

LOSSES = ("mse", "mae", "huber")


class StepLayerNorm(nn.Module):
    """LayerNorm over the hidden units of each position, with an affine of its own per step.

    The reference's LayerNorm([horizon, nodes, hidden]) carries an affine per step (and node),
    the branch's only position-specific parameters: it is what lets a correction differ along the
    horizon. This keeps that affine and normalises each position separately.
    """

    def __init__(self, horizon: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.weight = nn.Parameter(torch.ones(horizon, hidden))
        self.bias = nn.Parameter(torch.zeros(horizon, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, H, hidden)."""
        return F.layer_norm(x, (self.hidden,)) * self.weight + self.bias


class CorrectionBranch(nn.Module):
    """The reference's correction branch: Linear -> LayerNorm -> GELU -> Linear, per position."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, horizon: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), StepLayerNorm(horizon, hidden),
                                  nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, H, in_dim) -> (n, H, out_dim)."""
        return self.body(x)


def decompose(series: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seasonal, trend) of (n, H, D) series: trend = moving average along H with the ends
    repeated ``(kernel - 1) // 2`` times, as the reference's `series_decomp`; seasonal = the rest.
    """
    pad = (kernel - 1) // 2
    padded = torch.cat([series[:, :1].expand(-1, pad, -1), series,
                        series[:, -1:].expand(-1, pad, -1)], dim=1)
    trend = padded.unfold(1, kernel, 1).mean(-1)
    return series - trend, trend


class CorrectionNetwork(nn.Module):
    """λ-gated correction branches over the standardised output (and features)."""

    def __init__(self, output_dim: int, horizon: int, feature_dim: int, hidden: int,
                 kernel: int) -> None:
        super().__init__()
        self.horizon = horizon
        self.kernel = kernel
        branches = 2 if horizon > 1 else 1
        self.branches = nn.ModuleList(
            CorrectionBranch(output_dim + feature_dim, hidden, output_dim, horizon)
            for _ in range(branches)
        )
        self.gates = nn.Parameter(torch.zeros(branches, output_dim))

    def forward(self, outputs: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """outputs (n, H, D) standardised -> correction (n, H, D) in the same units."""
        parts = decompose(outputs, self.kernel) if len(self.branches) == 2 else (outputs,)
        correction = torch.zeros_like(outputs)
        for branch, gate, part in zip(self.branches, self.gates, parts, strict=True):
            if features is not None:
                part = torch.cat([part, features[:, None, :].expand(-1, part.shape[1], -1)], 2)
            correction = correction + gate * branch(part)
        return correction


class OutputCorrector:
    """A residual network after a frozen regressor, trained online on the latest labels.

    Parameters
    ----------
    output_dim
        D, the number of values the model predicts per sample (per step of the horizon).
    horizon
        H, the forecast steps per sample: predictions are (n, D) when 1, (n, H, D) otherwise.
    feature_dim
        The width of the model features fed to the branches with the output; 0 feeds none.
    hidden
        The hidden width of each branch (128 in the reference).
    learning_rate
        Adam's step size.
    steps
        Adam steps per `learn` call, each on the whole window.
    window
        How many of the newest labelled samples a step trains on.
    loss
        ``"mse"``, ``"mae"`` or ``"huber"`` (delta 1, in standardised units).
    output_mean, output_scale
        The standardisation of the network's input and output (the training targets' mean and
        standard deviation).
    decomposition_kernel
        The moving-average length of the trend (odd; 5 in the reference), used when H >= 2.
    max_learning_rate
        A cap that `set_learning_rate` never exceeds.
    seed
        Seeds the branches' initial weights, so `reset` and replicas start alike.

    Examples
    --------
    >>> import torch
    >>> corrector = OutputCorrector(output_dim=1, learning_rate=0.05)
    >>> predictions = torch.linspace(-1, 1, 32)
    >>> torch.equal(corrector.correct(None, predictions), predictions)  # identity at start
    True
    >>> losses = [corrector.learn(None, predictions, 1.3 * predictions + 0.5) for _ in range(60)]
    >>> losses[-1] < 0.1 * losses[0]
    True
    >>> corrector.reset(); torch.equal(corrector.correct(None, predictions), predictions)
    True

    References
    ----------
    Guo et al., "Online Test-time Adaptation of Spatial-Temporal Traffic Flow Forecasting", 2024.
    """

    name: ClassVar[str] = "adcsd"

    def __init__(
        self,
        output_dim: int,
        horizon: int = 1,
        feature_dim: int = 0,
        hidden: int = 128,
        learning_rate: float = 1e-3,
        steps: int = 1,
        window: int = 64,
        loss: str = "mse",
        output_mean: float = 0.0,
        output_scale: float = 1.0,
        decomposition_kernel: int = 5,
        max_learning_rate: float = math.inf,
        seed: int = 0,
    ) -> None:
        if output_dim < 1 or horizon < 1 or feature_dim < 0 or hidden < 1:
            raise ValueError(
                f"output_dim, horizon and hidden must be at least 1 and feature_dim at least 0; "
                f"got {output_dim}, {horizon}, {hidden} and {feature_dim}"
            )
        if steps < 1 or window < 1:
            raise ValueError(f"steps and window must be at least 1, got {steps} and {window}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        if not output_scale > 0:
            raise ValueError(f"output_scale must be positive, got {output_scale}")
        if decomposition_kernel < 1 or decomposition_kernel % 2 == 0:
            raise ValueError(f"decomposition_kernel must be odd, got {decomposition_kernel}")
        if not 0 < learning_rate <= max_learning_rate:
            raise ValueError(f"learning rate {learning_rate} must be positive and at most the cap "
                             f"{max_learning_rate}")
        self.output_dim = output_dim
        self.horizon = horizon
        self.feature_dim = feature_dim
        self.steps_per_learn = steps
        self.window = window
        self.loss = loss
        self.output_mean = float(output_mean)
        self.output_scale = float(output_scale)
        self.max_learning_rate = max_learning_rate
        self.base_learning_rate = learning_rate
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = CorrectionNetwork(output_dim, horizon, feature_dim, hidden,
                                             decomposition_kernel)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=learning_rate)
        self._source_network = copy.deepcopy(self.network.state_dict())
        self._source_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self.steps = 0
        self._clear_window()

    # --- the loop ---------------------------------------------------------------------------

    @torch.no_grad()
    def correct(self, features: torch.Tensor | None, predictions: torch.Tensor) -> torch.Tensor:
        """The corrected predictions, same shape, dtype and device; no update."""
        predictions = torch.as_tensor(predictions)
        outputs = self._checked_predictions(predictions, None)
        corrected = self._corrected(self._checked_features(features, len(outputs)), outputs)
        return corrected.reshape(predictions.shape).to(predictions.dtype).to(predictions.device)

    def learn(self, features: torch.Tensor | None, predictions: torch.Tensor,
              labels: torch.Tensor) -> float:
        """Add labelled samples to the window and take `steps` Adam steps on it.

        `predictions` are the frozen model's outputs for these samples (not corrected ones).
        Returns the loss before the last step, in standardised units.
        """
        outputs = self._checked_predictions(predictions, None)
        targets = self._checked_predictions(labels, len(outputs), what="labels")
        features = self._checked_features(features, len(outputs))
        self._remember(features, outputs, targets)
        loss = 0.0
        with torch.enable_grad():
            for _ in range(self.steps_per_learn):
                corrected = self._corrected(self._window_features, self._window_outputs)
                residual = (corrected - self._window_targets) / self.output_scale
                step_loss = self._loss(residual)
                self.optimizer.zero_grad(set_to_none=True)
                step_loss.backward()
                self.optimizer.step()
                loss = step_loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += self.steps_per_learn
        return loss

    def reset(self) -> None:
        """Back to the identity: initial branches, zero gates, a fresh optimizer, no window."""
        self.network.load_state_dict(self._source_network)
        self.optimizer.load_state_dict(copy.deepcopy(self._source_optimizer))
        self.steps = 0
        self._clear_window()

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_learning_rate(self, learning_rate: float) -> float:
        """Set Adam's step size within [0, max_learning_rate]; returns the rate in force."""
        return set_capped_learning_rate(self.optimizer, learning_rate, self.max_learning_rate)

    # --- state ------------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        """Its rate, its steps and how many labelled samples its replay window holds."""
        return {"name": self.name, "learning_rate": self.learning_rate, "steps": self.steps,
                "window": self.window, "loss": self.loss, "uses_features": self.feature_dim > 0}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Network parameters, Adam's moments, the step count and the replay window."""
        state = {f"param.{name}": value.detach().clone()
                 for name, value in self.network.state_dict().items()}
        state.update(optimizer_tensors(self.optimizer))
        state["steps"] = torch.tensor(self.steps)
        state["window.outputs"] = self._window_outputs.clone()
        state["window.targets"] = self._window_targets.clone()
        if self._window_features is not None:
            state["window.features"] = self._window_features.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = {k.removeprefix("param."): v for k, v in state.items() if k.startswith("param.")}
        missing = set(self.network.state_dict()) - params.keys()
        if missing:
            raise ValueError(f"{self.name} checkpoint lacks {sorted(missing)[:5]}; was it made "
                             "for a corrector of this shape?")
        self.network.load_state_dict(params)
        load_optimizer_tensors(self.optimizer, state)
        self.steps = int(state.get("steps", torch.tensor(0)))
        self._clear_window()
        if "window.outputs" in state:
            self._window_outputs = state["window.outputs"].to(torch.float32).clone()
            self._window_targets = state["window.targets"].to(torch.float32).clone()
            features = state.get("window.features")
            self._window_features = None if features is None else features.float().clone()

    # --- internals --------------------------------------------------------------------------

    def _corrected(self, features: torch.Tensor | None, outputs: torch.Tensor) -> torch.Tensor:
        standardised = (outputs - self.output_mean) / self.output_scale
        # the gated residual: with λ = 0 this adds exact zeros, so the output is ŷ bit for bit
        return outputs + self.output_scale * self.network(standardised, features)

    def _loss(self, residual: torch.Tensor) -> torch.Tensor:
        if self.loss == "mse":
            return residual.pow(2).mean()
        if self.loss == "mae":
            return residual.abs().mean()
        return F.huber_loss(residual, torch.zeros_like(residual), delta=1.0)

    def _clear_window(self) -> None:
        self._window_outputs = torch.empty(0, self.horizon, self.output_dim)
        self._window_targets = torch.empty(0, self.horizon, self.output_dim)
        self._window_features = torch.empty(0, self.feature_dim) if self.feature_dim else None

    def _remember(self, features: torch.Tensor | None, outputs: torch.Tensor,
                  targets: torch.Tensor) -> None:
        self._window_outputs = torch.cat([self._window_outputs, outputs])[-self.window:]
        self._window_targets = torch.cat([self._window_targets, targets])[-self.window:]
        # both are None exactly when feature_dim == 0 (see `_checked_features`, `_clear_window`)
        if features is not None and self._window_features is not None:
            self._window_features = torch.cat([self._window_features, features])[-self.window:]

    def _checked_predictions(self, values: torch.Tensor, count: int | None,
                             what: str = "predictions") -> torch.Tensor:
        """As (n, H, D) float32 on the CPU."""
        values = torch.as_tensor(values).detach().to("cpu", torch.float32)
        if self.horizon == 1:
            expected = "(n,) or (n, 1)" if self.output_dim == 1 else f"(n, {self.output_dim})"
            if values.ndim == 1 and self.output_dim == 1:
                values = values[:, None]
            ok = values.ndim == 2 and values.shape[1] == self.output_dim
            values = values[:, None, :] if ok else values
        else:
            expected = f"(n, {self.horizon}, {self.output_dim})"
            if values.ndim == 2 and self.output_dim == 1:
                values = values[:, :, None]
            ok = values.ndim == 3 and values.shape[1:] == (self.horizon, self.output_dim)
        if not ok or (count is not None and len(values) != count):
            raise ValueError(f"{what} have shape {tuple(values.shape)}; expected {expected}"
                             + ("" if count is None else f" with n = {count}"))
        if not torch.isfinite(values).all():
            raise ValueError(f"{what} contain NaN or infinity")
        return values

    def _checked_features(self, features: torch.Tensor | None, count: int) -> torch.Tensor | None:
        if self.feature_dim == 0:
            return None
        if features is None:
            raise ValueError(f"this corrector reads {self.feature_dim} features per sample; pass "
                             "them, or build it with feature_dim=0")
        features = torch.as_tensor(features).detach().to("cpu", torch.float32)
        features = features.reshape(len(features), -1)
        if features.shape != (count, self.feature_dim):
            raise ValueError(f"features have shape {tuple(features.shape)}; expected "
                             f"({count}, {self.feature_dim})")
        return features
