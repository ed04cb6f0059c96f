"""ReLoop2: an error memory that compensates a frozen model's outputs (Zhu et al., KDD 2023).

"ReLoop2: Building Self-Adaptive Recommendation Models via Responsive Error Compensation Loop",
Jieming Zhu, Guohao Cai, Junjie Huang, Zhenhua Dong, Ruiming Tang, Weinan Zhang (arXiv 2306.08808).
No official code exists; this follows the paper's equations.

The memory holds recent labelled samples: key h_i = the model's feature vector at prediction time
(minus an optional `feature_mean`, then L2-normalised), values y_i (the true label) and ŷ_i (what
the model predicted). For a query h with model output ŷ:

    s_i = <h / |h|, h_i>                             cosine similarity over the memory
    N_K(h) = the K largest s_i                       (K is capped at the memory size)
    a_i = exp(s_i / tau) / sum_{j in N_K} exp(s_j / tau)          for i in N_K(h)
    ȳ = sum_i a_i y_i            ȳ_base = sum_i a_i ŷ_i
    y_err = gamma (ȳ - ŷ) + (1 - gamma) (ȳ - ȳ_base)
    output = ŷ + lambda y_err

gamma = 1 trusts the neighbours' labels against this sample's own prediction; gamma = 0 only
transfers the neighbours' mean error (ȳ - ȳ_base). Reference values: gamma = 1, K 70 to 180,
lambda 0.4 to 0.9, tau about 0.1. Defaults here: gamma 1, K 100, lambda 0.5, tau 0.1.

One code path serves both tasks (the `task` flag only changes how labels are read and the final
clamp). For classification y is the one-hot label (or a soft label) and ŷ the class probabilities;
the output is clamped to [0, 1] entry by entry and then divided by its row sum. Since every ŷ, ȳ
and ȳ_base sums to 1, the unclamped output sums to 1 too, so at least one entry is positive and
the row sum after clamping is never 0; when no entry leaves [0, 1] the division changes nothing
beyond rounding. For regression y and ŷ are the values and the output is not clamped.

The memory is bounded: the newest `capacity` rows, oldest out (FIFO). `trim(keep_recent)` keeps
only the newest rows (a drift policy's refresh), `reset()` empties it (a new base model). With an
empty memory the outputs pass through unchanged.

`HashedErrorMemory` is the paper's fast approximate form: random-projection (SimHash) buckets with
running sums per bucket instead of an exact top-K; see its docstring for the estimator.

Persistence: `rows(since=...)` packs float32 rows ``[features..., y..., ŷ...]`` (features unit
length) for `Store.append_memory` under the name `ErrorMemory.name`, and `load_rows` replaces the
memory with rows read back by `Store.load_memory`; both kinds share the format.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from adapters.memory.knn import checked_features, cosine_top_k
from adapters.task import Task, task_named

KINDS = ("exact", "hashed")
# tolerance on predicted probabilities: a softmax in float32 sums to 1 within ~1e-6
PROBABILITY_TOLERANCE = 1e-3


class _ErrorMemory:
    """The newest `capacity` labelled rows (key, y, ŷ) in a ring buffer, shared by both memories.

    Storage grows as rows arrive, up to `capacity` rows and never beyond. Invariant: either the
    buffer is full (every slot holds a row, `_head` is the oldest) or the rows fill slots
    ``[0, size)`` in order and ``_head == size``; so the live keys are always ``keys[:size]``.
    """

    name: ClassVar[str] = "error_memory"
    kind: ClassVar[str] = ""  # exact or hashed

    def __init__(self, feature_dim: int, output_dim: int, task: str | Task, gamma: float,
                 compensation_weight: float, capacity: int,
                 feature_mean: torch.Tensor | None) -> None:
        task = task_named(task)
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be at least 1, got {feature_dim}")
        if output_dim < 1 or (task.discrete and output_dim < 2):
            raise ValueError(
                f"output_dim must be the number of classes (>= 2) for classification or the "
                f"number of predicted values (>= 1) for regression, got {output_dim}"
            )
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 row, got {capacity}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if not compensation_weight >= 0.0:
            raise ValueError(
                f"compensation_weight (lambda) must be >= 0, got {compensation_weight}")
        self.feature_dim = feature_dim
        self.output_dim = output_dim
        self.task = task
        self.gamma = float(gamma)
        self.compensation_weight = float(compensation_weight)
        self.capacity = capacity
        self.feature_mean = None
        if feature_mean is not None:
            self.feature_mean = self._checked_features(torch.as_tensor(feature_mean)[None])[0]
        # every row ever added; never goes back, so sequence numbers stay unique
        self.observed = 0
        self._clear()

    def __len__(self) -> int:
        return self._size

    def describe(self) -> dict[str, object]:
        """The memory's kind and knobs, and how many rows it holds."""
        return {"kind": self.kind, "gamma": self.gamma, "weight": self.compensation_weight,
                "capacity": self.capacity, "centred": self.feature_mean is not None,
                "rows": self._size, **self._knobs()}

    def _knobs(self) -> dict[str, object]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage held: bounded by `capacity` rows (and the hash tables)."""
        return sum(t.element_size() * t.nelement() for t in self._tensors())

    # --- the loop: add labelled rows, compensate new predictions ----------------------------

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor,
            predictions: torch.Tensor) -> None:
        """Store labelled samples: the features and prediction the model gave, and the true label.

        Classification labels are class indices (n,) or label distributions (n, C); predictions
        are class probabilities (n, C). Regression labels and predictions are (n,) or (n, D).
        """
        keys = self._normalised(features)
        targets = self._checked_labels(labels, len(keys))
        predicted = self._checked_predictions(predictions, len(keys))
        sequence = torch.arange(self.observed, self.observed + len(keys))
        self.observed += len(keys)
        self._write(keys, targets, predicted, sequence)

    @torch.no_grad()
    def compensate(self, features: torch.Tensor, predictions: torch.Tensor,
                   scale: float = 1.0) -> torch.Tensor:
        """ŷ + scale · lambda y_err, clamped and renormalised for probabilities; ŷ when the memory
        is empty. `scale` (in [0, 1]) damps the correction for this batch alone.

        Returns a tensor of the predictions' shape, dtype and device.
        """
        predictions = torch.as_tensor(predictions)
        predicted = self._checked_predictions(predictions, None)
        if self._size == 0:  # nothing learned yet: pass through, without renormalising's rounding
            if len(self._checked_features(features)) != len(predicted):
                raise ValueError(f"{len(features)} feature rows for {len(predicted)} predictions")
            return predictions.clone()
        weight = self.compensation_weight * scale
        corrected = predicted + weight * self._error(features, predicted)
        corrected = self.task.settle(corrected)
        return corrected.reshape(predictions.shape).to(predictions.dtype).to(predictions.device)

    @torch.no_grad()
    def error_estimate(self, features: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        """y_err = gamma (ȳ - ŷ) + (1 - gamma)(ȳ - ȳ_base), (n, output_dim); zeros when empty."""
        return self._error(features, self._checked_predictions(predictions, None))

    # --- memory management ------------------------------------------------------------------

    def trim(self, keep_recent: int) -> None:
        """Keep only the newest `keep_recent` rows (0 empties the memory)."""
        if keep_recent < 0:
            raise ValueError(f"keep_recent must be >= 0, got {keep_recent}")
        if keep_recent < self._size:
            start = self._size - keep_recent
            self._replace(*(rows[start:] for rows in self._ordered()))

    def reset(self) -> None:
        """Empty the memory (the base model changed, so its stored errors no longer apply)."""
        self._clear()

    def rows(self, since: int = 0) -> np.ndarray:
        """Live rows, oldest first, as float32 ``[features..., y..., ŷ...]``.

        ``since`` skips rows added before that count: ``before = memory.observed``, then after
        `add`, ``memory.rows(since=before)`` is what to append to a store.
        """
        keys, targets, predicted, sequence = self._ordered()
        added = sequence >= max(since, 0)
        packed = torch.cat([keys[added], targets[added], predicted[added]], dim=1)
        return packed.numpy().astype(np.float32, copy=False)

    @torch.no_grad()
    def pack(self, features: torch.Tensor, labels: torch.Tensor,
             predictions: torch.Tensor) -> np.ndarray:
        """The rows `add` would store, packed as `rows` gives them, without storing them.

        It reads only the memory's configuration, so any thread may call it while another uses
        the memory: the label path packs rows for the store, then `add_rows` them on the engine.
        """
        keys = self._normalised(features)
        targets = self._checked_labels(labels, len(keys))
        predicted = self._checked_predictions(predictions, len(keys))
        return torch.cat([keys, targets, predicted], dim=1).numpy().astype(np.float32, copy=False)

    @torch.no_grad()
    def add_rows(self, rows: np.ndarray) -> None:
        """Append packed rows (from `pack`, `rows` or a store), oldest first, as `add` would."""
        keys, targets, predicted = self._unpack(rows)
        sequence = torch.arange(self.observed, self.observed + len(keys))
        self.observed += len(keys)
        self._write(keys, targets, predicted, sequence)

    @torch.no_grad()
    def load_rows(self, rows: np.ndarray) -> None:
        """Replace the memory with packed rows (from `rows` or a store), oldest first.

        The bound applies: of more than `capacity` rows only the newest are kept.
        """
        keys, targets, predicted = self._unpack(rows)
        sequence = torch.arange(self.observed, self.observed + len(keys))
        self.observed += len(keys)
        self._clear()
        self._write(keys, targets, predicted, sequence)

    def _unpack(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = self.feature_dim + 2 * self.output_dim
        rows = np.asarray(rows, dtype=np.float32)
        if rows.size == 0:
            rows = rows.reshape(0, width)
        if rows.ndim != 2 or rows.shape[1] != width:
            raise ValueError(
                f"error memory rows have shape {rows.shape}; expected (n, {width}): "
                f"{self.feature_dim} features, then {self.output_dim} label and "
                f"{self.output_dim} prediction values per row"
            )
        packed = torch.from_numpy(rows.copy())
        features = packed[:, :self.feature_dim]
        targets = packed[:, self.feature_dim:self.feature_dim + self.output_dim]
        predicted = packed[:, self.feature_dim + self.output_dim:]
        features = self._checked_features(features)
        # rows packed by `rows` are unit already: normalising them again would move their last bits
        off_unit = ((features.norm(dim=1) - 1).abs() > 1e-5)[:, None]
        keys = torch.where(off_unit, F.normalize(features, dim=1), features)
        targets = self._checked_labels(targets, len(keys))
        predicted = self._checked_predictions(predicted, len(keys))
        return keys, targets, predicted

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rows oldest first (keys, labels, predictions, sequence) and the observed count."""
        keys, targets, predicted, sequence = self._ordered()
        return {
            "keys": keys.clone(),
            "labels": targets.clone(),
            "predictions": predicted.clone(),
            "sequence": sequence.clone(),
            "observed": torch.tensor(self.observed, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        keys = self._checked_features(state["keys"])
        count = len(keys)
        targets = torch.as_tensor(state["labels"]).to("cpu", torch.float32)
        predicted = torch.as_tensor(state["predictions"]).to("cpu", torch.float32)
        sequence = torch.as_tensor(state["sequence"]).to("cpu", torch.long)
        for name, value in (("labels", targets), ("predictions", predicted)):
            if value.shape != (count, self.output_dim):
                raise ValueError(f"{name} have shape {tuple(value.shape)}; expected "
                                 f"({count}, {self.output_dim})")
        if sequence.shape != (count,):
            raise ValueError(f"sequence has shape {tuple(sequence.shape)}; expected ({count},)")
        keep = min(count, self.capacity)  # a checkpoint from a larger memory fits this bound
        self._clear()
        self._replace(keys[count - keep:], targets[count - keep:], predicted[count - keep:],
                      sequence[count - keep:])
        self.observed = int(state["observed"])

    # --- the estimator, which each memory defines -------------------------------------------

    def _neighbour_means(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
        """(ȳ, ȳ_base, found): weighted means of the stored y and ŷ near each key, and a mask of
        the queries that found any row."""
        raise NotImplementedError

    def _error(self, features: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        keys = self._normalised(features)
        if len(keys) != len(predicted):
            raise ValueError(f"{len(keys)} feature rows for {len(predicted)} predictions")
        if self._size == 0:
            return torch.zeros_like(predicted)
        label_mean, base_mean, found = self._neighbour_means(keys)
        error = (self.gamma * (label_mean - predicted)
                 + (1.0 - self.gamma) * (label_mean - base_mean))
        return torch.where(found[:, None], error, torch.zeros_like(error))

    # --- the ring buffer --------------------------------------------------------------------

    def _clear(self) -> None:
        self._keys = torch.empty(0, self.feature_dim)
        self._targets = torch.empty(0, self.output_dim)
        self._predicted = torch.empty(0, self.output_dim)
        self._sequence = torch.empty(0, dtype=torch.long)
        self._size = 0
        self._head = 0

    def _tensors(self) -> list[torch.Tensor]:
        return [self._keys, self._targets, self._predicted, self._sequence]

    def _ordered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        order = (self._head - self._size + torch.arange(self._size)) % self.capacity
        return (self._keys[order], self._targets[order], self._predicted[order],
                self._sequence[order])

    def _grow(self, rows: int) -> None:
        """Make room for `rows` slots (at most `capacity`), doubling to amortise the copies."""
        allocated = len(self._sequence)
        if rows <= allocated:
            return
        rows = min(self.capacity, max(rows, 2 * allocated))
        extra = rows - allocated
        self._keys = torch.cat([self._keys, torch.zeros(extra, self.feature_dim)])
        self._targets = torch.cat([self._targets, torch.zeros(extra, self.output_dim)])
        self._predicted = torch.cat([self._predicted, torch.zeros(extra, self.output_dim)])
        self._sequence = torch.cat([self._sequence, torch.full((extra,), -1, dtype=torch.long)])

    def _write(self, keys: torch.Tensor, targets: torch.Tensor, predicted: torch.Tensor,
               sequence: torch.Tensor) -> None:
        """Append rows, oldest out; only the newest `capacity` of a large batch are kept."""
        if len(keys) > self.capacity:
            keys, targets = keys[-self.capacity:], targets[-self.capacity:]
            predicted, sequence = predicted[-self.capacity:], sequence[-self.capacity:]
        added = len(keys)
        if added == 0:
            return
        self._grow(min(self.capacity, self._size + added))
        slots = (self._head + torch.arange(added)) % self.capacity
        evicted = slots[slots < self._size]  # slots holding a live row, all of them the oldest
        self._evict(evicted)
        self._keys[slots] = keys
        self._targets[slots] = targets
        self._predicted[slots] = predicted
        self._sequence[slots] = sequence
        self._admit(slots)
        self._head = (self._head + added) % self.capacity
        self._size = min(self._size + added, self.capacity)

    def _replace(self, keys: torch.Tensor, targets: torch.Tensor, predicted: torch.Tensor,
                 sequence: torch.Tensor) -> None:
        """Rebuild the buffer from rows given oldest first (at most `capacity` of them)."""
        count = len(keys)
        self._keys, self._targets = keys.contiguous(), targets.contiguous()
        self._predicted, self._sequence = predicted.contiguous(), sequence.contiguous()
        self._size = count
        self._head = count % self.capacity
        self._rebuild()

    def _evict(self, slots: torch.Tensor) -> None:
        """Hook: these live slots are about to be overwritten."""

    def _admit(self, slots: torch.Tensor) -> None:
        """Hook: these slots now hold new rows."""

    def _rebuild(self) -> None:
        """Hook: the buffer was replaced wholesale."""

    # --- checks -----------------------------------------------------------------------------

    def _checked_features(self, features: torch.Tensor) -> torch.Tensor:
        return checked_features(features, self.feature_dim)

    def _normalised(self, features: torch.Tensor) -> torch.Tensor:
        features = self._checked_features(features)
        if self.feature_mean is not None:
            features = features - self.feature_mean
        return F.normalize(features, dim=1)

    def _as_matrix(self, values: torch.Tensor, what: str, count: int | None) -> torch.Tensor:
        values = torch.as_tensor(values).detach().to("cpu", torch.float32)
        if values.ndim == 1 and not self.task.discrete and self.output_dim == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[1] != self.output_dim or (
                count is not None and len(values) != count):
            rows = "n" if count is None else count
            raise ValueError(f"{what} have shape {tuple(values.shape)}; expected "
                             f"({rows}, {self.output_dim})")
        if not torch.isfinite(values).all():
            raise ValueError(f"{what} contain NaN or infinity")
        return values

    def _checked_predictions(self, predictions: torch.Tensor, count: int | None) -> torch.Tensor:
        predicted = self._as_matrix(predictions, "predictions", count)
        if self.task.discrete:
            _check_distributions(predicted, "predictions",
                                 "pass class probabilities (the softmax of the logits)")
        return predicted

    def _checked_labels(self, labels: torch.Tensor, count: int) -> torch.Tensor:
        labels = torch.as_tensor(labels).detach()
        if len(labels) != count:
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected ({count}, ...)")
        targets = self._as_matrix(self.task.targets(labels, self.output_dim), "labels", count)
        if self.task.discrete:
            _check_distributions(targets, "labels", "pass class indices or label distributions")
        return targets


def _check_distributions(values: torch.Tensor, what: str, advice: str) -> None:
    if len(values) == 0:
        return
    in_range = bool(((values >= -PROBABILITY_TOLERANCE) & (values <= 1 + PROBABILITY_TOLERANCE))
                    .all())
    worst = float((values.sum(1) - 1).abs().max())
    if not in_range or worst > PROBABILITY_TOLERANCE:
        raise ValueError(f"{what} are not probability rows (entries in [0, 1] summing to 1; the "
                         f"worst row sum is off by {worst:.3g}): {advice}")


class ErrorMemory(_ErrorMemory):
    """ReLoop2's error memory with exact top-K retrieval: one matmul and one top-k per batch.

    Parameters
    ----------
    feature_dim
        The width of the feature vectors used as keys (e.g. the input of the last linear layer).
    output_dim
        The number of classes (classification) or of predicted values (regression).
    task
        ``"classification"`` (probabilities in, probabilities out) or ``"regression"``.
    k
        K, how many nearest rows form the estimate; capped at the memory size.
    temperature
        tau in softmax(s / tau) over the K similarities.
    gamma
        The weight of the sample-level error (ȳ - ŷ) against the neighbours' error (ȳ - ȳ_base).
    compensation_weight
        lambda, how much of the estimated error is added to the model's output.
    capacity
        The most rows kept; the oldest leave first.
    half_life
        Recency: a row's weight halves with every `half_life` rows added after it (its logit
        s / tau gets −ln 2 · age / half_life), so where the stream drifts the newest similar
        errors count most. For classification a row ages only with the rows of its own label
        added after it: where classes come in runs, a run of one class does not age the other
        classes' rows. None weighs rows by similarity alone, as ReLoop2 does.
    feature_mean
        Subtracted from every feature vector before it is normalised, e.g. the mean feature of
        the training or reference data. Features after a ReLU all lie in one orthant, where the
        common mean direction dominates every cosine; centring spreads them over the sphere and
        sharpens the neighbourhoods (on an MLP's hidden layer it made the hashed memory useful
        at all, SimHash hyperplanes passing through the origin). Memories that share rows must
        share the mean: packed keys are centred and normalised.

    Examples
    --------
    >>> import torch
    >>> memory = ErrorMemory(feature_dim=2, output_dim=2, k=1, compensation_weight=0.5)
    >>> memory.compensate(torch.tensor([[1.0, 0.1]]), torch.tensor([[0.8, 0.2]]))  # empty: as is
    tensor([[0.8000, 0.2000]])
    >>> memory.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0]),
    ...            torch.tensor([[0.9, 0.1], [0.3, 0.7]]))
    >>> memory.compensate(torch.tensor([[1.0, 0.1]]), torch.tensor([[0.8, 0.2]]))
    tensor([[0.4000, 0.6000]])
    >>> len(memory), memory.rows().shape
    (2, (2, 6))
    >>> memory.trim(keep_recent=1); memory.rows()[:, :2]
    array([[0., 1.]], dtype=float32)

    References
    ----------
    Zhu et al., "ReLoop2: Building Self-Adaptive Recommendation Models via Responsive Error
    Compensation Loop", KDD 2023.
    """

    def __init__(
        self,
        feature_dim: int,
        output_dim: int,
        task: str | Task = "classification",
        k: int = 100,
        temperature: float = 0.1,
        gamma: float = 1.0,
        compensation_weight: float = 0.5,
        capacity: int = 10_000,
        feature_mean: torch.Tensor | None = None,
        half_life: float | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if half_life is not None and not half_life > 0:
            raise ValueError(f"half_life must be positive (rows), got {half_life}")
        super().__init__(feature_dim, output_dim, task, gamma, compensation_weight, capacity,
                         feature_mean)
        self.k = k
        self.temperature = float(temperature)
        self.half_life = None if half_life is None else float(half_life)
        self._ages: tuple[tuple[int, int, int], torch.Tensor] | None = None

    kind = "exact"

    def _knobs(self) -> dict[str, object]:
        return {"k": self.k, "temperature": self.temperature, "half_life": self.half_life}

    def _recency(self) -> torch.Tensor | None:
        """Each live row's logit bias, −ln 2 · age / half_life (age: rows added after it; for
        classification, live rows of its own label added after it)."""
        if self.half_life is None:
            return None
        return -math.log(2.0) * self._age() / self.half_life

    def _admit(self, slots: torch.Tensor) -> None:
        self._ages = None

    def _rebuild(self) -> None:
        self._ages = None

    def _age(self) -> torch.Tensor:
        """Each live slot's age in rows, computed once per change of the rows (queries reuse it)."""
        stamp = (self.observed, self._size, self._head)
        if self._ages is not None and self._ages[0] == stamp:
            return self._ages[1]
        sequence = self._sequence[:self._size]
        if not self.task.discrete:
            age = (self.observed - 1 - sequence).to(torch.float32)
        elif self._size == 0:
            age = torch.empty(0, dtype=torch.float32)
        else:
            labels = self._targets[:self._size].argmax(dim=1)
            # slots by label, oldest first within each: a slot's age is how many slots of its
            # label come after it
            since = sequence - sequence.min()  # any checkpoint's numbering
            order = torch.argsort(labels * (int(since.max()) + 1) + since)
            counts = torch.bincount(labels, minlength=self.output_dim)
            starts = torch.cumsum(counts, 0) - counts
            sorted_labels = labels[order]
            place = torch.arange(self._size) - starts[sorted_labels]
            age = torch.empty(self._size, dtype=torch.float32)
            age[order] = (counts[sorted_labels] - 1 - place).to(torch.float32)
        self._ages = (stamp, age)
        return age

    def _neighbour_means(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
        weights, top_index = cosine_top_k(keys, self._keys[:self._size], self.k, self.temperature,
                                          self._recency())
        weights = weights[:, None, :]  # (n, 1, K)
        label_mean = (weights @ self._targets[top_index]).squeeze(1)  # (n, C)
        base_mean = (weights @ self._predicted[top_index]).squeeze(1)
        return label_mean, base_mean, torch.ones(len(keys), dtype=torch.bool)


class HashedErrorMemory(_ErrorMemory):
    """ReLoop2's fast approximate error memory: SimHash buckets holding running sums.

    Each of `tables` hash tables draws `bits` random hyperplanes (Gaussian normals, fixed by
    `seed`); a key's bucket in a table is the sign pattern of its projections, so two keys at angle
    theta share a bucket with probability (1 - theta / pi)^bits. Every bucket keeps running sums
    over the rows in it: count, Σy and Σŷ. The estimate for a query pools the buckets it falls in
    across all tables:

        ȳ = Σ_t Σy[t, b_t(h)] / Σ_t count[t, b_t(h)]
        ȳ_base = Σ_t Σŷ[t, b_t(h)] / Σ_t count[t, b_t(h)]

    that is, a weighted mean over stored rows where a row weighs the number of tables in which it
    collides with the query, a kernel that decreases with the angle as softmax(s / tau) does in
    the exact memory. A query that collides with no row in any table gets no compensation. The
    error and output formulas are the exact memory's.

    Querying costs O(tables * bits * feature_dim) per sample whatever the memory size. The sums
    take ``tables * 2**bits * (1 + 2 * output_dim)`` float64 values. The newest `capacity` rows are
    kept as well (as in `ErrorMemory`), so that the oldest can be subtracted from their buckets
    when they leave (FIFO), and for `trim`, `rows` and `state_dict`; `trim`, `load_rows` and
    `load_state_dict` rebuild the sums from the kept rows.

    Parameters
    ----------
    feature_dim, output_dim, task, gamma, compensation_weight, capacity, feature_mean
        As in `ErrorMemory`; `feature_mean` matters more here, as every hyperplane passes
        through the origin.
    bits
        Hyperplanes per table: more bits make buckets narrower (fewer, closer neighbours).
    tables
        Independent hash tables pooled per query: more tables smooth the estimate.
    seed
        Seeds the hyperplanes, so replicas and restarts hash alike.

    Examples
    --------
    >>> import torch
    >>> memory = HashedErrorMemory(feature_dim=2, output_dim=1, task="regression", bits=4)
    >>> memory.add(torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]),
    ...            torch.tensor([3.0, 5.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]))
    >>> memory.compensate(torch.tensor([[2.0, 0.0]]), torch.tensor([2.0]))  # 2 + 0.5 (4 - 2)
    tensor([3.])
    """

    def __init__(
        self,
        feature_dim: int,
        output_dim: int,
        task: str | Task = "classification",
        bits: int = 8,
        tables: int = 8,
        gamma: float = 1.0,
        compensation_weight: float = 0.5,
        capacity: int = 10_000,
        feature_mean: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        if not 1 <= bits <= 20:
            raise ValueError(f"bits must be 1 to 20 (2**bits buckets per table), got {bits}")
        if tables < 1:
            raise ValueError(f"tables must be at least 1, got {tables}")
        self.bits = bits
        self.tables = tables
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self._hyperplanes = torch.randn(tables * bits, feature_dim, generator=generator)
        self._bit_values = 2 ** torch.arange(bits)
        self._table_offsets = torch.arange(tables) * 2**bits
        super().__init__(feature_dim, output_dim, task, gamma, compensation_weight, capacity,
                         feature_mean)

    kind = "hashed"

    def _knobs(self) -> dict[str, object]:
        return {"bits": self.bits, "tables": self.tables}

    def buckets(self, features: torch.Tensor) -> torch.Tensor:
        """Each row's bucket in every table, (n, tables), as indices into the flat sum tables."""
        features = self._checked_features(features)
        signs = (features @ self._hyperplanes.T > 0).long().view(-1, self.tables, self.bits)
        return (signs * self._bit_values).sum(2) + self._table_offsets

    def _neighbour_means(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
        buckets = self.buckets(keys)  # (n, tables)
        count = self._count[buckets].sum(1)  # (n,)
        found = count > 0
        denominator = count.clamp_min(1.0)[:, None]
        label_mean = self._label_sum[buckets].sum(1) / denominator
        base_mean = self._prediction_sum[buckets].sum(1) / denominator
        return label_mean.float(), base_mean.float(), found

    def _clear(self) -> None:
        super()._clear()
        self._codes = torch.empty(0, self.tables, dtype=torch.long)
        slots = self.tables * 2**self.bits
        self._count = torch.zeros(slots, dtype=torch.float64)
        self._label_sum = torch.zeros(slots, self.output_dim, dtype=torch.float64)
        self._prediction_sum = torch.zeros(slots, self.output_dim, dtype=torch.float64)

    def _tensors(self) -> list[torch.Tensor]:
        return [*super()._tensors(), self._codes, self._count, self._label_sum,
                self._prediction_sum]

    def _grow(self, rows: int) -> None:
        super()._grow(rows)
        extra = len(self._sequence) - len(self._codes)
        if extra > 0:
            self._codes = torch.cat([self._codes, torch.zeros(extra, self.tables,
                                                              dtype=torch.long)])

    def _accumulate(self, slots: torch.Tensor, sign: float) -> None:
        buckets = self._codes[slots].reshape(-1)
        repeat = self.tables
        self._count.index_add_(0, buckets, torch.full((len(buckets),), sign, dtype=torch.float64))
        self._label_sum.index_add_(
            0, buckets, sign * self._targets[slots].double().repeat_interleave(repeat, 0))
        self._prediction_sum.index_add_(
            0, buckets, sign * self._predicted[slots].double().repeat_interleave(repeat, 0))
        if sign < 0:  # an emptied bucket holds exact zeros, not the rounding left by subtraction
            emptied = buckets[self._count[buckets] == 0]
            self._label_sum[emptied] = 0.0
            self._prediction_sum[emptied] = 0.0

    def _evict(self, slots: torch.Tensor) -> None:
        if len(slots):
            self._accumulate(slots, -1.0)

    def _admit(self, slots: torch.Tensor) -> None:
        self._codes[slots] = self.buckets(self._keys[slots])
        self._accumulate(slots, 1.0)

    def _rebuild(self) -> None:
        count = self._size
        self._codes = self.buckets(self._keys) if count else torch.empty(0, self.tables,
                                                                          dtype=torch.long)
        self._count.zero_()
        self._label_sum.zero_()
        self._prediction_sum.zero_()
        if count:
            self._accumulate(torch.arange(count), 1.0)


def build_error_memory(kind: str = "exact", **options: object) -> ErrorMemory | HashedErrorMemory:
    """The error memory of that kind: ``"exact"`` (top-K) or ``"hashed"`` (SimHash sketch).

    >>> build_error_memory("hashed", feature_dim=8, output_dim=3).tables
    8
    """
    memories: dict[str, Callable[..., ErrorMemory | HashedErrorMemory]] = {
        "exact": ErrorMemory, "hashed": HashedErrorMemory}
    try:
        memory_cls = memories[kind]
    except KeyError:
        raise ValueError(f"unknown error memory kind {kind!r}; choose one of: "
                         f"{', '.join(KINDS)}") from None
    accepted = set(inspect.signature(memory_cls).parameters)
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"the {kind} error memory has no option {sorted(unknown)}; it takes "
                         f"{sorted(accepted)}")
    return memory_cls(**options)
