"""Operator actions: POST /v1/admin/reset and /v1/admin/checkpoint (token required once set)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status

from service.deps import get_runtime, require_token
from service.routes import STARTING, UNAUTHORIZED, error
from service.routes.status import adapter_state
from service.runtime import Runtime
from service.schemas import AdapterState, CheckpointResponse
from store import StoreUnavailable

router = APIRouter(tags=["admin"], dependencies=[Depends(require_token)])

log = logging.getLogger("adaptd.admin")


@router.post(
    "/v1/admin/reset",
    response_model=AdapterState,
    responses={**UNAUTHORIZED,
               503: error("the adapter was reset in process, but the store is unavailable: its "
                          "stored memory is cleared once the store answers again; nothing to "
                          "resend; or " + STARTING)},
)
async def reset(runtime: Annotated[Runtime, Depends(get_runtime)]) -> AdapterState:
    """Return the adapter to the source weights (after the batches already queued)."""
    await runtime.sync.run(runtime.engine.reset_adapter)
    if runtime.sync.pending:
        log.warning("POST /v1/admin/reset answered 503: the store did not take the reset: %s",
                    runtime.store.last_error)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "the store is unavailable; the adapter was reset, but its stored "
                            "memory was not: it is cleared there when the store answers again, "
                            "nothing needs sending again")
    return adapter_state(runtime)


@router.post(
    "/v1/admin/checkpoint",
    response_model=CheckpointResponse,
    responses={**UNAUTHORIZED,
               503: error("the store is unavailable (down, or refusing writes); nothing was "
                          "saved: try again later; or " + STARTING)},
)
async def checkpoint(runtime: Annotated[Runtime, Depends(get_runtime)]) -> CheckpointResponse:
    """Save the adapter's learned state to the store as a new version; a restart restores it."""
    try:
        version, size = await runtime.checkpoint()
    except StoreUnavailable as exc:
        log.warning("POST /v1/admin/checkpoint answered 503: %s", exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "the store is unavailable; nothing was saved: try again later (the "
                            "service also saves by itself every adapter.checkpoint_every_s and "
                            "at stop)") from None
    return CheckpointResponse(version=version, bytes=size, adapter=runtime.settings.adapter.name)
