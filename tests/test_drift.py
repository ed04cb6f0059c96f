"""Drift detectors raise alarms after a change and not before; the policy acts once per drift."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from drift import (
    DEFAULT_DETECTORS,
    DETECTORS,
    SIGNALS,
    Alarm,
    DriftPolicy,
    SignalDetector,
    StateMismatch,
    build_detector,
    confidence,
    default_detector,
    entropy,
)

CHANGE_AT = 5_000


def stream(signal: str, size: int, changed: bool, rng: np.random.Generator) -> np.ndarray:
    """The bench's streams (bench/drift_detectors.py): about 0.7 sd shifts, error 0.1 -> 0.3."""
    if signal == "error":
        return (rng.random(size) < (0.3 if changed else 0.1)).astype(float)
    if signal == "entropy":
        return rng.gamma(2.0, 0.375 if changed else 0.25, size)
    if signal == "confidence":
        return rng.beta(5.0 if changed else 8.0, 2.0, size)
    if signal == "residual":
        return np.abs(rng.normal(0.0, 1.5 if changed else 1.0, size))
    return rng.normal(0.5 if changed else 0.0, 1.0, size)


def feed(detector: SignalDetector, values: np.ndarray, batch: int = 64) -> list[Alarm]:
    alarms = []
    for start in range(0, len(values), batch):
        alarm = detector.update(values[start:start + batch], now=0.0)
        if alarm is not None:
            alarms.append(alarm)
    return alarms


