"""The `Store` contract, one suite run against every backend, then what each backend adds.

Tests that take `store`, `make_store` or `timeline` run once per backend (memory, redis). The
sections at the end hold what only one backend can show: Redis TTLs, key hygiene, outages and
round trips; MemoryStore's bounds.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_server import RedisServer, free_port

from store import JoinResult, MemoryStore, PredictionRecord, Store, StoreUnavailable
from store.base import LabelEffects
from store.keys import Keys
from store.memory import pack_fields, unpack_fields
from store.redis import RedisStore


class Timeline(Protocol):
    """The `timeline` fixture: the store's clock, which a test can move on (conftest)."""

    def __call__(self) -> float: ...

    def advance(self, seconds: float) -> None: ...


def prediction(
    prediction_id: str,
    created_at: float = 1_700_000_000.0,
    *,
    with_features: bool = True,
    prediction_value: float = 2.0,
) -> PredictionRecord:
    """A classifier's record as the service would write it: probabilities, features, a set."""
    outputs = np.array([0.05, 0.15, 0.7, 0.1], dtype=np.float32)
    features = np.linspace(-1.0, 1.0, 16, dtype=np.float32) if with_features else None
    return PredictionRecord(
        id=prediction_id,
        created_at=created_at,
        prediction=prediction_value,
        outputs=outputs,
        features=features,
        model_version="digits-cnn@3",
        adapter_version=7,
        extra={"set": [2, 1], "alpha": 0.1, "note": "é"},
        arrays={"base": np.array([0.1, 0.1, 0.6, 0.2], dtype=np.float32)},
    )


def assert_same_prediction(actual: PredictionRecord | None, expected: PredictionRecord) -> None:
    """Every stored field equal; arrays compared as float32 values."""
    assert actual is not None
    assert actual.id == expected.id
    assert actual.created_at == expected.created_at
    assert actual.prediction == expected.prediction
    assert actual.outputs.dtype == np.float32
    np.testing.assert_array_equal(actual.outputs, expected.outputs)
    if expected.features is None:
        assert actual.features is None
    else:
        assert actual.features is not None and actual.features.dtype == np.float32
        np.testing.assert_array_equal(actual.features, expected.features)
    assert actual.model_version == expected.model_version
    assert actual.adapter_version == expected.adapter_version
    assert actual.extra == expected.extra
    assert actual.arrays.keys() == expected.arrays.keys()
    for name, values in expected.arrays.items():
        assert actual.arrays[name].dtype == np.float32
        np.testing.assert_array_equal(actual.arrays[name], values)


def ids_by_outcome(result: JoinResult) -> dict[str, list[str]]:
    return {
        "joined": [record.id for record in result.joined],
        "duplicate": result.duplicate,
        "expired": result.expired,
        "unknown": result.unknown,
    }


# --- the contract, on every backend -----------------------------------------------------------


def test_the_store_satisfies_the_protocol_and_answers_ping(store: Store) -> None:
    assert isinstance(store, Store)
    assert store.ping() is True


def test_a_record_comes_back_with_every_field_it_was_stored_with(store: Store) -> None:
    record = prediction("req-1")
    store.put_predictions([record])

    stored = store.get_prediction("req-1")

    assert_same_prediction(stored, record)
    assert stored is not None and stored.label is None and stored.labelled_at is None


def test_a_record_without_features_comes_back_without_features(store: Store) -> None:
    record = prediction("req-1", with_features=False)
    store.put_predictions([record])

    assert_same_prediction(store.get_prediction("req-1"), record)


def test_an_id_never_stored_has_no_record(store: Store) -> None:
    store.put_predictions([prediction("req-1")])

    assert store.get_prediction("req-2") is None


def test_putting_an_id_again_replaces_its_record_and_clears_its_label(store: Store) -> None:
    store.put_predictions([prediction("req-1")])
    store.join_labels([("req-1", 2.0)])
    replacement = prediction("req-1", with_features=False, prediction_value=0.0)

    store.put_predictions([replacement])

    stored = store.get_prediction("req-1")
    assert_same_prediction(stored, replacement)
    assert stored is not None and stored.label is None and stored.labelled_at is None
    assert [record.label for record in store.join_labels([("req-1", 0.0)]).joined] == [0.0]


def test_the_first_label_for_an_id_joins_its_record(store: Store, timeline: Timeline) -> None:
    record = prediction("req-1")
    store.put_predictions([record])
    before = timeline()

    result = store.join_labels([("req-1", 2.0)])

    after = timeline()
    assert ids_by_outcome(result) == {
        "joined": ["req-1"], "duplicate": [], "expired": [], "unknown": []
    }  # fmt: skip
    joined = result.joined[0]
    assert_same_prediction(joined, record)
    assert joined.label == 2.0
    assert joined.labelled_at is not None and before <= joined.labelled_at <= after
    stored = store.get_prediction("req-1")
    assert stored is not None and stored.label == 2.0 and stored.labelled_at == joined.labelled_at


def test_a_second_label_for_an_id_is_a_duplicate_and_changes_nothing(store: Store) -> None:
    store.put_predictions([prediction("req-1")])
    first = store.join_labels([("req-1", 2.0)])

    second = store.join_labels([("req-1", 3.0)])

    assert second.joined == [] and second.duplicate == ["req-1"]
    stored = store.get_prediction("req-1")
    assert stored is not None and stored.label == 2.0
    assert stored.labelled_at == first.joined[0].labelled_at


