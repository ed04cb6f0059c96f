"""RoTTA follows its reference: the teacher serves, every sample enters a class-balanced memory,
and every `update_every` samples the statistics move on the memory, the student steps on the
timeliness-weighted soft cross-entropy to the teacher, and the teacher averages the student in."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from adapters.tta.norm import RobustBatchNorm
from adapters.tta.rotta import RoTTA, soft_cross_entropy, strong_augment, timeliness_weight
from service.demo import digits_split


def four_class_mlp() -> nn.Module:
    """Logits are the positive parts of the four input features (through a BatchNorm with unit
    source statistics): the class is the largest feature, so inputs led by feature 0 are class 0
    however the affines move a little."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        eye = torch.eye(4)
        model[0].weight.copy_(torch.cat([eye, -eye]))
        model[0].bias.zero_()
        model[3].weight.copy_(torch.cat([eye, torch.zeros(4, 4)], 1))
        model[3].bias.zero_()
    return model


def class_zero_run(count: int, seed: int = 0) -> torch.Tensor:
    x = 0.1 * torch.randn(count, 4, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += 5.0
    return x


def mixed_stream(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 4, generator=torch.Generator().manual_seed(seed))


def statistics(module: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for name, b in module.named_buffers() if name.endswith((".mean", ".square"))]


def learned(rotta: RoTTA) -> dict[str, torch.Tensor]:
    return ({f"teacher.{k}": v.clone() for k, v in rotta.model.state_dict().items()}
            | {f"student.{k}": v.clone() for k, v in rotta.student.state_dict().items()})


def test_soft_cross_entropy_and_the_timeliness_weight_are_the_reference_formulas():
    student, teacher = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    p_t = torch.softmax(teacher, 1)
    expected = -(p_t * torch.log_softmax(student, 1)).sum()
    assert soft_cross_entropy(student, teacher).item() == pytest.approx(expected.item())
    ages = torch.tensor([0.0, 0.5, 2.0])
    np.testing.assert_allclose(timeliness_weight(ages).numpy(),
                               np.exp(-ages.numpy()) / (1 + np.exp(-ages.numpy())), rtol=1e-6)


def test_a_run_of_one_class_leaves_the_memory_holding_only_that_class_share():
    rotta = RoTTA(four_class_mlp(), num_classes=4)  # memory 64: 16 per class
    for start in range(0, 500, 25):
        result = rotta.adapt(class_zero_run(25, seed=start))
        assert result.outputs.argmax(1).tolist() == [0] * 25
    assert rotta.memory.per_class() == [16, 0, 0, 0]
    assert rotta.offered == 500 and rotta.steps == 500 // 64


def test_the_statistics_move_only_at_every_64th_sample_one_request_at_a_time():
    rotta = RoTTA(four_class_mlp(), num_classes=4)
    stream = mixed_stream(200)
    moved, stepped = [], []
    for i in range(200):
        before = statistics(rotta.model) + statistics(rotta.student)
        result = rotta.adapt(stream[i:i + 1])
        after = statistics(rotta.model) + statistics(rotta.student)
        if any(not torch.equal(b, a) for b, a in zip(before, after, strict=True)):
            moved.append(i)
        if result.stepped:
            stepped.append(i)
            assert result.backward_samples == len(rotta.memory)  # one pass over the memory
    assert moved == stepped == [63, 127, 191]
    assert rotta.steps == 3


def test_one_batch_updates_at_each_multiple_of_update_every_it_crosses():
    rotta = RoTTA(four_class_mlp(), num_classes=4, memory_size=16, update_every=50)
    result = rotta.adapt(mixed_stream(40))
    assert not result.stepped and rotta.steps == 0
    result = rotta.adapt(mixed_stream(70, seed=1))  # samples 41..110 cross 50 and 100
    assert result.stepped and rotta.steps == 2 and result.backward_samples == 32
    assert result.outputs.shape == (70, 4)


def test_the_memory_forward_moves_the_statistics_by_alpha_towards_the_memory_batch():
    rotta = RoTTA(four_class_mlp(), num_classes=4, memory_size=8, update_every=8, alpha=0.05)
    rotta.adapt(mixed_stream(7))
    teacher_bn = rotta.model[1]
    assert isinstance(teacher_bn, RobustBatchNorm)
    mean_before = teacher_bn.mean.clone()
    rotta.adapt(mixed_stream(1, seed=7))
    samples, _ = rotta.memory.samples()
    with torch.no_grad():
        hidden = rotta.model[0](samples)
    np.testing.assert_allclose(teacher_bn.mean.numpy(),
                               (0.95 * mean_before + 0.05 * hidden.mean(0)).numpy(), rtol=1e-5)


@pytest.mark.parametrize("nu", [0.001, 0.25])
def test_the_teacher_moves_by_nu_towards_the_stepped_student_per_update(nu):
    rotta = RoTTA(four_class_mlp(), num_classes=4, nu=nu, update_every=64)
    rotta.adapt(mixed_stream(64))  # one update: teacher and student now differ
    rotta.adapt(mixed_stream(63, seed=1))
    teacher_before = {k: p.clone() for k, p in rotta.teacher_params.items()}
    student_before = {k: p.clone() for k, p in rotta.params.items()}
    assert rotta.adapt(mixed_stream(1, seed=2)).stepped
    for name, teacher in rotta.teacher_params.items():
        student = rotta.params[name]
        assert not torch.equal(student, student_before[name])
        expected = (1 - nu) * teacher_before[name] + nu * student
        torch.testing.assert_close(teacher, expected, rtol=0, atol=1e-7)


def test_samples_that_are_not_finite_never_enter_the_memory_nor_count_towards_an_update():
    rotta = RoTTA(four_class_mlp(), num_classes=4)
    before = learned(rotta)
    bad = mixed_stream(64)
    bad[::2, 1] = float("nan")
    bad[1::2, 2] = float("inf")
    result = rotta.adapt(bad)
    assert not torch.isfinite(result.outputs).all(1).any()
    assert (len(rotta.memory), rotta.offered, rotta.steps) == (0, 0, 0)
    after = learned(rotta)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_an_update_whose_loss_is_not_finite_takes_no_step_and_changes_nothing():
    rotta = RoTTA(four_class_mlp(), num_classes=4, update_every=8)
    rotta.adapt(mixed_stream(8))  # one good update first, so Adam has moments to keep
    assert rotta.steps == 1
    rotta.memory.add(torch.tensor([float("nan"), 0.0, 0.0, 0.0]), 0, 0.5)  # as if it slipped in
    before, moments = learned(rotta), copy.deepcopy(rotta.optimizer.state_dict())
    result = rotta.update()
    assert result.skipped and not result.stepped and rotta.skipped_steps == 1
    after = learned(rotta)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    for state, saved in zip(rotta.optimizer.state_dict()["state"].values(),
                            moments["state"].values(), strict=True):
        assert all(torch.equal(state[k], saved[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_reset_returns_teacher_student_statistics_memory_and_optimizer_exactly_to_source():
    source = RoTTA(four_class_mlp(), num_classes=4)
    rotta = RoTTA(four_class_mlp(), num_classes=4)
    stream = mixed_stream(150)
    first = rotta.adapt(stream).outputs
    assert rotta.steps == 2 and learned(rotta).keys() == learned(source).keys()
    assert any(not torch.equal(v, learned(source)[k]) for k, v in learned(rotta).items())
    rotta.reset()
    assert all(torch.equal(v, learned(source)[k]) for k, v in learned(rotta).items())
    assert (len(rotta.memory), rotta.offered, rotta.steps) == (0, 0, 0)
    assert rotta.optimizer.state_dict()["state"] == {}
    torch.testing.assert_close(rotta.adapt(stream).outputs, first, rtol=0, atol=0)


def test_a_checkpoint_restores_the_teacher_and_the_student():
    rotta = RoTTA(four_class_mlp(), num_classes=4)
    rotta.adapt(mixed_stream(130))
    state = rotta.state_dict()
    restored = RoTTA(four_class_mlp(), num_classes=4)
    restored.load_state_dict(state)
    assert all(torch.equal(v, learned(rotta)[k]) for k, v in learned(restored).items())
    probe = mixed_stream(5, seed=9)
    torch.testing.assert_close(restored.infer(probe), rotta.infer(probe), rtol=0, atol=0)
    with pytest.raises(ValueError, match="lacks the student"):
        restored.load_state_dict({k: v for k, v in state.items() if not k.startswith("student.")})


def test_per_batch_or_frozen_statistics_are_refused():
    for norm in ("batch", "source"):
        with pytest.raises(ValueError, match=f"norm '{norm}' cannot serve it"):
            RoTTA(four_class_mlp(), num_classes=4, norm=norm)
    assert RoTTA(four_class_mlp(), num_classes=4, norm="balanced").norm == "balanced"


def test_the_augmentation_of_features_is_noise_scaled_to_each_feature_spread():
    x = torch.stack([torch.linspace(-1, 1, 64), torch.full((64,), 3.0)], 1)
    y = strong_augment(x, torch.Generator().manual_seed(0), feature_noise=0.1)
    assert torch.equal(y[:, 1], x[:, 1])  # no spread, no noise
    assert 0.02 < float((y[:, 0] - x[:, 0]).std()) < 0.1  # 0.1 x the spread 0.58


def test_rotta_is_served_by_name_on_the_demo_model():
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine
    from service.settings import load_settings

    settings = load_settings(None, adapter={"name": "rotta"})
    metrics = Metrics()
    engine = build_engine(settings, metrics, EventLog(metrics))
    assert isinstance(engine.adapter, RoTTA)
    assert engine.adapter.num_classes == 10 and engine.adapter.norm == "balanced"
    x_test = digits_split()[2]
    first = engine.forward(x_test[:40], adapt=True)
    second = engine.forward(x_test[40:70], adapt=True)
    assert first.predictions.shape == (40,) and second.predictions.shape == (30,)
    # the feature tap sees the served (teacher) forward, not the update's forward of the memory
    assert second.features is not None and second.features.shape[0] == 30
    assert engine.adapter.steps == 1 and engine.adapter.offered == 70
