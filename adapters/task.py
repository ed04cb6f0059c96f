"""What a model predicts, as one object: a classifier's class probabilities or a regressor's values.

Everything that differs between the two lives here, so the rest of the code asks the task instead
of testing its name: how raw outputs become what is served (softmax, or the values as they are),
the served prediction, what a label is and how it is checked, the error a label reveals (0/1, or
the mean absolute residual), the labelled drift signal's name, the nonconformity scores and the
sets or intervals they define, the supervised losses, and how a memory turns labels into targets.

>>> task = task_named("classification")
>>> task.label_problem(3.0, width=3)
'is 3; a class index is an integer from 0 to 2'
>>> task.label_array([2, 0]).tolist()
[2.0, 0.0]
>>> task_named("regression").label_problem([1.0, 2.0], width=3)
'has 2 values; this model predicts 3 per sample'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from adapters.conformal.scores import aps_scores, aps_set, lac_scores, lac_set
from store import LabelValue, PredictionRecord


class Task:
    """The behaviour every task defines; `Classification` and `Regression` are the two there are."""

    name: ClassVar[str]
    # the served outputs are class probabilities (sets, entropy, argmax, AdaNPC's vote)
    discrete: ClassVar[bool]
    # the labelled drift signal: 0/1 errors or absolute residuals
    signal: ClassVar[str]
    # conformal scores this task can use; the first is the default
    scores_known: ClassVar[tuple[str, ...]]
    # supervised losses this task can use; the first is the default
    losses: ClassVar[tuple[str, ...]]
    # the name of the conformal set's size in /v1/state
    size_name: ClassVar[str]

    def __repr__(self) -> str:
        return f"task_named({self.name!r})"

    def __str__(self) -> str:
        return self.name

    # --- serving ----------------------------------------------------------------------------

    def served(self, outputs: torch.Tensor) -> torch.Tensor:
        """What the model's raw outputs (n, width) become before anything corrects them."""
        raise NotImplementedError

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """The served prediction per row: the argmax class, or the first (only) value."""
        raise NotImplementedError

    def entropy(self, outputs: torch.Tensor) -> torch.Tensor | None:
        """Per-row entropy of served probabilities; None where the outputs are values."""
        return None

    def prediction(self, row: np.ndarray, predicted: float) -> int | float | list[float]:
        """One row's prediction as a response shows it."""
        raise NotImplementedError

    def probabilities(self, row: np.ndarray) -> list[float] | None:
        """One row's probabilities as a response shows them (None for a regressor)."""
        return None

    def calibrated(self, outputs: np.ndarray, threshold: float | np.ndarray, score: str
                   ) -> tuple[list[list[int]] | None, list | None, list[float]]:
        """Prediction sets (classification) or intervals (regression) at `threshold`, and each
        row's size (the set's class count, or the interval's width). `threshold` may be an
        array broadcast against the outputs: one per class (n, classes) or (classes,), or one
        per row ((n, 1) for classes, (n,) for values), as Mondrian calibration serves them."""
        raise NotImplementedError

    # --- labels -----------------------------------------------------------------------------

    def label_problem(self, label: LabelValue, width: int) -> str | None:
        """Why `label` does not fit a model of `width` outputs, or None when it does."""
        raise NotImplementedError

    def label_array(self, labels: Sequence[LabelValue]) -> np.ndarray:
        """Labels as float32: class indices (n,), or values (n, outputs)."""
        raise NotImplementedError

    def record_labels(self, records: Sequence[PredictionRecord]) -> np.ndarray:
        """The labels of joined records, as `label_array` reads them."""
        return self.label_array([joined_label(r) for r in records])

    def label_tensor(self, labels: np.ndarray | torch.Tensor, count: int) -> torch.Tensor:
        """Labels as a training target: class indices (n,) long, or values (n, outputs) float."""
        raise NotImplementedError

    def errors(self, records: Sequence[PredictionRecord]) -> np.ndarray:
        """What joined labels say of what was served: 0/1 errors of the class, or the absolute
        residual of the values (the mean over a multi-output regressor's outputs)."""
        raise NotImplementedError

    def output_errors(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The same errors for other outputs of the same samples (the source model's, which
        the shadow comparison scores against the labels)."""
        raise NotImplementedError

    def bounded_losses(self, outputs: np.ndarray, labels: np.ndarray, scale: float
                       ) -> np.ndarray:
        """Each row's loss in [0, 1] against its label, for weighing candidates: 1 when the
        class predicted (the most probable) is not the label, else 0; or |e| / (|e| + scale)
        of the mean absolute residual."""
        raise NotImplementedError

    def scores(self, records: Sequence[PredictionRecord], score: str) -> np.ndarray:
        """The nonconformity of each record's label against the outputs served."""
        raise NotImplementedError

    def targets(self, labels: torch.Tensor, width: int) -> torch.Tensor:
        """Labels as rows a memory averages: one-hot (or given distributions) for classes,
        values for a regressor; (n, width) float32."""
        raise NotImplementedError

    def settle(self, corrected: torch.Tensor) -> torch.Tensor:
        """Corrected outputs made valid again: probabilities clipped and renormalised."""
        return corrected

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, name: str,
             huber_delta: float = 1.0) -> torch.Tensor:
        """The supervised loss `name` of the model's outputs against labels."""
        raise NotImplementedError


