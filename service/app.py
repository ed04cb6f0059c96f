"""The FastAPI application, built by `create_app` from settings."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.utils import is_body_allowed_for_status_code
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics
from service.model import ModelLoadError
from service.predict_body import not_utf8
from service.routes import admin, events, feedback, inference, oip, page, status
from service.runtime import Runtime
from service.schemas import MAX_REPORTED_ERRORS, ErrorResponse, SchemaError
from service.settings import Settings, load_settings

# the methods `adaptd_http_requests_total` names; any other is counted as "other", so a client
# cannot add series by making methods up
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
# what a request whose client left before its body arrived counts as (nginx's code for it)
CLIENT_CLOSED_REQUEST = 499

log = logging.getLogger("adaptd")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for these settings (by default, loaded from the environment and config file)."""
    settings = settings or load_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            runtime = await Runtime.start(settings, metrics)
        except (ModelLoadError, ValueError) as error:
            # what to change, on one line, before uvicorn's own report of the failed start-up
            log.error("adaptd cannot start: %s", error)
            raise
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            await runtime.stop()

    app = FastAPI(
        title="adaptd",
        version="0.1.0",
        summary="A PyTorch model served over HTTP that adapts online to drifting data.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    # requests other than GET, HEAD and OPTIONS answered so far: GET /v1/state reuses its last
    # answer only while this has not moved, so a client reads its own writes
    app.state.changes = 0
    app.include_router(inference.router)
    app.include_router(feedback.router)
    app.include_router(status.router)
    app.include_router(events.router)
    app.include_router(admin.router)
    app.include_router(oip.router)
    app.include_router(page.router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_left)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=metrics)
    _complete_openapi(app, token_required=settings.api_token is not None)
    return app


def _complete_openapi(app: FastAPI, token_required: bool) -> None:
    """What FastAPI's schema leaves out. POST /v1/predict reads its body raw (see
    `service.predict_body`), so FastAPI does not list `PredictRequest` and its `Tensor`: add them
    to the components, where the route's `openapi_extra` points; the same for the Open Inference
    Protocol's `InferenceRequest`, whose routes answer no 422. And without a token
    (`api_token` unset) the write routes take requests without one: their bearer token is
    optional (`{}` among the alternatives), as OpenAPI says it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(inference.request_schemas())
            components.update(oip.request_schemas())
            for name, path in schema.get("paths", {}).items():
                if speaks_oip(name):
                    # FastAPI's 422 for path parameters, which are plain strings there: the
                    # protocol's routes refuse a request with 400 or 404, never 422
                    for operation in path.values():
                        operation.get("responses", {}).pop("422", None)
            if not token_required:
                for path in schema.get("paths", {}).values():
                    for operation in path.values():
                        if operation.get("security"):
                            operation["security"].append({})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def error_response(status_code: int, detail: str, headers: Mapping[str, str] | None = None,
                   errors: list[SchemaError] | None = None, more_errors: int | None = None,
                   path: str = "") -> Response:
    """The answer to every error: an `ErrorResponse` (fields that say nothing left out); under
    /v2, the Open Inference Protocol's `{"error": ...}` (`detail`, with no list of problems)."""
    if not is_body_allowed_for_status_code(status_code):
        return Response(status_code=status_code, headers=headers)
    if speaks_oip(path):
        return JSONResponse({"error": detail}, status_code=status_code, headers=headers)
    body = ErrorResponse(detail=detail, errors=errors, more_errors=more_errors)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status_code,
                        headers=headers)


def speaks_oip(path: str) -> bool:
    """Whether `path` is under the Open Inference Protocol's /v2, whose errors it shapes."""
    return path == "/v2" or path.startswith("/v2/")


def _where(loc: tuple[str | int, ...] | list[str | int]) -> str:
    """A validation error's `loc` as one would write it: `body.labels[0].id`, `query.limit`;
    a body that is not JSON at offset 14: `body, at offset 14`."""
    text = ""
    for index, part in enumerate(loc):
        if isinstance(part, int):
            text += f", at offset {part}" if index == 1 and len(loc) == 2 else f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "the request"