def test_a_repeated_id_in_one_batch_joins_once_then_is_a_duplicate(store: Store) -> None:
    store.put_predictions([prediction("req-1")])

    result = store.join_labels([("req-1", 2.0), ("req-1", 3.0)])

    assert [(record.id, record.label) for record in result.joined] == [("req-1", 2.0)]
    assert result.duplicate == ["req-1"]
    stored = store.get_prediction("req-1")
    assert stored is not None and stored.label == 2.0


def test_a_label_for_an_id_never_seen_is_unknown(store: Store) -> None:
    result = store.join_labels([("never-predicted", 1.0)])

    assert ids_by_outcome(result) == {
        "joined": [], "duplicate": [], "expired": [], "unknown": ["never-predicted"]
    }  # fmt: skip


def test_an_empty_batch_of_labels_joins_nothing(store: Store) -> None:
    store.put_predictions([])

    assert store.join_labels([]) == JoinResult()


def test_a_label_after_its_record_expired_is_expired_for_the_grace_period_then_unknown(
    make_store: Callable[..., Store], timeline: Timeline
) -> None:
    store = make_store(record_ttl_s=0.3, expired_grace_s=0.7)
    store.put_predictions([prediction("req-1")])

    timeline.advance(0.5)  # past the TTL (0.3 s), well within the grace period (until 1.0 s)
    assert store.get_prediction("req-1") is None
    assert store.join_labels([("req-1", 2.0)]).expired == ["req-1"]

    timeline.advance(0.7)  # past the grace period too
    assert store.join_labels([("req-1", 2.0)]).unknown == ["req-1"]


def test_a_label_for_an_id_labelled_before_its_record_expired_is_a_duplicate(
    make_store: Callable[..., Store], timeline: Timeline
) -> None:
    store = make_store(record_ttl_s=0.3, expired_grace_s=60.0)
    store.put_predictions([prediction("req-1")])
    assert len(store.join_labels([("req-1", 2.0)]).joined) == 1

    timeline.advance(0.5)

    result = store.join_labels([("req-1", 3.0)])
    assert result.duplicate == ["req-1"] and result.expired == [] and result.joined == []


def test_a_mixed_batch_reports_each_id_under_its_own_outcome_in_batch_order(
    make_store: Callable[..., Store], timeline: Timeline
) -> None:
    store = make_store(record_ttl_s=0.3, expired_grace_s=60.0)
    store.put_predictions([prediction("old")])
    timeline.advance(0.5)
    store.put_predictions([prediction(f"new-{i}") for i in range(4)])
    store.join_labels([("new-3", 1.0)])

    result = store.join_labels(
        [
            ("ghost-b", 0.0),
            ("new-1", 1.0),
            ("old", 2.0),
            ("new-3", 3.0),
            ("new-0", 0.0),
            ("ghost-a", 1.0),
            ("new-1", 1.0),
        ]
    )

    assert ids_by_outcome(result) == {
        "joined": ["new-1", "new-0"],
        "duplicate": ["new-3", "new-1"],
        "expired": ["old"],
        "unknown": ["ghost-b", "ghost-a"],
    }
    assert [record.label for record in result.joined] == [1.0, 0.0]
    assert store.get_prediction("new-2") is not None and store.get_prediction("new-2").label is None


def test_stores_in_different_namespaces_do_not_see_each_others_state(
    make_store: Callable[..., Store],
) -> None:
    digits_namespace = f"test:{uuid.uuid4().hex}"
    digits = make_store(namespace=digits_namespace)
    prices = make_store(namespace=f"{digits_namespace}:prices")  # the other's name as a prefix
    digits.put_predictions([prediction("req-1")])
    digits.save_adapter(b"digits adapter")

    assert prices.get_prediction("req-1") is None
    assert prices.join_labels([("req-1", 2.0)]).unknown == ["req-1"]
    assert prices.load_adapter() is None
    assert digits.join_labels([("req-1", 2.0)]).joined[0].label == 2.0


def test_a_namespace_with_a_brace_is_refused(make_store: Callable[..., Store]) -> None:
    with pytest.raises(ValueError, match="brace"):
        make_store(namespace="demo}:other")


def test_no_adapter_checkpoint_loads_as_none(store: Store) -> None:
    assert store.load_adapter() is None
    assert store.load_adapter(1) is None


def test_adapter_versions_increase_and_the_latest_loads_by_default(store: Store) -> None:
    versions = [store.save_adapter(f"weights {i}".encode()) for i in range(3)]

    assert versions == [1, 2, 3]
    assert store.load_adapter() == (3, b"weights 2")


def test_a_named_adapter_version_loads_its_own_bytes(store: Store) -> None:
    first = store.save_adapter(b"\x00source weights\xff")
    store.save_adapter(b"adapted weights")

    assert store.load_adapter(first) == (first, b"\x00source weights\xff")


