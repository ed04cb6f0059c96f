"""Drift detection that acts, in the running service: an abrupt change at a known position raises
an alarm, the policy boosts the learning rate once (cool-down), the rate decays back to base, a
labelled alarm trims the memories, and all of it shows in /v1/events, /metrics and /v1/state;
detector state survives a restart through the store."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import torch
from harness import built_engine, metric, serving, settings_for
from redis_server import RedisServer

from service.demo import digits_split
from service.engine import SOURCE_OUTPUTS

BASE = 1e-3
CHANGE_AT = 640


def _stream() -> tuple[np.ndarray, np.ndarray]:
    """Clean digits, then from CHANGE_AT on the same digits under heavy noise."""
    _, _, x_test, y_test = digits_split()
    rng = np.random.default_rng(0)
    clean = x_test[:CHANGE_AT]
    noisy = np.clip(x_test[:640] + rng.normal(0, 0.6, x_test[:640].shape), 0, 1)
    return (np.concatenate([clean, noisy]).astype(np.float32),
            np.concatenate([y_test[:CHANGE_AT], y_test[:640]]))


@pytest.mark.slow
def test_an_abrupt_change_boosts_the_learning_rate_once_and_it_decays_back_to_base() -> None:
    inputs, _ = _stream()
    # the class-run filter off: its damping of the rate (test_runs.py) is not what this tests
    settings = {"adapter": {"name": "tent", "learning_rate": BASE, "runs": "off"},
                "drift": {"policy": {"boost": 4.0, "half_life": 64, "cooldown": 5000}},
                "batcher": {"max_wait_ms": 0}}

    async def scenario():
        async with serving(**settings) as (client, app):
            engine = app.state.runtime.engine
            rates = []
            for start in range(0, len(inputs), 32):
                await client.post("/v1/predict", json={"inputs": inputs[start:start + 32].tolist()})
                rates.append((start + 32, engine.adapter.learning_rate))
            # the new concept goes on, but no new alarm: the rate settles back to base
            for _ in range(30):
                await client.post("/v1/predict", json={"inputs": inputs[-32:].tolist()})
            rates.append((None, engine.adapter.learning_rate))
            alarms = (await client.get("/v1/events", params={"kind": "drift_alarm"})).json()
            actions = (await client.get("/v1/events", params={"kind": "drift_action"})).json()
            state = (await client.get("/v1/state")).json()
            counted = {
                "alarms": sum(metric(app, "adaptd_drift_alarms_total", detector="adwin",
                                     signal=s) for s in ("entropy", "feature_mean")),
                "boosts": sum(metric(app, "adaptd_drift_actions_total", action="boost_lr",
                                     detector="adwin", signal=s)
                              for s in ("entropy", "feature_mean")),
                "rate": metric(app, "adaptd_learning_rate"),
                "factor": metric(app, "adaptd_drift_learning_rate_factor"),
            }
            return rates, alarms["events"], actions["events"], state, counted

    rates, alarms, actions, state, counted = asyncio.run(scenario())
    before = [rate for served, rate in rates if served is not None and served <= CHANGE_AT]
    assert before == [BASE] * len(before), "an alarm before the change"
    assert len(actions) == 1 and actions[0]["action"] == "boost_lr"
    boost = actions[0]["detail"]
    assert CHANGE_AT < boost["at"] <= CHANGE_AT + 250  # the detection delay, in samples
    assert boost["to"] == 4.0 and actions[0]["source"] in ("adwin/entropy", "adwin/feature_mean")
    peak = max(rate for _, rate in rates)
    assert peak == BASE * 4.0
    assert rates[-1][1] == BASE and counted["rate"] == BASE and counted["factor"] == 1.0
    # every alarm is an event; the ones after the boost met the cool-down
    outcomes = [a["detail"]["outcome"] for a in reversed(alarms)]
    assert outcomes[0] == "acted" and set(outcomes[1:]) <= {"cooldown"}
    assert counted["alarms"] == len(alarms) >= 1 and counted["boosts"] == 1
    signals = {d["signal"]: d for d in state["detectors"]}
    assert set(signals) == {"entropy", "feature_mean", "error"}
    assert signals["error"]["labelled"] and signals["error"]["samples"] == 0
    assert sum(d["alarms"] for d in signals.values()) == len(alarms)
    assert state["drift_policy"]["samples"] == len(inputs) + 30 * 32


@pytest.mark.slow
def test_a_labelled_alarm_trims_the_error_memory_here_and_in_the_store() -> None:
    inputs, labels = _stream()
    settings = {"error_memory": {"kind": "exact"},
                "drift": {"label_free": [], "policy": {"trim_keep": 40}},
                "batcher": {"max_wait_ms": 0}}

    async def scenario():
        async with serving(**settings) as (client, app):
            runtime = app.state.runtime
            sizes = []
            for start in range(0, len(inputs), 32):
                ids = [f"t{i}" for i in range(start, start + 32)]
                await client.post("/v1/predict", json={"inputs": inputs[start:start + 32].tolist(),
                                                       "ids": ids})
                await client.post("/v1/feedback", json={"labels": [
                    {"id": i, "label": int(y)}
                    for i, y in zip(ids, labels[start:start + 32], strict=True)]})
                sizes.append(len(runtime.engine.error_memory))
            stored = len(runtime.store.raw.load_memory("error_memory"))
            actions = (await client.get("/v1/events", params={"kind": "drift_action"})).json()
            return sizes, stored, actions["events"]

    sizes, stored, actions = asyncio.run(scenario())
    names = sorted(a["action"] for a in actions)
    assert names == ["boost_lr", "trim_memory"]
    trim = next(a for a in actions if a["action"] == "trim_memory")
    assert trim["source"] == "adwin/error" and CHANGE_AT < trim["detail"]["at"]
    # the memory grew by 32 a batch until the alarm, then restarted from the 40 kept rows
    dropped = [i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1]]
    assert len(dropped) == 1 and sizes[dropped[0]] <= 40 + 32
    assert stored == sizes[-1]


def test_the_judge_scores_an_alarm_by_the_labels_of_the_samples_served_around_it() -> None:
    inputs, labels = _stream()
    inputs = np.concatenate([inputs, inputs[-256:]])  # the clock runs on past the last window
    labels = np.concatenate([labels, labels[-256:]])
    # seed 1 draws the first boost acted and the first trim held (tests/test_drift_judge.py)
    settings = {"error_memory": {"kind": "exact"},
                "drift": {"label_free": [], "policy": {"judge": {
                    "holdout": 2, "horizon": 96, "min_trials": 2, "kept": 4, "min_labels": 8,
                    "seed": 1}}},
                "batcher": {"max_wait_ms": 0}}

    async def scenario():
        async with serving(**settings) as (client, app):
            engine = app.state.runtime.engine
            served, waiting, sizes = [], [], []
            for start in range(0, len(inputs), 32):
                ids = [f"j{i}" for i in range(start, start + 32)]
                reply = await client.post("/v1/predict", json={
                    "inputs": inputs[start:start + 32].tolist(), "ids": ids})
                served.append([row["prediction"] for row in reply.json()["predictions"]])
                waiting.append([{"id": i, "label": int(y)}
                                for i, y in zip(ids, labels[start:start + 32], strict=True)])
                if len(waiting) > 2:  # every label two requests (64 samples) late
                    await client.post("/v1/feedback", json={"labels": waiting.pop(0)})
                sizes.append(len(engine.error_memory))
            alarms = (await client.get("/v1/events", params={"kind": "drift_alarm"})).json()
            judged = (await client.get("/v1/events", params={"kind": "drift_judged"})).json()
            state = (await client.get("/v1/state")).json()
            counted = {"held": metric(app, "adaptd_drift_actions_held_total",
                                      action="trim_memory"),
                       "effect": metric(app, "adaptd_drift_action_effect", action="boost_lr",
                                        arm="acted")}
            with torch.inference_mode():  # the shadow's frozen copy, as it served each sample
                source = engine.source(torch.from_numpy(inputs)).argmax(1).numpy()
            return served, source, sizes, alarms["events"], judged["events"], state, counted

    served, source, sizes, alarms, judged, state, counted = asyncio.run(scenario())
    first = alarms[-1]  # newest first
    assert first["detail"]["actions"] == ["boost_lr"] and first["detail"]["held"] == ["trim_memory"]
    assert counted["held"] >= 1
    # the held trim left the error memory growing through the alarm
    assert all(later >= earlier for earlier, later in zip(sizes, sizes[1:], strict=False))
    boost = next(e for e in reversed(judged) if e["action"] == "boost_lr")
    at = boost["detail"]["at"]
    assert at == first["detail"]["at"] and at % 32 == 0
    # the three requests served up to the alarm, against the three after it, by the sample
    # clock they were served at, though each label came two requests later; each label's loss
    # is the error of what was served less the source's on the same sample
    errors = (np.ravel(served) != labels).astype(float) - (source != labels).astype(float)
    before, after = errors[at - 96:at], errors[at:at + 96]
    assert boost["detail"]["labels_before"] == 96 == boost["detail"]["labels_after"]
    assert boost["detail"]["outcome"] == pytest.approx(after.mean() - before.mean())
    trim = next(e for e in reversed(judged) if e["action"] == "trim_memory")
    assert trim["detail"]["arm"] == "held" and trim["detail"]["outcome"] == pytest.approx(
        boost["detail"]["outcome"])
    if len([e for e in judged if e["action"] == "boost_lr"]) == 1:
        assert counted["effect"] == pytest.approx(boost["detail"]["outcome"])
    assert state["drift_policy"]["judge"]["holdout"] == 2


def test_the_judge_counts_only_labels_of_samples_this_process_served() -> None:
    inputs, _ = _stream()
    with built_engine(settings_for(batcher={"max_wait_ms": 0})) as engine:
        out = engine.forward(torch.from_numpy(inputs[:32]))
        assert engine.drift is not None and out.served == (engine.drift.token, 32)
        # a retry of a failed batch moves no clock: its records are placed nowhere
        assert engine.forward(torch.from_numpy(inputs[:32]), adapt=False).served is None
        assert engine.drift.samples == 32
        judge = engine.drift.judge
        elsewhere = np.array([[engine.drift.token + 1, 32.0]] * 32)  # another replica's records
        engine.observe_errors(np.ones(32), elsewhere)
        unsaid = np.full((32, 2), np.nan)  # records from before the judge, or with it off
        engine.observe_errors(np.ones(32), unsaid)
        assert not judge._recent
        engine.observe_errors(np.ones(32), np.array([out.served] * 32, dtype=np.float64))
        assert sum(len(v) for _, v in judge._recent) == 32
    off = settings_for(drift={"policy": {"judge": {"holdout": 0}}})
    with built_engine(off) as engine:
        # the records still say where they were served: the boost of what learns from their
        # labels is taken by it (`DriftMonitor.factor_served`)
        assert engine.forward(torch.from_numpy(inputs[:32])).served is not None
        assert engine.drift is not None and engine.drift.policy.describe()["judge"] is None


@pytest.mark.slow
def test_detectors_and_the_policy_resume_after_a_restart(redis_server: RedisServer) -> None:
    inputs, _ = _stream()
    settings = settings_for(store={"url": redis_server.url, "namespace": uuid.uuid4().hex},
                            adapter={"name": "tent"}, batcher={"max_wait_ms": 0})

    async def first_life():
        async with serving(settings) as (client, app):
            for start in range(0, len(inputs), 64):
                await client.post("/v1/predict", json={"inputs": inputs[start:start + 64].tolist()})
            return (await client.get("/v1/state")).json()

    async def second_life():
        async with serving(settings) as (client, _):
            state = (await client.get("/v1/state")).json()
            shared = (await client.get("/v1/events", params={"scope": "deployment",
                                                              "kind": "drift_alarm"})).json()
            return state, shared["events"]

    before = asyncio.run(first_life())
    after, shared = asyncio.run(second_life())
    assert after["detectors"] == before["detectors"]
    assert after["drift_policy"]["samples"] == before["drift_policy"]["samples"] == len(inputs)
    assert after["drift_policy"]["boost_at"] == before["drift_policy"]["boost_at"] is not None
    assert len(shared) == sum(d["alarms"] for d in before["detectors"]) >= 1


def test_drift_can_be_switched_off_and_bad_detector_settings_are_refused() -> None:
    import pytest
    from pydantic import ValidationError

    async def scenario():
        async with serving(drift={"enabled": False}) as (client, _):
            return (await client.get("/v1/state")).json()

    state = asyncio.run(scenario())
    assert state["detectors"] == [] and state["drift_policy"] is None
    with pytest.raises(ValidationError, match="labelled"):
        settings_for(drift={"label_free": [{"detector": "adwin", "signal": "error"}]})
    with pytest.raises(ValidationError):
        settings_for(drift={"labelled": [{"detector": "adwin", "signal": "nope"}]})


def test_the_label_free_detectors_watch_the_source_copy_not_the_model_that_learns() -> None:
    """What learns changes the model's outputs by itself, which is no drift of the inputs: with a
    shadow copy of the source, the label-free detectors are fed its outputs and features (a
    feedback loop otherwise: the alarms the learning raises boost the learning)."""
    from service.model import FeatureTap

    inputs, _ = _stream()
    settings = settings_for(adapter={"name": "tent", "learning_rate": 0.01})
    with built_engine(settings) as engine:
        assert engine.source is not None and not engine.source_is_model
        fed: list[tuple[np.ndarray | None, np.ndarray | None]] = []
        observe = engine.drift.observe_batch

        def recording(probabilities, features, count):
            fed.append((probabilities, features))
            return observe(probabilities, features, count)

        engine.drift.observe_batch = recording
        served = [engine.forward(inputs[start:start + 32]) for start in range(0, 320, 32)]
        reference = FeatureTap(engine.source)  # the source's features, taken here independently
        engine.source(torch.from_numpy(inputs[288:320]))
        source_features = reference.take().numpy()
        reference.remove()
    last = served[-1]
    # the adapted model (test-time statistics, Tent's steps) serves other outputs than the copy
    assert not np.allclose(last.outputs, last.arrays[SOURCE_OUTPUTS], atol=1e-3)
    for batch, (probabilities, features) in zip(served, fed, strict=True):
        np.testing.assert_array_equal(probabilities, batch.arrays[SOURCE_OUTPUTS])
        assert features is not None and features.shape == batch.features.shape
    np.testing.assert_allclose(fed[-1][1], source_features, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fed[-1][1], last.features, atol=1e-3)


def test_without_a_shadow_copy_the_detectors_watch_the_model_itself() -> None:
    inputs, _ = _stream()
    settings = settings_for(adapter={"name": "tent", "learning_rate": 0.01, "runs": "off"},
                            shadow={"enabled": False})  # served = the model's own outputs
    with built_engine(settings) as engine:
        assert engine.source is None
        fed = []
        observe = engine.drift.observe_batch
        engine.drift.observe_batch = lambda p, f, n: fed.append((p, f)) or observe(p, f, n)
        batch = engine.forward(inputs[:32])
    np.testing.assert_allclose(fed[0][0], batch.outputs, rtol=1e-6)
    np.testing.assert_array_equal(fed[0][1], batch.features)


def test_a_batch_the_source_copy_cannot_judge_feeds_no_detector_and_the_clock_advances() -> None:
    inputs, _ = _stream()
    with built_engine(settings_for(adapter={"name": "tent", "learning_rate": 0.01})) as engine:
        fed = []
        observe = engine.drift.observe_batch
        engine.drift.observe_batch = lambda p, f, n: fed.append((p, f)) or observe(p, f, n)
        handle = engine.source.register_forward_hook(lambda m, i, o: torch.full_like(o, np.nan))
        batch = engine.forward(inputs[:32])
        handle.remove()
        assert engine.drift.samples == 32
    assert fed == [(None, None)]
    assert np.isfinite(batch.outputs).all() and SOURCE_OUTPUTS not in batch.arrays


def test_a_saved_drift_state_of_the_other_model_resumes_without_its_label_free_detectors() -> None:
    """The detectors' warm-up statistics and windows hold the values of the model they watched:
    a state saved watching the learning model (before this replica watched the source's copy,
    or with the shadow off) must not be mixed with the copy's values."""
    inputs, _ = _stream()
    with built_engine(settings_for()) as engine:
        assert engine.drift.watches == "source copy"
        for start in range(0, 320, 32):
            engine.forward(inputs[start:start + 32])
        engine.drift.observe_labels(np.zeros(40))
        saved = engine.drift.state()
    updates = {d["signal"]: d["updates"] for d in
               [*[x.describe() for x in engine.drift.label_free],
                *[x.describe() for x in engine.drift.labelled]]}
    assert updates["entropy"] > 0 and updates["error"] > 0
    with built_engine(settings_for()) as same:
        assert same.drift.load_state(saved) == []
        assert {d["signal"]: d["updates"] for d in same.drift.describe()} == updates
    with built_engine(settings_for()) as other:
        skipped = other.drift.load_state({**saved, "watches": "model"})
        resumed = {d["signal"]: d["updates"] for d in other.drift.describe()}
        samples = other.drift.samples
    assert skipped == ["label_free (saved watching the model, now the source copy)"]
    assert resumed == {"entropy": 0, "feature_mean": 0, "error": updates["error"]}
    assert samples == 320
