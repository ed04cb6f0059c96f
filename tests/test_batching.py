"""The micro-batcher merges concurrent requests, and every caller gets exactly its own rows."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from service.batcher import MicroBatcher
from service.demo import digits_split
from service.metrics import Metrics
from service.model import load_model
from tests.harness import metric, serving, settings_for
from tests.models import POISON


def test_64_concurrent_single_sample_requests_are_merged_and_each_gets_its_own_prediction():
    # each answer is compared with the source model's: adapter none, which no traffic moves
    settings = settings_for(batcher={"max_batch_size": 64, "max_wait_ms": 100},
                            adapter={"name": "none"})
    _, _, x_test, _ = digits_split()
    samples = x_test[:64]
    reference = load_model(settings.model).module
    with torch.inference_mode():
        expected = reference(torch.from_numpy(samples)).softmax(1).numpy()

    async def scenario():
        async with serving(settings) as (client, app):
            replies = await asyncio.gather(*[
                client.post("/v1/predict", json={"inputs": [s.tolist()], "ids": [f"s{i}"]})
                for i, s in enumerate(samples)
            ])
            return replies, metric(app, "adaptd_batch_size_count"), metric(
                app, "adaptd_batch_size_sum")

    replies, batches, batched_samples = asyncio.run(scenario())
    assert batched_samples == 64
    assert batches <= 4, f"64 concurrent requests ran as {batches} batches"
    for i, reply in enumerate(replies):
        assert reply.status_code == 200
        (row,) = reply.json()["predictions"]
        assert row["id"] == f"s{i}"
        assert row["prediction"] == int(expected[i].argmax())
        np.testing.assert_allclose(row["probabilities"], expected[i], atol=1e-5)


def test_a_poisoned_request_fails_alone_and_the_rest_of_its_batch_succeeds():
    settings = settings_for(
        model={"factory": "tests.models:poisoned", "name": "poisoned", "input_shape": [4],
               "num_classes": 3},
        batcher={"max_batch_size": 64, "max_wait_ms": 100},
        adapter={"name": "none"},  # the answers are compared with the model's own
    )
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(8, 4)).astype(np.float32)
    inputs[5, 2] = POISON

    async def scenario():
        async with serving(settings) as (client, app):
            replies = await asyncio.gather(*[
                client.post("/v1/predict", json={"inputs": [row.tolist()]}) for row in inputs
            ])
            state = app.state.runtime.model.module
            return replies, state, metric(app, "adaptd_batch_size_count"), metric(
                app, "adaptd_prediction_failures_total")

    replies, module, batches, failures = asyncio.run(scenario())
    assert batches == 1, "the eight requests should have formed one batch"
    assert failures == 1
    assert replies[5].status_code == 422
    assert "could not process" in replies[5].json()["detail"]
    with torch.inference_mode():
        healthy = np.delete(inputs, 5, axis=0)
        expected = module.body(torch.from_numpy(healthy)).softmax(1).numpy()
    for reply, probabilities in zip(
        [r for i, r in enumerate(replies) if i != 5], expected, strict=True
    ):
        assert reply.status_code == 200
        np.testing.assert_allclose(reply.json()["predictions"][0]["probabilities"],
                                   probabilities, atol=1e-5)


def test_requests_are_never_split_and_an_oversize_request_runs_as_its_own_batch():
    seen_batches: list[list[str]] = []

    async def run_batch(inputs: np.ndarray, ids: list[str],
                        groups: list[str | None] | None) -> list[float]:
        seen_batches.append(list(ids))
        return [float(v) for v in inputs[:, 0]]

    async def scenario():
        batcher = MicroBatcher(run_batch, run_batch, max_batch_size=4, max_wait_ms=50,
                               metrics=Metrics())
        batcher.start()
        sizes = [3, 3, 6, 1]
        requests = []
        for r, size in enumerate(sizes):
            ids = [f"r{r}-{k}" for k in range(size)]
            inputs = np.array([[r * 10 + k] for k in range(size)], dtype=np.float32)
            requests.append(batcher.submit(inputs, ids))
        results = await asyncio.gather(*requests)
        await batcher.stop()
        return sizes, results

    sizes, results = asyncio.run(scenario())
    for r, (size, rows) in enumerate(zip(sizes, results, strict=True)):
        assert rows == [float(r * 10 + k) for k in range(size)]
    assert [len(b) for b in seen_batches] == [3, 3, 6, 1]
    for batch in seen_batches:
        assert len({i.split("-")[0] for i in batch}) == 1


def test_a_lone_request_runs_at_once_and_one_on_its_way_is_waited_for():
    """The wait pays only when another request is on its way: with none, a request runs without
    waiting `max_wait_ms`; with one admitted (its body being read), the batch waits for it."""
    from service.batcher import MicroBatcher
    from service.metrics import Metrics

    batches: list[list[str]] = []

    async def run_batch(inputs, ids, groups):
        batches.append(list(ids))
        return list(ids)

    async def scenario():
        batcher = MicroBatcher(run_batch, run_batch, max_batch_size=64, max_wait_ms=60_000,
                               metrics=Metrics())
        batcher.start()
        # a wait of max_wait_ms would run past this bound and fail the test
        await asyncio.wait_for(batcher.submit(np.zeros((1, 2), np.float32), ["alone"]), 10)
        with batcher.admit() as reading:  # admitted, body still being read
            first = asyncio.create_task(batcher.submit(np.zeros((1, 2), np.float32), ["first"]))
            await asyncio.sleep(0.2)
            assert not first.done()  # held for the request on its way
            await batcher.submit(np.zeros((1, 2), np.float32), ["second"], reading)
            await first
        await batcher.stop()

    asyncio.run(scenario())
    assert batches == [["alone"], ["first", "second"]]


def test_each_request_of_a_merged_batch_hears_whether_the_store_kept_its_records():
    """The predictor's rows say whether the store took their records (`PredictionRows`); the
    batcher hands each request its slice, which says the same, and the route turns it into the
    `Adaptd-Recorded: false` header (tests/test_label_faults.py, with Redis full)."""
    from service.predictor import RECORDED_HEADER, PredictionRow, PredictionRows, recorded_headers

    def row(sample_id: str) -> PredictionRow:
        return PredictionRow(sample_id, 0, None, None, None, None, "m", 0)

    async def run_batch(inputs: np.ndarray, ids: list[str],
                        groups: list[str | None] | None) -> PredictionRows:
        return PredictionRows((row(i) for i in ids), recorded=False)

    async def scenario():
        batcher = MicroBatcher(run_batch, run_batch, max_batch_size=8, max_wait_ms=50,
                               metrics=Metrics())
        batcher.start()
        results = await asyncio.gather(*[
            batcher.submit(np.zeros((2, 1), np.float32), [f"r{r}-0", f"r{r}-1"])
            for r in range(3)])
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert [[r.id for r in rows] for rows in results] == [
        [f"r{r}-0", f"r{r}-1"] for r in range(3)]
    assert all(isinstance(rows, PredictionRows) and not rows.recorded for rows in results)
    assert all(recorded_headers(rows) == {RECORDED_HEADER: "false"} for rows in results)
    kept = PredictionRows([row("a"), row("b")])
    assert kept[1:].recorded and recorded_headers(kept[:1]) == {} and kept[0].id == "a"
