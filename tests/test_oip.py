"""The Open Inference Protocol (KServe v2) beside the v1 routes (issue 15), over plain HTTP: every
route, every error status in the protocol's `{"error": ...}` shape, every numeric datatype, data
flat or nested, raw tensors in and out, outputs picked by name, the request id echoed, and labels
for the prediction ids an answer gave joined through the feedback extension. Run in process."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

import httpx
import numpy as np
import pytest

from service.demo import digits_split
from tests.harness import flood_held_engine, metric, serving, settings_for
from tests.redis_server import RedisServer

_, _, X_TEST, Y_TEST = digits_split()
MODEL = "digits-cnn"
INFER = f"/v2/models/{MODEL}/infer"
FEEDBACK = f"/v2/models/{MODEL}.feedback/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"


def tensor(samples: np.ndarray, datatype: str = "FP32", nested: bool = False) -> dict[str, Any]:
    data = samples.tolist() if nested else samples.ravel().tolist()
    return {"name": "input", "shape": list(samples.shape), "datatype": datatype, "data": data}


def raw_request(document: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    """A body of the binary tensor data extension: the JSON, then the raw tensors."""
    header = json.dumps(document).encode()
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header)),
                                      "content-type": "application/octet-stream"}


def read_raw(reply: httpx.Response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON part of a binary answer, and its raw outputs as arrays of their shapes."""
    assert reply.headers["content-type"] == "application/octet-stream"
    length = int(reply.headers[HEADER_LENGTH])
    document = json.loads(reply.content[:length])
    arrays, offset = {}, length
    types = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}
    for output in document["outputs"]:
        if "data" in output:  # this one came as JSON
            continue
        size = output["parameters"]["binary_data_size"]
        blob = reply.content[offset:offset + size]
        arrays[output["name"]] = np.frombuffer(blob, types[output["datatype"]]).reshape(
            output["shape"])
        offset += size
    assert offset == len(reply.content)
    return document, arrays


def outputs(reply: httpx.Response) -> dict[str, np.ndarray]:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in reply.json()["outputs"]}


def run(scenario, **overrides: Any):
    # answers are compared between routes and datatypes: the source model, which no traffic moves
    overrides.setdefault("adapter", {"name": "none"})

    async def wrapped():
        async with serving(settings_for(**overrides)) as (client, app):
            return await scenario(client, app)

    return asyncio.run(wrapped())


# --- server and model metadata, health ----------------------------------------------------------

def test_server_metadata_health_and_model_metadata_describe_the_loaded_model():
    async def scenario(client, app):
        paths = ["/v2", "/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}",
                 f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}.feedback",
                 f"/v2/models/{MODEL}.feedback/ready"]
        replies = {path: await client.get(path) for path in paths}
        version = replies[f"/v2/models/{MODEL}"].json()["versions"][0]
        for path in (f"/v2/models/{MODEL}/versions/{version}",
                     f"/v2/models/{MODEL}/versions/{version}/ready"):
            replies[path] = await client.get(path)
        return replies, app.state.runtime.model.version

    replies, model_version = run(scenario)
    assert all(r.status_code == 200 for r in replies.values()), {
        p: r.text for p, r in replies.items() if r.status_code != 200}
    server = replies["/v2"].json()
    assert server["name"] == "adaptd" and server["version"] == "0.1.0"
    assert {"binary_tensor_data", "classification", "feedback"} <= set(server["extensions"])
    assert replies["/v2/health/live"].json() == {"live": True}
    assert replies["/v2/health/ready"].json() == {"ready": True}
    assert replies[f"/v2/models/{MODEL}/ready"].json() == {"name": MODEL, "ready": True}
    metadata = replies[f"/v2/models/{MODEL}"].json()
    assert metadata["name"] == MODEL and metadata["platform"] == "pytorch"
    assert metadata["versions"] == [model_version] == ["digits-cnn@eabe14218364"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 16, 16]}]
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "prediction", "datatype": "INT64", "shape": [-1]},
        {"name": "set", "datatype": "BOOL", "shape": [-1, 10]},
    ]
    assert metadata["parameters"] == {
        "task": "classification", "adapter": "none", "adapter_version": 0,
        "feedback_model": f"{MODEL}.feedback", "level": 0.9,
        "set_encoding": "BOOL mask over the classes"}
    assert replies[f"/v2/models/{MODEL}/versions/{model_version}"].json() == metadata
    labels = replies[f"/v2/models/{MODEL}.feedback"].json()
    assert labels["inputs"] == [{"name": "id", "datatype": "BYTES", "shape": [-1]},
                                {"name": "label", "datatype": "INT64", "shape": [-1]}]
    assert labels["outputs"] == [{"name": "outcome", "datatype": "BYTES", "shape": [-1]}]


def test_a_regressor_declares_values_and_intervals_and_serves_them():
    model = {"factory": "tests.models:forecaster", "name": "fc", "task": "regression",
             "input_shape": [3], "num_classes": None}
    inputs = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)

    async def scenario(client, app):
        metadata = (await client.get("/v2/models/fc")).json()
        labels = (await client.get("/v2/models/fc.feedback")).json()
        served = await client.post("/v2/models/fc/infer", json={"inputs": [tensor(inputs)]})
        v1 = await client.post("/v1/predict", json={"inputs": inputs.tolist()})
        ids = served.json()["parameters"]["prediction_ids"].split()
        joined = await client.post("/v2/models/fc.feedback/infer", json={"inputs": [
            {"name": "id", "shape": [4], "datatype": "BYTES", "data": ids},
            {"name": "label", "shape": [4, 2], "datatype": "FP32", "data": [0.5] * 8}]})
        return metadata, labels, served, v1.json()["predictions"], joined

    metadata, labels, served, v1, joined = run(
        scenario, model=model, adapter={"name": "none"}, conformal={"max_scale": 3.0})
    assert metadata["outputs"] == [
        {"name": "prediction", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "interval", "datatype": "FP32", "shape": [-1, 2, 2]}]
    assert "set_encoding" not in metadata["parameters"]
    assert labels["inputs"][1] == {"name": "label", "datatype": "FP64", "shape": [-1, 2]}
    assert served.status_code == 200, served.text
    got = outputs(served)
    assert got["prediction"].shape == (4, 2) and got["interval"].shape == (4, 2, 2)
    assert got["prediction"] == pytest.approx(np.array([p["prediction"] for p in v1]), abs=1e-6)
    assert got["interval"] == pytest.approx(np.array([p["interval"] for p in v1]), abs=1e-6)
    assert joined.status_code == 200, joined.text
    assert joined.json()["parameters"]["joined"] == 4


