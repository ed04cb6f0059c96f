"""Labels join their predictions once; the join and the rolling error show in metrics and state."""

from __future__ import annotations

import asyncio

from service.demo import digits_split
from tests.harness import metric, serving


def test_labels_join_once_and_the_rolling_error_shows_in_metrics_and_state():
    _, _, x_test, y_test = digits_split()
    samples, labels = x_test[:20], y_test[:20]

    async def scenario():
        async with serving() as (client, app):
            predicted = await client.post(
                "/v1/predict",
                json={"inputs": samples.tolist(), "ids": [f"d{i}" for i in range(20)]},
            )
            predictions = [row["prediction"] for row in predicted.json()["predictions"]]
            # the first ten true labels, and ten deliberately wrong ones
            sent = [int(labels[i]) if i < 10 else (predictions[i] + 1) % 10 for i in range(20)]
            first = await client.post("/v1/feedback", json={"labels": [
                {"id": f"d{i}", "label": sent[i]} for i in range(20)]})
            state_after_first = (await client.get("/v1/state")).json()
            metrics_after_first = (await client.get("/metrics")).text
            again = await client.post("/v1/feedback", json={"labels": [
                {"id": "d3", "label": (predictions[3] + 1) % 10}, {"id": "nobody", "label": 1}]})
            state_after_again = (await client.get("/v1/state")).json()
            joined = metric(app, "adaptd_labels_total", outcome="joined")
            duplicate = metric(app, "adaptd_labels_total", outcome="duplicate")
            unknown = metric(app, "adaptd_labels_total", outcome="unknown")
            return (predictions, sent, first.json(), state_after_first, metrics_after_first,
                    again.json(), state_after_again, joined, duplicate, unknown)

    (predictions, sent, first, state1, metrics_text, again, state2, joined, duplicate,
     unknown) = asyncio.run(scenario())
    expected_error = sum(p != s for p, s in zip(predictions, sent, strict=True)) / 20
    assert first == {"joined": 20, "unknown": [], "duplicate": [], "expired": [], "rejected": []}
    assert state1["quality"]["labels"] == 20
    assert abs(state1["quality"]["rolling_error"] - expected_error) < 1e-9
    assert f"adaptd_rolling_error {expected_error}" in metrics_text
    assert 'adaptd_labels_total{outcome="joined"} 20.0' in metrics_text
    # the second label for d3 is a duplicate and changes nothing
    assert again == {"joined": 0, "unknown": ["nobody"], "duplicate": ["d3"], "expired": [],
                     "rejected": []}
    assert state2["quality"] == state1["quality"]
    assert (joined, duplicate, unknown) == (20, 1, 1)


def test_a_label_for_an_expired_prediction_is_reported_as_expired():
    _, _, x_test, _ = digits_split()

    async def scenario():
        async with serving(store={"record_ttl_s": 0.2}) as (client, app):
            await client.post("/v1/predict", json={"inputs": x_test[:1].tolist(), "ids": ["old"]})
            await asyncio.sleep(0.4)
            reply = await client.post("/v1/feedback", json={"labels": [{"id": "old", "label": 1}]})
            return reply.json(), metric(app, "adaptd_labels_total", outcome="expired")

    reply, expired = asyncio.run(scenario())
    assert reply == {"joined": 0, "unknown": [], "duplicate": [], "expired": ["old"],
                     "rejected": []}
    assert expired == 1


def test_a_regression_model_predicts_values_and_its_labels_give_a_rolling_mean_absolute_error():
    import numpy as np
    import torch

    from tests.models import regressor

    settings = {"model": {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
                          "input_shape": [3], "num_classes": None}}
    inputs = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    with torch.inference_mode():
        expected = regressor()(torch.from_numpy(inputs))[:, 0].numpy()
    observed = [1.0, -1.0, 0.5, 2.0]

    async def scenario():
        async with serving(**settings) as (client, app):
            predicted = (await client.post("/v1/predict", json={
                "inputs": inputs.tolist(), "ids": ["a", "b", "c", "d"]})).json()
            joined = (await client.post("/v1/feedback", json={"labels": [
                {"id": i, "label": y} for i, y in zip("abcd", observed, strict=True)]})).json()
            state = (await client.get("/v1/state")).json()
            return predicted, joined, state

    predicted, joined, state = asyncio.run(scenario())
    rows = predicted["predictions"]
    assert [r["probabilities"] for r in rows] == [None] * 4
    np.testing.assert_allclose([r["prediction"] for r in rows], expected, atol=1e-6)
    assert joined["joined"] == 4
    assert state["model"]["task"] == "regression" and state["model"]["classes"] is None
    expected_mae = float(np.mean(np.abs(np.float32(expected) - np.array(observed))))
    assert abs(state["quality"]["rolling_error"] - expected_mae) < 1e-5


def test_the_openapi_schema_describes_every_route():
    async def scenario():
        async with serving() as (client, _):
            return (await client.get("/openapi.json")).json()

    schema = asyncio.run(scenario())
    assert {"/v1/predict", "/v1/feedback", "/v1/state", "/healthz", "/readyz", "/metrics",
            "/v1/admin/reset", "/v1/admin/checkpoint"} <= set(schema["paths"])
    assert "Tensor" in schema["components"]["schemas"]
    # every route that predicts says it may answer Adaptd-Recorded: false
    for path in ("/v1/predict", "/v2/models/{model_name}/infer",
                 "/v2/models/{model_name}/versions/{model_version}/infer"):
        assert "Adaptd-Recorded" in schema["paths"][path]["post"]["responses"]["200"]["headers"]


def test_a_record_keeps_its_features_only_where_a_label_will_learn_from_them() -> None:
    _, _, x_test, _ = digits_split()

    async def stored(**settings) -> object:
        async with serving(**settings) as (client, app):
            await client.post("/v1/predict", json={"inputs": x_test[:2].tolist(),
                                                   "ids": ["f0", "f1"]})
            return app.state.runtime.store.raw.get_prediction("f0").features

    assert asyncio.run(stored()) is None  # nothing learns from features: none kept
    kept = asyncio.run(stored(error_memory={"kind": "exact"}))
    assert kept is not None and kept.shape == (64,)
