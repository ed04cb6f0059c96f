"""GET /v1/state, /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field

from service.deps import get_runtime
from service.events import json_safe
from service.routes import STARTING, error
from service.runtime import Runtime
from service.schemas import (
    AdapterState,
    BatcherState,
    Health,
    ModelState,
    QualityState,
    StateResponse,
    StoreState,
)

router = APIRouter(tags=["status"])

# GET /v1/state answers from an answer at most this old, unless a request that may change state
# (any method but GET, HEAD and OPTIONS; `app.state.changes`) was answered since it was made; so
# polling puts at most one read a second on the engine thread, and a client reads its own writes
STATE_CACHE_S = 1.0


@dataclass
class _StateCache:
    runtime: Runtime
    answer: StateResponse | None = None
    changes: int = -1  # app.state.changes when `answer` was started
    made_at: float = -math.inf  # when `answer` was started (the event loop's clock)
    building: asyncio.Future[StateResponse] | None = None
    building_changes: int = -1


@router.get("/v1/state", response_model=StateResponse, responses={503: error(STARTING)})
async def state(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> StateResponse:
    """What the model, the adapter, the store and the label loop are doing now (an answer up to
    1 s old while only reads arrive; concurrent requests share one)."""
    app_state = request.app.state
    cache: _StateCache | None = getattr(app_state, "state_cache", None)
    if cache is None or cache.runtime is not runtime:
        cache = app_state.state_cache = _StateCache(runtime)
    loop = asyncio.get_running_loop()
    changes = getattr(app_state, "changes", 0)
    if (cache.answer is not None and cache.changes == changes
            and loop.time() - cache.made_at < STATE_CACHE_S):
        return cache.answer
    building = cache.building
    if building is None or cache.building_changes != changes:
        started = loop.time()
        building = asyncio.ensure_future(describe_state(runtime))
        cache.building, cache.building_changes = building, changes

        def keep(done: asyncio.Future[StateResponse]) -> None:
            if cache.building is done:
                cache.building = None
            if not done.cancelled() and done.exception() is None and started >= cache.made_at:
                cache.answer, cache.changes, cache.made_at = done.result(), changes, started

        building.add_done_callback(keep)
    return await asyncio.shield(building)


async def describe_state(runtime: Runtime) -> StateResponse:
    """The answer of GET /v1/state, made now."""
    model = runtime.model
    classes = model.class_names or (
        [str(i) for i in range(model.num_classes)] if model.num_classes else None
    )
    store = runtime.store
    drift = runtime.engine.drift
    detectors: list[dict] = []
    drift_policy = None
    if drift is not None:  # the engine thread owns the detectors: read them there, in one call
        detectors, drift_policy = await runtime.engine.run(
            lambda: (drift.describe(), drift.describe_policy())
        )
    return StateResponse(
        model=ModelState(name=model.name, task=model.task.name, input_shape=list(model.input_shape),
                         classes=classes, version=model.version),
        adapter=adapter_state(runtime),
        calibrator=None if runtime.conformal is None else runtime.conformal.describe(),
        detectors=detectors,
        drift_policy=drift_policy,
        memories={m.name: len(m) for m in runtime.engine.memories()},
        learning=json_safe(runtime.engine.describe_learning()),
        warnings=runtime.engine.warnings,
        store=StoreState(backend=store.backend, namespace=store.namespace, up=runtime.store.up,
                         record_ttl_s=store.record_ttl_s),
        batcher=BatcherState(max_batch_size=runtime.batcher.max_batch_size,
                             max_wait_ms=runtime.batcher.max_wait_s * 1000.0,
                             waiting_samples=runtime.batcher.waiting_samples),
        quality=QualityState(window=runtime.settings.feedback.rolling_window,
                             labels=runtime.quality.count, rolling_error=runtime.quality.value),
    )


def adapter_state(runtime: Runtime) -> AdapterState:
    """The adapter's description: the common fields, and the method's own under `details`."""
    described = runtime.adapter.describe()
    common = {k: described.pop(k) for k in list(described) if k in AdapterState.model_fields}
    guard, comparison = runtime.engine.guard, runtime.engine.comparison
    common["name"] = runtime.settings.adapter.name  # e.g. eata+adanpc, not just eata
    return AdapterState(**common, details=described,
                        guard=None if guard is None else guard.describe(),
                        shadow=None if comparison is None else comparison.describe())


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


class Readiness(Health):
    """`/readyz`'s answer: `checks` by part and, when not ready, why in a few words."""

    reason: str | None = Field(
        None, description="why the replica is not ready (absent when it is): the store does not "
        "answer, or refuses writes (full, read-only...), or the label stream consumer crashed and "
        "is being restarted; the log has the details")


@router.get("/readyz", response_model=Readiness, response_model_exclude_none=True,
            responses={503: {"model": Readiness}})
async def readyz(request: Request) -> Response:
    """Readiness: the model is loaded, the store answers and takes a write now, and (with
    `feedback.stream`) the label stream consumer is running."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    checks = {"model": runtime is not None, "store": False}
    reasons: list[str] = []
    if runtime is None:
        reasons.append("the model is not loaded yet")
    else:
        store_problem = await runtime.store.readiness()
        checks["store"] = store_problem is None
        if store_problem is not None:
            reasons.append(store_problem)
        if runtime.stream is not None:
            checks["label_stream"] = runtime.stream.running
            if not checks["label_stream"]:
                reasons.append(runtime.stream.problem or "the label stream consumer is stopped")
    ready = all(checks.values())
    health = Readiness(status="ready" if ready else "not ready", checks=checks,
                       reason=None if ready else "; ".join(reasons))
    return JSONResponse(health.model_dump(exclude_none=True), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "the Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition of every `adaptd_*` metric."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