def test_adapter_versions_older_than_the_kept_ones_are_dropped(
    make_store: Callable[..., Store],
) -> None:
    store = make_store(keep_adapters=2)
    for i in range(4):
        store.save_adapter(f"weights {i}".encode())

    assert [store.load_adapter(version) for version in (1, 2, 3, 4)] == [
        None,
        None,
        (3, b"weights 2"),
        (4, b"weights 3"),
    ]
    assert store.load_adapter() == (4, b"weights 3")


def test_threads_joining_the_same_ids_at_once_join_each_id_exactly_once(store: Store) -> None:
    ids = [f"req-{i}" for i in range(200)]
    store.put_predictions([prediction(prediction_id) for prediction_id in ids])
    threads_count = 8
    start_together = threading.Barrier(threads_count)
    results: list[JoinResult] = []
    results_lock = threading.Lock()

    def label_everything(seed: int) -> None:
        order = ids.copy()
        random.Random(seed).shuffle(order)
        start_together.wait()
        for start in range(0, len(order), 25):
            result = store.join_labels([(i, float(seed)) for i in order[start : start + 25]])
            with results_lock:
                results.append(result)

    workers = [threading.Thread(target=label_everything, args=(s,)) for s in range(threads_count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    joined_ids = [record.id for result in results for record in result.joined]
    assert len(joined_ids) == 200 and sorted(joined_ids) == sorted(ids)
    assert sum(len(result.duplicate) for result in results) == 200 * (threads_count - 1)
    assert all(not result.unknown and not result.expired for result in results)


# --- RedisStore only --------------------------------------------------------------------------


@pytest.fixture
def redis_store(redis_server: RedisServer) -> Iterator[RedisStore]:
    namespace = f"test:{uuid.uuid4().hex}"
    store = RedisStore(redis_server.url, namespace, record_ttl_s=60.0, expired_grace_s=30.0)
    yield store
    store.close()


def all_keys(client: redis.Redis) -> set[bytes]:
    """Every key on the server, read with SCAN (the tests only read; the store never scans)."""
    return set(client.scan_iter(count=1000))


def test_redis_records_and_their_markers_expire_with_the_record_ttl(
    redis_store: RedisStore, redis_client: redis.Redis
) -> None:
    keys = Keys(redis_store.namespace)
    redis_store.put_predictions([prediction("ttl-1"), prediction("ttl-2")])
    redis_store.join_labels([("ttl-2", 1.0)])

    for prediction_id in ("ttl-1", "ttl-2"):
        assert 0 < redis_client.pttl(keys.record(prediction_id)) <= 60_000
        # the marker outlives the record by the grace period, labelled or not
        assert 60_000 < redis_client.pttl(keys.seen(prediction_id)) <= 90_000
    assert redis_client.get(keys.seen("ttl-1")) == b"0"
    assert redis_client.get(keys.seen("ttl-2")) == b"1"


def test_redis_a_join_whose_marker_was_evicted_gives_the_marker_a_ttl_again(
    redis_store: RedisStore, redis_client: redis.Redis
) -> None:
    keys = Keys(redis_store.namespace)
    redis_store.put_predictions([prediction("evicted-marker")])
    redis_client.delete(keys.seen("evicted-marker"))  # as a maxmemory eviction would

    assert len(redis_store.join_labels([("evicted-marker", 1.0)]).joined) == 1
    assert 0 < redis_client.pttl(keys.seen("evicted-marker")) <= 90_000


def test_redis_a_whole_batch_of_labels_is_joined_by_one_transaction(
    redis_store: RedisStore, redis_client: redis.Redis
) -> None:
    redis_store.put_predictions([prediction(f"batch-{i}") for i in range(50)])
    redis_store.join_labels([("warm-up: loads the script", 0.0)])

    def calls(command: str) -> int:
        return redis_client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)

    commands = ("evalsha", "eval", "hset", "exec", "watch")
    before = {command: calls(command) for command in commands}
    result = redis_store.join_labels([(f"batch-{i}", 1.0) for i in range(50)])
    after = {command: calls(command) for command in commands}

    assert len(result.joined) == 50
    assert after["watch"] - before["watch"] == 1
    assert after["evalsha"] - before["evalsha"] == 2  # the peek, then the marks inside MULTI
    assert after["eval"] - before["eval"] == 0
    assert after["exec"] - before["exec"] == 1
    assert after["hset"] - before["hset"] == 50  # inside the script, one per joined record


def test_redis_a_large_batch_is_joined_in_chunks_that_keep_order_and_once_per_id(
    redis_store: RedisStore, redis_client: redis.Redis
) -> None:
    from store.redis import JOIN_CHUNK

    count = 2 * JOIN_CHUNK + 500
    redis_store.put_predictions([prediction(f"big-{i}") for i in range(count)])
    redis_store.join_labels([("warm-up: loads the script", 0.0)])
    # the repeat of big-0 lies in the last chunk: still a duplicate of the first chunk's join
    labels = [(f"big-{i}", 1.0) for i in range(count)] + [("big-0", 2.0)]
    before = redis_client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)
    result = redis_store.join_labels(labels)
    after = redis_client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)

    assert after - before == 3  # one transaction per chunk
    assert [r.id for r in result.joined] == [f"big-{i}" for i in range(count)]
    assert result.duplicate == ["big-0"]
    assert redis_store.get_prediction("big-0").label == 1.0


