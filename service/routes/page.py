"""GET / (the status page) and GET /v1/history (the time series its charts draw)."""

from __future__ import annotations

import base64
import hashlib
import math
from functools import cache
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from service.deps import get_runtime
from service.history import COVERAGE_WINDOW
from service.routes import STARTING, error
from service.runtime import Runtime
from service.schemas import HistoryPointItem, HistoryResponse

router = APIRouter(tags=["status"])

# the page's parts, in service/assets/ (package data); the style and the script go inline
PAGE, STYLE, SCRIPT = "status.html", "status.css", "status.js"
STYLE_SLOT, SCRIPT_SLOT = "<style>/* status.css */</style>", "<script>/* status.js */</script>"


@cache
def _document() -> tuple[str, str]:
    """The page as one document, and the Content-Security-Policy that lets it run its own inline
    style and script (by their digests) and read this service's routes, and nothing else: no
    other origin, no other script, no font, frame or form."""
    assets = resources.files("service") / "assets"
    page = (assets / PAGE).read_text(encoding="utf-8")
    style = (assets / STYLE).read_text(encoding="utf-8")
    script = (assets / SCRIPT).read_text(encoding="utf-8")
    if STYLE_SLOT not in page or SCRIPT_SLOT not in page:
        raise RuntimeError(f"service/assets/{PAGE} must hold {STYLE_SLOT} and {SCRIPT_SLOT}")
    page = page.replace(STYLE_SLOT, f"<style>{style}</style>").replace(
        SCRIPT_SLOT, f"<script>{script}</script>")
    policy = ("default-src 'none'; connect-src 'self'; "
              f"style-src '{_digest(style)}'; script-src '{_digest(script)}'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, policy


def _digest(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


@router.get("/", response_class=HTMLResponse, responses={200: {
    "description": "the status page: one HTML document with its style and script inline, "
                   "which reads /v1/state, /v1/history and /v1/events every 2 s"}})
async def status_page() -> HTMLResponse:
    """The status page: the adapter and what learns, the rolling error, coverage, set size (or
    interval width) and learning rate over time, and the recent events, updating live."""
    document, policy = _document()
    return HTMLResponse(document, headers={"Content-Security-Policy": policy,
                                           "Cache-Control": "no-cache"})


@router.get("/v1/history", response_model=HistoryResponse, responses={503: error(STARTING)})
async def history(runtime: Annotated[Runtime, Depends(get_runtime)]) -> HistoryResponse:
    """What the labels showed over time on this replica, oldest first: after each join, at most
    one point per `spacing_s`; at most `capacity` points, since the process started."""
    kept = runtime.history
    conformal = runtime.conformal
    return HistoryResponse(
        spacing_s=kept.spacing_s,
        capacity=kept.capacity,
        error_window=runtime.settings.feedback.rolling_window,
        coverage_window=COVERAGE_WINDOW,
        coverage_target=None if conformal is None else 1 - conformal.alpha,
        size_name=runtime.model.task.size_name,
        points=[HistoryPointItem(
            time=point.time, labels=point.labels, samples=point.samples,
            rolling_error=_finite(point.rolling_error), coverage=_finite(point.coverage),
            size=_finite(point.size), learning_rate=_finite(point.learning_rate) or 0.0,
        ) for point in kept.points()],
    )


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: a width that is not finite (no threshold yet) is told as null."""
    return value if value is not None and math.isfinite(value) else None
