"""The embedded store outlives a restart through its snapshot file: adapter checkpoints (saved on
stop when the adapter learned), memories, the calibrator, drift state and events."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import serving, settings_for
from safetensors.torch import load

from service.demo import digits_split
from store import LabelEffects, MemoryStore, PredictionRecord


def test_a_snapshot_restores_the_lasting_state_and_refuses_another_namespace() -> None:
    store = MemoryStore(namespace="snap", record_ttl_s=60)
    store.save_adapter(b"weights-1")
    store.append_memory("error_memory", np.ones((3, 4), dtype=np.float32), cap=10)
    store.put_predictions([PredictionRecord(id="p-1", created_at=0.0, prediction=1.0,
                                            outputs=np.ones(2, dtype=np.float32))])
    store.join_labels([("p-1", 1)], effects=lambda joined, states: LabelEffects(
        calibrators={"conformal": b"state"}), calibrators=["conformal"])
    store.save_state("drift", b"{}")
    store.append_events([{"kind": "reset"}], cap=10)

    restored = MemoryStore(namespace="snap", record_ttl_s=60)
    restored.restore(store.snapshot())
    assert restored.load_adapter() == (1, b"weights-1")
    assert restored.save_adapter(b"weights-2") == 2  # versions go on from where they were
    np.testing.assert_array_equal(restored.load_memory("error_memory"), np.ones((3, 4)))
    assert restored.load_calibrator("conformal") == b"state"
    assert restored.load_state("drift") == b"{}"
    assert restored.load_events(5) == [{"kind": "reset"}]

    with pytest.raises(ValueError, match="namespace 'snap'"):
        MemoryStore(namespace="other", record_ttl_s=60).restore(store.snapshot())
    with pytest.raises(ValueError, match="not a snapshot"):
        restored.restore(b"{}")
    assert restored.load_calibrator("conformal") == b"state"  # a refused restore changes nothing


def test_the_embedded_service_resumes_from_its_snapshot(tmp_path: Path) -> None:
    _, _, x_test, y_test = digits_split()
    settings = settings_for(store={"snapshot_path": str(tmp_path / "state.json")},
                            adapter={"name": "tent"}, error_memory={"kind": "exact"})

    async def first_life():
        async with serving(settings) as (client, app):
            ids = [f"p{i}" for i in range(128)]
            await client.post("/v1/predict", json={"inputs": x_test[:128].tolist(), "ids": ids})
            await client.post("/v1/feedback", json={"labels": [
                {"id": i, "label": int(y)} for i, y in zip(ids, y_test[:128], strict=True)]})
            await client.post("/v1/admin/reset")  # an event, then learn again
            await client.post("/v1/predict", json={"inputs": x_test[128:256].tolist()})
            state = (await client.get("/v1/state")).json()
            engine = app.state.runtime.engine
            return state, await engine.run(engine.checkpoint)

    async def second_life():
        async with serving(settings) as (client, app):
            state = (await client.get("/v1/state")).json()
            events = (await client.get("/v1/events", params={"scope": "deployment"})).json()
            engine = app.state.runtime.engine
            return state, events["events"], await engine.run(engine.checkpoint)

    before, learned = asyncio.run(first_life())
    assert (tmp_path / "state.json").exists()
    after, events, resumed = asyncio.run(second_life())
    assert after["adapter"]["steps"] == before["adapter"]["steps"] > 0
    learned, resumed = load(learned), load(resumed)
    assert learned.keys() == resumed.keys()
    assert all(torch.equal(learned[k], resumed[k]) for k in learned)
    assert after["calibrator"]["updates"] == before["calibrator"]["updates"] == 128
    assert after["calibrator"]["threshold"] == before["calibrator"]["threshold"]
    assert after["drift_policy"]["samples"] == before["drift_policy"]["samples"] == 256
    assert [e["kind"] for e in events if e["kind"] == "reset"] == ["reset"]


def test_a_snapshot_path_needs_the_embedded_store() -> None:
    with pytest.raises(ValueError, match="in-process store"):
        settings_for(store={"url": "redis://localhost:6379/0", "snapshot_path": "/tmp/x.json"})
