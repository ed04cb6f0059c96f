"""Conformal calibration in the running service: sets and intervals on every prediction, one
calibrator shared through the store and updated once per label, coverage in /metrics and
/v1/state, and two service processes on one Redis losing no update."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import subprocess
import urllib.request
import uuid

import numpy as np
import pytest
import redis
import torch
from harness import metric, serving, start_service, wait_ready
from redis_server import RedisServer, free_port

from adapters.conformal import build_calibrator, lac_scores
from service.demo import digits_split
from store.keys import Keys
from tests.models import regressor


def test_every_prediction_carries_a_set_and_the_level_and_labels_move_the_threshold() -> None:
    _, _, x_test, y_test = digits_split()
    rng = np.random.default_rng(0)
    noisy = np.clip(x_test + rng.normal(0, 0.6, x_test.shape), 0, 1).astype(np.float32)

    async def scenario():
        async with serving(conformal={"method": "saocp"}) as (client, app):
            first = (await client.post("/v1/predict", json={"inputs": x_test[:4].tolist()}
                                       )).json()["predictions"]
            served, labels = [], []
            for start in range(0, 320, 32):
                ids = [f"n{i}" for i in range(start, start + 32)]
                reply = (await client.post("/v1/predict", json={
                    "inputs": noisy[start:start + 32].tolist(), "ids": ids})).json()
                served += reply["predictions"]
                labels += y_test[start:start + 32].tolist()
                await client.post("/v1/feedback", json={"labels": [
                    {"id": i, "label": int(y)}
                    for i, y in zip(ids, y_test[start:start + 32], strict=True)]})
            state = (await client.get("/v1/state")).json()["calibrator"]
            metrics = {name: metric(app, f"adaptd_conformal_{name}", calibrator="saocp")
                       for name in ("threshold", "alpha", "target", "size")}
            metrics["coverage_100"] = metric(app, "adaptd_conformal_coverage",
                                             calibrator="saocp", window="100")
            return first, served, labels, state, metrics

    first, served, labels, state, metrics = asyncio.run(scenario())
    # before any label the threshold is 0: the set is the predicted class alone
    assert all(p["set"] == [p["prediction"]] and p["level"] == 0.9 for p in first)
    covered = [y in p["set"] for p, y in zip(served, labels, strict=True)]
    assert state["updates"] == 320 and state["method"] == "saocp"
    assert state["coverage"]["1000"] == pytest.approx(np.mean(covered))
    assert state["coverage"]["100"] == pytest.approx(np.mean(covered[-100:]))
    assert metrics["coverage_100"] == pytest.approx(state["coverage"]["100"])
    assert 0.8 <= state["coverage"]["1000"] <= 1.0  # calibrating towards 0.9 on a hard stream
    assert metrics["threshold"] == state["threshold"] > 0 and metrics["target"] == 0.9
    sizes = [len(p["set"]) for p in served[-32:]]
    assert all(1 <= s <= 10 for s in sizes) and max(sizes) > 1


def test_on_the_in_process_store_a_batch_reads_no_threshold_and_serves_the_last_join_s() -> None:
    """Only this process writes the in-process store's threshold, and its joins serve theirs at
    once (`adopt`): a batch then hands no read to a thread, and serves what the join wrote."""
    _, _, x_test, y_test = digits_split()

    async def scenario():
        async with serving(conformal={"method": "aci", "options": {"gamma": 0.05}}) as (
                client, app):
            runtime = app.state.runtime
            reads = []
            load = runtime.store.raw.load_calibrator
            runtime.store.raw.load_calibrator = lambda name: reads.append(name) or load(name)
            ids = [f"m{i}" for i in range(32)]
            await client.post("/v1/predict", json={"inputs": x_test[:32].tolist(), "ids": ids})
            await client.post("/v1/feedback", json={"labels": [
                {"id": i, "label": int(y)} for i, y in zip(ids, y_test[:32], strict=True)]})
            written = json.loads(load("conformal.threshold"))["threshold"]
            reply = (await client.post("/v1/predict", json={"inputs": x_test[32:40].tolist()}
                                       )).json()["predictions"]
            return reads, written, runtime.conformal.threshold, reply

    reads, written, serving_at, reply = asyncio.run(scenario())
    assert reads == []
    assert serving_at == written > 0
    assert len(reply) == 8 and all(p["set"] for p in reply)


def test_the_stored_calibrator_is_the_sequence_of_label_scores_each_applied_once() -> None:
    _, _, x_test, y_test = digits_split()

    async def scenario():
        async with serving(conformal={"method": "aci", "options": {"gamma": 0.05}}) as (
                client, app):
            ids = [f"q{i}" for i in range(64)]
            reply = (await client.post("/v1/predict", json={"inputs": x_test[:64].tolist(),
                                                            "ids": ids})).json()
            labels = [{"id": i, "label": int(y)} for i, y in zip(ids, y_test[:64], strict=True)]
            await client.post("/v1/feedback", json={"labels": labels[:40]})
            await client.post("/v1/feedback", json={"labels": labels})  # 40 duplicates
            stored = app.state.runtime.store.raw.load_calibrator("conformal")
            return reply["predictions"], json.loads(stored)

    predictions, stored = asyncio.run(scenario())
    probabilities = np.array([p["probabilities"] for p in predictions], dtype=np.float64)
    expected = build_calibrator("aci", 0.1, gamma=0.05)
    for score in lac_scores(probabilities / probabilities.sum(1, keepdims=True), y_test[:64]):
        expected.update(float(score))
    assert stored["steps"] == 64
    assert stored == json.loads(json.dumps(expected.state()))


def test_a_regressor_gets_intervals_around_its_values() -> None:
    model = {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
             "input_shape": [3], "num_classes": None}
    rng = np.random.default_rng(2)
    inputs = rng.normal(size=(200, 3)).astype(np.float32)
    with torch.inference_mode():
        source = regressor()(torch.from_numpy(inputs))[:, 0].numpy()
    truth = source + rng.normal(0, 0.5, 200)

    async def scenario():
        async with serving(model=model, adapter={"name": "none"},
                           conformal={"max_scale": 3.0}) as (client, app):
            widths = []
            for start in range(0, 200, 20):
                ids = [f"v{i}" for i in range(start, start + 20)]
                served = await client.post("/v1/predict", json={
                    "inputs": inputs[start:start + 20].tolist(), "ids": ids})
                widths += [r["interval"][1] - r["interval"][0]
                           for r in served.json()["predictions"]]
                await client.post("/v1/feedback", json={"labels": [
                    {"id": i, "label": float(y)}
                    for i, y in zip(ids, truth[start:start + 20], strict=True)]})
            reply = (await client.post("/v1/predict", json={"inputs": inputs[:5].tolist()}
                                       )).json()["predictions"]
            widths += [r["interval"][1] - r["interval"][0] for r in reply]
            return reply, (await client.get("/v1/state")).json()["calibrator"], widths

    reply, state, widths = asyncio.run(scenario())
    q = state["threshold"]
    assert state["method"] == "saocp" and state["score"] == "residual" and q > 0
    for row in reply:
        assert row["set"] is None and row["level"] == 0.9
        assert row["interval"] == pytest.approx([row["prediction"] - q, row["prediction"] + q])
    assert state["mean_width"] == pytest.approx(np.mean(widths))


def test_without_a_score_range_a_regressor_is_calibrated_by_dtaci() -> None:
    model = {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
             "input_shape": [3], "num_classes": None}

    async def scenario():
        async with serving(model=model, adapter={"name": "none"}) as (client, _):
            return (await client.get("/v1/state")).json()["calibrator"]["method"]

    assert asyncio.run(scenario()) == "dtaci"  # scale-free, and its state stays small


def test_conformal_off_serves_no_sets() -> None:
    _, _, x_test, _ = digits_split()

    async def scenario():
        async with serving(conformal={"method": "off"}) as (client, _):
            reply = (await client.post("/v1/predict", json={"inputs": x_test[:2].tolist()})).json()
            return reply["predictions"], (await client.get("/v1/state")).json()["calibrator"]

    rows, state = asyncio.run(scenario())
    assert [(r["set"], r["level"]) for r in rows] == [(None, None)] * 2 and state is None


# --- two service processes, one Redis -----------------------------------------------------------

LABELS = 1500


def _start(redis_url: str, namespace: str, port: int) -> subprocess.Popen:
    return start_service(port, {"ADAPTD_STORE__URL": redis_url,
                                "ADAPTD_STORE__NAMESPACE": namespace,
                                "ADAPTD_BATCHER__MAX_REQUEST_SAMPLES": "500"})


def _post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)


@pytest.mark.slow
def test_two_replicas_labelling_at_once_apply_every_update_to_the_shared_calibrator_once(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """Every batch of labels goes to both replicas at the same moment: each label is joined by
    exactly one of them, and the shared calibrator counts each label once."""
    _, _, x_test, y_test = digits_split()
    namespace = uuid.uuid4().hex
    ports = [free_port(), free_port()]
    processes = [_start(redis_server.url, namespace, port) for port in ports]
    try:
        for port, process in zip(ports, processes, strict=True):
            wait_ready(port, process)
        ids = [f"two-{i}" for i in range(LABELS)]
        truth = [int(y_test[i % len(y_test)]) for i in range(LABELS)]
        for start in range(0, LABELS, 500):
            inputs = x_test[np.arange(start, start + 500) % len(x_test)].tolist()
            _post(ports[start // 500 % 2], "/v1/predict",
                  {"inputs": inputs, "ids": ids[start:start + 500]})
        batches = [[{"id": i, "label": y} for i, y in zip(ids[s:s + 50], truth[s:s + 50],
                                                         strict=True)]
                   for s in range(0, LABELS, 50)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            replies = list(pool.map(lambda job: _post(job[0], "/v1/feedback", {"labels": job[1]}),
                                    [(port, batch) for batch in batches for port in ports]))
        states = [json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/v1/state", timeout=10).read()) for port in ports]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)

    assert sum(reply["joined"] for reply in replies) == LABELS
    assert sum(len(reply["duplicate"]) for reply in replies) == LABELS
    keys = Keys(namespace)
    stored = json.loads(redis_client.get(keys.calibrator("conformal")))
    summary = json.loads(redis_client.get(keys.calibrator("conformal.threshold")))
    assert stored["steps"] == summary["steps"] == LABELS
    # both replicas joined some: the race was real
    assert all(state["calibrator"]["labels"]["1000"] > 0 for state in states)
