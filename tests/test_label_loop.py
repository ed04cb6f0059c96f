"""The label loop in the running service: labels feed the error memory (ReLoop2 compensation), the
regression output corrector and the supervised step, exactly once, through the store."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import torch
from harness import metric, serving, settings_for
from redis_server import RedisServer

from service.demo import digits_split
from tests.models import regressor

REGRESSOR = {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
             "input_shape": [3], "num_classes": None}


def test_labels_pull_a_repeated_input_towards_its_label_and_the_memory_grows_once() -> None:
    """Eight predictions of one image, all labelled with a class the model did not predict:
    with γ = 1 and λ = 0.5 every neighbour is that image, so the next prediction is
    p + 0.5 (onehot - p) exactly, and a repeated label adds nothing."""
    _, _, x_test, _ = digits_split()
    image = x_test[0].tolist()

    async def scenario():
        # the source model: only the error memory changes the answer
        async with serving(error_memory={"kind": "exact", "weight": 0.5, "k": 10},
                           adapter={"name": "none"}) as (client, app):
            first = (await client.post("/v1/predict", json={
                "inputs": [image] * 8, "ids": [f"same-{i}" for i in range(8)]})).json()
            probs = first["predictions"][0]["probabilities"]
            wrong = int(np.argsort(probs)[0])  # the class the model finds least likely
            labels = {"labels": [{"id": f"same-{i}", "label": wrong} for i in range(8)]}
            joined = (await client.post("/v1/feedback", json=labels)).json()
            again = (await client.post("/v1/feedback", json=labels)).json()
            after = (await client.post("/v1/predict", json={"inputs": [image]})).json()
            runtime = app.state.runtime
            stored = runtime.store.raw.load_memory("error_memory")
            return (probs, wrong, joined, again, after["predictions"][0], stored,
                    len(runtime.engine.error_memory), metric(app, "adaptd_memory_size",
                                                             memory="error_memory"))

    probs, wrong, joined, again, after, stored, size, gauge = asyncio.run(scenario())
    assert joined["joined"] == 8 and again["duplicate"] == [f"same-{i}" for i in range(8)]
    assert size == 8 and gauge == 8.0 and stored.shape[0] == 8
    expected = np.array(probs) + 0.5 * (np.eye(10)[wrong] - np.array(probs))
    np.testing.assert_allclose(after["probabilities"], expected, atol=1e-5)
    assert after["prediction"] == int(np.argmax(expected))


def test_a_regressor_is_compensated_halfway_towards_what_its_neighbours_turned_out_to_be() -> None:
    inputs = np.array([[0.1, 0.2, 0.3]] * 4, dtype=np.float32)
    with torch.inference_mode():
        source = float(regressor()(torch.from_numpy(inputs[:1]))[0, 0])

    async def scenario():
        async with serving(model=REGRESSOR, error_memory={"kind": "exact", "weight": 0.5},
                           adapter={"name": "none"}, mixture={"enabled": False}
                           ) as (client, _):
            await client.post("/v1/predict", json={"inputs": inputs.tolist(),
                                                   "ids": ["r0", "r1", "r2", "r3"]})
            await client.post("/v1/feedback", json={"labels": [
                {"id": f"r{i}", "label": source + 2.0} for i in range(4)]})
            return (await client.post("/v1/predict", json={"inputs": inputs[:1].tolist()})).json()

    after = asyncio.run(scenario())["predictions"][0]
    assert after["prediction"] == pytest.approx(source + 1.0, abs=1e-5)


def test_the_output_corrector_learns_an_offset_from_labels() -> None:
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(256, 3)).astype(np.float32)
    with torch.inference_mode():
        source = regressor()(torch.from_numpy(inputs))[:, 0].numpy()

    async def scenario():
        async with serving(model=REGRESSOR, adapter={"name": "none"},
                           output_corrector={"enabled": True, "learning_rate": 0.01,
                                             "steps": 5, "hidden": 32}) as (client, app):
            errors = []
            for start in range(0, 256, 32):
                ids = [f"c{i}" for i in range(start, start + 32)]
                rows = (await client.post("/v1/predict", json={
                    "inputs": inputs[start:start + 32].tolist(), "ids": ids})).json()
                predicted = np.array([r["prediction"] for r in rows["predictions"]])
                truth = source[start:start + 32] + 1.5
                errors.append(float(np.abs(predicted - truth).mean()))
                await client.post("/v1/feedback", json={"labels": [
                    {"id": i, "label": float(y)} for i, y in zip(ids, truth, strict=True)]})
            return errors, metric(app, "adaptd_correction_steps_total")

    errors, steps = asyncio.run(scenario())
    assert errors[0] == pytest.approx(1.5, abs=1e-3)  # the corrector starts as the identity
    assert errors[-1] < 0.5 * errors[0]
    assert steps == 8


def test_a_model_without_normalisation_adapts_to_labels_through_a_low_rank_adapter() -> None:
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(128, 3)).astype(np.float32)
    with torch.inference_mode():
        source = regressor()(torch.from_numpy(inputs))[:, 0].numpy()

    async def scenario():
        async with serving(model=REGRESSOR, adapter={"name": "none"},
                           supervised={"enabled": True, "learning_rate": 0.01,
                                       "batch_size": 32},
                           mixture={"enabled": False}) as (client, app):
            engine = app.state.runtime.engine
            assert engine.supervised.param_names[-1].endswith("lora_B")
            for _ in range(12):
                for start in range(0, 128, 32):
                    ids = [f"s{uuid.uuid4().hex}" for _ in range(32)]
                    await client.post("/v1/predict", json={
                        "inputs": inputs[start:start + 32].tolist(), "ids": ids})
                    await client.post("/v1/feedback", json={"labels": [
                        {"id": i, "label": float(y + 1.0)}
                        for i, y in zip(ids, source[start:start + 32], strict=True)]})
            adapted = (await client.post("/v1/predict", json={"inputs": inputs.tolist()[:64]}
                                         )).json()
            steps = metric(app, "adaptd_supervised_steps_total")
            await client.post("/v1/admin/reset")
            reset = (await client.post("/v1/predict", json={"inputs": inputs.tolist()[:64]})).json()
            return adapted, reset, steps

    adapted, reset, steps = asyncio.run(scenario())
    moved = np.array([r["prediction"] for r in adapted["predictions"]]) - source[:64]
    assert steps == 48
    assert np.mean(np.abs(moved - 1.0)) < 0.35  # most of the way to the +1 the labels showed
    np.testing.assert_allclose([r["prediction"] for r in reset["predictions"]], source[:64],
                               atol=1e-5)


async def _predict_and_label(client, inputs: np.ndarray, labels: np.ndarray) -> None:
    """Requests of 16 digits, each followed by its labels."""
    for start in range(0, len(inputs), 16):
        ids = [f"r{start + i}" for i in range(16)]
        await client.post("/v1/predict", json={
            "inputs": inputs[start:start + 16].tolist(), "ids": ids})
        await client.post("/v1/feedback", json={"labels": [
            {"id": i, "label": int(y)}
            for i, y in zip(ids, labels[start:start + 16], strict=True)]})


def test_labels_train_every_parameter_with_replay_and_reference_rehearsal() -> None:
    _, _, x_test, y_test = digits_split()

    async def scenario():
        async with serving(supervised={"enabled": True, "train": "all", "batch_size": 16,
                                       "replay": 40, "replay_steps": 2,
                                       "reference_batch": 8}) as (client, app):
            engine = app.state.runtime.engine
            before = [p.detach().clone() for p in engine.supervised.params]
            await _predict_and_label(client, x_test[:64], y_test[:64])
            learnt = (await client.get("/v1/state")).json()["learning"]["supervised"]
            moved = [not torch.equal(p, b) for p, b in zip(engine.supervised.params, before,
                                                          strict=True)]
            await client.post("/v1/admin/reset")
            reset = (await client.get("/v1/state")).json()["learning"]["supervised"]
            return learnt, moved, reset, metric(app, "adaptd_supervised_steps_total")

    learnt, moved, reset, steps = asyncio.run(scenario())
    assert (learnt["trains"], learnt["replay"], learnt["replay_steps"],
            learnt["reference_batch"]) == ("all", 40, 2, 8)
    assert learnt["kept"] == 40  # 64 labelled samples, the ring holds the last 40
    assert learnt["steps"] == steps == 4 * (1 + 2)  # each labelled batch, then two replays
    assert all(moved)  # the convolutions too, not only the affines
    assert (reset["kept"], reset["steps"]) == (0, 0)


def test_the_service_serves_the_average_of_the_supervised_steps_and_resets_both() -> None:
    _, _, x_test, y_test = digits_split()

    async def scenario():
        async with serving(supervised={"enabled": True, "train": "all", "batch_size": 16,
                                       "replay": 40, "replay_steps": 2,
                                       "average": 0.9}) as (client, app):
            engine = app.state.runtime.engine
            source = [p.detach().clone() for p in engine.supervised.params]
            await _predict_and_label(client, x_test[:64], y_test[:64])
            learnt = (await client.get("/v1/state")).json()["learning"]["supervised"]
            served = [p.detach().clone() for p in engine.supervised.params]
            moved = [m.clone() for m in engine.supervised._moved]
            checkpoint = engine.checkpoint()
            await client.post("/v1/admin/reset")
            after_reset = [p.detach().clone() for p in engine.supervised.params]
            restored = engine.restore(checkpoint)
            back = [p.detach().clone() for p in engine.supervised.params]
            return (learnt, source, served, moved, after_reset, restored, back,
                    engine.supervised._moved)

    learnt, source, served, moved, after_reset, restored, back, moved_back = asyncio.run(
        scenario())
    assert (learnt["average"], learnt["steps"]) == (0.9, 12)
    # twelve steps moved every parameter; the model serves their average, between the source
    # and the moved weights
    for s, a, m in zip(source, served, moved, strict=True):
        if not torch.equal(s, m):
            assert not torch.equal(a, m)
            assert torch.linalg.vector_norm(a - s) < torch.linalg.vector_norm(m - s)
    assert all(torch.equal(r, s) for r, s in zip(after_reset, source, strict=True))
    # a checkpoint holds both: restored, the model serves the average and steps from the moved
    assert restored
    assert all(torch.equal(b, a) for b, a in zip(back, served, strict=True))
    assert all(torch.equal(b, m) for b, m in zip(moved_back, moved, strict=True))


def test_a_restored_supervised_step_starts_the_mixture_from_its_answers(
        redis_server: RedisServer) -> None:
    # with adapter none the source starts level with the supervised model, which it equals
    # until the first label; a checkpoint restored at start makes them differ before any
    # label, and the source goes to the floor, as beside an adapter
    settings = settings_for(model=REGRESSOR, adapter={"name": "none"},
                            supervised={"enabled": True, "train": "all", "learning_rate": 0.01,
                                        "batch_size": 32},
                            mixture={"enabled": True, "learner": "off", "newest_label": "off",
                                     "recent_residual": "off"},
                            store={"url": redis_server.url, "namespace": uuid.uuid4().hex})
    inputs = np.random.default_rng(3).normal(size=(32, 3)).astype(np.float32)

    async def life(train: bool):
        async with serving(settings) as (client, app):
            mixture = app.state.runtime.engine.mixture
            start = dict(zip(mixture.names, mixture.weights, strict=True))
            if train:
                for _ in range(4):
                    ids = [f"s{uuid.uuid4().hex}" for _ in range(32)]
                    await client.post("/v1/predict", json={"inputs": inputs.tolist(), "ids": ids})
                    await client.post("/v1/feedback", json={"labels": [
                        {"id": i, "label": 5.0} for i in ids]})
                await client.post("/v1/admin/checkpoint")
            return start

    first = asyncio.run(life(train=True))
    second = asyncio.run(life(train=False))
    assert first == pytest.approx({"source": 0.5, "adapted": 0.5})
    assert second["source"] == pytest.approx(0.001 / 2)
    assert second["adapted"] == pytest.approx(1 - 0.001 / 2)


def test_reference_rehearsal_without_labelled_reference_data_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="labelled reference data"):
        asyncio.run(_start(model=REGRESSOR, adapter={"name": "none"},
                           supervised={"enabled": True, "reference_batch": 8}))


async def _start(**overrides) -> None:
    async with serving(**overrides):
        pass


def test_an_operator_reset_empties_the_error_memory_and_its_stored_rows() -> None:
    _, _, x_test, y_test = digits_split()

    async def scenario():
        async with serving(error_memory={"kind": "hashed"}) as (client, app):
            ids = [f"h{i}" for i in range(16)]
            await client.post("/v1/predict", json={"inputs": x_test[:16].tolist(), "ids": ids})
            await client.post("/v1/feedback", json={"labels": [
                {"id": i, "label": int(y)} for i, y in zip(ids, y_test[:16], strict=True)]})
            runtime = app.state.runtime
            before = (len(runtime.engine.error_memory),
                      len(runtime.store.raw.load_memory("error_memory")))
            await client.post("/v1/admin/reset")
            after = (len(runtime.engine.error_memory),
                     len(runtime.store.raw.load_memory("error_memory")))
            return before, after

    assert asyncio.run(scenario()) == ((16, 16), (0, 0))


def test_the_error_memory_comes_back_from_redis_after_a_restart(redis_server: RedisServer) -> None:
    _, _, x_test, y_test = digits_split()
    settings = settings_for(error_memory={"kind": "exact"},
                            store={"url": redis_server.url, "namespace": uuid.uuid4().hex})

    async def first_life():
        async with serving(settings) as (client, app):
            ids = [f"life-{i}" for i in range(40)]
            await client.post("/v1/predict", json={"inputs": x_test[:40].tolist(), "ids": ids})
            await client.post("/v1/feedback", json={"labels": [
                {"id": i, "label": int(y)} for i, y in zip(ids, y_test[:40], strict=True)]})
            return app.state.runtime.engine.error_memory.rows()

    async def second_life():
        async with serving(settings) as (_, app):
            return app.state.runtime.engine.error_memory.rows()

    before = asyncio.run(first_life())
    np.testing.assert_array_equal(asyncio.run(second_life()), before)
    assert before.shape[0] == 40


def test_error_memory_on_a_model_without_a_linear_layer_is_refused_at_start() -> None:
    from service.runtime import build_engine

    settings = settings_for(model={"factory": "tests.models:no_linear", "name": "conv",
                                   "task": "regression", "input_shape": [3], "num_classes": None},
                            error_memory={"kind": "exact"})
    with pytest.raises(ValueError, match="error_memory.kind = 'off'"):
        from service.events import EventLog
        from service.metrics import Metrics

        metrics = Metrics()
        build_engine(settings, metrics, EventLog(metrics))


def test_a_multi_output_regressor_takes_one_label_value_per_output() -> None:
    from tests.models import forecaster

    model = {"factory": "tests.models:forecaster", "name": "fc", "task": "regression",
             "input_shape": [3], "num_classes": None}
    inputs = np.array([[0.3, -0.2, 0.5]] * 4, dtype=np.float32)
    with torch.inference_mode():
        source = forecaster()(torch.from_numpy(inputs[:1]))[0].numpy()
    truth = [float(source[0] + 1.0), float(source[1] - 2.0)]

    async def scenario():
        async with serving(model=model, adapter={"name": "none"},
                           error_memory={"kind": "exact", "weight": 0.5}) as (client, app):
            await client.post("/v1/predict", json={"inputs": inputs.tolist(),
                                                   "ids": ["f0", "f1", "f2", "f3"]})
            scalar = await client.post("/v1/feedback", json={"labels": [{"id": "f0",
                                                                         "label": 1.0}]})
            short = await client.post("/v1/feedback", json={"labels": [{"id": "f0",
                                                                        "label": [1.0]}]})
            joined = (await client.post("/v1/feedback", json={"labels": [
                {"id": f"f{i}", "label": truth} for i in range(4)]})).json()
            after = (await client.post("/v1/predict", json={"inputs": inputs[:1].tolist()})).json()
            record = app.state.runtime.store.raw.get_prediction("f0")
            state = (await client.get("/v1/state")).json()
            return scalar, short, joined, after["predictions"][0], record, state

    scalar, short, joined, after, record, state = asyncio.run(scenario())
    assert scalar.status_code == 422 and "send a list" in scalar.json()["detail"]
    assert short.status_code == 422 and "predicts 2" in short.json()["detail"]
    assert joined["joined"] == 4 and record.label == truth
    np.testing.assert_allclose(after["prediction"], (source + np.array(truth)) / 2, atol=1e-5)
    assert state["quality"]["rolling_error"] == pytest.approx(1.5, abs=1e-5)


def test_error_memory_options_cannot_override_the_sections_own_keys() -> None:
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine

    metrics = Metrics()
    settings = settings_for(error_memory={"kind": "hashed", "options": {"capacity": 5}})
    with pytest.raises(ValueError, match=r"error_memory.options \['capacity'\]"):
        build_engine(settings, metrics, EventLog(metrics))


def test_joined_labels_carry_where_their_samples_were_served_for_the_boost_they_learn_at(
) -> None:
    """The label path hands the engine, for the labels it learns from, where each sample was
    served: the records keep it wherever drift monitoring runs, the policy's judge off too."""
    _, _, x_test, y_test = digits_split()

    async def scenario():
        async with serving(supervised={"enabled": True, "batch_size": 8},
                           drift={"policy": {"judge": {"holdout": 0}}}) as (client, app):
            engine = app.state.runtime.engine
            seen = []
            learn = engine.learn

            def spy(batch):
                seen.append(batch.learnt_served)
                return learn(batch)

            engine.learn = spy
            ids = [f"s{i}" for i in range(8)]
            await client.post("/v1/predict", json={"inputs": x_test[:8].tolist(), "ids": ids})
            await client.post("/v1/feedback", json={"labels": [
                {"id": i, "label": int(y)} for i, y in zip(ids, y_test[:8], strict=True)]})
            return seen, engine.drift.token, engine.drift.samples

    seen, token, samples = asyncio.run(scenario())
    (served,) = seen
    assert served.shape == (8, 2)
    assert (served[:, 0] == token).all() and (served[:, 1] == samples).all()


def test_the_drift_policy_sees_where_joined_labels_were_served_with_its_judge_off() -> None:
    """A labelled alarm's boost reaches the labels from where their samples were served: the
    label path hands the drift monitor that, whether or not the policy's judge runs."""
    _, _, x_test, y_test = digits_split()

    async def scenario():
        async with serving(drift={"policy": {"judge": {"holdout": 0}}}) as (client, app):
            engine = app.state.runtime.engine
            seen = []
            observe = engine.drift.observe_labels

            def spy(errors, served=None, judged=None):
                seen.append(served)
                return observe(errors, served, judged)

            engine.drift.observe_labels = spy
            ids = [f"j{i}" for i in range(8)]
            await client.post("/v1/predict", json={"inputs": x_test[:8].tolist(), "ids": ids})
            await client.post("/v1/feedback", json={"labels": [
                {"id": i, "label": int(y)} for i, y in zip(ids, y_test[:8], strict=True)]})
            return seen, engine.drift.token

    seen, token = asyncio.run(scenario())
    (served,) = seen
    assert served is not None and (served[:, 0] == token).all()
