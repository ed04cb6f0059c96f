"""Balanced test-time statistics (`norm = "balanced"`) and the engine's repeated-input rule: what
keeps a run of one class, or one request sent again and again, from dragging the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from adapters.tta.balanced import BalancedMemory, BalancedStatistics
from adapters.tta.bn import NormStatistics
from adapters.tta.norm import RobustBatchNorm, configure_norm, frozen_statistics
from adapters.tta.tent import Tent


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()


def layer(model: nn.Module) -> RobustBatchNorm:
    return next(m for m in model.modules() if isinstance(m, RobustBatchNorm))


def one_hot_logits(labels: list[int], classes: int = 3) -> torch.Tensor:
    return 10.0 * torch.eye(classes)[labels]


def feed(model: nn.Module, stats: BalancedStatistics, x: torch.Tensor, labels: list[int]) -> None:
    """A committed forward of `x`, then its classes as if the model had predicted them."""
    model(x)
    stats.observe(x, one_hot_logits(labels))


def test_a_run_of_one_class_moves_the_statistics_only_by_its_share() -> None:
    balanced = configure_norm(bn_model(), "balanced")
    stats = BalancedStatistics(balanced, num_classes=3, momentum=0.02, window=500)
    robust = configure_norm(bn_model(), "robust")
    source = layer(balanced).mean.clone()
    shifted = torch.randn(200, 4) + 3.0
    for row in shifted:  # 200 single requests, all of one class
        feed(balanced, stats, row[None], [0])
        robust(row[None])
    robust_move = float((layer(robust).mean - source).norm())
    balanced_move = float((layer(balanced).mean - source).norm())
    share = float(layer(balanced).class_weight[0])
    # class 0's weight grew from 1/3 by 200 samples over a 500-sample window
    expected_share = 1 / 3 * (1 - 1 / 500) ** 200 + 1 - (1 - 1 / 500) ** 200
    assert share == pytest.approx(expected_share, rel=1e-4)
    assert balanced_move < 0.6 * robust_move
    mixed = layer(balanced).class_weight @ layer(balanced).class_mean
    assert torch.allclose(layer(balanced).mean, mixed)


def test_a_shift_seen_by_every_class_moves_the_statistics_as_far_as_robust() -> None:
    balanced = configure_norm(bn_model(), "balanced")
    stats = BalancedStatistics(balanced, num_classes=3, momentum=0.02, window=500)
    robust = configure_norm(bn_model(), "robust")
    source = layer(balanced).mean.clone()
    for index, row in enumerate(torch.randn(600, 4) + 3.0):  # classes interleaved
        feed(balanced, stats, row[None], [index % 3])
        robust(row[None])
    robust_move = layer(robust).mean - source
    balanced_move = layer(balanced).mean - source
    assert float((balanced_move - robust_move).norm()) < 0.15 * float(robust_move.norm())


def test_a_frozen_forward_or_an_inference_leaves_the_balanced_statistics_alone() -> None:
    model = configure_norm(bn_model(), "balanced")
    stats = BalancedStatistics(model, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4) + 5.0
    with frozen_statistics(model):
        model(x)
    stats.observe(x, one_hot_logits([0] * 8))
    model(x)  # a committed forward moves nothing by itself
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert stats.observed == 0


def test_a_non_finite_sample_is_left_out_of_the_class_statistics() -> None:
    model = configure_norm(bn_model(), "balanced")
    stats = BalancedStatistics(model, num_classes=3)
    x = torch.randn(2, 4)
    x[1, 0] = float("inf")
    model(x)
    outputs = one_hot_logits([0, 1])
    stats.observe(x, outputs)
    assert stats.observed == 1
    assert torch.isfinite(layer(model).class_mean).all()
    assert torch.isfinite(layer(model).mean).all()


def test_reset_returns_every_class_statistic_and_weight_to_the_source() -> None:
    model = bn_model()
    adapter = NormStatistics(model, norm="balanced", num_classes=3)
    for _ in range(20):
        adapter.adapt(torch.randn(4, 4) + 2.0)
    bn = layer(adapter.model)
    assert not torch.equal(bn.mean, bn.source_mean)
    adapter.reset()
    assert torch.equal(bn.mean, bn.source_mean)
    assert torch.equal(bn.class_mean, bn.source_mean.expand_as(bn.class_mean))
    assert torch.allclose(bn.class_weight, torch.full((3,), 1 / 3))


def test_the_checkpoint_carries_the_class_statistics() -> None:
    adapter = NormStatistics(bn_model(), norm="balanced", num_classes=3)
    for _ in range(10):
        adapter.adapt(torch.randn(4, 4) + 2.0)
    state = adapter.state_dict()
    assert any(k.endswith(".class_mean") for k in state)
    restored = NormStatistics(bn_model(), norm="balanced", num_classes=3)
    restored.load_state_dict(state)
    x = torch.randn(5, 4)
    assert torch.allclose(adapter.infer(x), restored.infer(x))


def test_a_gradient_method_on_balanced_statistics_files_only_its_prediction_forward() -> None:
    adapter = Tent(bn_model(), norm="balanced", num_classes=3, adapt_batch_size=4)
    for _ in range(3):
        adapter.adapt(torch.randn(1, 4))
    assert adapter.statistics is not None
    # three predictions filed; the buffered step's forward (frozen) filed nothing
    assert adapter.statistics.observed == 3
    adapter.adapt(torch.randn(1, 4))  # the fourth fills the buffer: a step under frozen stats
    assert adapter.steps == 1
    assert adapter.statistics.observed == 4


def test_the_balanced_memory_keeps_each_class_to_its_share_and_drops_repeats() -> None:
    memory = BalancedMemory(capacity=6, num_classes=3, lambda_u=0.0)
    for _ in range(50):
        memory.add(torch.randn(2), label=1, uncertainty=0.0)
    assert memory.per_class() == [0, 2, 0]
    same = torch.ones(2)
    assert memory.add(same, label=0, uncertainty=0.0)
    assert not memory.add(same.clone(), label=0, uncertainty=0.0)
    assert memory.per_class() == [1, 2, 0]


def test_the_engine_serves_a_repeated_request_without_learning_from_it() -> None:
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine
    from service.settings import load_settings

    settings = load_settings(None, adapter={"name": "bn", "norm": "balanced", "restore": False})
    metrics = Metrics()
    engine = build_engine(settings, metrics, EventLog(metrics))
    try:
        image = np.random.default_rng(0).normal(size=(1, *engine.model.input_shape))
        first = engine.forward(image.astype(np.float32))
        state = {k: v.clone() for k, v in engine.adapter.model.state_dict().items()}
        for _ in range(20):
            again = engine.forward(image.astype(np.float32))
            assert again.predictions.tolist() == first.predictions.tolist()
        after = engine.adapter.model.state_dict()
        assert all(torch.equal(state[k], after[k]) for k in state)
        assert metrics.registry.get_sample_value("adaptd_repeated_inputs_total") == 20
    finally:
        engine.close()


def test_a_batch_mixing_new_and_repeated_rows_learns_from_the_new_ones_only() -> None:
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine
    from service.settings import load_settings

    # the class-run filter answers a row by what came before it: off, to compare rows alone
    settings = load_settings(None, adapter={"name": "bn", "norm": "balanced", "restore": False,
                                            "runs": "off"})
    metrics = Metrics()
    engine = build_engine(settings, metrics, EventLog(metrics))
    try:
        rng = np.random.default_rng(1)
        shape = engine.model.input_shape
        seen = rng.normal(size=(1, *shape)).astype(np.float32)
        engine.forward(seen)
        fresh = rng.normal(size=(1, *shape)).astype(np.float32)
        # the seen image twice, a new one, the new one again: one row to learn from
        batch = np.concatenate([seen, seen, fresh, fresh])
        observed = engine.adapter.statistics.observed
        served = engine.forward(batch)
        assert engine.adapter.statistics.observed == observed + 1
        assert metrics.registry.get_sample_value("adaptd_repeated_inputs_total") == 3
        # each row is answered in its place: the repeats as the model now answers them alone
        alone = [engine.forward(row[None], adapt=False).outputs[0] for row in batch]
        assert np.allclose(served.outputs[[0, 1, 3]], np.stack(alone)[[0, 1, 3]], atol=1e-5)
        assert served.features is not None and served.features.shape[0] == 4
    finally:
        engine.close()
