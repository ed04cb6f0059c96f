"""POST /v1/feedback."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status

from service.deps import get_runtime, require_token
from service.inputs import InvalidInput, check_labels
from service.runtime import Runtime
from service.schemas import FeedbackRequest, FeedbackResponse
from store import StoreUnavailable

router = APIRouter(tags=["feedback"])


@router.post(
    "/v1/feedback",
    response_model=FeedbackResponse,
    dependencies=[Depends(require_token)],
    responses={
        422: {"description": "a label that does not fit the task; nothing was applied"},
        503: {"description": "the store is unreachable: send the labels again; any joined before "
                             "the failure (the message says how many) come back as duplicate"},
    },
)
async def feedback(
    body: FeedbackRequest, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> FeedbackResponse:
    """Labels for earlier predictions, by id. A prediction is joined to at most one label; a new
    prediction made under the same id starts afresh."""
    labels = [(item.id, item.label) for item in body.labels]
    try:
        check_labels(labels, runtime.model, runtime.settings.feedback.max_labels_per_request)
    except InvalidInput as exc:
        raise HTTPException(422, str(exc)) from None
    try:
        result = await runtime.feedback.apply(labels)
    except StoreUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    return FeedbackResponse(
        joined=len(result.joined),
        unknown=result.unknown,
        duplicate=result.duplicate,
        expired=result.expired,
    )
