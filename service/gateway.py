"""The store as async code sees it: one awaitable method per `Store` operation, run in a thread,
counted when it fails, and not waited on when the store is known to be down.

After a failure the gateway stops calling the store for a back-off (0.5 s, doubling to 15 s)
and fails fast instead, so a hanging Redis costs the prediction path one timeout per back-off
rather than one per batch. Readiness pings always go through and close the breaker when the store
answers; the first call after the back-off tries the store again.

The methods mirror the `Store` protocol (and `LabelStream`, `Snapshots` where the backend has
them) name for name, so a caller writes `await gateway.put_predictions(records)` and the metric
label is the operation's name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import numpy as np

from service.metrics import Metrics
from store import (
    EffectsFn,
    JoinResult,
    LabelStream,
    LabelValue,
    PredictionRecord,
    Snapshots,
    Store,
    StoreUnavailable,
)

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
        # the backend itself: the service reaches it only through the methods below (tests read
        # it directly to check what was stored)
        self.raw = store
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

    # --- what the store is ------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self.raw.backend

    @property
    def namespace(self) -> str:
        return self.raw.namespace

    @property
    def record_ttl_s(self) -> float:
        return self.raw.record_ttl_s

    @property
    def where(self) -> str:
        """The backend and, for Redis, its address with any password redacted."""
        url = getattr(self.raw, "url", None)
        return f"{self.backend} at {url}" if url else f"the {self.backend} store"

    # --- the operations ---------------------------------------------------------------------

    async def put_predictions(self, records: Sequence[PredictionRecord]) -> None:
        await self._call("put_predictions", self.raw.put_predictions, records)

    async def join_labels(self, labels: Sequence[tuple[str, LabelValue]],
                          effects: EffectsFn | None = None,
                          calibrators: Sequence[str] = ()) -> JoinResult:
        return await self._call("join_labels", self.raw.join_labels, labels, effects,
                                calibrators)

    async def save_adapter(self, blob: bytes) -> int:
        return await self._call("save_adapter", self.raw.save_adapter, blob)

    async def load_adapter(self) -> tuple[int, bytes] | None:
        return await self._call("load_adapter", self.raw.load_adapter)

    async def append_memory(self, name: str, rows: np.ndarray, cap: int) -> None:
        await self._call("append_memory", self.raw.append_memory, name, rows, cap)

    async def load_memory(self, name: str) -> np.ndarray:
        return await self._call("load_memory", self.raw.load_memory, name)

    async def clear_memory(self, name: str) -> None:
        await self._call("clear_memory", self.raw.clear_memory, name)

    async def trim_memory(self, name: str, keep: int) -> None:
        await self._call("trim_memory", self.raw.trim_memory, name, keep)

    async def append_events(self, events: Sequence[dict], cap: int) -> None:
        await self._call("append_events", self.raw.append_events, events, cap)

    async def load_events(self, limit: int) -> list[dict]:
        return await self._call("load_events", self.raw.load_events, limit)

    async def save_state(self, name: str, blob: bytes) -> None:
        await self._call("save_state", self.raw.save_state, name, blob)

    async def load_state(self, name: str) -> bytes | None:
        return await self._call("load_state", self.raw.load_state, name)

    async def load_calibrator(self, name: str) -> bytes | None:
        return await self._call("load_calibrator", self.raw.load_calibrator, name)

    async def clear_calibrator(self, name: str) -> None:
        await self._call("clear_calibrator", self.raw.clear_calibrator, name)

    async def ensure_label_group(self, group: str) -> None:
        await self._call("ensure_label_group", self._stream().ensure_label_group, group)

    async def read_label_stream(self, group: str, consumer: str, count: int, block_ms: int,
                                claim_idle_ms: int
                                ) -> tuple[str, list[tuple[bytes, dict]], int]:
        return await self._call("read_label_stream", self._stream().read_label_stream, group,
                                consumer, count, block_ms, claim_idle_ms)

    async def ack_label_stream(self, group: str, entry_ids: Sequence[bytes],
                               dead: Sequence[tuple[bytes, dict, str]] = ()) -> int:
        return await self._call("ack_label_stream", self._stream().ack_label_stream, group,
                                entry_ids, dead)

    def snapshot(self) -> bytes:
        """The embedded store's lasting state (blocking: call it in a thread)."""
        return self._snapshots().snapshot()

    def restore(self, snapshot: bytes) -> None:
        """Put a snapshot back into the embedded store (blocking; at start-up only)."""
        self._snapshots().restore(snapshot)

    def close(self) -> None:
        self.raw.close()

    async def ping(self) -> bool:
        if await asyncio.to_thread(self.raw.ping):
            self._answered()
            return True
        self._failed(f"{self.where} did not answer a ping")
        return False

    # --- the breaker ------------------------------------------------------------------------

    async def _call(self, op: str, fn: Callable[..., T], *args: object) -> T:
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

    def _stream(self) -> LabelStream:
        if not hasattr(self.raw, "read_label_stream"):
            raise TypeError(f"the {self.backend} store carries no label stream: use Redis")
        return cast(LabelStream, self.raw)

    def _snapshots(self) -> Snapshots:
        if not hasattr(self.raw, "snapshot"):
            raise TypeError(f"the {self.backend} store keeps no snapshot file")
        return cast(Snapshots, self.raw)

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
