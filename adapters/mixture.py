"""An online mixture of the candidates the pipeline makes, so that what is served is never much
worse than the best of them.

A batch passes through stages, each a candidate prediction for the same sample: the source model
(the frozen copy the guards run), the adapted model (after the test-time adapter), and the
compensated outputs (after AdaNPC's vote, the output corrector and the error memory). Which is
best depends on the stream, and changes along it: on a stream the adapter cannot follow the source
is best, after a shift that the labels teach the compensated outputs are. One more candidate is
no stage: the label that arrived last, served for every sample (`newest_label`), best where
labels persist, as in classes that come in runs or a level that moves slowly. The mixture serves

    p_t = Σ_i w_i,t · p_i,t                                   (probabilities, or values)

and learns the weights from the joined labels with exponential weights and a fixed share
(Herbster & Warmuth 1998, "Tracking the best expert"), one label at a time:

    v_i = w_i · exp(−η ℓ_i),   w_i ← (1 − σ) · v_i / Σ_j v_j + σ / N,

where ℓ_i ∈ [0, 1] is candidate i's loss on the label: 1 when its most probable class is not
the label, else 0, for a classifier, and |y − ŷ_i| / (|y − ŷ_i| + s) for a regressor (s: the
source's spread on the reference data, 1 without it, so the loss is bounded and scale-free).
The tracking bound of fixed share holds for the weighted losses Σ w_i ℓ_i. What is served is the
weighted average, whose loss can exceed them while the weights are split: for a classifier the
average's argmax can differ from every leading candidate's, and |e| / (|e| + s) is not convex in
ŷ (with y = 0, s = 1, ŷ = (0, 10) and equal weights the value served loses 0.83, the weighted
losses 0.45). Once one candidate leads, its weight is near 1 and the average is its output.

The classifier's loss was 1 − p_i(y) (linear in p, so the mixture's loss equalled the weighted
loss) until B6 (BENCHMARKS.md) showed what it misses: the error memory's corrections spread
probability, so the compensated candidate was right more often with a larger 1 − p_y, and the
mixture kept the source's sharper, less accurate outputs (image segments: 94.0% served against
95.0%). With the 0/1 loss it served 95.0%.

The share σ keeps every weight at least σ/N, so a candidate that was worst for a while can take
over within about ln(N/σ) / (η · g) labels once it is better by g per label: with η = 2,
σ = 0.001 and four candidates, about 4 labels at a gap of 1, about 14 at 0.3. η was 0.1 (about
270 labels at 0.3) until B6 measured 0.1, 0.5, 1 and 2 on its 14 streams of 800 to 4,800 labels,
each with labels at once and 100 late: 2 was as good as 0.1 or better on 25 of the 28 runs
(friedman-lea up to 0.7% more MAE, image segments 0.1 point), and on the time series up to 22%
better (water flow: MAE 8.92 to 6.93).
"""

from __future__ import annotations

import numpy as np
import torch

from adapters.task import Task


class FixedShareMixture:
    """Exponentially weighted candidates with a fixed share.

    >>> mixture = FixedShareMixture(["source", "adapted"], eta=1.0, share=0.01)
    >>> mixture.learn(np.array([[1.0, 0.0]] * 20))  # "adapted" is right, "source" is not
    >>> [round(w, 3) for w in mixture.weights]
    [0.008, 0.992]
    """

    def __init__(self, names: list[str], eta: float = 2.0, share: float = 0.001,
                 scale: float = 1.0, start_low: tuple[str, ...] = ()) -> None:
        if len(names) < 2:
            raise ValueError(f"a mixture needs at least two candidates, got {names}")
        if not eta > 0:
            raise ValueError(f"eta must be positive, got {eta}")
        if not 0 <= share < 1:
            raise ValueError(f"share must lie in [0, 1), got {share}")
        self.names = list(names)
        self.eta = float(eta)
        self.share = float(share)
        self.scale = float(scale)  # a regressor's: its losses are |e| / (|e| + scale)
        # candidates in `start_low` start at the floor σ/N (at least 0.001/N, so they can rise)
        # and earn their weight on labels; the rest share what is left evenly
        low = max(self.share, 0.001) / len(names)
        starting = [name in start_low for name in names]
        if all(starting):
            raise ValueError("start_low leaves no candidate to start from")
        high = (1.0 - low * sum(starting)) / (len(names) - sum(starting))
        self.weights = [low if s else high for s in starting]
        self.labels = 0

    def combine(self, candidates: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted average of the candidates' outputs, (n, width) each."""
        return sum((w * candidates[name] for name, w in zip(self.names, self.weights,
                                                           strict=True)),
                   start=torch.zeros_like(candidates[self.names[0]]))

    def losses(self, task: Task, candidates: dict[str, np.ndarray], labels: np.ndarray
               ) -> np.ndarray:
        """Each candidate's loss in [0, 1] on joined labels, (n, candidates)."""
        return np.stack([task.bounded_losses(candidates[name], labels, self.scale)
                         for name in self.names], axis=1)

    def learn(self, losses: np.ndarray) -> None:
        """Losses (n, candidates) in [0, 1] of joined labels, in the order they arrived."""
        weights = np.asarray(self.weights, dtype=np.float64)
        count = len(self.names)
        for row in np.clip(np.asarray(losses, dtype=np.float64), 0.0, 1.0):
            weights = weights * np.exp(-self.eta * row)
            weights = (1 - self.share) * weights / weights.sum() + self.share / count
        self.weights = weights.tolist()
        self.labels += len(losses)

    def describe(self) -> dict[str, object]:
        return {"eta": self.eta, "share": self.share, "labels": self.labels,
                "weights": dict(zip(self.names, self.weights, strict=True))}
