"""AdaNPC: the vote over a hand-made memory, the bound on what the stream adds, and persistence."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.memory.adanpc import AdaNPC
from store import Store

# four unit rows in 2-D: two of class 0 around the x axis, two of class 1 (the y axis and -x)
HAND_FEATURES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
HAND_LABELS = torch.tensor([0, 1, 0, 1])


def hand_memory(**options: object) -> AdaNPC:
    npc = AdaNPC(num_classes=2, feature_dim=2, **options)
    npc.seed(HAND_FEATURES, HAND_LABELS)
    return npc


def one_hot_scores(labels: list[int], num_classes: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(labels), num_classes).float()


def seeded(**options: object) -> tuple[AdaNPC, torch.Tensor]:
    """A 3-class memory of width 4 seeded with one row per class, and a stream of 25 features."""
    npc = AdaNPC(num_classes=3, feature_dim=4, confidence_threshold=0.5, **options)
    npc.seed(torch.eye(4)[:3] + 0.1, torch.tensor([0, 1, 2]))
    stream = torch.randn(25, 4, generator=torch.Generator().manual_seed(0))
    return npc, stream


# class 1 first (5 rows), then class 0 (20 rows): a long run of one class after a short one
STREAM_LABELS = [1] * 5 + [0] * 20


def observe_in_batches(npc: AdaNPC, stream: torch.Tensor, labels: list[int], batch: int = 5) -> int:
    added = 0
    for start in range(0, len(stream), batch):
        scores = one_hot_scores(labels[start:start + batch], npc.num_classes)
        added += npc.observe(stream[start:start + batch], scores)
    return added


# --- the vote ---------------------------------------------------------------------------------


def test_the_vote_is_the_softmax_of_the_top_k_similarities_over_tau_summed_per_label() -> None:
    npc = hand_memory(k=3, temperature=0.1)

    scores = npc.vote(torch.tensor([[0.6, 0.8]]))

    # cosine similarities: (1,0) 0.6, (0,1) 0.8, (1,1)/sqrt2 1.4/sqrt2 = 0.98995, (-1,0) -0.6;
    # the top 3 are 0.98995 (class 0), 0.8 (class 1), 0.6 (class 0)
    diagonal = math.exp(1.4 / math.sqrt(2) / 0.1)
    total = diagonal + math.exp(0.8 / 0.1) + math.exp(0.6 / 0.1)
    expected = [(diagonal + math.exp(6.0)) / total, math.exp(8.0) / total]
    np.testing.assert_allclose(scores.numpy(), [expected], rtol=1e-5)
    np.testing.assert_allclose(scores.numpy(), [[0.872088, 0.127912]], atol=1e-6)


def test_features_are_compared_by_direction_only() -> None:
    npc = hand_memory(k=3, temperature=0.1)

    scores = npc.vote(torch.tensor([[0.6, 0.8], [6.0, 8.0], [0.03, 0.04]]))

    torch.testing.assert_close(scores[1], scores[0])
    torch.testing.assert_close(scores[2], scores[0])


def test_k_larger_than_the_memory_lets_every_row_vote() -> None:
    npc = hand_memory(k=100, temperature=1.0)

    scores = npc.vote(torch.tensor([[0.6, 0.8]]))

    similarity = {"diagonal": 1.4 / math.sqrt(2), "x": 0.6, "y": 0.8, "minus_x": -0.6}
    weight = {name: math.exp(value / 1.0) for name, value in similarity.items()}
    total = sum(weight.values())
    expected = [
        (weight["diagonal"] + weight["x"]) / total,
        (weight["y"] + weight["minus_x"]) / total,
    ]
    np.testing.assert_allclose(scores.numpy(), [expected], rtol=1e-5)


def test_every_vote_sums_to_one_and_a_batch_votes_as_its_rows_alone() -> None:
    npc, stream = seeded(k=2)
    observe_in_batches(npc, stream, STREAM_LABELS)

    batch = npc.vote(stream)

    torch.testing.assert_close(batch.sum(1), torch.ones(len(stream)))
    alone = torch.cat([npc.vote(row[None]) for row in stream])
    torch.testing.assert_close(batch, alone)


def test_an_empty_memory_refuses_to_vote_and_says_to_seed_it() -> None:
    npc = AdaNPC(num_classes=2, feature_dim=2)

    with pytest.raises(RuntimeError, match="seed it"):
        npc.vote(torch.ones(1, 2))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"policy": "lru"}, "unknown memory policy 'lru'"),
        ({"capacity": 5}, "at least one slot per class"),
        ({"k": 0}, "k must be at least 1"),
        ({"temperature": 0.0}, "temperature must be positive"),
    ],
)
def test_settings_that_cannot_work_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaNPC(num_classes=10, feature_dim=4, **options)


def test_features_of_the_wrong_width_and_labels_out_of_range_are_refused() -> None:
    npc = hand_memory()
    with pytest.raises(ValueError, match=r"expected \(n, 2\)"):
        npc.vote(torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"labels must lie in 0..1"):
        npc.seed(torch.ones(2, 2), torch.tensor([0, 2]))


# --- what joins the memory --------------------------------------------------------------------


def test_only_samples_whose_max_score_reaches_beta_join_with_their_predicted_label() -> None:
    npc = hand_memory(confidence_threshold=0.6)
    features = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 2.0], [4.0, 3.0]])
    scores = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.6, 0.4]])

    added = npc.observe(features, scores)

    assert added == 3  # 0.6 reaches 0.6: the reference compares with >=
    assert len(npc) == 4 + 3
    rows = npc.rows()
    np.testing.assert_allclose(rows[:, :2], [[0.6, 0.8], [0.0, 1.0], [0.8, 0.6]], atol=1e-6)
    assert rows[:, 2].tolist() == [0.0, 1.0, 0.0]


def test_observing_its_own_vote_adds_the_confident_samples_of_the_batch() -> None:
    npc = hand_memory(k=3, temperature=0.1, confidence_threshold=0.95)
    features = torch.tensor([[1.0, 0.05], [0.6, 0.8]])
    scores = npc.vote(features)  # the first is near (1,0) and (1,1); the second is 0.87 / 0.13

    assert npc.observe(features, scores) == 1
    assert npc.rows()[:, 2].tolist() == [0.0]


def test_per_class_fifo_keeps_the_newest_rows_of_each_class_and_the_seed() -> None:
    npc, stream = seeded(capacity=6, policy="per_class_fifo")  # 2 slots per class

    added = observe_in_batches(npc, stream, STREAM_LABELS)

    assert added == 25
    assert npc.observed == 25
    assert len(npc) == 3 + 4 and npc.seed_size == 3
    kept = [3, 4, 23, 24]  # the newest two of class 1 and of class 0, in stream order
    np.testing.assert_allclose(npc.rows()[:, :4], F.normalize(stream[kept]).numpy(), atol=1e-6)
    assert npc.rows()[:, 4].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert npc.class_counts() == [3, 3, 1]


def test_fifo_keeps_the_newest_rows_whatever_their_class() -> None:
    npc, stream = seeded(capacity=6, policy="fifo")

    observe_in_batches(npc, stream, STREAM_LABELS)

    assert len(npc) == 3 + 6 and npc.seed_size == 3
    np.testing.assert_allclose(npc.rows()[:, :4], F.normalize(stream[19:]).numpy(), atol=1e-6)
    assert npc.class_counts() == [7, 1, 1]  # the stream's class-1 rows are gone


def test_one_batch_with_more_rows_of_a_class_than_its_slots_keeps_its_newest() -> None:
    npc, stream = seeded(capacity=6)

    assert npc.observe(stream[:5], one_hot_scores([2] * 5, 3)) == 5
    np.testing.assert_allclose(npc.rows()[:, :4], F.normalize(stream[3:5]).numpy(), atol=1e-6)


@pytest.mark.parametrize("policy", ["per_class_fifo", "fifo"])
def test_a_long_stream_never_grows_the_memory_past_its_bound(policy: str) -> None:
    npc = AdaNPC(num_classes=10, feature_dim=8, capacity=200, policy=policy)
    npc.seed(torch.randn(50, 8), torch.arange(50) % 10)
    generator = torch.Generator().manual_seed(1)

    for _ in range(100):
        features = torch.randn(64, 8, generator=generator)
        npc.observe(features, npc.vote(features))

    assert npc.observed == 6400  # beta 0.1 with 10 classes: every sample joins, as in the reference
    assert npc.seed_size == 50
    assert len(npc) - 50 <= 200
    if policy == "per_class_fifo":
        assert all(count - 5 <= 20 for count in npc.class_counts())


def test_without_keep_seed_the_stream_replaces_the_seed_oldest_first() -> None:
    per_class, stream = seeded(capacity=6, keep_seed=False)
    observe_in_batches(per_class, stream, STREAM_LABELS)
    # classes 0 and 1 saw more stream rows than their 2 slots, so their seed rows went first;
    # the stream never predicted class 2, so its seed row stays
    assert per_class.seed_size == 1 and per_class.class_counts() == [2, 2, 1]

    fifo, stream = seeded(capacity=6, policy="fifo", keep_seed=False)
    observe_in_batches(fifo, stream, STREAM_LABELS)
    assert fifo.seed_size == 0 and len(fifo) == 6

    kept, stream = seeded(capacity=6, policy="fifo", keep_seed=True)
    observe_in_batches(kept, stream, STREAM_LABELS)
    assert kept.seed_size == 3 and len(kept) == 9


# --- reset, checkpoints and rows --------------------------------------------------------------


def test_reset_returns_to_exactly_the_seed() -> None:
    npc, stream = seeded(capacity=6, keep_seed=False)
    before = npc.vote(stream)
    observe_in_batches(npc, stream, STREAM_LABELS)
    assert not torch.equal(npc.vote(stream), before)

    npc.reset()

    assert len(npc) == 3 and npc.seed_size == 3 and npc.rows().shape == (0, 5)
    torch.testing.assert_close(npc.vote(stream), before, rtol=0, atol=0)


def test_a_state_dict_restores_the_memory_its_seed_and_its_count() -> None:
    npc, stream = seeded(capacity=6)
    observe_in_batches(npc, stream, STREAM_LABELS)
    state = npc.state_dict()
    assert state["features"].dtype == torch.float32 and state["labels"].dtype == torch.int64

    restored = AdaNPC(num_classes=3, feature_dim=4, confidence_threshold=0.5, capacity=6)
    restored.load_state_dict(state)

    assert restored.observed == 25 and len(restored) == len(npc)
    torch.testing.assert_close(restored.vote(stream), npc.vote(stream), rtol=0, atol=0)
    restored.reset()
    assert len(restored) == 3


def test_rows_since_a_count_are_what_one_observe_added() -> None:
    npc, stream = seeded()
    observe_in_batches(npc, stream[:10], STREAM_LABELS[:10])
    before = npc.observed

    added = npc.observe(stream[10:13], one_hot_scores([0, 2, 1], 3))

    rows = npc.rows(since=before)
    assert added == 3 and rows.shape == (3, 5) and rows.dtype == np.float32
    assert rows[:, 4].tolist() == [0.0, 2.0, 1.0]
    np.testing.assert_array_equal(npc.rows()[-3:], rows)


def test_rows_loaded_into_a_fresh_seeded_memory_give_identical_votes() -> None:
    npc, stream = seeded(capacity=9)
    observe_in_batches(npc, stream, STREAM_LABELS)

    fresh, _ = seeded(capacity=9)
    fresh.load_rows(npc.rows())

    np.testing.assert_array_equal(fresh.rows(), npc.rows())
    torch.testing.assert_close(fresh.vote(stream), npc.vote(stream), rtol=0, atol=0)


def test_loaded_rows_are_bounded_like_observed_ones() -> None:
    npc, stream = seeded(capacity=60)
    observe_in_batches(npc, stream, STREAM_LABELS)

    small, _ = seeded(capacity=6)
    small.load_rows(npc.rows())

    assert len(small) == 3 + 4
    np.testing.assert_array_equal(small.rows(), npc.rows()[[3, 4, 23, 24]])


def test_rows_of_the_wrong_width_or_with_fractional_labels_are_refused() -> None:
    npc, _ = seeded()
    with pytest.raises(ValueError, match=r"expected \(n, 5\)"):
        npc.load_rows(np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="integer class labels"):
        npc.load_rows(np.full((2, 5), 0.5, dtype=np.float32))


# --- persistence through the store (both backends) --------------------------------------------


def test_a_memory_appended_to_a_store_loads_into_a_fresh_replica_with_identical_votes(
    make_store: Callable[..., Store], backend: str
) -> None:
    writer_store = make_store()
    npc, stream = seeded(capacity=8, policy="fifo")
    for start in range(0, 25, 5):
        before = npc.observed
        npc.observe(stream[start:start + 5], one_hot_scores(STREAM_LABELS[start:start + 5], 3))
        writer_store.append_memory(AdaNPC.name, npc.rows(since=before), cap=npc.capacity)

    # another replica, seeded from the same training data, then the store: on Redis it has its own
    # connection to the shared namespace; an embedded store is only ever shared within a process
    shared = backend == "redis"
    reader_store = make_store(namespace=writer_store.namespace) if shared else writer_store
    replica, _ = seeded(capacity=8, policy="fifo")
    replica.load_rows(reader_store.load_memory(AdaNPC.name))

    assert len(replica) == len(npc) == 3 + 8
    np.testing.assert_array_equal(replica.rows(), npc.rows())
    torch.testing.assert_close(replica.vote(stream), npc.vote(stream), rtol=0, atol=0)


def test_an_empty_store_memory_leaves_a_replica_at_its_seed(store: Store) -> None:
    replica, stream = seeded()
    before = replica.vote(stream)

    replica.load_rows(store.load_memory(AdaNPC.name))

    assert len(replica) == 3
    torch.testing.assert_close(replica.vote(stream), before, rtol=0, atol=0)