# --- inference ----------------------------------------------------------------------------------

def test_infer_serves_what_v1_predict_serves_with_data_flat_or_nested_and_the_id_echoed():
    samples = X_TEST[:3]

    async def scenario(client, app):
        flat = await client.post(INFER, json={"id": "req-42", "inputs": [tensor(samples)]})
        nested = await client.post(INFER, json={"inputs": [tensor(samples, nested=True)]})
        v1 = await client.post("/v1/predict", json={"inputs": samples.tolist()})
        return flat, nested, v1.json()["predictions"], app.state.runtime.model.version

    flat, nested, v1, model_version = run(scenario)
    assert flat.status_code == nested.status_code == 200, (flat.text, nested.text)
    assert flat.headers["content-type"] == "application/json"
    document = flat.json()
    assert document["id"] == "req-42" and "id" not in nested.json()
    assert document["model_name"] == MODEL and document["model_version"] == model_version
    assert document["parameters"]["adapter_version"] == 0 and document["parameters"]["level"] == 0.9
    assert len(document["parameters"]["prediction_ids"].split()) == 3
    assert [o["name"] for o in document["outputs"]] == ["probabilities", "prediction", "set"]
    got = outputs(flat)
    assert np.array_equal(got["probabilities"], outputs(nested)["probabilities"])
    assert got["probabilities"] == pytest.approx(np.array([p["probabilities"] for p in v1]),
                                                 abs=1e-6)
    assert got["prediction"].tolist() == [p["prediction"] for p in v1] == Y_TEST[:3].tolist()
    assert [np.flatnonzero(row).tolist() for row in got["set"]] == [p["set"] for p in v1]


# small integers (0 to 16) that every datatype holds exactly: each gives what FP32 gives
INTEGRAL = np.rint(X_TEST[:2] * 16)
NUMPY = {"UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
         "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4",
         "FP64": "<f8"}


def test_every_numeric_datatype_in_json_or_raw_gives_what_fp32_gives():
    def bf16(values: np.ndarray) -> bytes:  # the upper half of each float32 (exact for these)
        return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()

    async def scenario(client, app):
        reference = outputs(await client.post(INFER, json={"inputs": [tensor(INTEGRAL)]}))
        replies = {}
        for datatype, dtype in NUMPY.items():
            replies[f"{datatype} json"] = await client.post(INFER, json={
                "inputs": [tensor(INTEGRAL.astype(dtype), datatype)]})
            blob = INTEGRAL.astype(dtype).tobytes()
            body, headers = raw_request({"inputs": [{
                "name": "input", "shape": list(INTEGRAL.shape), "datatype": datatype,
                "parameters": {"binary_data_size": len(blob)}}]}, blob)
            replies[f"{datatype} raw"] = await client.post(INFER, content=body, headers=headers)
        blob = bf16(INTEGRAL)
        body, headers = raw_request({"inputs": [{
            "name": "input", "shape": list(INTEGRAL.shape), "datatype": "BF16",
            "parameters": {"binary_data_size": len(blob)}}]}, blob)
        replies["BF16 raw"] = await client.post(INFER, content=body, headers=headers)
        return reference, replies

    reference, replies = run(scenario)
    assert len(replies) == 2 * len(NUMPY) + 1
    for case, reply in replies.items():
        assert reply.status_code == 200, (case, reply.text)
        got = outputs(reply)
        assert np.array_equal(got["probabilities"], reference["probabilities"]), case


def test_bool_inputs_are_ones_and_zeros():
    mask = X_TEST[:1] > 0.5

    async def scenario(client, app):
        as_bool = await client.post(INFER, json={"inputs": [tensor(mask, "BOOL")]})
        as_float = await client.post(INFER, json={"inputs": [tensor(mask.astype(np.float32))]})
        body, headers = raw_request({"inputs": [{
            "name": "input", "shape": [1, 1, 16, 16], "datatype": "BOOL",
            "parameters": {"binary_data_size": 256}}]}, mask.tobytes())
        raw = await client.post(INFER, content=body, headers=headers)
        return as_bool, as_float, raw

    as_bool, as_float, raw = run(scenario)
    assert as_bool.status_code == raw.status_code == 200, (as_bool.text, raw.text)
    expected = outputs(as_float)["probabilities"]
    assert np.array_equal(outputs(as_bool)["probabilities"], expected)
    assert np.array_equal(outputs(raw)["probabilities"], expected)


