"""Nonconformity scores and the sets and intervals they define: LAC, APS, residuals."""

from __future__ import annotations

import math

import numpy as np


def _as_batch(probs: np.ndarray) -> tuple[np.ndarray, bool]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim not in (1, 2) or probs.shape[-1] == 0:
        raise ValueError(f"probabilities must be (classes,) or (samples, classes); "
                         f"got shape {probs.shape}")
    return np.atleast_2d(probs), probs.ndim == 1


def _labels_for(probs: np.ndarray, labels: np.ndarray | int) -> np.ndarray:
    labels = np.atleast_1d(np.asarray(labels)).astype(np.int64)
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"one label per sample: {probs.shape[0]} samples, labels {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}); got {labels.min()}..."
                         f"{labels.max()}")
    return labels


def _aps_cumulative(probs: np.ndarray, u: np.ndarray | float | None) -> np.ndarray:
    """Every class's APS score: the probability of the classes ranked above it, plus its own
    (times u when randomised). Ranks break ties by class index, so the scores are monotone in
    rank and a set {k: score_k ≤ q} is a prefix of the ranking."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    above = np.zeros_like(ranked)
    np.cumsum(ranked[:, :-1], axis=1, out=above[:, 1:])
    if u is None:
        ranked_scores = above + ranked
    else:
        u = np.asarray(u, dtype=np.float64)
        u = u.reshape(-1, 1) if u.ndim else u
        ranked_scores = above + u * ranked
    scores = np.empty_like(ranked_scores)
    np.put_along_axis(scores, order, ranked_scores, axis=1)
    return scores


def lac_scores(probs: np.ndarray, labels: np.ndarray | int) -> np.ndarray:
    """LAC (Sadinle, Lei & Wasserman 2019): 1 − p_y, the smallest sets on average.

    >>> lac_scores(np.array([[0.5, 0.3, 0.2]]), np.array([1])).round(6).tolist()
    [0.7]
    """
    batch, single = _as_batch(probs)
    scores = 1.0 - batch[np.arange(batch.shape[0]), _labels_for(batch, labels)]
    return scores[0] if single else scores


def aps_scores(probs: np.ndarray, labels: np.ndarray | int,
               u: np.ndarray | float | None = None) -> np.ndarray:
    """APS (Romano, Sesia & Candès 2020): the probability mass of the classes ranked above y, plus
    p_y itself (u = None) or u·p_y with u ~ U(0, 1) per sample (randomised: coverage is then exact
    and sets are smaller, at the price of sets that depend on u). Pass the same u to `aps_set` for
    a sample's set and to `aps_scores` for its label, so y ∈ set ⇔ score ≤ threshold.

    >>> probs = np.array([[0.5, 0.3, 0.2]])
    >>> aps_scores(probs, np.array([1])).round(6).tolist()
    [0.8]
    >>> aps_scores(probs, np.array([1]), u=np.array([0.5])).round(6).tolist()
    [0.65]
    """
    batch, single = _as_batch(probs)
    labels = _labels_for(batch, labels)
    scores = _aps_cumulative(batch, u)[np.arange(batch.shape[0]), labels]
    return scores[0] if single else scores


def residual_scores(pred: np.ndarray, y: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """|y − ŷ|, divided by `scale` (a per-sample spread estimate, > 0) when given.

    >>> residual_scores(np.array([1.0, 2.0]), np.array([1.5, 1.0]), scale=np.array([0.5, 2.0]))
    array([1. , 0.5])
    """
    residuals = np.abs(np.asarray(y, dtype=np.float64) - np.asarray(pred, dtype=np.float64))
    if scale is None:
        return residuals
    scale = np.asarray(scale, dtype=np.float64)
    if not np.all(scale > 0) or not np.all(np.isfinite(scale)):
        raise ValueError("scale must be positive and finite for every sample")
    return residuals / scale


def _nonempty(members: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """A set that would be empty holds the argmax class instead: a set always says something."""
    empty = ~members.any(axis=1)
    if empty.any():
        members[empty, np.argmax(probs[empty], axis=1)] = True
    return members


def lac_set(probs: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """The classes with 1 − p_k ≤ q, as a boolean mask like `probs`; never empty. `threshold`
    may be an array broadcast against `probs`: one per class (q_k, Mondrian by class) or one per
    row.

    >>> lac_set(np.array([0.5, 0.3, 0.2]), 0.75).tolist()
    [True, True, False]
    >>> lac_set(np.array([0.5, 0.3, 0.2]), 0.0).tolist()
    [True, False, False]
    """
    batch, single = _as_batch(probs)
    members = _nonempty(1.0 - batch <= threshold, batch)
    return members[0] if single else members


def aps_set(probs: np.ndarray, threshold: float | np.ndarray,
            u: np.ndarray | float | None = None) -> np.ndarray:
    """The classes whose APS score is ≤ q (a prefix of the classes ranked by probability), as a
    boolean mask like `probs`; never empty. `u` as in `aps_scores`.

    >>> aps_set(np.array([0.5, 0.3, 0.2]), 0.8).tolist()
    [True, True, False]
    >>> aps_set(np.array([0.5, 0.3, 0.2]), 0.7, u=0.5).tolist()
    [True, True, False]
    """
    batch, single = _as_batch(probs)
    members = _nonempty(_aps_cumulative(batch, u) <= threshold, batch)
    return members[0] if single else members


def interval(pred: np.ndarray, threshold: float,
             scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The interval ŷ ∓ q (times `scale`, when the scores were scaled residuals).

    >>> lower, upper = interval(np.array([1.0, 2.0]), 0.5, scale=np.array([1.0, 2.0]))
    >>> lower.tolist(), upper.tolist()
    ([0.5, 1.0], [1.5, 3.0])
    """
    if not math.isfinite(threshold):
        raise ValueError(f"an interval needs a finite threshold; got {threshold}")
    half_width = threshold if scale is None else threshold * np.asarray(scale, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    return pred - half_width, pred + half_width


def pinball_loss(score: float, threshold: float, level: float) -> float:
    """The quantile (pinball) loss at `level`: its minimiser over q is the level-quantile of s.

    >>> pinball_loss(2.0, 1.0, 0.9), pinball_loss(0.0, 1.0, 0.9)
    (0.9, 0.09999999999999998)
    """
    return max(level * (score - threshold), (1.0 - level) * (threshold - score))
