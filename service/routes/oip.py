"""The Open Inference Protocol (KServe v2) over HTTP, beside the v1 routes and on the same parts.

`POST /v2/models/{name}/infer` takes the path of `POST /v1/predict` (`run_admitted`: admitted
before its body is read, parsed in a worker thread, the same input checks, the same
micro-batcher, engine, store and calibrator) and answers the outputs as tensors, raw where the
binary tensor data extension asks. Every error under /v2 is `{"error": ...}`
(`service.app.error_response`).

The feedback extension: labels are an inference request to a second model, `{name}.feedback`,
whose inputs are `id` (BYTES, the prediction ids an answer gave in its `prediction_ids`
parameter) and `label`, and whose output `outcome` says per label joined, unknown, duplicate,
expired or rejected; the counts come in the answer's parameters. It is the join of
`POST /v1/feedback`, so any OIP client (tritonclient unchanged) can send labels.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse

from service import oip
from service.batcher import BatcherStopped, Overloaded, PredictionFailed
from service.deps import get_runtime, require_token
from service.inputs import InvalidInput, checked_values, id_problem, label_problem, prediction_ids
from service.model import LoadedModel
from service.predictor import RECORDED_HEADER_SCHEMA, PredictionRow, recorded_headers
from service.routes import BODY_LIMITS, RETRY_AFTER, STARTING, UNAUTHORIZED, Responses
from service.routes.feedback import unavailable
from service.routes.inference import SCHEMA_REF, overloaded, run_admitted
from service.routes.status import adapter_state, readyz
from service.runtime import Runtime
from service.schemas import GROUP_PATTERN, MAX_GROUP_LENGTH
from store import JoinResult, LabelValue, PartialJoin, StoreUnavailable

router = APIRouter(tags=["open inference protocol"])

SERVER_NAME = "adaptd"
PLATFORM = "pytorch"
FEEDBACK_SUFFIX = ".feedback"
EXTENSIONS = ["binary_tensor_data", "classification", "feedback"]
INPUT = "input"
GROUP_MATCH = re.compile(GROUP_PATTERN)
# the order a label's outcomes are handed out in (`_outcomes`)
OUTCOMES = ("joined", "rejected", "expired", "unknown", "duplicate")


def request_schemas() -> dict[str, Any]:
    """`InferenceRequest` and the schemas it refers to, for the OpenAPI components."""
    schema = oip.InferenceRequest.model_json_schema(ref_template=SCHEMA_REF)
    return {**schema.pop("$defs", {}), "InferenceRequest": schema}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"model": oip.InferenceErrorResponse, "description": description}
    if headers:
        response["headers"] = headers
    return response


NOT_FOUND = "no model of this name (the served model, or `<model>.feedback`), or no such version"
STARTING_503: Responses = {503: _error(STARTING)}
INFER_RESPONSES: Responses = {
    200: {
        "description": "the outputs; raw after the JSON (`application/octet-stream`) when any "
                       "was asked for as binary data, the JSON's length in "
                       "Inference-Header-Content-Length",
        "headers": {oip.HEADER_LENGTH: {
            "description": "the length of the JSON part, when raw outputs follow it",
            "schema": {"type": "integer"}}} | RECORDED_HEADER_SCHEMA,
        "content": {"application/json": {},
                    oip.BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    400: _error("the request breaks the protocol or does not fit the model (shape, datatype, "
                "values, ids, labels): nothing ran and nothing changed"),
    404: _error(NOT_FOUND),
    # the v1 answers of the token check and the body limits, in the protocol's shape
    **{code: {**answer, "model": oip.InferenceErrorResponse}
       for code, answer in {**UNAUTHORIZED, **BODY_LIMITS}.items()},
    503: _error("the micro-batcher is full: nothing ran, retry after Retry-After seconds; the "
                "store is unavailable (labels: send them again); or " + STARTING,
                headers=RETRY_AFTER),
}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": SCHEMA_REF.format(model="InferenceRequest")}},
    oip.BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
}}, "parameters": [{
    "name": oip.HEADER_LENGTH, "in": "header", "required": False,
    "description": "the length of the JSON part when raw input tensors follow it",
    "schema": {"type": "integer", "minimum": 1}}]}


# --- server -------------------------------------------------------------------------------------

@router.get("/v2", response_model=oip.ServerMetadataResponse)
async def server_metadata(request: Request) -> oip.ServerMetadataResponse:
    """The server's name, version and the protocol extensions it speaks."""
    return oip.ServerMetadataResponse(name=SERVER_NAME, version=request.app.version,
                                      extensions=EXTENSIONS)