def test_redis_a_workload_writes_no_key_outside_its_namespace_prefix(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    keys_before = all_keys(redis_client)
    namespace = f"test:{uuid.uuid4().hex}"
    prefix = Keys(namespace).prefix.encode()
    store = RedisStore(redis_server.url, namespace, record_ttl_s=60.0)
    awkward_ids = ["plain", "a}b{c", "*", "x:y:z", "adaptd:{other}:record:1", "ünïcode", ""]
    try:
        store.put_predictions([prediction(prediction_id) for prediction_id in awkward_ids])
        store.join_labels([(prediction_id, 1.0) for prediction_id in [*awkward_ids, "ghost"]])
        for i in range(7):
            store.save_adapter(f"weights {i}".encode())
        assert store.get_prediction("a}b{c") is not None
    finally:
        store.close()

    new_keys = all_keys(redis_client) - keys_before
    assert new_keys and all(key.startswith(prefix) for key in new_keys)
    assert len(new_keys) == 2 * len(awkward_ids) + 5 + 2  # records, markers, kept blobs, pointers


def test_redis_an_unreachable_server_raises_store_unavailable_naming_it_without_its_password() -> (
    None
):
    port = free_port()  # nothing listens there
    store = RedisStore(f"redis://:s3cret@127.0.0.1:{port}/0", "test:unreachable", record_ttl_s=60.0)
    try:
        assert store.ping() is False
        operations = {
            "put": lambda: store.put_predictions([prediction("req-1")]),
            "get": lambda: store.get_prediction("req-1"),
            "join": lambda: store.join_labels([("req-1", 1.0)]),
            "save": lambda: store.save_adapter(b"weights"),
            "load": lambda: store.load_adapter(),
        }
        for operation in operations.values():
            with pytest.raises(StoreUnavailable) as raised:
                operation()
            assert f"127.0.0.1:{port}" in str(raised.value)
            assert "s3cret" not in str(raised.value)
    finally:
        store.close()


def test_redis_the_store_recovers_when_redis_comes_back_after_a_restart() -> None:
    with RedisServer() as server:
        store = RedisStore(server.url, "test:restart", record_ttl_s=60.0)
        try:
            store.put_predictions([prediction("before-restart")])
            server.stop()
            assert store.ping() is False
            with pytest.raises(StoreUnavailable):
                store.join_labels([("before-restart", 1.0)])

            server.start()  # same port, empty: the tests run Redis without persistence

            assert store.ping() is True
            store.put_predictions([prediction("after-restart")])
            result = store.join_labels([("after-restart", 1.0), ("before-restart", 1.0)])
            assert ids_by_outcome(result) == {
                "joined": ["after-restart"], "duplicate": [], "expired": [],
                "unknown": ["before-restart"],
            }  # fmt: skip
        finally:
            store.close()


# --- MemoryStore only -------------------------------------------------------------------------


def test_memory_records_beyond_max_records_evict_the_oldest_which_then_count_as_expired(
    clock: Callable[[], float],
) -> None:
    store = MemoryStore("test:bounded", record_ttl_s=60.0, max_records=3, clock=clock)
    for i in range(4):
        store.put_predictions([prediction(f"req-{i}")])

    assert store.get_prediction("req-0") is None
    result = store.join_labels([(f"req-{i}", 1.0) for i in range(4)])
    assert result.expired == ["req-0"]
    assert [record.id for record in result.joined] == ["req-1", "req-2", "req-3"]


def test_memory_seen_markers_are_bounded_oldest_first(clock: Callable[[], float]) -> None:
    store = MemoryStore("test:markers", record_ttl_s=60.0, max_records=2, clock=clock)
    assert store.max_markers == 8
    store.put_predictions([prediction(f"req-{i}") for i in range(20)])

    result = store.join_labels([(f"req-{i}", 1.0) for i in range(20)])

    # records 18 and 19 are live; the markers of 12..19 are kept, those of 0..11 were dropped
    assert [record.id for record in result.joined] == ["req-18", "req-19"]
    assert result.expired == [f"req-{i}" for i in range(12, 18)]
    assert result.unknown == [f"req-{i}" for i in range(12)]


def test_memory_records_returned_are_copies_the_caller_cannot_change_the_store_through(
    clock: Callable[[], float],
) -> None:
    store = MemoryStore("test:copies", record_ttl_s=60.0, clock=clock)
    record = prediction("req-1")
    store.put_predictions([record])
    record.outputs[:] = 0.0
    store.get_prediction("req-1").extra["set"].append(9)

    stored = store.get_prediction("req-1")
    assert stored is not None
    np.testing.assert_array_equal(stored.outputs, prediction("req-1").outputs)
    assert stored.extra["set"] == [2, 1]


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(max_size=40), st.binary(max_size=300), max_size=12))
def test_memory_record_fields_survive_packing_into_one_bytes_object(
    fields: dict[str, bytes],
) -> None:
    assert unpack_fields(pack_fields(fields)) == fields


