"""The store as async code sees it: one awaitable method per `Store` operation, run in a thread,
counted when it fails, and not waited on when the store is known to be down.

After a failure the gateway stops calling the store for a back-off (0.5 s, doubling to 15 s)
and fails fast instead, so a hanging Redis costs the prediction path one timeout per back-off
rather than one per batch. Readiness probes (a small write) always go through and close the
breaker when the store takes them; the first call after the back-off tries the store again. A
store that answers but refuses writes (a Redis error reply: out of memory, read-only...) counts as
down until a write succeeds again: reads it still answers do not end the failure.

The methods mirror the `Store` protocol (and `LabelStream`, `Snapshots` where the backend has
them) name for name, so a caller writes `await gateway.put_predictions(records)` and the metric
label is the operation's name.
"""

from __future__ import annotations

import asyncio
import logging
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

log = logging.getLogger("adaptd.store")

STORE_OPS = ("put_predictions", "join_labels", "save_adapter", "load_adapter", "append_memory",
             "load_memory", "clear_memory", "read_label_stream", "ack_label_stream",
             "ensure_label_group", "load_calibrator", "clear_calibrator", "trim_memory",
             "append_events", "load_events", "save_state", "load_state")

# operations that only read: one the store answers does not show that it takes writes again
READ_OPS = frozenset({"load_adapter", "load_memory", "read_label_stream", "load_calibrator",
                      "load_events", "load_state"})


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
        self.last_error = ""  # the last failure, for the log (may quote the server)
        self.last_reason = ""  # the same in a few words fit for a client
        self._refusing = False  # the last failure was an error reply: only a write ends it
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
        # the in-process store takes a batch's records on the event loop when nothing holds it
        # (a hand-off to a thread cost more than the write), else in a thread as any store
        try_put = getattr(self.raw, "try_put_predictions", None)
        if try_put is not None and try_put(records):
            self._answered("put_predictions")
            return
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

    async def readiness(self) -> str | None:
        """None when the store answers and takes a write now; else why not, in a few words fit
        for a client (the full error goes to the log). Always asks the store, even during a
        back-off, and ends the back-off when the store takes the write."""
        try:
            await asyncio.to_thread(self.raw.check_writable)
        except StoreUnavailable as error:
            self._failed(error, "check_writable")
            return error.reason
        except Exception as error:  # a probe never raises: not ready, and why is in the log
            log.exception("the store's readiness probe failed")
            self._failed(StoreUnavailable(f"{self.where} failed its readiness probe: {error!r}",
                                          reason="the store failed its readiness probe"),
                         "check_writable")
            return "the store failed its readiness probe"
        self._answered("check_writable")
        return None

    # --- the breaker ------------------------------------------------------------------------

    async def _call(self, op: str, fn: Callable[..., T], *args: object) -> T:
        if not self.up and self.clock() < self._retry_at:
            self.metrics.store_errors.labels(op).inc()
            raise StoreUnavailable(
                f"the store is unavailable ({self.last_error}); not retried for another "
                f"{self._retry_at - self.clock():.1f} s",
                reason=self.last_reason or "the store does not answer", refused=self._refusing,
            )
        try:
            result = await asyncio.to_thread(fn, *args)
        except StoreUnavailable as error:
            self.metrics.store_errors.labels(op).inc()
            self._failed(error, op)
            raise
        self._answered(op)
        return result

    def _stream(self) -> LabelStream:
        if not hasattr(self.raw, "read_label_stream"):
            raise TypeError(f"the {self.backend} store carries no label stream: use Redis")
        return cast(LabelStream, self.raw)

    def _snapshots(self) -> Snapshots:
        if not hasattr(self.raw, "snapshot"):
            raise TypeError(f"the {self.backend} store keeps no snapshot file")
        return cast(Snapshots, self.raw)

    def _failed(self, error: StoreUnavailable, op: str) -> None:
        message = str(error)
        if self.up or message != self.last_error:
            # once per outage, and again when what the store says changes: not once per call
            log.warning("store %s failed: %s", op, message)
        if self.up:
            self._backoff_s = self.first_backoff_s
        else:
            self._backoff_s = min(self._backoff_s * 2, self.max_backoff_s)
        self.up = False
        self.last_error = message
        self.last_reason = error.reason
        self._refusing = error.refused
        self._retry_at = self.clock() + self._backoff_s
        self.metrics.store_up.set(0)

    def _answered(self, op: str = "") -> None:
        """The store did what `op` asked (no `op`: take it as answering again in full)."""
        if self._refusing and op in READ_OPS:
            return  # the store answers reads, but it refused a write: still down for writes
        if not self.up:
            log.info("the store answers again (%s)", op)
        self.up = True
        self._refusing = False
        self._backoff_s = self.first_backoff_s
        self.metrics.store_up.set(1)
