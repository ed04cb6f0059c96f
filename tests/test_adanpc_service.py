"""AdaNPC in the service: memory votes on top of a test-time method, shared through the store."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

from service.demo import digits_split
from tests.harness import serving, settings_for

_, _, X_TEST, Y_TEST = digits_split()


def test_eata_with_adanpc_grows_a_memory_from_predictions_and_labels_that_survives_a_restart(
        redis_server):
    namespace = f"npc-{uuid.uuid4().hex[:8]}"
    settings = settings_for(
        store={"url": redis_server.url, "namespace": namespace},
        adapter={"name": "eata+adanpc", "memory": {"confidence_threshold": 0.5, "capacity": 200}},
        error_memory={"kind": "off"},  # AdaNPC's memory alone is persisted here
    )

    async def first_life():
        async with serving(settings) as (client, app):
            before = (await client.get("/v1/state")).json()["memories"]
            ids = [f"n{i}" for i in range(64)]
            reply = (await client.post("/v1/predict", json={"inputs": X_TEST[:64].tolist(),
                                                            "ids": ids})).json()
            memory = app.state.runtime.engine.adanpc
            predicted = len(memory.rows())
            join = (await client.post("/v1/feedback", json={"labels": [
                {"id": ids[i], "label": int(Y_TEST[i])} for i in range(10)]})).json()
            after = (await client.get("/v1/state")).json()
            return before, reply, predicted, join, after, memory.rows(), memory.seed_size

    async def second_life():
        async with serving(settings) as (client, app):
            reloaded = app.state.runtime.engine.adanpc.rows()
            state = (await client.get("/v1/state")).json()
            reset = await client.post("/v1/admin/reset")
            cleared = (await client.get("/v1/state")).json()["memories"]
            stored = app.state.runtime.store.raw.load_memory("adanpc")
            return reloaded, state, reset.status_code, cleared, stored

    before, reply, predicted, join, after, rows, seed = asyncio.run(first_life())
    assert after["adapter"]["name"] == "eata+adanpc"
    assert before == {"adanpc": seed}
    # the confident predictions joined as pseudo-labels, then the 10 labels with their true class
    assert 0 < predicted <= 64 and join["joined"] == 10
    added = after["memories"]["adanpc"] - seed
    assert added == predicted + 10 and len(rows) == added
    np.testing.assert_array_equal(rows[predicted:, -1], -1.0 - Y_TEST[:10])  # y packed as -1 - y
    assert (rows[:predicted, -1] >= 0).all()
    assert after["learning"]["adanpc"]["labelled_rows"] == 10
    # no labels had shown the vote better when these were served: the model's own softmax
    assert after["learning"]["adanpc"]["vote_weight"] == 0.0
    # the 10 labels found what was served for them (by the stored features), so the vote's
    # weight is now chosen on them (10 is fewer than min_labels: it stays 0)
    assert after["learning"]["adanpc"]["vote_evidence"] == 10
    for row in reply["predictions"]:
        assert abs(sum(row["probabilities"]) - 1) < 1e-5
        assert row["prediction"] == int(np.argmax(row["probabilities"]))

    reloaded, state, reset_status, cleared, stored = asyncio.run(second_life())
    np.testing.assert_array_equal(reloaded, rows)  # the true labels' rows came back as such
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
