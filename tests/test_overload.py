"""What a client cannot do to the service any more (issue 13): fill the micro-batcher without
bound, multiply metric series with made-up methods, make /v1/state queue work on the engine per
poll, or get a 400 (or a stalled loop) from a body that is not JSON, too deep or too large a
number. Run in process; `test_served_limits.py` checks the event loop and slow clients against
`adaptd serve`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.batcher import MicroBatcher, Overloaded
from service.demo import digits_split
from service.metrics import Metrics
from service.settings import BatcherSettings
from tests.harness import flood_held_engine, metric, serving, settings_for

_, _, X_TEST, _ = digits_split()
GOOD = X_TEST[0].tolist()
JSON = {"content-type": "application/json"}


# --- admission control in the micro-batcher ------------------------------------------------------

class WatchedBatcher(MicroBatcher[float]):
    """A real batcher that remembers the most samples it ever held queued."""

    most_queued = 0

    def _waiting(self, delta: int) -> None:
        super()._waiting(delta)
        self.most_queued = max(self.most_queued, self.waiting_samples)


def test_a_full_batcher_refuses_at_once_and_never_queues_beyond_its_bound():
    gate = asyncio.Event()
    metrics = Metrics()

    async def run_batch(inputs: np.ndarray, ids: list[str],
                        groups: list[str | None] | None) -> list[float]:
        await gate.wait()  # the model is busy: nothing leaves until the test says so
        return [float(v) for v in inputs[:, 0]]

    def request(batcher: WatchedBatcher, r: int) -> asyncio.Future[list[float]]:
        inputs = np.array([[r * 10 + k] for k in range(3)], dtype=np.float32)
        return asyncio.ensure_future(batcher.submit(inputs, [f"r{r}-{k}" for k in range(3)]))

    async def scenario():
        batcher = WatchedBatcher(run_batch, run_batch, max_batch_size=4, max_wait_ms=0,
                                 metrics=metrics, max_queued_samples=8, max_inflight_requests=100)
        batcher.start()
        first = [request(batcher, r) for r in range(20)]
        await asyncio.sleep(0.05)  # the worker took the oldest request and waits on the model
        second = [request(batcher, r) for r in range(20, 40)]
        await asyncio.sleep(0.05)
        queued_while_blocked = batcher.waiting_samples
        gate.set()
        results = await asyncio.gather(*first, *second, return_exceptions=True)
        await batcher.stop()
        return batcher, queued_while_blocked, results

    batcher, queued_while_blocked, results = asyncio.run(scenario())
    shed = [(r, res) for r, res in enumerate(results) if isinstance(res, Overloaded)]
    accepted = [(r, res) for r, res in enumerate(results) if not isinstance(res, BaseException)]
    assert len(shed) + len(accepted) == 40
    assert shed and accepted
    # three-sample requests under a bound of 8 queued samples: two queue at first, the worker
    # takes one into the running batch, and one more fits in the second wave
    assert len(accepted) == 3 and [r for r, _ in accepted] == [0, 1, 20]
    assert batcher.most_queued <= 8 and queued_while_blocked <= 8
    for r, rows in accepted:
        assert rows == [float(r * 10 + k) for k in range(3)]
    for _, exc in shed:
        assert exc.retry_after_s >= 1 and exc.reason == "queued_samples"
        assert "batcher.max_queued_samples (8)" in str(exc)
    shed_counted = metrics.registry.get_sample_value(
        "adaptd_requests_shed_total", {"reason": "queued_samples"})
    assert shed_counted == len(shed)
    assert batcher.inflight_requests == 0


def test_the_requests_in_flight_are_bounded_too():
    gate = asyncio.Event()

    async def run_batch(inputs: np.ndarray, ids: list[str],
                        groups: list[str | None] | None) -> list[float]:
        await gate.wait()
        return [0.0] * len(ids)

    async def scenario():
        batcher = MicroBatcher(run_batch, run_batch, max_batch_size=64, max_wait_ms=0,
                               metrics=Metrics(), max_queued_samples=1000,
                               max_inflight_requests=3)
        batcher.start()
        one = np.zeros((1, 1), dtype=np.float32)
        tasks = [asyncio.ensure_future(batcher.submit(one, [f"q{i}"])) for i in range(10)]
        await asyncio.sleep(0.05)
        in_flight = batcher.inflight_requests
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return in_flight, results

    in_flight, results = asyncio.run(scenario())
    assert in_flight == 3
    assert [isinstance(r, Overloaded) for r in results] == [False] * 3 + [True] * 7
    assert {r.reason for r in results if isinstance(r, Overloaded)} == {"inflight_requests"}


def test_the_queue_bound_defaults_to_16_batches_and_holds_at_least_one_request():
    assert BatcherSettings().queued_samples_limit == 16 * 64
    assert BatcherSettings(max_batch_size=4).queued_samples_limit == 256  # max_request_samples
    with pytest.raises(ValueError, match="max_queued_samples .100. is below"):
        BatcherSettings(max_queued_samples=100)


def test_concurrent_predictions_beyond_the_bound_get_503_with_retry_after_and_the_rest_their_rows():
    settings = settings_for(batcher={"max_batch_size": 4, "max_wait_ms": 0,
                                     "max_request_samples": 4, "max_queued_samples": 8})
    requests = 30

    async def scenario():
        async with serving(settings) as (client, app):
            runtime = app.state.runtime
            queued: list[int] = []
            done = await flood_held_engine(
                app, lambda r: client.post("/v1/predict", headers=JSON, json={
                    "inputs": [GOOD, GOOD], "ids": [f"r{r}a", f"r{r}b"]}),
                requests, watch=lambda: queued.append(runtime.batcher.waiting_samples))
            return done, queued, metric(app, "adaptd_requests_shed_total",
                                        reason="queued_samples"), runtime.batcher

    replies, queued, shed_counted, batcher = asyncio.run(scenario())
    refused = [r for r in replies if r.status_code == 503]
    served = [(i, r) for i, r in enumerate(replies) if r.status_code == 200]
    assert len(refused) + len(served) == requests
    assert refused and served
    assert shed_counted == len(refused)
    assert max(queued) <= 8
    for reply in refused:
        assert reply.headers["retry-after"] == "1"
        assert "the service is overloaded" in reply.json()["detail"]
        assert set(reply.json()) == {"detail"}  # ErrorResponse, as the schema declares
    for i, reply in served:
        assert [p["id"] for p in reply.json()["predictions"]] == [f"r{i}a", f"r{i}b"]
    assert batcher.inflight_requests == 0 and batcher.waiting_samples == 0


# --- metric labels a client cannot multiply ------------------------------------------------------

def _request_series(app) -> set[tuple[str, str, str]]:
    (family,) = [f for f in app.state.metrics.registry.collect()
                 if f.name == "adaptd_http_requests"]
    return {(s.labels["route"], s.labels["method"], s.labels["status"])
            for s in family.samples if s.name.endswith("_total")}


def test_300_made_up_methods_add_no_metric_series():
    async def scenario():
        async with serving() as (client, app):
            await client.get("/healthz")
            await client.post("/v1/predict", headers=JSON, json={"inputs": [GOOD]})
            await client.request("BREW", "/v1/predict")  # the first one adds its "other" series
            before = _request_series(app)
            replies = [await client.request(f"MADEUP{i}", path)
                       for i in range(300) for path in ("/v1/predict",)]
            for i in range(10):
                replies.append(await client.request(f"X{i}", f"/nowhere/{i}"))
            return before, _request_series(app), replies

    before, after, replies = asyncio.run(scenario())
    assert {r.status_code for r in replies} <= {404, 405}
    new = after - before
    assert {series[0] for series in new} <= {"unmatched"}  # at most one: (unmatched, other, 4xx)
    assert len(new) <= 1
    assert {m for _, m, _ in after} <= {"GET", "POST", "other"}
    assert {s for _, _, s in after} <= {"2xx", "4xx"}
    assert ("/v1/predict", "POST", "2xx") in after and ("/healthz", "GET", "2xx") in after


# --- GET /v1/state is not one engine call per poll -----------------------------------------------

def test_polling_state_reads_the_engine_once_a_second_and_a_write_refreshes_it():
    async def scenario():
        async with serving() as (client, app):
            drift = app.state.runtime.engine.drift
            calls = []
            describe = drift.describe

            def counted() -> list[dict]:
                calls.append(1)
                return describe()

            drift.describe = counted  # the real method, counted
            loop = asyncio.get_running_loop()
            started = loop.time()
            polls = await asyncio.gather(*[client.get("/v1/state") for _ in range(20)])
            polls += [await client.get("/v1/state") for _ in range(20)]
            polling_s = loop.time() - started
            after_polls = len(calls)
            await client.post("/v1/predict", headers=JSON, json={"inputs": [GOOD] * 4})
            after_write = (await client.get("/v1/state")).json()
            after_write_calls = len(calls)
            await asyncio.sleep(1.1)
            await client.get("/v1/state")
            return polls, polling_s, after_polls, after_write, after_write_calls, len(calls)

    polls, polling_s, after_polls, after_write, after_write_calls, later = asyncio.run(scenario())
    assert all(p.status_code == 200 for p in polls)
    # 40 polls: one read of the engine per second of polling at most (they take well under one)
    assert after_polls <= 1 + int(polling_s)
    assert len({p.text for p in polls}) <= after_polls
    after_polls_state = polls[-1].json()
    assert after_write_calls == after_polls + 1  # a prediction was answered: the next is fresh
    assert (after_write["drift_policy"]["samples"]
            == after_polls_state["drift_policy"]["samples"] + 4)
    assert later == after_write_calls + 1  # and a second later, fresh again


# --- bodies that used to stall the loop or get 400 -----------------------------------------------

BODY_CASES = {
    "not UTF-8": (b'{"inputs": [[[0.5]]], "ids": ["\xff"]}', "not valid UTF-8 (byte 0xff"),
    "integer literal too large": (b'{"inputs": [[[' + b"9" * 5000 + b"]]]}",
                                  "beyond the range of a double"),
    "nested too deep": (b'{"inputs": ' + b"[" * 2000 + b"]" * 2000 + b"}",
                        "nested more than 1024 levels deep"),
    "booleans among numbers": (
        ('{"inputs": [[' + ",".join(["[" + ",".join(["0.5"] * 15 + ["true"]) + "]"] * 16)
         + "]]}").encode(), "valid number"),
    "an id ending in a newline": (
        b'{"inputs": [[[' + b",".join([b"0"] * 16) + b"]]], \"ids\": [\"a\\n\"]}",
        "should match pattern"),
    "4M numbers": (b'{"inputs": [[' + b",".join([b"0"] * 4_000_000) + b"]]}",
                   "the body holds 3999999 commas"),
}


@pytest.mark.parametrize("case", sorted(BODY_CASES))
def test_a_body_that_is_not_json_or_too_much_is_a_clear_422(case):
    body, message = BODY_CASES[case]

    async def scenario():
        async with serving() as (client, app):
            reply = await client.post("/v1/predict", content=body, headers=JSON)
            return reply, metric(app, "adaptd_predictions_total")

    reply, predictions = asyncio.run(scenario())
    assert reply.status_code == 422, reply.text
    assert message in reply.text
    assert predictions == 0


def test_the_openapi_schema_still_documents_the_predict_body_and_declares_its_errors():
    async def scenario():
        async with serving() as (client, _):
            return (await client.get("/openapi.json")).json()

    schema = asyncio.run(scenario())
    predict = schema["paths"]["/v1/predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"}
    components = schema["components"]["schemas"]
    assert components["PredictRequest"]["required"] == ["inputs"]
    assert components["PredictRequest"]["properties"]["inputs"]["items"] == {
        "$ref": "#/components/schemas/Tensor"}
    assert "Tensor" in components
    assert {"200", "401", "408", "413", "422", "503"} <= set(predict["responses"])
    assert "Retry-After" in predict["responses"]["503"]["headers"]
    for code in ("401", "408", "413", "422", "503"):
        body = predict["responses"][code]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ErrorResponse"}, code
    error = components["ErrorResponse"]
    assert error["required"] == ["detail"]
    assert error["properties"]["detail"]["type"] == "string"
    assert error["properties"]["errors"]["maxItems"] == 10
    assert "503" in schema["paths"]["/v1/state"]["get"]["responses"]
