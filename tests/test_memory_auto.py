"""`error_memory.kind = "auto"`: an exact error memory that sleeps until the first label joins
(records keep no features, nothing is compensated), and a shadow that is the served model itself
where nothing changes the model (no second forward pass)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.demo import digits_split
from service.engine import BEFORE_ERROR_MEMORY, SOURCE_OUTPUTS
from tests.harness import built_engine, serving, settings_for

BINARY = {"factory": "tests.models:binary", "name": "bin", "task": "classification",
          "input_shape": [4], "num_classes": 2}


def labels_for(prefix: str, y, count: int, start: int = 0) -> dict:
    return {"labels": [{"id": f"{prefix}{i}", "label": int(y[start + i])} for i in range(count)]}


def test_the_memory_sleeps_until_a_label_joins_then_learns_from_the_next_predictions():
    _, _, x, y = digits_split()

    async def scenario():
        async with serving(settings_for(error_memory={"kind": "auto"})) as (client, app):
            engine, store = app.state.runtime.engine, app.state.runtime.store.raw
            first = await client.post("/v1/predict", json={
                "inputs": x[:16].tolist(), "ids": [f"a{i}" for i in range(16)]})
            asleep = engine.memory_asleep
            before = [store.get_prediction(f"a{i}") for i in range(16)]
            # four of them labelled: the memory wakes, with nothing to learn from them
            joined = (await client.post("/v1/feedback", json=labels_for("a", y, 4))).json()
            woken = not engine.memory_asleep
            rows_from_sleeping = engine.error_memory.describe()["rows"]
            await client.post("/v1/predict", json={
                "inputs": x[16:48].tolist(), "ids": [f"b{i}" for i in range(32)]})
            after = [store.get_prediction(f"b{i}") for i in range(32)]
            # one batch of labels for the twelve made asleep and the 32 made awake
            late = labels_for("a", y, 16)["labels"][4:] + labels_for("b", y, 32, 16)["labels"]
            mixed = (await client.post("/v1/feedback", json={"labels": late})).json()
            state = (await client.get("/v1/state")).json()["learning"]["error_memory"]
            return first, asleep, before, joined, woken, rows_from_sleeping, after, mixed, state

    (first, asleep, before, joined, woken, rows_from_sleeping, after, mixed,
     state) = asyncio.run(scenario())
    assert first.status_code == 200 and asleep
    # asleep: no features kept, nothing corrected (so no outputs before a correction either)
    assert all(r is not None and r.features is None for r in before)
    assert all(BEFORE_ERROR_MEMORY not in r.arrays for r in before)
    assert joined["joined"] == 4 and woken
    assert rows_from_sleeping == 0  # their records had no features to learn from
    assert all(r is not None and r.features is not None for r in after)
    assert all(BEFORE_ERROR_MEMORY in r.arrays for r in after)
    # a batch that mixes both learns from the awake ones and joins every label
    assert mixed["joined"] == 44
    assert (state["kind"], state["asleep"], state["rows"]) == ("exact", False, 32)


def test_without_an_adapter_the_shadow_is_the_served_model_and_runs_no_second_forward():
    calls = []

    async def scenario():
        async with serving(settings_for(model=BINARY, drift={"enabled": False},
                                        error_memory={"kind": "auto"})) as (client, app):
            engine = app.state.runtime.engine
            hook = engine.model.module.register_forward_hook(lambda *_: calls.append(1))
            inputs = torch.randn(16, 4).tolist()
            await client.post("/v1/predict", json={"inputs": inputs,
                                                   "ids": [f"c{i}" for i in range(16)]})
            asleep_calls = len(calls)
            record = app.state.runtime.store.raw.get_prediction("c0")
            await client.post("/v1/feedback", json={"labels": [
                {"id": f"c{i}", "label": i % 2} for i in range(16)]})
            await client.post("/v1/predict", json={"inputs": inputs,
                                                   "ids": [f"d{i}" for i in range(16)]})
            awake = app.state.runtime.store.raw.get_prediction("d0")
            hook.remove()
            return engine, asleep_calls, record, awake

    engine, asleep_calls, record, awake = asyncio.run(scenario())
    assert engine.settings.adapter.name == "none"  # auto, for an MLP
    assert engine.source is engine.model.module and engine.comparison is not None
    assert asleep_calls == 1 and len(calls) == 2  # one forward a batch, asleep or awake
    # asleep, what is served is the source's: nothing to compare, nothing kept for it
    assert SOURCE_OUTPUTS not in record.arrays
    assert SOURCE_OUTPUTS in awake.arrays and awake.features is not None


def test_a_model_without_a_linear_layer_gets_no_memory_and_starts():
    model = {"factory": "tests.models:no_linear", "name": "sum", "task": "regression",
             "input_shape": [3]}

    async def scenario():
        async with serving(settings_for(model=model, error_memory={"kind": "auto"})) as (
                client, app):
            reply = await client.post("/v1/predict", json={"inputs": [[1.0, 2.0, 3.0]]})
            return reply, app.state.runtime.engine

    reply, engine = asyncio.run(scenario())
    assert reply.status_code == 200 and reply.json()["predictions"][0]["prediction"] == 12.0
    assert engine.error_memory is None and engine.settings.error_memory.kind == "off"


def test_a_replica_that_reloads_stored_rows_starts_awake(redis_server):
    import uuid

    _, _, x, y = digits_split()
    settings = settings_for(store={"url": redis_server.url,
                                   "namespace": f"wake-{uuid.uuid4().hex[:8]}"},
                            error_memory={"kind": "auto"})

    async def life(learn: bool):
        async with serving(settings) as (client, app):
            engine = app.state.runtime.engine
            asleep_at_start = engine.memory_asleep
            if learn:
                await client.post("/v1/predict", json={
                    "inputs": x[:8].tolist(), "ids": [f"w{i}" for i in range(8)]})
                await client.post("/v1/feedback", json=labels_for("w", y, 8))  # wakes it
                await client.post("/v1/predict", json={
                    "inputs": x[8:24].tolist(), "ids": [f"v{i}" for i in range(16)]})
                await client.post("/v1/feedback", json=labels_for("v", y, 16, start=8))
            return asleep_at_start, engine.error_memory.describe()["rows"]

    assert asyncio.run(life(learn=True)) == (True, 16)
    assert asyncio.run(life(learn=False)) == (False, 16)  # the rows came back, and it is awake


def test_where_classes_come_in_runs_the_memorys_correction_is_damped():
    import numpy as np

    from service.engine import BEFORE_RUNS
    from service.settings import Settings

    _, _, x, y = digits_split()
    settings = Settings(error_memory={"kind": "exact"}, drift={"enabled": False})
    with built_engine(settings) as engine:
        out = engine.forward(x[:64])
        engine.error_memory.add(torch.from_numpy(out.features), torch.from_numpy(y[:64]),
                                torch.from_numpy(out.arrays["before_error_memory"]))

        def correction(rho: np.ndarray) -> float:
            engine.runs.belief = rho  # the filter's weights over its grid of stickiness
            served = engine.forward(x[64:96], adapt=False)
            return float(np.abs(served.arrays[BEFORE_RUNS]
                                - served.arrays["before_error_memory"]).sum())

        shuffled, runs = np.zeros(len(engine.runs.rho)), np.zeros(len(engine.runs.rho))
        shuffled[0], runs[-1] = 1.0, 1.0  # all the weight on rho 0, or on rho 0.99
        full, damped = correction(shuffled), correction(runs)
        assert full > 0 and damped == pytest.approx(0.01 * full, rel=0.05)
