"""The micro-batcher: concurrent requests become one forward pass, and each caller gets its rows.

Requests queue up; a single worker takes the oldest one and keeps adding requests until the batch
holds `max_batch_size` samples or `max_wait_ms` has passed since the oldest arrived. A request is
never split across batches; a request larger than `max_batch_size` runs as a batch of its own. While
the engine computes one batch the next one gathers, so under load batches fill without waiting.

If a batch fails, every request in it is retried alone without adaptation, so one input the model
cannot process costs only its own caller an error (`PredictionFailed`); the others get results.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from service.metrics import Metrics

R = TypeVar("R")
RunBatch = Callable[[np.ndarray, list[str]], Awaitable[list[R]]]

log = logging.getLogger("adaptd.batcher")


class PredictionFailed(RuntimeError):
    """The model could not process one request's inputs (it failed on them alone too)."""


class BatcherStopped(RuntimeError):
    """The service is shutting down; the request was not run."""


@dataclass
class _Pending(Generic[R]):
    inputs: np.ndarray
    ids: list[str]
    future: asyncio.Future[list[R]]
    arrived: float = field(default=0.0)

    @property
    def size(self) -> int:
        return len(self.ids)


class MicroBatcher(Generic[R]):
    def __init__(
        self,
        run_batch: RunBatch[R],
        run_alone: RunBatch[R],
        max_batch_size: int,
        max_wait_ms: float,
        metrics: Metrics,
    ) -> None:
        self.run_batch = run_batch
        self.run_alone = run_alone
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.metrics = metrics
        self._queue: asyncio.Queue[_Pending[R]] = asyncio.Queue()
        self._carry: _Pending[R] | None = None
        self._worker: asyncio.Task[None] | None = None
        # the batch being gathered or run: stop() answers it too if the worker is cancelled
        self._gathering: list[_Pending[R]] = []
        self.waiting_samples = 0

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="adaptd-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        leftovers = [*self._gathering, *([self._carry] if self._carry else [])]
        self._gathering = []
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        for pending in leftovers:
            if not pending.future.done():
                pending.future.set_exception(BatcherStopped("the service is shutting down"))
        self._carry = None

    async def submit(self, inputs: np.ndarray, ids: list[str]) -> list[R]:
        """Queue one request's samples and wait for exactly its own rows, in order."""
        if self._worker is None:
            raise BatcherStopped("the batcher is not running")
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, ids, loop.create_future(), loop.time())
        self._waiting(+pending.size)
        self._queue.put_nowait(pending)
        return await pending.future

    def _waiting(self, delta: int) -> None:
        self.waiting_samples += delta
        self.metrics.queue_depth.set(self.waiting_samples)

    async def _first(self) -> _Pending[R]:
        """The oldest request: one carried over from the last batch, or the next to arrive."""
        if self._carry is not None:
            pending, self._carry = self._carry, None
            return pending
        return await self._queue.get()

    async def _next(self, timeout: float) -> _Pending[R] | None:
        """The next request to arrive within `timeout` seconds, or None."""
        if self._carry is not None:
            pending, self._carry = self._carry, None
            return pending
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _gather(self) -> list[_Pending[R]]:
        loop = asyncio.get_running_loop()
        first = await self._first()
        batch, size = [first], first.size
        self._gathering = batch
        deadline = first.arrived + self.max_wait_s
        while size < self.max_batch_size:
            pending = await self._next(deadline - loop.time())
            if pending is None:
                break
            if size + pending.size > self.max_batch_size:
                self._carry = pending
                break
            batch.append(pending)
            size += pending.size
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._gather()
            self._waiting(-sum(p.size for p in batch))
            live = [p for p in batch if not p.future.done()]  # callers that gave up are dropped
            if live:
                await self._run(live)
            self._gathering = []

    async def _run(self, batch: list[_Pending[R]]) -> None:
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([p.inputs for p in batch])
        ids = [i for p in batch for i in p.ids]
        self.metrics.batch_size.observe(len(ids))
        try:
            rows = await self.run_batch(inputs, ids)
        except Exception:
            log.warning("a batch of %d requests failed; retrying each alone", len(batch),
                        exc_info=True)
            for pending in batch:
                await self._run_alone(pending)
            return
        start = 0
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result(rows[start:start + pending.size])
            start += pending.size

    async def _run_alone(self, pending: _Pending[R]) -> None:
        try:
            rows = await self.run_alone(pending.inputs, pending.ids)
        except Exception as exc:
            self.metrics.prediction_failures.inc(pending.size)
            if not pending.future.done():
                pending.future.set_exception(
                    PredictionFailed(f"the model could not process these inputs: {exc}")
                )
            return
        if not pending.future.done():
            pending.future.set_result(rows)
