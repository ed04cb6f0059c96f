"""Class baselines for the label-free drift signals (`drift.baseline`, `DriftMonitor`)."""

from __future__ import annotations

import numpy as np
import pytest
from harness import settings_for

from adapters.task import task_named
from drift import ClassBaseline
from service.events import EventLog
from service.metrics import Metrics
from service.monitor import DriftMonitor

CLASSES = 4


def _traffic(order: np.ndarray, seed: int = 0, shift: float = 0.0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and features for samples of the classes in `order`: class c's features sit
    at c (plus `shift`), and its probabilities favour c with a class-specific confidence, so both
    label-free signals differ between classes."""
    rng = np.random.default_rng(seed)
    features = order[:, None] + shift + rng.normal(0, 0.3, (len(order), 8))
    confident = 0.55 + 0.1 * order + rng.uniform(-0.03, 0.03, len(order))
    probabilities = np.tile(((1 - confident) / (CLASSES - 1))[:, None], (1, CLASSES))
    probabilities[np.arange(len(order)), order] = confident
    return probabilities, features


def _monitor(baseline: str) -> DriftMonitor:
    metrics = Metrics()
    settings = settings_for(drift={"label_free_baseline": baseline})
    return DriftMonitor(settings.drift, task_named("classification"), metrics, EventLog(metrics))


def _feed(monitor: DriftMonitor, probabilities: np.ndarray, features: np.ndarray) -> None:
    for start in range(0, len(features), 16):
        monitor.observe_batch(probabilities[start:start + 16], features[start:start + 16],
                              len(features[start:start + 16]))


def _label_free_alarms(monitor: DriftMonitor) -> int:
    return sum(detector.describe()["alarms"] for detector in monitor.label_free)


def test_classes_in_runs_raise_label_free_alarms_on_the_values_but_not_on_their_class_residuals():
    order = np.concatenate([np.random.default_rng(0).integers(0, CLASSES, 800),  # mixed first
                            np.repeat([0, 3, 1, 2, 0, 3], 400)])                  # then in runs
    probabilities, features = _traffic(order)
    plain, by_class = _monitor("none"), _monitor("class")
    _feed(plain, probabilities, features)
    _feed(by_class, probabilities, features)
    assert _label_free_alarms(plain) >= 3
    assert _label_free_alarms(by_class) == 0
    assert by_class.describe_policy()["label_free_baseline"] == "class"
    levels = by_class.describe_policy()["class_levels"]["signals"]["feature_mean"]
    assert levels["classes_seen"] == CLASSES and levels["count"] == len(order)
    assert levels["class_level_range"] == pytest.approx([0.0, 3.0], abs=0.05)


def test_a_shift_of_every_class_still_raises_a_label_free_alarm_on_the_residuals():
    rng = np.random.default_rng(2)
    before = _traffic(rng.integers(0, CLASSES, 1200), seed=3)
    after = _traffic(rng.integers(0, CLASSES, 800), seed=4, shift=1.0)
    monitor = _monitor("class")
    _feed(monitor, *before)
    assert _label_free_alarms(monitor) == 0
    _feed(monitor, *after)
    alarmed = [d.describe() for d in monitor.label_free if d.describe()["alarms"]]
    assert [d["signal"] for d in alarmed] == ["feature_mean"]  # entropy did not move


def test_a_regressor_and_the_none_setting_feed_the_values_as_they_are():
    metrics = Metrics()
    regressor = DriftMonitor(settings_for().drift, task_named("regression"), metrics,
                             EventLog(metrics))
    regressor.observe_batch(None, np.ones((16, 4)), 16)
    assert regressor.baseline is None
    assert regressor.describe_policy()["label_free_baseline"] == "none"
    plain = _monitor("none")
    _feed(plain, *_traffic(np.zeros(32, dtype=int)))
    assert plain.baseline is None and plain.state()["baseline"] is None


def test_the_class_levels_resume_after_a_restart_with_the_detectors():
    order = np.repeat([1, 2, 0, 3], 200)
    probabilities, features = _traffic(order)
    first = _monitor("class")
    _feed(first, probabilities[:640], features[:640])
    saved = first.state()
    second = _monitor("class")
    assert second.load_state(saved) == []
    assert second.describe_policy()["class_levels"] == first.describe_policy()["class_levels"]
    _feed(first, probabilities[640:], features[640:])
    _feed(second, probabilities[640:], features[640:])
    def seen(monitor):  # what the detectors took in and found, not when (wall clock)
        return [{k: d.describe()[k] for k in ("signal", "updates", "alarms", "estimate", "width")}
                for d in monitor.label_free]

    assert seen(second) == seen(first)
    assert second.state()["baseline"] == first.state()["baseline"]


def test_a_state_saved_with_the_other_setting_resumes_without_its_label_free_detectors():
    """The detectors' statistics are of residuals with `class` and of the values with `none`:
    one must not continue from the other's."""
    probabilities, features = _traffic(np.repeat([1, 2], 160))
    plain = _monitor("none")
    _feed(plain, probabilities, features)
    plain.observe_labels(np.zeros(40))
    by_class = _monitor("class")
    assert by_class.load_state(plain.state()) == ["label_free (saved without class levels)"]
    assert {d["signal"]: d["updates"] for d in by_class.describe()} == {
        "entropy": 0, "feature_mean": 0, "error": 40}
    broken = _monitor("class")
    _feed(broken, probabilities, features)
    saved = broken.state()
    saved["baseline"] = {**saved["baseline"], "classes": 7}
    fresh = _monitor("class")
    assert fresh.load_state(saved) == ["label_free (their class baseline did not fit)"]
    assert fresh.baseline is None
    # a state saved before the setting existed: no baseline key
    old = {k: v for k, v in plain.state().items() if k != "baseline"}
    assert _monitor("class").load_state(old) == ["label_free (saved without class levels)"]
    assert _monitor("none").load_state(old) == []
    assert _monitor("none").load_state(broken.state()) == ["label_free (saved with class levels)"]


def test_levels_of_a_model_with_other_classes_go_with_the_detectors_that_measured_against_them():
    probabilities, features = _traffic(np.repeat([1, 2, 0, 3], 120))
    four = _monitor("class")
    _feed(four, probabilities, features)
    resumed = _monitor("class")
    assert resumed.load_state(four.state()) == []
    assert sum(d.describe()["samples"] for d in resumed.label_free) > 0
    three = np.full((16, 3), 0.1)
    three[:, 0] = 0.8
    resumed.observe_batch(three, features[:16], 16)  # now a model of three classes
    assert resumed.baseline is not None and resumed.baseline.classes == 3
    assert [d.describe()["samples"] for d in resumed.label_free] == [16, 16]


def test_class_baseline_arithmetic_and_refusals():
    baseline = ClassBaseline(classes=3, span=4, prior=1.0)
    # the first batch measures against its own mean; non-finite values pass and move nothing
    first = baseline.residuals("entropy", np.array([1.0, np.nan, 3.0]), np.array([0, 1, 0]))
    assert first[0] == -1.0 and np.isnan(first[1]) and first[2] == 1.0
    levels = baseline.describe()["signals"]["entropy"]
    assert levels["count"] == 2 and levels["level"] == 2.0 and levels["classes_seen"] == 1
    # class 1 sits at 6 (two values); the overall level is then (1 + 3 + 6 + 6) / 4 = 4
    baseline.residuals("entropy", np.array([6.0, 6.0]), np.array([1, 1]))
    # class 0 (two values, level 2) shrunk by the prior of 1 towards 4: (2 * 2 + 4) / 3
    np.testing.assert_allclose(baseline.residuals("entropy", np.array([2.0]), np.array([0])),
                               [2.0 - 8.0 / 3.0])
    # up to `span` (4) values a class's level is their mean, beyond it a running mean with rate
    # 1/span: after four 0s it is 0, then 10 / 4 = 2.5, then 2.5 + (10 - 2.5) / 4 = 4.375
    windowed = ClassBaseline(classes=1, span=4, prior=1.0)
    for value, level in ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (10.0, 2.5),
                         (10.0, 4.375)):
        windowed.residuals("entropy", np.array([value]), np.array([0]))
        assert windowed.describe()["signals"]["entropy"]["class_level_range"] == [level, level]
    # a batch of more than `span` values sets the levels to its mean, and never overshoots
    for _ in range(3):
        windowed.residuals("confidence", np.zeros(10), np.zeros(10, dtype=int))
        windowed.residuals("confidence", np.ones(10), np.zeros(10, dtype=int))
    levels = windowed.describe()["signals"]["confidence"]
    assert levels["level"] == 1.0 and levels["class_level_range"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="classes must lie"):
        baseline.residuals("entropy", np.array([1.0]), np.array([3]))
    with pytest.raises(ValueError, match="values for"):
        baseline.residuals("entropy", np.array([1.0, 2.0]), np.array([0]))
    with pytest.raises(ValueError):
        ClassBaseline(classes=0)
    state = baseline.state()
    with pytest.raises(ValueError, match="finite"):
        baseline.load_state({**state, "signals": {"entropy": {
            **state["signals"]["entropy"], "levels": ["nan", 1.0, 2.0]}}})
    assert baseline.state() == state  # a refused state changes nothing
