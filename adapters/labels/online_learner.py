"""A River learner trained online on the joined labels: one more candidate of the mixture.

The model served was trained once; where the concept it learnt moves (B2's streams, B6's
tabular data), an online learner that starts from nothing and follows the labels can overtake
it, and on B6 River's learners beat every configuration of adaptd on some streams (ARF on
phishing and sine). This wraps one of River's incremental learners as a candidate of
`adapters.mixture.FixedShareMixture`: once the engine has woken it (at the first label, see
below) it predicts every sample from the model's inputs (the rows as served, flattened: a tree
splits on the raw values, which a per-feature scaling does not change; a regression tree's
leaves fit linear models by SGD, which it does change, but standardising a regressor's inputs
helped B2's friedman streams and was about neutral on B6's real time series, with large losses
where labels came late, so it is not done: BENCHMARKS.md B6, "A regressor's River learners on
standardised inputs"), learns each joined
label's inputs, and the mixture weighs it against the model on
the same labels, so what is served follows whichever is better lately and is never much worse
than the model (the mixture's tracking bound).

Kinds (River's defaults, seeded): `ht` is `tree.HoeffdingTreeClassifier` or `...Regressor`
(Domingos & Hulten 2000: a split once the Hoeffding bound says the best attribute is best),
`hat` its adaptive form (Bifet & Gavaldà 2009: ADWIN in each node replaces a subtree whose
error rises), `arf` `forest.ARFClassifier` or `...Regressor` (Gomes et al. 2017: ten Hoeffding
trees on random feature subsets with online bagging, each replaced when its drift detector
fires). Measured offline on B6's streams (from nothing, labels at once, the mixture with the
source model): `arf` was best on three of four, `hat` on hyperplane; BENCHMARKS.md B6 has the
service's figures.

Several learners may be candidates at once (`mixture.learner` a list), each weighed on its own
labels; the default for a tabular model is both trees. Neither serves every stream better: HT,
which never forgets a split, is ahead where the concept holds still; HAT can follow a concept
that changes, as far as its leaves' Poisson(1) weights on each label (River's
`bootstrap_sampling`) let it: one seed of it serves sine 86.9% and another 92.9% (BENCHMARKS.md
B6, "Both Hoeffding trees as candidates"). Which will suit a stream is not known before its
labels, which the mixture reads.

What it is not: a model of images (trained on the demo's 898 reference digits HT is right on
87% of the clean test digits and ARF on 84%, where the CNN is on 97%, and it costs about a
millisecond a sample), or a multi-output regressor (River's are single-target: refused at
start). Its state is River's Python objects, not tensors: checkpoints carry no River model (they
are safetensors, never pickles), so after a restart it learns again from the labelled reference
data and the next labels, and each replica learns from the labels it joins. Until it has learnt
a label it predicts nothing and the engine serves the last stage in its place, so its weight
does not move. The engine also keeps it asleep, asking it nothing, until the replica joins its
first label, and then judges the records served meanwhile by the guesses of a copy kept as it
slept (`Engine.guess_asleep`): exactly those it would have made.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

KINDS = ("ht", "hat", "arf")
# `mixture.learner = "auto"` for a tabular model: both trees, each a candidate of the mixture.
# Neither serves every stream better: HT, which never forgets, where the concept holds still;
# HAT, whose nodes' ADWIN replaces a subtree whose error rises, where the concept changes and
# its random draws let it follow (BENCHMARKS.md B6, "Both Hoeffding trees as candidates")
AUTO: tuple[Literal["ht", "hat", "arf"], ...] = ("hat", "ht")
# what a learner's trees may hold together, in MiB (River's estimate), checked every
# MEMORY_CHECK_LABELS labels: beyond it a tree stops growing its least promising leaves. River's
# defaults (100 or 500 MiB a tree, checked every 1 or 2 million labels) let ARF's regressor grow
# without bound in a long run: 365 MB and 9.5 ms a label after 100,000 labels of B2's
# friedman-gra (BENCHMARKS.md B6, "The learner over a long run"); bounded, 64 to 76 MB (its
# background trees and detectors on top of the trees) and under 1 ms
MEMORY_MIB = 50.0
MEMORY_CHECK_LABELS = 10_000


def river_model(kind: str, regression: bool, seed: int) -> Any:
    """A fresh River learner of `kind` (`KINDS`) for a regressor or a classifier, River's defaults
    but its memory bound (`MEMORY_MIB`, shared by ARF's trees)."""
    from river import forest, tree

    size, period = MEMORY_MIB, MEMORY_CHECK_LABELS
    if kind == "ht":
        return (tree.HoeffdingTreeRegressor(max_size=size, memory_estimate_period=period)
                if regression else
                tree.HoeffdingTreeClassifier(max_size=size, memory_estimate_period=period))
    if kind == "hat":
        return (tree.HoeffdingAdaptiveTreeRegressor(seed=seed, max_size=size,
                                                    memory_estimate_period=period)
                if regression else
                tree.HoeffdingAdaptiveTreeClassifier(seed=seed, max_size=size,
                                                     memory_estimate_period=period))
    if kind == "arf":
        models = 10  # River's default; the trees share the bound
        return (forest.ARFRegressor(n_models=models, seed=seed, max_size=size / models,
                                    memory_estimate_period=period)
                if regression else
                forest.ARFClassifier(n_models=models, seed=seed, max_size=size / models,
                                     memory_estimate_period=period))
    raise ValueError(f"mixture.learner is one of {', '.join(KINDS)} or off; got {kind!r}")


class OnlineLearner:
    """One of River's incremental learners over flattened inputs.

    `outputs`: the classes of a classifier, or 1 for a regressor (River's regressors are
    single-target). `predict` gives class probabilities (a class never seen gets 0) or values,
    as a float32 tensor of shape (n, outputs), or None before the first label.

    >>> learner = OnlineLearner("ht", regression=False, outputs=2)
    >>> learner.predict(np.zeros((1, 3))) is None
    True
    >>> learner.learn(np.array([[0.0, 1.0, 2.0]] * 5), np.array([1] * 5))
    >>> learner.predict(np.zeros((2, 3))).argmax(1).tolist()
    [1, 1]
    """

    def __init__(self, kind: str, regression: bool, outputs: int, seed: int = 42) -> None:
        if regression and outputs != 1:
            raise ValueError(f"mixture.learner: River's regressors predict one value, this model "
                             f"predicts {outputs}; set mixture.learner = 'off'")
        if not regression and outputs < 2:
            raise ValueError("mixture.learner: a classifier needs two or more classes")
        self.kind = kind
        self.regression = regression
        self.outputs = outputs
        self.seed = seed
        self.model = river_model(kind, regression, seed)
        self.learnt = 0

    @staticmethod
    def _rows(inputs: np.ndarray) -> list[dict[int, float]]:
        flat = np.asarray(inputs, dtype=np.float64).reshape(len(inputs), -1)
        return [dict(enumerate(row)) for row in flat.tolist()]

    def predict(self, inputs: np.ndarray) -> torch.Tensor | None:
        """Each row's prediction, or None before the first label."""
        if not self.learnt:
            return None
        out = np.zeros((len(inputs), self.outputs), dtype=np.float32)
        for i, row in enumerate(self._rows(inputs)):
            if self.regression:
                value = self.model.predict_one(row)
                out[i, 0] = 0.0 if value is None or not np.isfinite(value) else value
                continue
            for label, probability in self.model.predict_proba_one(row).items():
                if 0 <= int(label) < self.outputs and np.isfinite(probability):
                    out[i, int(label)] = probability
            total = out[i].sum()
            out[i] = out[i] / total if total > 0 else 1.0 / self.outputs
        return torch.from_numpy(out)

    def learn(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        """Learn the joined labels (class indices, or values) of these inputs, in order."""
        targets = np.asarray(labels).reshape(len(labels), -1)[:, 0]
        for row, target in zip(self._rows(inputs), targets.tolist(), strict=True):
            if not np.isfinite(target):
                continue
            self.model.learn_one(row, float(target) if self.regression else int(target))
            self.learnt += 1

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "learnt": self.learnt}