def test_raw_inputs_and_raw_outputs_hold_what_json_holds():
    samples = X_TEST[:4]

    async def scenario(client, app):
        as_json = await client.post(INFER, json={"inputs": [tensor(samples)]})
        blob = samples.astype("<f4").tobytes()
        document = {"inputs": [{"name": "input", "shape": [4, 1, 16, 16], "datatype": "FP32",
                                "parameters": {"binary_data_size": len(blob)}}],
                    "parameters": {"binary_data_output": True}}
        body, headers = raw_request(document, blob)
        all_raw = await client.post(INFER, content=body, headers=headers)
        # one output raw, one as JSON, in the order asked for
        document = {"inputs": [tensor(samples)], "outputs": [
            {"name": "set", "parameters": {"binary_data": True}}, {"name": "probabilities"}]}
        mixed = await client.post(INFER, json=document)
        return as_json, all_raw, mixed

    as_json, all_raw, mixed = run(scenario)
    expected = outputs(as_json)
    document, arrays = read_raw(all_raw)
    assert [o["name"] for o in document["outputs"]] == ["probabilities", "prediction", "set"]
    assert all("data" not in o for o in document["outputs"])
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 4 * 10 * 4}
    for name in ("probabilities", "prediction", "set"):
        assert np.array_equal(arrays[name], expected[name].astype(arrays[name].dtype)), name
    document, arrays = read_raw(mixed)
    assert [o["name"] for o in document["outputs"]] == ["set", "probabilities"]
    assert list(arrays) == ["set"] and "data" in document["outputs"][1]
    assert np.array_equal(arrays["set"], expected["set"])


def test_binary_data_output_holds_for_every_output_asked_for_unless_it_says_otherwise():
    async def scenario(client, app):
        listed = await client.post(INFER, json={
            "inputs": [tensor(X_TEST[:2])], "parameters": {"binary_data_output": True},
            "outputs": [{"name": "prediction"}]})
        overridden = await client.post(INFER, json={
            "inputs": [tensor(X_TEST[:2])], "parameters": {"binary_data_output": True},
            "outputs": [{"name": "prediction"},
                        {"name": "set", "parameters": {"binary_data": False}}]})
        return listed, overridden

    listed, overridden = run(scenario)
    document, arrays = read_raw(listed)
    assert [o["name"] for o in document["outputs"]] == ["prediction"]
    assert arrays["prediction"].tolist() == Y_TEST[:2].tolist()
    document, arrays = read_raw(overridden)
    assert list(arrays) == ["prediction"]
    assert document["outputs"][1]["name"] == "set" and len(document["outputs"][1]["data"]) == 20


def test_a_flood_of_outputs_asked_for_is_refused_before_any_is_compared():
    flood = [{"name": f"o{index}"} for index in range(50_000)]
    labels = [{"name": "id", "shape": [1], "datatype": "BYTES", "data": ["p0"]},
              {"name": "label", "shape": [1], "datatype": "INT64", "data": [1]}]

    async def scenario(client, app):
        return (await client.post(INFER, json={"inputs": [GOOD], "outputs": flood}),
                await client.post(INFER, json={"inputs": [GOOD],
                                               "outputs": [{"name": "set"}] * 50_000}),
                await client.post(FEEDBACK, json={"inputs": labels, "outputs": flood}))

    unknown, repeated, for_labels = run(scenario)
    for reply in (unknown, repeated):
        assert reply.status_code == 400
        assert reply.json() == {"error": "`outputs` asks for 50000 outputs; the model gives 3 "
                                         "('probabilities', 'prediction', 'set'): ask for each "
                                         "at most once"}
    assert for_labels.status_code == 400
    assert "asks for 50000 outputs; the model gives 1 ('outcome')" in for_labels.json()["error"]


def test_outputs_are_picked_by_name_and_classification_gives_the_top_classes():
    async def scenario(client, app):
        picked = await client.post(INFER, json={"inputs": [tensor(X_TEST[:2])], "outputs": [
            {"name": "prediction"}]})
        top = await client.post(INFER, json={"inputs": [tensor(X_TEST[:2])], "outputs": [
            {"name": "probabilities", "parameters": {"classification": 3}}]})
        every_class = await client.post(INFER, json={"inputs": [tensor(X_TEST[:2])], "outputs": [
            {"name": "probabilities", "parameters": {"classification": 100}}]})
        none = await client.post(INFER, json={"inputs": [tensor(X_TEST[:2])], "outputs": []})
        full = await client.post(INFER, json={"inputs": [tensor(X_TEST[:2])]})
        return picked, top, every_class, none, full

    picked, top, every_class, none, full = run(scenario)
    # k beyond the classes gives them all; an empty list asks for no output, only the ids
    assert every_class.json()["outputs"][0]["shape"] == [2, 10]
    assert none.status_code == 200 and none.json()["outputs"] == []
    assert len(none.json()["parameters"]["prediction_ids"].split()) == 2
    assert [o["name"] for o in picked.json()["outputs"]] == ["prediction"]
    assert outputs(picked)["prediction"].tolist() == Y_TEST[:2].tolist()
    (entry,) = top.json()["outputs"]
    assert entry["datatype"] == "BYTES" and entry["shape"] == [2, 3]
    probabilities = outputs(full)["probabilities"]
    for row, texts in zip(probabilities, np.array(entry["data"]).reshape(2, 3), strict=True):
        classes = [int(text.split(":")[1]) for text in texts]
        assert classes == np.argsort(-row)[:3].tolist()
        assert [float(text.split(":")[0]) for text in texts] == pytest.approx(row[classes])


def test_gzip_bodies_are_read_as_tritonclient_sends_them():
    async def scenario(client, app):
        body = gzip.compress(json.dumps({"inputs": [tensor(X_TEST[:1])]}).encode())
        return await client.post(INFER, content=body, headers={"content-encoding": "gzip"})

    reply = run(scenario)
    assert reply.status_code == 200, reply.text
    assert outputs(reply)["prediction"].tolist() == Y_TEST[:1].tolist()


