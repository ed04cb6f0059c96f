"""Labels from a Redis Stream, consumed by every replica as one consumer group.

Producers add one entry per label to ``adaptd:{namespace}:labels`` with the fields ``id`` (the
prediction id) and ``label`` (a class index or a value, as text). Each replica reads entries as a
consumer of the group (`feedback.stream_group`), joins them like `POST /v1/feedback` does, and
acknowledges (and deletes) them only once the join and its effects are stored. Delivery is
therefore at least once: an entry read by a replica that died before acknowledging it stays
pending, and another consumer claims it after `feedback.stream_claim_idle_ms`. The join makes it
exactly once: a redelivered label finds its record labelled and is a duplicate that changes
nothing. A malformed entry (no id, a label that does not fit the model) and a rejected one (a label
whose prediction cannot be used: its stored outputs are not finite, say) are moved to the
dead-letter stream ``...:labels:dead`` with the reason, never dropped and never retried forever.

The consumer never dies quietly: an unexpected error in it is logged with its traceback, counted
(`adaptd_label_stream_crashes_total`) and the consumer restarted after a short back-off; /readyz
is 503 from the crash until the restarted consumer has read the stream again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from service.feedback import FeedbackService
from service.gateway import StoreGateway
from service.inputs import id_problem, label_problem
from service.metrics import Metrics
from service.model import LoadedModel
from service.settings import FeedbackSettings
from store import LabelValue, StoreUnavailable
from store.base import decode_label

log = logging.getLogger("adaptd.labels")

# how long the consumer waits before trying a store that failed again (the gateway's breaker
# answers at once meanwhile, so this only keeps the loop from spinning)
RETRY_S = 1.0

# after a crash the consumer restarts after this long, doubling with each crash in a row up to
# RESTART_MAX_S (a crash that repeats at once, on the same entry, must not spin)
RESTART_S = 1.0
RESTART_MAX_S = 30.0


def default_consumer_name() -> str:
    """This replica's name in the group: host and process, unique while both live."""
    return f"{socket.gethostname()}-{os.getpid()}"[:128]


def parse_entry(fields: dict, model: LoadedModel) -> tuple[str, LabelValue] | str:
    """An entry's (id, label), or why it cannot be one.

    >>> from types import SimpleNamespace
    >>> from adapters.task import task_named
    >>> model = SimpleNamespace(task=task_named("classification"), width=10)
    >>> parse_entry({b"id": b"req-1", b"label": b"3"}, model)
    ('req-1', 3.0)
    >>> parse_entry({b"id": b"req-1"}, model)
    "the entry has no 'label' field"
    """
    decoded = {}
    for key in (b"id", b"label"):
        value = fields.get(key)
        if value is None:
            return f"the entry has no {key.decode()!r} field"
        try:
            decoded[key] = value.decode()
        except UnicodeDecodeError:
            return f"the entry's {key.decode()!r} is not UTF-8 text"
    prediction_id = decoded[b"id"]
    problem = id_problem(prediction_id)
    if problem is not None:
        return problem
    try:
        label = decode_label(decoded[b"label"])
    except (ValueError, TypeError, RecursionError):  # RecursionError: JSON nested too deep
        return f"label {decoded[b'label'][:40]!r} is not a number or a list of numbers"
    problem = label_problem(label, model)
    if problem is not None:
        return f"label {problem}"
    return prediction_id, label


