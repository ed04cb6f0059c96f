"""The `Store` contract: what the service needs from its state, named by the service's verbs.

A prediction leaves a record (`put_predictions`); a label arriving later joins it exactly once
(`join_labels`). The join is idempotent: the first label for an id is *joined*, any later one is a
*duplicate* and changes nothing; an id whose record has expired is *expired* for a grace period
after expiry, and *unknown* after that or if it was never seen. Adapter checkpoints are versioned
blobs with a `latest` pointer. Memories (AdaNPC's feature memory, the error memory) are named,
capped lists of float32 rows, oldest first, that every replica appends to and loads from.

Backends raise `StoreUnavailable` when their server cannot be reached or answers with an error
(out of memory, read-only, ...), so the service can keep predicting from in-process state, count
the failure and report not-ready. A join may also *reject* a label whose effects cannot be
computed from its record (`LabelEffects.rejected`): that record stays unlabelled, and the other
labels of the batch are joined.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# the field prefix of a record's named arrays (`PredictionRecord.arrays`)
ARRAY_FIELD = "array:"


# a class index or a value (one number), or the values of a multi-output regressor (its horizons)
LabelValue = float | list[float]


def encode_label(label: LabelValue) -> bytes:
    """A label as the store keeps it: the float's repr, or a JSON list for several values.

    >>> encode_label(3), encode_label([1.5, 2])
    (b'3.0', b'[1.5,2.0]')
    """
    if isinstance(label, (list, tuple, np.ndarray)):
        return json.dumps([float(v) for v in label], separators=(",", ":")).encode()
    return repr(float(label)).encode()


def decode_label(raw: bytes | str) -> LabelValue:
    """The inverse of `encode_label`.

    >>> decode_label(b'3.0'), decode_label(b'[1.5,2.0]')
    (3.0, [1.5, 2.0])
    """
    text = raw.decode() if isinstance(raw, bytes) else raw
    if text.startswith("["):
        return [float(v) for v in json.loads(text)]
    return float(text)


def normal_label(label: LabelValue) -> LabelValue:
    """A label with plain floats, as a joined record carries it."""
    return decode_label(encode_label(label))


class StoreUnavailable(RuntimeError):
    """The backing server did not answer, or answered with an error; the operation had no effect
    that can be relied on.

    The message is for the log: it may name the server and quote what it answered. `reason` is a
    few words fit for a client or a readiness probe (never the server's address or its own
    words). `refused` is True when the server answered with an error (it is up but would not do
    it: out of memory, read-only, a wrong key type...), False when it did not answer at all.
    """

    def __init__(self, message: str, reason: str = "the store does not answer",
                 refused: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.refused = refused


def memory_rows(rows: np.ndarray, cap: int) -> np.ndarray:
    """Rows to append to a memory as both backends check them: contiguous float32 (n, d).

    >>> memory_rows(np.ones((2, 3)), cap=10).dtype
    dtype('float32')
    """
    if cap < 1:
        raise ValueError(f"a memory's cap must be at least 1 row, got {cap}")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] < 1:
        raise ValueError(
            f"memory rows have shape {rows.shape}; pass a 2-D array (n, d) with d >= 1 columns"
        )
    return rows


@dataclass
class PredictionRecord:
    """What the service remembers about one prediction until its label arrives.

    `outputs` are the probabilities (classification) or predicted values (regression) as served
    and `features` the input of the model's last linear layer, both float32. `arrays` holds other
    named float32 vectors the label path needs (the outputs before a correction, the inputs for a
    supervised step), flattened. `extra` carries small JSON-serialisable facts (a prediction set,
    an interval, the conformal level) that later stages need to score the label.
    """

    id: str
    created_at: float
    prediction: float
    outputs: np.ndarray
    features: np.ndarray | None = None
    model_version: str = ""
    adapter_version: int = 0
    extra: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    label: LabelValue | None = None
    labelled_at: float | None = None

    def to_fields(self) -> dict[str, bytes]:
        """Flat bytes fields, the shape both backends persist (a Redis hash in `RedisStore`)."""
        fields = {
            "id": self.id.encode(),
            "created_at": repr(float(self.created_at)).encode(),
            "prediction": repr(float(self.prediction)).encode(),
            "outputs": np.ascontiguousarray(self.outputs, dtype=np.float32).tobytes(),
            "model_version": self.model_version.encode(),
            "adapter_version": str(int(self.adapter_version)).encode(),
            "extra": json.dumps(self.extra, separators=(",", ":")).encode(),
        }
        if self.features is not None:
            fields["features"] = np.ascontiguousarray(self.features, dtype=np.float32).tobytes()
        for name, values in self.arrays.items():
            fields[ARRAY_FIELD + name] = np.ascontiguousarray(values, dtype=np.float32).tobytes()
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, bytes] | Mapping[bytes, bytes]) -> PredictionRecord:
        f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        features = f.get("features")
        label = f.get("label")
        labelled_at = f.get("labelled_at")
        return cls(
            id=f["id"].decode(),
            created_at=float(f["created_at"]),
            prediction=float(f["prediction"]),
            outputs=np.frombuffer(f["outputs"], dtype=np.float32).copy(),
            features=None if features is None else np.frombuffer(features, np.float32).copy(),
            model_version=f["model_version"].decode(),
            adapter_version=int(f["adapter_version"]),
            extra=json.loads(f["extra"]),
            arrays={k[len(ARRAY_FIELD):]: np.frombuffer(v, np.float32).copy()
                    for k, v in f.items() if k.startswith(ARRAY_FIELD)},
            label=None if label is None else decode_label(label),
            labelled_at=None if labelled_at is None else float(labelled_at),
        )


class PartialJoin(StoreUnavailable):
    """The store failed part-way through a batch of labels: `result` holds the ones joined before
    it did (their effects must still be applied), `pending` the ids not attempted."""

    def __init__(self, message: str, result: JoinResult, pending: list[str],
                 reason: str = "the store does not answer", refused: bool = False) -> None:
        super().__init__(message, reason, refused)
        self.result = result
        self.pending = pending


@dataclass
class JoinResult:
    """The outcome of joining a batch of labels: records joined now, and the ids that were not.

    `rejected` holds the ids whose label the effects refused (`LabelEffects.rejected`): their
    records stay unlabelled, so the same label sent again is rejected again, not a duplicate. A
    later label for a rejected id in the same batch is rejected too. `reasons` says why, by id.
    """

    joined: list[PredictionRecord] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class LabelEffects:
    """What a batch of joined labels changes besides their records, stored in the same atomic
    step as the join: rows appended to named memories, new states of named calibrators.

    Because the effects land with the join or not at all, a label delivered twice (a client's
    retry, a stream entry redelivered after a crash) finds its record labelled, is a duplicate, and
    changes nothing the second time: every label is applied exactly once.
    """

    # (memory name, float32 rows (n, d), cap): appended and trimmed as `Store.append_memory` does
    memories: list[tuple[str, np.ndarray, int]] = field(default_factory=list)
    # calibrator name -> its new state; names must be among those the join was asked to read
    calibrators: dict[str, bytes] = field(default_factory=dict)
    # id -> why: records about to be joined whose effects cannot be computed (outputs that are
    # not finite, say). The join leaves them unlabelled and reports them as `rejected`; the
    # memories and calibrators above must be the effects of the other records only.
    rejected: dict[str, str] = field(default_factory=dict)


def rejections(changes: LabelEffects, handed: Sequence[PredictionRecord]) -> dict[str, str]:
    """The ids the effects rejected, checked (as both backends do) to be among the records the
    join handed them: a `ValueError` otherwise, and nothing is written."""
    stray = set(changes.rejected) - {record.id for record in handed}
    if stray:
        raise ValueError(f"effects rejected ids {sorted(stray)[:5]} the join did not hand them")
    return dict(changes.rejected)


def sort_outcomes(outcomes: Sequence[tuple[str, str]], joined: Sequence[PredictionRecord],
                  rejected: Mapping[str, str], result: JoinResult) -> None:
    """Add one chunk's outcomes to `result`, in label order. `outcomes` holds (kind, id) with
    the kinds of `JoinResult` plus ``live`` for the first label of a live, unlabelled record
    (joined unless rejected) and ``again`` for a later label of such a record in the same batch
    (a duplicate, or rejected with it). `rejected` maps the rejected ids to why."""
    result.joined += [record for record in joined if record.id not in rejected]
    for kind, prediction_id in outcomes:
        if kind == "live":
            if prediction_id in rejected:
                result.rejected.append(prediction_id)
            continue
        if kind == "again":
            kind = "rejected" if prediction_id in rejected else "duplicate"
        getattr(result, kind).append(prediction_id)
    result.reasons.update(rejected)


# computes the effects of the records joined now, given the current states of the calibrators the
# join was asked to read, and names the records it refuses; it may run more than once (an
# optimistic retry), so it must not act
EffectsFn = Callable[[list[PredictionRecord], dict[str, bytes | None]], LabelEffects]


@runtime_checkable
class Store(Protocol):
    """The state the service keeps outside the model. Every method is safe to call from threads."""

    backend: str
    namespace: str
    record_ttl_s: float

    def ping(self) -> bool:
        """True when the backend answers now; never raises."""
        ...

    def check_writable(self) -> None:
        """Readiness: returns when the store answers and takes a small write now (Redis: a key
        that expires within seconds), so a store that is full or read-only is not ready.
        Raises `StoreUnavailable` otherwise."""
        ...

    def put_predictions(self, records: Sequence[PredictionRecord]) -> None:
        """Keep these records for `record_ttl_s` seconds.

        A record with an existing id replaces the old one, label included: the id starts over
        as a new prediction waiting for its label (`PredictionRecord.label` is not stored here;
        only `join_labels` sets it).
        """
        ...

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        """The live record for an id, labelled or not; None when unknown or expired."""
        ...

    def join_labels(
        self,
        labels: Sequence[tuple[str, LabelValue]],
        effects: EffectsFn | None = None,
        calibrators: Sequence[str] = (),
    ) -> JoinResult:
        """Attach each label to its record, atomically per id, at most once per id.

        Labels are taken in order, so a second label for an id in the same call is a duplicate.
        Joined records come back with `label` and `labelled_at` set.

        With `effects`, the records about to be joined and the current states of `calibrators`
        go to `effects`, and the `LabelEffects` it returns are written together with the labels,
        atomically: both or neither. `effects` may be called more than once (Redis retries when
        another writer touched the same records or calibrators meanwhile); the last call's
        effects are the ones written. If it raises, nothing is written. The ids it rejects
        (`LabelEffects.rejected`, each among the records handed to it) are not joined: their
        records stay unlabelled and they come back in `JoinResult.rejected`, with the reasons;
        the rest of the batch is joined. Large batches are joined in chunks, each atomic on its
        own (`PartialJoin` if a later chunk fails).
        """
        ...

    def save_adapter(self, blob: bytes) -> int:
        """Store an adapter checkpoint (safetensors bytes) as a new version; returns the version."""
        ...

    def load_adapter(self, version: int | None = None) -> tuple[int, bytes] | None:
        """A checkpoint by version, or the latest when version is None; None when there is none."""
        ...

    def append_memory(self, name: str, rows: np.ndarray, cap: int) -> None:
        """Append float32 rows (n, d) to the named memory, then keep only its newest `cap` rows.

        Every row of one memory has the same width: rows of another width raise `ValueError`
        and append nothing. Appending and trimming happen together; no reader sees the memory
        above its cap. An empty append changes nothing.
        """
        ...

    def load_memory(self, name: str) -> np.ndarray:
        """Every kept row of the named memory, oldest first, float32 (n, d); (0, 0) when empty."""
        ...

    def clear_memory(self, name: str) -> None:
        """Drop every row of the named memory (an adapter reset, a drift action)."""
        ...

    def trim_memory(self, name: str, keep: int) -> None:
        """Keep only the newest `keep` rows of the named memory (a drift policy's refresh)."""
        ...

    def append_events(self, events: Sequence[dict], cap: int) -> None:
        """Add JSON-serialisable events to the deployment's shared log; keep the newest `cap`."""
        ...

    def load_events(self, limit: int) -> list[dict]:
        """The newest `limit` events of the shared log, newest first."""
        ...

    def save_state(self, name: str, blob: bytes) -> None:
        """Keep a named piece of state (drift detectors and policy), replacing the last one."""
        ...

    def load_state(self, name: str) -> bytes | None:
        """The named state as last saved; None when there is none."""
        ...

    def load_calibrator(self, name: str) -> bytes | None:
        """The named calibrator's state as last written; None when there is none."""
        ...

    def clear_calibrator(self, name: str) -> None:
        """Drop the named calibrator's state (a drift action's reset of the shared calibrator)."""
        ...

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


class LabelStream(Protocol):
    """A backend that also carries the label stream (Redis): entries read as one consumer group,
    acknowledged once their join is stored, malformed ones moved to a dead-letter stream."""

    def ensure_label_group(self, group: str) -> None:
        """Create the consumer group (and the stream) if they do not exist yet."""
        ...

    def read_label_stream(self, group: str, consumer: str, count: int, block_ms: int,
                          claim_idle_ms: int) -> tuple[str, list[tuple[bytes, dict]], int]:
        """(source, entries, backlog): this consumer's pending entries, then entries a dead
        consumer held for `claim_idle_ms`, then new ones."""
        ...

    def ack_label_stream(self, group: str, entry_ids: Sequence[bytes],
                         dead: Sequence[tuple[bytes, dict, str]] = ()) -> int:
        """Acknowledge and delete entries, moving `dead` ones to the dead-letter stream with
        their reason; returns the backlog."""
        ...


class Snapshots(Protocol):
    """A backend whose lasting state is written to and read from a file (the in-process one)."""

    def snapshot(self) -> bytes:
        ...

    def restore(self, snapshot: bytes) -> None:
        ...