def test_memory_labelled_markers_still_answer_duplicate_after_their_record_is_gone() -> None:
    # the marker, negated once labelled, outlives the record by the grace period
    now = [1000.0]
    store = MemoryStore("test:grace", record_ttl_s=10.0, expired_grace_s=100.0,
                        clock=lambda: now[0])
    store.put_predictions([prediction("req-1"), prediction("req-2")])
    assert [r.id for r in store.join_labels([("req-1", 1.0)]).joined] == ["req-1"]
    now[0] += 50.0  # both records expired, both markers live
    result = store.join_labels([("req-1", 0.0), ("req-2", 0.0)])
    assert (result.duplicate, result.expired) == (["req-1"], ["req-2"])
    now[0] += 100.0  # the markers too
    assert store.join_labels([("req-1", 0.0), ("req-2", 0.0)]).unknown == ["req-1", "req-2"]


# --- Memories: capped lists of float32 rows (both backends) -----------------------------------


def awkward_rows(count: int, width: int, start: float = 0.0) -> np.ndarray:
    """Rows whose float32 values a text or float64 round trip would change: -0.0, tiny, huge."""
    rows = np.arange(count * width, dtype=np.float32).reshape(count, width) + np.float32(start)
    rows[:, 0] = np.float32(1.0) / np.float32(3.0) + np.arange(count, dtype=np.float32)
    if width > 1:
        rows[0, 1] = np.float32(-0.0)
        rows[-1, 1] = np.finfo(np.float32).tiny
    if width > 2:
        rows[0, 2] = np.finfo(np.float32).max
    return rows


def test_memory_rows_come_back_as_the_exact_float32_bits_oldest_first(store: Store) -> None:
    first, second = awkward_rows(3, 5), awkward_rows(2, 5, start=100.0)
    store.append_memory("adanpc", first, cap=100)
    store.append_memory("adanpc", second, cap=100)

    loaded = store.load_memory("adanpc")

    assert loaded.dtype == np.float32 and loaded.shape == (5, 5)
    assert loaded.tobytes() == np.concatenate([first, second]).tobytes()  # -0.0 included


def test_a_memory_keeps_only_its_newest_cap_rows(store: Store) -> None:
    rows = np.arange(24, dtype=np.float32).reshape(12, 2)
    store.append_memory("adanpc", rows[:4], cap=5)
    store.append_memory("adanpc", rows[4:9], cap=5)
    store.append_memory("adanpc", rows[9:], cap=5)

    np.testing.assert_array_equal(store.load_memory("adanpc"), rows[7:])


def test_one_append_larger_than_the_cap_keeps_its_own_newest_rows(store: Store) -> None:
    rows = np.arange(2500 * 3, dtype=np.float32).reshape(2500, 3)  # more than one Redis chunk
    store.append_memory("adanpc", rows, cap=1200)

    np.testing.assert_array_equal(store.load_memory("adanpc"), rows[-1200:])


def test_an_empty_memory_loads_as_a_0_by_0_float32_array(store: Store) -> None:
    loaded = store.load_memory("never-written")
    assert loaded.shape == (0, 0) and loaded.dtype == np.float32

    store.append_memory("adanpc", np.empty((0, 4), dtype=np.float32), cap=10)
    assert store.load_memory("adanpc").shape == (0, 0)


def test_memories_with_different_names_are_kept_apart(store: Store) -> None:
    store.append_memory("adanpc", np.ones((2, 3), dtype=np.float32), cap=10)
    store.append_memory("errors", np.zeros((4, 7), dtype=np.float32), cap=10)

    np.testing.assert_array_equal(store.load_memory("adanpc"), np.ones((2, 3)))
    np.testing.assert_array_equal(store.load_memory("errors"), np.zeros((4, 7)))


def test_memories_in_different_namespaces_are_kept_apart(
    make_store: Callable[..., Store],
) -> None:
    store_a, store_b = make_store(), make_store()
    store_a.append_memory("adanpc", np.ones((2, 3), dtype=np.float32), cap=10)

    assert store_b.load_memory("adanpc").shape == (0, 0)
    assert store_a.load_memory("adanpc").shape == (2, 3)


def test_clearing_a_memory_drops_its_rows_and_only_its_rows(store: Store) -> None:
    store.append_memory("adanpc", np.ones((2, 3), dtype=np.float32), cap=10)
    store.append_memory("errors", np.ones((2, 3), dtype=np.float32), cap=10)

    store.clear_memory("adanpc")
    store.clear_memory("never-written")  # clearing nothing is not an error

    assert store.load_memory("adanpc").shape == (0, 0)
    assert store.load_memory("errors").shape == (2, 3)
    # a cleared memory takes rows of any width again
    store.append_memory("adanpc", np.ones((1, 8), dtype=np.float32), cap=10)
    assert store.load_memory("adanpc").shape == (1, 8)


def test_rows_of_another_width_are_refused_and_append_nothing(store: Store) -> None:
    store.append_memory("adanpc", np.ones((2, 3), dtype=np.float32), cap=10)

    with pytest.raises(ValueError, match="holds rows of 3 values; these have 4"):
        store.append_memory("adanpc", np.zeros((5, 4), dtype=np.float32), cap=10)

    np.testing.assert_array_equal(store.load_memory("adanpc"), np.ones((2, 3)))