class LabelStreamConsumer:
    """One replica's consumer of the label stream, as a background task."""

    def __init__(self, store: StoreGateway, feedback: FeedbackService, model: LoadedModel,
                 settings: FeedbackSettings, metrics: Metrics) -> None:
        self.store = store
        self.feedback = feedback
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.group = settings.stream_group
        self.consumer = settings.stream_consumer or default_consumer_name()
        self.restart_s = RESTART_S
        self.restart_max_s = RESTART_MAX_S
        # why the consumer is not consuming now (a crash it is restarting from), else None: what
        # /readyz reports
        self.problem: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.problem = None
        self._task = asyncio.create_task(self._supervise(), name="adaptd-label-stream")

    async def stop(self) -> None:
        """Stop reading. An entry being applied keeps its place in the stream unless its
        acknowledgement went out: it is redelivered, and its join makes that harmless."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    @property
    def running(self) -> bool:
        """The consumer is started and consuming: not stopped, not restarting from a crash."""
        return self._task is not None and not self._task.done() and self.problem is None

    async def _supervise(self) -> None:
        """Run the consumer; when it dies of anything but a cancellation, log it with its
        traceback, count it, report it to /readyz, and start it again after a back-off."""
        delay = self.restart_s
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self.problem is None:  # it had consumed since its last crash, if any
                    delay = self.restart_s
                self.metrics.stream_crashes.inc()
                self.problem = (f"the label stream consumer crashed ({type(error).__name__}) and "
                                "is being restarted; the log has the traceback")
                log.error("label stream consumer crashed; restarting it in %g s", delay,
                          exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.restart_max_s)
                log.info("label stream consumer restarting")
            else:  # _run returns only when told to: never, today
                return

    async def _run(self) -> None:
        while True:
            try:
                await self.store.ensure_label_group(self.group)
                break
            except StoreUnavailable:
                await asyncio.sleep(RETRY_S)
        log.info("consuming labels as %s in group %s", self.consumer, self.group)
        failing = False
        while True:
            try:
                await self.step()
            except StoreUnavailable as error:
                if not failing:  # once per outage, not once a second
                    log.warning("label stream: %s; retrying every %.0f s", error, RETRY_S)
                failing = True
                await asyncio.sleep(RETRY_S)
            else:
                if self.problem is not None:
                    log.info("label stream consumer runs again")
                    self.problem = None
                if failing:
                    log.info("label stream: the store answers again")
                failing = False

    async def step(self) -> int:
        """Read, apply and acknowledge one batch of entries; returns how many were taken."""
        s = self.settings
        source, entries, backlog = await self.store.read_label_stream(
            self.group, self.consumer, s.stream_batch, s.stream_block_ms, s.stream_claim_idle_ms)
        self.metrics.stream_backlog.set(backlog)
        if not entries:
            return 0
        self.metrics.stream_entries.labels("claimed" if source == "claimed" else "read").inc(
            len(entries))
        labels: list[tuple[str, LabelValue]] = []
        good: list[tuple[bytes, dict]] = []
        dead: list[tuple[bytes, dict, str]] = []
        deleted: list[bytes] = []
        for entry_id, fields in entries:
            if not fields:  # deleted by someone while pending: nothing to apply
                deleted.append(entry_id)
                continue
            parsed = parse_entry(fields, self.model)
            if isinstance(parsed, str):
                dead.append((entry_id, fields, parsed))
            else:
                labels.append(parsed)
                good.append((entry_id, fields))
        acked = [entry_id for entry_id, _ in good]
        if labels:
            # raises StoreUnavailable (also PartialJoin) before anything is acknowledged, so
            # every entry of the batch comes back as pending and is applied again: joined ones
            # as duplicates
            result = await self.feedback.apply(labels)
            if result.reasons:
                # rejected: its prediction cannot be used, so sending it again cannot succeed
                acked = []
                for (entry_id, fields), (prediction_id, _) in zip(good, labels, strict=True):
                    why = result.reasons.get(prediction_id)
                    if why is None:
                        acked.append(entry_id)
                    else:
                        dead.append((entry_id, fields, f"label for prediction {prediction_id} "
                                                       f"rejected: {why}"))
        backlog = await self.store.ack_label_stream(self.group, acked + deleted, dead)
        self.metrics.stream_entries.labels("acked").inc(len(acked) + len(deleted))
        self.metrics.stream_entries.labels("dead").inc(len(dead))
        self.metrics.stream_backlog.set(backlog)
        for entry_id, _, reason in dead:
            log.warning("label stream entry %s moved to the dead-letter stream: %s",
                        entry_id.decode(), reason)
        return len(entries)
