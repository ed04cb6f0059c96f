"""POST /v1/predict.

The body is read raw and parsed in a worker thread (`service.predict_body`), so a large or
malformed body never holds the event loop (a small one, up to `INLINE_PARSE_BYTES`, is parsed
on the loop: the hand-off would cost more than the parse; one above
`batcher.parse_process_bytes` in a process of its own, `Runtime.parse_process`);
`PredictRequest` documents it in the OpenAPI schema.
`run_admitted` is the path every predicting route takes into the micro-batcher (the Open
Inference Protocol's infer too, `service.routes.oip`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Annotated, Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError

from service.batcher import BatcherStopped, Overloaded, PredictionFailed
from service.deps import get_runtime, require_token
from service.inputs import InvalidInput
from service.predict_body import SampleEstimate, SchemaErrors, parse_predict
from service.predictor import RECORDED_HEADER_SCHEMA, PredictionRow, recorded_headers
from service.routes import BODY_LIMITS, RETRY_AFTER, STARTING, UNAUTHORIZED, Responses, error
from service.runtime import Runtime
from service.schemas import PredictRequest, PredictResponse

router = APIRouter(tags=["inference"])

SCHEMA_REF = "#/components/schemas/{model}"
# a body up to this size is parsed on the event loop: its parse (tens of microseconds for the
# demo model's few images) costs less than handing it to a worker thread and back; a larger one
# is parsed in a thread (or, over batcher.parse_process_bytes, in the parse process), so no body
# holds the loop for long
INLINE_PARSE_BYTES = 16 * 1024

T = TypeVar("T")


def request_schemas() -> dict[str, Any]:
    """`PredictRequest` and the schemas it refers to (`Tensor`), for the OpenAPI components."""
    schema = PredictRequest.model_json_schema(ref_template=SCHEMA_REF)
    return {**schema.pop("$defs", {}), "PredictRequest": schema}


RESPONSES: Responses = {
    200: {"description": "the predictions", "headers": RECORDED_HEADER_SCHEMA},
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
    content_type = request.headers.get("content-type")
    model = runtime.model
    limit = runtime.settings.batcher.max_request_samples

    # a function of module level with its arguments, so a large body can be parsed in the
    # runtime's parse process (`Runtime.parse_process`)
    parse = functools.partial(parse_predict, content_type=content_type,
                              input_shape=tuple(model.input_shape), limit=limit,
                              max_abs=model.max_abs_input)
    try:
        _, rows = await run_admitted(request, runtime, "sample_estimate", parse,
                                     group_of=lambda group: group, picklable=True)
    except SchemaErrors as exc:
        raise RequestValidationError(exc.errors) from None
    except (InvalidInput, PredictionFailed) as exc:
        raise HTTPException(422, str(exc)) from None
    except Overloaded as exc:
        raise overloaded(exc) from None
    except BatcherStopped as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    # the rows are dataclasses with PredictResponse's fields, in its order: orjson writes the
    # same JSON as the model would, without a pydantic object per row (256 rows: 1 ms, not 60)
    body = orjson.dumps({"predictions": rows}, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json", headers=recorded_headers(rows))


async def run_admitted(
    request: Request, runtime: Runtime, estimate_name: str,
    parse: Callable[[bytes], tuple[np.ndarray, list[str], T]],
    group_of: Callable[[T], str | None] = lambda _: None,
    picklable: bool = False,
) -> tuple[T, list[PredictionRow]]:
    """The admission path of every route that predicts (POST /v1/predict, the Open Inference
    Protocol's infer): let the request in before its body is read, parse the body in a worker
    thread (`parse` gives the batch, one id per sample, and whatever else the route needs), and
    wait for its rows from the micro-batcher. Raises what `parse` raises, and `Overloaded`,
    `PredictionFailed` or `BatcherStopped`; the route turns them into its own answers.
    `estimate_name` keeps this route's estimate of samples per body byte apart from the others'
    (a raw tensor takes fewer bytes per number than JSON); `group_of` picks the group the request
    names (conformal.mondrian = "group") out of what `parse` gave. A `picklable` parse of a large
    body runs in the runtime's parse process (`Runtime.parse_process`)."""
    estimate = _sample_estimate(request, runtime, estimate_name)
    try:
        # in flight from now, before the body is read, holding the room its samples likely need
        # in the queue: a full batcher refuses at once, without reading or parsing the body
        admission = runtime.batcher.admit(estimate.samples(_content_length(request)))
    except Overloaded:
        # the answer waits for the body, unread, so that the client is done sending and reads it
        # (a connection closed on a client still sending can lose the answer)
        async for _ in request.stream():
            pass
        raise
    with admission:
        body = await request.body()
        batch, ids, parsed = await _parsed(runtime, parse, body, picklable)
        estimate.learn(len(body), len(ids))
        rows = await runtime.batcher.submit(batch, ids, admission, group_of(parsed))
    return parsed, rows


async def _parsed(runtime: Runtime, parse: Callable[[bytes], tuple[np.ndarray, list[str], T]],
                  body: bytes, picklable: bool) -> tuple[np.ndarray, list[str], T]:
    """`parse(body)` on the event loop (a small body), in the runtime's parse process (a large
    one, when `parse` can be pickled and the process is on) or in a worker thread."""
    if len(body) <= INLINE_PARSE_BYTES:
        return parse(body)
    parsers = runtime.parse_process(len(body)) if picklable else None
    if parsers is not None:
        try:  # the submit starts the process at the first large body
            pending = asyncio.get_running_loop().run_in_executor(parsers, parse, body)
        except (OSError, RuntimeError) as exc:  # it could not start (no memory, no pids left)
            runtime.parse_process_failed(parsers, exc)
        else:
            try:
                return await pending
            except BrokenProcessPool as exc:  # it died
                runtime.parse_process_failed(parsers, exc)
    return await asyncio.to_thread(parse, body)


def _sample_estimate(request: Request, runtime: Runtime, name: str) -> SampleEstimate:
    """This app's estimate of samples per body size for one route, for this runtime's model."""
    estimate: SampleEstimate | None = getattr(request.app.state, name, None)
    if estimate is None or estimate.limit != runtime.settings.batcher.max_request_samples:
        estimate = SampleEstimate(runtime.model.input_shape,
                                  runtime.settings.batcher.max_request_samples)
        setattr(request.app.state, name, estimate)
    return estimate


def _content_length(request: Request) -> int | None:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


def overloaded(exc: Overloaded) -> HTTPException:
    """The 503 for a request the micro-batcher refused, with the Retry-After it asks for."""
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc),
                         headers={"Retry-After": str(exc.retry_after_s)})
