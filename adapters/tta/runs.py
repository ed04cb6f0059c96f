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
"""

from __future__ import annotations

import numpy as np
import torch

STICKINESS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


class ClassRunFilter:
    """The class of consecutive samples as a sticky Markov chain, filtered sample by sample.

    Parameters: `num_classes`; `stickiness`, the grid of rho (it must hold 0, so that shuffled
    traffic is served unchanged); `forget`, how fast old evidence about rho fades (per sample);
    `share`, the fixed share that keeps every rho within reach; `window`, the samples over which
    the model's class mix m is averaged; `floor`, the share of the uniform mix blended into m.

    >>> runs = ClassRunFilter(num_classes=3)
    >>> _ = runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 30))  # a run of class 0
    >>> runs.filter(torch.tensor([[0.3, 0.5, 0.2]])).argmax(1).item()  # one weak vote against
    0
    >>> runs.stickiness() > 0.8
    True
    """

    def __init__(self, num_classes: int, stickiness: tuple[float, ...] = STICKINESS,
                 forget: float = 0.0, share: float = 0.002, window: int = 200,
                 floor: float = 0.2) -> None:
        if num_classes < 2:
            raise ValueError("the class-run filter needs a classifier with two or more classes")
        if 0.0 not in stickiness or not all(0.0 <= rho < 1.0 for rho in stickiness):
            raise ValueError("the stickiness grid must hold 0 and values in [0, 1)")
        if not 0.0 <= forget < 1.0 or not 0.0 <= share < 1.0 or not 0.0 <= floor <= 1.0 \
                or window < 1:
            raise ValueError("forget and share must lie in [0, 1), floor in [0, 1], and window "
                             "must be >= 1")
        self.num_classes = num_classes
        self.rho = np.asarray(stickiness, dtype=np.float64)[:, None]
        self.forget = forget
        self.share = share
        self.rate = 1.0 / window
        self.floor = floor
        self.reset()

    def reset(self) -> None:
        """Forget the runs: uniform class mix, every rho equally likely, nothing filtered."""
        grid, classes = len(self.rho), self.num_classes
        self.filtered = 0
        self.mix = np.full(classes, 1.0 / classes)
        self.posterior = np.full((grid, classes), 1.0 / classes)
        self.belief = np.full(grid, 1.0 / grid)  # the weights w over the grid of rho

    def stickiness(self) -> float:
        """The expected rho under the current weights: the chance that the next sample keeps
        the class (0 on shuffled traffic)."""
        return float(self.belief @ self.rho[:, 0])

    def filter(self, probabilities: torch.Tensor, commit: bool = True) -> torch.Tensor:
        """The filtered probabilities of a batch's rows, taken in order as consecutive samples.
        Without `commit` the filter ends as it began (the rows are filtered, not remembered);
        so does a batch that raises."""
        p = probabilities.detach().double().cpu().numpy().reshape(len(probabilities), -1)
        kept = (self.mix, self.posterior, self.belief)
        served = np.empty_like(p)
        done = False
        try:
            for row, probs in enumerate(p):
                served[row] = self._step(probs)
            done = commit
        finally:
            if done:
                self.filtered += len(p)
            else:  # every step rebinds the state, so the arrays kept are as they were
                self.mix, self.posterior, self.belief = kept
        return torch.from_numpy(served).to(probabilities.dtype)

    def _step(self, p: np.ndarray) -> np.ndarray:
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
        served = self.belief @ self.posterior
        belief = self.belief ** (1.0 - self.forget) if self.forget else self.belief
        belief = belief * likelihood
        belief = np.maximum(belief / belief.sum(), 1e-300)
        self.belief = (1.0 - self.share) * belief + self.share / len(self.rho) if self.share \
            else belief
        return served

    def describe(self) -> dict[str, object]:
        return {"filtered": self.filtered, "stickiness": round(self.stickiness(), 3)}
