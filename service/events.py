"""Events: what the service did on its own or was told to do (drift alarms and actions, collapse
resets, operator resets).

Each event is counted in Prometheus, kept in a bounded in-process log that `GET /v1/events`
lists newest first, and handed to the store's shared log of the deployment (`take_unsaved`), so
`GET /v1/events?scope=deployment` shows every replica's events and they outlive a restart.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from service.metrics import Metrics
from store.encoding import json_safe  # service.runtime imports it from here too


@dataclass
class Event:
    seq: int
    time: float
    kind: str
    source: str
    action: str | None = None
    detail: dict[str, object] = field(default_factory=dict)
    replica: str | None = None


class EventLog:
    """Thread-safe: the engine thread records, the event loop lists."""

    def __init__(self, metrics: Metrics, capacity: int = 1000, replica: str | None = None,
                 unsaved_capacity: int = 10_000) -> None:
        self.metrics = metrics
        self.replica = replica
        self._events: deque[Event] = deque(maxlen=capacity)
        # waiting for the store; bounded so an outage costs the oldest, never memory
        self._unsaved: deque[Event] = deque(maxlen=unsaved_capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def record(self, kind: str, source: str, action: str | None = None,
               **detail: object) -> Event:
        with self._lock:
            event = Event(next(self._seq), time.time(), kind, source, action,
                          json_safe(detail), self.replica)
            self._events.append(event)
            self._unsaved.append(event)
        self.metrics.events.labels(kind, source, action or "none").inc()
        return event

    def take_unsaved(self) -> list[dict[str, object]]:
        """Events not yet handed to the store, oldest first; they count as saved from now."""
        with self._lock:
            events, self._unsaved = list(self._unsaved), deque(maxlen=self._unsaved.maxlen)
        return [asdict(e) for e in events]

    def put_back(self, events: list[dict[str, object]]) -> None:
        """Events the store did not take, to be offered again (before newer ones)."""
        with self._lock:
            newer = list(self._unsaved)
            self._unsaved.clear()
            self._unsaved.extend(Event(**e) for e in events)  # type: ignore[arg-type]
            self._unsaved.extend(newer)

    def list(self, limit: int = 50, before: int | None = None) -> list[dict[str, object]]:
        """Newest first; `before` pages back from an event's sequence number."""
        with self._lock:
            events = list(self._events)
        events.reverse()
        if before is not None:
            events = [e for e in events if e.seq < before]
        return [asdict(e) for e in events[:limit]]
