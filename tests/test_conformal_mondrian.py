"""Mondrian conformal calibration (conformal.mondrian): one threshold per class, or per group the
caller names in the predict request. On traffic where one class (or group) dominates, the shared
threshold covers 1 − α on average and far less on the rare one; a threshold per class or group
covers each near the target. Coverage per class or group shows in /metrics and /v1/state."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import numpy as np
import pytest
from harness import metric, serving
from redis_server import RedisServer

from service.calibration import GROUPS, Conformal
from service.demo import digits_split
from service.gateway import StoreGateway
from service.metrics import Metrics
from service.model import load_model
from service.settings import ConformalSettings, load_settings
from store import MemoryStore

DOMINANT, RARE = 5, 9  # the demo model under light noise: ~95% right on 5s, ~30% on 9s
SAMPLES = 2000
REQUEST = 20


def dominated_stream(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits under light noise: 90% of them 5s, the others 9s."""
    _, _, x_test, y_test = digits_split()
    rng = np.random.default_rng(seed)
    classes = np.where(rng.random(SAMPLES) < 0.9, DOMINANT, RARE)
    rows = np.array([rng.choice(np.flatnonzero(y_test == c)) for c in classes])
    inputs = np.clip(x_test[rows] + rng.normal(0, 0.15, x_test[rows].shape), 0, 1)
    return inputs.astype(np.float32), classes