class Classification(Task):
    name = "classification"
    discrete = True
    signal = "error"
    scores_known = ("lac", "aps")
    losses = ("cross_entropy",)
    size_name = "mean_set_size"

    def served(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.softmax(1)

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(1)

    def entropy(self, outputs: torch.Tensor) -> torch.Tensor:
        return -(outputs * outputs.clamp_min(1e-12).log()).sum(1)

    def prediction(self, row: np.ndarray, predicted: float) -> int:
        return int(predicted)

    def probabilities(self, row: np.ndarray) -> list[float]:
        return row.tolist()

    def calibrated(self, outputs: np.ndarray, threshold: float | np.ndarray, score: str
                   ) -> tuple[list[list[int]], None, list[float]]:
        # normalised as `scores` normalises them, so a class is in the set exactly when its
        # label's score would be within the threshold (or it is the argmax of an empty set)
        probs = np.asarray(outputs, dtype=np.float64)
        probs = probs / probs.sum(1, keepdims=True)
        members = lac_set(probs, threshold) if score == "lac" else aps_set(probs, threshold)
        # every row's members in one pass: the classes of all rows in row order, cut by counts
        classes = np.nonzero(members)[1].tolist()
        counts = members.sum(1).tolist()
        ends = np.cumsum(counts).tolist()
        sets = [classes[end - count:end] for count, end in zip(counts, ends, strict=True)]
        return sets, None, [float(count) for count in counts]

    def label_problem(self, label: LabelValue, width: int) -> str | None:
        if isinstance(label, list):
            return "is a list; a classifier's label is one class index"
        if not math.isfinite(label):
            return f"is {label}; a label must be a finite number"
        if label != int(label) or not 0 <= label < width:
            shown = f"{label:g}"  # 12, 2.5; but a value :g would round to a class is shown whole
            shown = shown if float(shown) == label else repr(label)
            return f"is {shown}; a class index is an integer from 0 to {width - 1}"
        return None

    def label_array(self, labels: Sequence[LabelValue]) -> np.ndarray:
        return np.array(labels, dtype=np.float32)

    def label_tensor(self, labels: np.ndarray | torch.Tensor, count: int) -> torch.Tensor:
        return torch.as_tensor(labels).reshape(-1).long()

    def errors(self, records: Sequence[PredictionRecord]) -> np.ndarray:
        labels = self.record_labels(records)
        predictions = np.array([r.prediction for r in records], dtype=np.float32)
        return (predictions != labels).astype(np.float64)

    def output_errors(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return (np.asarray(outputs).argmax(1) != labels).astype(np.float64)

    def bounded_losses(self, outputs: np.ndarray, labels: np.ndarray, scale: float
                       ) -> np.ndarray:
        # the error accuracy counts, not 1 − p_y: a candidate whose corrections spread
        # probability (the error memory's) can be right more often with a larger 1 − p_y
        predicted = np.asarray(outputs, dtype=np.float64).argmax(axis=1)
        return (predicted != labels.astype(np.int64)).astype(np.float64)

    def scores(self, records: Sequence[PredictionRecord], score: str) -> np.ndarray:
        probs = np.stack([r.outputs for r in records]).astype(np.float64)
        probs = probs / probs.sum(1, keepdims=True)  # float32 rounding: sums within 1e-6
        labels = self.record_labels(records).astype(np.int64)
        fn = lac_scores if score == "lac" else aps_scores
        return np.asarray(fn(probs, labels), dtype=np.float64)

    def targets(self, labels: torch.Tensor, width: int) -> torch.Tensor:
        labels = torch.as_tensor(labels).detach()
        if labels.ndim != 1:  # label distributions, checked by the caller
            return labels.to("cpu", torch.float32)
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise ValueError("classification labels (n,) must be integer class indices")
        labels = labels.to("cpu", torch.long)
        if len(labels) and (labels.min() < 0 or labels.max() >= width):
            raise ValueError(f"labels must lie in 0..{width - 1}")
        return F.one_hot(labels, width).to(torch.float32)

    def settle(self, corrected: torch.Tensor) -> torch.Tensor:
        corrected = corrected.clamp(0.0, 1.0)
        return corrected / corrected.sum(1, keepdim=True)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, name: str,
             huber_delta: float = 1.0) -> torch.Tensor:
        if labels.shape != (len(outputs),):
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected "
                             f"({len(outputs)},) class indices")
        return F.cross_entropy(outputs, labels.long())


