"""The embedded store: everything in this process, for one replica and for running with no Redis.

It keeps the same semantics as `RedisStore` (records expire after a TTL, an expired id stays
*expired* for a grace period, a label joins at most once), so the service and its tests behave the
same on either backend. Records are kept as the bytes fields a Redis hash would hold (packed into
one bytes object each), so what comes back is what Redis would give back: float32 arrays,
JSON-normalised `extra`, and no aliasing with the caller's objects.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from store.base import (
    EffectsFn,
    JoinResult,
    LabelEffects,
    LabelValue,
    PredictionRecord,
    encode_label,
    memory_rows,
    rejections,
    sort_outcomes,
)
from store.keys import Keys
from store.ring import RecordRing, id_key

SNAPSHOT_FORMAT = "adaptd-memory-store/1"

log = logging.getLogger("adaptd.store")

# Markers outlive their records by the grace period, so there are more of them than records; this
# many per allowed record bounds them and still keeps every live record's (the newest) marker.
MARKERS_PER_RECORD = 4

# The bytes records may take by default: 200,000 of the demo model's fit (about 480 bytes each
# with the shadow's arrays); with the error memory's features (740 bytes) about 180,000 do.
DEFAULT_MAX_BYTES = 128 * 2**20

# A record's fields packed into one bytes object: per field, the name's and the value's lengths
# (u16, u32), then the name and the value. One object, not a dict of seven or more: with the
# markers' floats below, 115 MiB less resident memory at a million predictions (BENCHMARKS.md
# B4), for about 3.6 µs more per record put (timeit, the demo model's record).
_FIELD_HEAD = struct.Struct("<HI")


def pack_fields(fields: dict[str, bytes]) -> bytes:
    """A record's fields as one bytes object; `unpack_fields` gives them back.

    >>> unpack_fields(pack_fields({"id": b"req-1", "prediction": b"0.5"}))
    {'id': b'req-1', 'prediction': b'0.5'}
    """
    parts: list[bytes] = []
    for name, value in fields.items():
        key = name.encode()
        parts += (_FIELD_HEAD.pack(len(key), len(value)), key, value)
    return b"".join(parts)


def unpack_fields(packed: bytes) -> dict[str, bytes]:
    fields = {}
    at, end, head = 0, len(packed), _FIELD_HEAD.size
    while at < end:
        key_length, value_length = _FIELD_HEAD.unpack_from(packed, at)
        at += head
        key = packed[at:at + key_length].decode()
        at += key_length
        fields[key] = packed[at:at + value_length]
        at += value_length
    return fields


class MemoryStore:
    """Prediction records, label joins, adapter checkpoints and row memories in process memory.

    Records are kept in insertion order with their expiry time, so expired ones are purged from the
    front, lazily, whenever a put or a lookup happens; past `max_records`, or when their bytes
    would pass `max_bytes`, the oldest are evicted early and then count as expired, as if their
    TTL had run out. Records and markers live in arrays sized from those bounds (`RecordRing`),
    so the memory they take does not grow with traffic; `reserve` maps it all in at once. A
    memory is a deque of packed float32 rows, as a Redis list holds them, trimmed to its cap on
    every append. One lock guards all state, so every method is safe to call from threads and a
    label joins at most once.

    Parameters
    ----------
    namespace
        The deployment and model this state belongs to (validated as `RedisStore` does).
    record_ttl_s
        How long a prediction record waits for its label.
    expired_grace_s
        How long after a record's expiry its id is still reported *expired* (then *unknown*).
    max_records
        The most records kept; the oldest are evicted beyond it.
    max_bytes
        The most bytes the packed records may take; the oldest are evicted beyond it.
    reserve
        Map in the records' and markers' memory now (`reserved_bytes`; the service does), so
        resident memory does not grow with traffic; else page by page as it is first used.
    clock
        Seconds since the epoch; a test passes a clock it controls.
    keep_adapters
        How many adapter checkpoints to keep, newest first.

    Examples
    --------
    >>> import numpy as np
    >>> from store.base import PredictionRecord
    >>> store = MemoryStore(namespace="demo", record_ttl_s=3600)
    >>> store.put_predictions([
    ...     PredictionRecord(id="req-1", created_at=0.0, prediction=1.0,
    ...                      outputs=np.array([0.2, 0.8], dtype=np.float32)),
    ... ])
    >>> result = store.join_labels([("req-1", 1.0), ("req-1", 0.0), ("req-9", 1.0)])
    >>> [(record.id, record.label) for record in result.joined]
    [('req-1', 1.0)]
    >>> result.duplicate, result.unknown
    (['req-1'], ['req-9'])
    >>> store.save_adapter(b"weights"), store.load_adapter()
    (1, (1, b'weights'))
    """

    backend = "memory"

    def __init__(
        self,
        namespace: str,
        record_ttl_s: float,
        expired_grace_s: float = 86400.0,
        max_records: int = 200_000,
        clock: Callable[[], float] = time.time,
        keep_adapters: int = 5,
        max_bytes: int = DEFAULT_MAX_BYTES,
        reserve: bool = False,
    ) -> None:
        if record_ttl_s <= 0:
            raise ValueError(f"record_ttl_s must be positive, got {record_ttl_s}")
        if expired_grace_s < 0:
            raise ValueError(f"expired_grace_s must be zero or positive, got {expired_grace_s}")
        if not 1 <= max_records <= 2**29:
            raise ValueError(f"max_records must be from 1 to 2**29, got {max_records}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if keep_adapters < 1:
            raise ValueError(f"keep_adapters must be at least 1, got {keep_adapters}")
        self.namespace = Keys(namespace).namespace
        self.record_ttl_s = float(record_ttl_s)
        self.expired_grace_s = float(expired_grace_s)
        self.max_records = max_records
        self.max_markers = MARKERS_PER_RECORD * max_records
        self.max_bytes = max_bytes
        self.keep_adapters = keep_adapters
        self._clock = clock
        self._lock = threading.Lock()
        # records (packed fields) and markers: an id's expiry a grace period after its record's,
        # negated once labelled. An expiry is after the clock's reading plus record_ttl_s > 0, so
        # with a clock that reads 0 or more (time.time, a test's) it is positive and its sign free
        # to say "labelled"
        self._records = RecordRing(max_records, self.max_markers, max_bytes, reserve=reserve)
        self._warned_too_big = False
        self._adapters: dict[int, bytes] = {}
        self._adapter_version = 0
        # name -> packed float32 rows, oldest first; every row of one memory has the same width
        self._memories: dict[str, deque[bytes]] = {}
        self._calibrators: dict[str, bytes] = {}
        self._events: deque[str] = deque()  # JSON, oldest first
        self._states: dict[str, bytes] = {}
        self._keys = Keys(namespace)

    def ping(self) -> bool:
        return True

    @property
    def reserved_bytes(self) -> int:
        """The memory records and markers take at most (all of it from the start if reserved)."""
        return self._records.nbytes

    def check_writable(self) -> None:
        """Always writable: the store is this process's memory."""

    def put_predictions(self, records: Sequence[PredictionRecord]) -> None:
        encoded = [(record.id, pack_fields(record.to_fields())) for record in records]
        with self._lock:
            self._put_encoded(encoded)

    def try_put_predictions(self, records: Sequence[PredictionRecord]) -> bool:
        """`put_predictions` if the store is free now, without waiting (False, nothing written,
        when a join or another write holds it): so the event loop may write a batch's records
        itself, never waiting behind a join, where a thread would cost it a hand-off."""
        encoded = [(record.id, pack_fields(record.to_fields())) for record in records]
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._put_encoded(encoded)
        finally:
            self._lock.release()
        return True

    def _put_encoded(self, encoded: list[tuple[str, bytes]]) -> None:
        """Under the lock: the records' fields in, the expired and the oldest beyond the caps
        out."""
        now = self._clock()
        self._records.purge(now)
        expires_at = now + self.record_ttl_s
        marker = expires_at + self.expired_grace_s
        for prediction_id, fields in encoded:
            if len(fields) > self.max_bytes:
                if not self._warned_too_big:
                    log.warning("a prediction record of %d bytes is larger than store.max_bytes "
                                "(%d): records this large are not kept, so their labels will "
                                "count as unknown; raise store.max_bytes", len(fields),
                                self.max_bytes)
                    self._warned_too_big = True
                continue
            # a replaced id's record and marker move to the back, keeping expiry order
            self._records.put(id_key(prediction_id), fields, expires_at, marker)

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        with self._lock:
            now = self._clock()
            self._records.purge(now)
            fields = self._live_fields(prediction_id, now)
        return None if fields is None else PredictionRecord.from_fields(fields)

    def join_labels(
        self,
        labels: Sequence[tuple[str, LabelValue]],
        effects: EffectsFn | None = None,
        calibrators: Sequence[str] = (),
    ) -> JoinResult:
        for name in calibrators:
            self._keys.calibrator(name)
        result = JoinResult()
        # id -> fields with the label, written only once the effects are known
        labelled: dict[str, dict[str, bytes]] = {}
        values: dict[str, LabelValue] = {}
        outcomes: list[tuple[str, str]] = []  # (kind, id) in label order, as `sort_outcomes` reads
        with self._lock:
            now = self._clock()
            self._records.purge(now)
            for prediction_id, label in labels:
                fields = self._live_fields(prediction_id, now)
                if fields is not None:
                    if "label" in fields:
                        outcomes.append(("duplicate", prediction_id))
                    elif prediction_id in labelled:
                        outcomes.append(("again", prediction_id))
                    else:
                        # a new dict, so a record already handed out is never changed under its
                        # reader
                        labelled[prediction_id] = {
                            **fields,
                            "label": encode_label(label),
                            "labelled_at": repr(float(now)).encode(),
                        }
                        values[prediction_id] = label
                        outcomes.append(("live", prediction_id))
                    continue
                marker = self._records.marker(id_key(prediction_id))
                if marker is None or abs(marker) <= now:
                    outcomes.append(("unknown", prediction_id))
                elif marker < 0:  # labelled
                    outcomes.append(("duplicate", prediction_id))
                else:
                    outcomes.append(("expired", prediction_id))
            joined = [PredictionRecord.from_fields(f) for f in labelled.values()]
            changes = LabelEffects()
            rejected: dict[str, str] = {}
            appends: list[tuple[str, np.ndarray, int]] = []
            if effects is not None and joined:
                # computed before anything is written: if it raises, nothing changes
                changes = effects(joined, {n: self._calibrators.get(n) for n in calibrators})
                rejected = rejections(changes, joined)
                appends = [(name, memory_rows(rows, cap), cap)
                           for name, rows, cap in changes.memories]
                for name, rows, _ in appends:
                    self._check_width(name, rows)
                unasked = set(changes.calibrators) - set(calibrators)
                if unasked:
                    raise ValueError(f"effects wrote calibrators {sorted(unasked)} the join was "
                                     "not asked to read")
            for prediction_id, fields in labelled.items():
                if prediction_id in rejected:
                    continue  # left unlabelled: the same label sent again is rejected again
                key, label = id_key(prediction_id), values[prediction_id]
                if isinstance(label, list | tuple | np.ndarray):  # no slot holds it
                    self._records.relabel(key, pack_fields(fields))
                else:  # kept in the record's slot, which keeps its place
                    self._records.label(key, float(label), now)
            for name, rows, cap in appends:
                self._append(name, rows, cap)
            for name, state in changes.calibrators.items():
                self._calibrators[name] = bytes(state)
        sort_outcomes(outcomes, joined, rejected, result)
        return result

    def save_adapter(self, blob: bytes) -> int:
        with self._lock:
            self._adapter_version += 1
            version = self._adapter_version
            self._adapters[version] = bytes(blob)
            self._adapters.pop(version - self.keep_adapters, None)
        return version

    def load_adapter(self, version: int | None = None) -> tuple[int, bytes] | None:
        with self._lock:
            wanted = self._adapter_version if version is None else int(version)
            blob = self._adapters.get(wanted)
        return None if blob is None else (wanted, blob)

    def append_memory(self, name: str, rows: np.ndarray, cap: int) -> None:
        self._keys.memory(name)  # the same name check as Redis
        rows = memory_rows(rows, cap)
        with self._lock:
            self._check_width(name, rows)
            self._append(name, rows, cap)

    def _check_width(self, name: str, rows: np.ndarray) -> None:
        self._keys.memory(name)
        memory = self._memories.get(name)
        if memory and len(rows) and len(memory[0]) != rows.shape[1] * rows.itemsize:
            raise ValueError(
                f"memory {name!r} holds rows of {len(memory[0]) // 4} values; these have "
                f"{rows.shape[1]}: clear it (clear_memory) before storing rows of a new width"
            )

    def _append(self, name: str, rows: np.ndarray, cap: int) -> None:
        if len(rows) == 0:
            return
        memory = self._memories.setdefault(name, deque())
        memory.extend(row.tobytes() for row in rows)
        while len(memory) > cap:
            memory.popleft()

    def load_memory(self, name: str) -> np.ndarray:
        self._keys.memory(name)
        with self._lock:
            memory = self._memories.get(name)
            if not memory:
                return np.empty((0, 0), dtype=np.float32)
            width = len(memory[0]) // 4
            joined = b"".join(memory)
        return np.frombuffer(joined, dtype=np.float32).reshape(-1, width).copy()

    def clear_memory(self, name: str) -> None:
        self._keys.memory(name)
        with self._lock:
            self._memories.pop(name, None)

    def trim_memory(self, name: str, keep: int) -> None:
        self._keys.memory(name)
        with self._lock:
            memory = self._memories.get(name)
            while memory and len(memory) > max(keep, 0):
                memory.popleft()

    def append_events(self, events: Sequence[dict], cap: int) -> None:
        encoded = [json.dumps(event, separators=(",", ":"), default=str) for event in events]
        with self._lock:
            self._events.extend(encoded)
            while len(self._events) > cap:
                self._events.popleft()

    def load_events(self, limit: int) -> list[dict]:
        with self._lock:
            newest = list(self._events)[-limit:] if limit > 0 else []
        return [json.loads(event) for event in reversed(newest)]

    def save_state(self, name: str, blob: bytes) -> None:
        self._keys.state(name)
        with self._lock:
            self._states[name] = bytes(blob)

    def load_state(self, name: str) -> bytes | None:
        self._keys.state(name)
        with self._lock:
            return self._states.get(name)

    def load_calibrator(self, name: str) -> bytes | None:
        self._keys.calibrator(name)
        with self._lock:
            return self._calibrators.get(name)

    def clear_calibrator(self, name: str) -> None:
        self._keys.calibrator(name)
        with self._lock:
            self._calibrators.pop(name, None)

    # --- a snapshot on disk: what a restart of the embedded store keeps ----------------------

    def snapshot(self) -> bytes:
        """The lasting state as JSON bytes: adapter checkpoints, memories, calibrators, saved
        states and events. Prediction records are left out: they wait for labels for a while,
        and a label for a prediction made before a restart counts as unknown."""
        def b64(blob: bytes) -> str:
            return base64.b64encode(blob).decode()

        with self._lock:
            state = {
                "format": SNAPSHOT_FORMAT,
                "namespace": self.namespace,
                "adapter_version": self._adapter_version,
                "adapters": {str(v): b64(blob) for v, blob in self._adapters.items()},
                "memories": {name: [b64(row) for row in rows]
                             for name, rows in self._memories.items()},
                "calibrators": {name: b64(blob) for name, blob in self._calibrators.items()},
                "states": {name: b64(blob) for name, blob in self._states.items()},
                "events": list(self._events),
            }
        return json.dumps(state, separators=(",", ":")).encode()

    def restore(self, snapshot: bytes) -> None:
        """Load what `snapshot` wrote (the whole lasting state is replaced). ValueError, and
        nothing changed, when it is not a snapshot of this namespace."""
        try:
            state = json.loads(snapshot)
            if state.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"not a snapshot of the embedded store: format "
                                 f"{state.get('format')!r}, not {SNAPSHOT_FORMAT!r}")
            if state["namespace"] != self.namespace:
                raise ValueError(f"the snapshot belongs to namespace {state['namespace']!r}, "
                                 f"not {self.namespace!r}")
            unb64 = base64.b64decode
            adapters = {int(v): unb64(blob) for v, blob in state["adapters"].items()}
            memories = {name: deque(unb64(row) for row in rows)
                        for name, rows in state["memories"].items()}
            calibrators = {n: unb64(b) for n, b in state["calibrators"].items()}
            states = {n: unb64(b) for n, b in state["states"].items()}
            events = deque(str(e) for e in state["events"])
            version = int(state["adapter_version"])
        except (KeyError, TypeError, AttributeError, binascii.Error, json.JSONDecodeError,
                UnicodeDecodeError) as error:
            raise ValueError(f"not a snapshot of the embedded store: {error!r}") from error
        with self._lock:
            self._adapters, self._adapter_version = adapters, version
            self._memories, self._calibrators = memories, calibrators
            self._states, self._events = states, events

    def close(self) -> None:
        with self._lock:
            self._calibrators.clear()
            self._events.clear()
            self._states.clear()
            # new, unreserved arrays, so the memory of a closed store goes back
            self._records = RecordRing(self.max_records, self.max_markers, self.max_bytes)
            self._adapters.clear()
            self._memories.clear()

    def _live_fields(self, prediction_id: str, now: float) -> dict[str, bytes] | None:
        """The fields of an unexpired record; expired ones behind a live front are dropped here."""
        held = self._records.get(id_key(prediction_id), now)
        if held is None:
            return None
        packed, label, labelled_at = held
        fields = unpack_fields(packed)
        if fields["id"] != prediction_id.encode():  # two ids with one 64-bit key
            return None
        if not math.isnan(labelled_at):  # a number label, kept beside the record
            fields["label"] = encode_label(label)
            fields["labelled_at"] = repr(labelled_at).encode()
        return fields