async def _validation_error(request: Request, exc: Exception) -> Response:
    """A request that does not fit the schema: its first problem in `detail`, and the first
    `MAX_REPORTED_ERRORS` in `errors` (type, loc, msg: never the input, which may be huge)."""
    assert isinstance(exc, RequestValidationError)
    found = exc.errors()
    errors = [SchemaError.model_validate(jsonable_encoder(
        {k: v for k, v in error.items() if k in ("type", "loc", "msg")}))
        for error in found[:MAX_REPORTED_ERRORS]]
    path = request.url.path
    if not errors:  # not raised so by FastAPI nor by adaptd; a sentence all the same
        return error_response(422, "the request does not fit the schema", path=path)
    first = errors[0]
    detail = f"the request does not fit the schema: {_where(first.loc)}: {first.msg}"
    if len(found) > 1:
        detail += f" (and {len(found) - 1} more problem{'s' if len(found) > 2 else ''})"
    more = len(found) - len(errors)
    return error_response(422, detail, errors=errors, more_errors=more or None, path=path)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Errors raised as HTTPException (adaptd's own, and Starlette's 404 and 405), as an
    `ErrorResponse`. FastAPI's 400 for a JSON body Python cannot read (nested too deeply, an
    integer literal too long) is a body that does not fit, a 422 like any other that does not."""
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's 400 for a body cut short
        return await _client_left(request, exc.__cause__)
    path = request.url.path
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError) \
            and isinstance(cause.object, bytes) and not speaks_oip(path):
        # a body that is not UTF-8, said as POST /v1/predict says it
        return await _validation_error(request, RequestValidationError(
            [not_utf8(cause.object, cause.start) | {"input": {}}]))
    if exc.status_code == 400 and not speaks_oip(path):  # the protocol's own 400s stay 400
        return error_response(422, "the body is JSON this service cannot read: nested too "
                                   "deeply or holding a number too large; send plain numbers "
                                   "nested as the schema says")
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no route has this path: GET /openapi.json lists them"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        allowed = (exc.headers or {}).get("Allow")
        detail = "this route does not take this method" + (f"; it takes {allowed}"
                                                            if allowed else "")
    return error_response(exc.status_code, str(detail), headers=exc.headers, path=path)


async def _client_left(request: Request, exc: Exception) -> Response:
    """The client closed its connection before its body had arrived: no one to answer, and no
    bug. Counted as 499 (nginx's "client closed request", a 4xx in `adaptd_http_requests_total`),
    not as a 500 with a traceback; what the request held (its place in the queue) is let go on
    the way out."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """An exception no route handles: a bug. The answer says so in the one error shape; Starlette
    logs the traceback (and re-raises it, for the server and tests to see)."""
    return error_response(500, "the service failed on this request: a bug, its log has the "
                               "traceback", path=request.url.path)


class BodyTooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so FastAPI's body parsing lets it through as 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes: send less per "
                              "request")


class BodyTimedOut(HTTPException):
    """Raised from `receive` when the body is late; the connection is closed after the 408."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s of its "
                              "headers: send it at once, or send less per request",
                         headers={"Connection": "close"})


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413, by header or while streaming, before parsing; and
    bodies not fully received `timeout_s` after the request's headers with 408, closing the
    connection (a client that sends headers and part of a body holds it no longer). Both only
    when the route reads the body: one that never does (GET /healthz, POST /v1/admin/reset)
    answers as if there were none, so only routes that take a body can answer 408 or 413, as
    the schema says."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 10.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = declared is not None and (not declared.isdigit()
                                              or int(declared) > self.max_bytes)
        received = 0
        started = False
        complete = False  # the whole body arrived (or the client left): no deadline from then
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            if too_large:  # by its header: refused before a byte of it is read
                raise BodyTooLarge(self.max_bytes)
            try:
                # a deadline on this task, not `wait_for`, which would start a task per read
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimedOut(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except (BodyTooLarge, BodyTimedOut) as exc:
            if not started:
                await self._refuse(send, exc, scope.get("path", ""))

    async def _refuse(self, send: Send, exc: HTTPException, path: str) -> None:
        response = error_response(exc.status_code, exc.detail, headers=exc.headers, path=path)
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class RequestMetrics:
    """Count and time every request by route template (never by raw path), method (one of
    `KNOWN_METHODS` or "other") and status class ("2xx"...): labels a client cannot multiply."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
        changes = method not in ("GET", "HEAD", "OPTIONS")
        app = scope.get("app")

        async def send_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                if changes and app is not None:  # before the client can see the answer
                    app.state.changes += 1
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            status_class = f"{status_code // 100}xx"
            self.metrics.requests.labels(template, method, status_class).inc()
            self.metrics.request_latency.labels(template).observe(time.perf_counter() - start)
