"""The in-process store's preallocated records and markers (`store.ring.RecordRing`)."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.memory import MemoryStore, pack_fields
from store.ring import RecordRing, id_key
from tests.test_store_contract import prediction


class OrderedDictStore:
    """The store's records and markers as they were kept before `RecordRing`: ordered dicts,
    insertion order, a label in place; what the ring must still do where no id is put twice."""

    def __init__(self, max_records: int, max_markers: int) -> None:
        self.max_records, self.max_markers = max_records, max_markers
        self.records: OrderedDict[int, list] = OrderedDict()  # key -> [expiry, bytes, label, at]
        self.markers: OrderedDict[int, float] = OrderedDict()

    def put(self, key: int, record: bytes, expires_at: float, marker: float) -> None:
        self.records[key] = [expires_at, record, math.nan, math.nan]
        self.markers[key] = marker
        while len(self.records) > self.max_records:
            self.records.popitem(last=False)
        while len(self.markers) > self.max_markers:
            self.markers.popitem(last=False)

    def label(self, key: int, value: float, at: float) -> None:
        self.markers[key] = -abs(self.markers[key])
        if key in self.records:
            self.records[key][2:] = [value, at]

    def get(self, key: int, now: float) -> tuple[bytes, float, float] | None:
        entry = self.records.get(key)
        if entry is None or entry[0] <= now:
            self.records.pop(key, None)
            return None
        return entry[1], entry[2], entry[3]

    def purge(self, now: float) -> None:
        while self.records and next(iter(self.records.values()))[0] <= now:
            self.records.popitem(last=False)
        while self.markers and abs(next(iter(self.markers.values()))) <= now:
            self.markers.popitem(last=False)


def same(a: tuple | None, b: tuple | None) -> bool:
    """Equal, NaN equal to NaN."""
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and all(x == y or (math.isnan(x) and math.isnan(y))
                                for x, y in zip(a[1:], b[1:], strict=True))


def assert_whole(ring: RecordRing) -> None:
    """The ring's own bookkeeping agrees with itself: every table entry reachable where it
    sits, with its current marker place; every live slot the one its key points to; the counts;
    the live records' bytes within the arena."""
    keys = np.asarray(ring._keys)
    entries = np.flatnonzero(keys)
    for entry in entries:
        assert ring._find(int(keys[entry])) == entry
        assert ring._marker_keys[ring._places[entry]] == keys[entry]
    assert len(entries) == ring.markers <= ring.max_markers
    live = 0
    for position in range(ring._record_tail, ring._record_head):
        slot = position % ring._slot_count
        if ring._lengths[slot] >= 0:
            live += 1
            assert ring._slots[ring._find(ring._slot_keys[slot])] == slot + 1
    assert live == len(ring) <= ring.max_records
    assert ring._record_head - ring._record_tail <= ring._slot_count
    if live:
        assert ring._written - ring._starts[ring._record_tail % ring._slot_count] <= ring.max_bytes


