"""The cosine top-k vote over a memory of feature rows, shared by AdaNPC and the error memory.

Both memories hold L2-normalised feature rows m_j and answer a query z the same way:

    s_j = <z / |z|, m_j>                                     cosine similarity, j = 1..M
    N_k(z) = the k largest s_j                               (k is capped at M)
    w_j = exp(s_j / tau) / sum_{i in N_k} exp(s_i / tau)     for j in N_k(z)

AdaNPC sums w_j per stored label (a class vote); the error memory averages stored targets and
outputs with the same weights. A per-key `bias` b_j is added to s_j / tau before both the top-k
and the softmax: the error memory's recency, b_j = −ln 2 · age_j / half_life, so a row's weight
halves with every `half_life` rows added after it, and older rows leave the neighbourhood when
newer ones are nearly as similar.
"""

from __future__ import annotations

import torch


def checked_features(features: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """Feature rows for a memory: float32 on the CPU, shape (n, feature_dim), all finite."""
    features = torch.as_tensor(features).detach().to("cpu", torch.float32)
    if features.ndim != 2 or features.shape[1] != feature_dim:
        raise ValueError(
            f"features have shape {tuple(features.shape)}; expected (n, {feature_dim}), the "
            "input of the model's last linear layer for each sample"
        )
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinity")
    return features


def cosine_top_k(queries: torch.Tensor, keys: torch.Tensor, k: int, temperature: float,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights (n, K) over each query's K = min(k, M) most similar keys (by similarity /
    temperature + bias), and their row indices (n, K). Queries and keys must already be
    L2-normalised.

    >>> keys = torch.eye(3)
    >>> weights, index = cosine_top_k(torch.tensor([[1.0, 0.0, 0.0]]), keys, k=2, temperature=0.1)
    >>> index.tolist(), round(float(weights[0, 0]), 5)
    ([[0, 1]], 0.99995)
    """
    logits = queries @ keys.T / temperature  # (n, M) cosine similarities over tau
    if bias is not None:
        logits = logits + bias
    top_logits, top_index = logits.topk(min(k, len(keys)), dim=1)
    return torch.softmax(top_logits, dim=1), top_index
