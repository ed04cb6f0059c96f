"""Faults around labels and the store: a label whose prediction cannot be used is rejected and
never blocks the others; a label consumer that crashes is logged, counted and restarted; a Redis
that is full or gone is an outage (503, not ready, counted) whose client messages quote nothing of
Redis; and a stop whose steps fail still writes the checkpoint.

Everything runs against the real app and a real redis-server (the session's, or one of the
test's own where the test stops it)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import replace

import numpy as np
import pytest
import redis
from harness import metric, serving, settings_for
from redis_server import RedisServer

from service.demo import digits_split
from store.keys import Keys
from store.redis import RedisStore

_, _, X_TEST, Y_TEST = digits_split()
NDJSON = {"content-type": "application/x-ndjson"}
# what a client-facing message must never carry: Redis's own words, or where Redis is
REDIS_WORDS = ("OOM", "maxmemory", "WRONGTYPE", "127.0.0.1", "redis://", "Error 111")


def ndjson(items: list[dict]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def labels_for(ids: list[str], offset: int = 0) -> list[dict]:
    return [{"id": i, "label": int(Y_TEST[offset + n])} for n, i in enumerate(ids)]


async def _until(condition, timeout_s: float = 20.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _store_settings(backend: str, request: pytest.FixtureRequest) -> dict:
    if backend == "memory":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"url": server.url, "namespace": f"faults-{uuid.uuid4().hex[:8]}"}


# --- a label whose effects cannot be computed -----------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_labels_for_records_with_non_finite_outputs_or_features_are_rejected_and_the_rest_join(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Records written before non-finite outputs were refused at prediction time: their labels
    answer `rejected` (200), every time, and the labels sent with them are joined."""
    settings = settings_for(store=_store_settings(backend, request),
                            error_memory={"kind": "exact"})
    ids = [f"g{i}" for i in range(6)]

    async def scenario():
        async with serving(settings) as (client, app):
            runtime = app.state.runtime
            await client.post("/v1/predict", json={"inputs": X_TEST[:6].tolist(), "ids": ids})
            template = runtime.store.raw.get_prediction("g0")
            runtime.store.raw.put_predictions([
                replace(template, id="nan-out", outputs=np.full_like(template.outputs, np.nan)),
                replace(template, id="inf-feat",
                        features=np.full_like(template.features, np.inf)),
                replace(template, id="nan-bulk", outputs=np.full_like(template.outputs, np.nan)),
            ])
            one = await client.post("/v1/feedback", json={"labels": [
                *labels_for(ids[:3]), {"id": "nan-out", "label": 3},
                {"id": "inf-feat", "label": 1}]})
            retry = await client.post("/v1/feedback", json={"labels": [
                {"id": "nan-out", "label": 3}]})
            bulk = await client.post("/v1/feedback/bulk", headers=NDJSON, content=ndjson(
                [*labels_for(ids[3:], 3), {"id": "nan-bulk", "label": 2}]))
            conformal = runtime.conformal
            return (one, retry, bulk,
                    {o: metric(app, "adaptd_labels_total", outcome=o)
                     for o in ("joined", "rejected", "duplicate")},
                    runtime.quality.count, runtime.quality.value,
                    len(runtime.engine.error_memory), conformal.steps, conformal.threshold,
                    [runtime.store.raw.get_prediction(i).label
                     for i in ("nan-out", "inf-feat", "nan-bulk")])

    (one, retry, bulk, counts, quality_labels, rolling_error, rows, calibrator_steps, threshold,
     stored_labels) = asyncio.run(scenario())
    assert one.status_code == 200
    assert one.json() == {"joined": 3, "unknown": [], "duplicate": [], "expired": [],
                          "rejected": ["nan-out", "inf-feat"]}
    # a retry is rejected again, not a 500 and not a duplicate: the record stayed unlabelled
    assert retry.status_code == 200 and retry.json()["rejected"] == ["nan-out"]
    assert retry.json()["joined"] == 0
    assert bulk.status_code == 200
    assert bulk.json() == {"labels": 4, "joined": 3, "unknown": 0, "duplicate": 0, "expired": 0,
                           "rejected": 1, "examples": {"rejected": ["nan-bulk"]}}
    assert counts == {"joined": 6.0, "rejected": 4.0, "duplicate": 0.0}
    # only the six good labels reached the rolling error, the error memory and the calibrator
    assert quality_labels == 6 and math.isfinite(rolling_error)
    assert rows == 6
    assert calibrator_steps == 6 and math.isfinite(threshold)
    assert stored_labels == [None, None, None]