class Regression(Task):
    name = "regression"
    discrete = False
    signal = "residual"
    scores_known = ("residual",)
    losses = ("mse", "huber")
    size_name = "mean_width"

    def served(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs[:, 0]

    def prediction(self, row: np.ndarray, predicted: float) -> float | list[float]:
        values = row.tolist()
        return values[0] if len(values) == 1 else values

    def calibrated(self, outputs: np.ndarray, threshold: float | np.ndarray, score: str
                   ) -> tuple[None, list, list[float]]:
        q = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(outputs),))
        if outputs.shape[1] == 1:
            intervals: list = [[float(v - h), float(v + h)]
                               for v, h in zip(outputs[:, 0], q, strict=True)]
        else:
            intervals = [[[float(v - h), float(v + h)] for v in row]
                         for row, h in zip(outputs, q, strict=True)]
        return None, intervals, [2.0 * float(h) for h in q]

    def label_problem(self, label: LabelValue, width: int) -> str | None:
        values = label if isinstance(label, list) else [label]
        if not isinstance(label, list) and width > 1:
            return f"is one number; this model predicts {width} values per sample: send a list"
        if len(values) != width:
            return f"has {len(values)} values; this model predicts {width} per sample"
        if not all(math.isfinite(v) for v in values):
            return "holds a value that is not finite"
        return None

    def label_array(self, labels: Sequence[LabelValue]) -> np.ndarray:
        return np.array([np.atleast_1d(label) for label in labels], dtype=np.float32)

    def label_tensor(self, labels: np.ndarray | torch.Tensor, count: int) -> torch.Tensor:
        return torch.as_tensor(labels).reshape(count, -1).float()

    def errors(self, records: Sequence[PredictionRecord]) -> np.ndarray:
        served = np.stack([r.outputs for r in records]).astype(np.float64)
        return self.output_errors(served, self.record_labels(records))

    def output_errors(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        values = np.asarray(outputs, np.float64)
        return np.abs(labels.astype(np.float64).reshape(values.shape) - values).mean(axis=1)

    def bounded_losses(self, outputs: np.ndarray, labels: np.ndarray, scale: float
                       ) -> np.ndarray:
        errors = self.output_errors(outputs, labels)
        return errors / (errors + max(scale, 1e-12))

    def scores(self, records: Sequence[PredictionRecord], score: str) -> np.ndarray:
        # the largest residual over the outputs, so one sample's intervals cover all of them
        served = np.stack([r.outputs for r in records]).astype(np.float64)
        return np.abs(self.record_labels(records).astype(np.float64) - served).max(axis=1)

    def targets(self, labels: torch.Tensor, width: int) -> torch.Tensor:
        labels = torch.as_tensor(labels).detach().to("cpu", torch.float32)
        return labels[:, None] if labels.ndim == 1 and width == 1 else labels

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, name: str,
             huber_delta: float = 1.0) -> torch.Tensor:
        labels = labels.to(outputs.dtype)
        if labels.numel() != outputs.numel() or len(labels) != len(outputs):
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected the outputs' "
                             f"{tuple(outputs.shape)}")
        labels = labels.reshape(outputs.shape)
        if name == "huber":
            return F.huber_loss(outputs, labels, delta=huber_delta)
        return F.mse_loss(outputs, labels)


def joined_label(record: PredictionRecord) -> LabelValue:
    """A joined record's label (a record is joined exactly when it has one)."""
    if record.label is None:
        raise ValueError(f"prediction {record.id!r} has no label: it was not joined")
    return record.label


TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Regression())}


def task_named(task: str | Task) -> Task:
    """The task called `task` (a `Task` passes through)."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}") from None