def test_a_compressed_body_that_inflates_beyond_the_limit_gets_413_and_a_damaged_one_400():
    # zeros compress well: 64 samples are 58 kB of JSON, under 1 kB of gzip
    large = json.dumps({"inputs": [tensor(np.zeros((64, 1, 16, 16), np.float32))]}).encode()
    small = json.dumps({"inputs": [tensor(X_TEST[:1])]}).encode()
    labels = json.dumps({"id": "x" * 60_000, "inputs": [
        {"name": "id", "shape": [1], "datatype": "BYTES", "data": ["p0"]},
        {"name": "label", "shape": [1], "datatype": "INT64", "data": [1]}]}).encode()

    async def scenario(client, app):
        async def post(path: str, body: bytes, encoding: str) -> httpx.Response:
            return await client.post(path, content=body, headers={"content-encoding": encoding})

        return {
            "gzip too large": await post(INFER, gzip.compress(large), "gzip"),
            "deflate too large": await post(INFER, zlib.compress(large), "deflate"),
            "labels too large": await post(FEEDBACK, gzip.compress(labels), "gzip"),
            "trailing bytes": await post(INFER, gzip.compress(small) + b"junk", "gzip"),
            "two streams": await post(INFER, gzip.compress(small) * 2, "gzip"),
            "cut short": await post(INFER, gzip.compress(small)[:-20], "gzip"),
            "whole": await post(INFER, gzip.compress(small), "gzip"),
        }

    replies = run(scenario, max_body_bytes=50_000)
    assert len(gzip.compress(large)) < 50_000 < len(large)
    for case in ("gzip too large", "deflate too large", "labels too large"):
        assert replies[case].status_code == 413, (case, replies[case].text)
        assert replies[case].json() == {"error": "the request body is larger than 50000 bytes "
                                                 "once inflated: send less per request"}
    assert replies["trailing bytes"].status_code == 400
    assert replies["trailing bytes"].json()["error"] == (
        "4 bytes follow the end of the gzip stream: send one compressed stream and nothing "
        "after it")
    assert replies["two streams"].status_code == 400
    assert replies["cut short"].status_code == 400
    assert replies["cut short"].json()["error"] == ("the gzip body ends before its compressed "
                                                    "stream does: send all of it")
    assert replies["whole"].status_code == 200
    assert outputs(replies["whole"])["prediction"].tolist() == Y_TEST[:1].tolist()


def test_a_version_path_serves_the_same_model():
    async def scenario(client, app):
        version = app.state.runtime.model.version
        return await client.post(f"/v2/models/{MODEL}/versions/{version}/infer",
                                 json={"inputs": [tensor(X_TEST[:1])]})

    reply = run(scenario)
    assert reply.status_code == 200, reply.text
    assert outputs(reply)["prediction"].tolist() == Y_TEST[:1].tolist()


# --- the feedback extension ---------------------------------------------------------------------

def test_labels_for_the_returned_ids_are_joined_once_through_the_feedback_model():
    async def scenario(client, app):
        served = await client.post(INFER, json={"inputs": [tensor(X_TEST[:4])]})
        ids = served.json()["parameters"]["prediction_ids"].split()
        named = await client.post(INFER, json={"inputs": [tensor(X_TEST[4:6])], "parameters": {
            "prediction_ids": "mine-1 mine-2"}})
        labels = [int(y) for y in Y_TEST[:4]]
        first = await client.post(FEEDBACK, json={"id": "labels-1", "inputs": [
            {"name": "id", "shape": [5], "datatype": "BYTES", "data": [*ids, "never-made"]},
            {"name": "label", "shape": [5], "datatype": "INT64", "data": [*labels, 1]}]})
        # raw: each id a 4-byte little-endian length and its bytes; the labels as UINT8
        id_blob = b"".join(len(i).to_bytes(4, "little") + i.encode()
                           for i in ["mine-1", "mine-2", ids[0]])
        label_blob = np.array([*Y_TEST[4:6], Y_TEST[0]], dtype=np.uint8).tobytes()
        body, headers = raw_request({"inputs": [
            {"name": "id", "shape": [3], "datatype": "BYTES",
             "parameters": {"binary_data_size": len(id_blob)}},
            {"name": "label", "shape": [3], "datatype": "UINT8",
             "parameters": {"binary_data_size": len(label_blob)}}],
            "outputs": [{"name": "outcome", "parameters": {"binary_data": True}}]},
            id_blob, label_blob)
        second = await client.post(FEEDBACK, content=body, headers=headers)
        # one id twice in a request: joined once, then a duplicate
        await client.post(INFER, json={"inputs": [tensor(X_TEST[6:7])],
                                       "parameters": {"prediction_ids": "twice"}})
        repeated = await client.post(FEEDBACK, json={"inputs": [
            {"name": "id", "shape": [2], "datatype": "BYTES", "data": ["twice", "twice"]},
            {"name": "label", "shape": [2], "datatype": "INT64", "data": [int(Y_TEST[6])] * 2}]})
        state = (await client.get("/v1/state")).json()
        return (named, first, second, repeated, state,
                metric(app, "adaptd_labels_total", outcome="joined"))

    named, first, second, repeated, state, joined_total = run(scenario)
    assert outputs(repeated)["outcome"].tolist() == ["joined", "duplicate"]
    assert named.json()["parameters"]["prediction_ids"] == "mine-1 mine-2"
    assert first.status_code == 200, first.text
    document = first.json()
    assert document["model_name"] == f"{MODEL}.feedback" and document["id"] == "labels-1"
    assert document["parameters"] == {"joined": 4, "unknown": 1, "duplicate": 0, "expired": 0,
                                      "rejected": 0}
    assert outputs(first)["outcome"].tolist() == ["joined"] * 4 + ["unknown"]
    assert second.status_code == 200, second.text
    length = int(second.headers[HEADER_LENGTH])
    head = json.loads(second.content[:length])
    assert head["parameters"]["joined"] == 2 and head["parameters"]["duplicate"] == 1
    raw, outcomes = second.content[length:], []
    while raw:
        size = int.from_bytes(raw[:4], "little")
        outcomes.append(raw[4:4 + size].decode())
        raw = raw[4 + size:]
    assert outcomes == ["joined", "joined", "duplicate"]
    assert joined_total == 7
    assert state["quality"]["labels"] == 7 and state["quality"]["rolling_error"] == 0.0
    assert state["calibrator"]["updates"] == 7


