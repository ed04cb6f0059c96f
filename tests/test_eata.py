"""EATA and ETA learn only from reliable, non-redundant samples, and EATA stays near the source."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from adapters.tta.eata import EATA, ETA
from adapters.tta.norm import RobustBatchNorm
from service.demo import WEIGHTS_PATH, digits_cnn, digits_split

E0_3 = 0.4 * math.log(3)


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    return load_file(str(WEIGHTS_PATH))


def trained_digits() -> nn.Module:
    """The shipped demo CNN (3% error on clean test digits), a fresh copy each time."""
    model = digits_cnn()
    model.load_state_dict(_trained_state())
    return model


@functools.cache
def _split() -> tuple[np.ndarray, ...]:
    return digits_split()


def calibration(count: int = 128) -> torch.Tensor:
    return torch.from_numpy(_split()[0][:count])


def noisy_digits(start: int, count: int, sigma: float = 0.1) -> torch.Tensor:
    """Test digits under mild Gaussian noise: with batch statistics about a third of them are
    reliable (H < 0.4 ln 10), so every batch of 64 selects some."""
    x_test = _split()[2][start:start + count]
    rng = np.random.default_rng(start)
    return torch.from_numpy(np.clip(x_test + rng.normal(0, sigma, x_test.shape), 0, 1)
                            .astype(np.float32))


def identity_logits_model() -> nn.Module:
    """One BatchNorm with unit source statistics and eps 0: with norm="source" its output is its
    input, so a test hands EATA logits directly; its affine is what EATA trains."""
    return nn.Sequential(nn.BatchNorm1d(3, eps=0.0))


def entropy(logits: list[list[float]]) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return -(p * np.log(p)).sum(1)


def test_selection_keeps_samples_below_the_entropy_margin_weighted_by_exp_of_margin_minus_h():
    eta = ETA(identity_logits_model(), num_classes=3, norm="source", adapt_batch_size=1)
    logits = [[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 6.0]]
    h = entropy(logits)  # 0.177, 1.099, 0.367, 0.975, 0.035 against E0 = 0.4 ln 3 = 0.439
    assert eta.e_margin == pytest.approx(E0_3)
    selection = eta.select(torch.tensor(logits))
    assert selection.reliable.tolist() == selection.selected.tolist() == [0, 2, 4]
    np.testing.assert_allclose(selection.entropy.numpy(), h, rtol=1e-5)
    np.testing.assert_allclose(selection.weights.numpy(), np.exp(E0_3 - h[[0, 2, 4]]), rtol=1e-5)
    assert eta.current_model_probs is None, "select reads the moving average, never sets it"


def test_first_batch_skips_the_redundancy_filter_and_sets_m_then_the_next_batch_applies_it():
    eta = ETA(identity_logits_model(), num_classes=3, norm="source", adapt_batch_size=1)
    first = eta.adapt(torch.tensor([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 0.0]]))
    assert first.stepped and first.backward_samples == 2 and eta.reliable_samples == 2
    m1 = first.outputs[:2].softmax(1).mean(0)  # about (0.4975, 0.4975, 0.005)
    torch.testing.assert_close(eta.current_model_probs, m1, rtol=0, atol=0)

    # after one Adam step the affine moved by about 1e-3, so outputs are near these logits
    second = eta.adapt(torch.tensor([[6.0, 0.0, 0.0], [0.0, 0.0, 6.0], [0.0, 0.0, 0.0]]))
    probs = second.outputs.softmax(1)
    cosine = F.cosine_similarity(m1.unsqueeze(0), probs, dim=1)
    assert cosine[0] > 0.4 > cosine[1], "class 0 is redundant with m, class 2 is new"
    assert second.backward_samples == 1 and eta.reliable_samples == 4
    torch.testing.assert_close(eta.current_model_probs, 0.9 * m1 + 0.1 * probs[1])
    assert eta.describe()["reliable_samples"] == 4 and eta.describe()["backward_samples"] == 3


def test_no_sample_selected_means_no_step_and_no_optimizer_state():
    eata = EATA(identity_logits_model(), num_classes=3, norm="source", adapt_batch_size=1,
                reference=torch.randn(8, 3), fisher_beta=2000.0)
    before = [p.detach().clone() for p in eata.params]
    result = eata.adapt(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    assert (result.stepped, result.backward_samples, result.loss) == (False, 0, None)
    assert eata.steps == 0 and eata.backward_samples == 0 and eata.reliable_samples == 0
    assert eata.optimizer.state_dict()["state"] == {}
    assert all(torch.equal(a, b) for a, b in zip(before, eata.params, strict=True))
    assert all(p.grad is None for p in eata.params)
    assert eata.current_model_probs is None


def test_fisher_is_the_mean_over_batches_of_squared_gradients_of_the_batch_mean_ce():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    inputs = torch.randn(12, 4)
    by_hand = copy.deepcopy(source).train()  # train mode: normalise by the batch, as norm="batch"
    bn = by_hand[1]
    squares = []
    for x in (inputs[:5], inputs[5:10]):  # fisher_samples=10 drops the last two samples
        outputs = by_hand(x)
        loss = F.cross_entropy(outputs, outputs.argmax(1))
        squares.append([g**2 for g in torch.autograd.grad(loss, [bn.weight, bn.bias])])
    eata = EATA(source, num_classes=3, norm="batch", reference=inputs,
                fisher_samples=10, fisher_batch_size=5)
    assert sorted(eata.fisher) == ["1.bias", "1.weight"]
    torch.testing.assert_close(eata.fisher["1.weight"], (squares[0][0] + squares[1][0]) / 2)
    torch.testing.assert_close(eata.fisher["1.bias"], (squares[0][1] + squares[1][1]) / 2)
    assert all(float(f.sum()) > 0 for f in eata.fisher.values())


def test_eata_loss_is_the_eta_loss_plus_beta_times_fisher_weighted_squared_distance():
    beta, shift = 2000.0, 0.1
    eta = ETA(trained_digits(), num_classes=10, norm="batch")
    eata = EATA(trained_digits(), num_classes=10, norm="batch", reference=calibration(),
                fisher_beta=beta)
    x = noisy_digits(0, 64)
    with torch.no_grad():  # both move the first BN bias away from the source by hand
        eta.model[1].bias += shift
        eata.model[1].bias += shift
    term = beta * float(eata.fisher["1.bias"].sum()) * shift**2
    assert eata.fisher_penalty().item() == pytest.approx(term, rel=1e-5)
    eta_step, eata_step = eta.adapt(x), eata.adapt(x)
    torch.testing.assert_close(eta_step.outputs, eata_step.outputs, rtol=0, atol=0)
    assert eta_step.backward_samples == eata_step.backward_samples > 0
    assert term > 0.01
    assert eata_step.loss - eta_step.loss == pytest.approx(term, rel=1e-4)


def test_eta_needs_no_calibration_and_eata_without_it_raises_leaving_the_model_untouched():
    eta = ETA(trained_digits(), num_classes=10)
    assert not hasattr(eta, "fisher") and eta.name == "eta"
    model = trained_digits()
    with pytest.raises(ValueError, match="reference.*'eta'"):
        EATA(model, num_classes=10)
    assert not any(isinstance(m, RobustBatchNorm) for m in model.modules())
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", [ETA, EATA])
def test_only_normalisation_affines_change_and_reset_restores_the_source_bit_for_bit(method):
    model = trained_digits()
    options = {"reference": calibration()} if method is EATA else {}
    adapter = method(model, num_classes=10, norm="batch", **options)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    x = noisy_digits(0, 64)
    with torch.no_grad():
        before = model(x)
    first = adapter.adapt(x)
    torch.testing.assert_close(first.outputs, before, rtol=0, atol=0)  # predict, then step
    for start in (64, 128):
        adapter.adapt(noisy_digits(start, 64))
    assert adapter.steps == 3 and adapter.current_model_probs is not None
    assert adapter.backward_samples < 3 * 64, "the filters spare some backward passes"
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, source[k])}
    assert changed == set(adapter.param_names)
    assert {k.split(".")[0] for k in changed} == {"1", "4", "7"}  # the three BatchNorm2d layers

    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert adapter.current_model_probs is None and adapter.steps == 0
    assert adapter.optimizer.state_dict()["state"] == {}
    torch.testing.assert_close(adapter.adapt(x).outputs, before, rtol=0, atol=0)


def test_checkpoint_round_trip_restores_the_moving_average_of_probabilities():
    eata = EATA(trained_digits(), num_classes=10, norm="batch", reference=calibration())
    assert "eata.model_probs" not in eata.state_dict(), "omitted while m is unset"
    for start in (0, 64):
        eata.adapt(noisy_digits(start, 64))
    saved = eata.state_dict()
    torch.testing.assert_close(saved["eata.model_probs"], eata.current_model_probs, rtol=0, atol=0)

    clone = EATA(trained_digits(), num_classes=10, norm="batch", reference=calibration())
    clone.load_state_dict(saved)
    torch.testing.assert_close(clone.current_model_probs, eata.current_model_probs, rtol=0, atol=0)
    x = noisy_digits(128, 64)
    a, b = clone.adapt(x), eata.adapt(x)
    torch.testing.assert_close(a.outputs, b.outputs, rtol=0, atol=0)
    assert (a.backward_samples, a.loss) == (b.backward_samples, b.loss)
    torch.testing.assert_close(clone.current_model_probs, eata.current_model_probs, rtol=0, atol=0)

    with pytest.raises(ValueError, match="10"):
        clone.load_state_dict({**saved, "eata.model_probs": torch.full((3,), 1 / 3)})
    clone.load_state_dict({k: v for k, v in saved.items() if k != "eata.model_probs"})
    assert clone.current_model_probs is None


def test_single_samples_are_buffered_into_at_most_one_step_per_adapt_batch():
    eata = EATA(trained_digits(), num_classes=10, reference=calibration(), adapt_batch_size=8)
    stream = noisy_digits(0, 16)
    results = [eata.adapt(stream[i:i + 1]) for i in range(16)]
    assert all(tuple(r.outputs.shape) == (1, 10) for r in results)
    assert [i for i, r in enumerate(results) if r.stepped] in ([7, 15], [7], [15])
    assert 1 <= eata.steps <= 2 and eata.buffered == 0
    assert eata.backward_samples == sum(r.backward_samples for r in results if r.stepped)
    assert 0 < eata.reliable_samples <= 16
