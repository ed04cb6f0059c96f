"""B2's real series: River's annotated change points, read as TCPD defines them, and scored."""

from __future__ import annotations

import numpy as np
import pytest

from bench.drift_detectors import (
    SERIES,
    SERIES_DETECTORS,
    Series,
    load_series,
    main,
    score_alarms,
    series_alarms,
)
from drift.detectors import DEFAULT_DETECTORS, SignalDetector


def test_brent_is_rebuilt_as_tcpd_samples_it():
    brent = load_series("brent_spot")
    # TCPD's brent_spot.json: 500 values from 2000-01-04, every 10th trading day
    assert brent.values.shape == (500, 1)
    assert brent.values[:4, 0].tolist() == [23.95, 26.31, 27.35, 28.12]
    assert max(max(points) for points in brent.annotations.values()) < 500


def test_apple_change_point_all_annotators_agree_on_is_the_crash_of_september_2000():
    apple = load_series("apple")
    assert apple.values.shape == (622, 2)
    close = apple.values[:, 0]
    assert all(319 in points for points in apple.annotations.values())
    assert close[319] < 0.6 * close[318]  # the 2000-09-29 fall, half the price
    assert np.max(np.abs(np.diff(close) / close[:-1])) == pytest.approx(
        1 - close[319] / close[318])


def test_every_series_loads_with_annotations_inside_it():
    for name in SERIES:
        series = load_series(name)
        assert len(series.annotations) == 5
        assert all(0 <= c < len(series.values) for points in series.annotations.values()
                   for c in points)


def test_an_alarm_counts_from_the_change_point_to_tolerance_samples_after_it():
    annotations = {"a": [100], "b": []}
    score = score_alarms([99, 100, 120, 121], annotations, length=200, tolerance=20,
                         first_live=10)
    assert (score.alarms, score.explained, score.precision) == (4, 2, 0.5)
    assert score.recall == 1.0  # annotator b marked nothing, so is not averaged in
    assert score.chance == pytest.approx(21 / 190)


def test_recall_is_averaged_over_annotators_and_skips_change_points_in_the_warm_up():
    annotations = {"a": [5, 50, 150], "b": [50], "c": [5]}
    score = score_alarms([55], annotations, length=200, tolerance=10, first_live=20)
    assert score.points == 2 and score.excluded == 1
    assert score.recall == pytest.approx((1 / 2 + 1) / 2)  # a: 50 of {50, 150}; b: 50; c: none
    no_alarm = score_alarms([], annotations, length=200, tolerance=10, first_live=20)
    assert np.isnan(no_alarm.precision) and no_alarm.recall == 0.0


def test_the_level_default_alarms_soon_after_a_step_and_not_before_it():
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(0, 1, 150), rng.normal(3, 1, 150)][:, None]
    series = Series("step", values, {"a": [150]})
    default = DEFAULT_DETECTORS["feature_mean"]
    detector = SignalDetector(default.detector, "feature_mean", dict(default.params), None, 20)
    alarms = series_alarms(detector, series.level(20))
    assert alarms and 150 <= alarms[0] <= 170


def test_the_residual_view_has_no_forecast_for_the_first_value():
    values = np.array([[1.0, 10.0], [2.0, 10.0], [4.0, 30.0], [4.0, 30.0]])
    residual = Series("tiny", values, {}).residual(warmup=3)
    assert np.isnan(residual[0]) and residual[-1] == 0.0
    assert np.all(residual[1:3] > 0)


def test_the_datasets_part_prints_every_series_and_a_total_per_detector(capsys):
    assert main(["--part", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "c <= a <= c + 20" in out
    for name in SERIES:
        assert out.count(f"| {name} |") == len(SERIES_DETECTORS)
    assert out.count("| **all 7** |") == len(SERIES_DETECTORS)
