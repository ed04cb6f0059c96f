"""PSMT follows its official code: SCE to the teacher plus EWC to source, the 3% of entries with
the smallest squared gradient restored to source, a teacher that copies them and averages the
rest, and teacher + student logits from before the step as the output."""

from __future__ import annotations

import copy
import math
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from adapters.tta.norm import RobustBatchNorm
from adapters.tta.psmt import (
    PSMT,
    mean_teacher_update,
    smallest_fraction_mask,
    symmetric_cross_entropy,
)
from service.demo import WEIGHTS_PATH, digits_cnn, digits_split


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    x_train, _, x_test, _ = digits_split()
    return x_train, x_test


def trained_cnn() -> nn.Module:
    model = digits_cnn()
    model.load_state_dict(load_file(str(WEIGHTS_PATH)))
    return model


def calibration() -> torch.Tensor:
    return torch.from_numpy(_digits()[0][:256])


def shifted_digits(count: int, seed: int = 0) -> torch.Tensor:
    x_test = _digits()[1][:count]
    noisy = x_test + np.random.default_rng(seed).normal(0, 0.3, size=x_test.shape)
    return torch.from_numpy(np.clip(noisy, 0, 1).astype(np.float32))


def psmt(**options: object) -> PSMT:
    return PSMT(trained_cnn(), reference=calibration(), **options)


def test_the_mask_selects_the_floor_of_ratio_times_n_smallest_entries_across_all_tensors():
    squared = [torch.tensor([[0.5, 0.01], [0.3, 0.02]]),
               torch.tensor([0.04, 0.9, 0.001, 0.6, 0.7, 0.8])]
    masks = smallest_fraction_mask(squared, 0.3)  # ⌊0.3 · 10⌋ = 3: 0.001, 0.01, 0.02
    assert masks[0].tolist() == [[False, True], [False, True]]
    assert masks[1].tolist() == [False, False, True, False, False, False]
    masks = smallest_fraction_mask(squared, 0.25)  # ⌊2.5⌋ = 2: 0.001, 0.01
    assert sum(int(m.sum()) for m in masks) == 2 and bool(masks[1][2]) and bool(masks[0][0, 1])
    assert sum(int(m.sum()) for m in smallest_fraction_mask(squared, 0.0)) == 0

    values = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    chunks = list(values.split([1, 299, 700]))
    flat = torch.cat(smallest_fraction_mask(chunks, 0.03))
    assert int(flat.sum()) == 30 == math.floor(0.03 * 1000)
    assert values[flat].max() < values[~flat].min()


def test_the_teacher_copies_masked_entries_from_the_student_and_averages_the_rest():
    teacher = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[4.0]])]
    student = [torch.tensor([0.0, 10.0, -1.0]), torch.tensor([[-6.0]])]
    masks = [torch.tensor([False, True, False]), torch.tensor([[False]])]
    mean_teacher_update(teacher, student, masks, momentum=0.9)
    torch.testing.assert_close(teacher[0], torch.tensor([0.9, 10.0, 2.6]))  # 0.9·3 + 0.1·(-1)
    torch.testing.assert_close(teacher[1], torch.tensor([[3.0]]))  # 0.9·4 + 0.1·(-6)


def test_symmetric_cross_entropy_matches_a_hand_computed_two_sample_case():
    student = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    teacher = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    # sample 1: -½(½ ln ¼ + ½ ln ¾) - ½(¼ ln ½ + ¾ ln ½); sample 2 (equal): the entropy
    first = -0.25 * (math.log(0.25) + math.log(0.75)) - 0.5 * math.log(0.5)
    second = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    loss = symmetric_cross_entropy(student, teacher, alpha=0.5)
    torch.testing.assert_close(loss, torch.tensor([first, second]))
    plain = symmetric_cross_entropy(student, teacher, alpha=0.0)
    assert float(plain[0]) == pytest.approx(-0.5 * (math.log(0.25) + math.log(0.75)))


def test_psmt_needs_calibration_data_and_trains_every_weight_and_bias_with_adam():
    with pytest.raises(ValueError, match="reference="):
        PSMT(trained_cnn())
    adapter = psmt(norm="batch")
    trainable = {name for name, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter.params) == {name for name, _ in digits_cnn().named_parameters()}
    assert not any(p.requires_grad for p in adapter.teacher.parameters())
    group = adapter.optimizer.param_groups[0]
    assert isinstance(adapter.optimizer, torch.optim.Adam)
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 0)
    assert sorted(adapter.fisher) == sorted(adapter.params)
    assert all(float(f.sum()) > 0 for f in adapter.fisher.values())


def test_the_output_is_teacher_plus_student_logits_from_before_the_step():
    adapter = psmt(norm="batch")
    x = shifted_digits(64)
    with torch.no_grad():
        before = adapter.teacher(x) + adapter.model(x)
    result = adapter.adapt(x)
    assert result.stepped and result.backward_samples == 64 and adapter.steps == 1
    torch.testing.assert_close(result.outputs, before, rtol=0, atol=0)
    with torch.no_grad():
        after = adapter.teacher(x) + adapter.model(x)
    assert not torch.equal(after, before)


