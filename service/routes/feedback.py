"""POST /v1/feedback (one or many labels) and /v1/feedback/bulk (newline-delimited JSON)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.deps import get_runtime, require_token
from service.inputs import InvalidInput, check_labels, label_problem, repeated_key
from service.routes import BODY_LIMITS, STARTING, UNAUTHORIZED, error
from service.runtime import Runtime
from service.schemas import BulkFeedbackResponse, FeedbackRequest, FeedbackResponse, Label
from store import JoinResult, LabelValue, PartialJoin, StoreUnavailable

NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/jsonlines")
# labels joined per store call on the bulk route
BULK_CHUNK = 5000
EXAMPLES = 20
NDJSON_LINE = 'one label per line: {"id": ..., "label": ...}'

router = APIRouter(tags=["feedback"])

log = logging.getLogger("adaptd.feedback")


def unavailable(route: str, error: StoreUnavailable, total: int, done: int = 0) -> HTTPException:
    """The 503 for labels the store could not take: what to do, without the store's address or
    its own words (those go to the log). `done` labels were handled before the failure."""
    log.warning("%s answered 503: %s", route, error)
    if done:
        happened = (f"{done} of the {total} labels were handled before it failed: send them all "
                    "again; those joined come back as duplicate")
    else:
        happened = "no label was joined: send the labels again once it is back"
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                         f"the store is unavailable; {happened}")


@router.post(
    "/v1/feedback",
    response_model=FeedbackResponse,
    dependencies=[Depends(require_token)],
    responses={
        **UNAUTHORIZED,
        **BODY_LIMITS,
        422: error("the body does not fit the schema (`errors` lists the first problems), or a "
                   "label does not fit the model; nothing was applied"),
        503: error("the store is unavailable (down, or refusing writes): send the labels again; "
                   "any joined before the failure (the message says how many) come back as "
                   "duplicate; or " + STARTING),
    },
)
async def feedback(
    body: FeedbackRequest, request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> FeedbackResponse:
    """Labels for earlier predictions, by id. A prediction is joined to at most one label; a new
    prediction made under the same id starts afresh. A label whose prediction cannot be used
    (its stored outputs are not finite, say) is `rejected`; the others are joined."""
    count = len(body.labels)
    repeated = repeated_key(await request.body(),  # read once already: this is the same bytes
                            {b'"labels"': 1, b'"id"': count, b'"label"': count})
    if repeated is not None:
        raise RequestValidationError([{
            "type": "json_invalid", "loc": ("body",), "input": {},
            "msg": f"the key {repeated!r} appears twice in one object, and which was meant is "
                   "not clear: send it once"}])
    labels = [(item.id, item.label) for item in body.labels]
    try:
        check_labels(labels, runtime.model, runtime.settings.feedback.max_labels_per_request)
    except InvalidInput as exc:
        raise HTTPException(422, str(exc)) from None
    try:
        result = await runtime.feedback.apply(labels)
    except StoreUnavailable as exc:
        done = len(labels) - len(exc.pending) if isinstance(exc, PartialJoin) else 0
        raise unavailable("POST /v1/feedback", exc, len(labels), done) from None
    return FeedbackResponse(
        joined=len(result.joined),
        unknown=result.unknown,
        duplicate=result.duplicate,
        expired=result.expired,
        rejected=result.rejected,
    )


@router.post(
    "/v1/feedback/bulk",
    response_model=BulkFeedbackResponse,
    dependencies=[Depends(require_token)],
    openapi_extra={"requestBody": {"required": True, "content": {"application/x-ndjson": {
        "schema": {"type": "string",
                   "description": 'one label per line: {"id": ..., "label": ...}'},
        "example": '{"id": "req-1", "label": 3}\n{"id": "req-2", "label": 7}\n',
    }}}},
    responses={
        **UNAUTHORIZED,
        **BODY_LIMITS,
        415: error("the body is not sent as newline-delimited JSON (Content-Type "
                   "application/x-ndjson, application/jsonl or application/jsonlines)"),
        422: error("a line that is not a label for this model, or no label at all; nothing was "
                   "applied"),
        503: error("the store is unavailable (down, or refusing writes): send the whole body "
                   "again; labels joined before the failure come back as duplicate; or "
                   + STARTING),
    },
)
async def feedback_bulk(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> BulkFeedbackResponse:
    """A back-fill of labels as newline-delimited JSON, one `{"id": ..., "label": ...}` per line,
    read as it streams in. Every line is checked before any label is applied: one bad line
    rejects the body with its line number. Then labels are joined in order, exactly once per id,
    as `POST /v1/feedback` joins them (a label whose prediction cannot be used is `rejected`)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in NDJSON_TYPES:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            f"send newline-delimited JSON with Content-Type "
                            f"application/x-ndjson, not {content_type or 'no content type'!r}")
    labels: list[tuple[str, LabelValue]] = []
    pending = b""
    number = 0
    async for chunk in request.stream():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            number += 1
            _read_line(line, number, runtime, labels)
    if pending.strip():
        _read_line(pending, number + 1, runtime, labels)
    if not labels:
        raise HTTPException(422, "the body holds no labels: send one JSON object per line")
    total = JoinResult()
    for start in range(0, len(labels), BULK_CHUNK):
        try:
            result = await runtime.feedback.apply(labels[start:start + BULK_CHUNK])
        except StoreUnavailable as exc:
            done = start
            if isinstance(exc, PartialJoin):
                done += min(BULK_CHUNK, len(labels) - start) - len(exc.pending)
            raise unavailable("POST /v1/feedback/bulk", exc, len(labels), done) from None
        total.joined += result.joined
        total.unknown += result.unknown
        total.duplicate += result.duplicate
        total.expired += result.expired
        total.rejected += result.rejected
    return BulkFeedbackResponse(
        labels=len(labels), joined=len(total.joined), unknown=len(total.unknown),
        duplicate=len(total.duplicate), expired=len(total.expired),
        rejected=len(total.rejected),
        examples={name: ids[:EXAMPLES] for name, ids in (
            ("unknown", total.unknown), ("duplicate", total.duplicate),
            ("expired", total.expired), ("rejected", total.rejected)) if ids},
    )


def _read_line(line: bytes, number: int, runtime: Runtime,
               labels: list[tuple[str, LabelValue]]) -> None:
    if not line.strip():
        return
    repeated = repeated_key(line, {b'"id"': 1, b'"label"': 1})
    if repeated is not None:
        raise HTTPException(422, f"line {number}: the key {repeated!r} appears twice, and which "
                                 "was meant is not clear; nothing was applied")
    try:
        item = Label.model_validate_json(line)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise HTTPException(422, f"line {number} is not JSON ({first['msg']}); nothing was "
                                     "applied") from None
        where = ".".join(str(part) for part in first["loc"]) or "the line"
        raise HTTPException(422, f"line {number}: {where}: {first['msg']}; nothing was "
                                 "applied") from None
    problem = label_problem(item.label, runtime.model)
    if problem is not None:
        raise HTTPException(422, f"line {number}: label {problem}; nothing was applied")
    labels.append((item.id, item.label))