def abrupt(signal: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([stream(signal, CHANGE_AT, False, rng),
                           stream(signal, 3_000, True, rng)])


# ---- detectors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_the_default_detector_stays_quiet_on_10000_stationary_samples(signal):
    detector = default_detector(signal)
    values = stream(signal, 10_000, False, np.random.default_rng(7))
    assert feed(detector, values) == []
    assert detector.counts["samples"] == 10_000 and detector.alarms == 0


@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_the_default_detector_alarms_within_250_samples_after_an_abrupt_change(signal):
    detector = default_detector(signal)
    alarms = feed(detector, abrupt(signal, seed=11))
    assert alarms, f"no alarm on {signal}"
    first = alarms[0]
    assert first.sample > CHANGE_AT, f"alarm at {first.sample}, before the change"
    assert first.sample - CHANGE_AT <= 250
    assert (first.detector, first.signal) == (DEFAULT_DETECTORS[signal].detector, signal)
    assert first.labelled == SIGNALS[signal].labelled


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_detector_alarms_after_the_change_and_not_before(name):
    signal = "error" if DETECTORS[name].binary else "entropy"
    # settings the bench finds near or within budget; DDM's and EDDM's false alarms gather in
    # the first few hundred samples after a start, hence their longer warm starts here
    params = {"ddm": {"warm_start": 500}, "eddm": {"alpha": 0.9, "beta": 0.8, "warm_start": 200},
              "kswin": {"alpha": 0.0001},
              "page_hinkley": {"delta": 0.1, "threshold": 50.0}}.get(name, {})
    alarms = feed(build_detector(name, signal, **params), abrupt(signal, seed=5))
    assert alarms and all(a.sample > CHANGE_AT for a in alarms)
    assert alarms[0].sample - CHANGE_AT <= 1_000


def test_an_alarm_carries_the_statistic_and_the_estimate_in_signal_units():
    detector = build_detector("page_hinkley", "entropy", delta=0.1, threshold=50.0)
    alarm = feed(detector, abrupt("entropy", seed=3))[0]
    assert alarm.statistic > 50.0  # Page-Hinkley alarms above its threshold, in sd units
    assert 0.45 < alarm.estimate < 0.8  # the running mean of entropy, not of z-scores
    event = alarm.to_json()
    assert {"time", "detector", "signal", "statistic", "estimate", "sample", "detail"} <= set(event)
    assert event["detail"]["threshold"] == 50.0
    assert Alarm.from_json(json.loads(json.dumps(event, allow_nan=False))) == alarm


def test_an_alarm_keeps_non_finite_numbers_in_its_json_and_serves_them_as_null():
    odd = Alarm("page_hinkley", "entropy", False, sample=7, update=5, time=1.0,
                statistic=float("inf"), estimate=None,
                detail={"threshold": float("-inf"), "direction": "up"})
    saved = json.loads(json.dumps(odd.to_json(), allow_nan=False))
    assert (saved["kind"], saved["statistic"], saved["detail"]["threshold"]) == \
        ("drift_alarm", "inf", "-inf")
    assert Alarm.from_json(saved) == odd
    served = odd.to_json(nonfinite="null")
    assert (served["statistic"], served["detail"]["threshold"]) == (None, None)
    with pytest.raises(ValueError):
        Alarm.from_json({**saved, "sample": -1})
    with pytest.raises(ValueError):
        Alarm.from_json({**saved, "statistic": "big"})


def test_standardising_makes_the_alarms_independent_of_the_signal_scale():
    values = abrupt("entropy", seed=5)
    plain = feed(default_detector("entropy"), values)
    rescaled = feed(default_detector("entropy"), 40.0 * values + 3.0)
    assert [a.sample for a in plain] == [a.sample for a in rescaled] != []


def test_kswin_is_fed_chunk_means_so_it_updates_once_per_16_values():
    detector = build_detector("kswin", "confidence", alpha=0.0001)
    detector.update(np.full(3_000, 0.9))
    # 187 chunk means, the first 100 of them spent estimating the scale
    assert detector.chunk == 16 and detector.updates == 3_000 // 16 - 100
    assert detector.state()["partial_chunk"]["count"] == 3_000 % 16
    with pytest.raises(ValueError, match="chunk >= 16"):
        build_detector("kswin", "confidence", chunk=1)


def test_binary_detectors_take_only_the_error_signal_and_only_zeros_and_ones():
    with pytest.raises(ValueError, match="0/1 streams"):
        build_detector("ddm", "entropy")
    with pytest.raises(ValueError, match="other than 0 and 1"):
        build_detector("hddm_a", "error").update(np.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="no parameter"):
        build_detector("adwin", "error", threshold=3)


def test_non_finite_values_are_skipped_and_counted():
    detector = default_detector("entropy")
    detector.update(np.array([0.1, np.nan, 0.2, np.inf]))
    assert detector.counts == {"samples": 2, "updates": 0, "alarms": 0, "skipped": 2}


def test_signals_are_computed_from_probabilities():
    probabilities = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert entropy(probabilities) == pytest.approx([math.log(4), 0.0])
    assert confidence(probabilities).tolist() == [0.25, 1.0]


@pytest.mark.parametrize("name", sorted(DETECTORS))
@pytest.mark.parametrize("cut", [2_003, 5_100])  # mid-warm-up or mid-chunk, and mid-drift
def test_a_detector_restored_from_its_json_state_raises_the_same_alarms(name, cut):
    signal = "error" if DETECTORS[name].binary else "residual"
    values = abrupt(signal, seed=9)
    original = build_detector(name, signal)
    feed(original, values[:cut], batch=37)
    saved = json.dumps(original.state(), allow_nan=False)
    assert "internals_lost" not in saved
    restored = SignalDetector.from_state(json.loads(saved))
    assert restored.counts == original.counts
    after_original = feed(original, values[cut:], batch=37)
    after_restored = feed(restored, values[cut:], batch=37)
    assert [(a.sample, a.statistic, a.estimate) for a in after_restored] == \
        [(a.sample, a.statistic, a.estimate) for a in after_original]
    assert restored.counts == original.counts
    assert restored.state() == original.state()


def test_a_state_from_another_detector_is_refused():
    adwin = build_detector("adwin", "error")
    adwin.update(np.zeros(100))
    with pytest.raises(StateMismatch, match="SignalDetector.from_state"):
        build_detector("adwin", "error", delta=0.01).load_state(adwin.state())
    with pytest.raises(StateMismatch):
        build_detector("hddm_a", "error").load_state(adwin.state())


def test_a_tampered_adwin_window_is_refused_before_it_reaches_river():
    detector = default_detector("error")
    detector.update((np.random.default_rng(0).random(1_000) < 0.2).astype(float))
    state = detector.state()
    state["internals"]["window"]["width"] += 1  # no longer the sum of its buckets
    with pytest.raises(StateMismatch, match="width"):
        SignalDetector.from_state(state)
    state = detector.state()
    state["internals"]["window"]["buckets"][0]["count"] = 99  # past the bucket's capacity
    with pytest.raises(StateMismatch):
        SignalDetector.from_state(state)
    state = detector.state()
    state["internals"]["window"]["buckets"][0]["totals"][0] = "nan"
    with pytest.raises(StateMismatch):
        SignalDetector.from_state(state)


def test_an_adwin_window_river_lays_out_differently_is_dropped_and_the_rest_kept(monkeypatch):
    import drift.persistence as persistence

    def unknown_layout(blob, params):
        raise ValueError("ADWIN's window bytes are longer than river 0.26's layout")

    detector = default_detector("entropy")
    feed(detector, abrupt("entropy", seed=1)[:3_000])
    monkeypatch.setattr(persistence, "_adwin_decode", unknown_layout)
    state = json.loads(json.dumps(detector.state(), allow_nan=False))
    assert state["internals"] is None and "0.26" in state["internals_lost"]
    restored = SignalDetector.from_state(state)
    assert restored.counts == detector.counts and restored.scale == detector.scale
    assert restored.measure()["width"] == 0  # a fresh window, on the same standardisation


# ---- policy ------------------------------------------------------------------------------------

def alarm(signal: str = "error", sample: int = 0, labelled: bool | None = None) -> Alarm:
    labelled = SIGNALS[signal].labelled if labelled is None else labelled
    return Alarm("adwin", signal, labelled, sample=sample, update=sample, time=0.0,
                 statistic=None, estimate=0.3, detail={"width": 120})


def policy(**options) -> DriftPolicy:
    settings = {"base_learning_rate": 0.001, "boost": 5.0, "half_life": 200, "cooldown": 1_000,
                "clock": lambda: 123.0, **options}
    return DriftPolicy(**settings)


def test_the_cooldown_turns_a_second_alarm_of_the_same_drift_into_no_action():
    drift_policy = policy()
    assert [a.name for a in drift_policy.on_alarm(alarm(), now=10_000)] == \
        ["boost_lr", "trim_memory"]
    assert drift_policy.on_alarm(alarm(), now=10_999) == []
    assert [a.name for a in drift_policy.on_alarm(alarm(), now=11_000)] == \
        ["boost_lr", "trim_memory"]
    outcomes = [e["detail"]["outcome"] for e in drift_policy.take_events()
                if e["kind"] == "drift_alarm"]
    assert outcomes == ["acted", "cooldown", "acted"]


def test_the_cooldown_is_per_action_so_a_later_labelled_alarm_still_trims():
    drift_policy = policy()
    assert [a.name for a in drift_policy.on_alarm(alarm("entropy"), now=100)] == ["boost_lr"]
    actions = drift_policy.on_alarm(alarm("error"), now=400)
    assert [a.name for a in actions] == ["trim_memory"]
    events = drift_policy.take_events()
    assert events[-2]["detail"]["suppressed"] == ["boost_lr"]


def test_the_boost_decays_back_to_base_with_the_configured_half_life():
    drift_policy = policy(boost=5.0, half_life=200)
    assert drift_policy.learning_rate(0) == 0.001
    drift_policy.on_alarm(alarm(), now=1_000)
    # lr(t) = base * (1 + (boost - 1) * 2 ** (-(t - t0) / half_life))
    assert drift_policy.learning_rate(1_000) == pytest.approx(0.005, rel=1e-12)
    assert drift_policy.learning_rate(1_200) == pytest.approx(0.003, rel=1e-12)
    assert drift_policy.learning_rate(1_400) == pytest.approx(0.002, rel=1e-12)
    assert drift_policy.learning_rate(1_100) == pytest.approx(0.001 * (1 + 4 * 2 ** -0.5))
    rates = [drift_policy.learning_rate(t) for t in range(1_000, 5_000, 50)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    # the excess is below 0.1% of base after log2(4 / 1e-3) = 12 half-lives: exactly base
    assert drift_policy.learning_rate(1_000 + 12 * 200) == 0.001
    assert drift_policy.learning_rate(1_000 + 11 * 200) > 0.001


def test_a_label_learns_at_the_boost_as_it_stood_when_its_sample_was_served():
    drift_policy = policy(boost=5.0, half_life=200)
    assert drift_policy.learning_rate_served(900) == 0.001  # no boost yet
    drift_policy.on_alarm(alarm(), now=1_000)
    # a label that arrives now, of a sample served before the boost: the old concept, base
    assert drift_policy.learning_rate_served(999) == 0.001
    assert drift_policy.learning_rate_served(float("nan")) == 0.001
    # of samples served since: the boost as it stood when each was served
    assert drift_policy.learning_rate_served(1_000) == pytest.approx(0.005, rel=1e-12)
    assert drift_policy.learning_rate_served(1_200) == pytest.approx(0.003, rel=1e-12)
    assert drift_policy.learning_rate_served(1_000 + 12 * 200) == 0.001


def test_a_confirmed_or_labelled_boost_reaches_labels_from_where_the_drift_began():
    # a label-free alarm at 1,000 confirmed by a labelled one at 1,150: labels of samples served
    # from the onset on learn at the whole boost, as its trim keeps rows from there
    confirmed = policy(boost=5.0, half_life=200, confirmation="labelled")
    assert confirmed.on_alarm(alarm("entropy"), now=1_000) == []
    assert [a.name for a in confirmed.on_alarm(alarm("error"), now=1_150)] == [
        "boost_lr", "trim_memory"]
    assert confirmed.learning_rate_served(999) == 0.001
    assert confirmed.learning_rate_served(1_000) == pytest.approx(0.005)
    assert confirmed.learning_rate_served(1_149) == pytest.approx(0.005)
    assert confirmed.learning_rate_served(1_350) == pytest.approx(0.003)
    # a labelled alarm whose labels' samples were served from 900 on: the labels of the
    # request just before the alarm, and of those before it back to 900, learn at the boost
    labelled = policy(boost=5.0, half_life=200)
    labelled.on_alarm(alarm("error"), now=1_000, served_from=900.0)
    assert labelled.learning_rate_served(899) == 0.001
    assert labelled.learning_rate_served(900) == pytest.approx(0.005)
    assert labelled.learning_rate_served(1_000) == pytest.approx(0.005)
    restored = policy(boost=5.0, half_life=200)
    restored.load_state(labelled.state())
    assert restored.learning_rate_served(950) == pytest.approx(0.005)
    # a label-free alarm: from its own clock (its batch raised it), whatever served_from says
    label_free = policy(boost=5.0, half_life=200)
    label_free.on_alarm(alarm("entropy"), now=1_000, served_from=900.0)
    assert label_free.learning_rate_served(950) == 0.001


def test_a_boost_records_where_the_rate_was_and_where_it_goes():
    drift_policy = policy(cooldown=0)
    drift_policy.on_alarm(alarm(), now=0)
    boost = drift_policy.on_alarm(alarm(), now=200)[0]
    assert boost.detail["from"] == pytest.approx(0.003)
    assert boost.detail["to"] == pytest.approx(0.005)  # a restart, never compounded


def test_under_independent_confirmation_label_free_alarms_only_boost():
    drift_policy = policy(confirmation="independent")
    assert [a.name for a in drift_policy.on_alarm(alarm("confidence"), now=50)] == ["boost_lr"]


def test_under_labelled_confirmation_a_label_free_alarm_waits_for_a_labelled_one():
    drift_policy = policy(confirmation="labelled", confirm_window=500, trim_keep=512,
                          label_free_actions=("boost_lr", "reset_adapter"),
                          labelled_actions=("trim_memory", "reset_calibrator"))
    assert drift_policy.on_alarm(alarm("entropy"), now=1_000) == []
    assert drift_policy.learning_rate(1_000) == 0.001
    actions = drift_policy.on_alarm(alarm("error"), now=1_400)
    assert [a.name for a in actions] == \
        ["boost_lr", "reset_adapter", "trim_memory", "reset_calibrator"]
    # the labelled ADWIN alarm's window after the cut (120 labels) is all of the new concept
    assert actions[2].detail == {"keep": 120, "onset": 1_000}
    acted = [e for e in drift_policy.take_events() if e["detail"].get("outcome") == "acted"][0]
    assert acted["detail"]["confirms"] == [{"detector": "adwin", "signal": "entropy", "at": 1_000}]


def test_an_unconfirmed_label_free_alarm_expires_as_an_event_and_takes_nothing():
    drift_policy = policy(confirmation="labelled", confirm_window=500)
    drift_policy.on_alarm(alarm("feature_mean"), now=1_000)
    drift_policy.advance(1_501)
    kinds = [(e["kind"], e["detail"]["outcome"]) for e in drift_policy.take_events()]
    assert kinds == [("drift_alarm", "pending"), ("drift_unconfirmed", "unconfirmed")]
    # a labelled alarm after the window acts on its own
    assert [a.name for a in drift_policy.on_alarm(alarm("error"), now=1_600)] == \
        ["boost_lr", "trim_memory"]


def test_every_alarm_and_action_is_an_event_with_its_cause():
    drift_policy = policy()
    drift_policy.on_alarm(alarm("error", sample=77), now=9_000)
    events = drift_policy.take_events()
    assert [(e["kind"], e["action"]) for e in events] == \
        [("drift_alarm", None), ("drift_action", "boost_lr"), ("drift_action", "trim_memory")]
    for event in events:
        assert {"time", "detector", "signal", "statistic", "action", "detail"} <= set(event)
        assert (event["time"], event["detector"], event["signal"]) == (123.0, "adwin", "error")
        assert (event["sample"], event["at"]) == (77, 9_000)
    assert events[0]["detail"]["actions"] == ["boost_lr", "trim_memory"]
    assert events[0]["detail"]["width"] == 120
    assert events[1]["detail"]["half_life"] == 200
    assert drift_policy.take_events() == []
    assert len(drift_policy.events) == 3


def test_a_restored_policy_keeps_the_boost_the_cooldowns_and_the_pending_alarms():
    drift_policy = policy(confirmation="labelled")
    drift_policy.on_alarm(alarm("entropy"), now=100)
    drift_policy.on_alarm(alarm("error"), now=200)
    drift_policy.on_alarm(alarm("confidence"), now=300)
    restored = policy(confirmation="labelled")
    restored.load_state(json.loads(json.dumps(drift_policy.state())))
    assert restored.learning_rate(450) == drift_policy.learning_rate(450)
    assert restored.on_alarm(alarm("error"), now=900) == []  # still cooling
    assert restored.describe()["pending"] == 0  # the confirmation used the pending alarm


def test_a_policy_state_saved_before_alarms_had_to_json_still_loads():
    # what earlier versions saved: the alarm's fields without "kind", a non-finite number as null
    saved = {"boost_at": None, "last_taken": {}, "pending": [{"at": 100, "alarm": {
        "detector": "adwin", "signal": "entropy", "labelled": False, "sample": 90, "update": 80,
        "time": 1.5, "statistic": None, "estimate": None, "detail": {"width": 12}}}]}
    restored = policy(confirmation="labelled")
    restored.load_state(saved)
    assert restored.describe()["pending"] == 1
    # and a state saved now keeps that shape
    assert restored.state() == saved


def test_a_policy_refuses_settings_it_cannot_honour():
    with pytest.raises(ValueError, match="unknown drift actions"):
        policy(labelled_actions=("retrain",))
    with pytest.raises(ValueError, match="boost"):
        policy(boost=0.5)
    with pytest.raises(ValueError, match="confirmation"):
        policy(confirmation="majority")


def test_a_trim_keeps_trim_keep_rows_unless_a_labelled_window_says_fewer():
    wide = Alarm("adwin", "error", True, sample=0, update=0, time=0.0, statistic=None,
                 estimate=0.3, detail={"width": 5_000})
    drift_policy = policy(labelled_actions=("trim_memory",), trim_keep=512)
    assert drift_policy.on_alarm(wide, now=100)[0].detail["keep"] == 512
    drift_policy = policy(labelled_actions=("trim_memory",), trim_keep=512)
    assert drift_policy.on_alarm(alarm("error"), now=100)[0].detail["keep"] == 120
    drift_policy = policy(label_free_actions=("trim_memory",), trim_keep=512)
    assert drift_policy.on_alarm(alarm("entropy"), now=100)[0].detail["keep"] == 512
