"""The micro-batcher: concurrent requests become one forward pass, and each caller gets its rows.

Requests queue up; a single worker takes the oldest one and keeps adding requests until the batch
holds `max_batch_size` samples or `max_wait_ms` has passed since the oldest arrived. It waits only
when waiting can pay: when no other request is on its way (every request let in is in this batch
or already answered: none is being read, parsed or queued), the batch runs at once, so a single
client never pays the wait. A request is never split across batches; a request larger than
`max_batch_size` runs as a batch of its own. While the engine computes one batch the next one
gathers, so under load batches fill without waiting.

If a batch fails, every request in it is retried alone without adaptation, so one input the model
cannot process costs only its own caller an error (`PredictionFailed`); the others get results.
That includes inputs the model gives NaN or infinite outputs for (`NonFiniteOutputs`): the error
names the samples of the request, and nothing of them is recorded.

Admission control: the queue holds at most `max_queued_samples` samples (counting the room held
by requests admitted before their bodies are read, `admit`) and at most `max_inflight_requests`
requests are in flight; a request beyond either is refused at once with `Overloaded` (HTTP 503
with Retry-After), counted in `adaptd_requests_shed_total`, and never queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from service.engine import NonFiniteOutputs
from service.metrics import Metrics

R = TypeVar("R")
# (inputs, ids, groups): `groups` holds the group each sample's request named (None: none), or
# is None when no request of the batch named one
RunBatch = Callable[[np.ndarray, list[str], "list[str | None] | None"], Awaitable[list[R]]]

log = logging.getLogger("adaptd.batcher")

# requests queued, gathered or running at once, by default (batcher.max_inflight_requests)
DEFAULT_MAX_INFLIGHT_REQUESTS = 512
# what a refused request's Retry-After says, in seconds
RETRY_AFTER_S = 1


class PredictionFailed(RuntimeError):
    """The model could not process one request's inputs (it failed on them alone too)."""


class BatcherStopped(RuntimeError):
    """The service is shutting down; the request was not run."""


