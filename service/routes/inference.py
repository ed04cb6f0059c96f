"""POST /v1/predict."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status

from service.batcher import BatcherStopped, PredictionFailed
from service.deps import get_runtime, require_token
from service.inputs import InvalidInput, prediction_ids, to_batch
from service.runtime import Runtime
from service.schemas import Prediction, PredictRequest, PredictResponse

router = APIRouter(tags=["inference"])


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    dependencies=[Depends(require_token)],
    responses={422: {"description": "inputs that do not fit the model"}},
)
async def predict(
    body: PredictRequest, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> PredictResponse:
    """Predict a batch of samples; each gets an id, its prediction and the versions that made it."""
    try:
        batch = to_batch(
            body.inputs, runtime.model.input_shape, runtime.settings.batcher.max_request_samples
        )
        ids = prediction_ids(body.ids, len(batch))
    except InvalidInput as exc:
        raise HTTPException(422, str(exc)) from None
    try:
        rows = await runtime.batcher.submit(batch, ids)
    except PredictionFailed as exc:
        raise HTTPException(422, str(exc)) from None
    except BatcherStopped as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    return PredictResponse(predictions=[Prediction(**asdict(row)) for row in rows])