def test_labels_need_string_ids_and_numbers_and_a_refused_request_joins_nothing():
    async def scenario(client, app):
        await client.post(INFER, json={"inputs": [tensor(X_TEST[:2])],
                                       "parameters": {"prediction_ids": "a 1"}})
        mixed_ids = await client.post(FEEDBACK, json={"inputs": [
            {"name": "id", "shape": [2], "datatype": "BYTES", "data": ["a", 1]},
            {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 1]}]})
        boolean = await client.post(FEEDBACK, json={"inputs": [
            {"name": "id", "shape": [1], "datatype": "BYTES", "data": ["a"]},
            {"name": "label", "shape": [1], "datatype": "BOOL", "data": [True]}]})
        body, headers = raw_request({"inputs": [
            {"name": "id", "shape": [1], "datatype": "BYTES", "data": ["a"]},
            {"name": "label", "shape": [1], "datatype": "BOOL",
             "parameters": {"binary_data_size": 1}}]}, b"\1")
        raw_boolean = await client.post(FEEDBACK, content=body, headers=headers)
        joined = await client.post(FEEDBACK, json={"inputs": [
            {"name": "id", "shape": [2], "datatype": "BYTES", "data": ["a", "1"]},
            {"name": "label", "shape": [2], "datatype": "INT64",
             "data": [int(y) for y in Y_TEST[:2]]}]})
        return mixed_ids, boolean, raw_boolean, joined

    mixed_ids, boolean, raw_boolean, joined = run(scenario)
    assert mixed_ids.status_code == 400
    assert mixed_ids.json() == {"error": "input 'id': BYTES data must be strings"}
    for reply in (boolean, raw_boolean):
        assert reply.status_code == 400
        assert reply.json()["error"].startswith("input 'label': datatype BOOL is not taken; "
                                                "send one of UINT8, ")
    assert outputs(joined)["outcome"].tolist() == ["joined", "joined"]


def test_a_label_is_joined_once_across_v2_and_v1_feedback():
    def v2_label(prediction_id: str, label: int) -> dict[str, Any]:
        return {"inputs": [
            {"name": "id", "shape": [1], "datatype": "BYTES", "data": [prediction_id]},
            {"name": "label", "shape": [1], "datatype": "INT64", "data": [label]}]}

    async def scenario(client, app):
        await client.post(INFER, json={"inputs": [tensor(X_TEST[:2])],
                                       "parameters": {"prediction_ids": "via-v2 via-v1"}})
        first_y, second_y = (int(y) for y in Y_TEST[:2])
        return (
            await client.post(FEEDBACK, json=v2_label("via-v2", first_y)),
            await client.post("/v1/feedback",
                              json={"labels": [{"id": "via-v2", "label": first_y}]}),
            await client.post("/v1/feedback",
                              json={"labels": [{"id": "via-v1", "label": second_y}]}),
            await client.post(FEEDBACK, json=v2_label("via-v1", second_y)),
            metric(app, "adaptd_labels_total", outcome="joined"),
        )

    v2_first, v1_again, v1_first, v2_again, joined = run(scenario)
    assert outputs(v2_first)["outcome"].tolist() == ["joined"]
    assert v1_again.json()["joined"] == 0 and v1_again.json()["duplicate"] == ["via-v2"]
    assert v1_first.json()["joined"] == 1
    assert outputs(v2_again)["outcome"].tolist() == ["duplicate"]
    assert v2_again.json()["parameters"]["duplicate"] == 1
    assert joined == 2


# --- errors -------------------------------------------------------------------------------------

GOOD = tensor(X_TEST[:1])


