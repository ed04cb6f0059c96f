"""GET /v1/events."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from service.deps import get_runtime
from service.routes import STARTING, error
from service.runtime import Runtime
from service.schemas import EventItem, EventsResponse
from store import StoreUnavailable

router = APIRouter(tags=["status"])

log = logging.getLogger("adaptd.events")


@router.get(
    "/v1/events",
    response_model=EventsResponse,
    responses={
        422: error("a query parameter out of its range, or `before` with scope=deployment "
                   "(`errors` says which)"),
        503: error("scope=deployment only: the store is unavailable, so the deployment's log "
                   "cannot be read; try again later, or read this replica's events "
                   "(scope=replica); or " + STARTING),
    },
)
async def events(
    runtime: Annotated[Runtime, Depends(get_runtime)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    before: Annotated[int | None, Query(ge=1, description="events older than this seq "
                                        "(scope=replica)")] = None,
    kind: Annotated[str | None, Query(max_length=64, description="only events of this kind, "
                                      "e.g. drift_alarm")] = None,
    scope: Annotated[Literal["replica", "deployment"], Query(
        description="replica: this process's events; deployment: every replica's, from the "
        "store's shared log (it outlives restarts)")] = "replica",
) -> EventsResponse:
    """What the service did on its own or was told to do, newest first."""
    if scope == "replica":
        events = runtime.events.list(1000 if kind else limit, before)
    else:
        if before is not None:
            # a query that does not fit, answered as every other one is (ErrorResponse, with
            # `errors`)
            raise RequestValidationError([{
                "type": "value_error", "loc": ("query", "before"), "input": before,
                "msg": "before pages this replica's log; with scope=deployment use limit (and "
                       "kind)",
            }])
        await runtime.flush_events()
        try:
            events = await runtime.store.load_events(runtime.settings.drift.events_kept)
        except StoreUnavailable as exc:
            log.warning("GET /v1/events?scope=deployment answered 503: %s", exc)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                "the store is unavailable; the deployment's event log cannot be "
                                "read now: try again later, or read this replica's "
                                "events with scope=replica") from None
    if kind is not None:
        events = [e for e in events if e.get("kind") == kind]
    return EventsResponse(events=[EventItem(**e) for e in events[:limit]])
