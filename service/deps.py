"""FastAPI dependencies: the runtime and the bearer-token check.

Both are coroutines, though neither awaits anything: FastAPI runs a plain function dependency
in its thread pool, a hand-off to another thread and back on every request (about 0.1 ms of CPU
each here), where a coroutine runs on the event loop at once."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the service is starting")
    return runtime


bearer = HTTPBearer(auto_error=False, description="ADAPTD_API_TOKEN, when the service has one")


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    """Write routes: when a token is configured, the request must carry it as a bearer token."""
    token = request.app.state.settings.api_token
    if token is None:
        return
    given = "" if credentials is None else credentials.credentials
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this route needs the header 'Authorization: Bearer <ADAPTD_API_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
