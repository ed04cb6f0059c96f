"""The OpenAPI schema is the contract (issue 13): schemathesis makes requests for every route from
the schema the app serves, valid ones and invalid ones, sends them to the app in process (its
lifespan running) and checks every answer with all of its checks: no 5xx, only the statuses the
route declares, the declared content types, bodies and headers, invalid requests refused and
valid ones taken, the token enforced where it is declared, undeclared methods answered 405 with
`Allow`. Once with no token set, once with one.

Generated bodies almost never fit the demo model (a sample must be 1x16x16), so the answers of
requests that do (200 with a prediction, a join, a back-fill; 413) are checked the same way
with requests made here.

A bounded number of examples per route (derandomized, so CI runs the same requests every time)
keeps this to seconds; CI runs it (`slow`).
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.demo import digits_split
from tests.harness import settings_for

pytestmark = pytest.mark.slow

TOKEN = "s3cret"
MAX_EXAMPLES = 25
MAX_BODY_BYTES = 100_000
_, _, X_TEST, Y_TEST = digits_split()

# the statuses schemathesis expects for schema-valid data by default (its
# POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES)
VALID_DATA_STATUSES = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
# Routes whose schema-valid requests can still be refused with 422, for rules a schema that is
# the same for every model cannot state; `positive_data_acceptance` takes 422 from these, and
# only 422: a valid request refused in any other way still fails it.
MODEL_RULES = {
    # each sample must have the loaded model's input shape ([1, 16, 16] here, another for another
    # model: the schema's `Tensor` is numbers nested to any depth), and `ids`, when sent, must
    # hold one id per sample (JSON Schema cannot tie the lengths of two arrays together)
    "/v1/predict": "a sample of another shape than the model's, or not one id per sample",
    # a classifier's label is an integer class index below its number of classes (a regressor's
    # any number, or a list as long as its outputs): the schema can only say `number`
    "/v1/feedback": "a label the model cannot take",
    # the body is newline-delimited JSON, which the schema can only call a string
    "/v1/feedback/bulk": "a line that is not a label for the model",
}

# the bulk route's body, newline-delimited JSON, is text on the wire: a generated string as it is
schemathesis.serializer.alias("application/x-ndjson", "text/plain")


def _config(token: str | None) -> SchemathesisConfig:
    config: dict = {"operations": [
        {"include-path": path, "checks": {"positive_data_acceptance": {
            "expected-statuses": [*VALID_DATA_STATUSES, "422"]}}}
        for path in MODEL_RULES
    ]}
    if token is not None:  # sent on every request but those that check it is enforced
        config["auth"] = {"openapi": {"HTTPBearer": {"bearer": token}}}
    return SchemathesisConfig.from_dict(config)


def _schema(token: str | None) -> schemathesis.schemas.BaseSchema:
    """The schema the app serves (GET /openapi.json answers `app.openapi()`), sending requests to
    the app through schemathesis's ASGI client, which runs the app's lifespan (its pytest plugin
    ends it after each test)."""
    app = create_app(settings_for(api_token=token, max_body_bytes=MAX_BODY_BYTES,
                                  batcher={"max_request_samples": 8}))
    schema = schemathesis.openapi.from_dict(app.openapi(), config=_config(token))
    schema.app = app
    return schema


open_schema = _schema(None)
guarded_schema = _schema(TOKEN)

FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _call_and_validate(case: schemathesis.Case) -> schemathesis.Response:
    excluded = []
    query = case.query or {}
    if case.path == "/v1/events" and query.get("scope") == "deployment" and "before" in query:
        # `before` pages this replica's log; with scope=deployment it is a 422 (the schema
        # cannot tie one query parameter to another's value); every other valid query is taken
        excluded.append(positive_data_acceptance)
    return case.call_and_validate(excluded_checks=excluded)


@open_schema.parametrize()
@FUZZ
def test_every_answer_without_a_token_is_one_the_schema_declares(case: schemathesis.Case) -> None:
    _call_and_validate(case)


@guarded_schema.parametrize()
@FUZZ
def test_every_answer_with_a_token_is_one_the_schema_declares(case: schemathesis.Case) -> None:
    _call_and_validate(case)


# --- requests that fit the model ----------------------------------------------------------------

# made-up cases carry the token themselves (the configured one goes on generated cases only)
MODES = {"open": (open_schema, {}), "token": (guarded_schema, {"Authorization": f"Bearer {TOKEN}"})}
IDS = st.lists(st.from_regex(r"[\x21-\x7e]{1,20}", fullmatch=True), min_size=1, max_size=8,
               unique=True)


def _ndjson(labels: list[dict]) -> str:
    return "".join(json.dumps(label) + "\n" for label in labels)


@pytest.mark.parametrize("mode", sorted(MODES))
@given(ids=IDS, first=st.integers(0, len(X_TEST) - 8), scale=st.floats(-1e3, 1e3),
       send_ids=st.booleans())
@FUZZ
def test_predictions_and_their_labels_get_answers_the_schema_declares(
    mode: str, ids: list[str], first: int, scale: float, send_ids: bool,
) -> None:
    schema, auth = MODES[mode]
    samples = (X_TEST[first:first + len(ids)] * scale).tolist()
    body: dict = {"inputs": samples, "ids": ids} if send_ids else {"inputs": samples}
    predicted = _call_and_validate(schema["/v1/predict"]["POST"].Case(body=body, headers=auth))
    assert predicted.status_code == 200, predicted.text
    served = [row["id"] for row in predicted.json()["predictions"]]
    assert len(served) == len(ids) and (served == ids or not send_ids)
    labels = [{"id": i, "label": int(y)} for i, y in zip(served, Y_TEST[first:], strict=False)]
    half = len(labels) // 2
    joined = _call_and_validate(schema["/v1/feedback"]["POST"].Case(
        body={"labels": [*labels[:half], {"id": "never-predicted", "label": 1}]}, headers=auth))
    assert joined.status_code == 200, joined.text
    assert joined.json()["joined"] == half
    filled = _call_and_validate(schema["/v1/feedback/bulk"]["POST"].Case(  # half of them again
        body=_ndjson(labels), media_type="application/x-ndjson", headers=auth))
    assert filled.status_code == 200, filled.text
    assert filled.json()["duplicate"] == half


@pytest.mark.parametrize("mode", sorted(MODES))
def test_bodies_over_the_limit_get_the_413_the_schema_declares(mode: str) -> None:
    schema, auth = MODES[mode]
    labels = [{"id": f"label-{i}", "label": 1} for i in range(5000)]
    cases = [
        schema["/v1/predict"]["POST"].Case(body={"inputs": X_TEST[:8].tolist() * 6},
                                           headers=auth),
        schema["/v1/feedback"]["POST"].Case(body={"labels": labels}, headers=auth),
        schema["/v1/feedback/bulk"]["POST"].Case(body=_ndjson(labels),
                                                 media_type="application/x-ndjson", headers=auth),
    ]
    for case in cases:
        reply = _call_and_validate(case)
        assert reply.status_code == 413, (case.path, reply.text)
