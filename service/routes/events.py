"""GET /v1/events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from service.deps import get_runtime
from service.runtime import Runtime
from service.schemas import EventItem, EventsResponse

router = APIRouter(tags=["status"])


@router.get("/v1/events", response_model=EventsResponse)
async def events(
    runtime: Annotated[Runtime, Depends(get_runtime)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    before: Annotated[int | None, Query(ge=1, description="events older than this seq")] = None,
) -> EventsResponse:
    """What the service did on its own or was told to do, newest first."""
    return EventsResponse(events=[EventItem(**e) for e in runtime.events.list(limit, before)])