async def serve_stream(conformal: dict[str, Any], inputs: np.ndarray, labels: np.ndarray,
                       groups: list[str] | None = None
                       ) -> tuple[list[list[int]], dict, dict[str, float], bytes | None]:
    """Every request's labels right after its prediction. Returns the sets served, /v1/state's
    calibrator, the per-class or per-group coverage and threshold gauges, and the stored
    per-key states."""
    # the source model (no adapter, no error memory): the sets differ only by their thresholds
    async with serving(conformal={"method": "saocp", **conformal},
                       adapter={"name": "none"}, error_memory={"kind": "off"}) as (client, app):
        sets: list[list[int]] = []
        for start in range(0, len(labels), REQUEST):
            ids = [f"m{i}" for i in range(start, start + REQUEST)]
            body: dict[str, Any] = {"inputs": inputs[start:start + REQUEST].tolist(), "ids": ids}
            if groups is not None:
                body["group"] = groups[start // REQUEST]
            reply = await client.post("/v1/predict", json=body)
            assert reply.status_code == 200, reply.text
            sets += [p["set"] for p in reply.json()["predictions"]]
            await client.post("/v1/feedback", json={"labels": [
                {"id": i, "label": int(y)}
                for i, y in zip(ids, labels[start:start + REQUEST], strict=True)]})
        state = (await client.get("/v1/state")).json()["calibrator"]
        per_group = state["per_group"]
        gauges = {}
        for key in per_group["groups"]:
            labels_of = {"calibrator": "saocp", "by": per_group["by"], "group": key}
            gauges[f"coverage {key}"] = metric(app, "adaptd_conformal_group_coverage",
                                               **labels_of)
            gauges[f"threshold {key}"] = metric(app, "adaptd_conformal_group_threshold",
                                                **labels_of)
        stored = app.state.runtime.store.raw.load_calibrator(GROUPS)
        return sets, state, gauges, stored


def coverage_of(sets: list[list[int]], labels: np.ndarray, among: np.ndarray) -> float:
    """Coverage of the sets served over the second half of the stream, among some samples."""
    covered = np.array([int(y) in s for y, s in zip(labels, sets, strict=True)])
    late = np.arange(len(labels)) >= len(labels) // 2
    return float(covered[late & among].mean())


def test_where_one_class_dominates_a_threshold_per_class_covers_the_rare_class_too() -> None:
    inputs, labels = dominated_stream()
    shared, shared_state, shared_gauges, _ = asyncio.run(serve_stream({}, inputs, labels))
    by_class, state, gauges, stored = asyncio.run(
        serve_stream({"mondrian": "class"}, inputs, labels))
    rare, dominant = labels == RARE, labels == DOMINANT

    # one shared threshold: 0.9 on average, bought with the dominant class; the rare one is
    # left far below the target
    assert coverage_of(shared, labels, rare | dominant) == pytest.approx(0.9, abs=0.03)
    assert coverage_of(shared, labels, rare) < 0.5
    assert coverage_of(shared, labels, dominant) > 0.95
    # a threshold per class: each class near the target
    assert coverage_of(by_class, labels, rare) == pytest.approx(0.9, abs=0.06)
    assert coverage_of(by_class, labels, dominant) == pytest.approx(0.9, abs=0.03)

    # per-class coverage in /v1/state and /metrics: always by class for a classifier, with
    # the classes' own thresholds only under Mondrian
    groups = state["per_group"]["groups"]
    assert state["per_group"]["mondrian"] == "class" and set(groups) == {"5", "9"}
    assert groups["9"]["labels"] == int(rare.sum()) and groups["9"]["served_own"]
    assert groups["9"]["updates"] == int(rare.sum())
    assert gauges["coverage 9"] == pytest.approx(groups["9"]["coverage"])
    assert gauges["threshold 9"] == pytest.approx(groups["9"]["threshold"])
    assert shared_state["per_group"]["mondrian"] == "none"
    assert shared_state["per_group"]["groups"]["9"]["threshold"] is None
    shared_rare = shared_state["per_group"]["groups"]["9"]["coverage"]
    assert shared_gauges["coverage 9"] == pytest.approx(shared_rare) and shared_rare < 0.5
    # the store keeps one calibrator per class that has labels, each taught by its own labels
    kept = json.loads(stored)
    assert set(kept) == {"5", "9"} and kept["9"]["steps"] == int(rare.sum())


def test_groups_named_in_the_requests_get_a_threshold_each_up_to_the_cap() -> None:
    """Requests name their group; one group's inputs are much harder than the other's."""
    _, _, x_test, y_test = digits_split()
    rng = np.random.default_rng(1)
    rows = rng.integers(len(y_test), size=SAMPLES)
    requests = SAMPLES // REQUEST
    groups = ["hard" if k % 10 == 0 else "easy" for k in range(requests)]
    noise = np.repeat([0.3 if g == "hard" else 0.05 for g in groups], REQUEST)
    inputs = np.clip(x_test[rows] + rng.normal(0, 1, x_test[rows].shape)
                     * noise[:, None, None, None], 0, 1).astype(np.float32)
    labels = y_test[rows]
    hard = noise == 0.3

    shared, _, _, _ = asyncio.run(serve_stream({}, inputs, labels, groups))
    by_group, state, gauges, _ = asyncio.run(serve_stream({"mondrian": "group"}, inputs, labels,
                                                          groups))
    capped, capped_state, _, _ = asyncio.run(serve_stream(
        {"mondrian": "group", "mondrian_max_groups": 1}, inputs, labels, groups))

    assert coverage_of(shared, labels, hard) < 0.5
    assert coverage_of(by_group, labels, hard) == pytest.approx(0.9, abs=0.06)
    # the easy group's model is right more often than 90%: its sets, never empty, hold the
    # predicted class at least, and cover above the target
    assert 0.88 <= coverage_of(by_group, labels, ~hard) <= coverage_of(shared, labels, ~hard)
    per_group = state["per_group"]
    assert per_group["by"] == "group" and set(per_group["groups"]) == {"easy", "hard"}
    assert per_group["groups"]["hard"]["updates"] == int(hard.sum())
    assert gauges["coverage hard"] == pytest.approx(per_group["groups"]["hard"]["coverage"])
    # a cap of one group: the first group whose labels came ("hard") has its threshold; the
    # other is served, and teaches, the shared one alone, and has no series of its own
    assert set(capped_state["per_group"]["groups"]) == {"hard"}
    assert capped_state["updates"] == SAMPLES
    assert coverage_of(capped, labels, hard) == pytest.approx(0.9, abs=0.06)


def test_a_group_field_that_is_not_a_short_printable_name_is_refused() -> None:
    _, _, x_test, _ = digits_split()

    async def scenario() -> list[int]:
        async with serving() as (client, _):
            return [(await client.post("/v1/predict", json={
                "inputs": x_test[:1].tolist(), "group": group})).status_code
                for group in ["eu-west", "two words", "x" * 65, 7]]

    assert asyncio.run(scenario()) == [200, 422, 422, 422]


def conformal_with(**settings: Any) -> Conformal:
    model = load_model(load_settings(None).model)
    metrics = Metrics()
    return Conformal(ConformalSettings(method="aci", **settings), model, metrics,
                     StoreGateway(MemoryStore("mondrian-unit", record_ttl_s=60.0), metrics), None)


def test_a_class_is_served_the_shared_threshold_until_its_own_has_learnt_enough() -> None:
    conformal = conformal_with(mondrian="class", mondrian_min_labels=50)
    conformal.read_summary(json.dumps({
        "threshold": 0.4, "alpha_t": 0.1, "steps": 500,
        "groups": {"3": {"threshold": 0.9, "steps": 50}, "7": {"threshold": 0.1, "steps": 49}},
    }).encode())
    [per_class] = conformal.thresholds(1)
    assert per_class == [0.4, 0.4, 0.4, 0.9, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
    probabilities = np.full((1, 10), 0.02, dtype=np.float32)
    probabilities[0, 0], probabilities[0, 3] = 0.7, 0.12
    sets, _ = conformal.shape(probabilities)
    assert sets == [[0, 3]]  # 1 − 0.12 ≤ 0.9 for class 3; 1 − 0.02 > 0.4 elsewhere


def test_mondrian_by_class_refuses_a_model_with_more_classes_than_the_cap() -> None:
    with pytest.raises(ValueError, match="mondrian_max_groups"):
        conformal_with(mondrian="class", mondrian_max_groups=5)


def test_the_thresholds_per_class_are_shared_through_redis(
        redis_server: RedisServer) -> None:
    """One replica's labels teach the per-class calibrators in Redis; another replica on the
    same namespace serves every class its threshold."""
    inputs, labels = dominated_stream(seed=2)
    store = {"url": redis_server.url, "namespace": f"mondrian-{uuid.uuid4().hex}"}
    conformal = {"method": "saocp", "mondrian": "class", "mondrian_min_labels": 10}

    async def scenario() -> tuple[dict, list[float], dict]:
        async with serving(conformal=conformal, store=store) as (client, _):
            for start in range(0, 600, REQUEST):
                ids = [f"r{i}" for i in range(start, start + REQUEST)]
                await client.post("/v1/predict", json={
                    "inputs": inputs[start:start + REQUEST].tolist(), "ids": ids})
                await client.post("/v1/feedback", json={"labels": [
                    {"id": i, "label": int(y)}
                    for i, y in zip(ids, labels[start:start + REQUEST], strict=True)]})
            taught = (await client.get("/v1/state")).json()["calibrator"]
        async with serving(conformal=conformal, store=store) as (client, app):
            await client.post("/v1/predict", json={"inputs": inputs[:1].tolist(), "ids": ["x"]})
            served = app.state.runtime.store.raw.get_prediction("x").extra["q"]
            other = (await client.get("/v1/state")).json()["calibrator"]
        return taught, served, other

    taught, served, other = asyncio.run(scenario())
    groups = taught["per_group"]["groups"]
    assert groups["9"]["served_own"] and groups["5"]["served_own"]
    assert served[RARE] == groups["9"]["threshold"] and served[DOMINANT] == groups["5"]["threshold"]
    assert served[0] == taught["threshold"]  # a class with no labels: the shared threshold
    assert other["per_group"]["groups"]["9"]["updates"] == groups["9"]["updates"]


def test_under_mondrian_pid_gets_no_served_verdicts_and_aims_at_alpha() -> None:
    # a row may have been served its class's threshold, not the shared one, so the shared PID's
    # served-coverage loop must not learn from those sets (nor the classes' own, which may have
    # been served the shared one): both aim at α; without Mondrian the loop moves the level
    inputs, labels = dominated_stream()
    n = 600
    _, mondrian, _, _ = asyncio.run(serve_stream({"method": "pid", "mondrian": "class"},
                                                 inputs[:n], labels[:n]))
    _, shared, _, _ = asyncio.run(serve_stream({"method": "pid"}, inputs[:n], labels[:n]))
    assert mondrian["alpha_t"] == 0.1
    assert shared["alpha_t"] != 0.1