@router.get("/v2/health/live", response_model=oip.ServerLiveResponse)
async def server_live() -> oip.ServerLiveResponse:
    """Liveness: the process answers (as GET /healthz)."""
    return oip.ServerLiveResponse(live=True)


@router.get("/v2/health/ready", response_model=oip.ServerReadyResponse,
            responses={503: {"model": oip.ServerReadyResponse,
                             "description": "not ready: GET /readyz says why"}})
async def server_ready(request: Request) -> JSONResponse:
    """Readiness, as GET /readyz decides it: the model is loaded and the store takes writes."""
    ready = await _ready(request)
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def _ready(request: Request) -> bool:
    return (await readyz(request)).status_code == status.HTTP_200_OK


# --- models -------------------------------------------------------------------------------------

@dataclass
class Served:
    """What a model name in a path stands for: the served model, or its feedback companion."""

    name: str
    feedback: bool


def _resolve(request: Request, model_name: str, version: str | None) -> Served:
    """The model a path names, or 404."""
    served = request.app.state.settings.model.name
    if model_name not in (served, served + FEEDBACK_SUFFIX):
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no model {model_name[:80]!r}: this server serves {served!r} (and "
                            f"takes its labels as {served + FEEDBACK_SUFFIX!r})")
    runtime = getattr(request.app.state, "runtime", None)
    if version is not None and runtime is not None and version != runtime.model.version:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"model {model_name!r} has no version {version[:80]!r}; it serves "
                            f"{runtime.model.version!r}")
    return Served(model_name, model_name != served)


@router.get("/v2/models/{model_name}", response_model=oip.ModelMetadataResponse,
            response_model_exclude_none=True,
            responses={404: _error(NOT_FOUND), **STARTING_503})
