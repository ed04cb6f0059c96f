"""Every kind of bad input gets a 4xx whose message says what to change, and changes nothing."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from service.demo import digits_split
from tests.harness import metric, serving, settings_for

_, _, X_TEST, _ = digits_split()
GOOD = X_TEST[0].tolist()  # one sample, shape [1, 16, 16]
JSON = {"content-type": "application/json"}
ROW = GOOD[0]  # shape [16, 16]

PREDICT_CASES = {
    "wrong shape": ({"inputs": [ROW]}, 422, "has shape [16, 16]; the model takes samples of shape"),
    "ragged sample": ({"inputs": [[ROW[:15] + [[0.0] * 15]]]}, 422, "not a regular array"),
    "empty batch": ({"inputs": []}, 422, "at least 1 item"),
    "batch over the limit": ({"inputs": [GOOD] * 9}, 422, "the limit is 8: split the request"),
    "string values": ({"inputs": [[[["a"] * 16] * 16]]}, 422, "valid number"),
    "boolean values": ({"inputs": [[[[True] * 16] * 16]]}, 422, "valid number"),
    "null inputs": ({"inputs": None}, 422, "valid list"),
    "missing inputs": ({"ids": ["a"]}, 422, "Field required"),
    "unknown field": ({"inputs": [GOOD], "extra": 1}, 422, "Extra inputs are not permitted"),
    "too few ids": ({"inputs": [GOOD, GOOD], "ids": ["a"]}, 422, "1 ids for 2 inputs"),
    "repeated ids": ({"inputs": [GOOD, GOOD], "ids": ["a", "a"]}, 422, "appears twice"),
    "id with spaces": ({"inputs": [GOOD], "ids": ["a b"]}, 422, "should match pattern"),
    "float32 overflow": ({"inputs": [[[[1e39] * 16] * 16]]}, 422, "not a finite float32"),
}

FEEDBACK_CASES = {
    "class out of range": ({"labels": [{"id": "x", "label": 10}]}, 422, "integer from 0 to 9"),
    "negative class": ({"labels": [{"id": "x", "label": -1}]}, 422, "integer from 0 to 9"),
    "fractional class": ({"labels": [{"id": "x", "label": 2.5}]}, 422, "integer from 0 to 9"),
    "almost a class": ({"labels": [{"id": "x", "label": 3.0000000001}]}, 422,
                       "label is 3.0000000001; a class index is an integer"),
    "string label": ({"labels": [{"id": "x", "label": "3"}]}, 422, "valid number"),
    "no labels": ({"labels": []}, 422, "at least 1 item"),
    "missing id": ({"labels": [{"label": 3}]}, 422, "Field required"),
    "one bad label among good": (
        {"labels": [{"id": "p0", "label": 1}, {"id": "p1", "label": 99}]}, 422,
        "labels[1].label is 99;",
    ),
}


def send_and_observe(requests: list[tuple[str, str, bytes | dict, dict]]):
    """Predict once for the ids p0 and p1, send `requests`, and read what changed."""
    settings = settings_for(batcher={"max_request_samples": 8}, max_body_bytes=200_000)

    async def scenario():
        async with serving(settings) as (client, app):
            await client.post("/v1/predict", json={"inputs": [GOOD, GOOD], "ids": ["p0", "p1"]})
            before = (await client.get("/v1/state")).json()
            replies = []
            for method, path, body, headers in requests:
                if isinstance(body, bytes):
                    replies.append(await client.request(method, path, content=body,
                                                        headers=headers))
                else:
                    replies.append(await client.request(method, path, json=body, headers=headers))
            after = (await client.get("/v1/state")).json()
            counters = {
                "predictions": metric(app, "adaptd_predictions_total"),
                "labels": sum(metric(app, "adaptd_labels_total", outcome=o)
                              for o in ("joined", "unknown", "duplicate", "expired")),
                "5xx": sum(s.value for m in app.state.metrics.requests.collect()
                           for s in m.samples if s.labels.get("status", "").startswith("5")),
            }
            # the two records are still there, unlabelled: a good label joins both now
            join = await client.post("/v1/feedback", json={"labels": [
                {"id": "p0", "label": 1}, {"id": "p1", "label": 2}]})
            return replies, before, after, counters, join.json()

    return asyncio.run(scenario())


def _assert_nothing_changed(before, after, counters, join):
    assert after == before
    assert counters["predictions"] == 2
    assert counters["labels"] == 0
    assert counters["5xx"] == 0
    assert join["joined"] == 2


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_bad_predict_requests_get_a_clear_4xx_and_change_nothing(case):
    body, status, message = PREDICT_CASES[case]
    (reply,), before, after, counters, join = send_and_observe([("POST", "/v1/predict", body, {})])
    assert reply.status_code == status, reply.text
    assert message in reply.text
    _assert_nothing_changed(before, after, counters, join)


@pytest.mark.parametrize("case", sorted(FEEDBACK_CASES))
def test_bad_feedback_requests_get_a_clear_4xx_and_change_nothing(case):
    body, status, message = FEEDBACK_CASES[case]
    (reply,), before, after, counters, join = send_and_observe([("POST", "/v1/feedback", body, {})])
    assert reply.status_code == status, reply.text
    assert message in reply.text
    _assert_nothing_changed(before, after, counters, join)


RAW_CASES = {
    "malformed json": (b'{"inputs": [', 422, "JSON decode error"),
    "NaN literal": (
        json.dumps({"inputs": [[[[float("nan")] * 16] * 16]]}).encode(), 422, "finite number"),
    "Infinity literal": (
        json.dumps({"inputs": [[[[float("inf")] * 16] * 16]]}).encode(), 422, "finite number"),
    "deeply nested": (b'{"inputs": [' + b"[" * 5000 + b"]" * 5000 + b"]}", 422,
                      "nested more than 1024 levels deep"),
    "body over the size limit": (
        json.dumps({"inputs": [GOOD] * 100}).encode(), 413, "larger than 200000 bytes"),
    "not json": (b"inputs=1", 422, "JSON decode error"),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_malformed_bodies_get_a_clear_4xx_and_change_nothing(case):
    body, status, message = RAW_CASES[case]
    headers = {"content-type": "application/json"}
    (reply,), before, after, counters, join = send_and_observe(
        [("POST", "/v1/predict", body, headers)])
    assert reply.status_code == status, reply.text
    assert message in reply.text
    _assert_nothing_changed(before, after, counters, join)


REPEATED_KEYS = {
    "predict": ("/v1/predict", b'{"inputs": [' + json.dumps(GOOD).encode() + b'], "inputs": ['
                + json.dumps(GOOD).encode() + b"]}", "the key 'inputs' appears twice"),
    "predict, a key spelt with an escape": (
        "/v1/predict", b'{"inputs": [' + json.dumps(GOOD).encode() + b'], "\\u0069nputs": ['
        + json.dumps(GOOD).encode() + b"]}", "the key 'inputs' appears twice"),
    "feedback": ("/v1/feedback", b'{"labels": [{"id": "p0", "label": 9, "label": 1}]}',
                 "the key 'label' appears twice"),
}


@pytest.mark.parametrize("case", sorted(REPEATED_KEYS))
def test_a_key_given_twice_is_refused_and_changes_nothing(case):
    path, body, message = REPEATED_KEYS[case]
    (reply,), before, after, counters, join = send_and_observe(
        [("POST", path, body, {"content-type": "application/json"})])
    assert reply.status_code == 422, reply.text
    assert message in reply.text and reply.json()["errors"][0]["type"] == "json_invalid"
    _assert_nothing_changed(before, after, counters, join)


def test_a_value_that_spells_a_key_is_no_repeat():
    body = {"inputs": [GOOD], "ids": ["inputs"], "group": "ids"}
    (reply,), *_ = send_and_observe([("POST", "/v1/predict", body, {})])
    assert reply.status_code == 200, reply.text
    (reply,), *_ = send_and_observe([("POST", "/v1/feedback", {"labels": [
        {"id": "label", "label": 1}, {"id": "id", "label": 2}]}, {})])
    assert reply.status_code == 200, reply.text


def test_a_bulk_line_with_a_key_given_twice_is_refused_with_its_number():
    body = b'{"id": "p0", "label": 1}\n{"id": "p1", "label": 9, "label": 2}\n'
    (reply,), before, after, counters, join = send_and_observe(
        [("POST", "/v1/feedback/bulk", body, {"content-type": "application/x-ndjson"})])
    assert reply.status_code == 422, reply.text
    assert "line 2: the key 'label' appears twice" in reply.text
    _assert_nothing_changed(before, after, counters, join)


def test_a_feedback_body_that_is_not_utf8_is_json_invalid_at_its_byte():
    body = b'{"labels": [{"id": "\xff", "label": 3}]}'
    (reply,), before, after, counters, join = send_and_observe(
        [("POST", "/v1/feedback", body, {"content-type": "application/json"})])
    assert reply.status_code == 422, reply.text
    assert reply.json()["errors"] == [{
        "type": "json_invalid", "loc": ["body", 20],
        "msg": "JSON decode error: the body is not valid UTF-8 (byte 0xff at byte 20)"}]
    _assert_nothing_changed(before, after, counters, join)


def test_a_body_over_the_limit_without_content_length_is_refused_while_streaming():
    chunk = json.dumps({"inputs": [GOOD] * 100}).encode()

    async def body():
        for start in range(0, len(chunk), 4096):
            yield chunk[start:start + 4096]

    async def scenario():
        async with serving(max_body_bytes=50_000) as (client, app):
            reply = await client.post("/v1/predict", content=body(),
                                      headers={"content-type": "application/json"})
            return reply, metric(app, "adaptd_predictions_total")

    reply, predictions = asyncio.run(scenario())
    assert reply.status_code == 413
    assert predictions == 0


def test_write_routes_need_the_bearer_token_once_one_is_set():
    async def scenario():
        async with serving(api_token="s3cret") as (client, app):
            body = {"inputs": [GOOD]}
            missing = await client.post("/v1/predict", json=body)
            wrong = await client.post("/v1/predict", json=body,
                                      headers={"authorization": "Bearer nope"})
            admin = await client.post("/v1/admin/reset")
            right = await client.post("/v1/predict", json=body,
                                      headers={"authorization": "Bearer s3cret"})
            state = await client.get("/v1/state")
            return missing, wrong, admin, right, state, metric(app, "adaptd_predictions_total")

    missing, wrong, admin, right, state, predictions = asyncio.run(scenario())
    assert missing.status_code == wrong.status_code == admin.status_code == 401
    assert "Authorization: Bearer" in missing.json()["detail"]
    assert right.status_code == 200 and state.status_code == 200
    assert predictions == 1


def test_every_error_answers_one_shape_with_detail_a_sentence():
    """`{"detail": <a sentence>}`, with `errors` (at most 10, `more_errors` counting the rest)
    for requests that do not fit the schema: from the routes, the schema checks, the token
    check, the body limit and Starlette's routing alike."""

    async def scenario():
        async with serving(api_token="s3cret", max_body_bytes=200_000) as (client, _):
            auth = {"authorization": "Bearer s3cret"}
            return {
                "401": await client.post("/v1/predict", json={"inputs": [GOOD]}),
                "404": await client.get("/v1/predictions"),
                "405": await client.get("/v1/predict"),
                "413": await client.post("/v1/predict", headers=auth,
                                         content=b"[" * 300_000),
                "415": await client.post("/v1/feedback/bulk", headers=auth, json={}),
                "422 schema": await client.post("/v1/feedback", headers=auth, json={
                    "labels": [{"id": "a b", "label": "x"}] * 8}),
                "422 json": await client.post("/v1/predict", content=b'{"inputs": [1,}',
                                              headers={**auth, **JSON}),
                "422 model": await client.post("/v1/predict", headers=auth,
                                               json={"inputs": [ROW]}),
            }

    replies = asyncio.run(scenario())
    for name, reply in replies.items():
        body = reply.json()
        assert str(reply.status_code) == name.split()[0], (name, reply.text)
        assert reply.headers["content-type"] == "application/json", name
        assert set(body) <= {"detail", "errors", "more_errors"} and isinstance(body["detail"], str)
        assert ("errors" in body) == (name in ("422 schema", "422 json")), name
    assert replies["405"].headers["allow"] == "POST"
    assert replies["405"].json()["detail"] == "this route does not take this method; it takes POST"
    assert replies["404"].json()["detail"] == "no route has this path: GET /openapi.json lists them"
    schema = replies["422 schema"].json()
    assert len(schema["errors"]) == 10 and schema["more_errors"] == 14
    assert schema["errors"][0] == {"type": "string_pattern_mismatch",
                                   "loc": ["body", "labels", 0, "id"],
                                   "msg": "String should match pattern '^[\\x21-\\x7e]{1,128}$'"}
    assert schema["detail"] == ("the request does not fit the schema: body.labels[0].id: String "
                                "should match pattern '^[\\x21-\\x7e]{1,128}$' (and 23 more "
                                "problems)")
    assert replies["422 json"].json()["detail"] == (
        "the request does not fit the schema: body, at offset 14: JSON decode error: unexpected "
        "character, expected a JSON value")
    assert replies["422 model"].json() == {"detail": "inputs[0] has shape [16, 16]; the model "
                                                     "takes samples of shape [1, 16, 16]"}