class Overloaded(RuntimeError):
    """The batcher holds as many samples or requests as it may: the request was refused at once,
    without queueing (HTTP 503 with `Retry-After: retry_after_s`)."""

    def __init__(self, message: str, reason: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Admission:
    """A request let in by `MicroBatcher.admit`: in flight, and holding room in the queue until
    its samples are queued, until closed."""

    def __init__(self, batcher: MicroBatcher[Any], held: int) -> None:
        self.batcher = batcher
        self.held = held
        self.closed = False
        self.answered = False

    def unhold(self) -> None:
        self.batcher.held_samples -= self.held
        self.held = 0

    def answer(self) -> None:
        """Its rows (or its error) are set: it is no longer on its way to a batch."""
        if not self.answered:
            self.answered = True
            self.batcher.unanswered -= 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.unhold()
            self.answer()
            self.batcher._inflight(-1)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass
class _Pending(Generic[R]):
    inputs: np.ndarray
    ids: list[str]
    future: asyncio.Future[list[R]]
    admission: Admission
    arrived: float = field(default=0.0)
    group: str | None = None  # the group the request names (conformal.mondrian = "group")

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
        max_queued_samples: int | None = None,
        max_inflight_requests: int | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.run_alone = run_alone
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.metrics = metrics
        # admission control: beyond either bound `submit` refuses at once (`Overloaded`)
        self.max_queued_samples = max_queued_samples or 16 * max_batch_size
        self.max_inflight_requests = max_inflight_requests or DEFAULT_MAX_INFLIGHT_REQUESTS
        self.inflight_requests = 0  # admitted and not closed: being read, queued or running
        # admitted and not answered: the requests a batch being gathered may still wait for
        self.unanswered = 0
        self.held_samples = 0  # room held for admitted requests whose samples are not queued yet
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

    def _admit(self, samples: int, new_request: bool) -> None:
        """Raise `Overloaded` (and count it) when `samples` more queued or held samples would pass
        `max_queued_samples`, or a new request would pass `max_inflight_requests`."""
        if new_request and self.inflight_requests >= self.max_inflight_requests:
            reason = "inflight_requests"
            message = (f"the service is overloaded: {self.inflight_requests} requests are in "
                       f"flight (batcher.max_inflight_requests); retry after {RETRY_AFTER_S} s")
        elif self.waiting_samples + self.held_samples + samples > self.max_queued_samples:
            reason = "queued_samples"
            message = (f"the service is overloaded: {self.waiting_samples} samples are queued "
                       f"and {self.held_samples} held for requests being read; {samples} more "
                       f"would pass batcher.max_queued_samples ({self.max_queued_samples}); "
                       f"retry after {RETRY_AFTER_S} s")
        else:
            return
        self.metrics.requests_shed.labels(reason).inc()
        raise Overloaded(message, reason, RETRY_AFTER_S)

    def admit(self, expected_samples: int = 1) -> Admission:
        """Let one request in, from before its body is read, or raise `Overloaded` at once when
        either bound would be passed. The request is in flight, and holds `expected_samples` of
        the queue's room while its body is read and parsed, until the `Admission` is closed (it
        is a context manager); `submit(..., admission)` queues its samples in that room."""
        self._admit(expected_samples, new_request=True)
        self.held_samples += expected_samples
        self._inflight(+1)
        self.unanswered += 1
        return Admission(self, expected_samples)

    async def submit(self, inputs: np.ndarray, ids: list[str],
                     admission: Admission | None = None, group: str | None = None) -> list[R]:
        """Queue one request's samples and wait for exactly its own rows, in order; refuse it at
        once with `Overloaded` when the queued samples or the requests in flight would pass their
        bound. A request `admitted` before is queued in the room it held; `group` is the group
        it names, handed to the run with each of its samples."""
        if self._worker is None:
            raise BatcherStopped("the batcher is not running")
        if admission is None:
            with self.admit(len(ids)) as admission:
                return await self.submit(inputs, ids, admission, group)
        admission.unhold()  # the samples it brings take the place it held
        self._admit(len(ids), new_request=False)
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, ids, loop.create_future(), admission, loop.time(), group)
        self._waiting(+pending.size)
        self._queue.put_nowait(pending)
        return await pending.future

    def _inflight(self, delta: int) -> None:
        self.inflight_requests += delta
        self.metrics.inflight_requests.set(self.inflight_requests)

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
            # nothing else on its way (being read, parsed or queued): waiting cannot pay
            coming = self.unanswered - len(batch)
            pending = await self._next(deadline - loop.time() if coming > 0 else 0.0)
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
        groups = (None if all(p.group is None for p in batch)
                  else [p.group for p in batch for _ in p.ids])
        self.metrics.batch_size.observe(len(ids))
        try:
            rows = await self.run_batch(inputs, ids, groups)
        except Exception as exc:
            if isinstance(exc, NonFiniteOutputs):  # what some inputs do: no traceback
                log.warning("a batch of %d requests gave non-finite outputs (%s); retrying each "
                            "alone", len(batch), exc)
            else:
                log.warning("a batch of %d requests failed; retrying each alone", len(batch),
                            exc_info=True)
            for pending in batch:
                await self._run_alone(pending)
            return
        start = 0
        for pending in batch:
            pending.admission.answer()
            if not pending.future.done():
                pending.future.set_result(rows[start:start + pending.size])
            start += pending.size

    async def _run_alone(self, pending: _Pending[R]) -> None:
        try:
            groups: list[str | None] | None = (None if pending.group is None
                                               else [pending.group] * pending.size)
            rows = await self.run_alone(pending.inputs, pending.ids, groups)
        except Exception as exc:
            pending.admission.answer()
            self.metrics.prediction_failures.inc(pending.size)
            if isinstance(exc, NonFiniteOutputs):
                self.metrics.non_finite_outputs.inc(len(exc.rows))
            if not pending.future.done():
                pending.future.set_exception(
                    PredictionFailed(f"the model could not process these inputs: {exc}")
                )
            return
        pending.admission.answer()
        if not pending.future.done():
            pending.future.set_result(rows)