async def model_metadata(
    model_name: str, request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> oip.ModelMetadataResponse:
    """The model's inputs and outputs (with their shapes and datatypes), version and platform."""
    return _metadata(runtime, _resolve(request, model_name, None))


@router.get("/v2/models/{model_name}/versions/{model_version}",
            response_model=oip.ModelMetadataResponse, response_model_exclude_none=True,
            responses={404: _error(NOT_FOUND), **STARTING_503})
async def model_version_metadata(
    model_name: str, model_version: str, request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
) -> oip.ModelMetadataResponse:
    """The metadata of this version of the model (the one it serves)."""
    return _metadata(runtime, _resolve(request, model_name, model_version))


@router.get("/v2/models/{model_name}/ready", response_model=oip.ModelReadyResponse,
            responses={404: _error(NOT_FOUND), 503: {
                "model": oip.ModelReadyResponse,
                "description": "the model is not ready: GET /readyz says why"}})
async def model_ready(model_name: str, request: Request) -> JSONResponse:
    """Whether the model takes requests now (the server's readiness: one model, one server)."""
    return await _model_ready(request, _resolve(request, model_name, None))


@router.get("/v2/models/{model_name}/versions/{model_version}/ready",
            response_model=oip.ModelReadyResponse,
            responses={404: _error(NOT_FOUND), 503: {
                "model": oip.ModelReadyResponse,
                "description": "the model is not ready: GET /readyz says why"}})
async def model_version_ready(model_name: str, model_version: str,
                              request: Request) -> JSONResponse:
    """Whether this version of the model takes requests now."""
    return await _model_ready(request, _resolve(request, model_name, model_version))


async def _model_ready(request: Request, served: Served) -> JSONResponse:
    ready = await _ready(request)
    return JSONResponse({"name": served.name, "ready": ready},
                        status_code=200 if ready else 503)


def _metadata(runtime: Runtime, served: Served) -> oip.ModelMetadataResponse:
    model = runtime.model
    parameters: dict[str, Any] = {"task": model.task.name,
                                  "adapter": runtime.settings.adapter.name,
                                  "adapter_version": adapter_state(runtime).version,
                                  "feedback_model": model.name + FEEDBACK_SUFFIX}
    if runtime.conformal is not None:
        parameters["level"] = 1 - runtime.conformal.alpha
        if model.task.discrete:
            parameters["set_encoding"] = "BOOL mask over the classes"
    if served.feedback:
        inputs = [oip.MetadataTensor(name=spec.name, datatype=datatype, shape=spec.shape)
                  for spec, datatype in zip(_label_specs(model, 1),
                                            ("BYTES", _label_datatype(model)), strict=True)]
        outputs = [oip.MetadataTensor(name="outcome", datatype="BYTES", shape=[-1])]
    else:
        inputs = [oip.MetadataTensor(name=INPUT, datatype="FP32",
                                     shape=[-1, *model.input_shape])]
        outputs = [oip.MetadataTensor(name=name, datatype=datatype, shape=shape)
                   for name, (datatype, shape) in _output_specs(runtime).items()]
    return oip.ModelMetadataResponse(name=served.name, versions=[model.version],
                                     platform=PLATFORM, inputs=inputs, outputs=outputs,
                                     parameters=parameters)


def _output_specs(runtime: Runtime) -> dict[str, tuple[str, list[int]]]:
    """The outputs the model gives, in their default order: datatype and shape (-1: the batch)."""
    model = runtime.model
    calibrated = runtime.conformal is not None
    if model.task.discrete:
        specs = {"probabilities": ("FP32", [-1, model.width]), "prediction": ("INT64", [-1])}
        if calibrated:
            specs["set"] = ("BOOL", [-1, model.width])
        return specs
    values = [-1] if model.width == 1 else [-1, model.width]
    specs = {"prediction": ("FP32", values)}
    if calibrated:
        specs["interval"] = ("FP32", [*values, 2])
    return specs


# --- inference ----------------------------------------------------------------------------------

@router.post("/v2/models/{model_name}/infer", dependencies=[Depends(require_token)],
             response_model=oip.InferenceResponse, responses=INFER_RESPONSES,
             openapi_extra=INFER_BODY)
async def infer(
    model_name: str, request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    """Predict a batch (the model) or join labels (`<model>.feedback`); JSON or raw tensors."""
    return await _infer(request, runtime, _resolve(request, model_name, None))


@router.post("/v2/models/{model_name}/versions/{model_version}/infer",
             dependencies=[Depends(require_token)], response_model=oip.InferenceResponse,
             responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
async def infer_version(
    model_name: str, model_version: str, request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
) -> Response:
    """Inference on this version of the model (the one it serves)."""
    return await _infer(request, runtime, _resolve(request, model_name, model_version))


async def _infer(request: Request, runtime: Runtime, served: Served) -> Response:
    if served.feedback:
        return await _labels(request, runtime, served)
    model = runtime.model
    limit = runtime.settings.batcher.max_request_samples
    max_bytes = request.app.state.settings.max_body_bytes
    header_length = request.headers.get(oip.HEADER_LENGTH)
    encoding = request.headers.get("content-encoding")
    outputs = _output_specs(runtime)

    def parse(body: bytes) -> tuple[np.ndarray, list[str], oip.ParsedRequest]:
        body = oip.decompressed(body, encoding, max_bytes)
        spec = oip.TensorSpec(INPUT, [-1, *model.input_shape], max_batch=limit)
        parsed = oip.read_request(body, header_length, [spec], list(outputs),
                                  limit * math.prod(model.input_shape),
                                  scores="probabilities" if model.task.discrete else None)
        with np.errstate(over="ignore"):
            batch = parsed.inputs[INPUT].values.astype(np.float32)
        _check_group(parsed.parameters)
        try:
            batch = checked_values(batch, model.max_abs_input, name=INPUT)
            ids = prediction_ids(_requested_ids(parsed.parameters), len(batch))
        except InvalidInput as exc:
            raise oip.ProtocolError(str(exc)) from None
        return batch, ids, parsed

    try:
        parsed, rows = await run_admitted(request, runtime, "oip_sample_estimate", parse,
                                          group_of=lambda parsed: parsed.parameters.get("group"))
        body, header = await asyncio.to_thread(_answer, model, outputs, parsed, rows)
    except (oip.ProtocolError, PredictionFailed) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    except oip.InflatedTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except Overloaded as exc:
        raise overloaded(exc) from None
    except BatcherStopped as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    return _reply(body, header, recorded_headers(rows))


def _requested_ids(parameters: dict[str, Any]) -> list[str] | None:
    """The samples' ids from the request parameter `prediction_ids` (separated by spaces, which
    no id holds), checked as `POST /v1/predict` checks `ids`; None when not given."""
    given = parameters.get("prediction_ids")
    if given is None:
        return None
    if not isinstance(given, str):
        raise oip.ProtocolError("prediction_ids must be a string of ids separated by spaces")
    ids = given.split()
    for prediction_id in ids:
        problem = id_problem(prediction_id)
        if problem is not None:
            raise oip.ProtocolError(f"prediction_ids: {problem}")
    return ids


def _check_group(parameters: dict[str, Any]) -> None:
    """The request parameter `group`: the group the samples belong to, as `group` in a
    `POST /v1/predict` body (conformal.mondrian = "group")."""
    group = parameters.get("group")
    if group is not None and (not isinstance(group, str) or not GROUP_MATCH.fullmatch(group)):
        raise oip.ProtocolError(f"group must be 1 to {MAX_GROUP_LENGTH} printable ASCII "
                                "characters without spaces")


def _answer(model: LoadedModel, specs: dict[str, tuple[str, list[int]]],
            request: oip.ParsedRequest, rows: list[PredictionRow]) -> tuple[bytes, int | None]:
    """The answer to an inference: the rows as output tensors (`specs`: the ones the model
    gives, `_output_specs`), the ids and versions as parameters."""
    outputs: dict[str, oip.Output] = {}
    if model.task.discrete:
        outputs["probabilities"] = oip.Output("FP32", np.array(
            [row.probabilities for row in rows], dtype=np.float32))
        outputs["prediction"] = oip.Output("INT64", np.array(
            [row.prediction for row in rows], dtype=np.int64))
        if "set" in specs:
            mask = np.zeros((len(rows), model.width), dtype=bool)
            for index, row in enumerate(rows):
                mask[index, row.set or []] = True
            outputs["set"] = oip.Output("BOOL", mask)
    else:
        outputs["prediction"] = oip.Output("FP32", np.array(
            [row.prediction for row in rows], dtype=np.float32))
        if "interval" in specs:
            outputs["interval"] = oip.Output("FP32", np.array(
                [row.interval for row in rows], dtype=np.float32))
    parameters: dict[str, Any] = {"prediction_ids": " ".join(row.id for row in rows),
                                  "adapter_version": rows[0].adapter_version}
    if rows[0].level is not None:
        parameters["level"] = rows[0].level
    classes = model.class_names if model.task.discrete else None
    return oip.answer(model.name, model.version, request, outputs, parameters, classes)


def _reply(body: bytes, header: int | None, headers: dict[str, str] | None = None) -> Response:
    headers = headers or {}
    if header is None:
        return Response(body, media_type="application/json", headers=headers)
    return Response(body, media_type=oip.BINARY_MEDIA_TYPE,
                    headers={oip.HEADER_LENGTH: str(header)} | headers)


# --- the feedback extension ---------------------------------------------------------------------

def _label_datatype(model: LoadedModel) -> str:
    return "INT64" if model.task.discrete else "FP64"


def _label_specs(model: LoadedModel, limit: int) -> list[oip.TensorSpec]:
    """`id` (one per label) and `label`: a class index, a value, or a row of values for a
    regressor of several outputs, in any numeric datatype but BOOL (a label is a number, and
    /v1/feedback refuses booleans too); at most `limit` (feedback.max_labels_per_request)."""
    label_shape = [-1] if model.task.discrete or model.width == 1 else [-1, model.width]
    numbers = tuple(datatype for datatype in oip.NUMERIC_TYPES if datatype != "BOOL")
    return [oip.TensorSpec("id", [-1], limit, ("BYTES",)),
            oip.TensorSpec("label", label_shape, limit, numbers)]


Labels = list[tuple[str, LabelValue]]


def _read_labels(body: bytes, header_length: str | None, encoding: str | None, max_bytes: int,
                 model: LoadedModel, limit: int) -> tuple[oip.ParsedRequest, Labels]:
    """The labels of a feedback request, each checked against the model as /v1/feedback checks
    them; nothing is applied when one does not fit."""
    body = oip.decompressed(body, encoding, max_bytes)
    parsed = oip.read_request(body, header_length, _label_specs(model, limit), ["outcome"],
                              limit * model.width)
    ids = parsed.inputs["id"].values
    values = parsed.inputs["label"].values.astype(np.float64)
    if len(ids) != len(values):
        raise oip.ProtocolError(f"{len(ids)} ids for {len(values)} labels: send one id per "
                                "label")
    labels: Labels = []
    for index, (prediction_id, value) in enumerate(zip(ids.tolist(), values.tolist(),
                                                       strict=True)):
        problem = id_problem(prediction_id)
        if problem is not None:
            raise oip.ProtocolError(f"id[{index}]: {problem}")
        problem = label_problem(value, model)
        if problem is not None:
            raise oip.ProtocolError(f"label[{index}] {problem}")
        labels.append((prediction_id, value))
    return parsed, labels


async def _labels(request: Request, runtime: Runtime, served: Served) -> Response:
    """Labels for earlier predictions, joined as `POST /v1/feedback` joins them."""
    model = runtime.model
    body = await request.body()
    try:
        parsed, labels = await asyncio.to_thread(
            _read_labels, body, request.headers.get(oip.HEADER_LENGTH),
            request.headers.get("content-encoding"), request.app.state.settings.max_body_bytes,
            model, runtime.settings.feedback.max_labels_per_request)
    except oip.ProtocolError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    except oip.InflatedTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    try:
        result = await runtime.feedback.apply(labels)
    except StoreUnavailable as exc:
        done = len(labels) - len(exc.pending) if isinstance(exc, PartialJoin) else 0
        raise unavailable(f"POST /v2/models/{served.name}/infer", exc, len(labels),
                          done) from None
    counts = {"joined": len(result.joined), "unknown": len(result.unknown),
              "duplicate": len(result.duplicate), "expired": len(result.expired),
              "rejected": len(result.rejected)}
    outcome = oip.Output("BYTES", np.array(_outcomes(labels, result), dtype=str))
    reply, header = oip.answer(served.name, model.version, parsed, {"outcome": outcome}, counts)
    return _reply(reply, header)


def _outcomes(labels: Labels, result: JoinResult) -> list[str]:
    """Each label's outcome, in the order sent. The join reports ids by outcome; an id sent
    more than once is joined (or rejected) once and a duplicate after that."""
    pending = {"joined": Counter(record.id for record in result.joined),
               "rejected": Counter(result.rejected), "expired": Counter(result.expired),
               "unknown": Counter(result.unknown), "duplicate": Counter(result.duplicate)}
    outcomes = []
    for prediction_id, _ in labels:
        outcome = next((name for name in OUTCOMES if pending[name][prediction_id] > 0),
                       "duplicate")
        pending[outcome][prediction_id] -= 1
        outcomes.append(outcome)
    return outcomes