@pytest.mark.parametrize(
    ("rows", "cap", "message"),
    [
        (np.ones(3, dtype=np.float32), 10, "2-D"),
        (np.ones((3, 0), dtype=np.float32), 10, "2-D"),
        (np.ones((3, 2), dtype=np.float32), 0, "cap must be at least 1"),
    ],
)
def test_malformed_rows_or_cap_are_refused_with_a_message(
    store: Store, rows: np.ndarray, cap: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.append_memory("adanpc", rows, cap=cap)
    with pytest.raises(ValueError, match="needs a name"):
        store.append_memory("", np.ones((1, 2), dtype=np.float32), cap=10)


def test_float64_rows_are_stored_as_float32(store: Store) -> None:
    store.append_memory("adanpc", np.array([[0.1, 2.0]]), cap=10)

    loaded = store.load_memory("adanpc")
    assert loaded.dtype == np.float32
    assert loaded.tobytes() == np.array([[0.1, 2.0]], dtype=np.float32).tobytes()


def test_loaded_memory_is_a_copy_the_caller_cannot_change_the_store_through(store: Store) -> None:
    store.append_memory("adanpc", np.ones((2, 3), dtype=np.float32), cap=10)
    store.load_memory("adanpc")[:] = 7.0

    np.testing.assert_array_equal(store.load_memory("adanpc"), np.ones((2, 3)))


# --- Memories: RedisStore only ----------------------------------------------------------------


def test_redis_a_memory_is_one_list_under_the_namespace_appended_by_one_script_call(
    redis_store: RedisStore, redis_client: redis.Redis
) -> None:
    keys = Keys(redis_store.namespace)
    redis_store.append_memory("adanpc", np.ones((1, 3), dtype=np.float32), cap=50)  # loads it

    def calls(command: str) -> int:
        return redis_client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)

    before = {command: calls(command) for command in ("evalsha", "rpush", "ltrim")}
    redis_store.append_memory("adanpc", np.zeros((64, 3), dtype=np.float32), cap=50)
    after = {command: calls(command) for command in ("evalsha", "rpush", "ltrim")}

    assert {command: after[command] - before[command] for command in after} == {
        "evalsha": 1, "rpush": 1, "ltrim": 1,
    }  # fmt: skip
    key = keys.memory("adanpc")
    assert key.startswith(keys.prefix)
    assert redis_client.type(key) == b"list" and redis_client.llen(key) == 50
    assert redis_client.lindex(key, 0) == np.zeros(3, dtype=np.float32).tobytes()


def test_redis_memory_operations_on_an_unreachable_server_raise_store_unavailable() -> None:
    port = free_port()  # nothing listens there
    store = RedisStore(f"redis://:s3cret@127.0.0.1:{port}/0", "test:unreachable", record_ttl_s=60.0)
    try:
        operations = {
            "append": lambda: store.append_memory("adanpc", np.ones((1, 2)), cap=10),
            "load": lambda: store.load_memory("adanpc"),
            "clear": lambda: store.clear_memory("adanpc"),
        }
        for operation in operations.values():
            with pytest.raises(StoreUnavailable) as raised:
                operation()
            assert f"127.0.0.1:{port}" in str(raised.value)
            assert "s3cret" not in str(raised.value)
    finally:
        store.close()


# --- calibrator state: read-modify-write shared by replicas -------------------------------------


def _add_one(state: bytes | None) -> bytes:
    return str(int(state or b"0") + 1).encode()


def test_a_calibrator_state_reads_back_and_clears(store: Store) -> None:
    """The store holds a calibrator's bytes; what they mean is the service's (it writes them only
    with the labels that move them, in `join_labels`)."""
    store.put_predictions([prediction("cal-1")])
    store.join_labels([("cal-1", 1)], effects=_effects, calibrators=["conformal"])
    assert store.load_calibrator("conformal") == b"1"
    assert store.load_calibrator("other") is None
    store.clear_calibrator("conformal")
    assert store.load_calibrator("conformal") is None


# --- effects joined with their labels: both or neither, once per label -------------------------


def _effects(joined: list[PredictionRecord], states: dict[str, bytes | None]) -> LabelEffects:
    """One memory row per joined record (its label, then its features) and a count of them."""
    rows = np.stack([np.concatenate([[r.label], r.features]) for r in joined]).astype(np.float32)
    count = int(states["conformal"] or b"0") + len(joined)
    return LabelEffects(memories=[("errors", rows, 1000)],
                        calibrators={"conformal": str(count).encode()})


def test_effects_are_written_with_the_labels_and_never_for_a_duplicate(store: Store) -> None:
    store.put_predictions([prediction(f"fx-{i}") for i in range(3)])

    first = store.join_labels([("fx-0", 1.0), ("fx-1", 2.0), ("fx-0", 3.0), ("nope", 1.0)],
                              effects=_effects, calibrators=["conformal"])
    again = store.join_labels([("fx-1", 2.0), ("fx-2", 0.0)],
                              effects=_effects, calibrators=["conformal"])

    assert [r.id for r in first.joined] == ["fx-0", "fx-1"]
    assert first.duplicate == ["fx-0"] and first.unknown == ["nope"]
    assert [r.id for r in again.joined] == ["fx-2"] and again.duplicate == ["fx-1"]
    assert [r.label for r in first.joined] == [1.0, 2.0]  # the effects saw the labels
    assert store.load_memory("errors")[:, 0].tolist() == [1.0, 2.0, 0.0]
    assert store.load_calibrator("conformal") == b"3"