def test_only_routes_that_read_a_body_refuse_one_over_the_limit():
    """BodyLimit refuses a body by its Content-Length when the route reads it, so a route that
    takes no body answers as it would without one: 408 and 413 are declared where they occur."""

    async def scenario():
        async with serving(max_body_bytes=1000) as (client, _):
            big = b"x" * 5000
            return (await client.request("GET", "/healthz", content=big),
                    await client.post("/v1/admin/checkpoint", content=big),
                    await client.post("/v1/feedback", content=big,
                                      headers={"content-type": "application/json"}))

    healthz, checkpoint, feedback = asyncio.run(scenario())
    assert healthz.status_code == 200 and checkpoint.status_code == 200
    assert feedback.status_code == 413
    assert feedback.json() == {"detail": "the request body is larger than 1000 bytes: send less "
                                         "per request"}


def test_a_bug_answers_500_in_the_same_shape():
    async def scenario():
        async with serving() as (_, app):
            def broken() -> None:
                raise RuntimeError("a bug")

            app.state.runtime.engine.reset_adapter = broken
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://adaptd") as client:
                return await client.post("/v1/admin/reset")

    reply = asyncio.run(scenario())
    assert reply.status_code == 500
    assert reply.json() == {"detail": "the service failed on this request: a bug, its log has "
                                      "the traceback"}


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/feedback", "/v2/models/digits-cnn/infer"])
def test_a_client_that_leaves_before_its_body_arrives_is_a_499_not_a_500(path, caplog):
    messages = iter([{"type": "http.request", "body": b'{"inputs": [[', "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("adaptd", 80),
             "client": ("127.0.0.1", 5000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"999")]}

    async def scenario():
        async with serving() as (client, app):
            with caplog.at_level("ERROR"):
                await app(scope, receive, send)  # raises nothing: the disconnect is handled
            # nothing is held: the batcher let the request go, and the service still predicts
            inflight = app.state.runtime.batcher.inflight_requests
            reply = await client.post("/v1/predict", json={"inputs": [GOOD]})
            return app, inflight, reply

    app, inflight, reply = asyncio.run(scenario())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    template = path if path.startswith("/v1") else "/v2/models/{model_name}/infer"
    assert metric(app, "adaptd_http_requests_total", route=template, method="POST",
                  status="4xx") == 1
    assert metric(app, "adaptd_http_requests_total", route=template, method="POST",
                  status="5xx") == 0
    assert inflight == 0 and reply.status_code == 200