def test_a_record_whose_error_memory_row_cannot_be_computed_is_rejected_alone() -> None:
    """Features of another width make the error memory's row impossible for that one record:
    it is rejected, the batch it came in is joined."""
    settings = settings_for(error_memory={"kind": "exact"})

    async def scenario():
        async with serving(settings) as (client, app):
            runtime = app.state.runtime
            await client.post("/v1/predict", json={"inputs": X_TEST[:3].tolist(),
                                                   "ids": ["w0", "w1", "w2"]})
            template = runtime.store.raw.get_prediction("w0")
            runtime.store.raw.put_predictions([
                replace(template, id="narrow", features=template.features[:3].copy())])
            reply = await client.post("/v1/feedback", json={"labels": [
                *labels_for(["w0", "w1"]), {"id": "narrow", "label": 1},
                *labels_for(["w2"], 2)]})
            return reply, len(runtime.engine.error_memory)

    reply, rows = asyncio.run(scenario())
    assert reply.status_code == 200
    assert reply.json()["joined"] == 3 and reply.json()["rejected"] == ["narrow"]
    assert rows == 3


# --- the label stream: rejected entries and a consumer that crashes ------------------------------


def _stream_settings(redis_server: RedisServer, namespace: str):
    return settings_for(store={"url": redis_server.url, "namespace": namespace},
                        error_memory={"kind": "exact"},
                        feedback={"stream": True, "stream_block_ms": 100})


def _publish(client: redis.Redis, keys: Keys, entries: list[dict]) -> None:
    """All at once (one transaction), so the consumer reads them as one batch."""
    with client.pipeline(transaction=True) as pipe:
        for entry in entries:
            pipe.xadd(keys.labels(), {k: str(v) for k, v in entry.items()})
        pipe.execute()


