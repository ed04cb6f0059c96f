"""AdaNPC in the service: memory votes on top of a test-time method, shared through the store."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

from service.demo import digits_split
from tests.harness import serving, settings_for

_, _, X_TEST, _ = digits_split()


def test_eata_with_adanpc_votes_grows_a_memory_that_survives_a_restart_and_resets(redis_server):
    namespace = f"npc-{uuid.uuid4().hex[:8]}"
    settings = settings_for(
        store={"url": redis_server.url, "namespace": namespace},
        adapter={"name": "eata+adanpc", "memory": {"confidence_threshold": 0.5, "capacity": 200}},
    )

    async def first_life():
        async with serving(settings) as (client, app):
            before = (await client.get("/v1/state")).json()["memories"]
            reply = (await client.post("/v1/predict",
                                       json={"inputs": X_TEST[:64].tolist()})).json()
            after = (await client.get("/v1/state")).json()
            memory = app.state.runtime.engine.adanpc
            return before, reply, after, memory.rows(), memory.seed_size

    async def second_life():
        async with serving(settings) as (client, app):
            reloaded = app.state.runtime.engine.adanpc.rows()
            state = (await client.get("/v1/state")).json()
            reset = await client.post("/v1/admin/reset")
            cleared = (await client.get("/v1/state")).json()["memories"]
            stored = app.state.runtime.store.raw.load_memory("adanpc")
            return reloaded, state, reset.status_code, cleared, stored

    before, reply, after, rows, seed = asyncio.run(first_life())
    assert after["adapter"]["name"] == "eata+adanpc"
    assert before == {"adanpc": seed}
    added = after["memories"]["adanpc"] - seed
    assert 0 < added <= 64 and len(rows) == added
    # the memory's vote is the output: probabilities of each row sum to one, argmax = prediction
    for row in reply["predictions"]:
        assert abs(sum(row["probabilities"]) - 1) < 1e-5
        assert row["prediction"] == int(np.argmax(row["probabilities"]))

    reloaded, state, reset_status, cleared, stored = asyncio.run(second_life())
    np.testing.assert_array_equal(reloaded, rows)
    assert state["memories"] == after["memories"]
    assert reset_status == 200
    assert cleared == {"adanpc": seed}
    assert stored.size == 0


def test_an_adanpc_memory_on_a_regression_model_is_refused_at_start():
    settings = settings_for(
        model={"factory": "tests.models:regressor", "name": "reg", "task": "regression",
               "input_shape": [3], "num_classes": None},
        adapter={"name": "adanpc"},
    )

    async def scenario():
        async with serving(settings):
            pass

    try:
        asyncio.run(scenario())
    except ValueError as error:
        assert "classification models only" in str(error)
    else:
        raise AssertionError("adanpc started on a regression model")
