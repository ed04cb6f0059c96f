"""The one place that writes what the engine changed to the store, in the order it changed.

The engine owns the model and the memories but has no store: it lists what the store must follow
(`service.engine.StateChange`: memory rows added, a memory reset or trimmed, the calibrator reset
by a drift action). `StateSync.run` runs work on the engine and then writes those changes; callers
never see them. A change the store cannot take now (it is down) stays queued, in order, and is
written by the next flush after the store answers again; a reset supersedes what was queued for
that memory before it, and when the queue grows past `max_pending` the oldest row additions are
dropped (the in-process memory keeps them; the store, which replicas and restarts read, misses
them, as it would have without the queue).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from service.calibration import Conformal
from service.engine import (
    CalibratorReset,
    Engine,
    MemoryCleared,
    MemoryRowsAdded,
    MemoryTrimmed,
    StateChange,
)
from service.gateway import StoreGateway
from store import StoreUnavailable

T = TypeVar("T")

log = logging.getLogger("adaptd")


class StateSync:
    """Runs work on the engine and brings the store in step with what it changed."""

    def __init__(self, engine: Engine, store: StoreGateway, persisted: frozenset[str],
                 conformal: Conformal | None, max_pending: int = 256) -> None:
        self.engine = engine
        self.store = store
        self.persisted = persisted  # the memories whose rows live in the store
        self.conformal = conformal
        self.max_pending = max_pending
        self._pending: deque[StateChange] = deque()
        self._lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        """Changes waiting for the store."""
        return len(self._pending)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the engine thread, then its changes written to the store."""
        try:
            return await self.engine.run(fn, *args)
        finally:
            await self.flush()

    async def flush(self) -> bool:
        """Write every queued change, in order; False when the store did not take them all (they
        stay queued for the next flush)."""
        async with self._lock:
            for change in self.engine.take_changes():
                self._enqueue(change)
            while self._pending:
                try:
                    await self._write(self._pending[0])
                except StoreUnavailable:
                    return False
                except ValueError as error:
                    # the store refuses this change for good (rows of another width: the stored
                    # memory is another model's); waiting would block every change behind it
                    log.error("the store refused a %s change and it is dropped: %s",
                              type(self._pending[0]).__name__, error)
                self._pending.popleft()
            return True

    def _enqueue(self, change: StateChange) -> None:
        if isinstance(change, (MemoryRowsAdded, MemoryCleared, MemoryTrimmed)):
            if change.name not in self.persisted:
                return
            if isinstance(change, MemoryCleared):  # what was queued for that memory is moot
                self._pending = deque(c for c in self._pending
                                      if getattr(c, "name", None) != change.name)
        self._pending.append(change)
        while len(self._pending) > self.max_pending:
            oldest_rows = next((c for c in self._pending if isinstance(c, MemoryRowsAdded)), None)
            if oldest_rows is None:
                break
            self._pending.remove(oldest_rows)
            log.warning("the store is behind: %d %s memory rows were not saved there",
                        len(oldest_rows.rows), oldest_rows.name)

    async def _write(self, change: StateChange) -> None:
        if isinstance(change, MemoryRowsAdded):
            await self.store.append_memory(change.name, change.rows, change.capacity)
        elif isinstance(change, MemoryCleared):
            await self.store.clear_memory(change.name)
        elif isinstance(change, MemoryTrimmed):
            await self.store.trim_memory(change.name, change.keep)
        elif isinstance(change, CalibratorReset) and self.conformal is not None:
            await self.conformal.reset()
