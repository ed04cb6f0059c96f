"""SAR steps on samples reliable in both passes, at the gradient of the perturbed model, never on
what is not finite, and returns to the source when the moving average of its loss collapses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_eata import _split, identity_logits_model, noisy_digits, trained_digits

from adapters import SAR, build_adapter
from adapters.tta.base import softmax_entropy
from adapters.tta.norm import RobustBatchNorm
from tests.models import binary

E0_3 = 0.4 * math.log(3)


def snapshot(adapter: SAR) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter.model.state_dict().items()}


def unchanged(adapter: SAR, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in adapter.model.state_dict().items())


def confident_inputs(count: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs for `tests.models.binary`, whose logit gap is 2 × the feature sum: most samples
    are reliable (H < 0.4 ln 2)."""
    return torch.randn(count, 4, generator=torch.Generator().manual_seed(seed)) * 2


def test_step_follows_the_gradient_at_the_perturbed_weights_on_samples_reliable_in_both():
    # logits through an identity BatchNorm: H = 0.177 and 0.418, both below E0 = 0.439; at
    # θ + ε the second rises to 0.461, so only the first enters the second pass
    logits = torch.tensor([[4.0, 0.0, 0.0], [2.8, 0.0, 0.0]])
    sar = SAR(identity_logits_model(), num_classes=3, norm="source", adapt_batch_size=1,
              reset_constant=0.0)
    assert sar.e_margin == pytest.approx(E0_3) and sar.rho == 0.05

    weight, bias = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    first = softmax_entropy(logits * weight + bias)
    grads = torch.autograd.grad(first.mean(), [weight, bias])
    norm = torch.cat(grads).norm()
    w_eps = (weight + 0.05 * grads[0] / norm).detach().requires_grad_(True)
    b_eps = (bias + 0.05 * grads[1] / norm).detach().requires_grad_(True)
    second = softmax_entropy(logits * w_eps + b_eps)
    assert (first < E0_3).tolist() == [True, True] and (second < E0_3).tolist() == [True, False]
    grads_eps = torch.autograd.grad(second[0], [w_eps, b_eps])

    result = sar.adapt(logits)
    assert result.stepped and result.backward_samples == 1 and sar.reliable_samples == 2
    assert result.loss == pytest.approx(second[0].item(), rel=1e-6)
    torch.testing.assert_close(result.outputs, logits, rtol=0, atol=0)  # predicted before
    # SGD's first step with momentum: θ ← θ - lr g, g taken at θ + ε and applied to θ, at the
    # reference's rate for steps of one sample, 0.00025 · 2 / 64
    rate = sar.learning_rate
    assert rate == pytest.approx(0.00025 / 32)
    bn = sar.model[0]
    torch.testing.assert_close(bn.weight.detach(), 1.0 - rate * grads_eps[0])
    torch.testing.assert_close(bn.bias.detach(), -rate * grads_eps[1])
    assert sar.ema == pytest.approx(result.loss)


def test_only_normalisation_affines_change_and_reset_restores_the_source_bit_for_bit():
    model = trained_digits()
    sar = SAR(model, num_classes=10, norm="batch")
    source = {k: v.clone() for k, v in model.state_dict().items()}
    x = noisy_digits(0, 64)
    with torch.no_grad():
        before = model(x)
    first = sar.adapt(x)
    torch.testing.assert_close(first.outputs, before, rtol=0, atol=0)  # predict, then step
    for start in (64, 128):
        sar.adapt(noisy_digits(start, 64))
    assert sar.steps == 3 and sar.recoveries == 0 and sar.ema is not None
    assert 0 < sar.backward_samples <= sar.reliable_samples < 3 * 64
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, source[k])}
    assert changed == set(sar.param_names)
    assert {k.split(".")[0] for k in changed} == {"1", "4", "7"}  # the three BatchNorm2d layers
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if n not in sar.param_names)

    sar.reset()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert sar.ema is None and sar.steps == 0
    assert sar.optimizer.state_dict()["state"] == {}
    torch.testing.assert_close(sar.adapt(x).outputs, before, rtol=0, atol=0)


