"""Checks of request payloads against the served model, with messages that say what to change."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Sequence

import numpy as np

from service.model import LoadedModel
from service.schemas import PREDICTION_ID_PATTERN
from store import LabelValue


class InvalidInput(ValueError):
    """The request cannot be served as sent; the message says what to change (HTTP 422)."""


def to_batch(inputs: Sequence[object], input_shape: tuple[int, ...], limit: int) -> np.ndarray:
    """Samples as one float32 array of shape (n, *input_shape), all finite.

    >>> to_batch([[1, 2], [3, 4]], (2,), limit=8).shape
    (2, 2)
    >>> to_batch([[1, 2], [3]], (2,), limit=8)
    Traceback (most recent call last):
    ...
    service.inputs.InvalidInput: inputs[1] has shape [1]; the model takes samples of shape [2]
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
    finite = np.isfinite(batch.reshape(len(inputs), -1)).all(axis=1)
    if not finite.all():
        index = int(np.argmin(finite))
        raise InvalidInput(
            f"inputs[{index}] holds a value that is not a finite float32 (NaN, infinity or beyond "
            "±3.4e38)"
        )
    return batch


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
    """The caller's ids (one per sample, unique), or new random ids."""
    if ids is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if len(ids) != count:
        raise InvalidInput(f"{len(ids)} ids for {count} inputs: send one id per sample, or none")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        duplicate = next(i for i in ids if i in seen or seen.add(i))
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
    """Why this label does not fit the task, or None when it does: a class index in range; one
    finite value for a single-output regressor, a list of one per output for a multi-output one.

    >>> from types import SimpleNamespace
    >>> classifier = SimpleNamespace(task="classification", num_classes=3)
    >>> label_problem(2.0, classifier) is None, label_problem(3.0, classifier)
    (True, 'is 3; a class index is an integer from 0 to 2')
    >>> label_problem([1.0, 2.0], SimpleNamespace(task="regression", num_outputs=3))
    'has 2 values; this model predicts 3 per sample'
    """
    if model.task != "classification":
        outputs = model.num_outputs
        values = label if isinstance(label, list) else [label]
        if not isinstance(label, list) and outputs > 1:
            return f"is one number; this model predicts {outputs} values per sample: send a list"
        if len(values) != outputs:
            return f"has {len(values)} values; this model predicts {outputs} per sample"
        if not all(math.isfinite(v) for v in values):
            return "holds a value that is not finite"
        return None
    if isinstance(label, list):
        return "is a list; a classifier's label is one class index"
    if not math.isfinite(label):
        return f"is {label}; a label must be a finite number"
    classes = model.num_classes or 0
    if label != int(label) or not 0 <= label < classes:
        return f"is {label:g}; a class index is an integer from 0 to {classes - 1}"
    return None


ID_PATTERN = re.compile(PREDICTION_ID_PATTERN)


def id_problem(prediction_id: str) -> str | None:
    """Why this id cannot name a prediction, or None (the rule the request schemas apply)."""
    if not ID_PATTERN.match(prediction_id):
        return (f"id {prediction_id[:40]!r} must be 1 to 128 printable ASCII characters "
                "without spaces")
    return None
