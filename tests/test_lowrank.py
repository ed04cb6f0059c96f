"""Low-rank adapters: injection leaves the model's function as it was, only the factors train, a
supervised step on a shifted task lowers the loss, reset restores the source exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from adapters.labels.lowrank import (
    LowRankLinear,
    SupervisedStep,
    inject_lowrank,
    lowrank_layers,
    supervised_parameters,
)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 1))


class LayerNormRegressor(nn.Module):
    """An MLP with LayerNorm and no BatchNorm, its linear layers nested in submodules."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Linear(5, 32), nn.LayerNorm(32), nn.GELU())
        self.head = nn.Sequential(nn.Linear(32, 16), nn.LayerNorm(16), nn.GELU(),
                                  nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def inputs(count: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 5, generator=torch.Generator().manual_seed(seed))


# --- injection --------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_injection_leaves_outputs_bit_identical(layers: int) -> None:
    model = mlp()
    x = inputs()
    before = model(x)

    injected = inject_lowrank(model, rank=4, layers=layers)

    assert len(injected) == layers
    assert torch.equal(model(x), before)


def test_the_last_linear_layers_are_the_ones_wrapped() -> None:
    model = mlp()

    injected = inject_lowrank(model, layers=2)

    assert injected == [model[2], model[4]]
    assert type(model[0]) is nn.Linear
    assert all(isinstance(layer, nn.Linear) for layer in injected)  # still found as Linear


def test_the_source_weights_keep_their_state_dict_keys() -> None:
    model = mlp()
    source = {k: v.clone() for k, v in model.state_dict().items()}

    inject_lowrank(model, rank=2)

    state = model.state_dict()
    assert set(state) - set(source) == {"4.lora_A", "4.lora_B"}
    assert all(torch.equal(state[k], v) for k, v in source.items())
    assert model[4].lora_A.shape == (2, 32)
    assert model[4].lora_B.shape == (1, 2)


def test_b_starts_at_zero_and_the_scale_is_alpha_over_rank() -> None:
    layer = inject_lowrank(mlp(), rank=4, alpha=8.0)[0]

    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    assert layer.scaling == 2.0
    assert inject_lowrank(mlp(), rank=4)[0].scaling == 1.0


def test_the_update_is_alpha_over_r_times_b_a_x() -> None:
    layer = LowRankLinear(nn.Linear(3, 2), rank=2, alpha=1.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
    x = torch.tensor([[3.0, 5.0, 7.0]])

    delta = layer(x) - nn.functional.linear(x, layer.weight, layer.bias)

    # A x = (3, 5); B A x = (13, -5); times alpha / r = 0.5
    torch.testing.assert_close(delta, torch.tensor([[6.5, -2.5]]))


def test_injecting_twice_or_too_deep_is_refused() -> None:
    model = mlp()
    inject_lowrank(model)

    with pytest.raises(ValueError, match="already has low-rank adapters"):
        inject_lowrank(model)
    with pytest.raises(ValueError, match="model has 3"):
        inject_lowrank(mlp(), layers=4)


def test_the_draw_of_a_is_seeded_and_leaves_the_global_generator_alone() -> None:
    first, second, third = mlp(seed=3), mlp(seed=3), mlp(seed=3)
    torch.manual_seed(123)
    expected_next = torch.rand(1)

    torch.manual_seed(123)
    inject_lowrank(first, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    inject_lowrank(second, seed=5)
    inject_lowrank(third, seed=6)

    assert torch.equal(first[4].lora_A, second[4].lora_A)
    assert not torch.equal(first[4].lora_A, third[4].lora_A)


# --- which parameters train -------------------------------------------------------------------


def test_only_the_low_rank_factors_train() -> None:
    model = mlp()
    inject_lowrank(model, layers=2)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()
              if "lora" not in name}
    step = SupervisedStep(model, task="regression", learning_rate=1e-2)
    x = inputs()

    for _ in range(5):
        step.step(x, torch.ones(len(x), 1))

    assert step.param_names == ["2.lora_A", "2.lora_B", "4.lora_A", "4.lora_B"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == step.param_names
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in frozen.items())
    assert torch.count_nonzero(model[4].lora_B) > 0


def test_supervised_parameters_follow_the_preference() -> None:
    model = LayerNormRegressor()
    inject_lowrank(model)

    _, lowrank_names = supervised_parameters(model, prefer="lowrank")
    _, norm_names = supervised_parameters(model, prefer="norm")

    assert lowrank_names == ["head.3.lora_A", "head.3.lora_B"]
    assert norm_names == ["encoder.1.weight", "encoder.1.bias", "head.1.weight", "head.1.bias"]
    # a model without normalisation layers falls back to its adapters, and the reverse
    plain = mlp()
    inject_lowrank(plain)
    assert supervised_parameters(plain, prefer="norm")[1] == ["4.lora_A", "4.lora_B"]
    assert supervised_parameters(LayerNormRegressor(), prefer="lowrank")[1] == norm_names
    with pytest.raises(ValueError, match="inject_lowrank"):
        supervised_parameters(mlp())


# --- supervised steps -------------------------------------------------------------------------


def test_supervised_steps_lower_the_loss_on_a_shifted_regression_task() -> None:
    model = mlp()
    x = inputs(256)
    with torch.no_grad():
        shifted = 1.5 * model(x) + 0.7  # the concept moved: same inputs, new targets
    inject_lowrank(model, rank=4)
    step = SupervisedStep(model, task="regression", learning_rate=1e-2)

    losses = [step.step(x, shifted) for _ in range(150)]

    assert losses[0] == pytest.approx(float(((shifted - (shifted - 0.7) / 1.5) ** 2).mean()))
    assert losses[-1] < 0.05 * losses[0]


def test_huber_loss_also_lowers_the_loss() -> None:
    model = mlp()
    x = inputs(256)
    with torch.no_grad():
        shifted = model(x) + 3.0
    inject_lowrank(model)
    step = SupervisedStep(model, task="regression", loss="huber", learning_rate=1e-2)

    losses = [step.step(x, shifted) for _ in range(150)]

    assert losses[0] == pytest.approx(2.5, abs=1e-4)  # |error| = 3 > delta = 1: 3 - 0.5
    assert losses[-1] < 0.1 * losses[0]


def test_classification_steps_on_cross_entropy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x = inputs(256)
    with torch.no_grad():
        labels = (model(x).argmax(1) + 1) % 3  # every class relabelled
    inject_lowrank(model, rank=4, layers=2)
    step = SupervisedStep(model, task="classification", learning_rate=1e-2)

    losses = [step.step(x, labels) for _ in range(150)]

    assert losses[-1] < 0.5 * losses[0]
    assert float((model(x).argmax(1) == labels).float().mean()) > 0.8


def test_reset_restores_the_source_outputs_bit_identical() -> None:
    model = mlp()
    x = inputs()
    source = model(x).detach()
    inject_lowrank(model, layers=2)
    step = SupervisedStep(model, task="regression", learning_rate=1e-2)
    for _ in range(20):
        step.step(x, source + 1.0)
    assert not torch.equal(model(x), source)

    step.reset()

    assert torch.equal(model(x), source)
    assert step.steps == 0
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in lowrank_layers(model))


def test_layernorm_model_adapts_and_resets() -> None:
    model = LayerNormRegressor()
    x = inputs(256)
    with torch.no_grad():
        source = model(x)
    target = source * torch.tensor([1.2, 0.8]) + torch.tensor([0.5, -0.5])

    injected = inject_lowrank(model, rank=4, layers=2)
    assert [type(m).__name__ for m in (model.head[0], model.head[3])] == ["LowRankLinear"] * 2
    assert injected == [model.head[0], model.head[3]]
    assert torch.equal(model(x), source)
    step = SupervisedStep(model, task="regression", learning_rate=1e-2)
    losses = [step.step(x, target) for _ in range(150)]
    assert losses[-1] < 0.1 * losses[0]

    step.reset()
    assert torch.equal(model(x), source)


def shifted_steps(model: nn.Module, prefer: str
                  ) -> tuple[SupervisedStep, torch.Tensor, torch.Tensor, list[float]]:
    """100 steps of `prefer`'s parameters toward the source's outputs + 0.5."""
    x = inputs(256)
    with torch.no_grad():
        source = model(x)
    step = SupervisedStep(model, task="regression", prefer=prefer, learning_rate=1e-2)
    return step, x, source, [step.step(x, source + 0.5) for _ in range(100)]


def test_norm_affines_can_be_trained_instead() -> None:
    model = LayerNormRegressor()
    step, x, source, losses = shifted_steps(model, "norm")
    assert losses[-1] < 0.2 * losses[0]

    step.reset()
    assert torch.equal(model(x), source)


# --- state and the learning-rate cap ----------------------------------------------------------


def test_state_dict_holds_only_the_adapter_tensors() -> None:
    model = mlp()
    inject_lowrank(model, rank=2, layers=2)
    step = SupervisedStep(model, task="regression")
    step.step(inputs(), torch.zeros(128, 1))

    state = step.state_dict()

    params = {k for k in state if k.startswith("param.")}
    assert params == {"param.2.lora_A", "param.2.lora_B", "param.4.lora_A", "param.4.lora_B"}
    assert sum(state[k].numel() for k in params) == 2 * (32 + 32) + 2 * (32 + 1)


def test_state_dict_round_trip_reproduces_outputs_and_later_steps() -> None:
    x = inputs()
    trained = mlp()
    inject_lowrank(trained)
    step = SupervisedStep(trained, task="regression", learning_rate=1e-2)
    for _ in range(5):
        step.step(x, torch.ones(len(x), 1))

    restored_model = mlp()
    inject_lowrank(restored_model)
    restored = SupervisedStep(restored_model, task="regression", learning_rate=1e-2)
    restored.load_state_dict(step.state_dict())

    assert torch.equal(restored_model(x), trained(x))
    assert restored.step(x, torch.ones(len(x), 1)) == step.step(x, torch.ones(len(x), 1))
    assert torch.equal(restored_model(x), trained(x))


def test_the_learning_rate_is_capped() -> None:
    model = mlp()
    inject_lowrank(model)

    with pytest.raises(ValueError, match="cap"):
        SupervisedStep(model, task="regression", learning_rate=0.1, max_learning_rate=1e-2)
    step = SupervisedStep(model, task="regression", learning_rate=1e-3, max_learning_rate=1e-2)
    assert step.set_learning_rate(1.0) == 1e-2
    assert step.set_learning_rate(5e-3) == 5e-3


def test_a_loss_that_does_not_fit_the_task_is_refused() -> None:
    model = mlp()
    inject_lowrank(model)

    with pytest.raises(ValueError, match="mse, huber"):
        SupervisedStep(model, task="regression", loss="cross_entropy")


# --- every parameter, replay and reference rehearsal -------------------------------------------


def test_every_parameter_can_train_and_reset_restores_them_all() -> None:
    model = mlp()
    step, x, source, losses = shifted_steps(model, "all")

    assert step.trains == "all"
    assert step.param_names == [name for name, _ in model.named_parameters()]
    assert losses[-1] < 0.1 * losses[0]
    assert all(not torch.equal(p, s) for p, s in zip(step.params, step._source_params,
                                                      strict=True))
    step.reset()
    assert torch.equal(model(x), source)


def test_replay_keeps_the_last_samples_and_rehearses_them_after_each_batch() -> None:
    model = mlp()
    step = SupervisedStep(model, task="regression", prefer="all", replay=100, replay_steps=3)
    x = inputs(160)
    y = torch.arange(160, dtype=torch.float32).reshape(-1, 1)

    for start in range(0, 160, 40):
        step.learn(x[start:start + 40], y[start:start + 40])

    assert step.steps == 4 * (1 + 3)
    assert step.kept == 100
    assert step._kept_labels is not None
    # the ring holds samples 60 to 159, the oldest overwritten first
    assert sorted(step._kept_labels.reshape(-1).tolist()) == list(range(60, 160))
    assert step.describe()["kept"] == 100
    step.reset()
    assert step.kept == 0
    step.learn(x[:10], y[:10])  # a batch after the reset starts the ring again
    assert step.kept == 10 and step.steps == 4
    assert sorted(step._kept_labels[:10].reshape(-1).tolist()) == list(range(10))


def test_a_batch_longer_than_the_ring_keeps_its_last_samples() -> None:
    step = SupervisedStep(mlp(), task="regression", prefer="all", replay=8, replay_steps=1)
    y = torch.arange(20, dtype=torch.float32).reshape(-1, 1)

    step.learn(inputs(20), y)

    assert step._kept_labels is not None
    assert sorted(step._kept_labels.reshape(-1).tolist()) == list(range(12, 20))


def test_replay_makes_few_labels_teach_more() -> None:
    x = inputs(64)
    results = []
    for replay, steps in ((0, 0), (64, 8)):
        model = mlp()
        with torch.no_grad():
            target = model(x) + 1.0
        step = SupervisedStep(model, task="regression", prefer="all", learning_rate=1e-3,
                              replay=replay, replay_steps=steps)
        for start in range(0, 64, 16):
            step.learn(x[start:start + 16], target[start:start + 16])
        with torch.no_grad():
            results.append(float(((model(x) - target) ** 2).mean()))
    assert results[1] < 0.5 * results[0]


def robust_classifier(seed: int = 0) -> nn.Module:
    from adapters.tta.norm import configure_norm

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    model.eval()
    with torch.no_grad():  # source statistics that are not the identity
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return configure_norm(model, "robust", momentum=0.1)


def test_reference_rehearsal_keeps_what_the_model_knew_and_moves_no_statistic() -> None:
    from adapters.tta.norm import RobustBatchNorm

    # the reference: the source model's own answers on its inputs; the stream: inputs shifted
    # by 3, labelled with a class the source gives them rarely
    reference_x = inputs(256, seed=1)
    stream_x = inputs(256, seed=2) + 3.0
    agreement = []
    for reference_batch in (0, 64):
        model = robust_classifier()
        layer = next(m for m in model.modules() if isinstance(m, RobustBatchNorm))
        with torch.no_grad():
            model(stream_x)  # the stream has moved the test-time averages
            reference_y = robust_source_answers(model, reference_x)
        averages = (layer.mean.clone(), layer.square.clone())
        step = SupervisedStep(model, task="classification", prefer="all", learning_rate=1e-2,
                              reference=(reference_x, reference_y),
                              reference_batch=reference_batch)
        for start in range(0, 256, 32):
            for _ in range(5):
                step.learn(stream_x[start:start + 32], torch.full((32,), 2))
        assert torch.equal(layer.mean, averages[0]) and torch.equal(layer.square, averages[1])
        agreement.append(float((robust_source_answers(model, reference_x)
                                == reference_y).float().mean()))
    # without rehearsal the stream's class takes over the reference inputs too (0.18 agree)
    assert agreement[0] < 0.5 < 0.8 < agreement[1]


def robust_source_answers(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from adapters.tta.norm import frozen_statistics, source_statistics

    with torch.no_grad(), frozen_statistics(model), source_statistics(model):
        return model(x).argmax(1)


def test_replay_and_reference_options_are_checked() -> None:
    with pytest.raises(ValueError, match="set both above 0"):
        SupervisedStep(mlp(), task="regression", prefer="all", replay_steps=2)
    with pytest.raises(ValueError, match="set both above 0"):
        SupervisedStep(mlp(), task="regression", prefer="all", replay=10)
    with pytest.raises(ValueError, match="labelled reference"):
        SupervisedStep(mlp(), task="regression", prefer="all", reference_batch=8)
    with pytest.raises(ValueError, match="negative"):
        SupervisedStep(mlp(), task="regression", prefer="all", replay=-1)


def test_the_ring_is_allocated_at_start_when_the_input_shape_is_known() -> None:
    step = SupervisedStep(mlp(), task="regression", prefer="all", replay=50, replay_steps=1,
                          input_shape=(5,))
    assert step._kept_inputs is not None and step._kept_inputs.shape == (50, 5)


def test_a_checkpoint_of_every_parameter_restores_and_one_of_another_train_is_refused() -> None:
    x = inputs()
    trained = mlp()
    step = SupervisedStep(trained, task="regression", prefer="all", learning_rate=1e-2)
    for _ in range(5):
        step.step(x, torch.ones(len(x), 1))
    state = step.state_dict()

    restored_model = mlp()
    restored = SupervisedStep(restored_model, task="regression", prefer="all",
                              learning_rate=1e-2)
    restored.load_state_dict(state)
    assert torch.equal(restored_model(x), trained(x))
    assert restored.step(x, torch.ones(len(x), 1)) == step.step(x, torch.ones(len(x), 1))

    # the affines of a LayerNorm model are a subset of its parameters: a checkpoint of every
    # parameter must not load into a step that trains the affines alone, nor the other way
    norm_model = LayerNormRegressor()
    everything = SupervisedStep(norm_model, task="regression", prefer="all")
    everything.step(x, torch.zeros(len(x), 2))
    affines = SupervisedStep(LayerNormRegressor(), task="regression", prefer="norm")
    with pytest.raises(ValueError, match="another supervised.train"):
        affines.load_state_dict(everything.state_dict())
    affines.step(x, torch.zeros(len(x), 2))
    with pytest.raises(ValueError, match="lacks"):
        SupervisedStep(LayerNormRegressor(), task="regression",
                       prefer="all").load_state_dict(affines.state_dict())


def test_source_statistics_are_left_whatever_happens_inside() -> None:
    from adapters.tta.norm import RobustBatchNorm, source_statistics

    model = robust_classifier()
    with pytest.raises(RuntimeError), source_statistics(model):
        raise RuntimeError("a forward that fails")
    assert not any(m.source_only for m in model.modules() if isinstance(m, RobustBatchNorm))


def test_a_loss_that_is_not_finite_takes_no_step() -> None:
    model = mlp()
    step = SupervisedStep(model, task="regression", prefer="all", learning_rate=1e-2)
    before = [p.detach().clone() for p in model.parameters()]

    step.step(inputs(8), torch.full((8, 1), float("inf")))

    assert (step.steps, step.skipped) == (0, 1)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not step.optimizer.state  # Adam's moments untouched
    step.step(inputs(8), torch.zeros(8, 1))
    assert (step.steps, step.skipped) == (1, 1)


def test_replay_steps_draw_their_own_batch_size_whatever_the_new_batch() -> None:
    step = SupervisedStep(mlp(), task="regression", prefer="all", replay=500, replay_steps=2,
                          replay_batch=16)
    sizes = []
    original = step.step
    step.step = lambda x, y: sizes.append(len(x)) or original(x, y)  # type: ignore[method-assign]

    step.learn(inputs(200), torch.zeros(200, 1))  # a burst of labels learnt at once

    assert sizes == [200, 16, 16]


# --- the served weights as a moving average of the moved ones ---------------------------------


def test_averaging_serves_the_moving_average_of_the_weights_the_steps_move() -> None:
    x, y = inputs(), torch.ones(128, 1)
    plain_model, averaged_model = mlp(), mlp()
    plain = SupervisedStep(plain_model, task="regression", prefer="all", learning_rate=1e-2)
    averaged = SupervisedStep(averaged_model, task="regression", prefer="all",
                              learning_rate=1e-2, average=0.5)
    expected = [p.detach().clone() for p in plain.params]
    for _ in range(3):
        plain.step(x, y)
        averaged.step(x, y)
        expected = [0.5 * e + 0.5 * p.detach() for e, p in zip(expected, plain.params,
                                                                strict=True)]

    # the steps moved the same weights (kept beside the served ones), the model serves their
    # average: each served weight is the decayed sum of the moved weights after each step
    assert averaged._moved is not None
    for moved, param in zip(averaged._moved, plain.params, strict=True):
        assert torch.allclose(moved, param)
    for served, average in zip(averaged.params, expected, strict=True):
        assert torch.allclose(served, average, atol=1e-6)
    assert not torch.allclose(averaged_model(x), plain_model(x))


def test_averaging_keeps_what_another_learner_moved_between_steps() -> None:
    """A test-time adapter stepping the same weights between two labelled batches moves the
    served and the moved weights alike: the next step does not undo it."""
    x, y = inputs(), torch.ones(128, 1)
    model = mlp()
    step = SupervisedStep(model, task="regression", prefer="all", learning_rate=1e-2,
                          average=0.9)
    step.step(x, y)
    assert step._moved is not None
    moved_before = [m.clone() for m in step._moved]
    bias = model[4].bias
    average_before = bias.detach().clone()
    with torch.no_grad():
        bias.add_(3.0)  # another learner's step on the served weights
    served = bias.detach().clone()

    step.step(x, y)

    index = [i for i, p in enumerate(step.params) if p is bias][0]
    # the moved copy took the same +3 before it stepped, and the served bias moved from where
    # the other learner left it a tenth of the way to the moved one
    stepped = step._moved[index] - moved_before[index] - 3.0
    assert float(stepped.abs()) < 0.1
    gap = moved_before[index] - average_before + stepped
    assert torch.allclose(bias.detach() - served, 0.1 * gap, atol=1e-6)


def test_averaging_resets_and_checkpoints_with_the_moved_weights() -> None:
    x, y = inputs(), torch.ones(128, 1)
    model = mlp()
    source = model(x).detach()
    step = SupervisedStep(model, task="regression", prefer="all", learning_rate=1e-2,
                          average=0.8, replay=256, replay_steps=2)
    for _ in range(3):
        step.learn(x, y)

    restored_model = mlp()
    restored = SupervisedStep(restored_model, task="regression", prefer="all",
                              learning_rate=1e-2, average=0.8)
    state = step.state_dict()
    served_then = model(x).detach()
    assert any(key.startswith("moved.") for key in state)
    restored.load_state_dict(state)
    assert torch.equal(restored_model(x), model(x))
    step.step(x, y)
    restored.step(x, y)
    assert torch.allclose(restored_model(x), model(x), atol=1e-6)

    # a step without averaging loads the served weights of that checkpoint and steps from them
    unaveraged_model = mlp()
    unaveraged = SupervisedStep(unaveraged_model, task="regression", prefer="all")
    unaveraged.load_state_dict(state)
    assert torch.equal(unaveraged_model(x), served_then)
    assert unaveraged._moved is None

    step.reset()
    assert torch.equal(model(x), source)
    assert step._moved is not None and step._averaged is not None
    assert all(torch.equal(m, p) and torch.equal(a, p) for m, a, p in zip(
        step._moved, step._averaged, step.params, strict=True))  # both from the source again


def test_a_checkpoint_keeps_what_another_learner_moved_since_the_last_step() -> None:
    """Saved between two steps, the moved weights carry what another learner moved the served
    ones by since: a round trip through the checkpoint (a restart, or a restore that did not fit
    and was rolled back) undoes none of it."""
    x, y = inputs(), torch.ones(128, 1)

    def moved_by_steps(round_trip: bool) -> float:
        model = mlp()
        step = SupervisedStep(model, task="regression", prefer="all", learning_rate=1e-2,
                              average=0.9)
        step.learn(x, y)
        with torch.no_grad():
            model[4].bias.add_(3.0)  # another learner's step on the served weights
        if round_trip:
            step.load_state_dict(step.state_dict())
        before = model[4].bias.detach().clone()
        step.set_learning_rate(0.0)
        for _ in range(20):
            step.learn(x, y)
        return float((model[4].bias.detach() - before).abs().max())

    assert moved_by_steps(round_trip=False) < 0.05
    assert moved_by_steps(round_trip=True) < 0.05  # before the fix: 2.6 of the 3 undone


def test_an_average_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="decay"):
        SupervisedStep(mlp(), task="regression", average=1.0)
    with pytest.raises(ValueError, match="decay"):
        SupervisedStep(mlp(), task="regression", average=-0.1)
