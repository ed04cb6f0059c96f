"""The service on a real redis-server: the same loop, and what happens while Redis is away."""

from __future__ import annotations

import asyncio
import uuid

from service.demo import digits_split
from tests.harness import metric, serving, settings_for
from tests.redis_server import RedisServer

_, _, X_TEST, Y_TEST = digits_split()


def test_predictions_and_labels_go_through_redis_and_a_checkpoint_survives_a_restart(redis_server):
    namespace = f"svc-{uuid.uuid4().hex[:8]}"
    settings = settings_for(store={"url": redis_server.url, "namespace": namespace},
                            adapter={"name": "tent", "adapt_batch_size": 16})

    async def first_life():
        async with serving(settings) as (client, app):
            ready = await client.get("/readyz")
            predicted = await client.post("/v1/predict", json={
                "inputs": X_TEST[:16].tolist(), "ids": [f"r{i}" for i in range(16)]})
            joined = await client.post("/v1/feedback", json={"labels": [
                {"id": f"r{i}", "label": int(Y_TEST[i])} for i in range(16)]})
            saved = await client.post("/v1/admin/checkpoint")
            adapted = [p.detach().clone() for p in app.state.runtime.adapter.params]
            return ready, predicted, joined.json(), saved.json(), adapted

    async def second_life():
        async with serving(settings) as (client, app):
            again = await client.post("/v1/feedback", json={"labels": [
                {"id": "r0", "label": int(Y_TEST[0])}]})
            restored = [p.detach().clone() for p in app.state.runtime.adapter.params]
            return again.json(), restored, app.state.runtime.adapter.steps

    ready, predicted, joined, saved, adapted = asyncio.run(first_life())
    assert ready.status_code == 200 and ready.json()["checks"] == {"model": True, "store": True}
    assert predicted.status_code == 200
    assert joined["joined"] == 16
    assert saved["version"] == 1 and saved["adapter"] == "tent"
    again, restored, steps = asyncio.run(second_life())
    # a label already joined in the first life is a duplicate in the second: state is in Redis
    assert again == {"joined": 0, "unknown": [], "duplicate": ["r0"], "expired": [],
                     "rejected": []}
    assert steps == 1
    for before, after in zip(adapted, restored, strict=True):
        assert before.equal(after)
    with redis_server.client() as client:
        keys = [k.decode() for k in client.scan_iter(match="*", count=1000)]
    assert keys and all(k.startswith(("adaptd:", "{adaptd:")) for k in keys)


def test_while_redis_is_down_predictions_go_on_readiness_fails_and_it_all_comes_back():
    with RedisServer() as server:
        settings = settings_for(store={"url": server.url, "namespace": "outage"})

        async def scenario():
            async with serving(settings) as (client, app):
                assert (await client.get("/readyz")).status_code == 200
                server.stop()
                during = await client.post("/v1/predict", json={
                    "inputs": X_TEST[:2].tolist(), "ids": ["lost0", "lost1"]})
                not_ready = await client.get("/readyz")
                refused = await client.post("/v1/feedback", json={"labels": [
                    {"id": "lost0", "label": 1}]})
                state_down = (await client.get("/v1/state")).json()
                errors = metric(app, "adaptd_store_errors_total", op="put_predictions")
                server.start()
                back = await client.get("/readyz")
                after = await client.post("/v1/predict", json={
                    "inputs": X_TEST[:1].tolist(), "ids": ["kept"]})
                joined = await client.post("/v1/feedback", json={"labels": [
                    {"id": "kept", "label": int(Y_TEST[0])}, {"id": "lost1", "label": 1}]})
                return (during, not_ready, refused, state_down, errors, back, after,
                        joined.json(), metric(app, "adaptd_store_up"))

        (during, not_ready, refused, state_down, errors, back, after, joined,
         store_up) = asyncio.run(scenario())
    assert during.status_code == 200 and len(during.json()["predictions"]) == 2
    assert not_ready.status_code == 503
    assert not_ready.json() == {"status": "not ready", "checks": {"model": True, "store": False},
                                "reason": "the store does not answer"}
    assert refused.status_code == 503
    assert refused.json()["detail"].startswith("the store is unavailable; ")
    assert "127.0.0.1" not in refused.json()["detail"]  # no internal address for clients
    assert state_down["store"]["up"] is False
    assert errors == 1
    assert back.status_code == 200 and after.status_code == 200
    # the records written while Redis was away are gone: their labels are unknown, not errors
    assert joined == {"joined": 1, "unknown": ["lost1"], "duplicate": [], "expired": [],
                      "rejected": []}
    assert store_up == 1
