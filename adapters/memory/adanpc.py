"""AdaNPC: a non-parametric classifier over a memory of features (Zhang et al., ICML 2023),
mixed into the model's output only as far as joined labels show it right where the model is wrong.

"AdaNPC: Exploring Non-Parametric Classifier for Test-Time Adaptation", Yi-Fan Zhang, Xue Wang,
Kexin Jin, Kun Yuan, Zhang Zhang, Liang Wang, Rong Jin, Tieniu Tan. Reference: yfzhang114/AdaNPC
(`domainbed/knn.py`, `domainbed/adapt_algorithms.py`).

The memory holds L2-normalised features m_j with labels y_j, seeded with the training data's
features and true labels. A test feature z gets the vote of its k nearest neighbours in cosine
similarity:

    s_j = <z / |z|, m_j>                        over the memory, j = 1..M
    N_k(z) = the k largest s_j                   (k is capped at M)
    w_j = exp(s_j / tau) / sum_{i in N_k} exp(s_i / tau)        for j in N_k(z)
    q_c(z) = sum_{j in N_k, y_j = c} w_j                        the vote; sum_c q_c = 1

What is served (`predict`) is the model's own probabilities p moved towards the vote, by a weight
lambda chosen on joined labels and by the vote's normalised confidence:

    c(v) = (C max_c v_c - 1) / (C - 1)          0 for a uniform vector, 1 for a one-hot one
    out = (1 - lambda c(q)) p + lambda c(q) q   lambda in {0, 1/4, 1/2, 3/4, 1}

lambda starts at 0 (the model's output, unchanged). When a label joins a sample that this memory
served (its p and q are kept, by the features' bytes, for the last `pending` samples), every
candidate lambda is scored on it: e_lambda = 1 if argmax out_lambda != y. Over the newest
`vote_window` such labels (at least `min_labels`), with d_lambda = e_0 - e_lambda per label,

    G_lambda = sum d_lambda,  D_lambda = sum |d_lambda|     (the gain over 0, discordant labels)
    lambda = argmax G_lambda among those with G_lambda >= 2 sqrt(D_lambda) and G_lambda > 0, else 0

a one-sided sign test at two standard deviations: the vote gets weight only where labels show it
right, where the model was wrong, significantly more often than the reverse. Without labels (or
with labels of samples another replica served) lambda stays 0 and what is served is the model's.

Admission. A served sample joins the memory with its served class argmax out as a *pseudo-label*
row when c(out) >= beta (`confidence_threshold`, 0.8 by default; c means the same fraction of the
way from uniform to certain for every class count). A joined label adds its sample with the *true*
label (`learn`). Under ``per_class_fifo`` every class has ``capacity // num_classes`` slots, so a
run of one class fills only its own slots, never the memory; within a class's slots (or the whole
`capacity` under ``fifo``) pseudo-label rows leave before true-label rows, oldest first. The vote is
computed with the memory as it was before the batch; the batch's rows are added after.

Measured on B1 (Digits-C, robust BN, batch 64, 10% of labels 100 samples late): the reference's
rule (the vote replaces the output, beta = 0.1 on the vote) took `bn` from 39.0% to 45.0% error.
A fixed lambda = 0.5 helped `bn` a little (39.0% to 38.3..38.8%) but hurt the source model (71.1%
to 72.5..75.3%, with or without labels): there the model is confidently wrong, and its
pseudo-labels teach the vote the same mistakes. Choosing lambda by the fewest errors on labels,
without the sign test, still cost the source model 0.2 to 0.4 point (a lambda that won on one
corruption was applied to the next); a test at z = 1 cost it 0.2 point. With z = 2 every
X+adanpc measured (X in none, bn; batch 64 and 1; i.i.d. and Dirichlet(0.1) classes; with and
without labels) served the same error as X to 0.01 point: on this stream the vote is not better
than the model often enough to earn weight (docs/adaptation.md). With lambda fixed, beta = 0.5
admitted enough wrong pseudo-labels to cost `bn` 1 point on a Dirichlet(0.1) class order; 0.8 and
0.95 were equal; 0.8 is the default.

Deliberate deviations, for a service:

* The vote does not replace the model's output; it is mixed in only as labels justify (above).
* Confidence is normalised, c(v) above, of what is served. The reference thresholds
  ``softmax(p).max()``, a softmax over a probability vector, which lies in [1/C, e / (e + C - 1)]
  (at most 0.23 for 10 classes), so its beta means something different for every class count, and
  its default beta = 0.1 admits every sample with up to 10 classes.
* Joined labels add true-label rows, which outrank pseudo-label rows when the memory is full.
* The memory is bounded. The reference concatenates every confident sample forever; here the rows
  added at test time are capped at `capacity`, either per class (``per_class_fifo``) or globally
  (``fifo``, where a run of one class can fill it).
* The seed rows are kept apart from the bound (``keep_seed=True``): a long stream can never wash
  out the training data, and `reset` returns to exactly the seed. With ``keep_seed=False`` the seed
  rows (true labels) count against `capacity` and leave after the pseudo-label rows, oldest first.
* The vote sums to exactly 1; the reference adds 1e-5 to every class and clamps at 1.
* The reference starts its memory with one random row (label 0) that is never removed; here the
  memory holds only what was seeded or observed.

Persistence: the rows added at test time are what replicas share. `rows(since=...)` packs them as
float32 ``[feature..., label]`` rows for `Store.append_memory` (under the name `AdaNPC.name`, capped
at `capacity`), a true label y packed as ``-1 - y`` and a pseudo-label as y (rows stored before
true labels were kept are all non-negative and load as pseudo-labels); `load_rows` puts rows read
back by `Store.load_memory` into a seeded memory. The store keeps the newest `capacity` rows of all
classes together, so a reload can miss a class's rows, or true-label rows, older than that window.
The vote's weight and its evidence are not stored: a restart or a `reset` starts again at 0.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from adapters.memory.knn import checked_features, cosine_top_k

POLICIES = ("per_class_fifo", "fifo")

# the weights the vote may get (lambda); the smallest wins ties, so 0 unless labels show better
VOTE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# how many standard deviations of a sign test a weight's gain over 0 must reach to be taken
EVIDENCE_Z = 2.0

# a label is stored as a float32 next to the features; float32 holds integers exactly up to 2**24
MAX_PACKED_CLASSES = 2**24


class AdaNPC:
    """A k-nearest-neighbour vote over a bounded memory of features, after a test-time adapter.

    It does not own a model: the engine hands it the features entering the model's last linear
    layer (after the adapter has run) with the model's probabilities, serves what `predict` makes
    of them, lets it `observe` the confident ones, and hands it joined labels (`learn`).

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
        beta: a sample whose normalised confidence ``(C max p - 1) / (C - 1)`` reaches it joins
        the memory with its predicted class as a pseudo-label.
    capacity
        The most rows kept from the test stream (and from the seed when `keep_seed` is False).
    policy
        ``"per_class_fifo"``: ``capacity // num_classes`` rows per class; ``"fifo"``: `capacity`
        rows whatever their class. Either way pseudo-label rows leave before true-label rows,
        oldest first.
    keep_seed
        Keep the seed rows outside the bound (True), or let them count against it (False).
    vote_window
        The newest joined labels (of samples this memory served) the vote's weight is chosen on.
    min_labels
        Joined labels before the vote may get any weight.
    pending
        Served samples whose probabilities and vote are kept until their label joins.

    Examples
    --------
    >>> import torch
    >>> npc = AdaNPC(num_classes=2, feature_dim=2, k=2, temperature=0.1, confidence_threshold=0.8)
    >>> npc.seed(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    >>> features = torch.tensor([[3.0, 0.5], [0.2, 0.2]])
    >>> npc.vote(features).argmax(1)
    tensor([0, 0])
    >>> model = torch.tensor([[0.95, 0.05], [0.5, 0.5]])
    >>> served = npc.predict(features, model)  # no labels yet: the vote weighs 0
    >>> torch.equal(served, model), npc.vote_weight
    (True, 0.0)
    >>> npc.observe(features, served)  # only the confident first, as a pseudo-label
    1
    >>> npc.learn(features[1:], torch.tensor([1]))  # a joined label, with its true class
    1
    >>> len(npc), npc.seed_size, npc.rows()[:, -1].tolist()  # a true label y is packed as -1 - y
    (4, 2, [0.0, -2.0])
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
        confidence_threshold: float = 0.8,
        capacity: int = 10_000,
        policy: str = "per_class_fifo",
        keep_seed: bool = True,
        vote_window: int = 200,
        min_labels: int = 20,
        pending: int = 8192,
    ) -> None:
        if not 2 <= num_classes <= MAX_PACKED_CLASSES:
            raise ValueError(f"num_classes must be 2 to {MAX_PACKED_CLASSES}, got {num_classes}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be at least 1, got {feature_dim}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must lie in [0, 1], got {confidence_threshold}")
        if vote_window < 1 or min_labels < 1 or pending < 0:
            raise ValueError(f"vote_window ({vote_window}) and min_labels ({min_labels}) must be "
                             f"at least 1, pending ({pending}) at least 0")
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
        self.min_labels = min_labels
        self.pending = pending
        # the vote's weight, chosen on joined labels among VOTE_WEIGHTS; 0 until they show better
        self.vote_weight = 0.0
        # per joined label whose serving this replica remembers: 0/1 errors of every weight
        self._evidence: deque[np.ndarray] = deque(maxlen=vote_window)
        # what `predict` served from, by the features' bytes, until their label joins (or falls out)
        self._served: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.slots_per_class = capacity // num_classes
        self._seed_features = torch.empty(0, feature_dim)
        self._seed_labels = torch.empty(0, dtype=torch.long)
        # the live memory, oldest first; `sequence` numbers the rows added at test time in the
        # order they were accepted (-1 for seed rows), so `rows(since=...)` finds a batch's rows
        self._features = torch.empty(0, feature_dim)
        self._labels = torch.empty(0, dtype=torch.long)
        self._sequence = torch.empty(0, dtype=torch.long)
        # True where the row's label is a true one (the seed's, a joined label's), False where it
        # is a pseudo-label (a confident prediction)
        self._labelled = torch.empty(0, dtype=torch.bool)
        # every row ever accepted at test time; never goes back, so sequence numbers stay unique
        self.observed = 0

    def __len__(self) -> int:
        return self._labels.shape[0]

    def describe(self) -> dict[str, object]:
        """The vote's and the admission's knobs, and how many rows the memory holds."""
        return {"k": self.k, "temperature": self.temperature,
                "confidence_threshold": self.confidence_threshold,
                "vote_weight": self.vote_weight, "capacity": self.capacity,
                "policy": self.policy, "rows": len(self),
                "labelled_rows": int((self._labelled & (self._sequence >= 0)).sum()),
                "vote_evidence": len(self._evidence)}

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
        """The kNN vote q (N, C), rows summing to 1: softmax(sim / tau) over top-k, per label.

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
    def predict(self, features: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        """What is served: the model's probabilities p moved towards the vote q,
        ``(1 - lambda c(q)) p + lambda c(q) q`` with lambda = `vote_weight` (0 until joined labels
        show the vote right significantly more often than the model). The pair (p, q) is kept
        for `learn` to score the weights on, by the features' bytes."""
        features = self._checked_features(features)
        probabilities = self._checked_scores(probabilities, len(features))
        votes = self.vote(features)
        if self.pending:
            for row, p, q in zip(features.numpy(), probabilities, votes, strict=True):
                self._served[row.tobytes()] = (p, q)
            while len(self._served) > self.pending:
                self._served.popitem(last=False)
        return mixed(probabilities, votes, self.vote_weight)

    @torch.no_grad()
    def observe(self, features: torch.Tensor, scores: torch.Tensor) -> int:
        """Add the samples whose normalised confidence c(scores) reaches the threshold, labelled
        argmax(scores), as pseudo-label rows; returns how many.

        `scores` are what was served for these features (`predict`), or any class probabilities
        (the vote alone, the model's softmax). The bound is applied afterwards, so a batch with
        more rows of one class than its slots keeps only its newest ones.
        """
        features = self._normalised(features)
        scores = self._checked_scores(scores, len(features))
        predicted = scores.argmax(dim=1)
        confident = normalised_confidence(scores) >= self.confidence_threshold
        self._append(features[confident], predicted[confident], labelled=False)
        return int(confident.sum())

    @torch.no_grad()
    def learn(self, features: torch.Tensor, labels: torch.Tensor) -> int:
        """Add samples with their true labels (joined labels); returns how many. These rows
        outrank pseudo-label rows: a class over its budget drops its pseudo-label rows first.

        Samples this memory served (found by their features' bytes) first score every weight in
        `VOTE_WEIGHTS`, and `vote_weight` is chosen again (see the module docstring)."""
        features = self._checked_features(features)
        labels = self._checked_labels(labels, len(features))
        self._weigh(features, labels)
        self._append(F.normalize(features, dim=1), labels, labelled=True)
        return len(labels)

    def _weigh(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Score every weight in VOTE_WEIGHTS on the labels of samples this memory served, and
        take the one with the fewest errors over the last `vote_window` of them."""
        weights = torch.tensor(VOTE_WEIGHTS)[:, None, None]
        for row, label in zip(features.numpy(), labels.tolist(), strict=True):
            served = self._served.pop(row.tobytes(), None)
            if served is None:
                continue  # served by another replica, or before a restart or a reset
            p, q = served
            predicted = mixed(p[None], q[None], weights).argmax(-1)[:, 0]  # one per weight
            self._evidence.append((predicted != label).numpy())
        if len(self._evidence) < self.min_labels:
            return
        errors = np.stack(self._evidence).astype(np.int64)  # (labels, weights)
        better = errors[:, :1] - errors  # +1 where the weight is right and 0 was wrong, -1 reverse
        gain, discordant = better.sum(0), np.abs(better).sum(0)
        # a weight counts only when its gain over 0 is significant (sign test, one-sided, z = 2)
        gain = np.where(gain >= EVIDENCE_Z * np.sqrt(discordant), gain, 0)
        self.vote_weight = VOTE_WEIGHTS[int(np.argmax(gain))] if gain.max() > 0 else 0.0

    def reset(self) -> None:
        """Back to the seed: every row added at test time is dropped (the store keeps its own),
        and the vote's weight goes back to 0 with the evidence it was chosen on."""
        self._served.clear()
        self._evidence.clear()
        self.vote_weight = 0.0
        self._to_seed()

    def _to_seed(self) -> None:
        self._features = self._seed_features.clone()
        self._labels = self._seed_labels.clone()
        self._sequence = torch.full((len(self._seed_labels),), -1, dtype=torch.long)
        self._labelled = torch.ones(len(self._seed_labels), dtype=torch.bool)
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
        """The live rows added at test time, oldest first, as float32 ``[feature..., label]``;
        a true label y is packed as ``-1 - y`` (negative), a pseudo-label as y.

        ``since`` skips rows accepted before that count: ``before = npc.observed``, then after
        `observe` or `learn`, ``npc.rows(since=before)`` is what they added (what to append to a
        store).
        """
        added = self._sequence >= max(since, 0)
        labels = self._labels[added]
        packed_labels = torch.where(self._labelled[added], -1 - labels, labels)
        packed = torch.cat([self._features[added], packed_labels[:, None].float()], dim=1)
        return packed.numpy().astype(np.float32, copy=False)

    @torch.no_grad()
    def load_rows(self, rows: np.ndarray) -> None:
        """Replace the rows added at test time with packed rows (from `rows` or a store), in order.

        The seed stays; the bound is applied to the loaded rows as if they had been observed now.
        Rows with a non-negative label (all rows stored before true labels were kept) load as
        pseudo-label rows.
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
        labelled = labels < 0
        labels = torch.where(labelled, -1 - labels, labels)
        labels = self._checked_labels(labels.long(), len(features))
        self._to_seed()
        self._append(features, labels, labelled=labelled)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live memory (features float32, labels int64, sequence int64, labelled bool), the
        seed, the count."""
        return {
            "features": self._features.clone(),
            "labels": self._labels.clone(),
            "sequence": self._sequence.clone(),
            "labelled": self._labelled.clone(),
            "seed_features": self._seed_features.clone(),
            "seed_labels": self._seed_labels.clone(),
            "observed": torch.tensor(self.observed, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict`; a state without ``labelled`` (saved before true labels were
        kept) reads its seed rows as labelled and its added rows as pseudo-labels."""
        features = self._checked_features(state["features"])
        seed_features = self._checked_features(state["seed_features"])
        labels = self._checked_labels(state["labels"], len(features))
        seed_labels = self._checked_labels(state["seed_labels"], len(seed_features))
        sequence = state["sequence"].to(torch.long)
        if sequence.shape != labels.shape:
            raise ValueError(f"sequence has shape {tuple(sequence.shape)}, labels {len(labels)}")
        labelled = state.get("labelled")
        labelled = sequence < 0 if labelled is None else labelled.to(torch.bool)
        if labelled.shape != labels.shape:
            raise ValueError(f"labelled has shape {tuple(labelled.shape)}, labels {len(labels)}")
        self._features, self._labels, self._sequence = features.clone(), labels, sequence.clone()
        self._labelled = labelled.clone()
        self._seed_features, self._seed_labels = seed_features.clone(), seed_labels
        self.observed = int(state["observed"])
        self._trim()  # a checkpoint from a larger memory fits this one's bound

    def _append(self, features: torch.Tensor, labels: torch.Tensor,
                labelled: bool | torch.Tensor) -> None:
        added = len(labels)
        if added == 0:
            return
        sequence = torch.arange(self.observed, self.observed + added)
        self.observed += added
        flags = torch.as_tensor(labelled, dtype=torch.bool).expand(added)
        self._features = torch.cat([self._features, features])
        self._labels = torch.cat([self._labels, labels.to(torch.long)])
        self._sequence = torch.cat([self._sequence, sequence])
        self._labelled = torch.cat([self._labelled, flags])
        self._trim()

    def _trim(self) -> None:
        """Drop the bounded rows beyond the policy's budget: within a budget (a class's slots, or
        the whole capacity), pseudo-label rows leave before true-label rows, oldest first."""
        if self.keep_seed:
            bounded = self._sequence >= 0
        else:
            bounded = torch.ones_like(self._sequence, dtype=torch.bool)
        positions = bounded.nonzero().squeeze(1)  # oldest first
        if len(positions) == 0:
            return
        if self.policy == "fifo":
            groups = torch.zeros(len(positions), dtype=torch.long)
            budget = self.capacity
        else:
            groups = self._labels[positions]
            budget = self.slots_per_class
        counts = torch.bincount(groups, minlength=self.num_classes)
        if int(counts.max()) <= budget:
            return
        # leaving order within a group: pseudo-labels before true labels, then oldest first; the
        # positions are oldest first, so a stable sort on (group, labelled) keeps age in each part
        key = groups * 2 + self._labelled[positions].long()
        order = torch.sort(key, stable=True).indices
        sorted_groups = groups[order]
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(positions)) - group_start[sorted_groups]  # 0 = leaves first
        leaves = rank < counts[sorted_groups] - budget
        drop = positions[order[leaves]]
        if len(drop) == 0:
            return
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[drop] = False
        self._features = self._features[keep]
        self._labels = self._labels[keep]
        self._sequence = self._sequence[keep]
        self._labelled = self._labelled[keep]

    def _checked_features(self, features: torch.Tensor) -> torch.Tensor:
        return checked_features(features, self.feature_dim)

    def _normalised(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._checked_features(features), dim=1)

    def _checked_scores(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        scores = torch.as_tensor(scores).detach().to("cpu", torch.float32)
        if scores.shape != (count, self.num_classes):
            raise ValueError(
                f"scores have shape {tuple(scores.shape)}; expected "
                f"({count}, {self.num_classes}), one row of class scores per feature row"
            )
        return scores

    def _checked_labels(self, labels: torch.Tensor, count: int) -> torch.Tensor:
        labels = torch.as_tensor(labels).detach().to("cpu", torch.long)
        if labels.shape != (count,):
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected ({count},)")
        if count and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        return labels


def mixed(probabilities: torch.Tensor, votes: torch.Tensor,
          weight: float | torch.Tensor) -> torch.Tensor:
    """``(1 - lambda c(q)) p + lambda c(q) q``: the model's probabilities p moved towards the vote
    q by the vote's weight lambda times its normalised confidence c(q); rows sum to 1."""
    moved = weight * normalised_confidence(votes)[..., None]
    return (1 - moved) * probabilities + moved * votes


def normalised_confidence(scores: torch.Tensor) -> torch.Tensor:
    """``c(p) = (C max_c p_c - 1) / (C - 1)``: 0 for the uniform vector, 1 for a one-hot one,
    whatever the class count C.

    >>> normalised_confidence(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]))
    tensor([0.0000, 0.6000])
    """
    classes = scores.shape[-1]
    return ((classes * scores.max(dim=-1).values - 1) / (classes - 1)).clamp(0.0, 1.0)
