"""AdaNPC: a non-parametric classifier over a memory of features (Zhang et al., ICML 2023).

"AdaNPC: Exploring Non-Parametric Classifier for Test-Time Adaptation", Yi-Fan Zhang, Xue Wang,
Kexin Jin, Kun Yuan, Zhang Zhang, Liang Wang, Rong Jin, Tieniu Tan. Reference: yfzhang114/AdaNPC
(`domainbed/knn.py`, `domainbed/adapt_algorithms.py`).

The memory holds L2-normalised features m_j with labels y_j, seeded with the training data's
features and true labels. A test feature z is classified by its k nearest neighbours in cosine
similarity:

    s_j = <z / |z|, m_j>                        over the memory, j = 1..M
    N_k(z) = the k largest s_j                   (k is capped at M)
    w_j = exp(s_j / tau) / sum_{i in N_k} exp(s_i / tau)        for j in N_k(z)
    p_c(z) = sum_{j in N_k, y_j = c} w_j                        the vote; sum_c p_c = 1

and a test sample whose confidence max_c p_c(z) reaches the threshold beta joins the memory with its
predicted label argmax_c p_c(z), so the memory follows the test distribution.

Reference defaults: k = 100, tau = 0.1, beta = 0.1 (the hyper-parameters the adaptation script
starts from; its grid is k in 1..200, tau in 0.01..0.5, beta in {0, 0.25, 0.75, 1.1}). The vote is
computed with the memory as it was before the batch; the batch's confident samples are added after.

Deliberate deviations, for a service:

* Confidence is the max of the vote itself. The reference thresholds ``softmax(p).max()``, a softmax
  over a probability vector, which lies in [1/C, e / (e + C - 1)] (at most 0.23 for 10 classes), so
  its beta means something different for every class count. Both readings admit every sample when
  beta <= 1/C, which is the case for the reference default beta = 0.1 with up to 10 classes.
* The memory is bounded. The reference concatenates every confident sample forever; here the rows
  added at test time are capped at `capacity`, oldest out, either per class (``per_class_fifo``,
  ``capacity // num_classes`` slots per class, so a class the stream rarely predicts keeps its rows)
  or globally (``fifo``).
* The seed rows are kept apart from the bound (``keep_seed=True``): a long stream can never wash
  out the training data, and `reset` returns to exactly the seed. With ``keep_seed=False`` the seed
  rows count against `capacity` like any other row and, being the oldest, leave first.
* The vote sums to exactly 1; the reference adds 1e-5 to every class and clamps at 1.
* The reference starts its memory with one random row (label 0) that is never removed; here the
  memory holds only what was seeded or observed.

Persistence: the rows added at test time are what replicas share. `rows(since=...)` packs them as
float32 ``[feature..., label]`` rows for `Store.append_memory` (under the name `AdaNPC.name`, capped
at `capacity`), and `load_rows` puts rows read back by `Store.load_memory` into a seeded memory. The
store keeps the newest `capacity` rows of all classes together, so under ``per_class_fifo`` a reload
can miss a rarely predicted class's rows that are older than that window; ``fifo`` reloads exactly.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from adapters.memory.knn import checked_features, cosine_top_k

POLICIES = ("per_class_fifo", "fifo")

# a label is stored as a float32 next to the features; float32 holds integers exactly up to 2**24
MAX_PACKED_CLASSES = 2**24


class AdaNPC:
    """A k-nearest-neighbour vote over a bounded memory of features, after a test-time adapter.

    It does not own a model: the engine hands it the features entering the model's last linear
    layer (after the adapter has run), takes its vote as the prediction, and lets it `observe` the
    confident ones.

    Parameters
    ----------
    num_classes
        The number of classes; labels are 0 .. num_classes - 1.
    feature_dim
        The width of the features (the input width of the last linear layer).
    k
        How many nearest neighbours vote; capped at the memory size.
    temperature
        tau in softmax(similarity / tau) over the k neighbours; smaller trusts the nearest more.
    confidence_threshold
        beta: a sample whose max vote reaches it joins the memory with its predicted label. A max
        vote is at least 1/C, so the reference default 0.1 admits every sample when C <= 10.
    capacity
        The most rows kept from the test stream (and from the seed when `keep_seed` is False).
    policy
        ``"per_class_fifo"``: ``capacity // num_classes`` rows per predicted class, oldest out;
        ``"fifo"``: the newest `capacity` rows whatever their class.
    keep_seed
        Keep the seed rows outside the bound (True), or let the stream replace them (False).

    Examples
    --------
    >>> import torch
    >>> npc = AdaNPC(num_classes=2, feature_dim=2, k=2, temperature=0.1, confidence_threshold=0.9)
    >>> npc.seed(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    >>> scores = npc.vote(torch.tensor([[3.0, 0.5], [0.2, 0.2]]))
    >>> scores.sum(1)
    tensor([1., 1.])
    >>> scores.argmax(1)
    tensor([0, 0])
    >>> npc.observe(torch.tensor([[3.0, 0.5], [0.2, 0.2]]), scores)  # only the confident first
    1
    >>> len(npc), npc.seed_size, npc.rows().shape
    (3, 2, (1, 3))
    >>> npc.reset(); len(npc)
    2

    References
    ----------
    Zhang et al., "AdaNPC: Exploring Non-Parametric Classifier for Test-Time Adaptation", ICML 2023.
    """

    name: ClassVar[str] = "adanpc"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        k: int = 100,
        temperature: float = 0.1,
        confidence_threshold: float = 0.1,
        capacity: int = 10_000,
        policy: str = "per_class_fifo",
        keep_seed: bool = True,
    ) -> None:
        if not 2 <= num_classes <= MAX_PACKED_CLASSES:
            raise ValueError(f"num_classes must be 2 to {MAX_PACKED_CLASSES}, got {num_classes}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be at least 1, got {feature_dim}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if policy not in POLICIES:
            known = ", ".join(POLICIES)
            raise ValueError(f"unknown memory policy {policy!r}; choose one of: {known}")
        if capacity < 1 or (policy == "per_class_fifo" and capacity < num_classes):
            raise ValueError(
                f"capacity {capacity} leaves no room: per_class_fifo needs at least one slot per "
                f"class (capacity >= num_classes = {num_classes}), fifo at least 1"
            )
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.k = k
        self.temperature = float(temperature)
        self.confidence_threshold = float(confidence_threshold)
        self.capacity = capacity
        self.policy = policy
        self.keep_seed = keep_seed
        self.slots_per_class = capacity // num_classes
        self._seed_features = torch.empty(0, feature_dim)
        self._seed_labels = torch.empty(0, dtype=torch.long)
        # the live memory, oldest first; `sequence` numbers the rows added at test time in the
        # order they were accepted (-1 for seed rows), so `rows(since=...)` finds a batch's rows
        self._features = torch.empty(0, feature_dim)
        self._labels = torch.empty(0, dtype=torch.long)
        self._sequence = torch.empty(0, dtype=torch.long)
        # every row ever accepted at test time; never goes back, so sequence numbers stay unique
        self.observed = 0

    def __len__(self) -> int:
        return self._labels.shape[0]

    def describe(self) -> dict[str, object]:
        """The vote's and the admission's knobs, and how many rows the memory holds."""
        return {"k": self.k, "temperature": self.temperature,
                "confidence_threshold": self.confidence_threshold, "capacity": self.capacity,
                "policy": self.policy, "rows": len(self)}

    @property
    def seed_size(self) -> int:
        """How many seed rows the memory holds now (all of them unless `keep_seed` is False)."""
        return int((self._sequence < 0).sum())

    def class_counts(self) -> list[int]:
        """Rows per label in the live memory, seed included (for `/v1/state` and metrics)."""
        return torch.bincount(self._labels, minlength=self.num_classes).tolist()

    @torch.no_grad()
    def seed(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Start the memory from training features and their true labels, replacing any memory."""
        features = self._normalised(features)
        labels = self._checked_labels(labels, len(features))
        self._seed_features, self._seed_labels = features, labels
        self.reset()

    @torch.no_grad()
    def vote(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores (N, C), rows summing to 1: softmax(sim / tau) over top-k, summed per label.

        One matmul against the memory and one top-k for the whole batch.
        """
        if len(self) == 0:
            raise RuntimeError(
                "the AdaNPC memory is empty: seed it with training features (seed) or load rows "
                "(load_rows) before voting"
            )
        queries = self._normalised(features)
        weights, top_index = cosine_top_k(queries, self._features, self.k, self.temperature)
        scores = torch.zeros(len(queries), self.num_classes)
        return scores.scatter_add_(1, self._labels[top_index], weights)

    @torch.no_grad()
    def observe(self, features: torch.Tensor, scores: torch.Tensor) -> int:
        """Add the samples whose max score reaches beta, labelled argmax(scores); returns how many.

        `scores` are the vote this memory returned for these features (the reference thresholds its
        own vote); the model's softmax may be passed instead to gate on the model's confidence. The
        bound is applied afterwards, so a batch with more rows of one class than its slots keeps
        only its newest ones.
        """
        features = self._normalised(features)
        if scores.shape != (len(features), self.num_classes):
            raise ValueError(
                f"scores have shape {tuple(scores.shape)}; expected "
                f"({len(features)}, {self.num_classes}), one row of class scores per feature row"
            )
        confidence, predicted = scores.detach().cpu().max(dim=1)
        confident = confidence >= self.confidence_threshold  # >= as in the reference
        self._append(features[confident], predicted[confident])
        return int(confident.sum())

    def reset(self) -> None:
        """Back to the seed: every row added at test time is dropped (the store keeps its own)."""
        self._features = self._seed_features.clone()
        self._labels = self._seed_labels.clone()
        self._sequence = torch.full((len(self._seed_labels),), -1, dtype=torch.long)
        self._trim()

    def trim(self, keep_recent: int) -> None:
        """Keep the seed and only the newest `keep_recent` rows added at test time (a drift
        policy's refresh: older rows hold the old concept)."""
        if keep_recent < 0:
            raise ValueError(f"keep_recent must be >= 0, got {keep_recent}")
        rows = self.rows()
        if len(rows) > keep_recent:
            self.load_rows(rows[len(rows) - keep_recent:])

    def rows(self, since: int = 0) -> np.ndarray:
        """The live rows added at test time, oldest first, as float32 ``[feature..., label]``.

        ``since`` skips rows accepted before that count: ``before = npc.observed``, then after
        `observe`, ``npc.rows(since=before)`` is what the batch added (what to append to a store).
        """
        added = self._sequence >= max(since, 0)
        packed = torch.cat([self._features[added], self._labels[added][:, None].float()], dim=1)
        return packed.numpy().astype(np.float32, copy=False)

    @torch.no_grad()
    def load_rows(self, rows: np.ndarray) -> None:
        """Replace the rows added at test time with packed rows (from `rows` or a store), in order.

        The seed stays; the bound is applied to the loaded rows as if they had been observed now.
        """
        rows = np.asarray(rows, dtype=np.float32)
        if rows.size == 0:
            rows = rows.reshape(0, self.feature_dim + 1)
        if rows.ndim != 2 or rows.shape[1] != self.feature_dim + 1:
            raise ValueError(
                f"memory rows have shape {rows.shape}; expected (n, {self.feature_dim + 1}): "
                f"{self.feature_dim} features and a label per row"
            )
        packed = torch.from_numpy(rows.copy())
        labels = packed[:, -1]
        if not torch.equal(labels, labels.round()):
            raise ValueError("the last column of memory rows must hold integer class labels")
        features = self._checked_features(packed[:, :-1])
        # rows packed by `rows` are unit already: normalising them again would move their last bits
        off_unit = ((features.norm(dim=1) - 1).abs() > 1e-5)[:, None]
        features = torch.where(off_unit, F.normalize(features, dim=1), features)
        labels = self._checked_labels(labels.long(), len(features))
        self.reset()
        self._append(features, labels)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live memory (features float32, labels int64, sequence int64), the seed, the count."""
        return {
            "features": self._features.clone(),
            "labels": self._labels.clone(),
            "sequence": self._sequence.clone(),
            "seed_features": self._seed_features.clone(),
            "seed_labels": self._seed_labels.clone(),
            "observed": torch.tensor(self.observed, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        features = self._checked_features(state["features"])
        seed_features = self._checked_features(state["seed_features"])
        labels = self._checked_labels(state["labels"], len(features))
        seed_labels = self._checked_labels(state["seed_labels"], len(seed_features))
        sequence = state["sequence"].to(torch.long)
        if sequence.shape != labels.shape:
            raise ValueError(f"sequence has shape {tuple(sequence.shape)}, labels {len(labels)}")
        self._features, self._labels, self._sequence = features.clone(), labels, sequence.clone()
        self._seed_features, self._seed_labels = seed_features.clone(), seed_labels
        self.observed = int(state["observed"])
        self._trim()  # a checkpoint from a larger memory fits this one's bound

    def _append(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        added = len(labels)
        if added == 0:
            return
        sequence = torch.arange(self.observed, self.observed + added)
        self.observed += added
        self._features = torch.cat([self._features, features])
        self._labels = torch.cat([self._labels, labels.to(torch.long)])
        self._sequence = torch.cat([self._sequence, sequence])
        self._trim()

    def _trim(self) -> None:
        """Drop the oldest bounded rows beyond the policy's budget, keeping the rest in order."""
        if self.keep_seed:
            bounded = self._sequence >= 0
        else:
            bounded = torch.ones_like(self._sequence, dtype=torch.bool)
        positions = bounded.nonzero().squeeze(1)  # oldest first
        if len(positions) == 0:
            return
        if self.policy == "fifo":
            drop = positions[: max(0, len(positions) - self.capacity)]
        else:
            labels = self._labels[positions]
            counts = torch.bincount(labels, minlength=self.num_classes)
            if int(counts.max()) <= self.slots_per_class:
                return
            # a stable sort groups the rows by class and keeps them oldest first within a class
            by_class = torch.sort(labels, stable=True).indices
            sorted_labels = labels[by_class]
            class_start = torch.cumsum(counts, 0) - counts
            age_rank = torch.arange(len(positions)) - class_start[sorted_labels]  # 0 = oldest
            too_old = age_rank < counts[sorted_labels] - self.slots_per_class
            drop = positions[by_class[too_old]]
        if len(drop) == 0:
            return
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[drop] = False
        self._features = self._features[keep]
        self._labels = self._labels[keep]
        self._sequence = self._sequence[keep]

    def _checked_features(self, features: torch.Tensor) -> torch.Tensor:
        return checked_features(features, self.feature_dim)

    def _normalised(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._checked_features(features), dim=1)

    def _checked_labels(self, labels: torch.Tensor, count: int) -> torch.Tensor:
        labels = torch.as_tensor(labels).detach().to("cpu", torch.long)
        if labels.shape != (count,):
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected ({count},)")
        if count and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        return labels
