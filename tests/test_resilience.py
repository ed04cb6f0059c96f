"""What happens around failures: a store that is down is not waited on, labels joined before a
store failure still count, and a shutdown answers every request it was holding."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.batcher import BatcherStopped, MicroBatcher
from service.demo import digits_split
from service.gateway import StoreGateway
from service.metrics import Metrics
from store import JoinResult, MemoryStore, PartialJoin, StoreUnavailable
from store.redis import RedisStore
from tests.harness import metric, serving
from tests.redis_server import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_after_a_failure_the_gateway_fails_fast_until_its_backoff_ends():
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "down", record_ttl_s=60)
    metrics, clock = Metrics(), Clock()
    gateway = StoreGateway(store, metrics, first_backoff_s=1.0, clock=clock)

    async def scenario():
        outcomes = []
        for advance in (0.0, 0.5, 0.6, 0.0):
            clock.now += advance
            started = time.perf_counter()
            with pytest.raises(StoreUnavailable) as error:
                await gateway.join_labels([("a", 1.0)])
            outcomes.append(("not retried" in str(error.value), time.perf_counter() - started))
        return outcomes, await gateway.readiness() is None

    outcomes, pinged = asyncio.run(scenario())
    # tried, skipped inside the back-off, tried again after it (1.1 s), then skipped for 2 s
    assert [skipped for skipped, _ in outcomes] == [False, True, False, True]
    assert all(seconds < 0.01 for skipped, seconds in outcomes if skipped)
    assert metrics.registry.get_sample_value("adaptd_store_errors_total",
                                             {"op": "join_labels"}) == 4
    assert pinged is False and gateway.up is False
    store.close()


class FailsHalfway:
    """A real store whose server 'goes away' after joining half of a batch of labels."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def join_labels(self, labels, effects=None, calibrators=()):
        half = len(labels) // 2
        joined = self.inner.join_labels(labels[:half], effects, calibrators)
        raise PartialJoin("the store went away", joined, [i for i, _ in labels[half:]])


def test_labels_joined_before_a_store_failure_are_applied_and_a_retry_completes_the_rest():
    _, _, x_test, y_test = digits_split()

    async def scenario():
        async with serving() as (client, app):
            runtime = app.state.runtime
            healthy = runtime.store.raw
            await client.post("/v1/predict", json={"inputs": x_test[:8].tolist(),
                                                   "ids": [f"p{i}" for i in range(8)]})
            runtime.store.raw = FailsHalfway(healthy)
            labels = [{"id": f"p{i}", "label": int(y_test[i])} for i in range(8)]
            failed = await client.post("/v1/feedback", json={"labels": labels})
            counted = (await client.get("/v1/state")).json()["quality"]["labels"]
            runtime.store.raw = healthy
            runtime.store._answered()
            retried = await client.post("/v1/feedback", json={"labels": labels})
            joined = metric(app, "adaptd_labels_total", outcome="joined")
            return failed, counted, retried.json(), joined

    failed, counted, retried, joined = asyncio.run(scenario())
    assert failed.status_code == 503
    # what to do, and how far it got; the store's own words go to the log, not to the client
    assert failed.json()["detail"].startswith("the store is unavailable; 4 of the 8 labels")
    assert "went away" not in failed.json()["detail"]
    assert counted == 4, "the four labels joined before the failure were applied"
    assert retried["duplicate"] == ["p0", "p1", "p2", "p3"] and retried["joined"] == 4
    assert joined == 8


def test_stopping_the_batcher_answers_a_request_it_was_still_gathering():
    async def run_batch(inputs: np.ndarray, ids: list[str],
                        groups: list[str | None] | None) -> list[int]:
        return [0] * len(ids)

    async def scenario():
        batcher = MicroBatcher(run_batch, run_batch, max_batch_size=64, max_wait_ms=10_000,
                               metrics=Metrics())
        batcher.start()
        reading = batcher.admit()  # another request on its way: the worker waits for it
        waiting = asyncio.create_task(batcher.submit(np.zeros((1, 2), np.float32), ["a"]))
        await asyncio.sleep(0.05)  # the worker holds it, waiting for more
        await batcher.stop()
        reading.close()
        return await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 1)

    (outcome,) = asyncio.run(scenario())
    assert isinstance(outcome, BatcherStopped)


def test_join_result_of_a_partial_join_is_what_was_joined_before_the_failure():
    store = FailsHalfway(MemoryStore("ns", 60))
    with pytest.raises(PartialJoin) as error:
        store.join_labels([("x", 1.0), ("y", 2.0)])
    assert isinstance(error.value.result, JoinResult)
    assert error.value.result.unknown == ["x"] and error.value.pending == ["y"]


def test_a_failing_state_chore_is_logged_and_the_chores_go_on(caplog):
    async def scenario():
        async with serving() as (client, app):
            runtime = app.state.runtime
            flush = runtime.flush_events
            failures = 0

            async def fails_once() -> None:
                nonlocal failures
                if failures == 0:
                    failures += 1
                    raise RuntimeError("a bad moment")
                await flush()

            runtime.flush_events = fails_once
            runtime.events.record("reset", "operator", "adapter_reset")
            await asyncio.sleep(2.5)  # two turns of the chores, one a second
            stored = runtime.store.raw.load_events(10)
            return runtime._chores.done(), failures, stored

    done, failures, stored = asyncio.run(scenario())
    assert not done and failures == 1
    assert [e["kind"] for e in stored] == ["reset"], "the next turn sent the event"
    assert "could not send events to the store" in caplog.text
