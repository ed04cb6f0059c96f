"""Shared fixtures: a real redis-server, and stores of either backend on a timeline tests control.

A test that asks for `store` (or `make_store`) runs once per backend. Expiry is tested the same
way on both: `timeline.advance(s)` moves MemoryStore's clock, and for RedisStore sleeps through
real (short) TTLs, since Redis expires keys by its own clock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from redis_server import RedisServer

from store import MemoryStore, Store
from store.redis import RedisStore

BACKENDS = ["memory", "redis"]


class ManualClock:
    """Seconds since the epoch that move only when a test says so; MemoryStore's `clock`."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class WallClock:
    """Real time with the same face as `ManualClock`: advancing it means waiting."""

    @property
    def now(self) -> float:
        return time.time()

    def __call__(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; a failure to start it fails the tests, never skips."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def timeline(backend: str, clock: ManualClock) -> ManualClock | WallClock:
    """The time the store under test lives by: the manual clock for memory, real time for Redis."""
    return clock if backend == "memory" else WallClock()


@pytest.fixture
def make_store(
    backend: str, clock: ManualClock, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Store]]:
    """Builds stores of the backend under test, each in a fresh namespace unless one is named."""
    opened: list[Store] = []

    def make(namespace: str | None = None, record_ttl_s: float = 60.0, **options: object) -> Store:
        namespace = namespace or f"test:{uuid.uuid4().hex}"
        if backend == "memory":
            store: Store = MemoryStore(namespace, record_ttl_s, clock=clock, **options)
        else:
            # asked for lazily, so a memory-only run never starts a server
            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisStore(server.url, namespace, record_ttl_s, **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    return make_store()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on the test server, for looking at what the store wrote."""
    client = redis_server.client()
    yield client
    client.close()