def _with(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


# (path, body: a JSON document, or raw bytes and headers), the message's telling part
BAD_REQUESTS: dict[str, tuple[str, Any, str]] = {
    "not JSON": (INFER, (b"inputs=1", {}), "not valid JSON"),
    "not an object": (INFER, [1, 2], "must be a JSON object"),
    "no inputs": (INFER, {"inputs": []}, "`inputs` must be a list of at least one tensor"),
    "unknown input": (INFER, {"inputs": [_with(name="x")]}, "no input 'x'; it takes 'input'"),
    "input twice": (INFER, {"inputs": [GOOD, GOOD]}, "given twice"),
    "wrong shape": (INFER, {"inputs": [_with(shape=[1, 16, 16])]},
                    "has shape [1, 16, 16]; the model takes [-1, 1, 16, 16]"),
    "no samples": (INFER, {"inputs": [_with(shape=[0, 1, 16, 16], data=[])]},
                   "is empty (its first dimension is 0)"),
    "data not of the shape": (INFER, {"inputs": [_with(data=[0.5] * 255)]},
                              "send 256 values flat, or nested as the shape"),
    "data nested otherwise": (INFER, {"inputs": [_with(data=[[0.5] * 16] * 16)]},
                              "data has shape [16, 16]"),
    "ragged data": (INFER, {"inputs": [_with(data=[[0.5] * 16] * 15 + [[0.5] * 15])]},
                    "not a regular array"),
    "unknown datatype": (INFER, {"inputs": [_with(datatype="FLOAT")]},
                         "datatype 'FLOAT' is not one of"),
    "BYTES for numbers": (INFER, {"inputs": [_with(datatype="BYTES", data=["a"] * 256)]},
                          "datatype BYTES is not taken; send a numeric datatype"),
    "strings as FP32": (INFER, {"inputs": [_with(data=["a"] * 256)]}, "only numbers"),
    "booleans among numbers": (INFER, {"inputs": [_with(data=[1.0] * 255 + [True])]},
                               "holds true or false; FP32 takes numbers"),
    "numbers as BOOL": (INFER, {"inputs": [_with(datatype="BOOL", data=[1] * 256)]},
                        "BOOL data must be true or false"),
    "beyond UINT8": (INFER, {"inputs": [_with(datatype="UINT8", data=[256] * 256)]},
                     "outside UINT8's range 0 to 255"),
    "fractions as INT32": (INFER, {"inputs": [_with(datatype="INT32", data=[0.5] * 256)]},
                           "INT32 data must be integers"),
    "beyond FP16": (INFER, {"inputs": [_with(datatype="FP16", data=[70000.0] * 256)]},
                    "beyond the range of FP16"),
    "beyond float32": (INFER, {"inputs": [_with(datatype="FP64", data=[1e39] * 256)]},
                       "input[0] holds a value that is not a finite float32"),
    "beyond the model's range": (INFER, {"inputs": [_with(data=[1e30] * 256)]},
                                 "input[0] holds 1e+30, beyond the largest magnitude"),
    "too many samples": (INFER, {"inputs": [tensor(np.zeros((9, 1, 16, 16)))]},
                         "holds 9 along its first dimension (the batch); at most 8 are taken"),
    "no data": (INFER, {"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]},
                "give `data`, or binary_data_size"),
    "data and raw": (INFER, {"inputs": [_with(parameters={"binary_data_size": 0})]},
                     "not both"),
    "raw size off": (INFER, raw_request({"inputs": [{
        "name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32",
        "parameters": {"binary_data_size": 1020}}]}, b"\0" * 1020), "takes 1024"),
    "bad header length": (INFER, (json.dumps({"inputs": [GOOD]}).encode(),
                                  {HEADER_LENGTH: "999999"}), "it must be the length"),
    "BF16 in JSON": (INFER, {"inputs": [_with(datatype="BF16")]},
                     "BF16 is taken only as binary data (binary_data_size)"),
    "bytes left over": (INFER, (json.dumps({"inputs": [GOOD]}).encode() + b"xx",
                                {HEADER_LENGTH: str(len(json.dumps({"inputs": [GOOD]})))}),
                        "2 bytes follow the JSON"),
    "shared memory": (INFER, {"inputs": [_with(parameters={"shared_memory_region": "r"})]},
                      "shared memory is not supported"),
    "binary_data_output not a flag": (INFER, {"inputs": [GOOD], "parameters": {
        "binary_data_output": "yes"}}, "binary_data_output must be true or false"),
    "parameter not a scalar": (INFER, {"inputs": [GOOD], "parameters": {"a": [1]}},
                               "'a' must be a string, a number or a boolean"),
    "id not a string": (INFER, {"inputs": [GOOD], "id": 7}, "`id` must be a string"),
    "unknown output": (INFER, {"inputs": [GOOD], "outputs": [{"name": "logits"}]},
                       "no output 'logits'; it gives 'probabilities', 'prediction', 'set'"),
    "output twice": (INFER, {"inputs": [GOOD], "outputs": [{"name": "set"}, {"name": "set"}]},
                     "asked for twice"),
    "classification on the prediction": (INFER, {"inputs": [GOOD], "outputs": [
        {"name": "prediction", "parameters": {"classification": 2}}]},
        "classification is taken only on the class probabilities"),
    "too few prediction ids": (INFER, {"inputs": [GOOD], "parameters": {
        "prediction_ids": "a b"}}, "2 ids for 1 inputs"),
    "a bad prediction id": (INFER, {"inputs": [GOOD], "parameters": {
        "prediction_ids": "\u00e9t\u00e9"}}, "must be 1 to 128 printable ASCII characters"),
    "a bad group": (INFER, {"inputs": [GOOD], "parameters": {"group": "a b"}},
                    "group must be 1 to 64 printable ASCII characters"),
    "compressed otherwise": (INFER, (json.dumps({"inputs": [GOOD]}).encode(),
                                     {"content-encoding": "br"}), "'br' is not taken"),
    "label out of range": (FEEDBACK, {"inputs": [
        {"name": "id", "shape": [1], "datatype": "BYTES", "data": ["p0"]},
        {"name": "label", "shape": [1], "datatype": "INT64", "data": [10]}]},
        "label[0] is 10; a class index is an integer from 0 to 9"),
    "fewer ids than labels": (FEEDBACK, {"inputs": [
        {"name": "id", "shape": [1], "datatype": "BYTES", "data": ["p0"]},
        {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 2]}]},
        "1 ids for 2 labels"),
    "ids as numbers": (FEEDBACK, {"inputs": [
        {"name": "id", "shape": [1], "datatype": "INT64", "data": [1]},
        {"name": "label", "shape": [1], "datatype": "INT64", "data": [1]}]},
        "datatype INT64 is not taken; send BYTES"),
    "no label": (FEEDBACK, {"inputs": [
        {"name": "id", "shape": [1], "datatype": "BYTES", "data": ["p0"]}]},
        "input 'label' is missing"),
    "a key given twice": (INFER, (json.dumps({"inputs": [GOOD]})[:-1].encode()
                                  + b', "inputs": ' + json.dumps([GOOD]).encode() + b"}",
                                  {"content-type": "application/json"}),
                          "the key 'inputs' appears twice in one object"),
    "a parameter given twice": (INFER, (json.dumps({"inputs": [GOOD]})[:-1].encode()
                                        + b', "parameters": {"group": "a", "group": "b"}}',
                                        {"content-type": "application/json"}),
                                "the key 'group' appears twice in one object"),
    "a label given twice": (FEEDBACK, (b'{"inputs": [{"name": "id", "shape": [1], "datatype": '
                                       b'"BYTES", "data": ["p0"], "data": ["p1"]}, {"name": '
                                       b'"label", "shape": [1], "datatype": "INT64", '
                                       b'"data": [1]}]}', {"content-type": "application/json"}),
                            "the key 'data' appears twice in one object"),
}


def test_every_bad_request_gets_a_400_in_the_protocols_shape_and_changes_nothing():
    settings = settings_for(batcher={"max_request_samples": 8})

    async def scenario():
        async with serving(settings) as (client, app):
            await client.post(INFER, json={"inputs": [tensor(X_TEST[:2])], "parameters": {
                "prediction_ids": "p0 p1"}})
            before = (await client.get("/v1/state")).json()
            replies = {}
            for case, (path, body, _) in BAD_REQUESTS.items():
                if isinstance(body, tuple):
                    replies[case] = await client.post(path, content=body[0], headers=body[1])
                else:
                    replies[case] = await client.post(path, json=body)
            after = (await client.get("/v1/state")).json()
            predictions = metric(app, "adaptd_predictions_total")
            labels = sum(metric(app, "adaptd_labels_total", outcome=o)
                         for o in ("joined", "unknown", "duplicate", "expired"))
            join = await client.post(FEEDBACK, json={"inputs": [
                {"name": "id", "shape": [2], "datatype": "BYTES", "data": ["p0", "p1"]},
                {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 2]}]})
            return replies, before, after, predictions, labels, join.json()

    replies, before, after, predictions, labels, join = asyncio.run(scenario())
    for case, reply in replies.items():
        assert reply.status_code == 400, (case, reply.text)
        assert set(reply.json()) == {"error"}, (case, reply.text)
        assert BAD_REQUESTS[case][2] in reply.json()["error"], (case, reply.text)
    assert after == before and predictions == 2 and labels == 0
    assert join["parameters"]["joined"] == 2


