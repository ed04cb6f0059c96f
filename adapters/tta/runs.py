"""Classes that come in runs: a filter over the stream that learns how long they last.

Real traffic is not shuffled: a camera sees one kind of object for minutes, a fraud model sees
bursts of one pattern, a user sends the same image again and again. A classifier answers each
request alone, so on such a stream it throws away the best evidence it has, the answers just
before. Test-time BatchNorm does worse than nothing with it: a run of one class drags the
statistics towards that class (`adapters.tta.balanced`). This filter uses the runs instead.

It is the forward pass of a hidden Markov model over the class of consecutive samples, in the
order the engine serves them: the class stays the same with probability rho, or is drawn afresh
from the model's recent class mix m. Each sample's evidence is the model's probabilities p
divided by m. This is a choice, not a derivation: the model's posterior holds its training
prior, not m, but dividing by the mix the model has lately been answering with makes rho = 0
serve p unchanged, so that only agreement between neighbours beyond that mix counts as a run.
For each rho of a grid, with a_rho the filtered posterior of the previous sample:

    prior_rho = rho · a_rho + (1 − rho) · m
    a_rho     ∝ prior_rho ⊙ p / m                  (normalised; L_rho the normaliser)
    served    = Σ_rho w_rho · a_rho

and rho is not set but learnt: the weights w are exponential weights on each rho's predictive
likelihood L_rho (Bayesian model averaging with optional forgetting), with a fixed share so that
a rho that lost for a while can take over again within a few samples (Herbster & Warmuth 1998,
as in `adapters.mixture`). After each sample (its answer was served with the weights before it,
as the mixture serves with the weights of the labels before):

    w ← normalise(w^(1 − forget) ⊙ L),   w ← (1 − share) · w + share / |grid|
    m ← (1 − f) · m̄ + f / C,   m̄ ← (1 − 1/window) · m̄ + (1/window) · p   (before the sample)

(serving with the weights after the sample instead changed B1's errors by 0.2 point at most.)

The floor f keeps every class in the mix: without it, after one image repeated 1,000 times the
mix held the other classes at 0.07%, every later sample looked a thousand times likelier than
the mix expected, and the sticky rhos took over the shuffled traffic that followed (B1's
`repeat` order: clean error 6.5% against the source's 3.1%; with f = 0.2, 3.3%).

On shuffled traffic rho = 0 wins, and rho = 0 serves p unchanged (its prior is m, which p / m
cancels): the filter then serves the model's own answers. In a run, a large rho wins and the
run's class holds until the evidence against it outweighs ρ / ((1 − ρ) m); a single request
repeated keeps the model's answer for it. Nothing is learnt into the model: the filter is
label-free, changes no parameter, and its state is a few hundred numbers per process (not
checkpointed: it re-learns rho within a few hundred samples).

Measured on B1's traffic axis (BENCHMARKS.md): the filter turns classes in runs from a loss into
a gain, at a cost where the model's own class mix changes abruptly on shuffled traffic (a new
corruption that makes the model favour one class): until m has caught up, that class looks
likelier than m expects sample after sample, which is what a run looks like, and a sticky rho
takes over for a few hundred samples. This is online label-shift tracking
in the sense of Wu et al. ("Online Adaptation to Label Distribution Shift", NeurIPS 2021) with
the shift given the temporal form of a sticky Markov chain.

Labels, where they come back, settle what the model's answers cannot: whether the classes
themselves come in runs. Each served row is placed (`placed`: a token of this filter's
sequence and the row's position in it, kept with the prediction record); a joined label of a
placed row is paired with the nearest labelled row before it that the filter knows, L rows
before, and under each rho the chain gives the pair's likelihood

    P(y | y_prev, L, rho) = rho^L · [y = y_prev] + (1 − rho^L) · q_y

with q the labels' own class mix (averaged over `window` labels, floored as m is). These weigh
a second set of weights v over the same grid, from labels alone, with their own fixed share
`label_share`. Labels only veto: what serves is w with each rho's weight multiplied by

    min(1, [v(≥ rho) / v(< rho)] / [n(≥ rho) / n(< rho)])

(normalised), the labels' Bayes factor for a stickiness of at least rho against one below it,
v(≥ rho) the weight of v on the grid's values of at least rho and n(≥ rho) their count (the
uniform prior's odds); 1 for the grid's smallest rho, and for every rho until labels have
moved v. So labels that show shuffled classes take away the sticky rhos the model's answers
raised (the lag of m after an abrupt change of the model's class mix, the cost above), and
labels in runs leave w as it is (the model's answers find runs without
help, and a verdict of runs must not outlast them: after a stream in runs, shuffled traffic
without labels would stay sticky). v's share is small, 1e-5 against w's 2e-3, so that the veto
outweighs w's evidence when they disagree; once no label has taught for `window` rows, v fades
towards uniform by `label_forget` a row (v ← v^(1 − label_forget)), so that a label stream that
stops does not veto runs that start later. Until the first pair, w serves alone, exactly as
without labels. Only the last `remembered` labelled rows are kept to pair with (a label of a
row served before all of them pairs with none), and a label pairs with the one before it only,
not also with the one after it when it arrives out of order.

Measured on B1 with 10% of the labels back 100 samples late (BENCHMARKS.md, "Labels tell the
class-run filter whether classes run"): the rows a change of corruption made the model favour
are no longer served as a run.
"""

