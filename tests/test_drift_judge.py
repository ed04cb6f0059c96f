"""The drift policy's judge: actions held back as controls, outcomes from the labels around each
alarm placed by when their samples were served, and a verdict that stops an action that hurts."""

from __future__ import annotations

import numpy as np
import pytest

from drift import ActionJudge, Alarm, DriftPolicy
from drift.judge import JUDGED

HORIZON = 50


def _drive(judge: ActionJudge, effect: float, alarms: int, seed: int = 0, delay: int = 0,
           gap: int = 400) -> list[bool]:
    """A stream of one sample a second and one label each, ``delay`` samples late; the loss is
    Bernoulli(0.3), plus ``effect`` for the HORIZON samples after an alarm where the action was
    taken, and every drift (alarm) raises it by 0.2 for a while whatever the action, which a
    before/after comparison alone would blame on the action. Returns what each alarm chose."""
    rng = np.random.default_rng(seed)
    chosen: list[bool] = []
    acted_at: list[int] = []
    alarm_at = [gap * (i + 1) for i in range(alarms)]
    waiting: list[tuple[int, float]] = []
    for t in range(gap * (alarms + 1) + 4 * HORIZON):
        judge.tick(t + 1, float(t))
        if t + 1 in alarm_at:
            chosen.append(judge.choose("boost_lr", t + 1, "adwin", "error"))
            if chosen[-1]:
                acted_at.append(t + 1)
        p = 0.3 + (0.2 if any(0 < t + 1 - a <= 150 for a in alarm_at) else 0.0)
        p += effect if any(0 < t + 1 - a <= HORIZON for a in acted_at) else 0.0
        waiting.append((t, float(rng.random() < p)))
        ready = [w for w in waiting if w[0] <= t - delay]
        waiting = [w for w in waiting if w[0] > t - delay]
        if ready:
            judge.observe(np.array([float(s) for s, _ in ready]), np.array([v for _, v in ready]))
        judge.advance(t + 1)
    return chosen


def test_an_action_that_raises_the_loss_is_found_hurting_and_then_held_at_most_alarms() -> None:
    judge = ActionJudge(holdout=4, horizon=HORIZON, min_trials=4, min_labels=20)
    chosen = _drive(judge, effect=0.4, alarms=40)
    assert judge.verdict("boost_lr") == "hurts"
    described = judge.describe()["actions"]["boost_lr"]
    assert described["acted"]["mean"] > described["held"]["mean"] + 0.25
    # the first 16 alarms are three acted to one held; once it hurts, one acted in four
    assert chosen[:16].count(False) == 4
    assert chosen[-12:].count(True) == 3


def test_an_action_that_lowers_the_loss_helps_and_is_still_taken_at_three_alarms_in_four() -> None:
    judge = ActionJudge(holdout=4, horizon=HORIZON, min_trials=4, min_labels=20)
    chosen = _drive(judge, effect=-0.25, alarms=40)
    assert judge.verdict("boost_lr") == "helps"
    assert chosen.count(True) == 30


def test_an_action_without_effect_is_not_blamed_for_the_drift_it_answers() -> None:
    # every alarm comes with a rise of the loss; the held alarms have it too
    verdicts = []
    for seed in range(6):
        judge = ActionJudge(holdout=4, horizon=HORIZON, min_trials=4, min_labels=20)
        _drive(judge, effect=0.0, alarms=40, seed=seed)
        verdicts.append(judge.verdict("boost_lr"))
        assert judge.describe()["actions"]["boost_lr"]["acted"]["mean"] > 0.05  # the drift's
    assert verdicts.count("unclear") >= 5


