"""StateSync: what the engine changed reaches the store in order, and waits while the store is
away instead of being lost."""

from __future__ import annotations

import asyncio

import numpy as np
from harness import serving, settings_for

from service.demo import digits_split
from store import MemoryStore, StoreUnavailable


class Unreachable:
    """A real store that 'goes away' while `down` is set: every call raises like a lost Redis."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str):
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self.down:
                raise StoreUnavailable(f"the store is away ({name})")
            return attribute(*args, **kwargs)

        return call


def test_memory_rows_wait_for_the_store_a_reset_supersedes_them_and_order_is_kept():
    _, _, x_test, _ = digits_split()
    # AdaNPC admits every confident vote into its memory, and its rows live in the store
    settings = settings_for(adapter={"name": "adanpc",
                                     "memory": {"confidence_threshold": 0.0}},
                            error_memory={"kind": "off"})  # AdaNPC's rows alone go to the store

    async def scenario():
        async with serving(settings) as (client, app):
            runtime = app.state.runtime
            store = Unreachable(runtime.store.raw)
            runtime.store.raw = store
            await client.post("/v1/predict", json={"inputs": x_test[:16].tolist()})
            assert len(store.inner.load_memory("adanpc")) == 16
            store.down = True
            await client.post("/v1/predict", json={"inputs": x_test[16:24].tolist()})
            queued_rows = runtime.sync.pending
            reply = await client.post("/v1/admin/reset")
            queued_after_reset = runtime.sync.pending
            store.down = False
            runtime.store._answered()  # the breaker would reopen after its back-off
            flushed = await runtime.sync.flush()
            after_reset = len(store.inner.load_memory("adanpc"))
            await client.post("/v1/predict", json={"inputs": x_test[24:28].tolist()})
            stored = store.inner.load_memory("adanpc")
            held = runtime.engine.adanpc.rows()
            return (queued_rows, reply.status_code, queued_after_reset, flushed, after_reset,
                    stored, held)

    queued_rows, status, queued_after_reset, flushed, after_reset, stored, held = asyncio.run(
        scenario())
    assert queued_rows == 1, "the batch's rows wait for the store, not lost"
    assert status == 503, "the operator is told the store has not followed the reset yet"
    assert queued_after_reset == 1, "the reset supersedes the rows queued before it"
    assert flushed is True
    assert after_reset == 0, "the stored rows were cleared once the store answered"
    assert len(stored) == 4 and (stored == held).all(), "new rows go to the store as before"


def test_stored_rows_of_another_model_are_cleared_at_start_and_never_fail_a_prediction(tmp_path):
    _, _, x_test, _ = digits_split()
    # a snapshot whose adanpc memory holds rows of another width (another model's features)
    other = MemoryStore(namespace="digits-cnn", record_ttl_s=60)
    other.append_memory("adanpc", np.ones((3, 7), dtype=np.float32), cap=10)
    snapshot = tmp_path / "store.snapshot"
    snapshot.write_bytes(other.snapshot())
    settings = settings_for(adapter={"name": "adanpc", "memory": {"confidence_threshold": 0.0}},
                            store={"snapshot_path": str(snapshot)})

    async def scenario():
        async with serving(settings) as (client, app):
            runtime = app.state.runtime
            cleared = len(runtime.store.raw.load_memory("adanpc"))
            # and if such rows appear while serving (another replica's), the change is dropped
            runtime.store.raw.append_memory("adanpc", np.ones((3, 7), dtype=np.float32), cap=10)
            reply = await client.post("/v1/predict", json={"inputs": x_test[:4].tolist()})
            return cleared, reply.status_code, runtime.sync.pending

    cleared, status, pending = asyncio.run(scenario())
    assert cleared == 0, "the other model's rows were cleared at start"
    assert status == 200 and pending == 0
