"""Labels from a Redis Stream, consumed by every replica as one consumer group.

Producers add one entry per label to ``adaptd:{namespace}:labels`` with the fields ``id`` (the
prediction id) and ``label`` (a class index or a value, as text). Each replica reads entries as a
consumer of the group (`feedback.stream_group`), joins them like `POST /v1/feedback` does, and
acknowledges (and deletes) them only once the join and its effects are stored. Delivery is
therefore at least once: an entry read by a replica that died before acknowledging it stays
pending, and another consumer claims it after `feedback.stream_claim_idle_ms`. The join makes it
exactly once: a redelivered label finds its record labelled and is a duplicate that changes
nothing. A malformed entry (no id, a label that does not fit the model) is moved to the
dead-letter stream ``...:labels:dead`` with the reason, never dropped and never retried forever.
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
    except (ValueError, TypeError):
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
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="adaptd-label-stream")

    async def stop(self) -> None:
        """Stop reading. An entry being applied keeps its place in the stream unless its
        acknowledgement went out: it is redelivered, and its join makes that harmless."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

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
        good: list[bytes] = []
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
                good.append(entry_id)
        if labels:
            # raises StoreUnavailable (also PartialJoin) before anything is acknowledged, so
            # every entry of the batch comes back as pending and is applied again: joined ones
            # as duplicates
            await self.feedback.apply(labels)
        backlog = await self.store.ack_label_stream(self.group, good + deleted, dead)
        self.metrics.stream_entries.labels("acked").inc(len(good) + len(deleted))
        self.metrics.stream_entries.labels("dead").inc(len(dead))
        self.metrics.stream_backlog.set(backlog)
        for entry_id, _, reason in dead:
            log.warning("label stream entry %s moved to the dead-letter stream: %s",
                        entry_id.decode(), reason)
        return len(entries)