def test_64_bit_integers_are_read_exactly_and_refused_only_beyond_their_datatype():
    zeros = [0] * 255

    async def scenario(client, app):
        return {
            "UINT64 2**63": await client.post(INFER, json={"inputs": [
                _with(datatype="UINT64", data=[2**63, *zeros])]}),
            "FP32 2**63": await client.post(INFER, json={"inputs": [
                _with(data=[float(2**63), *zeros])]}),
            "UINT64 2**64-1": await client.post(INFER, json={"inputs": [
                _with(datatype="UINT64", data=[2**64 - 1, *zeros])]}),
            "INT64 -1, 2**63": await client.post(INFER, json={"inputs": [
                _with(datatype="INT64", data=[-1, 2**63, *zeros[1:]])]}),
            "UINT64 2**64": await client.post(INFER, content=(
                b'{"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "UINT64", '
                b'"data": [18446744073709551616' + b", 0" * 255 + b"]}]}")),
        }

    replies = run(scenario)
    taken = replies["UINT64 2**63"]
    assert taken.status_code == 200, taken.text
    # 2**63 as float32 is what FP32 gives for it, within model.max_abs_input (9.6e18)
    assert np.array_equal(outputs(taken)["probabilities"],
                          outputs(replies["FP32 2**63"])["probabilities"])
    errors = {case: reply.json()["error"] for case, reply in replies.items()
              if reply.status_code == 400}
    assert errors == {
        "UINT64 2**64-1": "input[0] holds 1.8e+19, beyond the largest magnitude this model takes "
                          "(9.6e+18, model.max_abs_input)",
        "INT64 -1, 2**63": "input 'input': data holds a value outside INT64's range "
                           "-9223372036854775808 to 9223372036854775807",
        "UINT64 2**64": "input 'input': data holds a value outside UINT64's range 0 to "
                        "18446744073709551615",
    }


def test_a_header_length_that_is_not_a_plain_decimal_number_gets_400():
    body = json.dumps({"inputs": [GOOD]}).encode()
    # a superscript two (Latin-1 0xB2) and Arabic-Indic digits pass str.isdigit() but not int();
    # 5000 digits pass int() only below Python's limit on the digits of a conversion
    lengths = [b"\xb2", "\u0661\u0662".encode(), b"1" * 5000, b"+12", b"-5", b"0", b"1_0"]

    async def scenario(client, app):
        return [await client.post(INFER, content=body, headers=[(HEADER_LENGTH.encode(), length)])
                for length in lengths]

    replies = run(scenario)
    for length, reply in zip(lengths, replies, strict=True):
        assert reply.status_code == 400, (length[:10], reply.text)
        assert "it must be the length of the JSON part, from 1 to the body's" in (
            reply.json()["error"]), (length[:10], reply.text)


def test_unknown_models_versions_and_paths_get_404_and_other_methods_405_in_the_protocols_shape():
    async def scenario(client, app):
        return {
            "model": await client.get("/v2/models/nope"),
            "model ready": await client.get("/v2/models/nope/ready"),
            "infer": await client.post("/v2/models/nope/infer", json={"inputs": [GOOD]}),
            "version": await client.get(f"/v2/models/{MODEL}/versions/7"),
            "version ready": await client.get(f"/v2/models/{MODEL}/versions/7/ready"),
            "version infer": await client.post(f"/v2/models/{MODEL}/versions/7/infer",
                                               json={"inputs": [GOOD]}),
            "path": await client.get("/v2/repository/index"),
            "method": await client.get(INFER),
        }

    replies = run(scenario)
    for case, reply in replies.items():
        assert set(reply.json()) == {"error"}, (case, reply.text)
    assert {case: r.status_code for case, r in replies.items()} == {
        **dict.fromkeys(["model", "model ready", "infer", "version", "version ready",
                         "version infer", "path"], 404), "method": 405}
    assert "this server serves 'digits-cnn'" in replies["model"].json()["error"]
    assert "has no version '7'; it serves 'digits-cnn@" in replies["version"].json()["error"]
    assert replies["method"].headers["allow"] == "POST"