from __future__ import annotations

import bisect
import secrets

import numpy as np
import torch

STICKINESS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
# a row's place: the sequence's token and the row's position, both below 2**24 so that a float32
# array in the prediction record holds them exactly; the token moves on every 2**24 rows
PLACES = 2**24


class ClassRunFilter:
    """The class of consecutive samples as a sticky Markov chain, filtered sample by sample.

    Parameters: `num_classes`; `stickiness`, the grid of rho (it must hold 0, so that shuffled
    traffic is served unchanged); `forget`, how fast old evidence about rho fades (per sample);
    `share`, the fixed share that keeps every rho within reach; `window`, the samples over which
    the model's class mix m is averaged (and the labels over which theirs is); `floor`, the
    share of the uniform mix blended into m; `label_share`, the fixed share of the weights that
    labels learn (`learn_labels`); `remembered`, the labelled positions kept for pairing.

    >>> runs = ClassRunFilter(num_classes=3)
    >>> _ = runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 30))  # a run of class 0
    >>> runs.filter(torch.tensor([[0.3, 0.5, 0.2]])).argmax(1).item()  # one weak vote against
    0
    >>> runs.stickiness() > 0.8
    True
    """

    def __init__(self, num_classes: int, stickiness: tuple[float, ...] = STICKINESS,
                 forget: float = 0.0, share: float = 0.002, window: int = 200,
                 floor: float = 0.2, label_share: float = 1e-5, label_forget: float = 0.02,
                 remembered: int = 1024) -> None:
        if num_classes < 2:
            raise ValueError("the class-run filter needs a classifier with two or more classes")
        if 0.0 not in stickiness or not all(0.0 <= rho < 1.0 for rho in stickiness):
            raise ValueError("the stickiness grid must hold 0 and values in [0, 1)")
        if not 0.0 <= forget < 1.0 or not 0.0 <= share < 1.0 or not 0.0 <= floor <= 1.0 \
                or not 0.0 <= label_share < 1.0 or not 0.0 <= label_forget < 1.0 \
                or window < 1 or remembered < 1:
            raise ValueError("forget, share, label_share and label_forget must lie in [0, 1), "
                             "floor in [0, 1], and window and remembered must be >= 1")
        self.num_classes = num_classes
        self.rho = np.asarray(stickiness, dtype=np.float64)[:, None]
        # row i marks the rhos of the grid at least rho_i; the prior odds of "at least rho_i"
        self._at_least = (self.rho[:, 0][None, :] >= self.rho).astype(np.float64)
        counted = self._at_least.sum(1)
        self._prior_odds = counted / np.maximum(len(self.rho) - counted, 1.0)
        self.forget = forget
        self.share = share
        self.rate = 1.0 / window
        self.floor = floor
        self.label_share = label_share
        self.label_forget = label_forget
        self.remembered = remembered
        self.reset()

    def reset(self) -> None:
        """Forget the runs: uniform class mix, every rho equally likely, nothing filtered, no
        label learnt, and a new sequence (labels of rows placed before count for nothing)."""
        grid, classes = len(self.rho), self.num_classes
        self.filtered = 0
        self.mix = np.full(classes, 1.0 / classes)
        self.posterior = np.full((grid, classes), 1.0 / classes)
        self.belief = np.full(grid, 1.0 / grid)  # the weights w over the grid of rho
        self.token = secrets.randbelow(PLACES)
        self.pairs = 0  # labelled pairs learnt
        self._labels_at = 0  # rows filtered when labels last taught
        self.label_belief = np.full(grid, 1.0 / grid)  # the weights v, from labels alone
        self.label_mix = np.full(classes, 1.0 / classes)
        self._labelled: list[tuple[int, int]] = []  # (position, class), in position order

    def weights(self) -> np.ndarray:
        """The weights over the grid that serve: w, each rho's vetoed as far as labels have
        found a stickiness of at least rho less likely than one below it."""
        if not self.pairs:
            return self.belief
        weights = self.belief * self.veto()
        return weights / weights.sum()

    def veto(self) -> np.ndarray:
        """Per rho of the grid, min(1, the labels' Bayes factor for a stickiness of at least
        rho against one below it): 1 for the smallest rho, and for every rho while v is still
        its uniform prior."""
        at_least = self._at_least @ self.label_belief
        below = 1.0 - at_least
        factor = at_least / np.maximum(below, 1e-300) / self._prior_odds
        return np.where(below > 0.0, np.minimum(1.0, factor), 1.0)

    def stickiness(self) -> float:
        """The expected rho under the current weights: the chance that the next sample keeps
        the class (0 on shuffled traffic)."""
        return float(self.weights() @ self.rho[:, 0])

    def placed(self, count: int) -> np.ndarray:
        """Where the next `count` rows filtered with `commit` fall: (count, 2) float32 rows of
        this sequence's token and the row's position, for the prediction records."""
        at = self.filtered + np.arange(count)
        tokens = (self.token + at // PLACES) % PLACES
        return np.stack([tokens, at % PLACES], axis=1).astype(np.float32)

    def learn_labels(self, placed: np.ndarray, labels: np.ndarray) -> int:
        """Learn from joined labels whether the classes come in runs (the module's docstring):
        `placed` the rows' places as `placed` gave them, `labels` their class indices. Rows
        placed by another sequence (another process, or before a reset), or whose place or
        class is not one, teach nothing. Returns the pairs learnt."""
        placed = np.asarray(placed, dtype=np.float64).reshape(-1, 2)
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
        ok = np.isfinite(placed).all(1) & np.isfinite(labels)
        ok &= (labels >= 0) & (labels < self.num_classes) & (labels == np.round(labels))
        rows = placed[:, 1]
        ok &= (rows >= 0) & (rows < PLACES) & (rows == np.round(rows))
        # the stretch of 2**24 rows a token names: this one or the one before (labels of rows
        # placed just before the boundary arrive after it), else another sequence's
        era = self.filtered // PLACES
        stretch = np.where(ok, placed[:, 0] - self.token, 0.0) % PLACES
        current, previous = stretch == era % PLACES, (stretch == (era - 1) % PLACES) & (era > 0)
        ok &= current | previous
        # positions from the sequence's start, among the rows filtered so far
        at = np.where(current, era, era - 1) * PLACES + np.where(ok, placed[:, 1], 0.0)
        ok &= at < self.filtered
        learnt = 0
        for position, label in sorted(zip(at[ok].astype(np.int64).tolist(),
                                           labels[ok].astype(np.int64).tolist(), strict=True)):
            learnt += self._learn_label(position, label)
        self.pairs += learnt
        if learnt:
            self._labels_at = self.filtered
        return learnt

    def _learn_label(self, position: int, label: int) -> int:
        at = bisect.bisect_left(self._labelled, (position, -1))
        if at < len(self._labelled) and self._labelled[at][0] == position:
            return 0  # that row's label again: it says nothing new
        mix = (1.0 - self.floor) * self.label_mix + self.floor / self.num_classes
        learnt = 0
        if at > 0:
            before, before_label = self._labelled[at - 1]
            keep = self.rho[:, 0] ** (position - before)
            likelihood = keep * (label == before_label) + (1.0 - keep) * mix[label]
            belief = self.label_belief * np.maximum(likelihood, 1e-300)
            belief = belief / belief.sum()
            self.label_belief = (1.0 - self.label_share) * belief \
                + self.label_share / len(self.rho)
            learnt = 1
        self.label_mix = (1.0 - self.rate) * self.label_mix
        self.label_mix[label] += self.rate
        self._labelled.insert(at, (position, label))
        if len(self._labelled) > self.remembered:
            del self._labelled[0]  # the earliest served: labels come about in the order served
        return learnt

    def filter(self, probabilities: torch.Tensor, commit: bool = True) -> torch.Tensor:
        """The filtered probabilities of a batch's rows, taken in order as consecutive samples.
        Without `commit` the filter ends as it began (the rows are filtered, not remembered);
        so does a batch that raises."""
        p = probabilities.detach().double().cpu().numpy().reshape(len(probabilities), -1)
        kept = (self.mix, self.posterior, self.belief, self.label_belief)
        served = np.empty_like(p)
        done = False
        try:
            for row, probs in enumerate(p):
                served[row] = self._step(probs, self.filtered + row)
            done = commit
        finally:
            if done:
                self.filtered += len(p)
            else:  # every step rebinds the state, so the arrays kept are as they were
                self.mix, self.posterior, self.belief, self.label_belief = kept
        return torch.from_numpy(served).to(probabilities.dtype)

    def _step(self, p: np.ndarray, row: int) -> np.ndarray:
        if not np.isfinite(p).all():
            return p  # no usable evidence: the row is served as it came and teaches nothing
        p = np.clip(p, 0.0, None)
        total = p.sum()
        if not total > 0.0:
            return p
        p = p / total
        self.mix = (1.0 - self.rate) * self.mix + self.rate * p
        mix = (1.0 - self.floor) * self.mix + self.floor / self.num_classes
        joint = (self.rho * self.posterior + (1.0 - self.rho) * mix) * (p / np.maximum(mix, 1e-12))
        likelihood = np.maximum(joint.sum(1), 1e-300)
        self.posterior = joint / likelihood[:, None]
        served = self.weights() @ self.posterior
        if self.pairs and self.label_forget and row - self._labels_at >= 1 / self.rate:
            # what labels said fades once none have come for `window` rows
            faded = self.label_belief ** (1.0 - self.label_forget)
            self.label_belief = faded / faded.sum()
        belief = self.belief ** (1.0 - self.forget) if self.forget else self.belief
        belief = belief * likelihood
        belief = np.maximum(belief / belief.sum(), 1e-300)
        self.belief = (1.0 - self.share) * belief + self.share / len(self.rho) if self.share \
            else belief
        return served

    def describe(self) -> dict[str, object]:
        said: dict[str, object] = {"filtered": self.filtered,
                                   "stickiness": round(self.stickiness(), 3),
                                   "labelled_pairs": self.pairs}
        if self.pairs:  # what the labels alone say: the chance the next label keeps the class
            said["labelled_stickiness"] = round(float(self.label_belief @ self.rho[:, 0]), 3)
        return said
