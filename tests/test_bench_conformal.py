"""B3's streams: the FriedmanDrift layout, the MLP, how intervals are served, and the Digits-C
stream with abrupt switches served through the service with labels late."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapters.conformal import build_calibrator, residual_scores
from bench.conformal import (
    ABRUPT_DOMAINS,
    FRIEDMAN_STREAMS,
    Run,
    abrupt_digits,
    after_first_label,
    at_coverage,
    friedman_samples,
    replay_sets,
    run_intervals,
    run_scores,
    serve_sets,
    train_friedman_model,
    worst_window,
)


def first_concept(features: np.ndarray) -> np.ndarray:
    """Friedman #1, the function every FriedmanDrift variant starts with (noise N(0, 1) aside)."""
    x = features
    return (10 * np.sin(np.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3]
            + 5 * x[:, 4])


@pytest.fixture(scope="module")
def model():
    return train_friedman_model(epochs=30, train=2000, calibration=500)


def test_gra_stream_leaves_the_first_concept_exactly_between_its_drift_positions():
    first, second = FRIEDMAN_STREAMS["gra"][1]
    features, targets = friedman_samples("gra", second + 2000, seed=3)
    noise = targets - first_concept(features)
    assert np.std(noise[:first]) == pytest.approx(1.0, abs=0.05)
    assert np.std(noise[second:]) == pytest.approx(1.0, abs=0.05)
    assert np.std(noise[first:second]) > 3.0
    assert abs(noise[first - 1]) < 5 and np.mean(np.abs(noise[first:first + 50])) > 2.0


def test_the_mlp_learns_the_first_concept_and_fails_on_the_drifted_one(model):
    # the noise alone gives E|N(0, 1)| = 0.80
    assert 0.8 < model.calibration_residuals.mean() < 1.3
    assert model.max_scale == pytest.approx(model.calibration_residuals.max() * math.sqrt(3))
    first, second = FRIEDMAN_STREAMS["gra"][1]
    features, targets = friedman_samples("gra", second, seed=1)
    residuals = np.abs(targets - model.predict(features))
    assert residuals[first:].mean() > 3 * residuals[:first].mean()


def test_training_is_deterministic(model):
    again = train_friedman_model(epochs=30, train=2000, calibration=500)
    np.testing.assert_array_equal(again.calibration_residuals, model.calibration_residuals)


def test_an_interval_covers_exactly_when_the_residual_is_within_the_threshold():
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=3000)
    targets = predictions + rng.normal(scale=np.r_[np.ones(1500), 3 * np.ones(1500)])
    by_interval = run_intervals(build_calibrator("saocp", 0.1, max_scale=5.0), predictions,
                                targets)
    by_score = run_scores(build_calibrator("saocp", 0.1, max_scale=5.0),
                          residual_scores(predictions, targets))
    np.testing.assert_array_equal(by_interval.covered, by_score.covered)
    np.testing.assert_array_equal(by_interval.thresholds, by_score.thresholds)


def test_late_labels_serve_the_threshold_learnt_from_older_labels_only():
    rng = np.random.default_rng(1)
    predictions = np.zeros(1000)
    targets = rng.normal(size=1000)
    on_time = run_intervals(build_calibrator("aci", 0.1), predictions, targets)
    late = run_intervals(build_calibrator("aci", 0.1), predictions, targets, delay=50)
    np.testing.assert_array_equal(late.thresholds[:50], 0.0)
    np.testing.assert_array_equal(late.thresholds[50:], on_time.thresholds[:-50])
    assert len(late.update_ns) == 950


def test_saocp_keeps_coverage_through_the_abrupt_drift_where_split_conformal_breaks(model):
    features, targets = friedman_samples("gra", 15_000, seed=2)
    predictions = model.predict(features)
    saocp = run_intervals(build_calibrator("saocp", 0.1, max_scale=model.max_scale),
                          predictions, targets)
    split = run_intervals(build_calibrator("split", 0.1, window=1000), predictions, targets)
    assert saocp.covered.mean() == pytest.approx(0.9, abs=0.015)
    assert worst_window(saocp.covered, 500) > worst_window(split.covered, 500) + 0.15


