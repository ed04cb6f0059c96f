"""The in-process store's preallocated records and markers (`store.ring.RecordRing`)."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.memory import MemoryStore, pack_fields
from store.ring import RecordRing, id_key
from tests.test_store_contract import prediction

IDS = [f"req-{i}" for i in range(12)]

# one operation: (kind, id index, record length, clock step)
operations = st.lists(
    st.tuples(st.sampled_from(["put", "label", "get", "purge"]),
              st.integers(0, len(IDS) - 1), st.integers(1, 40), st.sampled_from([0.0, 0.0, 3.0])),
    max_size=120,
)


def assert_table_whole(ring: RecordRing) -> None:
    """Every key in the table is found where it sits: no entry lost behind a freed one."""
    keys = np.asarray(ring._keys)
    for entry in np.flatnonzero(keys):
        assert ring._find(int(keys[entry])) == entry


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 4), st.integers(40, 200))
def test_the_ring_gives_back_the_newest_version_or_nothing_and_keeps_its_bounds(
    ops: list[tuple[str, int, int, float]], max_records: int, max_bytes: int
) -> None:
    ring = RecordRing(max_records=max_records, max_markers=2 * max_records, max_bytes=max_bytes)
    now, version = 0.0, 0
    newest: dict[str, bytes] = {}  # what was last stored for an id
    expiry: dict[str, float] = {}
    marks: dict[str, float] = {}
    for kind, index, length, step in ops:
        now += step
        name = IDS[index]
        key = id_key(name)
        version += 1
        record = f"{name}:{version}:".encode().ljust(length, b".")[:max(length, 1)]
        if kind == "put":
            newest[name], expiry[name], marks[name] = record, now + 5.0, now + 9.0
            ring.put(key, record, expires_at=expiry[name], marker=marks[name])
            assert ring.get(key, now) == record  # the newest put is always there at once
        elif kind == "label" and ring.marker(key) is not None:
            had = ring.get(key, now) is not None
            marks[name] = -abs(marks[name])
            ring.label(key, record)
            if had:
                newest[name] = record
                assert ring.get(key, now) == record
        elif kind == "get":
            got = ring.get(key, now)
            assert got is None or (got == newest[name] and expiry[name] > now)
        else:
            ring.purge(now)
        assert len(ring) <= max_records
        assert ring.markers <= ring.max_markers
        for other in IDS:
            mark = ring.marker(id_key(other))
            assert mark is None or mark == marks[other]
        assert_table_whole(ring)


def test_a_record_evicted_by_an_earlier_label_in_the_same_join_keeps_its_label() -> None:
    # room for two records only: labelling req-0 writes its copy over req-1's bytes
    size = len(pack_fields(prediction("req-0").to_fields()))
    store = MemoryStore("test:tight", record_ttl_s=60.0, max_records=2, max_bytes=2 * size + 100)
    store.put_predictions([prediction("req-0"), prediction("req-1")])
    result = store.join_labels([("req-0", 1.0), ("req-1", 1.0)])
    assert sorted(r.id for r in result.joined) == ["req-0", "req-1"]
    assert store.join_labels([("req-0", 1.0), ("req-1", 1.0)]).duplicate == ["req-0", "req-1"]


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
    done = subprocess.run([sys.executable, "-m", "bench.store", "--records", "20480"],
                          capture_output=True, text=True, timeout=120, check=True)
    header, _, row = done.stdout.strip().splitlines()[-3:]
    assert "after 10,240" in header and "put, µs a record" in header
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 6 and cells[3] == "+0.0%" and float(cells[4]) > 0
