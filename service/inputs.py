"""Checks of request payloads against the served model, with messages that say what to change."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from service.schemas import PREDICTION_ID_PATTERN
from store import LabelValue

if TYPE_CHECKING:  # not at run time: a parse process imports this module without torch
    from service.model import LoadedModel


class InvalidInput(ValueError):
    """The request cannot be served as sent; the message says what to change (HTTP 422)."""


class _Repeated(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _Repeated(key)
        seen.add(key)
    return dict(pairs)


def repeated_key(body: bytes, most: dict[bytes, int]) -> str | None:
    """A key that one object of this JSON body holds twice, or None. JSON parsers keep the last
    of them, silently; the caller may have meant either, so the body is refused instead.

    `most`: how often each key the schema knows may appear as a string in a body without a
    repeat (`b'"ids"'`: 1, one label object each for `b'"label"'`...). Only where a count passes
    its bound, or a key might be spelt with escapes, is the body parsed again to find out (a
    value may be such a string too); otherwise counting is all it costs. Keys the schema does
    not know are refused by it as unknown, repeated or not.

    >>> repeated_key(b'{"inputs": [[1]], "inputs": [[2]]}', {b'"inputs"': 1})
    'inputs'
    >>> repeated_key(b'{"inputs": [[1]], "ids": ["inputs"]}', {b'"inputs"': 1}) is None
    True
    """
    if b"\\u" not in body and all(body.count(key) <= bound for key, bound in most.items()):
        return None
    try:
        json.loads(body, object_pairs_hook=_unique_pairs)
    except _Repeated as repeated:
        return repeated.key
    except (ValueError, RecursionError):
        return None  # not JSON: the parser that reads it says so
    return None


def to_batch(inputs: Sequence[object], input_shape: tuple[int, ...], limit: int,
             max_abs: float = math.inf) -> np.ndarray:
    """Samples as one float32 array of shape (n, *input_shape), all finite and none holding a
    value beyond ±`max_abs` (the model's `max_abs_input`).

    >>> to_batch([[1, 2], [3, 4]], (2,), limit=8).shape
    (2, 2)
    >>> to_batch([[1, 2], [3]], (2,), limit=8)
    Traceback (most recent call last):
    ...
    service.inputs.InvalidInput: inputs[1] has shape [1]; the model takes samples of shape [2]
    >>> to_batch([[1, 2], [3, -1e20]], (2,), limit=8, max_abs=6.1e18)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    service.inputs.InvalidInput: inputs[1] holds -1e+20, beyond the largest ... (6.1e+18, ...)
    """
    if len(inputs) > limit:
        raise InvalidInput(
            f"{len(inputs)} samples in one request; the limit is {limit}: split the request"
        )
    expected = list(input_shape)
    for index, sample in enumerate(inputs):
        shape = _shape(sample)
        if shape is None:
            raise InvalidInput(
                f"inputs[{index}] is not a regular array (its rows differ in length); the model "
                f"takes samples of shape {expected}"
            )
        if shape != expected:
            raise InvalidInput(
                f"inputs[{index}] has shape {shape}; the model takes samples of shape {expected}"
            )
    with np.errstate(over="ignore"):
        batch = np.asarray(inputs, dtype=np.float32)
    return checked_values(batch, max_abs)


def checked_values(batch: np.ndarray, max_abs: float = math.inf,
                   name: str = "inputs") -> np.ndarray:
    """`batch` (float32, one sample per row) when every value is finite and within ±`max_abs`;
    the checks of `to_batch` after the shapes (`service.predict_body` builds its batch with numpy
    and checks it here). A message names a sample `{name}[i]`: `inputs[i]` in a v1 body, the
    tensor's name under the Open Inference Protocol."""
    finite = np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
    if not finite.all():
        index = int(np.argmin(finite))
        raise InvalidInput(
            f"{name}[{index}] holds a value that is not a finite float32 (NaN, infinity or beyond "
            "±3.4e38)"
        )
    if max_abs < math.inf:
        _check_range(batch.reshape(len(batch), -1), max_abs, name)
    return batch


def _check_range(flat: np.ndarray, max_abs: float, name: str) -> None:
    """Refuse the first sample (rows of `flat`) holding a value beyond ±max_abs."""
    if not flat.size:
        return
    peaks = np.maximum(flat.max(axis=1), -flat.min(axis=1))
    over = peaks > max_abs
    if over.any():
        index = int(np.argmax(over))
        value = float(flat[index, int(np.argmax(np.abs(flat[index])))])
        raise InvalidInput(
            f"{name}[{index}] holds {value:.2g}, beyond the largest magnitude this model takes "
            f"({max_abs:.2g}, model.max_abs_input)"
        )


def _shape(sample: object) -> list[int] | None:
    """The shape of a nested list of numbers, or None when it is ragged."""
    if not isinstance(sample, list):
        return []
    if not sample:
        return [0]
    shapes = [_shape(item) for item in sample]
    first = shapes[0]
    if first is None or any(s != first for s in shapes[1:]):
        return None
    return [len(sample), *first]


def prediction_ids(ids: Sequence[str] | None, count: int) -> list[str]:
    """The caller's ids (one per sample, unique), or new random ids: 128 random bits each, as
    32 hex digits (one read of the system's randomness for them all, not one per id)."""
    if ids is None:
        digits = os.urandom(16 * count).hex()
        return [digits[i:i + 32] for i in range(0, 32 * count, 32)]
    if len(ids) != count:
        raise InvalidInput(f"{len(ids)} ids for {count} inputs: send one id per sample, or none")
    if len(set(ids)) != len(ids):
        duplicate = next(i for n, i in enumerate(ids) if i in ids[:n])
        raise InvalidInput(f"id {duplicate!r} appears twice in one request; ids must be unique")
    return list(ids)


def check_labels(labels: Sequence[tuple[str, LabelValue]], model: LoadedModel, limit: int) -> None:
    """Every label must fit the task: a class index in range, or a finite value."""
    if len(labels) > limit:
        raise InvalidInput(f"{len(labels)} labels in one request; the limit is {limit}")
    for index, (_, label) in enumerate(labels):
        problem = label_problem(label, model)
        if problem is not None:
            raise InvalidInput(f"labels[{index}].label {problem}")


def label_problem(label: LabelValue, model: LoadedModel) -> str | None:
    """Why this label does not fit the model's task, or None when it does: a class index in
    range; one finite value for a single-output regressor, a list of one per output for a
    multi-output one (the rule is the task's, `adapters.task`)."""
    return model.task.label_problem(label, model.width)


ID_PATTERN = re.compile(PREDICTION_ID_PATTERN)


def id_problem(prediction_id: str) -> str | None:
    """Why this id cannot name a prediction, or None (the rule the request schemas apply)."""
    if not ID_PATTERN.fullmatch(prediction_id):
        return (f"id {prediction_id[:40]!r} must be 1 to 128 printable ASCII characters "
                "without spaces")
    return None
