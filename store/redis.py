"""The shared store: prediction records, label joins, adapter checkpoints and memories in Redis.

Several replicas share one Redis, so any replica can take any label: a record is a hash with a
TTL, and the join is one optimistic transaction per chunk of labels (read under WATCH, write the
labels and their effects in MULTI/EXEC), which makes "exactly once per id" hold across replicas
and label redeliveries. Every key is built by `store.keys.Keys`, under the namespace
prefix. Connection failures and every error reply (out of memory, read-only, a wrong key type...)
become `StoreUnavailable`, so the service keeps predicting from its in-process state, counts the
failure and reports not-ready instead of failing requests.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast
from urllib.parse import urlsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    WatchError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from store.base import (
    EffectsFn,
    JoinResult,
    LabelEffects,
    LabelValue,
    PartialJoin,
    PredictionRecord,
    StoreUnavailable,
    encode_label,
    memory_rows,
    normal_label,
    rejections,
    sort_outcomes,
)
from store.keys import Keys

# The client is built with decode_responses=False and speaks RESP2, so a reply is bytes (or None)
# and a stream read is a list of (stream, entries). redis-py annotates each command for every
# client mode at once (str or bytes replies, RESP2 or RESP3 shapes), so replies are cast to these.
# A stream entry: (id, fields); fields are None when the entry was deleted while pending.
StreamEntries = list[tuple[bytes, dict[bytes, bytes] | None]]

# A pooled connection idle this long is PINGed before use, so a connection that a Redis restart
# or a load balancer dropped is replaced instead of failing the next request.
HEALTH_CHECK_INTERVAL_S = 30

# an optimistic transaction (a label join, a calibrator update) retries this often when other
# writers keep winning the race
MAX_OPTIMISTIC_RETRIES = 50

# the readiness probe's key lives this long, so probes leave nothing behind for long
READY_TTL_S = 10

# the dead-letter stream keeps about this many malformed label entries, newest last
DEAD_LABELS_KEPT = 10_000

# A script blocks the whole server while it runs: a large batch of labels is joined in chunks of
# this many ids (each id is still joined atomically, and in order across chunks).
JOIN_CHUNK = 1000

# Reads only. KEYS: the record key and the seen-marker key of each label, in order. Returns one
# reply per id: {'live', <the record's HGETALL>} for a record waiting for its label, {'duplicate'}
# (labelled already, or labelled before it expired), {'expired'} or {'unknown'}.
PEEK_LABELS_LUA = """
local outcomes = {}
for i = 1, #KEYS / 2 do
  local record_key = KEYS[2 * i - 1]
  if redis.call('EXISTS', record_key) == 1 then
    if redis.call('HEXISTS', record_key, 'label') == 1 then
      outcomes[i] = {'duplicate'}
    else
      outcomes[i] = {'live', redis.call('HGETALL', record_key)}
    end
  else
    local seen = redis.call('GET', KEYS[2 * i])
    if seen == '1' then
      outcomes[i] = {'duplicate'}
    elseif seen == '0' then
      outcomes[i] = {'expired'}
    else
      outcomes[i] = {'unknown'}
    end
  end
end
return outcomes
"""

# Runs inside MULTI, after a peek under WATCH. KEYS: record and seen-marker key of each label to
# write; ARGV[1]: labelled_at; ARGV[2]: the grace period in ms; ARGV[2 + i]: the i-th label. A
# record that expired since the peek is left alone (HSET would create a hash with no TTL).
MARK_LABELS_LUA = """
local labelled_at = ARGV[1]
local grace_ms = tonumber(ARGV[2])
for i = 1, #KEYS / 2 do
  local record_key = KEYS[2 * i - 1]
  local seen_key = KEYS[2 * i]
  if redis.call('EXISTS', record_key) == 1 then
    redis.call('HSET', record_key, 'label', ARGV[2 + i], 'labelled_at', labelled_at)
    if redis.call('EXISTS', seen_key) == 1 then
      redis.call('SET', seen_key, '1', 'KEEPTTL')
    else
      -- the marker was evicted (maxmemory): SET KEEPTTL would create it with no TTL at all,
      -- so give it its lifetime again, the record's plus the grace period
      local ttl_ms = math.max(redis.call('PTTL', record_key), 0) + grace_ms
      redis.call('SET', seen_key, '1', 'PX', math.max(ttl_ms, 1))
    end
  end