def test_a_rejected_stream_label_is_dead_lettered_with_its_reason_and_the_rest_join(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    namespace = uuid.uuid4().hex
    keys = Keys(namespace)
    ids = [f"s{i}" for i in range(10)]

    async def scenario():
        async with serving(_stream_settings(redis_server, namespace)) as (client, app):
            runtime = app.state.runtime
            await client.post("/v1/predict", json={"inputs": X_TEST[:10].tolist(), "ids": ids})
            template = runtime.store.raw.get_prediction("s0")
            runtime.store.raw.put_predictions([
                replace(template, id="s-nan", outputs=np.full_like(template.outputs, np.nan))])
            _publish(redis_client, keys, [*labels_for(ids[:5]), {"id": "s-nan", "label": 4},
                                          *labels_for(ids[5:], 5)])
            await _until(lambda: metric(app, "adaptd_labels_total", outcome="joined") >= 10
                         and metric(app, "adaptd_label_stream_entries_total", outcome="dead") >= 1,
                         what="the stream to be consumed")
            ready = await client.get("/readyz")
            return (ready, runtime.stream.running,
                    {o: metric(app, "adaptd_label_stream_entries_total", outcome=o)
                     for o in ("acked", "dead")},
                    metric(app, "adaptd_labels_total", outcome="rejected"),
                    metric(app, "adaptd_label_stream_crashes_total"),
                    runtime.store.raw.get_prediction("s-nan").label)

    ready, running, entries, rejected, crashes, label = asyncio.run(scenario())
    assert entries == {"acked": 10.0, "dead": 1.0} and rejected == 1.0 and crashes == 0.0
    assert running is True and ready.status_code == 200
    assert ready.json()["checks"] == {"model": True, "store": True, "label_stream": True}
    assert label is None
    (_, fields), = redis_client.xrange(keys.dead_labels())
    assert fields[b"id"] == b"s-nan" and fields[b"label"] == b"4"
    assert fields[b"reason"] == (b"label for prediction s-nan rejected: its stored outputs are "
                                 b"not finite")
    assert redis_client.xlen(keys.labels()) == 0
    assert all(redis_client.hexists(keys.record(i), "label") for i in ids)


def test_a_consumer_that_crashes_is_logged_counted_restarted_and_not_ready_meanwhile(
    redis_server: RedisServer, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A record whose stored `extra` carries a set that is not a list (a hand-written or foreign
    record) makes scoring its coverage raise TypeError after its join committed: the consumer
    dies of it once. It is logged with its traceback, counted, /readyz is 503 while it restarts,
    then the redelivered entries come back as duplicates and the stream goes on."""
    namespace = uuid.uuid4().hex
    keys = Keys(namespace)
    ids = [f"c{i}" for i in range(12)]
    caplog.set_level(logging.INFO, logger="adaptd.labels")

    async def scenario():
        async with serving(_stream_settings(redis_server, namespace)) as (client, app):
            runtime = app.state.runtime
            await client.post("/v1/predict", json={"inputs": X_TEST[:12].tolist(), "ids": ids})
            template = runtime.store.raw.get_prediction("c0")
            runtime.store.raw.put_predictions([
                replace(template, id="c-odd", extra={**template.extra, "set": 3})])
            _publish(redis_client, keys, [{"id": "c-odd", "label": 3}, *labels_for(ids[:6])])
            await _until(lambda: metric(app, "adaptd_label_stream_crashes_total") >= 1,
                         what="the consumer to crash")
            meanwhile = await client.get("/readyz")
            await _until(lambda: runtime.stream.running, what="the consumer to run again")
            after = await client.get("/readyz")
            _publish(redis_client, keys, labels_for(ids[6:], 6))  # it goes on consuming
            await _until(lambda: metric(app, "adaptd_labels_total", outcome="joined") >= 13,
                         what="the later labels to join")
            await _until(lambda: redis_client.xlen(keys.labels()) == 0, what="the acks")
            return (meanwhile, after, metric(app, "adaptd_label_stream_crashes_total"),
                    metric(app, "adaptd_labels_total", outcome="joined"),
                    metric(app, "adaptd_labels_total", outcome="duplicate"))

    meanwhile, after, crashes, joined, duplicate = asyncio.run(scenario())
    assert meanwhile.status_code == 503
    assert meanwhile.json()["checks"] == {"model": True, "store": True, "label_stream": False}
    assert "consumer crashed (TypeError)" in meanwhile.json()["reason"]
    assert after.status_code == 200 and after.json()["checks"]["label_stream"] is True
    assert crashes == 1.0
    # the first batch committed before the crash; redelivered, its seven labels are duplicates
    assert joined == 13.0 and duplicate == 7.0
    crashed = [r for r in caplog.records if r.name == "adaptd.labels" and r.levelname == "ERROR"]
    assert len(crashed) == 1 and "crashed" in crashed[0].getMessage()
    assert crashed[0].exc_info is not None and crashed[0].exc_info[0] is TypeError
    assert redis_client.xpending(keys.labels(), "adaptd")["pending"] == 0
    assert all(redis_client.hexists(keys.record(i), "label") for i in ids)


# --- Redis answers, but with errors: a full Redis is an outage -----------------------------------


def test_a_full_redis_is_an_outage_predictions_go_on_labels_answer_503_and_it_recovers(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """maxmemory with noeviction, filled under the test's own namespace: writes are refused with
    OOM. Predictions stay 200, labels 503 without Redis's words, /readyz 503 saying the store is
    full, the failures counted; once memory is freed it is all back without a restart."""
    namespace = f"full-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    settings = settings_for(store={"url": redis_server.url, "namespace": namespace})
    saved = {name: redis_client.config_get(name)[name]
             for name in ("maxmemory", "maxmemory-policy")}
    fillers: list[str] = []

    def used() -> int:
        return int(redis_client.info("memory")["used_memory"])

    def fill() -> None:
        redis_client.config_set("maxmemory-policy", "noeviction")
        redis_client.config_set("maxmemory", used() + 2 * 1024 * 1024)
        for i in range(1000):
            try:
                redis_client.set(f"{keys.prefix}filler:{i}", b"x" * 100_000)
            except redis.exceptions.OutOfMemoryError:
                break
            fillers.append(f"{keys.prefix}filler:{i}")
        else:
            raise AssertionError("Redis never filled up")
        # the refused write's own buffer is freed after it, which can bring Redis back under
        # its limit by a few KB: stay 1 MB over it (the fillers hold 2 MB, so freeing them is
        # enough to get under again)
        redis_client.config_set("maxmemory", used() - 1024 * 1024)

    async def scenario():
        async with serving(settings) as (client, app):
            before = await client.post("/v1/predict", json={"inputs": X_TEST[:2].tolist(),
                                                            "ids": ["before-0", "before-1"]})
            fill()
            predicted = await client.post("/v1/predict", json={"inputs": X_TEST[2:4].tolist(),
                                                               "ids": ["lost-0", "lost-1"]})
            inferred = await client.post("/v2/models/digits-cnn/infer", json={"inputs": [{
                "name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32",
                "data": X_TEST[4].ravel().tolist()}]})
            labelled = await client.post("/v1/feedback", json={"labels": labels_for(
                ["before-0"])})
            bulk = await client.post("/v1/feedback/bulk", headers=NDJSON,
                                     content=ndjson(labels_for(["before-1"], 1)))
            saved_checkpoint = await client.post("/v1/admin/checkpoint")
            not_ready = await client.get("/readyz")
            up, errors = metric(app, "adaptd_store_up"), sum(
                metric(app, "adaptd_store_errors_total", op=op)
                for op in ("put_predictions", "join_labels", "save_adapter"))
            redis_client.delete(*fillers)
            ready = await client.get("/readyz")
            up_again = metric(app, "adaptd_store_up")
            joined = await client.post("/v1/feedback", json={"labels": [
                *labels_for(["before-0"]), {"id": "lost-0", "label": 1}]})
            return (before, predicted, inferred, labelled, bulk, saved_checkpoint, not_ready, up,
                    errors, ready, up_again, joined)

    try:
        (before, predicted, inferred, labelled, bulk, saved_checkpoint, not_ready, up, errors,
         ready, up_again, joined) = asyncio.run(scenario())
    finally:
        if fillers:
            redis_client.delete(*fillers)
        for name, value in saved.items():
            redis_client.config_set(name, value)

    assert predicted.status_code == 200 and len(predicted.json()["predictions"]) == 2
    # the answers say that their records were not kept, so that their labels will be unknown
    assert predicted.headers.get("adaptd-recorded") == "false"
    assert inferred.status_code == 200 and inferred.headers.get("adaptd-recorded") == "false"
    assert "adaptd-recorded" not in before.headers
    for reply in (labelled, bulk, saved_checkpoint):
        assert reply.status_code == 503, reply.text
        detail = reply.json()["detail"]
        assert detail.startswith("the store is unavailable; ")
        assert not any(word in detail for word in REDIS_WORDS), detail
    assert "send the labels again" in labelled.json()["detail"]
    assert not_ready.status_code == 503
    assert not_ready.json() == {"status": "not ready", "checks": {"model": True, "store": False},
                                "reason": "the store is full and refuses writes"}
    assert up == 0.0 and errors >= 3
    assert ready.status_code == 200 and up_again == 1.0
    # the record written before Redis filled up joins now; the one made while it was full was
    # never stored, so its label is unknown
    assert joined.json() == {"joined": 1, "unknown": ["lost-0"], "duplicate": [], "expired": [],
                             "rejected": []}


def test_while_redis_is_down_every_503_says_the_store_is_unavailable_and_never_where_it_is() -> (
    None
):
    with RedisServer() as server:
        settings = settings_for(store={"url": server.url, "namespace": "gone"},
                                error_memory={"kind": "exact"})

        async def scenario():
            async with serving(settings) as (client, _):
                server.stop()
                return {
                    "feedback": await client.post("/v1/feedback", json={"labels": [
                        {"id": "a", "label": 1}]}),
                    "bulk": await client.post("/v1/feedback/bulk", headers=NDJSON,
                                              content=b'{"id": "a", "label": 1}\n'),
                    "events": await client.get("/v1/events", params={"scope": "deployment"}),
                    "checkpoint": await client.post("/v1/admin/checkpoint"),
                    "reset": await client.post("/v1/admin/reset"),
                }

        replies = asyncio.run(scenario())
    for route, reply in replies.items():
        assert reply.status_code == 503, route
        detail = reply.json()["detail"]
        assert detail.startswith("the store is unavailable; "), (route, detail)
        assert not any(word in detail for word in REDIS_WORDS), (route, detail)
    assert "scope=replica" in replies["events"].json()["detail"]
    assert "the adapter was reset" in replies["reset"].json()["detail"]


def test_before_with_scope_deployment_is_a_422_shaped_like_every_validation_error() -> None:
    async def scenario():
        async with serving() as (client, _):
            reply = await client.get("/v1/events", params={"scope": "deployment", "before": 3})
            schema = (await client.get("/openapi.json")).json()
            return reply, schema

    reply, schema = asyncio.run(scenario())
    assert reply.status_code == 422
    (error,) = reply.json()["errors"]
    assert error["loc"] == ["query", "before"] and error["type"] == "value_error"
    assert "scope=deployment" in error["msg"]
    assert reply.json()["detail"].startswith("the request does not fit the schema: query.before: ")
    declared = schema["paths"]["/v1/events"]["get"]["responses"]["422"]
    assert declared["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")


# --- a stop whose steps fail --------------------------------------------------------------------


def test_a_stop_whose_step_fails_still_writes_the_checkpoint_and_closes_the_store(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = f"stop-{uuid.uuid4().hex[:8]}"
    settings = settings_for(store={"url": redis_server.url, "namespace": namespace},
                            adapter={"name": "tent", "adapt_batch_size": 16})
    caplog.set_level(logging.ERROR, logger="adaptd")
    closed: list[bool] = []

    async def scenario():
        async with serving(settings) as (client, app):
            runtime = app.state.runtime
            await client.post("/v1/predict", json={"inputs": X_TEST[:16].tolist()})
            steps = runtime.adapter.steps
            real_stop, real_close = runtime.batcher.stop, runtime.store.raw.close

            async def stop_then_fail() -> None:
                await real_stop()
                raise RuntimeError("the batcher's worker would not stop")

            def close() -> None:
                closed.append(True)
                real_close()

            runtime.batcher.stop = stop_then_fail
            runtime.store.raw.close = close
        return steps

    steps = asyncio.run(scenario())
    assert steps == 1  # something learned, so the stop saves a checkpoint
    reader = RedisStore(redis_server.url, namespace, record_ttl_s=60)
    try:
        latest = reader.load_adapter()
    finally:
        reader.close()
    assert latest is not None and latest[0] == 1
    assert closed == [True]  # the steps after the checkpoint ran too
    failed = [r for r in caplog.records if "could not stop the batcher" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info[0] is RuntimeError
