"""The drift policy's judge: actions held back as controls, outcomes from the labels around each
alarm placed by when their samples were served, and a verdict that stops an action that hurts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drift import ActionJudge, Alarm, DriftPolicy
from drift.judge import JUDGED

HORIZON = 50


def _drive(judge: ActionJudge, effects: dict[str, float], alarms: int, seed: int = 0,
           delay: int = 0, gap: int = 400) -> dict[str, list[bool]]:
    """A stream of one sample a request and one label each, ``delay`` samples late; the loss is
    Bernoulli(0.3), plus each action's ``effects`` for the HORIZON samples after an alarm where
    it was taken, and every drift (alarm) raises it by 0.2 for a while whatever the actions,
    which a before/after comparison alone would blame on them. Returns what each alarm chose,
    by action."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[bool]] = {name: [] for name in effects}
    last_acted = dict.fromkeys(effects, -10**9)
    last_alarm = -10**9
    alarm_at = {gap * (i + 1) for i in range(alarms)}
    waiting: list[tuple[int, float]] = []
    for clock in range(1, gap * (alarms + 1) + 4 * HORIZON):
        if clock in alarm_at:
            last_alarm = clock
            for name in effects:
                chosen[name].append(judge.choose(name, clock, "adwin", "error"))
                if chosen[name][-1]:
                    last_acted[name] = clock
        # the sample served now is placed at the clock after its batch: clock + 1
        p = 0.3 + (0.2 if 0 < clock + 1 - last_alarm <= 150 else 0.0)
        p += sum(effect for name, effect in effects.items()
                 if 0 < clock + 1 - last_acted[name] <= HORIZON)
        waiting.append((clock + 1, float(rng.random() < p)))
        if waiting[0][0] <= clock + 1 - delay:  # labels come in the order served
            ready = [w for w in waiting if w[0] <= clock + 1 - delay]
            waiting = waiting[len(ready):]
            judge.observe(np.array([s for s, _ in ready]), np.array([v for _, v in ready]))
        judge.advance(clock + 1)
    return chosen


def _judge(**kwargs) -> ActionJudge:
    return ActionJudge(**{"holdout": 4, "horizon": HORIZON, "min_trials": 4, "min_labels": 20,
                          **kwargs})


def test_an_action_that_raises_the_loss_is_found_hurting_and_then_held_at_most_alarms() -> None:
    judge = _judge()
    chosen = _drive(judge, {"boost_lr": 0.4}, alarms=60)["boost_lr"]
    assert judge.verdict("boost_lr") == "hurts"
    described = judge.describe()["actions"]["boost_lr"]
    assert described["acted"]["mean"] > described["held"]["mean"] + 0.25
    # until the verdict, about three alarms in four act; after it, about one in four
    assert 0.6 < sum(chosen[:20]) / 20 and sum(chosen[-30:]) / 30 < 0.45


def test_an_action_that_lowers_the_loss_helps_and_is_still_taken_at_most_alarms() -> None:
    judge = _judge()
    chosen = _drive(judge, {"boost_lr": -0.25}, alarms=60)["boost_lr"]
    assert judge.verdict("boost_lr") == "helps"
    assert 0.6 < sum(chosen) / len(chosen) < 0.9


def test_an_action_without_effect_is_not_blamed_for_the_drift_it_answers() -> None:
    # every alarm comes with a rise of the loss; the held alarms have it too
    verdicts = []
    for seed in range(10):
        judge = _judge(seed=seed)
        _drive(judge, {"boost_lr": 0.0}, alarms=40, seed=seed)
        verdicts.append(judge.verdict("boost_lr"))
        assert judge.describe()["actions"]["boost_lr"]["acted"]["mean"] > 0.05  # the drift's
    assert verdicts.count("unclear") >= 9


def test_one_actions_harm_is_not_blamed_on_another_taken_at_the_same_alarms() -> None:
    # the trim hurts, the boost does nothing; their arms are drawn apart, so the trim's harm
    # falls on both of the boost's arms alike
    boosts = []
    for seed in range(6):
        judge = _judge(seed=seed)
        _drive(judge, {"boost_lr": 0.0, "trim_memory": 0.4}, alarms=60, seed=seed)
        assert judge.verdict("trim_memory") == "hurts"
        boosts.append(judge.verdict("boost_lr"))
    assert boosts.count("hurts") <= 1


