"""Online conformal calibration: scores and sets by hand, guarantees as properties, and the
B3 shifted stream (|N(0,1)| then |N(0,3)|) on which the adaptive calibrators must recover."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adapters.conformal import (
    ACI,
    CALIBRATORS,
    FACI,
    SAOCP,
    SFOGD,
    Calibrator,
    ScoreWindow,
    SplitConformal,
    aps_scores,
    aps_set,
    build_calibrator,
    interval,
    lac_scores,
    lac_set,
    residual_scores,
)
from bench.conformal import SHIFT_AT, run_scores, shifted_scores, worst_window

# small windows and lifetimes, so short streams exercise eviction and retirement
SMALL_OPTIONS = {
    "split": {"window": 20},
    "aci": {"gamma": 0.05, "window": 15},
    "faci": {"window": 15},
    "sfogd": {"max_scale": 2.0},
    "saocp": {"max_scale": 2.0, "lifetime": 2},
    "dtaci": {"window": 15},
    "pid": {"range_window": 5, "max_scale": 2.0},
}
scores_lists = st.lists(st.floats(0.0, 1e9, allow_nan=False, allow_infinity=False), max_size=120)


# ------------------------------------------------------------------------- scores, by hand


def test_lac_scores_are_one_minus_the_label_probability() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    assert lac_scores(probs, np.array([1, 2])) == pytest.approx([0.7, 0.7])
    assert lac_scores(probs[0], 0) == pytest.approx(0.5)


def test_aps_scores_add_the_mass_ranked_above_the_label() -> None:
    probs = np.array([[0.5, 0.3, 0.2]] * 3)
    labels = np.array([0, 1, 2])
    assert aps_scores(probs, labels) == pytest.approx([0.5, 0.8, 1.0])
    assert aps_scores(probs, labels, u=np.array([0.5, 0.5, 0.5])) == pytest.approx(
        [0.25, 0.65, 0.9])
    assert aps_scores(probs, labels, u=0.0) == pytest.approx([0.0, 0.5, 0.8])


def test_aps_breaks_probability_ties_by_class_index() -> None:
    probs = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]])
    assert aps_scores(probs, np.array([0, 1])) == pytest.approx([0.4, 0.8])


def test_lac_set_holds_the_classes_within_the_threshold() -> None:
    probs = np.array([0.5, 0.3, 0.2])
    assert lac_set(probs, 0.75).tolist() == [True, True, False]
    assert lac_set(probs, 0.85).tolist() == [True, True, True]
    assert lac_set(probs, math.inf).tolist() == [True, True, True]
    assert lac_set(probs, 0.1).tolist() == [True, False, False]  # empty: the argmax instead


def test_aps_set_is_a_prefix_of_the_ranking() -> None:
    probs = np.array([[0.2, 0.5, 0.3]])
    assert aps_set(probs, 0.6).tolist() == [[False, True, False]]
    assert aps_set(probs, 0.9).tolist() == [[False, True, True]]
    assert aps_set(probs, 0.3).tolist() == [[False, True, False]]  # empty: the argmax instead
    assert aps_set(probs, 0.7, u=np.array([0.5])).tolist() == [[False, True, True]]


def test_residual_scores_and_intervals() -> None:
    pred, y = np.array([1.0, 2.0, -1.0]), np.array([1.5, 1.0, 1.0])
    assert residual_scores(pred, y).tolist() == [0.5, 1.0, 2.0]
    assert residual_scores(pred, y, scale=np.array([0.5, 2.0, 4.0])).tolist() == [1.0, 0.5, 0.5]
    lower, upper = interval(pred, 0.5, scale=np.array([1.0, 2.0, 4.0]))
    assert lower.tolist() == [0.5, 1.0, -3.0]
    assert upper.tolist() == [1.5, 3.0, 1.0]
    with pytest.raises(ValueError, match="finite threshold"):
        interval(pred, math.inf)
    with pytest.raises(ValueError, match="positive"):
        residual_scores(pred, y, scale=np.array([1.0, 0.0, 1.0]))


def test_bad_probabilities_and_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="one label per sample"):
        lac_scores(np.full((2, 3), 1 / 3), np.array([0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        aps_scores(np.full((1, 3), 1 / 3), np.array([3]))


# ----------------------------------------------------------------- sets, as properties

probabilities = st.integers(2, 12).flatmap(lambda classes: hnp.arrays(
    np.float64, st.tuples(st.integers(1, 8), st.just(classes)),
    elements=st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0),
).map(lambda raw: (raw + (raw.sum(1, keepdims=True) == 0)) / np.maximum(
    raw.sum(1, keepdims=True), 1e-300)))
thresholds = st.floats(-1.0, 2.0) | st.sampled_from([0.0, 1.0, math.inf])


def expected_set(class_scores: np.ndarray, probs: np.ndarray, threshold: float) -> np.ndarray:
    members = class_scores <= threshold
    for row in np.flatnonzero(~members.any(axis=1)):
        members[row, np.argmax(probs[row])] = True
    return members


@settings(max_examples=150, deadline=None)
@given(probabilities, thresholds, st.floats(0.0, 1.0) | st.none())
def test_sets_are_never_empty_never_beyond_all_classes_and_agree_with_the_scores(
    probs: np.ndarray, threshold: float, u: float | None,
) -> None:
    samples, classes = probs.shape
    every_label = np.tile(np.arange(classes), samples)
    rows = np.repeat(probs, classes, axis=0)
    uniforms = None if u is None else np.full(len(rows), u)
    lac_all = lac_scores(rows, every_label).reshape(samples, classes)
    aps_all = aps_scores(rows, every_label, u=uniforms).reshape(samples, classes)
    for members, class_scores in ((lac_set(probs, threshold), lac_all),
                                  (aps_set(probs, threshold, u=u), aps_all)):
        sizes = members.sum(axis=1)
        assert sizes.min() >= 1 and sizes.max() <= classes
        # y is in the set exactly when its score is within the threshold (or it is the argmax
        # standing in for an empty set)
        assert np.array_equal(members, expected_set(class_scores, probs, threshold))


# ------------------------------------------------------------- calibrators, as properties


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(CALIBRATORS)), scores_lists)
def test_thresholds_and_intervals_stay_finite_on_any_stream(name: str,
                                                            scores: list[float]) -> None:
    calibrator = build_calibrator(name, 0.1, **SMALL_OPTIONS[name])
    for score in scores:
        calibrator.update(score)
        assert math.isfinite(calibrator.threshold)
        lower, upper = interval(np.array([0.0]), calibrator.threshold)
        assert np.isfinite(lower).all() and np.isfinite(upper).all()
    json.dumps(calibrator.state(), allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(CALIBRATORS)), scores_lists, scores_lists)
def test_a_restored_state_carries_on_with_identical_thresholds(
    name: str, before: list[float], after: list[float],
) -> None:
    original = build_calibrator(name, 0.1, **SMALL_OPTIONS[name])
    for score in before:
        original.update(score)
    saved = json.loads(json.dumps(original.state(), allow_nan=False))
    restored = Calibrator.from_state(saved)
    assert type(restored) is type(original)
    assert restored.state() == original.state()
    assert restored.threshold == original.threshold
    for score in after:
        original.update(score)
        restored.update(score)
        assert restored.threshold == original.threshold
    assert restored.state() == original.state()


def test_load_state_refuses_a_state_saved_with_other_options() -> None:
    saved = ACI(alpha=0.1, gamma=0.01).state()
    with pytest.raises(ValueError, match="Calibrator.from_state"):
        ACI(alpha=0.1, gamma=0.005).load_state(saved)
    with pytest.raises(ValueError, match="cannot load into 'faci'"):
        FACI(alpha=0.1).load_state(saved)
    fresh = ACI(alpha=0.1, gamma=0.01)
    fresh.load_state(saved)
    assert fresh.state() == saved


@pytest.mark.parametrize("kind", [ACI, FACI, SplitConformal])
def test_a_full_window_is_stored_in_4_bytes_a_score_and_old_json_lists_still_load(
    kind: type[Calibrator],
) -> None:
    calibrator = kind(alpha=0.1)
    assert calibrator.window == (1000 if kind is SplitConformal else 2000)
    scores = np.random.default_rng(2).exponential(size=calibrator.window + 100)
    for score in scores:
        calibrator.update(score)
    state = calibrator.state()
    # base64 of float32: 4/3 × 4 bytes a score, and the default windows stay under 20 KB
    assert len(state["scores"]) == 4 * math.ceil(calibrator.window * 4 / 3)
    assert len(json.dumps(state, separators=(",", ":"))) < 20_000
    restored = Calibrator.from_state(json.loads(json.dumps(state)))
    assert restored.threshold == calibrator.threshold
    assert restored.state() == state
    # a state saved before the encoding, its window as a JSON list of floats, loads the same
    state["scores"] = [float(s) for s in calibrator.scores.scores()]
    assert Calibrator.from_state(state).state() == calibrator.state()
    state["scores"] = "not base64!"
    with pytest.raises(ValueError):
        Calibrator.from_state(state)


@pytest.mark.parametrize("kind", [ACI, FACI, SplitConformal])
def test_a_repeated_score_is_covered_by_the_threshold_it_set(kind: type[Calibrator]) -> None:
    # 0.7 is not a float32: kept rounded down, the same score again would fall above it
    calibrator = kind(alpha=0.1, window=200)
    for _ in range(100):
        calibrator.update(0.7)
    assert calibrator.misses <= 1
    assert calibrator.threshold >= 0.7


def test_a_state_saved_with_another_window_carries_on_with_the_newest_scores() -> None:
    old = FACI(alpha=0.1, window=10_000)  # the default window before it became 2,000
    scores = np.random.default_rng(4).exponential(size=3000)
    for score in scores:
        old.update(score)
    state = json.loads(json.dumps(old.state()))
    state["scores"] = [float(s) for s in old.scores.scores()]  # as JSON text, as saved then
    new = FACI(alpha=0.1)
    new.load_state(state)
    assert new.window == 2000 and new.scores.scores() == old.scores.scores()[-2000:]
    assert new.steps == 3000 and new.state()["window"] == 2000
    with pytest.raises(ValueError, match="Calibrator.from_state"):
        FACI(alpha=0.2).load_state(state)  # alpha is not a window: refused


@pytest.mark.parametrize("saved", [[0.1, float("nan")], [0.1, float("inf")], {"a": 1}, 3])
def test_a_saved_window_that_is_not_finite_scores_is_refused(saved: object) -> None:
    with pytest.raises(ValueError):
        ScoreWindow.decoded(saved)  # type: ignore[arg-type]


def test_scores_beyond_float32_are_kept_at_its_largest_value() -> None:
    split = SplitConformal(alpha=0.5, window=2)
    split.update(1e300)
    split.update(1e300)
    assert split.threshold == float(np.finfo(np.float32).max)


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_reset_returns_to_the_calibrator_as_built(name: str) -> None:
    calibrator = build_calibrator(name, 0.2, **SMALL_OPTIONS[name])
    pristine = calibrator.state()
    for score in np.random.default_rng(1).exponential(size=300):
        calibrator.update(score)
    assert calibrator.state() != pristine
    calibrator.reset()
    assert calibrator.state() == pristine
    # every one starts at 0 (the reference's quantile of nothing) but PID, at its scale's top
    assert calibrator.threshold == (2.0 if name == "pid" else 0.0)


# ------------------------------------------------------------------------ split conformal

distributions = {
    "exponential": lambda rng, n: rng.exponential(size=n),
    "uniform": lambda rng, n: rng.uniform(size=n),
    "lognormal": lambda rng, n: rng.lognormal(0.0, 2.0, size=n),
    "poisson (ties)": lambda rng, n: rng.poisson(3.0, size=n).astype(float),
    "half-normal": lambda rng, n: np.abs(rng.normal(size=n)),
}


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(sorted(distributions)), st.sampled_from([0.05, 0.1, 0.2]),
       st.integers(0, 2**32 - 1))
def test_split_conformal_covers_exchangeable_streams(distribution: str, alpha: float,
                                                     seed: int) -> None:
    scores = distributions[distribution](np.random.default_rng(seed), 5000)
    run = run_scores(SplitConformal(alpha=alpha), scores)
    assert run.covered.mean() >= 1 - alpha - 0.02


def test_split_conformal_serves_the_largest_score_while_the_rank_exceeds_the_window() -> None:
    split = SplitConformal(alpha=0.1)
    for score in [3.0, 1.0, 2.0]:  # ⌈4 · 0.9⌉ = 4 > 3 scores
        split.update(score)
    assert split.threshold == 3.0
    window = SplitConformal(alpha=0.5, window=4)
    for score in [9.0, 1.0, 2.0, 3.0, 4.0]:  # 9 has left the window; ⌈5 · 0.5⌉ = 3rd smallest
        window.update(score)
    assert window.threshold == 3.0


# -------------------------------------------------------------------------------------- ACI


def gibbs_candes_bound(aci: ACI) -> float:
    return (max(aci.alpha, 1 - aci.alpha) + aci.gamma) / (aci.gamma * aci.error_steps)


def assert_within_the_bound(aci: ACI) -> None:
    assert aci.error_steps > 0
    assert abs(aci.errors / aci.error_steps - aci.alpha) <= gibbs_candes_bound(aci)
    assert -aci.gamma <= aci.alpha_t <= 1 + aci.gamma


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=30, max_size=400),
       st.sampled_from([0.05, 0.1, 0.3, 0.5]), st.floats(0.005, 0.2),
       st.sampled_from([None, 40, 10_000]))
def test_aci_long_run_miscoverage_obeys_the_gibbs_candes_bound_on_any_stream(
    scores: list[float], alpha: float, gamma: float, window: int | None,
) -> None:
    aci = ACI(alpha=alpha, gamma=gamma, window=window)
    for score in scores:
        aci.update(score)
    if aci.error_steps:
        assert_within_the_bound(aci)


adversaries = {
    # every score a new maximum: the stream that makes the reference's clipped α_t miss half
    "rising": lambda aci, t: float(t),
    "falling": lambda aci, t: -float(t),
    "constant": lambda aci, t: 1.0,
    "just above the threshold": lambda aci, t: aci.threshold + 1.0,
    "on the threshold": lambda aci, t: aci.threshold,
    "alternating extremes": lambda aci, t: 1e6 * (t % 2) - 1e6 * (t % 3 == 0),
}


@pytest.mark.parametrize("adversary", sorted(adversaries))
@pytest.mark.parametrize("window", [None, 50])
def test_aci_holds_the_bound_against_adversaries(adversary: str, window: int | None) -> None:
    aci = ACI(alpha=0.1, gamma=0.005, window=window)
    for t in range(5000):
        aci.update(adversaries[adversary](aci, t))
    assert_within_the_bound(aci)
    assert abs(aci.errors / aci.error_steps - 0.1) <= 0.04  # (0.9 + 0.005)/(0.005 · ~5000)


def test_aci_errors_are_the_misses_of_the_threshold_it_served() -> None:
    """err_t = 1{α_t > β_t} is exactly "the score fell above the served threshold" while
    0 < α_t ≤ 1, with the threshold as the ⌈α_t·n⌉-th largest past score."""
    rng = np.random.default_rng(7)
    scores = np.concatenate([rng.exponential(size=1500), 4 * rng.exponential(size=1500),
                             rng.integers(0, 5, size=1000).astype(float)])
    aci = ACI(alpha=0.1, gamma=0.02, window=300)
    checked = 0
    for score in scores:
        threshold, level, errors, steps = aci.threshold, aci.alpha_t, aci.errors, aci.error_steps
        aci.update(score)
        if aci.error_steps > steps and 0 < level <= 1:
            assert aci.errors - errors == int(score > threshold)
            checked += 1
    assert checked > 3000


def test_aci_serves_the_largest_past_score_when_alpha_t_falls_below_zero() -> None:
    aci = ACI(alpha=0.1, gamma=0.05, window=30)
    for t in range(100):
        aci.update(float(t))
    assert aci.alpha_t <= 0
    assert aci.threshold == 99.0  # the largest in the window, not infinity


# -------------------------------------------------------------------- the B3 shifted stream

SEEDS = range(10)


@pytest.fixture(scope="module")
def shifted_runs() -> dict[str, list]:
    streams = [shifted_scores(seed) for seed in SEEDS]
    makers = {
        "aci": lambda: ACI(alpha=0.1, gamma=0.005),
        "faci": lambda: FACI(alpha=0.1),
        "saocp": lambda: SAOCP(alpha=0.1, max_scale=5.0),
    }
    return {name: [run_scores(make(), s) for s in streams] for name, make in makers.items()}


def worst_after_shift(runs: list) -> float:
    return float(np.mean([worst_window(r.covered[SHIFT_AT:], 100) for r in runs]))


@pytest.mark.slow  # the shifted_runs fixture: 30 long calibrator runs
@pytest.mark.parametrize("name", ["saocp", "faci"])
def test_strongly_adaptive_calibrators_cover_0_9_within_a_point(shifted_runs, name) -> None:
    coverage = np.mean([run.covered.mean() for run in shifted_runs[name]])
    assert abs(coverage - 0.9) <= 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name", ["saocp", "faci"])
def test_strongly_adaptive_calibrators_recover_from_the_shift_faster_than_aci(
    shifted_runs, name,
) -> None:
    worst, aci_worst = worst_after_shift(shifted_runs[name]), worst_after_shift(shifted_runs["aci"])
    assert worst >= 0.80 > aci_worst  # B3's target; ACI with γ = 0.005 reaches about 0.71
    for seed in range(3):
        assert (worst_window(shifted_runs[name][seed].covered[SHIFT_AT:], 100)
                > worst_window(shifted_runs["aci"][seed].covered[SHIFT_AT:], 100))


@pytest.mark.parametrize("lifetime", [8, 32])
def test_saocp_keeps_logarithmically_many_experts(lifetime: int) -> None:
    saocp = SAOCP(alpha=0.1, max_scale=1.0, lifetime=lifetime)
    scores = np.random.default_rng(0).uniform(size=2**14)
    for t, score in enumerate(scores, start=1):
        saocp.update(score)
        assert saocp.live_experts <= (lifetime // 2 + 2) * t.bit_length()
    assert saocp.live_experts <= (lifetime // 2 + 2) * 15


def test_sfogd_threshold_tracks_the_quantile_and_never_goes_negative() -> None:
    sfogd = SFOGD(alpha=0.1, max_scale=5.0)
    run = run_scores(sfogd, np.abs(np.random.default_rng(3).normal(size=4000)))
    assert run.thresholds.min() >= 0.0
    assert abs(run.covered.mean() - 0.9) <= 0.01


# --------------------------------------------------------------------- building and refusing


def test_build_calibrator_knows_every_name_and_refuses_others() -> None:
    assert {name: type(build_calibrator(name, 0.1)).__name__ for name in CALIBRATORS} == {
        "split": "SplitConformal", "aci": "ACI", "faci": "FACI", "sfogd": "SFOGD",
        "saocp": "SAOCP", "dtaci": "DtACI", "pid": "PID"}
    with pytest.raises(ValueError, match="choose one of: split, aci, faci, sfogd, saocp, dtaci, "
                                         "pid"):
        build_calibrator("cqr", 0.1)
    with pytest.raises(ValueError, match=r"takes the options \['gamma', 'window'\]"):
        build_calibrator("aci", 0.1, lifetime=8)


@pytest.mark.parametrize("make, message", [
    (lambda: SplitConformal(alpha=0.0), "alpha is the target miscoverage"),
    (lambda: ACI(alpha=1.0), "alpha is the target miscoverage"),
    (lambda: ACI(alpha=0.1, window=10), r"window must be a whole number ≥ 11"),
    (lambda: SAOCP(alpha=0.1, max_scale=0.0), "max_scale must be positive"),
    (lambda: SAOCP(alpha=0.1, lifetime=0), "lifetime must be a whole number"),
])
def test_bad_options_are_refused_with_what_to_change(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_a_non_finite_score_is_refused_and_changes_nothing() -> None:
    aci = ACI(alpha=0.1)
    aci.update(1.0)
    before = aci.state()
    with pytest.raises(ValueError, match="scores must be finite"):
        aci.update(math.nan)
    assert aci.state() == before