def test_a_token_guards_infer_and_labels_with_401_in_the_protocols_shape():
    async def scenario(client, app):
        bare = await client.post(INFER, json={"inputs": [GOOD]})
        labels = await client.post(FEEDBACK, json={"inputs": []})
        granted = await client.post(INFER, json={"inputs": [GOOD]},
                                    headers={"authorization": "Bearer s3cret"})
        metadata = await client.get(f"/v2/models/{MODEL}")
        return bare, labels, granted, metadata

    bare, labels, granted, metadata = run(scenario, api_token="s3cret")
    for reply in (bare, labels):
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert set(reply.json()) == {"error"} and "Authorization: Bearer" in reply.json()["error"]
    assert granted.status_code == 200 and metadata.status_code == 200


def test_a_body_over_the_limit_gets_413_in_the_protocols_shape():
    async def scenario(client, app):
        return await client.post(INFER, json={"inputs": [tensor(X_TEST[:64])]})

    reply = run(scenario, max_body_bytes=50_000)
    assert reply.status_code == 413
    assert reply.json() == {"error": "the request body is larger than 50000 bytes: send less per "
                                     "request"}


def test_a_body_that_stops_half_way_gets_408_in_the_protocols_shape():
    head = json.dumps({"inputs": [tensor(X_TEST[:1])]}).encode()

    async def stalling():
        yield head[:100]
        await asyncio.sleep(5)  # never sends the rest in time
        yield head[100:]

    async def scenario(client, app):
        return await client.post(INFER, content=stalling())

    reply = run(scenario, body_timeout_s=0.3)
    assert reply.status_code == 408 and reply.headers["connection"] == "close"
    assert reply.json() == {"error": "the request body did not arrive within 0.3 s of its "
                                     "headers: send it at once, or send less per request"}


def test_v1_errors_keep_their_own_shape():
    async def scenario(client, app):
        return await client.get("/v1/nope"), await client.post("/v1/predict", json={})

    missing, invalid = run(scenario)
    assert set(missing.json()) == {"detail"} and set(invalid.json()) >= {"detail", "errors"}


def test_a_full_batcher_answers_503_with_retry_after_in_the_protocols_shape():
    settings = settings_for(batcher={"max_batch_size": 4, "max_wait_ms": 0,
                                     "max_request_samples": 4, "max_queued_samples": 8})
    requests = 12

    async def scenario():
        async with serving(settings) as (client, app):
            replies = await flood_held_engine(app, lambda _: client.post(INFER, json={
                "inputs": [tensor(X_TEST[:2])]}), requests)
            return replies, app.state.runtime.batcher

    replies, batcher = asyncio.run(scenario())
    refused = [r for r in replies if r.status_code == 503]
    served = [r for r in replies if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == requests
    for reply in refused:
        assert reply.headers["retry-after"] == "1"
        assert set(reply.json()) == {"error"}
        assert "the service is overloaded" in reply.json()["error"]
    for reply in served:
        assert outputs(reply)["prediction"].tolist() == Y_TEST[:2].tolist()
    assert batcher.inflight_requests == 0 and batcher.waiting_samples == 0


@pytest.mark.slow
def test_while_the_store_is_down_v2_is_not_ready_and_labels_get_503_and_it_all_comes_back():
    labels = {"inputs": [{"name": "id", "shape": [1], "datatype": "BYTES", "data": ["kept"]},
                         {"name": "label", "shape": [1], "datatype": "INT64",
                          "data": [int(Y_TEST[0])]}]}
    with RedisServer() as server:
        settings = settings_for(store={"url": server.url, "namespace": "oip-outage"})

        async def scenario():
            async with serving(settings) as (client, app):
                server.stop()
                down = {
                    "ready": await client.get("/v2/health/ready"),
                    "model ready": await client.get(f"/v2/models/{MODEL}/ready"),
                    "infer": await client.post(INFER, json={"inputs": [tensor(X_TEST[:1])]}),
                    "labels": await client.post(FEEDBACK, json=labels),
                }
                server.start()  # empty: a redis-server without persistence
                back = {"ready": await client.get("/v2/health/ready"),
                        "infer": await client.post(INFER, json={
                            "inputs": [tensor(X_TEST[:1])],
                            "parameters": {"prediction_ids": "kept"}}),
                        "labels": await client.post(FEEDBACK, json=labels)}
                return down, back

        down, back = asyncio.run(scenario())
    assert down["ready"].status_code == 503 and down["ready"].json() == {"ready": False}
    assert down["model ready"].status_code == 503
    assert down["model ready"].json() == {"name": MODEL, "ready": False}
    assert down["infer"].status_code == 200  # predictions go on without the store
    assert down["labels"].status_code == 503
    assert down["labels"].json() == {"error": "the store is unavailable; no label was joined: "
                                              "send the labels again once it is back"}
    assert back["ready"].json() == {"ready": True}
    assert back["labels"].json()["parameters"]["joined"] == 1


def test_the_schema_declares_every_v2_route_with_its_statuses():
    app_schema = run(lambda client, app: _schema(client))
    paths = app_schema["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}",
            "/v2/models/{model_name}/versions/{model_version}",
            "/v2/models/{model_name}/ready",
            "/v2/models/{model_name}/versions/{model_version}/ready",
            "/v2/models/{model_name}/infer",
            "/v2/models/{model_name}/versions/{model_version}/infer"} <= set(paths)
    infer = paths["/v2/models/{model_name}/infer"]["post"]
    assert {"200", "400", "401", "404", "408", "413", "503"} <= set(infer["responses"])
    assert set(infer["requestBody"]["content"]) == {"application/json",
                                                     "application/octet-stream"}
    assert infer["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferenceErrorResponse"}
    assert "InferenceRequest" in app_schema["components"]["schemas"]


async def _schema(client: httpx.AsyncClient) -> dict[str, Any]:
    return (await client.get("/openapi.json")).json()