def test_a_late_label_counts_for_when_its_sample_was_served() -> None:
    on_time = ActionJudge(holdout=4, horizon=HORIZON, min_trials=4, min_labels=20)
    late = ActionJudge(holdout=4, horizon=HORIZON, min_trials=4, min_labels=20)
    _drive(on_time, effect=0.4, alarms=20, delay=0)
    _drive(late, effect=0.4, alarms=20, delay=HORIZON // 2)
    assert late.outcomes["boost_lr"] == on_time.outcomes["boost_lr"]


def test_an_alarm_whose_labels_never_come_gives_no_outcome() -> None:
    judge = ActionJudge(holdout=2, horizon=HORIZON, min_labels=20)
    closed_once = False
    for t in range(1, 4 * HORIZON + 2):
        judge.tick(t, float(t))
        if t == 2 * HORIZON:
            judge.choose("boost_lr", t)
        if t < 2 * HORIZON:  # labels stop at the alarm
            judge.observe(np.array([float(t)]), np.array([0.0]))
        closed = judge.advance(t)
        if closed:
            closed_once = True
            assert closed[0]["outcome"] is None and closed[0]["labels_after"] == 0
            assert closed[0]["labels_before"] == HORIZON - 1  # served in (50, 100)
    assert closed_once and not judge.trials and not judge.outcomes["boost_lr"]["acted"]


def test_every_holdout_th_alarm_is_held_and_one_alarms_two_actions_are_not_held_together() -> None:
    judge = ActionJudge(holdout=4, horizon=HORIZON)
    boost = [judge.choose("boost_lr", 10 * i) for i in range(8)]
    trim = [judge.choose("trim_memory", 10 * i) for i in range(8)]
    assert boost == [True, True, True, False] * 2
    assert trim == [True, True, False, True] * 2
    assert judge.choose("reset_calibrator", 100)  # not judged: always taken, no trial
    assert {t.action for t in judge.trials} == {"boost_lr", "trim_memory"}


def test_holdout_zero_takes_every_action_and_judges_nothing() -> None:
    judge = ActionJudge(holdout=0)
    assert all(judge.choose("boost_lr", i) for i in range(10)) and not judge.trials
    with pytest.raises(ValueError, match="holdout"):
        ActionJudge(holdout=1)


def test_the_turns_and_outcomes_survive_a_restart_and_a_bad_state_changes_nothing() -> None:
    judge = ActionJudge(holdout=4, horizon=HORIZON, min_trials=4, min_labels=20)
    _drive(judge, effect=0.4, alarms=24)
    restored = ActionJudge(holdout=4, horizon=HORIZON, min_trials=4, min_labels=20)
    restored.load_state(judge.state())
    assert restored.describe()["actions"] == judge.describe()["actions"]
    assert restored.eligible == judge.eligible and restored.verdict("boost_lr") == "hurts"
    before = restored.state()
    for bad in ({"eligible": {"boost_lr": "x"}, "outcomes": {}},
                {"eligible": {}, "outcomes": {"explode": {"acted": [0.1]}}},
                {"eligible": {}, "outcomes": {"boost_lr": {"acted": [float("nan")]}}},
                {"outcomes": {}}):
        with pytest.raises(ValueError):
            restored.load_state(bad)
        assert restored.state() == before


def _alarm(sample: int) -> Alarm:
    return Alarm("adwin", "error", True, sample=sample, update=sample, time=0.0,
                 statistic=None, estimate=0.3)


def test_the_policy_holds_an_action_starts_its_cooldown_and_says_so() -> None:
    judge = ActionJudge(holdout=2, horizon=HORIZON)
    policy = DriftPolicy(base_learning_rate=1.0, cooldown=100, labelled_actions=["boost_lr"],
                         clock=lambda: 0.0, judge=judge)
    assert [a.name for a in policy.on_alarm(_alarm(0), now=0)] == ["boost_lr"]
    assert policy.on_alarm(_alarm(200), now=200) == []  # the second eligible alarm: held
    assert policy.describe()["boost_at"] == 0  # the boost of the first alarm, not restarted
    assert policy.on_alarm(_alarm(250), now=250) == []  # within the held action's cool-down
    events = policy.take_events()
    outcomes = [e["detail"]["outcome"] for e in events if e["kind"] == "drift_alarm"]
    assert outcomes == ["acted", "held", "cooldown"]
    assert events[2]["detail"]["held"] == ["boost_lr"]
    assert policy.describe()["judge"]["open_trials"] == 2
    assert set(policy.state()["judge"]["eligible"]) == set(JUDGED)


def test_the_policy_records_each_judged_alarm_as_an_event() -> None:
    judge = ActionJudge(holdout=2, horizon=HORIZON, min_labels=5)
    policy = DriftPolicy(base_learning_rate=1.0, labelled_actions=["boost_lr"],
                         clock=lambda: 0.0, judge=judge)
    for t in range(1, 4 * HORIZON):
        judge.tick(t, float(t))
        if t == HORIZON:
            policy.on_alarm(_alarm(t), now=t)
        judge.observe(np.array([float(t)]), np.array([1.0 if t > HORIZON else 0.0]))
        policy.advance(t)
    judged = [e for e in policy.take_events() if e["kind"] == "drift_judged"]
    assert len(judged) == 1 and judged[0]["action"] == "boost_lr"
    detail = judged[0]["detail"]
    assert detail["arm"] == "acted" and detail["outcome"] == pytest.approx(1.0)
    assert detail["labels_before"] == HORIZON and detail["labels_after"] == HORIZON
