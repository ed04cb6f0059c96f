"""An online mixture of the candidates the pipeline makes, so that what is served is never much
worse than the best of them.

A batch passes through stages, each a candidate prediction for the same sample: the source model
(the frozen copy the guards run), the adapted model (after the test-time adapter), and the
compensated outputs (after AdaNPC's vote, the output corrector and the error memory). Which is
best depends on the stream, and changes along it: on a stream the adapter cannot follow the source
is best, after a shift that the labels teach the compensated outputs are. One more candidate is
no stage: the label that arrived last, served for every sample (`newest_label`), best where
labels persist, as in classes that come in runs or a level that moves slowly; and, for a
regressor, the last stage plus its mean residual over the last labels (`recent_residual`), best
where the model errs alike for a while. The mixture serves

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

One rate cannot serve both kinds of traffic, because the labels come one delay after what they
judge. Where classes come in runs, a candidate that learns each run (River's tree) is right on
the labels that arrive while the run lasts; a fast rate moves to it just as the next run begins,
where it is wrong (bananas, classes in runs of about 200, labels 100 late: 82.0% served at η = 2
alone, the model alone 89.7%), and a slow one follows a time series' level too late (water flow
with labels at once: MAE 3.35 with the slow rate's share starting at a half, 2.94 at 0.1, 2.86
with the fast rate alone). So the mixture keeps
weights w_r at several rates η_r (`eta`, 2 and 0.1 by default) and serves

    p_t = Σ_r u_r,t · Σ_i w_r,i,t · p_i,t

where u_r, rate r's share, is learnt by exponential weights (share `META_SHARE`) on the loss of
what r served, as it was served: each record keeps what every rate served for it, so the loss
judges the weights it was served with, the delay included. The shares keep almost no floor, since
their losses come one delay late too: a share that tracked as fast as the rates chased in the same
way (`tests/test_mixture.py`: with runs of 400 and labels 100 late, 0.76 to 0.79 served with a
floor of 0.001, 0.83 to 0.85 with 1e-5, the slow rate alone 0.85 to 0.86, the fast alone 0.74).
The first rate starts with `FIRST_SHARE` of the say: B6 measured η = 2 best on 25 of its 28 runs
in their own order, so the slow rate earns its share.

How fast the shares move is set by how the rates' losses spread, not by one number: per label

    η_u,t = `META_SCALE` / sqrt(1 + V_t),
    V_t = (1 − 1/`META_HORIZON`) · V_t−1 + (1/R) Σ_r (ℓ_r,t − ℓ̄_t)²

after the second-order tunings of exponential weights (Cesa-Bianchi, Mansour & Stoltz, 2007,
whose variance is weighted by the current weights and scaled by sqrt(ln N / V); here the spread
is unweighted, so shares that have settled on one rate still slow down when the rates disagree),
over about the last `META_HORIZON` labels so that it can speed up again. η_u starts at
`META_SCALE` (1) and falls as the losses spread, never below 1 / sqrt(251) ≈ 0.063 (a label
adds at most 0.25). Steady small differences move the shares far, swinging large ones little:
a regressor's rates differ by a little on almost every label, and at a fixed η_u of 0.1 their
shares took longer than a stream lasts to follow it (SP500 served with its target in runs,
labels 100 late: MAE 0.761 against the model's 0.710, the slow rate's share 0.83 after 906
labels), while a classifier's differ by a whole 0/1 loss on a few labels, which swing the other
way within each run where classes come in runs. There η_u falls to about 0.2 to 0.3 within a
few hundred labels (bananas in runs: 0.23 at the end; `tests/test_mixture.py`'s simulation
0.14), here it stays at 0.49 or more (MAE 0.695, 0.687 with the untried candidates' start of
0.05; BENCHMARKS.md B6, "The shares' rate from the spread of the rates' losses"). With one
rate (`eta` a number) this is the mixture above.

The shares learn one delay late too, and a candidate whose losses swing between all and nothing
over long stretches costs the fast rate a whole delay of wrong answers before they can: the
newest label of a classifier whose classes come in runs is right while a run lasts and wrong
for as long as the labels are late after each change, so the fast rate takes it up within a
few labels and serves it as the next run begins (phishing in runs, labels 100 late: 50% served
over the quarter of the stream holding the first change, 90% over the others). A candidate on
`probation` is served by each rate with no more weight than the slowest rate gives it:

    w̃_r,i = min(w_r,i, w_slow,i)  for i on probation,   the rest in proportion to w_r,j

(`served_weights`; what the rates learn is unchanged, what they serve and are judged on is
w̃). The slow rate trusts it only after hundreds of labels show it better, so labels at once
within long runs still let it lead (B6, classes in runs of about 400, labels at once: within
0.2 point of the candidate served freely on five streams, 1.5 behind on phishing), and labels
100 late mostly do not (B6, "The newest label on
probation").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from adapters.task import Task

# the rates' shares: the scale of their rate, η_u = META_SCALE / sqrt(1 + V), V the spread of the
# rates' losses over about the last META_HORIZON labels; the floor each keeps, and the first rate's
# share at the start
META_SCALE = 1.0
META_HORIZON = 1000
META_SHARE = 1e-5
FIRST_SHARE = 0.9
# the starting weight of a candidate that serves nothing before the first label (`start_untried`)
UNTRIED = 0.05


class FixedShareMixture:
    """Exponentially weighted candidates with a fixed share, at one rate η or several.

    >>> mixture = FixedShareMixture(["source", "adapted"], eta=1.0, share=0.01)
    >>> mixture.learn(np.array([[1.0, 0.0]] * 20))  # "adapted" is right, "source" is not
    >>> [round(w, 3) for w in mixture.weights]
    [0.008, 0.992]
    """

    def __init__(self, names: list[str], eta: float | Sequence[float] = 2.0,
                 share: float = 0.001, scale: float = 1.0, start_low: tuple[str, ...] = (),
                 start_untried: tuple[str, ...] = (),
                 meta_scale: float | None = None, first_share: float | None = None,
                 probation: tuple[str, ...] = ()) -> None:
        if len(names) < 2:
            raise ValueError(f"a mixture needs at least two candidates, got {names}")
        if np.ndim(eta) > 1:
            raise ValueError(f"eta must be one rate or a list of them, got {eta}")
        etas = [float(e) for e in np.atleast_1d(np.asarray(eta, dtype=np.float64))]
        if not etas or not all(0 < e < np.inf for e in etas):
            raise ValueError(f"eta must be positive and finite (one rate or several), got {eta}")
        meta_scale = META_SCALE if meta_scale is None else meta_scale
        first_share = FIRST_SHARE if first_share is None else first_share
        if not 0 < first_share <= 1:
            raise ValueError(f"first_share must lie in (0, 1], got {first_share}")
        if not 0 < meta_scale < np.inf:
            raise ValueError(f"meta_scale must be positive and finite, got {meta_scale}")
        if not 0 <= share < 1:
            raise ValueError(f"share must lie in [0, 1), got {share}")
        unknown = set(probation) - set(names)
        if unknown:
            raise ValueError(f"on probation but not a candidate: {sorted(unknown)}")
        if set(probation) >= set(names):
            raise ValueError("probation leaves no candidate to serve")
        self.names = list(names)
        self.etas = etas
        # candidates each rate serves no more than the slowest rate weighs them (`served_weights`)
        self.probation = tuple(probation)
        self._on_probation = np.array([name in self.probation for name in names])
        self.share = float(share)
        self.scale = float(scale)  # a regressor's: its losses are |e| / (|e| + scale)
        self.meta_scale = float(meta_scale)
        # candidates in `start_low` start at the floor σ/N (at least 0.001/N, so they can rise)
        # and earn their weight on labels; those in `start_untried`, which serve nothing until
        # the first label (the newest label, River's learner), at UNTRIED each: a prior, not a
        # floor, so that a few dozen labels, not hundreds, show them better where labels are
        # few (never below the floor); the rest share what is left evenly. Names that are not
        # candidates here (the newest label of a classifier) are left out
        low = self.floor = max(self.share, 0.001) / len(names)
        both = set(start_low) & set(start_untried)
        if both:
            raise ValueError(f"a candidate starts low or untried, not both: {sorted(both)}")
        starts = ({name: low for name in start_low}
                  | {name: max(UNTRIED, low) for name in start_untried})
        if all(name in starts for name in names):
            raise ValueError("start_low and start_untried leave no candidate to start from")
        given = sum(starts.get(name, 0.0) for name in names)
        if given >= 1:
            raise ValueError(f"start_low and start_untried leave nothing for the others "
                             f"({given:g})")
        high = (1.0 - given) / sum(name not in starts for name in names)
        start = np.array([starts.get(name, high) for name in names])
        self.rate_weights = np.tile(start, (len(etas), 1))  # (rates, candidates)
        # how much each rate is served: the first starts with `first_share`, the others share
        # the rest
        self.rate_share = (np.array([1.0]) if len(etas) == 1 else np.array(
            [first_share] + [(1 - first_share) / (len(etas) - 1)] * (len(etas) - 1)))
        self.labels = 0
        self.served_labels = 0
        # V: the rates' losses' spread about each label's mean, summed over about the last
        # META_HORIZON labels; the shares' rate is META_SCALE / sqrt(1 + V)
        self.loss_spread = 0.0

    @property
    def weights(self) -> list[float]:
        """Each candidate's weight in what is served: its weight at every rate, averaged by how
        much each rate is served."""
        return (self.rate_share @ self.served_weights()).tolist()

    @weights.setter
    def weights(self, weights: Sequence[float]) -> None:
        """Every rate's learnt weights set to these (what is served then caps a candidate on
        probation, `served_weights`)."""
        self.rate_weights = np.tile(np.asarray(weights, dtype=np.float64), (len(self.etas), 1))

    def served_weights(self) -> np.ndarray:
        """The weights each rate serves with, (rates, candidates): the weights it learnt, but
        a candidate on probation gets no more than the slowest rate gives it, and what it gives
        up goes to the others in proportion. A candidate whose losses swing between all and
        nothing in long stretches (the newest label of a classifier whose classes come in
        runs: right within a run, wrong for as long as the label delay after each change) is
        taken up by a fast rate within a few labels of each good stretch and served just as
        the next bad one begins; the slow rate follows its losses over hundreds of labels."""
        weights = self.rate_weights
        if not self.probation or len(self.etas) == 1:
            return weights
        slowest = weights[int(np.argmin(self.etas))]
        capped = np.minimum(weights, np.where(self._on_probation, slowest, np.inf))
        freed = (weights - capped).sum(axis=1, keepdims=True)
        others = np.where(self._on_probation, 0.0, capped)
        total = others.sum(axis=1, keepdims=True)
        # a rate whose other candidates all weigh nothing (no fixed share, σ = 0) has nowhere to
        # put what it frees: it serves its own weights, uncapped
        spread = np.divide(others, total, out=np.zeros_like(others), where=total > 0)
        return np.where(total > 0, capped + freed * spread, weights)

    def lower(self, name: str) -> bool:
        """Before the first label: `name` down to the floor weight at every rate, what it gives
        up shared by the others in proportion (a source that started level with stages that now
        differ from it before any label: a checkpoint restored, memory rows reloaded). After a
        label the weights are the labels' to move: nothing changes, and False."""
        if self.labels or self.served_labels or name not in self.names:
            return False
        at = self.names.index(name)
        for weights in self.rate_weights:
            others = weights.sum() - weights[at]
            if weights[at] > self.floor and others > 0:
                weights *= (1.0 - self.floor) / others
                weights[at] = self.floor
        return True

    def outputs(self, candidates: dict[str, torch.Tensor]) -> torch.Tensor:
        """What each rate's weights make of the candidates' outputs, (rates, n, width), float64."""
        # in float64: candidates that agree (before any label, all serve the model) give back
        # exactly their value, not one rounded by float32 sums of weights
        stacked = torch.stack([candidates[name] for name in self.names]).double()
        weights = torch.as_tensor(self.served_weights(), dtype=torch.float64)
        return torch.einsum("rc,cnw->rnw", weights, stacked)

    def serve(self, outputs: torch.Tensor) -> torch.Tensor:
        """The rates' outputs (rates, n, width) averaged by how much each is served, float32."""
        share = torch.as_tensor(self.rate_share, dtype=torch.float64)
        return torch.einsum("r,rnw->nw", share, outputs.double()).float()

    def combine(self, candidates: dict[str, torch.Tensor]) -> torch.Tensor:
        """What is served for the candidates' outputs, (n, width) each."""
        return self.serve(self.outputs(candidates))

    def losses(self, task: Task, candidates: dict[str, np.ndarray], labels: np.ndarray
               ) -> np.ndarray:
        """Each candidate's loss in [0, 1] on joined labels, (n, candidates)."""
        return np.stack([task.bounded_losses(candidates[name], labels, self.scale)
                         for name in self.names], axis=1)

    def served_losses(self, task: Task, served: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The loss in [0, 1] of what each rate served, (n, rates), from `served` (n, rates,
        width): the rates' outputs kept when the sample was served."""
        return np.stack([task.bounded_losses(served[:, r], labels, self.scale)
                         for r in range(len(self.etas))], axis=1)

    def learn(self, losses: np.ndarray) -> None:
        """Losses (n, candidates) in [0, 1] of joined labels, in the order they arrived."""
        self.rate_weights = _fixed_share(self.rate_weights, losses,
                                         np.asarray(self.etas)[:, None], self.share)
        self.labels += len(losses)

    def learn_served(self, losses: np.ndarray) -> None:
        """The losses (n, rates) of what each rate served for joined labels, as it was served:
        the rates are weighed on what they served, the label delay included, at a rate set by
        how their losses spread (the module's docstring)."""
        rows = np.asarray(losses, dtype=np.float64).reshape(len(losses), -1)
        # the engine filters rows that are not finite; one here would make V NaN for good
        rows = np.clip(rows[np.isfinite(rows).all(axis=1)], 0.0, 1.0)
        if len(self.etas) > 1 and len(rows):
            keep, spread, etas = 1.0 - 1.0 / META_HORIZON, self.loss_spread, []
            for label_spread in rows.var(axis=1).tolist():
                spread = keep * spread + label_spread
                etas.append(self.meta_scale / np.sqrt(1.0 + spread))
            self.loss_spread = spread
            shares, floor = self.rate_share, META_SHARE / len(self.etas)
            for row, eta in zip(rows, etas, strict=True):
                # relative to the smallest loss, as in _fixed_share: never all 0
                shares = shares * np.exp(-eta * (row - row.min()))
                shares = (1 - META_SHARE) * shares / shares.sum() + floor
            self.rate_share = shares
        self.served_labels += len(rows)

    @property
    def share_eta(self) -> float:
        """η_u, the rate the shares learn at now: `meta_scale` / sqrt(1 + V); it starts at
        `meta_scale` and falls as the rates' losses spread (to 1 / sqrt(251) at the most spread:
        each label adds at most 0.25 to V, and V keeps about the last `META_HORIZON`)."""
        return self.meta_scale / float(np.sqrt(1.0 + self.loss_spread))

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {
            "eta": self.etas if len(self.etas) > 1 else self.etas[0], "share": self.share,
            "labels": self.labels,
            "weights": dict(zip(self.names, self.weights, strict=True))}
        if self.probation and len(self.etas) > 1:  # with one rate it changes nothing
            described["probation"] = list(self.probation)
        if len(self.etas) > 1:
            described["served_labels"] = self.served_labels
            described["share_eta"] = self.share_eta
            described["rates"] = [
                {"eta": eta, "served": float(served),
                 "weights": dict(zip(self.names, weights.tolist(), strict=True))}
                for eta, served, weights in zip(self.etas, self.rate_share,
                                                self.served_weights(), strict=True)]
        return described


def _fixed_share(weights: np.ndarray, losses: np.ndarray, eta: np.ndarray, share: float
                 ) -> np.ndarray:
    """Fixed share's update of weights (rows, experts) by losses (n, experts) in [0, 1], one
    label at a time; each row at its own η (`eta`, (rows, 1))."""
    weights = np.asarray(weights, dtype=np.float64)
    count = weights.shape[1]
    for row in np.clip(np.asarray(losses, dtype=np.float64), 0.0, 1.0):
        # relative to the smallest loss: the same weights once normalised, and at least one
        # factor is 1, so no η makes them all underflow to 0 (and 0 / 0)
        weights = weights * np.exp(-eta * (row - row.min()))
        weights = (1 - share) * weights / weights.sum(axis=1, keepdims=True) + share / count
    return weights