def test_a_step_restores_the_lowest_gradient_entries_to_source_and_updates_the_teacher():
    adapter = psmt(norm="batch")
    x = shifted_digits(64)
    names = list(adapter.params)
    source = {n: p.detach().clone() for n, p in adapter.params.items()}
    teacher_before = {n: p.detach().clone() for n, p in adapter.teacher_params.items()}
    # the same gradient, taken independently on a copy (the EWC term is zero at the source)
    student = copy.deepcopy(adapter.model)
    with torch.no_grad():
        teacher_logits = adapter.teacher(x)
    loss = symmetric_cross_entropy(student(x), teacher_logits, 0.5).mean()
    grads = torch.autograd.grad(loss, [dict(student.named_parameters())[n] for n in names])
    masks = dict(zip(names, smallest_fraction_mask([g ** 2 for g in grads], 0.03), strict=True))
    total = sum(p.numel() for p in adapter.params.values())
    assert sum(int(m.sum()) for m in masks.values()) == math.floor(0.03 * total) == 721

    adapter.adapt(x)
    m2 = 0.999 ** 2  # the official code averages unmasked teacher entries twice per step
    for name in names:
        mask, after = masks[name], adapter.params[name].detach()
        assert torch.equal(after[mask], source[name][mask]), name
        assert bool((after[~mask] != source[name][~mask]).all()), f"{name}: Adam moved the rest"
        teacher = adapter.teacher_params[name]
        assert torch.equal(teacher[mask], after[mask]), name
        torch.testing.assert_close(teacher[~mask],
                                   m2 * teacher_before[name][~mask] + (1 - m2) * after[~mask])


def test_the_loss_adds_lambda_fisher_delta_squared_for_a_weight_moved_from_source():
    adapter = psmt(norm="batch")
    assert float(adapter.ewc_penalty().detach()) == 0.0
    name = max(adapter.fisher, key=lambda n: float(adapter.fisher[n].max()))
    index = int(adapter.fisher[name].argmax())
    other = "0.weight" if name != "0.weight" else "11.weight"
    delta = 0.1
    with torch.no_grad():
        adapter.params[name].view(-1)[index] += delta
        adapter.params[other].view(-1)[0] -= 2 * delta
    expected = 500.0 * (float(adapter.fisher[name].view(-1)[index]) * delta ** 2
                        + float(adapter.fisher[other].view(-1)[0]) * (2 * delta) ** 2)
    assert float(adapter.ewc_penalty().detach()) == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-4

    x = shifted_digits(64)
    with torch.no_grad():
        sce = symmetric_cross_entropy(adapter.model(x), adapter.teacher(x), 0.5).mean()
    assert adapter.adapt(x).loss == pytest.approx(float(sce) + expected, rel=1e-5)


def test_reset_restores_student_teacher_statistics_and_optimizer_bit_for_bit():
    adapter = psmt()
    student_source = copy.deepcopy(adapter.model.state_dict())
    teacher_source = copy.deepcopy(adapter.teacher.state_dict())
    for seed in range(2):
        adapter.adapt(shifted_digits(64, seed))
    for i in range(3):
        adapter.adapt(shifted_digits(3, seed=10 + i))
    assert adapter.steps == 2 and adapter.buffered == 9
    changed = [k for k, v in adapter.teacher.state_dict().items()
               if not torch.equal(v, teacher_source[k])]
    assert {k.rsplit(".", 1)[1] for k in changed} == {"weight", "bias", "mean", "square"}

    adapter.reset()
    for key, value in adapter.model.state_dict().items():
        assert torch.equal(value, student_source[key]), key
    for key, value in adapter.teacher.state_dict().items():
        assert torch.equal(value, teacher_source[key]), key
    assert adapter.steps == 0 and adapter.buffered == 0 and not adapter.optimizer.state


def test_a_checkpoint_restores_student_teacher_and_optimizer_moments():
    adapter, clone = psmt(), psmt()
    for seed in range(3):  # whole adapt batches: nothing waits in the (unsaved) buffer
        adapter.adapt(shifted_digits(64, seed))
    saved = adapter.state_dict()
    assert any(k.startswith("teacher.") and k.endswith(".mean") for k in saved)
    clone.load_state_dict(saved)
    x = shifted_digits(64, seed=9)
    torch.testing.assert_close(clone.adapt(x).outputs, adapter.adapt(x).outputs, rtol=0, atol=0)
    for name in adapter.params:
        assert torch.equal(clone.params[name], adapter.params[name]), name
        assert torch.equal(clone.teacher_params[name], adapter.teacher_params[name]), name

    without_teacher = {k: v for k, v in saved.items() if not k.startswith("teacher.")}
    with pytest.raises(ValueError, match="teacher"):
        psmt().load_state_dict(without_teacher)


def test_single_samples_are_answered_one_row_each_and_step_once_per_adapt_batch():
    adapter = psmt(adapt_batch_size=8)
    stream = shifted_digits(16)
    results = [adapter.adapt(stream[i:i + 1]) for i in range(16)]
    assert [i for i, r in enumerate(results) if r.stepped] == [7, 15]
    assert all(r.outputs.shape == (1, 10) for r in results)
    assert adapter.steps == 2 and adapter.backward_samples == 16 and adapter.buffered == 0


def test_the_step_over_a_buffer_moves_neither_models_statistics_and_infer_moves_nothing():
    adapter = psmt(adapt_batch_size=8)
    stream = shifted_digits(9)
    for i in range(7):
        adapter.adapt(stream[i:i + 1])
    # what the 8th sample's prediction alone does to the teacher's statistics
    expected_teacher = copy.deepcopy(adapter.teacher)
    with torch.no_grad():
        expected_teacher(stream[7:8])
    assert adapter.adapt(stream[7:8]).stepped
    for (name, buffer), (_, wanted) in zip(adapter.teacher.named_buffers(),
                                           expected_teacher.named_buffers(), strict=True):
        assert torch.equal(buffer, wanted), name

    layers = [m for m in (*adapter.model.modules(), *adapter.teacher.modules())
              if isinstance(m, RobustBatchNorm)]
    before = [(m.mean.clone(), m.square.clone()) for m in layers]
    adapter.infer(stream[8:9])
    assert all(torch.equal(m.mean, mean) and torch.equal(m.square, square)
               for m, (mean, square) in zip(layers, before, strict=True))
