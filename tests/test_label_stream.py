"""Labels in bulk: newline-delimited JSON over HTTP, and the Redis Stream consumed by a group,
exactly once even when the consumer is killed mid-way."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.request
import uuid

import numpy as np
import pytest
import redis
from harness import metric, serving, settings_for, start_service, wait_ready
from redis_server import RedisServer, free_port

from service.demo import digits_split
from store.keys import Keys
from store.redis import RedisStore

NDJSON = {"content-type": "application/x-ndjson"}


def ndjson(items: list[dict]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


# --- POST /v1/feedback/bulk ---------------------------------------------------------------------


def test_a_bulk_back_fill_joins_every_line_once_and_reports_the_rest() -> None:
    _, _, x_test, y_test = digits_split()
    ids = [f"bulk-{i}" for i in range(100)]
    lines = [{"id": i, "label": int(y)} for i, y in zip(ids, y_test[:100], strict=True)]
    lines += [{"id": "bulk-3", "label": 1}, {"id": "never-made", "label": 2}]

    async def scenario():
        async with serving(error_memory={"kind": "exact"}) as (client, app):
            await client.post("/v1/predict", json={"inputs": x_test[:100].tolist(), "ids": ids})
            first = await client.post("/v1/feedback/bulk", content=ndjson(lines), headers=NDJSON)
            again = await client.post("/v1/feedback/bulk", content=ndjson(lines[:10]),
                                      headers=NDJSON)
            return (first.status_code, first.json(), again.json(),
                    len(app.state.runtime.engine.error_memory),
                    metric(app, "adaptd_labels_total", outcome="joined"))

    status, first, again, memory_rows, joined = asyncio.run(scenario())
    assert status == 200
    assert first == {"labels": 102, "joined": 100, "unknown": 1, "duplicate": 1, "expired": 0,
                     "rejected": 0,
                     "examples": {"unknown": ["never-made"], "duplicate": ["bulk-3"]}}
    assert again["duplicate"] == 10 and again["joined"] == 0
    assert memory_rows == 100 and joined == 100.0


@pytest.mark.parametrize(("body", "message"), [
    (b'{"id": "a", "label": 1}\n{"id": "b", "label": 12}\n', "line 2: label is 12"),
    (b'{"id": "a", "label": 1}\nnot json\n', "line 2 is not JSON"),
    (b'{"id": "a", "label": 1}\n\n{"id": "b"}\n', "line 3: label"),
    (b'{"id": "a", "label": "1"}\n', "line 1: label"),
    (b'{"id": "a b", "label": 1}\n', "line 1: id"),
    (b'[1, 2]\n', "line 1"),
    (b"\n\n", "no labels"),
])
def test_a_bad_line_rejects_the_whole_body_and_applies_nothing(body: bytes, message: str) -> None:
    _, _, x_test, _ = digits_split()

    async def scenario():
        async with serving() as (client, app):
            await client.post("/v1/predict", json={"inputs": x_test[:2].tolist(),
                                                   "ids": ["a", "b"]})
            reply = await client.post("/v1/feedback/bulk", content=body, headers=NDJSON)
            return reply, app.state.runtime.store.raw.get_prediction("a").label

    reply, label = asyncio.run(scenario())
    assert reply.status_code == 422 and message in reply.json()["detail"]
    assert label is None


def test_bulk_needs_ndjson_and_respects_the_body_limit() -> None:
    async def scenario():
        async with serving(max_body_bytes=1000) as (client, _):
            as_json = await client.post("/v1/feedback/bulk", json={"labels": []})
            big = ndjson([{"id": f"x{i}", "label": 1} for i in range(100)])
            too_big = await client.post("/v1/feedback/bulk", content=big, headers=NDJSON)
            return as_json.status_code, too_big.status_code

    assert asyncio.run(scenario()) == (415, 413)


# --- the Redis Stream ---------------------------------------------------------------------------


def _stream_settings(redis_server: RedisServer, namespace: str, **feedback):
    return settings_for(store={"url": redis_server.url, "namespace": namespace},
                        error_memory={"kind": "exact", "capacity": 20_000},
                        feedback={"stream": True, "stream_block_ms": 100, **feedback})


async def _until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the label stream")
        await asyncio.sleep(0.05)


def test_the_stream_applies_labels_dead_letters_malformed_entries_and_empties(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    _, _, x_test, y_test = digits_split()
    namespace = uuid.uuid4().hex
    keys = Keys(namespace)
    ids = [f"s-{i}" for i in range(50)]

    async def scenario():
        async with serving(_stream_settings(redis_server, namespace)) as (client, app):
            await client.post("/v1/predict", json={"inputs": x_test[:50].tolist(), "ids": ids})
            for i, y in zip(ids, y_test[:50], strict=True):
                redis_client.xadd(keys.labels(), {"id": i, "label": str(int(y))})
            redis_client.xadd(keys.labels(), {"id": "s-0", "label": "4"})  # a duplicate
            redis_client.xadd(keys.labels(), {"id": "s-1"})  # no label
            redis_client.xadd(keys.labels(), {"id": "s-2", "label": "eleven"})
            redis_client.xadd(keys.labels(), {"id": "s-3", "label": "10"})  # no such class
            runtime = app.state.runtime
            await _until(lambda: metric(app, "adaptd_label_stream_entries_total",
                                        outcome="acked") + metric(
                app, "adaptd_label_stream_entries_total", outcome="dead") >= 54)
            return (metric(app, "adaptd_labels_total", outcome="joined"),
                    metric(app, "adaptd_labels_total", outcome="duplicate"),
                    metric(app, "adaptd_label_stream_backlog"),
                    len(runtime.engine.error_memory),
                    runtime.store.raw.get_prediction("s-0").label)

    joined, duplicate, backlog, rows, label = asyncio.run(scenario())
    assert (joined, duplicate, backlog, rows) == (50.0, 1.0, 0.0, 50)
    assert label == float(y_test[0])
    dead = redis_client.xrange(keys.dead_labels())
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert len(dead) == 3
    assert "no 'label' field" in reasons[0] and "not a number" in reasons[1]
    assert "class index" in reasons[2]
    assert redis_client.xlen(keys.labels()) == 0


def test_entries_a_dead_consumer_held_are_claimed_and_applied(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    _, _, x_test, y_test = digits_split()
    namespace = uuid.uuid4().hex
    keys = Keys(namespace)
    ids = [f"c-{i}" for i in range(20)]
    settings = _stream_settings(redis_server, namespace, stream_claim_idle_ms=200)

    async def scenario():
        async with serving(settings) as (client, app):
            await client.post("/v1/predict", json={"inputs": x_test[:20].tolist(), "ids": ids})
            await app.state.runtime.stream.stop()  # this replica steps aside for the set-up
            for i, y in zip(ids, y_test[:20], strict=True):
                redis_client.xadd(keys.labels(), {"id": i, "label": str(int(y))})
            # a consumer that reads and dies before acknowledging
            redis_client.xreadgroup("adaptd", "ghost", {keys.labels(): ">"}, count=100)
            app.state.runtime.stream.start()
            await _until(lambda: metric(app, "adaptd_labels_total", outcome="joined") >= 20)
            await asyncio.sleep(0.3)
            return [metric(app, "adaptd_label_stream_entries_total", outcome=outcome)
                    for outcome in ("claimed", "read")] + [
                metric(app, "adaptd_labels_total", outcome="joined")]

    # the stopped consumer's last blocking read may have taken the first entry for itself
    # (then it is its own pending entry, read again on start); the ghost's are claimed
    claimed, read, joined = asyncio.run(scenario())
    assert claimed >= 19 and claimed + read == 20 and joined == 20
    assert redis_client.xpending(keys.labels(), "adaptd")["pending"] == 0


def test_an_entry_joined_but_never_acknowledged_is_redelivered_and_changes_nothing(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """The crash window: the join and its effects are stored, the acknowledgement is lost."""
    from store import StoreUnavailable

    _, _, x_test, y_test = digits_split()
    namespace = uuid.uuid4().hex
    keys = Keys(namespace)
    ids = [f"a-{i}" for i in range(30)]

    async def scenario():
        async with serving(_stream_settings(redis_server, namespace)) as (client, app):
            runtime = app.state.runtime
            store = runtime.store.raw
            real_ack, failures = store.ack_label_stream, []

            def ack_fails_once(*args, **kwargs):
                if not failures:
                    failures.append(1)
                    raise StoreUnavailable("the reply to XACK was lost")
                return real_ack(*args, **kwargs)

            store.ack_label_stream = ack_fails_once
            runtime.store.first_backoff_s = 0.01
            await client.post("/v1/predict", json={"inputs": x_test[:30].tolist(), "ids": ids})
            for i, y in zip(ids, y_test[:30], strict=True):
                redis_client.xadd(keys.labels(), {"id": i, "label": str(int(y))})
            await _until(lambda: redis_client.xlen(keys.labels()) == 0)
            return (metric(app, "adaptd_labels_total", outcome="joined"),
                    metric(app, "adaptd_labels_total", outcome="duplicate"),
                    len(runtime.engine.error_memory), redis_client.llen(
                        keys.memory("error_memory")))

    joined, duplicate, rows, stored = asyncio.run(scenario())
    assert joined == 30 and rows == 30 and stored == 30
    assert duplicate > 0  # the redelivered entries, each found already joined


def test_the_stream_needs_a_redis_store() -> None:
    with pytest.raises(ValueError, match="needs a redis store|redis URL"):
        settings_for(feedback={"stream": True})


# --- exactly once through a kill ----------------------------------------------------------------

TOTAL = 10_000


def _start(redis_url: str, namespace: str, port: int) -> subprocess.Popen:
    return start_service(port, {
        "ADAPTD_STORE__URL": redis_url, "ADAPTD_STORE__NAMESPACE": namespace,
        "ADAPTD_FEEDBACK__STREAM": "true", "ADAPTD_FEEDBACK__STREAM_BATCH": "250",
        "ADAPTD_FEEDBACK__STREAM_CLAIM_IDLE_MS": "1000",
        "ADAPTD_ERROR_MEMORY__KIND": "exact", "ADAPTD_ERROR_MEMORY__CAPACITY": "20000",
        "ADAPTD_BATCHER__MAX_REQUEST_SAMPLES": "1000",
    })


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_ten_thousand_labels_through_a_killed_consumer_are_each_applied_exactly_once(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """Labels stream in while the service consuming them is SIGKILLed and another one starts:
    every distinct id is joined once, and the error memory (written by the joins) holds exactly
    one row per id, though entries were read twice and 500 ids were sent twice on purpose."""
    _, _, x_test, _ = digits_split()
    namespace = uuid.uuid4().hex
    keys = Keys(namespace)
    ids = [f"k-{i}" for i in range(TOTAL)]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, TOTAL)
    memory = keys.memory("error_memory")

    port = free_port()
    first = _start(redis_server.url, namespace, port)
    try:
        wait_ready(port, first)
        for start in range(0, TOTAL, 1000):
            inputs = x_test[np.arange(start, start + 1000) % len(x_test)].tolist()
            body = json.dumps({"inputs": inputs, "ids": ids[start:start + 1000]}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=body,
                                             headers={"content-type": "application/json"})
            urllib.request.urlopen(request, timeout=60).close()
        producer = RedisStore(redis_server.url, namespace, record_ttl_s=3600)
        sent = [(i, float(y)) for i, y in zip(ids, labels, strict=True)]
        sent += sent[:500]  # the producer retried some: duplicates on the stream itself
        producer.publish_labels(sent[:4000])
        _wait(lambda: redis_client.llen(memory) >= 1500, 60, "the first consumer to start")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        producer.publish_labels(sent[4000:])
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = redis_client.llen(memory)
    assert killed_at < TOTAL  # the kill came mid-way

    port = free_port()
    second = _start(redis_server.url, namespace, port)
    try:
        wait_ready(port, second)
        _wait(lambda: redis_client.xlen(keys.labels()) == 0
              and redis_client.xpending(keys.labels(), "adaptd")["pending"] == 0,
              120, "the second consumer to drain the stream")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    producer.close()

    labelled = sum(redis_client.hexists(keys.record(i), "label") for i in ids)
    assert labelled == TOTAL
    packed = redis_client.lrange(memory, 0, -1)
    assert len(packed) == TOTAL
    rows = np.frombuffer(b"".join(packed), np.float32).reshape(TOTAL, -1)
    one_hot = rows[:, -20:-10]  # [features..., label (10), model output (10)]
    np.testing.assert_array_equal(np.bincount(one_hot.argmax(1), minlength=10),
                                  np.bincount(labels, minlength=10))
    stored = [float(redis_client.hget(keys.record(i), "label")) for i in ids[:1000]]
    assert stored == labels[:1000].astype(float).tolist()
