"""HTTP routes, one router per concern; and the error answers they declare.

Every error answers an `ErrorResponse` (`service.schemas`), whatever the status, so each route
declares its error statuses with that one model: the shared ones here, and `error()` for the
route's own descriptions.
"""

from __future__ import annotations

from typing import Any

from service.schemas import ErrorResponse

Responses = dict[int | str, dict[str, Any]]


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error answer for a route's `responses`: an `ErrorResponse` body, these headers."""
    response: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        response["headers"] = headers
    return response


# write routes (require_token): answered before anything else is done
UNAUTHORIZED: Responses = {401: error(
    "a token is set (api_token) and the request does not carry it as "
    "`Authorization: Bearer <token>`",
    headers={"WWW-Authenticate": {"description": "`Bearer`", "required": True,
                                  "schema": {"type": "string"}}},
)}

# routes that read a body (service.app.BodyLimit)
BODY_LIMITS: Responses = {
    408: error("the body did not arrive within body_timeout_s (10 s) of the headers; the "
               "connection is closed",
               headers={"Connection": {"description": "`close`",
                                       "schema": {"type": "string"}}}),
    413: error("the body is larger than max_body_bytes (8 MiB): send less per request"),
}

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying (when the "
                                              "micro-batcher is full)",
                               "schema": {"type": "integer"}}}

STARTING = "the service is starting or stopping (in process only)"
