"""FastAPI dependencies: the runtime and the bearer-token check."""

from __future__ import annotations

import secrets

from fastapi import HTTPException, Request, status

from service.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the service is starting")
    return runtime


def require_token(request: Request) -> None:
    """Write routes: when a token is configured, the request must carry it as a bearer token."""
    token = request.app.state.settings.api_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this route needs the header 'Authorization: Bearer <ADAPTD_API_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
