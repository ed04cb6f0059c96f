"""The collapse guard resets an adapter whose predictions collapse, and says so as an event."""

from __future__ import annotations

import asyncio

import numpy as np

from service.demo import digits_split
from tests.harness import metric, serving


def test_a_collapse_resets_the_adapter_and_is_listed_as_an_event():
    _, _, x_test, _ = digits_split()
    rng = np.random.default_rng(0)
    noisy = np.clip(x_test + rng.normal(0, 0.5, x_test.shape), 0, 1).astype(np.float32)
    # a learning rate 500 times Tent's drives entropy minimisation into its one-class optimum
    settings = {"adapter": {"name": "tent", "learning_rate": 0.5, "max_learning_rate": 1.0,
                            "adapt_batch_size": 32, "collapse_window": 64},
                "batcher": {"max_wait_ms": 0}}

    async def scenario():
        async with serving(**settings) as (client, app):
            for start in range(0, 320, 32):
                reply = await client.post("/v1/predict",
                                          json={"inputs": noisy[start:start + 32].tolist()})
                assert reply.status_code == 200
            # the collapse also moves the features, so drift alarms come between the resets
            listed = (await client.get("/v1/events", params={"kind": "collapse"})).json()["events"]
            await client.post("/v1/admin/reset")
            newest = (await client.get("/v1/events", params={"limit": 1})).json()["events"]
            older = (await client.get("/v1/events", params={
                "before": newest[0]["seq"], "kind": "collapse"})).json()["events"]
            resets = metric(app, "adaptd_adapter_resets_total", reason="collapse")
            counted = metric(app, "adaptd_events_total", kind="collapse", source="guard",
                             action="adapter_reset")
            return listed, newest, older, resets, counted

    listed, newest, older, resets, counted = asyncio.run(scenario())
    assert listed, "the collapsing adapter was never reset"
    for event in listed:
        assert (event["kind"], event["source"], event["action"]) == (
            "collapse", "guard", "adapter_reset")
        assert event["detail"]["effective_classes"] < event["detail"]["threshold"]
    assert [e["seq"] for e in listed] == sorted((e["seq"] for e in listed), reverse=True)
    assert resets == counted == len(listed)
    assert [e["kind"] for e in newest] == ["reset"] and newest[0]["source"] == "operator"
    assert older == listed


def test_the_guard_stays_quiet_on_a_diverse_stream():
    _, _, x_test, _ = digits_split()
    settings = {"adapter": {"name": "tent", "adapt_batch_size": 16, "collapse_window": 64}}

    async def scenario():
        async with serving(**settings) as (client, app):
            for start in range(0, 256, 32):
                await client.post("/v1/predict", json={"inputs": x_test[start:start + 32].tolist()})
            return (await client.get("/v1/events")).json(), (await client.get("/v1/state")).json()

    events, state = asyncio.run(scenario())
    assert events == {"events": []}
    assert state["adapter"]["steps"] == 8  # a batch of 32 is one step on itself
    assert state["adapter"]["guard"]["effective_classes"] > 8
