"""The FastAPI application, built by `create_app` from settings."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics
from service.model import ModelLoadError
from service.routes import admin, events, feedback, inference, status
from service.runtime import Runtime
from service.settings import Settings, load_settings

MAX_REPORTED_ERRORS = 10
# the methods `adaptd_http_requests_total` names; any other is counted as "other", so a client
# cannot add series by making methods up
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})

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
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=metrics)
    _document_predict_body(app)
    return app


def _document_predict_body(app: FastAPI) -> None:
    """POST /v1/predict reads its body raw (see `service.predict_body`), so FastAPI does not list
    `PredictRequest` and its `Tensor`: add them to the schema's components, where the route's
    `openapi_extra` points."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                inference.request_schemas()
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, trimmed: the first errors only, without echoing (possibly huge) inputs."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [
        {k: v for k, v in error.items() if k in ("type", "loc", "msg")}
        for error in errors[:MAX_REPORTED_ERRORS]
    ]
    body = {"detail": jsonable_encoder(detail)}
    if len(errors) > MAX_REPORTED_ERRORS:
        body["more_errors"] = len(errors) - MAX_REPORTED_ERRORS
    return JSONResponse(body, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's own handling, except its 400 for a JSON body Python cannot read (nested too
    deeply, an integer literal too long): that is a body that does not fit, a 422 like any other
    that does not."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400:
        return JSONResponse({"detail": "the body is JSON this service cannot read: nested too "
                                       "deeply or holding a number too large; send plain "
                                       "numbers nested as the schema says"}, status_code=422)
    return await http_exception_handler(request, exc)


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
    connection (a client that sends headers and part of a body holds it no longer)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 10.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        received = 0
        started = False
        complete = False  # the whole body arrived (or the client left): no deadline from then
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
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
                await self._refuse(send, exc)

    async def _refuse(self, send: Send, exc: HTTPException | None = None) -> None:
        exc = exc or BodyTooLarge(self.max_bytes)
        response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                                headers=exc.headers)
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
