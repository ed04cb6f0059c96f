"""POST /v1/predict.

The body is read raw and parsed in a worker thread (`service.predict_body`), so a large or
malformed body never holds the event loop; `PredictRequest` documents it in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError

from service.batcher import BatcherStopped, Overloaded, PredictionFailed
from service.deps import get_runtime, require_token
from service.inputs import InvalidInput
from service.predict_body import SampleEstimate, SchemaErrors, parse_predict
from service.routes import BODY_LIMITS, RETRY_AFTER, STARTING, UNAUTHORIZED, Responses, error
from service.runtime import Runtime
from service.schemas import PredictRequest, PredictResponse

router = APIRouter(tags=["inference"])

SCHEMA_REF = "#/components/schemas/{model}"


def request_schemas() -> dict[str, Any]:
    """`PredictRequest` and the schemas it refers to (`Tensor`), for the OpenAPI components."""
    schema = PredictRequest.model_json_schema(ref_template=SCHEMA_REF)
    return {**schema.pop("$defs", {}), "PredictRequest": schema}


RESPONSES: Responses = {
    **UNAUTHORIZED,
    **BODY_LIMITS,
    422: error("inputs that do not fit the model or the schema: `detail` says what to change; "
               "for a body that is not JSON or does not match the schema, `errors` lists the "
               "first problems"),
    503: error("the micro-batcher is full (batcher.max_queued_samples or "
               "batcher.max_inflight_requests): nothing ran, retry after Retry-After seconds; or "
               + STARTING, headers=RETRY_AFTER),
}


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    dependencies=[Depends(require_token)],
    responses=RESPONSES,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": SCHEMA_REF.format(model="PredictRequest")}}}}},
)
async def predict(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    """Predict a batch of samples; each gets an id, its prediction and the versions that made it."""
    limit = runtime.settings.batcher.max_request_samples
    estimate = _sample_estimate(request, runtime)
    try:
        # in flight from now, before the body is read, holding the room its samples likely need
        # in the queue: a full batcher refuses at once, without reading or parsing the body
        admission = runtime.batcher.admit(estimate.samples(_content_length(request)))
    except Overloaded as exc:
        # the answer waits for the body, unread, so that the client is done sending and reads it
        # (a connection closed on a client still sending can lose the answer)
        async for _ in request.stream():
            pass
        raise _overloaded(exc) from None
    try:
        with admission:
            body = await request.body()
            batch, ids = await asyncio.to_thread(
                parse_predict, body, request.headers.get("content-type"),
                runtime.model.input_shape, limit, runtime.model.max_abs_input,
            )
            estimate.learn(len(body), len(ids))
            rows = await runtime.batcher.submit(batch, ids, admission)
    except SchemaErrors as exc:
        raise RequestValidationError(exc.errors) from None
    except InvalidInput as exc:
        raise HTTPException(422, str(exc)) from None
    except Overloaded as exc:
        raise _overloaded(exc) from None
    except PredictionFailed as exc:
        raise HTTPException(422, str(exc)) from None
    except BatcherStopped as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    # the rows are dataclasses with PredictResponse's fields, in its order: orjson writes the
    # same JSON as the model would, without a pydantic object per row (256 rows: 1 ms, not 60)
    body = orjson.dumps({"predictions": rows}, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json")


def _sample_estimate(request: Request, runtime: Runtime) -> SampleEstimate:
    """This app's estimate of samples per body size, for this runtime's model."""
    estimate: SampleEstimate | None = getattr(request.app.state, "sample_estimate", None)
    if estimate is None or estimate.limit != runtime.settings.batcher.max_request_samples:
        estimate = SampleEstimate(runtime.model.input_shape,
                                  runtime.settings.batcher.max_request_samples)
        request.app.state.sample_estimate = estimate
    return estimate


def _content_length(request: Request) -> int | None:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


def _overloaded(exc: Overloaded) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc),
                         headers={"Retry-After": str(exc.retry_after_s)})