def test_unreliable_samples_take_no_step_not_even_on_momentum():
    sar = SAR(identity_logits_model(), num_classes=3, norm="source", adapt_batch_size=1,
              reset_constant=0.0)
    assert sar.adapt(torch.tensor([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0]])).stepped
    momentum = {k: v["momentum_buffer"].clone()
                for k, v in sar.optimizer.state_dict()["state"].items()}
    before, ema = snapshot(sar), sar.ema

    # H = ln 3, 0.975 and 0.66: all above E0 = 0.439; the reference would still call SGD on
    # zero gradients, and its momentum would move the weights
    result = sar.adapt(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    assert (result.stepped, result.skipped, result.backward_samples, result.loss) == (
        False, False, 0, None)
    assert unchanged(sar, before) and sar.ema == ema and sar.steps == 1
    assert sar.reliable_samples == 2 and sar.skipped_steps == 0
    assert all(p.grad is None for p in sar.params)
    state = sar.optimizer.state_dict()["state"]
    assert len(state) == 2 and all(torch.equal(state[k]["momentum_buffer"], v)
                                   for k, v in momentum.items())


def poison_second_forward(model: nn.Module) -> list[int]:
    """Make the second forward of the model (SAR's pass at θ + ε) overflow on sample 5, after
    its first layer: its loss stays finite (the sample is not reliable), its gradients do not."""
    calls: list[int] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        calls.append(1)
        if len(calls) == 2:
            output = output.clone()
            output[5] = float("inf")
            return output
        return None

    model[0].register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("where", ["input inf", "input nan", "second pass"])
def test_a_non_finite_pass_leaves_every_parameter_and_the_optimizer_as_they_were(where):
    sar = SAR(binary(), num_classes=2)  # robust statistics: a batch of 64 takes its own step
    x = confident_inputs()
    assert sar.adapt(x).stepped  # with momentum, so a stray step would show
    sar.reset_constant = 0.0
    before, ema = snapshot(sar), sar.ema
    momentum = [v["momentum_buffer"].clone() for v in sar.optimizer.state_dict()["state"].values()]
    skipped = sar.skipped_steps
    x = confident_inputs(seed=1)
    if where == "second pass":
        calls = poison_second_forward(sar.model)
    else:
        x[5] = float(where.split()[1])

    result = sar.adapt(x)
    assert (result.stepped, result.skipped) == (False, True)
    assert sar.skipped_steps == skipped + 1 and sar.steps == 1 and sar.ema == ema
    assert sar.reliable_samples > 64  # the finite samples were reliable
    if where == "second pass":
        assert len(calls) == 2
    for name, param in sar.model.named_parameters():
        assert torch.equal(param, before[name]), name
    state = sar.optimizer.state_dict()["state"]
    assert all(torch.equal(a["momentum_buffer"], b) for a, b in zip(state.values(), momentum,
                                                                     strict=True))
    assert all(p.grad is None for p in sar.params)


def test_a_second_pass_that_raises_leaves_the_weights_where_they_were():
    sar = SAR(binary(), num_classes=2)
    before = snapshot(sar)
    calls: list[int] = []

    def fail_second(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")

    handle = sar.model[0].register_forward_hook(fail_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        sar.adapt(confident_inputs())
    handle.remove()
    for name, param in sar.model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert sar.steps == 0 and sar.adapt(confident_inputs(seed=1)).stepped


def test_recovery_returns_to_the_source_once_the_loss_average_falls_below_the_constant():
    moderate = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.2, 0.0]])  # H about 0.37 and 0.32
    sure = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 9.0]])  # H about 0.001
    # the losses the two batches give when nothing recovers
    twin = SAR(identity_logits_model(), num_classes=3, norm="source", adapt_batch_size=1,
               reset_constant=0.0, learning_rate=0.001)
    first_loss, second_loss = twin.adapt(moderate).loss, twin.adapt(sure).loss
    assert first_loss is not None and second_loss is not None
    ema = 0.9 * first_loss + 0.1 * second_loss
    constant = (first_loss + ema) / 2  # between e_m after one batch and after two

    sar = SAR(identity_logits_model(), num_classes=3, norm="source", adapt_batch_size=1,
              reset_constant=constant)
    source = snapshot(sar)
    sar.set_learning_rate(0.001)  # as a drift boost would
    assert sar.adapt(moderate).stepped
    assert sar.ema == pytest.approx(first_loss) and sar.recoveries == 0
    assert not unchanged(sar, source)

    result = sar.adapt(sure)
    assert result.stepped and result.loss == pytest.approx(second_loss, rel=1e-6)
    assert sar.recoveries == 1 and sar.ema is None and sar.steps == 2
    assert unchanged(sar, source)
    assert sar.optimizer.state_dict()["state"] == {} and sar.learning_rate == 0.001
    assert sar.describe()["recoveries"] == 1 and sar.describe()["loss_ema"] is None