def test_the_abrupt_digits_stream_is_eight_corrupted_domains_back_to_back():
    inputs, labels = abrupt_digits(per_domain=50)
    assert inputs.shape == (ABRUPT_DOMAINS * 50, 1, 16, 16) and labels.shape == (400,)
    means = inputs.reshape(ABRUPT_DOMAINS, 50, -1).mean(axis=(1, 2))
    assert np.all(np.abs(np.diff(means)) > 1e-3)  # every switch changes the inputs at once
    other, _ = abrupt_digits(per_domain=50, seed=7)
    assert not np.array_equal(other, inputs)


def test_classes_in_runs_reorder_each_domain_and_keep_its_samples():
    shuffled_x, shuffled_y = abrupt_digits()
    runs_x, runs_y = abrupt_digits(order="dirichlet:0.1")
    size = len(shuffled_y) // ABRUPT_DOMAINS  # whole domains: `per_domain` cuts after the order
    for domain in range(ABRUPT_DOMAINS):
        part = slice(domain * size, (domain + 1) * size)
        assert sorted(runs_y[part]) == sorted(shuffled_y[part])  # the same samples, reordered
        assert np.allclose(np.sort(runs_x[part].sum(axis=(1, 2, 3))),
                           np.sort(shuffled_x[part].sum(axis=(1, 2, 3))))
    # runs: a sample's neighbour has its class far more often than in the shuffled order
    assert np.mean(runs_y[1:] == runs_y[:-1]) > 2 * np.mean(shuffled_y[1:] == shuffled_y[:-1])


def test_labels_later_than_the_stream_leave_every_calibrator_where_it_starts():
    inputs, labels = abrupt_digits(domains=2, per_domain=64)
    never = len(labels)  # no label comes back before the end
    aci = serve_sets("none", "aci", {}, inputs, labels, delay=never)
    pid = serve_sets("none", "pid", {}, inputs, labels, delay=never)
    assert np.all(aci.sizes == 1) and aci.state_bytes == 0  # threshold 0: the argmax alone
    assert np.all(pid.sizes == 10) and pid.covered.all()  # PID starts with every class in


def test_labels_one_request_late_move_the_sets_served_from_the_second_request_on():
    inputs, labels = abrupt_digits(domains=2, per_domain=64)
    served = serve_sets("none", "auto", {}, inputs, labels, delay=32)
    assert served.method == "pid"
    assert np.all(served.sizes[:64] == 10)  # the first two requests: no label back yet
    assert served.sizes[64:].mean() < 10 and 0 < served.state_bytes < 20_000
    # a set keeps the predicted class: every right prediction is covered
    assert np.all(served.covered[~served.errors])


def test_the_default_replayed_offline_serves_exactly_the_sets_the_service_served():
    inputs, labels = abrupt_digits(domains=3, per_domain=96)
    served = serve_sets("none", "auto", {}, inputs, labels, delay=32)
    assert served.method == "pid" and served.reference_entropy is not None
    covered, sizes = replay_sets(build_calibrator("pid", 0.1, **served.options),
                                 served.probabilities, labels, delay=32,
                                 reference_entropy=served.reference_entropy)
    assert np.array_equal(covered, served.covered) and np.array_equal(sizes, served.sizes)
    # the scorecaster reads the signal: without it the same calibrator serves other sets
    _, plain = replay_sets(build_calibrator("pid", 0.1, **served.options), served.probabilities,
                           labels, delay=32)
    assert not np.array_equal(plain, served.sizes)
    # another calibrator is brought to a coverage by its α alone: here the one it has at α 0.2
    reached, _ = replay_sets(build_calibrator("faci", 0.2), served.probabilities, labels, 32)
    alpha, matched, _ = at_coverage("faci", {}, reached.mean(), served.probabilities, labels,
                                    delay=32)
    assert abs(matched.mean() - reached.mean()) < 0.0004 and 0.15 < alpha < 0.25


def test_the_bound_covers_every_sample_from_the_drifts_first_label_on():
    covered = np.array([True, False] * 50)
    bound = after_first_label(Run(covered, np.zeros(100), np.zeros(0, dtype=np.int64)),
                              drift=40, delay=10)
    assert np.array_equal(bound.covered[:50], covered[:50]) and bound.covered[50:].all()