end
return #KEYS / 2
"""

# KEYS[1]: the new version's blob; KEYS[2]: the latest pointer; KEYS[3]: the blob `keep` versions
# back. ARGV[1]: the new version; ARGV[2]: the blob. The pointer only moves forward, so two
# replicas saving at once cannot leave it on the older of their versions.
SAVE_ADAPTER_LUA = """
redis.call('SET', KEYS[1], ARGV[2])
local latest = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) > latest then
  redis.call('SET', KEYS[2], ARGV[1])
end
redis.call('DEL', KEYS[3])
return 1
"""


# Rows of a large append go to the server in script calls of this many rows: each call appends and
# trims atomically, and the memory never holds more than its cap between calls.
MEMORY_CHUNK = 1000

# KEYS[1]: the memory's list. ARGV[1]: the cap; ARGV[2]: the width of a row in bytes; ARGV[3..]: the
# packed rows. Checking the first row is enough, since every append is checked the same way. An
# error reply appends nothing. Returns the list's length.
APPEND_MEMORY_LUA = """
local width = tonumber(ARGV[2])
local first = redis.call('LINDEX', KEYS[1], 0)
if first and string.len(first) ~= width then
  return redis.error_reply('WIDTH ' .. string.len(first))
end
-- unpack puts every value on Lua's stack, which holds a few thousand: push in slices
for i = 3, #ARGV, 500 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
return redis.call('LLEN', KEYS[1])
"""


def redacted_url(url: str) -> str:
    """The URL without its password (and query, which may carry one), fit for messages and logs.

    >>> redacted_url("redis://app:s3cret@cache:6379/0")
    'redis://app@cache:6379/0'
    >>> redacted_url("redis://:s3cret@cache:6379/0?socket_timeout=1")
    'redis://cache:6379/0'
    >>> redacted_url("unix:///run/redis.sock?db=0&password=s3cret")
    'unix:///run/redis.sock'
    """
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    username = userinfo.partition(":")[0]
    netloc = f"{username}@{host}" if username else host
    # built by hand: urlunsplit would drop the empty authority of unix:///path
    return f"{parts.scheme}://{netloc}{parts.path}"


class RedisStore:
    """The `Store` contract on Redis, for replicas that share records, labels and checkpoints.

    Parameters
    ----------
    url
        ``redis://[user:password@]host:port/db``, ``rediss://...`` or ``unix://...``.
    namespace
        The deployment and model; every key starts with ``adaptd:{namespace}:``.
    record_ttl_s
        How long a prediction record waits for its label (the hash's TTL).
    expired_grace_s
        How long after a record's expiry its id is still reported *expired* (then *unknown*).
    keep_adapters
        How many adapter checkpoints to keep, newest first.
    socket_timeout_s
        The longest a command or a connect may take before the store counts as unavailable.

    Example (not run as a doctest; it needs a server)::

        store = RedisStore("redis://localhost:6379/0", namespace="demo", record_ttl_s=3600)
        store.put_predictions(records)
        result = store.join_labels([("req-1", 3.0)])
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        namespace: str,
        record_ttl_s: float,
        expired_grace_s: float = 86400.0,
        keep_adapters: int = 5,
        socket_timeout_s: float = 2.0,
    ) -> None:
        if record_ttl_s <= 0:
            raise ValueError(f"record_ttl_s must be positive, got {record_ttl_s}")
        if expired_grace_s < 0:
            raise ValueError(f"expired_grace_s must be zero or positive, got {expired_grace_s}")
        if keep_adapters < 1:
            raise ValueError(f"keep_adapters must be at least 1, got {keep_adapters}")
        self._keys = Keys(namespace)
        self.namespace = namespace
        self.record_ttl_s = float(record_ttl_s)
        self.expired_grace_s = float(expired_grace_s)
        self.keep_adapters = keep_adapters
        self.url = redacted_url(url)
        self._record_ttl_ms = max(1, round(record_ttl_s * 1000))
        self._grace_ms = round(expired_grace_s * 1000)
        self._redis = redis.Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            # one immediate retry on a dropped connection (a restart, a failover) and none on a
            # timeout: a timed-out join or INCR may have run, and running it again is not free
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        # loaded on first use and again after a restart (redis-py answers NOSCRIPT by loading)
        self._peek_labels_script = self._redis.register_script(PEEK_LABELS_LUA)
        self._mark_labels_script = self._redis.register_script(MARK_LABELS_LUA)
        self._save_adapter_script = self._redis.register_script(SAVE_ADAPTER_LUA)
        self._append_memory_script = self._redis.register_script(APPEND_MEMORY_LUA)

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except (RedisError, OSError):
            return False

    def check_writable(self) -> None:
        """A small write that expires by itself (SET ... EX): a Redis at `maxmemory` with
        `noeviction`, a read-only replica or one that cannot persist refuses it, so it is not
        ready although it answers PING."""
        with self._unavailable("take a readiness probe's write"):
            self._redis.set(self._keys.ready(), b"1", ex=READY_TTL_S)

    def put_predictions(self, records: Sequence[PredictionRecord]) -> None:
        if not records:
            return
        marker_ttl_ms = self._record_ttl_ms + self._grace_ms
        with self._unavailable("store predictions"), self._redis.pipeline() as pipe:
            # a MULTI transaction: one round trip, and no reader sees a half-replaced record
            for record in records:
                record_key = self._keys.record(record.id)
                # a replaced record must not keep fields of the old one, its label above all
                pipe.delete(record_key)
                pipe.hset(record_key,
                          mapping=cast("dict[FieldT, EncodableT]", record.to_fields()))
                pipe.pexpire(record_key, self._record_ttl_ms)
                pipe.set(self._keys.seen(record.id), b"0", px=marker_ttl_ms)
            pipe.execute()

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        with self._unavailable("read a prediction"):
            fields = cast("dict[bytes, bytes]",
                          self._redis.hgetall(self._keys.record(prediction_id)))
        return PredictionRecord.from_fields(fields) if fields else None

    def join_labels(
        self,
        labels: Sequence[tuple[str, LabelValue]],
        effects: EffectsFn | None = None,
        calibrators: Sequence[str] = (),
    ) -> JoinResult:
        calibrator_keys = {name: self._keys.calibrator(name) for name in calibrators}
        result = JoinResult()
        for start in range(0, len(labels), JOIN_CHUNK):
            chunk = labels[start:start + JOIN_CHUNK]
            try:
                with self._unavailable("join labels"):
                    self._join_chunk(chunk, effects, calibrator_keys, result)
            except StoreUnavailable as error:
                if start == 0:
                    raise
                # the chunks before this one are joined: their effects must not be lost
                raise PartialJoin(
                    f"{error} (after joining {start} of {len(labels)} labels; send the rest "
                    "again, those joined come back as duplicate)",
                    result, [i for i, _ in labels[start:]], error.reason, error.refused,
                ) from error
        return result

    def _join_chunk(self, chunk: Sequence[tuple[str, LabelValue]], effects: EffectsFn | None,
                    calibrator_keys: dict[str, str], result: JoinResult) -> None:
        """One optimistic transaction: WATCH the records and calibrators, read them, compute the
        effects here, then write labels and effects in MULTI/EXEC. EXEC fails if another writer
        (a replica joining the same id, a calibrator update, a new prediction under an id) got
        there first, and the chunk is read and computed again."""
        keys: list[str] = []
        for prediction_id, _ in chunk:
            keys += [self._keys.record(prediction_id), self._keys.seen(prediction_id)]
        with self._redis.pipeline() as pipe:
            for _ in range(MAX_OPTIMISTIC_RETRIES):
                try:
                    pipe.watch(*keys, *calibrator_keys.values())
                    peeked = self._peek_labels_script(keys=keys, client=pipe)
                    states = {name: cast("bytes | None", pipe.get(key))
                              for name, key in calibrator_keys.items()}
                    joined, waiting, outcomes, rejected = self._sort(chunk, peeked)
                    labelled_at = time.time()
                    for record, (_, label) in zip(joined, waiting, strict=True):
                        record.label, record.labelled_at = normal_label(label), labelled_at
                    changes = LabelEffects()
                    if effects is not None and joined:
                        changes = effects(joined, states)
                        rejected |= rejections(changes, joined)
                        self._check_effects(changes, calibrator_keys, pipe)
                    # a rejected record stays unlabelled: the same label sent again is rejected
                    # again rather than a duplicate
                    marks = [pair for pair in waiting if pair[0] not in rejected]
                    pipe.multi()
                    if marks:
                        self._queue_marks(pipe, marks, labelled_at)
                    for name, rows, cap in changes.memories:
                        self._queue_append(pipe, name, memory_rows(rows, cap), cap)
                    for name, state in changes.calibrators.items():
                        pipe.set(calibrator_keys[name], bytes(state))
                    pipe.execute()
                except WatchError:
                    continue
                finally:
                    pipe.reset()
                sort_outcomes(outcomes, joined, rejected, result)
                return
        raise StoreUnavailable(
            f"{MAX_OPTIMISTIC_RETRIES} concurrent writers in a row changed these labels' records "
            "or calibrators first; nothing was written",
            reason="the store is busy with concurrent writers",
        )

    @staticmethod
    def _sort(chunk: Sequence[tuple[str, LabelValue]], peeked: list) -> tuple[
            list[PredictionRecord], list[tuple[str, LabelValue]], list[tuple[str, str]],
            dict[str, str]]:
        """Records to join (first label per live id, in order), their labels, every label's
        outcome as `sort_outcomes` reads it, and the records that cannot be read (written by
        something else, or by another version of adaptd): rejected, not a reason to fail the
        batch."""
        joined: list[PredictionRecord] = []
        waiting: list[tuple[str, LabelValue]] = []
        outcomes: list[tuple[str, str]] = []
        unreadable: dict[str, str] = {}
        taken: set[str] = set()
        for (prediction_id, label), outcome in zip(chunk, peeked, strict=True):
            status = outcome[0]
            if status == b"live" and prediction_id in taken:
                outcomes.append(("again", prediction_id))
            elif status == b"live":
                taken.add(prediction_id)
                outcomes.append(("live", prediction_id))
                flat = outcome[1]  # HGETALL: field, value, field, value...
                try:
                    record = PredictionRecord.from_fields(dict(zip(flat[::2], flat[1::2],
                                                                   strict=True)))
                except (KeyError, ValueError, TypeError, UnicodeDecodeError) as error:
                    unreadable[prediction_id] = (f"its stored record cannot be read "
                                                 f"({type(error).__name__}: {error})")
                    continue
                joined.append(record)
                waiting.append((prediction_id, label))
            else:
                outcomes.append((status.decode(), prediction_id))
        return joined, waiting, outcomes, unreadable

    def _queue_marks(self, pipe: redis.client.Pipeline, waiting: list[tuple[str, LabelValue]],
                     labelled_at: float) -> None:
        keys: list[str] = []
        args: list[bytes] = [repr(labelled_at).encode(), str(self._grace_ms).encode()]
        for prediction_id, label in waiting:
            keys += [self._keys.record(prediction_id), self._keys.seen(prediction_id)]
            args.append(encode_label(label))
        self._mark_labels_script(keys=keys, args=args, client=pipe)

    def _check_effects(self, changes: LabelEffects, calibrator_keys: dict[str, str],
                       pipe: redis.client.Pipeline) -> None:
        """Refuse effects that EXEC would half-apply: unasked calibrators, rows of a new width."""
        unasked = set(changes.calibrators) - set(calibrator_keys)
        if unasked:
            raise ValueError(f"effects wrote calibrators {sorted(unasked)} the join was not "
                             "asked to read")
        for name, rows, cap in changes.memories:
            rows = memory_rows(rows, cap)
            first = pipe.lindex(self._keys.memory(name), 0)
            if first is not None and len(rows) and len(first) != rows.shape[1] * rows.itemsize:
                raise ValueError(
                    f"memory {name!r} holds rows of {len(first) // 4} values; these have "
                    f"{rows.shape[1]}: clear it (clear_memory) before storing rows of a new width"
                )

    def _queue_append(self, pipe: redis.client.Pipeline, name: str, rows: np.ndarray,
                      cap: int) -> None:
        width = rows.shape[1] * rows.itemsize
        for start in range(0, len(rows), MEMORY_CHUNK):
            chunk = rows[start:start + MEMORY_CHUNK]
            self._append_memory_script(keys=[self._keys.memory(name)],
                                       args=[int(cap), width, *(row.tobytes() for row in chunk)],
                                       client=pipe)

    def save_adapter(self, blob: bytes) -> int:
        # INCR alone hands out a version no replica reuses; the writes that depend on it go in one
        # script whose keys are all declared (a script building keys from the counter would break
        # on a cluster, and MULTI cannot use the INCR's reply). A save that fails in between only
        # skips a version number.
        with self._unavailable("save an adapter"):
            version = int(self._redis.incr(self._keys.adapter_version()))
            self._save_adapter_script(
                keys=[
                    self._keys.adapter_blob(version),
                    self._keys.adapter_latest(),
                    self._keys.adapter_blob(version - self.keep_adapters),
                ],
                args=[version, bytes(blob)],
            )
        return version

    def load_adapter(self, version: int | None = None) -> tuple[int, bytes] | None:
        with self._unavailable("load an adapter"):
            if version is None:
                latest = self._redis.get(self._keys.adapter_latest())
                if latest is None:
                    return None
                version = int(latest)
            blob = cast("bytes | None", self._redis.get(self._keys.adapter_blob(version)))
        return None if blob is None else (int(version), blob)

    def append_memory(self, name: str, rows: np.ndarray, cap: int) -> None:
        key = self._keys.memory(name)
        rows = memory_rows(rows, cap)
        width = rows.shape[1] * rows.itemsize
        for start in range(0, len(rows), MEMORY_CHUNK):
            chunk = rows[start:start + MEMORY_CHUNK]
            args = [int(cap), width, *(row.tobytes() for row in chunk)]
            with self._unavailable("append to a memory"):
                try:
                    self._append_memory_script(keys=[key], args=args)
                except ResponseError as error:
                    if not str(error).startswith("WIDTH"):
                        raise  # any other error reply: the store refused, see _unavailable
                    stored = int(str(error).split()[1]) // 4
                    raise ValueError(
                        f"memory {name!r} holds rows of {stored} values; these have "
                        f"{rows.shape[1]}: clear it (clear_memory) before storing rows of a new "
                        "width"
                    ) from None

    def load_memory(self, name: str) -> np.ndarray:
        with self._unavailable("load a memory"):
            packed = cast("list[bytes]", self._redis.lrange(self._keys.memory(name), 0, -1))
        if not packed:
            return np.empty((0, 0), dtype=np.float32)
        width = len(packed[0])
        if any(len(row) != width for row in packed):
            raise ValueError(f"memory {name!r} holds rows of different widths; clear it")
        return np.frombuffer(b"".join(packed), dtype=np.float32).reshape(len(packed), -1).copy()

    def clear_memory(self, name: str) -> None:
        with self._unavailable("clear a memory"):
            self._redis.delete(self._keys.memory(name))

    def trim_memory(self, name: str, keep: int) -> None:
        with self._unavailable("trim a memory"):
            if keep <= 0:
                self._redis.delete(self._keys.memory(name))
            else:
                self._redis.ltrim(self._keys.memory(name), -keep, -1)

    def append_events(self, events: Sequence[dict], cap: int) -> None:
        if not events:
            return
        encoded = [json.dumps(event, separators=(",", ":"), default=str) for event in events]
        with self._unavailable("record events"), self._redis.pipeline() as pipe:
            pipe.lpush(self._keys.events(), *encoded)  # the last one ends up first: newest first
            pipe.ltrim(self._keys.events(), 0, cap - 1)
            pipe.execute()

    def load_events(self, limit: int) -> list[dict]:
        if limit <= 0:
            return []
        with self._unavailable("read events"):
            raw = self._redis.lrange(self._keys.events(), 0, limit - 1)
        return [json.loads(event) for event in raw]

    def save_state(self, name: str, blob: bytes) -> None:
        with self._unavailable("save state"):
            self._redis.set(self._keys.state(name), bytes(blob))

    def load_state(self, name: str) -> bytes | None:
        with self._unavailable("load state"):
            return cast("bytes | None", self._redis.get(self._keys.state(name)))

    def load_calibrator(self, name: str) -> bytes | None:
        with self._unavailable("load a calibrator"):
            return cast("bytes | None", self._redis.get(self._keys.calibrator(name)))

    def clear_calibrator(self, name: str) -> None:
        with self._unavailable("clear a calibrator"):
            self._redis.delete(self._keys.calibrator(name))

    # --- the label stream: at-least-once delivery, made exactly-once by the join -------------

    def ensure_label_group(self, group: str) -> None:
        """Create the consumer group (and the stream) if missing; it starts from the stream's
        first entry, so labels added before the first replica started are consumed too."""
        with self._unavailable("create the label stream's group"):
            try:
                self._redis.xgroup_create(self._keys.labels(), group, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    def publish_labels(self, labels: Sequence[tuple[str, LabelValue]]) -> list[bytes]:
        """Add labels to the stream, one entry each (what a producer does; here for tools and
        tests). Returns the entry ids."""
        with self._unavailable("add labels to the stream"), self._redis.pipeline(
                transaction=False) as pipe:
            for prediction_id, label in labels:
                pipe.xadd(self._keys.labels(), {"id": prediction_id, "label": encode_label(label)})
            return pipe.execute()

    def read_label_stream(self, group: str, consumer: str, count: int, block_ms: int,
                          claim_idle_ms: int) -> tuple[str, list[tuple[bytes, dict]], int]:
        """The next entries for this consumer, where they came from: ``pending`` (delivered
        to it before and never acknowledged: a failed apply), ``claimed`` (from a consumer idle
        for `claim_idle_ms`, presumed dead) or ``new``, and the stream's length before the read
        (the backlog). An entry's fields are {} when it was deleted while pending. Waits up to
        `block_ms` for new entries."""
        key = self._keys.labels()
        with self._unavailable("read the label stream"):
            try:
                return self._read_labels(key, group, consumer, count, block_ms, claim_idle_ms)
            except ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
            self.ensure_label_group(group)  # the stream was deleted under us: start it again
            return self._read_labels(key, group, consumer, count, block_ms, claim_idle_ms)

    def _read_labels(self, key: str, group: str, consumer: str, count: int, block_ms: int,
                     claim_idle_ms: int) -> tuple[str, list[tuple[bytes, dict]], int]:
        backlog = int(self._redis.xlen(key))
        pending = cast("list[tuple[bytes, StreamEntries]]",
                       self._redis.xreadgroup(group, consumer, {key: "0"}, count=count))
        if pending and pending[0][1]:
            return ("pending", [(entry_id, fields or {}) for entry_id, fields in pending[0][1]],
                    backlog)
        # (next start id, entries) and, from Redis 7, the ids of entries deleted meanwhile
        claimed = cast("tuple[bytes, StreamEntries] | tuple[bytes, StreamEntries, list[bytes]]",
                       self._redis.xautoclaim(key, group, consumer, min_idle_time=claim_idle_ms,
                                              start_id="0-0", count=count))
        if claimed[1]:
            return "claimed", [(entry_id, fields or {}) for entry_id, fields in claimed[1]], backlog
        new = cast("list[tuple[bytes, StreamEntries]]",
                   self._redis.xreadgroup(group, consumer, {key: ">"}, count=count, block=block_ms))
        return "new", [] if not new else [(e, f or {}) for e, f in new[0][1]], backlog

    def ack_label_stream(self, group: str, entry_ids: Sequence[bytes],
                         dead: Sequence[tuple[bytes, dict, str]] = ()) -> int:
        """Acknowledge and delete entries whose effects are stored; malformed ones (`dead`: id,
        fields, reason) go to the dead-letter stream in the same transaction. Returns how many
        entries the stream still holds (the backlog, pending ones included)."""
        key = self._keys.labels()
        ids = [*entry_ids, *(entry_id for entry_id, _, _ in dead)]
        with self._unavailable("acknowledge labels"), self._redis.pipeline() as pipe:
            for entry_id, fields, reason in dead:
                pipe.xadd(self._keys.dead_labels(),
                          {**fields, "entry": entry_id, "reason": reason.encode()},
                          maxlen=DEAD_LABELS_KEPT, approximate=True)
            if ids:
                pipe.xack(key, group, *ids)
                pipe.xdel(key, *ids)
            pipe.xlen(key)
            return int(pipe.execute()[-1])

    def close(self) -> None:
        # the client owns its pool (from_url), so this disconnects every pooled connection
        self._redis.close()

    @contextmanager
    def _unavailable(self, action: str) -> Iterator[None]:
        """Turn any Redis failure into `StoreUnavailable`: no answer (a refused or dropped
        connection, a timeout) and every error reply alike (out of memory, read-only, loading,
        cannot persist, a wrong key type, a lost script...). The message, for the log, names the
        server (no password) and quotes what it answered; `reason` is for clients."""
        try:
            yield
        except (BusyLoadingError, AuthenticationError) as error:
            # ConnectionErrors to redis-py, but Redis answered: it refused
            raise self._refused(action, error) from error
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise StoreUnavailable(
                f"Redis at {self.url} did not answer when asked to {action}: {error}; "
                "check that it is running and reachable from this host",
                reason="the store does not answer",
            ) from error
        except RedisError as error:
            raise self._refused(action, error) from error

    def _refused(self, action: str, error: RedisError) -> StoreUnavailable:
        reason, advice = refusal(error)
        return StoreUnavailable(
            f"Redis at {self.url} refused to {action}: {type(error).__name__}: {error}; {advice}",
            reason=reason, refused=True,
        )


def refusal(error: RedisError) -> tuple[str, str]:
    """What a Redis error reply means, in a few words fit for a client (never Redis's own text),
    and what an operator should do about it.

    redis-py turns the common codes into classes and drops the code from the message; inside a
    script's error the code stays in the text:

    >>> refusal(OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))[0]
    'the store is full and refuses writes'
    >>> refusal(ResponseError("Error running script (call to f_0): @user_script:4: WRONGTYPE "
    ...                       "Operation against a key holding the wrong kind of value"))[0]
    'the store holds a key of the wrong type'
    """
    text = str(error)

    def says(code: str) -> bool:  # the code may follow a script's own prefix
        return re.search(rf"\b{code}\b", text) is not None

    if isinstance(error, OutOfMemoryError) or says("OOM"):
        return ("the store is full and refuses writes",
                "Redis reached maxmemory: free memory or raise maxmemory (keep noeviction)")
    if isinstance(error, ReadOnlyError) or says("READONLY"):
        return ("the store is read-only",
                "this Redis is a replica (a failover?): point store.url at the primary")
    if isinstance(error, BusyLoadingError) or says("LOADING"):
        return ("the store is loading its data", "wait until Redis has loaded its dataset")
    if says("MISCONF"):
        return ("the store refuses writes", "Redis cannot persist to disk: check its disk and log")
    if says("WRONGTYPE"):
        return ("the store holds a key of the wrong type",
                "a key under this namespace was written by something else: delete it")
    if isinstance(error, (AuthenticationError, NoPermissionError)) or says("NOPERM"):
        return ("the store refuses this client",
                "check the user and password in store.url and the user's ACL in Redis")
    if isinstance(error, NoScriptError) or says("NOSCRIPT"):
        return ("the store lost a script", "the script cache was flushed: the next call loads it")
    return ("the store answered with an error", "see Redis's log")