def test_recovery_keeps_the_test_time_statistics():
    sar = SAR(trained_digits(), num_classes=10, reset_constant=10.0)  # every step recovers
    result = sar.adapt(noisy_digits(0, 64))
    assert result.stepped and sar.recoveries == 1 and sar.steps == 1
    for name, param in zip(sar.param_names, sar.params, strict=True):
        assert torch.equal(param, sar.source_model_state[name])
    layers = [m for m in sar.model.modules() if isinstance(m, RobustBatchNorm)]
    assert len(layers) == 3
    assert all(not torch.equal(m.mean, m.source_mean) for m in layers)


def test_checkpoint_carries_the_loss_average_and_the_recoveries():
    sar = SAR(trained_digits(), num_classes=10, norm="batch")
    for start in (0, 64):
        sar.adapt(noisy_digits(start, 64))
    sar.recoveries = 3
    saved = sar.state_dict()
    assert saved["sar.ema"].item() == sar.ema and int(saved["sar.recoveries"]) == 3
    assert any(k.startswith("optim.") for k in saved)

    clone = SAR(trained_digits(), num_classes=10, norm="batch")
    clone.load_state_dict(saved)
    assert (clone.ema, clone.recoveries, clone.steps) == (sar.ema, 3, 2)
    x = noisy_digits(128, 64)
    a, b = clone.adapt(x), sar.adapt(x)
    torch.testing.assert_close(a.outputs, b.outputs, rtol=0, atol=0)
    assert (a.backward_samples, a.loss, clone.ema) == (b.backward_samples, b.loss, sar.ema)

    clone.load_state_dict({k: v for k, v in saved.items() if not k.startswith("sar.")})
    assert clone.ema is None and clone.recoveries == 0


def test_learning_rate_follows_the_reference_rule_for_the_step_batch():
    assert SAR(binary(), num_classes=2).learning_rate == 0.00025
    assert SAR(binary(), num_classes=2, adapt_batch_size=16).learning_rate == pytest.approx(
        0.000125)
    assert SAR(binary(), num_classes=2, learning_rate=0.001).learning_rate == 0.001


def test_the_reference_top_layers_stay_frozen_where_their_names_match():
    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer3 = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
            self.layer4 = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.layer4(self.layer3(x)))

    assert SAR(Staged(), num_classes=3).param_names == ["layer3.1.weight", "layer3.1.bias"]
    assert len(SAR(Staged(), num_classes=3, skip_top_layers=False).param_names) == 4


def test_built_by_name_from_settings_and_serving_through_the_engine():
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine
    from service.settings import load_settings

    settings = load_settings(None, adapter={"name": "sar"})
    adapter = build_adapter(settings.adapter, trained_digits(), "classification",
                            num_classes=10)
    assert isinstance(adapter, SAR) and adapter.norm == "robust"
    assert adapter.learning_rate == 0.00025 and adapter.num_classes == 10

    settings = load_settings(None, adapter={"name": "sar", "restore": False,
                                            "options": {"rho": 0.1}})
    metrics = Metrics()
    engine = build_engine(settings, metrics, EventLog(metrics))
    assert isinstance(engine.adapter, SAR) and engine.adapter.rho == 0.1
    inputs = noisy_digits(0, 96).numpy()
    labels = _split()[3][:96]
    batch = engine.forward(inputs[:64], adapt=True)  # a step of its own
    singles = [engine.forward(inputs[i:i + 1], adapt=True) for i in range(64, 96)]
    predictions = np.concatenate([batch.predictions, *[s.predictions for s in singles]])
    assert predictions.shape == (96,) and (predictions == labels).mean() > 0.8
    assert engine.adapter.steps == 1 and engine.adapter.buffered == 32
    assert engine.adapter.describe()["reliable_samples"] > 0


@pytest.mark.parametrize("norm", ["robust", "balanced", "batch", "source"])
def test_adapts_with_every_normalisation(norm):
    sar = SAR(trained_digits(), num_classes=10, norm=norm, adapt_batch_size=32)
    results = [sar.adapt(noisy_digits(0, 32))]
    if norm != "batch":  # one sample normalised by itself is what robust statistics avoid
        results += [sar.adapt(noisy_digits(32 + i, 1)) for i in range(32)]
    assert all(torch.isfinite(r.outputs).all() for r in results)
    assert results[0].stepped and sar.steps == (1 if norm == "batch" else 2)
    assert sar.describe()["norm"] == norm