def test_effects_that_raise_leave_the_labels_unjoined(store: Store) -> None:
    store.put_predictions([prediction("fx-raise")])

    def broken(joined: list[PredictionRecord], states: dict[str, bytes | None]) -> LabelEffects:
        raise RuntimeError("no effects today")

    with pytest.raises(RuntimeError):
        store.join_labels([("fx-raise", 1.0)], effects=broken)
    assert store.get_prediction("fx-raise").label is None
    assert len(store.join_labels([("fx-raise", 1.0)], effects=_effects,
                                 calibrators=["conformal"]).joined) == 1


def test_effects_writing_an_unread_calibrator_or_a_new_row_width_write_nothing(
    store: Store,
) -> None:
    store.put_predictions([prediction("fx-width")])
    store.append_memory("errors", np.zeros((1, 3), dtype=np.float32), cap=10)

    with pytest.raises(ValueError, match="3 values"):
        store.join_labels([("fx-width", 1.0)], effects=_effects, calibrators=["conformal"])
    with pytest.raises(ValueError, match="not asked"):
        store.join_labels([("fx-width", 1.0)],
                          effects=lambda joined, states: LabelEffects(calibrators={"x": b"1"}))
    assert store.get_prediction("fx-width").label is None
    assert store.load_memory("errors").shape == (1, 3)
    assert store.load_calibrator("conformal") is None


