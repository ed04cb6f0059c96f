"""GET /v1/state, /healthz, /readyz and /metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import get_runtime
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


@router.get("/v1/state", response_model=StateResponse)
async def state(runtime: Annotated[Runtime, Depends(get_runtime)]) -> StateResponse:
    """What the model, the adapter, the store and the label loop are doing now."""
    model = runtime.model
    classes = model.class_names or (
        [str(i) for i in range(model.num_classes)] if model.num_classes else None
    )
    store = runtime.store
    drift = runtime.engine.drift
    detectors: list[dict] = []
    drift_policy = None
    if drift is not None:  # the engine thread owns the detectors: read them there
        detectors = await runtime.engine.run(drift.describe)
        drift_policy = await runtime.engine.run(drift.describe_policy)
    return StateResponse(
        model=ModelState(name=model.name, task=model.task.name, input_shape=list(model.input_shape),
                         classes=classes, version=model.version),
        adapter=adapter_state(runtime),
        calibrator=None if runtime.conformal is None else runtime.conformal.describe(),
        detectors=detectors,
        drift_policy=drift_policy,
        memories={m.name: len(m) for m in runtime.engine.memories()},
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
    guard = runtime.engine.guard
    common["name"] = runtime.settings.adapter.name  # e.g. eata+adanpc, not just eata
    return AdapterState(**common, details=described,
                        guard=None if guard is None else guard.describe())


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(request: Request) -> Response:
    """Readiness: the model is loaded and the store answers."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    checks = {"model": runtime is not None, "store": False}
    if runtime is not None:
        checks["store"] = await runtime.store.ping()
    ready = all(checks.values())
    health = Health(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(health.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus exposition of every `adaptd_*` metric."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
