"""The B2 runner on tiny streams: what it measures through the service, and how it scores it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.drift_streams import CONFIGS, STREAMS, missing_settings, recovery_samples, run_stream

TINY = {"train": 2_000, "before": 800, "after": 800, "delay": 50, "epochs": 3}


@pytest.fixture(scope="module")
def static_sea():
    return run_stream(STREAMS["sea"], CONFIGS["static"], **TINY)


def test_recovery_is_the_end_of_the_first_post_drift_window_back_at_the_level():
    correct = np.r_[np.ones(1_000), np.zeros(300), np.ones(2_000)]
    # the first all-post-drift window of 500 with no misses ends 300 + 500 samples after the drift
    assert recovery_samples(correct, drift_at=1_000, level=1.0, tolerance=0.0) == 800
    # 2 points below the level is close enough: 10 misses in the window still count
    assert recovery_samples(correct, drift_at=1_000, level=1.0, tolerance=0.02) == 790
    assert recovery_samples(correct[:1_700], drift_at=1_000, level=1.0) is None


@pytest.mark.slow
def test_static_model_loses_accuracy_at_the_sea_drift_and_never_recovers(static_sea):
    result = static_sea
    assert (result.samples, result.drift_at, result.delay) == (1_600, 800, 50)
    assert result.before > 0.95
    # SEA 0 -> 3 moves the threshold from 8 to 9.5: about 13% of the samples change class
    assert 0.07 < result.before - result.after < 0.2
    assert result.recovery is None
    assert result.after < result.overall < result.before


@pytest.mark.slow
def test_every_label_is_joined_and_the_service_agrees_on_the_rolling_error(static_sea):
    assert static_sea.unjoined_labels == 0
    assert static_sea.service_rolling == pytest.approx(static_sea.bench_rolling, abs=1e-6)
    assert static_sea.alarms == []


@pytest.mark.slow
def test_static_regressor_error_grows_after_the_friedman_drift():
    result = run_stream(STREAMS["friedman-gra"], CONFIGS["static"], **TINY)
    assert result.task == "regression" and result.recovery is None
    assert result.before < 2.0  # the noise alone, N(0, 1), gives 0.8; 2,000 samples underfit
    assert result.after > 2 * result.before
    assert result.service_rolling == pytest.approx(result.bench_rolling, rel=1e-4)


def test_every_configuration_runs_on_this_checkout():
    assert {name: missing_settings(config) for name, config in CONFIGS.items()} == dict.fromkeys(
        CONFIGS)


@pytest.mark.slow
def test_error_compensation_beats_the_static_model_after_the_sea_drift(static_sea):
    result = run_stream(STREAMS["sea"], CONFIGS["compensation"], **TINY)
    assert result.unjoined_labels == 0
    assert result.memory_rows > 0
    assert result.after > static_sea.after + 0.03


@pytest.mark.slow
def test_drift_alarms_are_placed_on_the_served_sample_clock():
    # 2,000 samples before the drift: on 800 the memory is small and corrects the new concept
    # before the labelled error detector has seen enough errors to raise an alarm. Without the
    # shadow: on this stream the memory errs more than the source before the drift (4.3% against
    # 0.9%), and the comparison's reset of it, right as it should, moves the alarm this test
    # places on the clock
    config = dataclasses.replace(CONFIGS["comp+drift"], shadow=False)
    result = run_stream(STREAMS["sea"], config, **(TINY | {"before": 2_000}))
    assert result.drift_at == 2_000 and result.alarms == sorted(result.alarms)
    assert result.detection_delay is not None
    # labels come back 50 samples late, so the labelled detector cannot be earlier than that
    assert TINY["delay"] <= result.detection_delay < 800
    assert result.first_detector == "adwin/error"
