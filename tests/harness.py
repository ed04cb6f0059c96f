"""Run the real app in process: its lifespan, an HTTP client on it, and metric readings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.settings import load_settings


def settings_for(**overrides: Any):
    """Settings from defaults plus `overrides`, ignoring any ADAPTD_* in the test environment."""
    return load_settings(None, **overrides)


@asynccontextmanager
async def serving(
    settings=None, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    app = create_app(settings or settings_for(**overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://adaptd") as client:
            yield client, app


def metric(app: FastAPI, name: str, **labels: str) -> float:
    """A sample's current value from the app's registry (0.0 when it has not been observed)."""
    value = app.state.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value
