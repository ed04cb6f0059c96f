"""The FastAPI application, built by `create_app` from settings."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics
from service.model import ModelLoadError
from service.routes import admin, events, feedback, inference, status
from service.runtime import Runtime
from service.settings import Settings, load_settings

MAX_REPORTED_ERRORS = 10

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
    app.include_router(inference.router)
    app.include_router(feedback.router)
    app.include_router(status.router)
    app.include_router(events.router)
    app.include_router(admin.router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


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


class BodyTooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so FastAPI's body parsing lets it through as 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes: send less per "
                              "request")


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413, by header or while streaming, before parsing."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse({"detail": BodyTooLarge(self.max_bytes).detail}, status_code=413)
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class RequestMetrics:
    """Count and time every request by route template (never by raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def send_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope["method"], str(status_code)).inc()
            self.metrics.request_latency.labels(template).observe(time.perf_counter() - start)