def test_a_late_label_counts_for_when_its_sample_was_served() -> None:
    on_time, late = _judge(), _judge()
    _drive(on_time, {"boost_lr": 0.4}, alarms=20, delay=0)
    _drive(late, {"boost_lr": 0.4}, alarms=20, delay=HORIZON // 2)
    assert late.outcomes["boost_lr"] == on_time.outcomes["boost_lr"]
    assert len(late.outcomes["boost_lr"]["acted"]) + len(late.outcomes["boost_lr"]["held"]) == 20


def test_an_alarm_whose_labels_never_come_gives_no_outcome() -> None:
    judge = ActionJudge(holdout=2, horizon=HORIZON, min_labels=20)
    closed = []
    for t in range(1, 4 * HORIZON + 2):
        if t == 2 * HORIZON:
            judge.choose("boost_lr", t)
        if t <= 2 * HORIZON:  # labels stop at the alarm
            judge.observe(np.array([t]), np.array([0.0]))
        closed += judge.advance(t)
    assert len(closed) == 1 and closed[0]["outcome"] is None
    assert closed[0]["labels_before"] == HORIZON and closed[0]["labels_after"] == 0
    assert not judge.trials and not judge.outcomes["boost_lr"]["acted"]


def test_two_alarms_at_one_clock_close_as_two_trials() -> None:
    judge = ActionJudge(holdout=2, horizon=HORIZON, min_labels=1)
    judge.observe(np.arange(1, 11), np.zeros(10))
    judge.choose("boost_lr", 10)
    judge.choose("boost_lr", 10)
    judge.observe(np.arange(11, 21), np.ones(10))
    closed = judge.advance(10 + 2 * HORIZON)
    assert [c["outcome"] for c in closed] == [1.0, 1.0] and not judge.trials


def test_labels_served_before_the_before_window_are_dropped_from_memory() -> None:
    judge = ActionJudge(holdout=2, horizon=HORIZON)
    for t in range(1, 1001):
        judge.observe(np.array([t]), np.array([0.0]))
        judge.advance(t)
    assert sum(len(v) for _, v in judge._recent) <= HORIZON + 1


def test_the_arms_are_drawn_one_alarm_in_holdout_apart_for_each_action() -> None:
    judge = ActionJudge(holdout=4, horizon=HORIZON)
    boost = [judge.choose("boost_lr", 10 * i) for i in range(400)]
    trim = [judge.choose("trim_memory", 10 * i) for i in range(400)]
    assert 0.2 < boost.count(False) / 400 < 0.3 and 0.2 < trim.count(False) / 400 < 0.3
    both = sum(not b and not t for b, t in zip(boost, trim, strict=True)) / 400
    assert both < 0.1  # independent: about 1/16
    assert judge.choose("reset_calibrator", 100)  # not judged: always taken, no trial
    again = ActionJudge(holdout=4, horizon=HORIZON)
    assert [again.choose("boost_lr", 10 * i) for i in range(400)] == boost  # seeded


def test_holdout_zero_takes_every_action_and_judges_nothing() -> None:
    judge = ActionJudge(holdout=0)
    assert all(judge.choose("boost_lr", i) for i in range(10)) and not judge.trials
    with pytest.raises(ValueError, match="holdout"):
        ActionJudge(holdout=1)


def test_outcomes_that_never_vary_give_a_finite_statistic() -> None:
    judge = ActionJudge(min_trials=2)
    judge.outcomes["boost_lr"]["acted"].extend([0.2, 0.2])
    judge.outcomes["boost_lr"]["held"].extend([0.0, 0.0])
    statistic = judge.statistic("boost_lr")
    assert statistic is not None and math.isfinite(statistic) and statistic > 1e6
    assert judge.verdict("boost_lr") == "hurts"


def test_the_counts_and_outcomes_survive_a_restart_and_a_bad_state_changes_nothing() -> None:
    judge = _judge()
    _drive(judge, {"boost_lr": 0.4}, alarms=40)
    restored = _judge()
    restored.load_state(judge.state())
    assert restored.describe()["actions"] == judge.describe()["actions"]
    assert restored.eligible == judge.eligible and restored.verdict("boost_lr") == "hurts"
    assert restored.choose("boost_lr", 10**6) == judge.choose("boost_lr", 10**6)  # same draw
    before = restored.state()
    for bad in ({"eligible": {"boost_lr": "x"}, "outcomes": {}},
                {"eligible": {"boost_lr": -1}, "outcomes": {}},
                {"eligible": {}, "outcomes": {"explode": {"acted": [0.1]}}},
                {"eligible": {}, "outcomes": {"boost_lr": {"acted": [float("nan")]}}},
                {"outcomes": {}}):
        with pytest.raises(ValueError):
            restored.load_state(bad)
        assert restored.state() == before


def _alarm(sample: int) -> Alarm:
    return Alarm("adwin", "error", True, sample=sample, update=sample, time=0.0,
                 statistic=None, estimate=0.3)


def _seeded(first: list[bool]) -> ActionJudge:
    """A judge (holdout 2) whose first boosts are drawn acted (True) or held as ``first``."""
    def draws(seed: int) -> list[bool]:
        judge = ActionJudge(holdout=2, horizon=HORIZON, seed=seed)
        return [judge.choose("boost_lr", 0) for _ in first]
    seed = next(seed for seed in range(100) if draws(seed) == first)
    return ActionJudge(holdout=2, horizon=HORIZON, min_labels=5, seed=seed)


def test_the_policy_holds_an_action_starts_its_cooldown_and_says_so() -> None:
    judge = _seeded([True, False])
    policy = DriftPolicy(base_learning_rate=1.0, cooldown=100, labelled_actions=["boost_lr"],
                         clock=lambda: 0.0, judge=judge)
    assert [a.name for a in policy.on_alarm(_alarm(0), now=0)] == ["boost_lr"]
    assert policy.on_alarm(_alarm(200), now=200) == []  # drawn to be held
    assert policy.describe()["boost_at"] == 0  # the boost of the first alarm, not restarted
    assert policy.on_alarm(_alarm(250), now=250) == []  # within the held action's cool-down
    events = policy.take_events()
    outcomes = [e["detail"]["outcome"] for e in events if e["kind"] == "drift_alarm"]
    assert outcomes == ["acted", "held", "cooldown"]
    held = next(e for e in events if e["detail"].get("outcome") == "held")
    assert held["detail"]["held"] == ["boost_lr"] and held["detail"]["actions"] == []
    # the first alarm's trial closed at the second (no labels: no outcome); the held one waits
    assert [e["detail"]["arm"] for e in events if e["kind"] == "drift_judged"] == ["acted"]
    assert policy.describe()["judge"]["open_trials"] == 1
    assert set(policy.state()["judge"]["eligible"]) == set(JUDGED)


def test_the_policy_records_each_judged_alarm_as_an_event() -> None:
    judge = _seeded([True])
    policy = DriftPolicy(base_learning_rate=1.0, labelled_actions=["boost_lr"],
                         clock=lambda: 0.0, judge=judge)
    for t in range(1, 4 * HORIZON):
        if t == HORIZON:
            policy.on_alarm(_alarm(t), now=t)
        judge.observe(np.array([t]), np.array([1.0 if t > HORIZON else 0.0]))
        policy.advance(t)
    judged = [e for e in policy.take_events() if e["kind"] == "drift_judged"]
    assert len(judged) == 1 and judged[0]["action"] == "boost_lr"
    detail = judged[0]["detail"]
    assert detail["arm"] == "acted" and detail["outcome"] == pytest.approx(1.0)
    assert detail["labels_before"] == HORIZON and detail["labels_after"] == HORIZON


def test_a_policy_state_whose_judge_part_is_bad_changes_nothing() -> None:
    policy = DriftPolicy(base_learning_rate=1.0, labelled_actions=["boost_lr"],
                         clock=lambda: 0.0, judge=_seeded([True]))
    policy.on_alarm(_alarm(10), now=10)
    before = policy.state()
    bad = {**before, "boost_at": None, "judge": {"eligible": {}, "outcomes": {"x": {}}}}
    with pytest.raises(ValueError):
        policy.load_state(bad)
    assert policy.state() == before
    older = {k: v for k, v in before.items() if k != "judge"}  # saved before the judge existed
    policy.load_state(older)
    assert policy.state() == before
