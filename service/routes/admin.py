"""Operator actions: POST /v1/admin/reset and /v1/admin/checkpoint (token required once set)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status

from service.deps import get_runtime, require_token
from service.routes.status import adapter_state
from service.runtime import Runtime
from service.schemas import AdapterState, CheckpointResponse
from store import StoreUnavailable

router = APIRouter(tags=["admin"], dependencies=[Depends(require_token)])


@router.post("/v1/admin/reset", response_model=AdapterState)
async def reset(runtime: Annotated[Runtime, Depends(get_runtime)]) -> AdapterState:
    """Return the adapter to the source weights (after the batches already queued)."""
    await runtime.sync.run(runtime.engine.reset_adapter)
    if runtime.sync.pending:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"the adapter was reset, but its stored memory was not "
                            f"({runtime.store.last_error}); it is cleared there when the store "
                            "answers again")
    return adapter_state(runtime)


@router.post(
    "/v1/admin/checkpoint",
    response_model=CheckpointResponse,
    responses={503: {"description": "the store is unreachable; nothing was saved"}},
)
async def checkpoint(runtime: Annotated[Runtime, Depends(get_runtime)]) -> CheckpointResponse:
    """Save the adapter's learned state to the store as a new version; a restart restores it."""
    try:
        version, size = await runtime.checkpoint()
    except StoreUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    return CheckpointResponse(version=version, bytes=size, adapter=runtime.settings.adapter.name)
