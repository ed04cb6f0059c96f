"""Events: what the service did on its own (a collapse reset now; drift alarms and actions later).

Each event is counted in Prometheus and kept in a bounded in-process log that `GET /v1/events`
lists, newest first.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from service.metrics import Metrics


@dataclass
class Event:
    seq: int
    time: float
    kind: str
    source: str
    action: str | None = None
    detail: dict[str, object] = field(default_factory=dict)


class EventLog:
    """Thread-safe: the engine thread records, the event loop lists."""

    def __init__(self, metrics: Metrics, capacity: int = 1000) -> None:
        self.metrics = metrics
        self._events: deque[Event] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def record(self, kind: str, source: str, action: str | None = None,
               **detail: object) -> Event:
        with self._lock:
            event = Event(next(self._seq), time.time(), kind, source, action, detail)
            self._events.append(event)
        self.metrics.events.labels(kind, source, action or "none").inc()
        return event

    def list(self, limit: int = 50, before: int | None = None) -> list[dict[str, object]]:
        """Newest first; `before` pages back from an event's sequence number."""
        with self._lock:
            events = list(self._events)
        events.reverse()
        if before is not None:
            events = [e for e in events if e.seq < before]
        return [asdict(e) for e in events[:limit]]
