"""The in-process store's prediction records and id markers in memory allocated once, at start.

Records wait for their labels and are bounded (`max_records`, `max_bytes`); an id's *marker* (its
expiry plus a grace period, negated once labelled) outlives its record, so a late label is told
*expired* or *duplicate* rather than *unknown*. Kept as Python objects (an ordered dict of bytes
per record, another of floats per marker) they cost about 300 bytes of bookkeeping an entry on top
of their data, allocated as traffic comes: resident memory grew by 66% from 10,000 to 1,000,000
predictions (BENCHMARKS.md B4). Here everything lives in fixed arrays sized from the bounds, which
`the service maps in at start, so memory does not move with traffic:

* an id table: open addressing with linear probing over 64-bit keys of the ids (Python's string
  hash, stable for the life of the process, which is as long as a record lives), each entry with
  its marker, its record's slot and its place in the marker ring; at most 80% full, so a lookup
  reads a few entries;
* a ring of marker places, oldest first, for eviction past `max_markers` and for expiry;
* a ring of record slots (expiry, key, where its bytes are, and a number label with the time it
  came), oldest first, and one arena of `max_bytes` the packed records are written to in the
  same order, wrapping round; writing a record evicts the oldest ones its bytes or its slot would
  overwrite.

A record keeps its place when a number label joins it (the slot holds the label), so a store full
of labelled records still holds `max_records` of them, as the ordered dict did. Two things take a
new slot and a new marker place, leaving the old ones dead until the rings' tails pass them: an
id put again (it moves to the back, with a new expiry, as Redis's SET with EX would), and a label
of several values, whose record is written again at the head. The record ring has twice
`max_records` slots for those; where they are frequent, the oldest records go early.

All of it is one anonymous memory mapping, mapped in at once when `reserve` is asked for (the
service does), else page by page as it is first written (tests, which make hundreds of stores).

Two ids with the same 64-bit key (about one chance in 10^8 among a million live ids) would share
a marker; a record's own id is checked when it is read (`MemoryStore._live_fields`).
"""

from __future__ import annotations

import math
import mmap

import numpy as np

_KEY_BITS = (1 << 64) - 1


def id_key(prediction_id: str) -> int:
    """A nonzero 64-bit key for an id (zero marks a free entry in the table).

    >>> id_key("req-1") == id_key("req-1") != 0
    True
    """
    return (hash(prediction_id) & _KEY_BITS) or 1


