"""Store calls from async code: in a thread, counted when they fail, and not waited on when the
store is known to be down.

After a failure the gateway stops calling the store for a back-off (0.5 s, doubling to 15 s)
and fails fast instead, so a hanging Redis costs the prediction path one timeout per back-off
rather than one per batch. Readiness pings always go through and close the breaker when the store
answers; the first call after the back-off tries the store again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from service.calibration import STATE, SUMMARY, Conformal
from service.engine import Housekeeping
from service.metrics import Metrics
from store import Store, StoreUnavailable

T = TypeVar("T")

STORE_OPS = ("put_predictions", "join_labels", "save_adapter", "load_adapter", "append_memory",
             "load_memory", "clear_memory", "read_label_stream", "ack_label_stream",
             "ensure_label_group", "load_calibrator", "clear_calibrator", "trim_memory",
             "append_events", "load_events", "save_state", "load_state")


class StoreGateway:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        first_backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.up = True
        self.last_error = ""
        self._backoff_s = first_backoff_s
        self._retry_at = 0.0
        metrics.store_up.set(1)
        for op in STORE_OPS:
            metrics.store_errors.labels(op)

    async def call(self, op: str, fn: Callable[..., T], *args: object) -> T:
        if not self.up and self.clock() < self._retry_at:
            self.metrics.store_errors.labels(op).inc()
            raise StoreUnavailable(
                f"the store is unreachable ({self.last_error}); not retried for another "
                f"{self._retry_at - self.clock():.1f} s"
            )
        try:
            result = await asyncio.to_thread(fn, *args)
        except StoreUnavailable as error:
            self.metrics.store_errors.labels(op).inc()
            self._failed(str(error))
            raise
        self._answered()
        return result

    async def ping(self) -> bool:
        if await asyncio.to_thread(self.store.ping):
            self._answered()
            return True
        where = getattr(self.store, "url", None)
        self._failed(f"{self.store.backend} at {where} did not answer a ping" if where
                     else f"the {self.store.backend} store did not answer a ping")
        return False

    def _failed(self, error: str) -> None:
        if self.up:
            self._backoff_s = self.first_backoff_s
        else:
            self._backoff_s = min(self._backoff_s * 2, self.max_backoff_s)
        self.up = False
        self.last_error = error
        self._retry_at = self.clock() + self._backoff_s
        self.metrics.store_up.set(0)

    def _answered(self) -> None:
        self.up = True
        self._backoff_s = self.first_backoff_s
        self.metrics.store_up.set(1)


async def housekeep(store: StoreGateway, work: Housekeeping, persisted: frozenset[str],
                    conformal: Conformal | None) -> None:
    """Bring the store in step with what the engine did: clear the stored rows of memories it
    reset, trim those a drift action trimmed, reset the shared calibrator if one asked.
    Raises `StoreUnavailable` (the in-process state already changed; the store catches up at
    the next reset or trim)."""
    for name in work.cleared:
        if name in persisted:
            await store.call("clear_memory", store.store.clear_memory, name)
    for name, keep in work.trimmed.items():
        if name in persisted:
            await store.call("trim_memory", store.store.trim_memory, name, keep)
    if work.calibrator_reset and conformal is not None:
        for name in (STATE, SUMMARY):
            await store.call("clear_calibrator", store.store.clear_calibrator, name)
        conformal.read_summary(None)