def test_replicas_joining_at_once_apply_every_label_exactly_once(make_store) -> None:
    namespace = f"test:{uuid.uuid4().hex}"
    stores = [make_store(namespace=namespace) for _ in range(4)]
    shared = stores if stores[0].backend == "redis" else [stores[0]] * 4
    ids = [f"race-{i}" for i in range(400)]
    shared[0].put_predictions([prediction(i) for i in ids])
    rng = random.Random(7)
    # every replica gets every label, in its own order, in batches: each id is raced four ways
    orders = [rng.sample(ids, len(ids)) for _ in shared]
    joined: list[str] = []

    def work(replica: Store, order: list[str]) -> None:
        for start in range(0, len(order), 25):
            batch = [(i, 1.0) for i in order[start:start + 25]]
            result = replica.join_labels(batch, effects=_effects, calibrators=["conformal"])
            joined.extend(r.id for r in result.joined)

    threads = [threading.Thread(target=work, args=(replica, order))
               for replica, order in zip(shared, orders, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(joined) == sorted(ids)
    assert shared[0].load_calibrator("conformal") == b"400"
    assert len(shared[0].load_memory("errors")) == 400


def test_a_multi_output_label_is_kept_as_its_list_of_values(store: Store) -> None:
    store.put_predictions([prediction("vec")])
    result = store.join_labels([("vec", [1.5, -2.0, 3.25])])
    assert result.joined[0].label == [1.5, -2.0, 3.25]
    assert store.get_prediction("vec").label == [1.5, -2.0, 3.25]


def test_a_memory_is_trimmed_to_its_newest_rows(store: Store) -> None:
    store.append_memory("trimmed", np.arange(10, dtype=np.float32).reshape(5, 2), cap=10)
    store.trim_memory("trimmed", 2)
    assert store.load_memory("trimmed").tolist() == [[6.0, 7.0], [8.0, 9.0]]
    store.trim_memory("trimmed", 0)
    assert store.load_memory("trimmed").shape == (0, 0)


def test_events_are_kept_newest_first_up_to_the_cap(store: Store) -> None:
    store.append_events([{"n": 1}, {"n": 2}], cap=3)
    store.append_events([{"n": 3, "text": "é"}, {"n": 4}], cap=3)
    assert store.load_events(10) == [{"n": 4}, {"n": 3, "text": "é"}, {"n": 2}]
    assert store.load_events(1) == [{"n": 4}]


def test_a_named_state_is_replaced_by_the_last_save(store: Store) -> None:
    assert store.load_state("drift") is None
    store.save_state("drift", b"one")
    store.save_state("drift", b"two")
    assert store.load_state("drift") == b"two"


# --- effects that reject records: those stay unlabelled, the rest join -------------------------


def _effects_refusing(bad: set[str]):
    """`_effects` for the records not in `bad`; those are rejected, with a reason."""

    def effects(joined: list[PredictionRecord], states: dict[str, bytes | None]) -> LabelEffects:
        kept = [r for r in joined if r.id not in bad]
        changes = _effects(kept, states) if kept else LabelEffects()
        changes.rejected = {r.id: f"{r.id} cannot be used" for r in joined if r.id in bad}
        return changes

    return effects


def test_records_the_effects_reject_stay_unlabelled_and_the_others_join(store: Store) -> None:
    store.put_predictions([prediction(f"rj-{i}") for i in range(4)])
    effects = _effects_refusing({"rj-1"})

    first = store.join_labels([("rj-0", 1.0), ("rj-1", 2.0), ("rj-2", 3.0), ("rj-1", 4.0),
                               ("nope", 1.0)], effects=effects, calibrators=["conformal"])
    again = store.join_labels([("rj-1", 2.0), ("rj-3", 0.0), ("rj-0", 1.0)], effects=effects,
                              calibrators=["conformal"])

    assert ids_by_outcome(first) == {"joined": ["rj-0", "rj-2"], "duplicate": [], "expired": [],
                                     "unknown": ["nope"]}
    # the repeat of the rejected id in the same batch is rejected with it, not a duplicate
    assert first.rejected == ["rj-1", "rj-1"] and first.reasons == {"rj-1": "rj-1 cannot be used"}
    # sent again, it is rejected again: its record was left unlabelled
    assert again.rejected == ["rj-1"] and again.duplicate == ["rj-0"]
    assert [r.id for r in again.joined] == ["rj-3"]
    assert store.get_prediction("rj-1").label is None
    assert store.get_prediction("rj-2").label == 3.0
    # only the joined labels' effects were written: three rows, a count of three
    assert store.load_memory("errors")[:, 0].tolist() == [1.0, 3.0, 0.0]
    assert store.load_calibrator("conformal") == b"3"


def test_a_batch_whose_every_record_is_rejected_writes_nothing(store: Store) -> None:
    store.put_predictions([prediction("all-bad")])

    result = store.join_labels([("all-bad", 1.0)], effects=_effects_refusing({"all-bad"}),
                               calibrators=["conformal"])

    assert result.rejected == ["all-bad"] and result.joined == []
    assert store.get_prediction("all-bad").label is None
    assert store.load_memory("errors").shape == (0, 0)
    assert store.load_calibrator("conformal") is None


def test_effects_rejecting_an_id_they_were_not_handed_write_nothing(store: Store) -> None:
    store.put_predictions([prediction("handed")])

    def stray(joined: list[PredictionRecord], states: dict[str, bytes | None]) -> LabelEffects:
        return LabelEffects(rejected={"not-handed": "?"})

    with pytest.raises(ValueError, match="did not hand"):
        store.join_labels([("handed", 1.0)], effects=stray)
    assert store.get_prediction("handed").label is None


def test_a_store_that_takes_writes_passes_the_readiness_probe(store: Store) -> None:
    store.check_writable()  # returns: no StoreUnavailable


def test_redis_a_stored_record_that_cannot_be_read_is_rejected_and_the_rest_join(
    redis_store: RedisStore, redis_client: redis.Redis
) -> None:
    keys = Keys(redis_store.namespace)
    redis_store.put_predictions([prediction("readable")])
    # a record hash written by something else (or an older adaptd): no outputs, no version...
    redis_client.hset(keys.record("foreign"), mapping={"id": "foreign", "created_at": "1"})
    redis_client.expire(keys.record("foreign"), 60)

    result = redis_store.join_labels([("foreign", 1.0), ("readable", 2.0)], effects=_effects,
                                     calibrators=["conformal"])

    assert [r.id for r in result.joined] == ["readable"] and result.rejected == ["foreign"]
    assert "cannot be read" in result.reasons["foreign"]
    assert not redis_client.hexists(keys.record("foreign"), "label")
    assert redis_store.load_calibrator("conformal") == b"1"


def test_redis_an_error_reply_is_store_unavailable_with_a_reason_free_of_redis_words(
    redis_store: RedisStore, redis_client: redis.Redis
) -> None:
    keys = Keys(redis_store.namespace)
    redis_client.set(keys.memory("errors"), b"not a list")  # WRONGTYPE for every list command

    for operation in (lambda: redis_store.append_memory("errors", np.ones((1, 2)), cap=10),
                      lambda: redis_store.load_memory("errors"),
                      lambda: redis_store.trim_memory("errors", 1)):
        with pytest.raises(StoreUnavailable) as raised:
            operation()
        # the log's message quotes Redis; the reason, for clients, does not
        assert "WRONGTYPE" in str(raised.value) and redis_store.url in str(raised.value)
        assert raised.value.refused is True
        assert raised.value.reason == "the store holds a key of the wrong type"
    # a row of another width is still the caller's error, not the store's
    redis_client.delete(keys.memory("errors"))
    redis_store.append_memory("errors", np.ones((1, 2)), cap=10)
    with pytest.raises(ValueError, match="2 values"):
        redis_store.append_memory("errors", np.ones((1, 3)), cap=10)


def test_redis_the_readiness_probe_writes_a_key_that_expires_within_seconds(
    redis_store: RedisStore, redis_client: redis.Redis
) -> None:
    redis_store.check_writable()

    ttl = redis_client.ttl(Keys(redis_store.namespace).ready())
    assert 0 < ttl <= 10


def test_redis_an_unreachable_server_fails_the_readiness_probe_saying_it_does_not_answer() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "test:probe", record_ttl_s=60.0)
    try:
        with pytest.raises(StoreUnavailable) as raised:
            store.check_writable()
        assert raised.value.reason == "the store does not answer"
        assert raised.value.refused is False
    finally:
        store.close()


def test_the_in_process_store_takes_records_without_waiting_only_when_nothing_holds_it() -> None:
    """`try_put_predictions`, the event loop's write: never waits behind a join or a write."""
    store = MemoryStore(f"try-{uuid.uuid4().hex}", record_ttl_s=60.0)
    held = prediction("held")
    store._lock.acquire()  # a join holding the store
    try:
        assert store.try_put_predictions([held]) is False
    finally:
        store._lock.release()
    assert store.get_prediction("held") is None
    assert store.try_put_predictions([held]) is True
    assert_same_prediction(store.get_prediction("held"), held)