def _mapping(length: int, populate: bool) -> mmap.mmap:
    """`length` zeroed bytes of anonymous memory: mapped in page by page as they are first
    written, or all at once (MAP_POPULATE, about 7 times faster than touching each page)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(length, 1), flags=flags)


class RecordRing:
    """Prediction records (packed bytes) and id markers, bounded, in preallocated arrays.

    Not thread-safe: `MemoryStore` holds its lock around every call.

    >>> ring = RecordRing(max_records=2, max_markers=4, max_bytes=1024)
    >>> for i in range(3):
    ...     ring.put(id_key(f"req-{i}"), f"record {i}".encode(), expires_at=10.0, marker=20.0)
    >>> ring.get(id_key("req-0"), now=0.0), ring.get(id_key("req-2"), now=0.0)
    (None, (b'record 2', nan, nan))
    >>> ring.label(id_key("req-2"), 1.0, at=5.0)
    >>> ring.get(id_key("req-2"), now=0.0), ring.marker(id_key("req-2"))
    ((b'record 2', 1.0, 5.0), -20.0)
    >>> ring.marker(id_key("req-0")), ring.marker(id_key("req-9"))
    (20.0, None)
    """

    # memoryviews of the one mapping, `__init__` carves them (numbers, but for `_arena`'s bytes)
    _keys: memoryview
    _marks: memoryview[float]
    _marker_keys: memoryview
    _slot_keys: memoryview
    _expiries: memoryview[float]
    _starts: memoryview
    _lengths: memoryview
    _labels: memoryview[float]
    _labelled_at: memoryview[float]
    _slots: memoryview
    _places: memoryview
    _arena: memoryview

    def __init__(self, max_records: int, max_markers: int, max_bytes: int,
                 reserve: bool = False) -> None:
        if min(max_records, max_markers, max_bytes) < 1:
            raise ValueError("max_records, max_markers and max_bytes must be at least 1")
        if max_records > 2**29 or max_markers > 2**31 - 1:  # int32 slots and places
            raise ValueError(f"max_records must be at most 2**29 and max_markers below 2**31, "
                             f"got {max_records} and {max_markers}")
        self.max_records = max_records
        self.max_markers = max_markers
        self.max_bytes = max_bytes
        size = 8
        while size < 1.25 * max_markers:  # at most 80% full
            size *= 2
        self._mask = size - 1
        self._slot_count = 2 * max_records
        layout = [  # (name, dtype, length), 8-byte types first so every array stays aligned
            # the id table: key (0: free), marker, record slot + 1 (0: none), marker ring place
            ("_keys", np.uint64, size), ("_marks", np.float64, size),
            # the marker ring: keys, oldest at _marker_tail (both counters only grow)
            ("_marker_keys", np.uint64, max_markers),
            # the record ring: per slot key, expiry, first byte (counted from the arena's first
            # write, never wrapped) and length (-1: dead, evicted or replaced)
            ("_slot_keys", np.uint64, self._slot_count),
            ("_expiries", np.float64, self._slot_count),
            ("_starts", np.int64, self._slot_count), ("_lengths", np.int64, self._slot_count),
            # a number label and when it came (NaN: no label)
            ("_labels", np.float64, self._slot_count),
            ("_labelled_at", np.float64, self._slot_count),
            ("_slots", np.int32, size), ("_places", np.int32, size),
            ("_arena", np.uint8, max_bytes),
        ]
        self.nbytes = sum(np.dtype(dtype).itemsize * length for _, dtype, length in layout)
        self._memory = _mapping(self.nbytes, populate=reserve)
        whole, offset = memoryview(self._memory), 0
        for name, dtype, length in layout:
            size = np.dtype(dtype).itemsize * length
            # indexing a memoryview gives plain Python numbers, as fast as `array.array`; mypy
            # wants the format as a literal
            view = whole[offset:offset + size].cast(np.dtype(dtype).char)  # type: ignore[arg-type]
            setattr(self, name, view)
            offset += size
        self._marker_head = self._marker_tail = 0
        self._record_head = self._record_tail = 0
        self._live = 0  # slots not dead: records stored, expired ones not yet purged included
        self._written = 0  # where the next record's bytes go, counted as `_starts` are

    def __len__(self) -> int:
        """Records held, expired ones not yet purged included."""
        return self._live

    @property
    def markers(self) -> int:
        """Markers held (at most `max_markers`), expired ones not yet purged included."""
        count = 0
        for place in range(self._marker_tail, self._marker_head):
            entry = self._find(self._marker_keys[place % self.max_markers])
            count += entry >= 0 and self._places[entry] == place % self.max_markers
        return count

    # --- records ---------------------------------------------------------------------------

    def put(self, key: int, record: bytes, expires_at: float, marker: float) -> None:
        """Store `record` for `key` (replacing any it had) with a new marker at the ring's head."""
        self._check_size(record)
        if self._marker_head - self._marker_tail >= self.max_markers:
            self._drop_oldest_marker()  # may move entries: the table is searched after
        entry = self._insert(key)
        if self._slots[entry]:  # the id put again
            self._kill(self._slots[entry] - 1)
        start = self._make_room(len(record))  # evicts records only: entries stay where they are
        place = self._marker_head % self.max_markers
        self._marker_keys[place] = key
        self._marker_head += 1
        self._marks[entry] = marker
        self._places[entry] = place
        self._slots[entry] = self._write(key, record, expires_at, start) + 1

    def label(self, key: int, value: float, at: float) -> None:
        """Join a number label to a record in its slot, and negate its marker: labelled. A record
        gone only has its marker negated. KeyError when `key` has no marker."""
        entry = self._labelled_entry(key)
        if self._slots[entry]:
            slot = self._slots[entry] - 1
            self._labels[slot] = value
            self._labelled_at[slot] = at

    def relabel(self, key: int, record: bytes) -> None:
        """Store a record again, labelled (a label of several values, which no slot holds), at
        the head with the same expiry, and negate its marker. A record gone meanwhile (evicted by
        an earlier `relabel` in the same join, whose bytes took its place), or one too large now
        for the arena, only has its marker negated. KeyError when `key` has no marker."""
        entry = self._labelled_entry(key)
        if not self._slots[entry]:
            return
        old = self._slots[entry] - 1
        expires_at = self._expiries[old]
        self._lengths[old] = -1  # dead, as `_kill` would make it, without searching for the entry
        self._live -= 1
        self._slots[entry] = 0
        if len(record) <= self.max_bytes:
            start = self._make_room(len(record))
            self._slots[entry] = self._write(key, record, expires_at, start) + 1

    def get(self, key: int, now: float) -> tuple[bytes, float, float] | None:
        """A copy of the record's bytes, its number label and when that came (NaN and NaN:
        none), if it is held and unexpired (an expired one is dropped)."""
        entry = self._find(key)
        if entry < 0 or not self._slots[entry]:
            return None
        slot = self._slots[entry] - 1
        if self._expiries[slot] <= now:
            self._kill(slot)
            return None
        first = self._starts[slot] % self.max_bytes
        return (bytes(self._arena[first:first + self._lengths[slot]]), self._labels[slot],
                self._labelled_at[slot])

    def marker(self, key: int) -> float | None:
        entry = self._find(key)
        return None if entry < 0 else self._marks[entry]

    def purge(self, now: float) -> None:
        """Drop expired records and markers from the rings' tails (both in expiry order, but for
        labelled records written again, which `get` drops when it meets them)."""
        while self._record_tail < self._record_head:
            slot = self._record_tail % self._slot_count
            if self._lengths[slot] >= 0 and self._expiries[slot] > now:
                break
            self._drop_oldest_record()
        while self._marker_tail < self._marker_head:
            place = self._marker_tail % self.max_markers
            entry = self._find(self._marker_keys[place])
            if entry >= 0 and self._places[entry] == place and abs(self._marks[entry]) > now:
                break
            self._drop_oldest_marker()

    # --- inside ----------------------------------------------------------------------------

    def _labelled_entry(self, key: int) -> int:
        entry = self._find(key)
        if entry < 0:
            raise KeyError(key)
        self._marks[entry] = -abs(self._marks[entry])
        return entry

    def _check_size(self, record: bytes) -> None:
        if len(record) > self.max_bytes:
            raise ValueError(f"a record of {len(record):,} bytes does not fit in the store's "
                             f"{self.max_bytes:,} (store.max_bytes)")

    def _make_room(self, length: int) -> int:
        """Where a record of `length` bytes goes, once the records in its way, the oldest beyond
        `max_records` and the slot it needs are evicted."""
        start = self._written
        if start % self.max_bytes + length > self.max_bytes:
            start += self.max_bytes - start % self.max_bytes  # to the arena's start
        while self._record_tail < self._record_head and (
            self._record_head - self._record_tail >= self._slot_count
            or self._live >= self.max_records
            or start + length - self._starts[self._record_tail % self._slot_count]
            > self.max_bytes
        ):
            self._drop_oldest_record()
        return start

    def _write(self, key: int, record: bytes, expires_at: float, start: int) -> int:
        slot = self._record_head % self._slot_count
        first = start % self.max_bytes
        self._arena[first:first + len(record)] = record
        self._slot_keys[slot] = key
        self._expiries[slot] = expires_at
        self._starts[slot] = start
        self._lengths[slot] = len(record)
        self._labels[slot] = self._labelled_at[slot] = math.nan
        self._record_head += 1
        self._live += 1
        self._written = start + len(record)
        return slot

    def _kill(self, slot: int) -> None:
        """A slot dead; its key's entry, if it pointed here, now points nowhere."""
        if self._lengths[slot] >= 0:
            self._lengths[slot] = -1
            self._live -= 1
            entry = self._find(self._slot_keys[slot])
            if entry >= 0 and self._slots[entry] == slot + 1:
                self._slots[entry] = 0

    def _drop_oldest_record(self) -> None:
        self._kill(self._record_tail % self._slot_count)
        self._record_tail += 1

    def _drop_oldest_marker(self) -> None:
        place = self._marker_tail % self.max_markers
        entry = self._find(self._marker_keys[place])
        if entry >= 0 and self._places[entry] == place:  # else the id was put again since
            if self._slots[entry]:
                self._kill(self._slots[entry] - 1)  # (never: markers outlive records)
            self._delete(entry)
        self._marker_tail += 1

    def _probe(self, key: int) -> int:
        """The table entry holding `key`, or the free one it would take."""
        keys, mask = self._keys, self._mask
        entry = key & mask
        while True:
            found = keys[entry]
            if found == key or not found:
                return entry
            entry = (entry + 1) & mask

    def _find(self, key: int) -> int:
        """The table entry of `key`, or -1."""
        entry = self._probe(key)
        return entry if self._keys[entry] == key else -1

    def _insert(self, key: int) -> int:
        """The table entry of `key`, taken (with no record) if it had none."""
        entry = self._probe(key)
        if self._keys[entry] != key:
            self._keys[entry] = key
            self._slots[entry] = 0
        return entry

    def _delete(self, entry: int) -> None:
        """Free an entry, moving back the ones after it that probed past it (no tombstones)."""
        keys, mask = self._keys, self._mask
        hole, at = entry, entry
        while True:
            at = (at + 1) & mask
            key = keys[at]
            if not key:
                break
            # the entry at `at` may fill the hole if the hole lies between its home and it
            if (at - (key & mask)) & mask >= (at - hole) & mask:
                keys[hole] = key
                self._marks[hole] = self._marks[at]
                self._slots[hole] = self._slots[at]
                self._places[hole] = self._places[at]
                hole = at
        keys[hole] = 0
