"""ADCSD output correction: identity at start and after reset, learning a shifted stream,
forecasts with a horizon, features, the replay window and checkpoints."""

from __future__ import annotations

import pytest
import torch

from adapters.labels.output_corrector import OutputCorrector, decompose


def shifted_stream(batches: int, batch: int = 16, seed: int = 0, noise: float = 0.05):
    """Batches of (model output, label) where the label is 1.3 * output + 0.5 (plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        predictions = torch.randn(batch, generator=generator)
        labels = 1.3 * predictions + 0.5 + noise * torch.randn(batch, generator=generator)
        yield predictions, labels


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def test_a_new_corrector_is_the_identity_bit_for_bit() -> None:
    corrector = OutputCorrector(output_dim=3, output_mean=10.0, output_scale=4.0)
    predictions = 100.0 * torch.randn(50, 3)

    assert torch.equal(corrector.correct(None, predictions), predictions)


def test_correct_keeps_shape_and_dtype() -> None:
    corrector = OutputCorrector(output_dim=1)
    predictions = torch.randn(7, dtype=torch.float64)

    corrected = corrector.correct(None, predictions)

    assert corrected.shape == (7,)
    assert corrected.dtype == torch.float64


def test_learning_on_a_shifted_linear_stream_cuts_the_error_tenfold() -> None:
    corrector = OutputCorrector(output_dim=1, hidden=32, learning_rate=1e-2)
    test_predictions, test_labels = next(shifted_stream(1, batch=1000, seed=1, noise=0.0))
    before = mse(corrector.correct(None, test_predictions), test_labels)

    for predictions, labels in shifted_stream(100):
        corrector.learn(None, predictions, labels)

    after = mse(corrector.correct(None, test_predictions), test_labels)
    assert before == pytest.approx(0.34, abs=0.05)  # E[(0.3 y + 0.5)^2] = 0.09 + 0.25
    assert after < 0.1 * before


def test_correct_does_not_learn() -> None:
    corrector = OutputCorrector(output_dim=1)
    for predictions, labels in shifted_stream(20):
        corrector.learn(None, predictions, labels)
    probe = torch.randn(10)
    first = corrector.correct(None, probe)

    for _ in range(5):
        corrector.correct(None, probe)

    assert torch.equal(corrector.correct(None, probe), first)


def test_reset_returns_to_the_identity() -> None:
    corrector = OutputCorrector(output_dim=1, learning_rate=1e-2)
    for predictions, labels in shifted_stream(50):
        corrector.learn(None, predictions, labels)
    probe = torch.randn(10)
    assert not torch.equal(corrector.correct(None, probe), probe)

    corrector.reset()

    assert torch.equal(corrector.correct(None, probe), probe)
    assert corrector.steps == 0
    assert len(corrector.state_dict()["window.outputs"]) == 0


def test_after_reset_learning_retraces_the_same_path() -> None:
    corrector = OutputCorrector(output_dim=1)
    stream = list(shifted_stream(10))
    first_run = [corrector.learn(None, p, y) for p, y in stream]

    corrector.reset()

    assert [corrector.learn(None, p, y) for p, y in stream] == first_run


def test_the_window_keeps_only_the_newest_labelled_samples() -> None:
    corrector = OutputCorrector(output_dim=1, window=24)

    for predictions, labels in shifted_stream(5, batch=10):
        corrector.learn(None, predictions, labels)

    *_, (last_predictions, _) = shifted_stream(5, batch=10)
    window = corrector.state_dict()["window.outputs"]
    assert window.shape == (24, 1, 1)
    assert torch.equal(window[-10:, 0, 0], last_predictions)


def test_large_outputs_learn_through_the_standardisation() -> None:
    # a stream on the scale of traffic counts: labels = 1.1 * outputs + 20
    generator = torch.Generator().manual_seed(0)
    corrector = OutputCorrector(output_dim=2, output_mean=300.0, output_scale=50.0, hidden=32,
                                learning_rate=1e-2)
    probe = 300.0 + 50.0 * torch.randn(500, 2, generator=generator)
    before = mse(corrector.correct(None, probe), 1.1 * probe + 20.0)

    for _ in range(100):
        predictions = 300.0 + 50.0 * torch.randn(32, 2, generator=generator)
        corrector.learn(None, predictions, 1.1 * predictions + 20.0)

    assert mse(corrector.correct(None, probe), 1.1 * probe + 20.0) < 0.1 * before


def test_a_forecast_horizon_is_decomposed_into_seasonal_and_trend() -> None:
    series = torch.tensor([[1.0, 2.0, 6.0, 3.0, 4.0]])[:, :, None]

    seasonal, trend = decompose(series, kernel=3)

    # ends repeated once: [1, 1, 2, 6, 3, 4, 4]; means of three
    torch.testing.assert_close(trend[0, :, 0], torch.tensor([4 / 3, 3.0, 11 / 3, 13 / 3, 11 / 3]))
    torch.testing.assert_close(seasonal + trend, series)


def test_forecasts_start_as_the_identity_and_learn_a_per_step_bias() -> None:
    generator = torch.Generator().manual_seed(0)
    corrector = OutputCorrector(output_dim=2, horizon=6, hidden=32, learning_rate=1e-2)
    bias = torch.linspace(0.0, 1.0, 6)[None, :, None]  # the later steps drift more
    probe = torch.randn(200, 6, 2, generator=generator)
    assert torch.equal(corrector.correct(None, probe), probe)
    before = mse(probe, probe + bias)

    for _ in range(100):
        forecasts = torch.randn(16, 6, 2, generator=generator)
        corrector.learn(None, forecasts, forecasts + bias)

    assert len(corrector.network.branches) == 2
    assert mse(corrector.correct(None, probe), probe + bias) < 0.2 * before


def test_features_let_the_correction_depend_on_more_than_the_output() -> None:
    # the label depends on a feature the output does not carry: y = ŷ + sign(f)
    generator = torch.Generator().manual_seed(0)
    with_features = OutputCorrector(output_dim=1, feature_dim=3, hidden=32, learning_rate=1e-2)
    output_only = OutputCorrector(output_dim=1, hidden=32, learning_rate=1e-2)
    for _ in range(100):
        features = torch.randn(32, 3, generator=generator)
        predictions = torch.randn(32, generator=generator)
        labels = predictions + torch.sign(features[:, 0])
        with_features.learn(features, predictions, labels)
        output_only.learn(None, predictions, labels)

    features = torch.randn(500, 3, generator=generator)
    predictions = torch.randn(500, generator=generator)
    labels = predictions + torch.sign(features[:, 0])
    assert mse(with_features.correct(features, predictions), labels) < 0.2
    assert mse(output_only.correct(None, predictions), labels) > 0.8


def test_missing_features_are_refused() -> None:
    corrector = OutputCorrector(output_dim=1, feature_dim=3)

    with pytest.raises(ValueError, match="feature_dim=0"):
        corrector.correct(None, torch.randn(4))


def test_state_dict_round_trip_continues_identically() -> None:
    corrector = OutputCorrector(output_dim=1)
    stream = list(shifted_stream(20))
    for predictions, labels in stream[:10]:
        corrector.learn(None, predictions, labels)

    restored = OutputCorrector(output_dim=1, seed=7)
    restored.load_state_dict(corrector.state_dict())

    probe = torch.randn(10)
    assert torch.equal(restored.correct(None, probe), corrector.correct(None, probe))
    for predictions, labels in stream[10:]:
        assert restored.learn(None, predictions, labels) == corrector.learn(None, predictions,
                                                                             labels)


def test_the_learning_rate_respects_its_cap() -> None:
    corrector = OutputCorrector(output_dim=1, learning_rate=1e-3, max_learning_rate=1e-2)

    assert corrector.set_learning_rate(0.5) == 1e-2
    with pytest.raises(ValueError, match="cap"):
        OutputCorrector(output_dim=1, learning_rate=0.1, max_learning_rate=1e-2)
