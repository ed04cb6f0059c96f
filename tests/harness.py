"""Run the real app in process (its lifespan, an HTTP client on it, metric readings), or as
`adaptd serve` in a process of its own; talk raw HTTP/1.1 to a server on a socket."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.engine import Engine
from service.events import EventLog
from service.metrics import Metrics
from service.runtime import build_engine
from service.settings import load_settings


def settings_for(**overrides: Any):
    """Settings from defaults plus `overrides`, ignoring any ADAPTD_* in the test environment."""
    return load_settings(None, **overrides)


@contextmanager
def built_engine(settings: Any) -> Iterator[Engine]:
    """The engine `settings` build, as the service builds it but without the app; closed after."""
    metrics = Metrics()
    engine = build_engine(settings, metrics, EventLog(metrics))
    try:
        yield engine
    finally:
        engine.close()


@asynccontextmanager
async def serving(
    settings=None, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    app = create_app(settings or settings_for(**overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://adaptd") as client:
            yield client, app


async def flood_held_engine(app: FastAPI, send: Callable[[int], Awaitable[httpx.Response]],
                            requests: int, watch: Callable[[], None] | None = None
                            ) -> list[httpx.Response]:
    """Send `requests` requests at once (`send(i)`) while the engine thread is held by a job
    of its own, wait until each was shed for the queue's bound or waits for the model
    (`watch()` at each look), then free the engine and return the replies in order."""
    runtime = app.state.runtime
    engine_free = threading.Event()
    # the engine thread runs one job at a time: this one holds every batch behind it
    blocker = asyncio.ensure_future(runtime.engine.run(engine_free.wait, 30))
    try:
        replies = [asyncio.ensure_future(send(i)) for i in range(requests)]
        for _ in range(500):
            await asyncio.sleep(0.01)
            if watch is not None:
                watch()
            shed = metric(app, "adaptd_requests_shed_total", reason="queued_samples")
            if shed + runtime.batcher.inflight_requests == requests:
                break
    finally:
        engine_free.set()
    await blocker
    return list(await asyncio.gather(*replies))


def metric(app: FastAPI, name: str, **labels: str) -> float:
    """A sample's current value from the app's registry (0.0 when it has not been observed)."""
    value = app.state.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# --- `adaptd serve` as a separate process --------------------------------------------------------

ADAPTD = str(Path(sys.executable).with_name("adaptd"))


def start_service(port: int, environment: dict[str, str]) -> subprocess.Popen:
    """`adaptd serve` on 127.0.0.1:port with these ADAPTD_* settings and no others from the
    test environment; its output is discarded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")} | environment
    return subprocess.Popen([ADAPTD, "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextmanager
def running_service(environment: dict[str, str]) -> Iterator[int]:
    """`adaptd serve` with these ADAPTD_* settings on a free port, ready; stopped after."""
    from tests.redis_server import free_port

    port = free_port()
    process = start_service(port, environment)
    try:
        wait_ready(port, process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Until GET /readyz answers 200; fails if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "adaptd serve exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"adaptd serve was not ready within {timeout_s:.0f} s")


# --- raw HTTP/1.1 on a socket --------------------------------------------------------------------

def exchange(port: int, *parts: bytes, pause_s: float = 0.03) -> tuple[bytes, bool]:
    """Send `parts` on a connection of its own, one by one, `pause_s` apart (so that the server
    reads them one at a time), then read until the server closes the connection (True) or is
    quiet for 2 s (False)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for index, part in enumerate(parts):
                if index:
                    time.sleep(pause_s)
                connection.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all of it was sent: the answer is still there to read
        answer, closed = b"", False
        try:
            while chunk := connection.recv(65536):
                answer += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    return answer, closed


def statuses(answer: bytes) -> list[int]:
    """The status of each answer in `answer` (an answer's body need not end in a newline)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def pieces(data: bytes, size: int = 2048) -> list[bytes]:
    """`data` cut into parts of `size` bytes, for `exchange`."""
    return [data[i:i + size] for i in range(0, len(data), size)]