# one operation: (kind, which id, a record's length, a clock step)
operations = st.lists(
    st.tuples(st.sampled_from(["put", "put", "label", "get", "purge"]), st.integers(0, 11),
              st.integers(1, 40), st.sampled_from([0.0, 0.0, 0.0, 4.0])),
    max_size=150,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(operations, st.integers(1, 5))
def test_with_each_id_put_once_the_ring_answers_as_the_ordered_dicts_did(
    ops: list[tuple[str, int, int, float]], max_records: int
) -> None:
    ring = RecordRing(max_records, 4 * max_records, max_bytes=10_000)
    before = OrderedDictStore(max_records, 4 * max_records)
    now, put = 0.0, 0  # ids req-0, req-1, ... in order, each put once
    for kind, which, length, step in ops:
        now += step
        key = id_key(f"req-{which % (put or 1)}")
        if kind == "put":
            key, put = id_key(f"req-{put}"), put + 1
            record = f"req-{put - 1}".encode().ljust(length, b".")
            for store in (ring, before):
                store.put(key, record, expires_at=now + 10.0, marker=now + 15.0)
        elif kind == "label" and before.markers.get(key, 0.0) > 0:
            for store in (ring, before):
                store.label(key, float(which), at=now)
        elif kind == "get":
            assert same(ring.get(key, now), before.get(key, now))
        elif kind == "purge":
            ring.purge(now)
            before.purge(now)
        for i in range(put):
            key = id_key(f"req-{i}")
            assert ring.marker(key) == before.markers.get(key)
            assert same(ring.get(key, now), before.get(key, now))
        assert_whole(ring)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(operations, st.integers(1, 4), st.integers(40, 200))
def test_ids_put_again_and_records_written_again_leave_the_ring_whole(
    ops: list[tuple[str, int, int, float]], max_records: int, max_bytes: int
) -> None:
    # put again, labels of several values (`relabel`) and a tight arena: what comes back is
    # the newest version of a record or nothing, and the bookkeeping stays whole
    ring = RecordRing(max_records, 4 * max_records, max_bytes)
    now, version = 0.0, 0
    newest: dict[int, bytes] = {}
    expiry: dict[int, float] = {}
    marks: dict[int, float] = {}
    for kind, which, length, step in ops:
        now += step
        key = id_key(f"req-{which}")
        version += 1
        record = f"{which}:{version}:".encode().ljust(length, b".")
        if kind == "put":
            newest[key], expiry[key], marks[key] = record, now + 10.0, now + 15.0
            ring.put(key, record, expires_at=expiry[key], marker=marks[key])
            assert same(ring.get(key, now), (record, math.nan, math.nan))  # there at once
        elif kind == "label" and ring.marker(key) is not None:
            had = ring.get(key, now) is not None
            marks[key] = -abs(marks[key])
            ring.relabel(key, record)
            if had:
                newest[key] = record
                assert same(ring.get(key, now), (record, math.nan, math.nan))
        elif kind == "get":
            got = ring.get(key, now)
            assert got is None or (got[0] == newest[key] and expiry[key] > now)
        else:
            ring.purge(now)
        for other in range(12):
            mark = ring.marker(id_key(f"req-{other}"))
            assert mark is None or mark == marks[id_key(f"req-{other}")]
        assert_whole(ring)


def test_labels_as_late_as_max_records_predictions_still_join() -> None:
    # every prediction labelled 999 predictions later, with room for 1,000 records: a label in
    # the record's slot keeps its place, so every one joins
    store = MemoryStore("test:horizon", record_ttl_s=3600.0, max_records=1_000)
    late, joined = 999, 0
    for i in range(3_000):
        store.put_predictions([prediction(f"req-{i}", with_features=False)])
        if i >= late:
            joined += len(store.join_labels([(f"req-{i - late}", 1.0)]).joined)
    assert joined == 3_000 - late


def test_a_record_evicted_by_an_earlier_label_in_the_same_join_keeps_its_label() -> None:
    # labels of several values write the record again: with room for two records only,
    # labelling req-0 writes its copy over req-1's bytes
    size = len(pack_fields(prediction("req-0").to_fields()))
    store = MemoryStore("test:tight", record_ttl_s=60.0, max_records=2, max_bytes=2 * size + 100)
    store.put_predictions([prediction("req-0"), prediction("req-1")])
    result = store.join_labels([("req-0", [1.0, 2.0]), ("req-1", [1.0, 2.0])])
    assert sorted(r.id for r in result.joined) == ["req-0", "req-1"]
    assert store.get_prediction("req-0").label == [1.0, 2.0]
    assert store.get_prediction("req-1") is None
    again = store.join_labels([("req-0", [1.0, 2.0]), ("req-1", [1.0, 2.0])])
    assert again.duplicate == ["req-0", "req-1"]


def test_a_record_whose_labelled_copy_is_too_large_for_the_arena_keeps_its_label() -> None:
    size = len(pack_fields(prediction("req-0").to_fields()))
    store = MemoryStore("test:edge", record_ttl_s=60.0, max_records=2, max_bytes=size + 10)
    store.put_predictions([prediction("req-0")])
    result = store.join_labels([("req-0", [1.5, 2.5, 3.5])])  # its copy needs ~40 bytes more
    assert [r.id for r in result.joined] == ["req-0"]
    assert store.join_labels([("req-0", [1.5])]).duplicate == ["req-0"]


def test_records_beyond_max_bytes_evict_the_oldest_and_one_too_big_is_not_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore("test:bytes", record_ttl_s=60.0, max_bytes=2_000)
    store.put_predictions([prediction(f"req-{i}") for i in range(40)])
    held = [i for i in range(40) if store.get_prediction(f"req-{i}") is not None]
    assert held == list(range(40 - len(held), 40)) and 0 < len(held) < 40
    assert store.join_labels([("req-0", 1.0)]).expired == ["req-0"]
    # a record larger than the whole arena is not kept (a warning says so); the rest are
    small = MemoryStore("test:small", record_ttl_s=60.0, max_bytes=250)  # 304 and 226
    with caplog.at_level(logging.WARNING, logger="adaptd.store"):
        small.put_predictions([prediction("req-0"), prediction("req-1", with_features=False)])
    assert "larger than store.max_bytes" in caplog.text
    assert small.get_prediction("req-0") is None
    assert small.get_prediction("req-1") is not None
    with pytest.raises(ValueError, match="store.max_bytes"):
        RecordRing(max_records=1, max_markers=4, max_bytes=10).put(1, b"x" * 11, 1.0, 2.0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_a_reserved_store_is_resident_at_once_and_close_gives_it_back() -> None:
    lazy = MemoryStore("test:lazy", record_ttl_s=60.0, max_records=1_000, max_bytes=2**26)
    before = rss_bytes()
    store = MemoryStore("test:reserve", record_ttl_s=60.0, max_records=1_000, max_bytes=2**26,
                        reserve=True)
    assert store.reserved_bytes == lazy.reserved_bytes > 2**26
    assert rss_bytes() - before > 0.9 * 2**26  # mapped in, not waiting for the first write
    store.put_predictions([prediction("req-1")])
    store.close()
    assert rss_bytes() - before < 0.1 * 2**26
    assert store.get_prediction("req-1") is None
    store.put_predictions([prediction("req-2")])  # a closed store is empty, and still works
    assert store.get_prediction("req-2") is not None


def test_the_store_benchmark_runs_and_prints_its_table() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.store", "--records", "102400"],
                          capture_output=True, text=True, timeout=120, check=True)
    header, _, row = done.stdout.strip().splitlines()[-3:]
    assert "after 10,240 | after 102,400" in header and "put, µs a record" in header
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # reserved at start: flat from the first checkpoint to the second
    assert len(cells) == 7 and abs(float(cells[4].rstrip("%"))) < 5 and float(cells[5]) > 0
