"""AdaNPC: the vote over a hand-made memory, what is served, what joins the memory (pseudo-labels
gated by confidence, true labels from joined labels), the bound, and persistence."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.memory.adanpc import VOTE_WEIGHTS, AdaNPC, normalised_confidence
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
        ({"confidence_threshold": 1.5}, r"confidence_threshold must lie in \[0, 1\]"),
        ({"vote_window": 0}, "must be at least 1"),
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


def test_the_normalised_confidence_is_the_way_from_uniform_to_certain_for_any_class_count() -> None:
    two = torch.tensor([[0.5, 0.5], [0.75, 0.25], [0.0, 1.0]])
    ten = torch.tensor([[0.1] * 10, [0.55] + [0.05] * 9, [0.0] * 9 + [1.0]])

    np.testing.assert_allclose(normalised_confidence(two).numpy(), [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(normalised_confidence(ten).numpy(), [0.0, 0.5, 1.0], atol=1e-6)


def test_only_samples_whose_normalised_confidence_reaches_beta_join_with_their_class() -> None:
    npc = hand_memory(confidence_threshold=0.5)
    features = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 2.0], [4.0, 3.0]])
    # normalised confidences 2 max - 1: 0.8, 0.1, 0.5, 0.2
    scores = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.25, 0.75], [0.6, 0.4]])

    added = npc.observe(features, scores)

    assert added == 2  # 0.5 reaches 0.5: >= as in the reference
    assert len(npc) == 4 + 2
    rows = npc.rows()
    np.testing.assert_allclose(rows[:, :2], [[0.6, 0.8], [0.0, 1.0]], atol=1e-6)
    assert rows[:, 2].tolist() == [0.0, 1.0]  # pseudo-labels, packed as themselves
    assert npc.describe()["labelled_rows"] == 0


def test_beta_means_the_same_with_ten_classes_a_max_of_point_one_never_joins() -> None:
    npc = AdaNPC(num_classes=10, feature_dim=2, confidence_threshold=0.5)
    npc.seed(torch.eye(2).repeat(5, 1), torch.arange(10))
    uniform = torch.full((2, 10), 0.1)
    half = torch.tensor([[0.55] + [0.05] * 9, [0.5] + [0.5 / 9] * 9])  # c = 0.5, then below

    assert npc.observe(torch.ones(2, 2), uniform) == 0  # the reference's beta 0.1 admitted both
    assert npc.observe(torch.ones(2, 2), half) == 1


def test_observing_its_own_vote_adds_the_confident_samples_of_the_batch() -> None:
    npc = hand_memory(k=3, temperature=0.1, confidence_threshold=0.9)
    features = torch.tensor([[1.0, 0.05], [0.6, 0.8]])
    scores = npc.vote(features)  # the first is near (1,0) and (1,1); the second is 0.87 / 0.13

    assert npc.observe(features, scores) == 1  # c = 2 max - 1: above 0.99, then 0.74
    assert npc.rows()[:, 2].tolist() == [0.0]


def test_joined_labels_join_with_their_true_class_packed_negative() -> None:
    npc = hand_memory()
    before = npc.observed

    added = npc.learn(torch.tensor([[3.0, 4.0], [-1.0, 0.2]]), torch.tensor([1, 0]))

    assert added == 2 and npc.observed == before + 2
    rows = npc.rows(since=before)
    np.testing.assert_allclose(rows[:, :2], F.normalize(torch.tensor([[3.0, 4.0], [-1.0, 0.2]])),
                               atol=1e-6)
    assert rows[:, 2].tolist() == [-2.0, -1.0]  # y packed as -1 - y: true labels 1 and 0
    assert npc.class_counts() == [3, 3] and npc.describe()["labelled_rows"] == 2


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
    npc.confidence_threshold = 0.0  # every sample joins
    for _ in range(100):
        features = torch.randn(64, 8, generator=generator)
        npc.observe(features, npc.vote(features))

    assert npc.observed >= 6400
    assert npc.seed_size == 50
    assert len(npc) - 50 <= 200
    if policy == "per_class_fifo":
        assert all(count - 5 <= 20 for count in npc.class_counts())


def test_without_keep_seed_the_seed_counts_against_the_bound_and_outranks_pseudo_labels() -> None:
    per_class, stream = seeded(capacity=6, keep_seed=False)
    observe_in_batches(per_class, stream, STREAM_LABELS)
    # 2 slots per class: classes 0 and 1 keep their seed row (a true label) and their newest
    # pseudo-label row; the stream never predicted class 2, so its seed row stays alone
    assert per_class.seed_size == 3 and per_class.class_counts() == [2, 2, 1]
    np.testing.assert_allclose(per_class.rows()[:, :4], F.normalize(stream[[4, 24]]).numpy(),
                               atol=1e-6)

    fifo, stream = seeded(capacity=6, policy="fifo", keep_seed=False)
    observe_in_batches(fifo, stream, STREAM_LABELS)
    assert fifo.seed_size == 3 and len(fifo) == 6
    np.testing.assert_allclose(fifo.rows()[:, :4], F.normalize(stream[22:]).numpy(), atol=1e-6)

    kept, stream = seeded(capacity=6, policy="fifo", keep_seed=True)
    observe_in_batches(kept, stream, STREAM_LABELS)
    assert kept.seed_size == 3 and len(kept) == 9


def test_a_class_over_its_slots_drops_its_pseudo_labels_before_its_true_labels() -> None:
    npc, stream = seeded(capacity=6)  # 2 slots per class
    npc.learn(stream[:1], torch.tensor([0]))  # the oldest row of class 0, a true label
    npc.observe(stream[1:4], one_hot_scores([0, 0, 0], 3))  # three newer pseudo-labels

    rows = npc.rows()
    assert rows[:, 4].tolist() == [-1.0, 0.0]  # the true label and the newest pseudo-label
    np.testing.assert_allclose(rows[:, :4], F.normalize(stream[[0, 3]]).numpy(), atol=1e-6)

    npc.learn(stream[4:7], torch.tensor([0, 0, 0]))  # true labels only: the newest two stay
    np.testing.assert_allclose(npc.rows()[:, :4], F.normalize(stream[5:7]).numpy(), atol=1e-6)
    assert npc.rows()[:, 4].tolist() == [-1.0, -1.0]


def test_fifo_drops_pseudo_labels_of_any_class_before_true_labels() -> None:
    npc, stream = seeded(capacity=3, policy="fifo")
    npc.learn(stream[:2], torch.tensor([2, 1]))
    npc.observe(stream[2:6], one_hot_scores([0, 0, 1, 0], 3))

    assert npc.rows()[:, 4].tolist() == [-3.0, -2.0, 0.0]  # the two true labels, then the newest


def test_a_run_of_one_class_fills_only_its_own_slots() -> None:
    npc = AdaNPC(num_classes=10, feature_dim=8, capacity=100, confidence_threshold=0.8)
    npc.seed(torch.randn(10, 8), torch.arange(10))
    generator = torch.Generator().manual_seed(3)
    others = torch.randn(30, 8, generator=generator)
    npc.observe(others, one_hot_scores([1, 2, 3] * 10, 10))

    for _ in range(20):  # 1,280 confident samples of class 0 in a row
        npc.observe(torch.randn(64, 8, generator=generator), one_hot_scores([0] * 64, 10))

    counts = npc.class_counts()
    assert counts[0] == 1 + 10  # its seed row and its 10 slots, whatever the run's length
    assert counts[1:4] == [11, 11, 11]  # the other classes' rows are all still there


# --- what is served: the model's output, moved towards the vote as joined labels justify ------


def vote_right_model_wrong(npc: AdaNPC, count: int, start: int = 0) -> tuple[torch.Tensor, ...]:
    """`count` samples near class 1's seed rows on which the model says class 0 (wrongly)."""
    angles = torch.linspace(1.45, 1.57, count + start)[start:]  # votes of 0.89 to 0.95 for 1
    features = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    model = torch.tensor([[0.6, 0.4]]).repeat(count, 1)
    return features, model, torch.ones(count, dtype=torch.long)


def test_without_joined_labels_the_model_is_served_unchanged() -> None:
    npc = hand_memory(k=3)
    features, model, _ = vote_right_model_wrong(npc, 8)

    served = npc.predict(features, model)

    assert npc.vote(features).argmax(1).tolist() == [1] * 8  # the vote disagrees with the model
    torch.testing.assert_close(served, model, rtol=0, atol=0)
    assert npc.vote_weight == 0.0


def test_the_vote_gets_weight_once_labels_show_it_right_significantly_more_often() -> None:
    npc = hand_memory(k=3, min_labels=4)
    features, model, labels = vote_right_model_wrong(npc, 6)
    npc.predict(features, model)

    npc.learn(features[:3], labels[:3])
    assert npc.vote_weight == 0.0  # 3 labels: fewer than min_labels

    npc.learn(features[3:], labels[3:])
    # 6 labels where weights 0.5 to 1 are right and 0 wrong: gain 6 >= 2 sqrt(6), and the smallest
    # of them wins; at 0.25 the first sample stays class 0 (0.4 + 0.25 c(q) (q_1 - 0.4) < 0.5)
    assert npc.vote_weight == 0.5
    more, model_more, _ = vote_right_model_wrong(npc, 4, start=6)
    served = npc.predict(more, model_more)
    q = npc.vote(more)
    c = 2 * q.max(1).values[:, None] - 1
    torch.testing.assert_close(served, (1 - 0.5 * c) * model_more + 0.5 * c * q)
    assert served.argmax(1).tolist() == [1] * 4
    torch.testing.assert_close(served.sum(1), torch.ones(4))


def test_a_vote_that_labels_show_wrong_never_gets_weight() -> None:
    npc = hand_memory(k=3, min_labels=4)
    features, model, _ = vote_right_model_wrong(npc, 40)
    npc.predict(features, model)

    npc.learn(features, torch.zeros(40, dtype=torch.long))  # the model was right every time

    assert npc.vote_weight == 0.0
    assert npc.predict(features, model).argmax(1).tolist() == [0] * 40


def test_a_gain_within_chance_is_not_taken() -> None:
    npc = hand_memory(k=3, min_labels=4)
    right, model, ones = vote_right_model_wrong(npc, 5)
    npc.predict(right, model)
    npc.learn(right, ones)  # the vote right 5 times where the model was wrong
    assert npc.vote_weight == 0.5
    wrong, model_wrong, _ = vote_right_model_wrong(npc, 3, start=5)
    npc.predict(wrong, model_wrong)

    npc.learn(wrong, torch.zeros(3, dtype=torch.long))  # and wrong 3 times where it was right

    # gain 5 - 3 = 2 on 8 discordant labels: below 2 sqrt(8), so back to the model alone
    assert npc.vote_weight == 0.0


def test_labels_of_samples_it_did_not_serve_add_rows_but_no_evidence() -> None:
    npc = hand_memory(k=3, min_labels=1)
    features, _, labels = vote_right_model_wrong(npc, 10)

    assert npc.learn(features, labels) == 10

    assert npc.vote_weight == 0.0 and npc.describe()["labelled_rows"] == 10


def test_a_reset_returns_the_vote_weight_to_zero() -> None:
    npc = hand_memory(k=3, min_labels=4)
    features, model, labels = vote_right_model_wrong(npc, 8)
    npc.predict(features, model)
    npc.learn(features, labels)
    assert npc.vote_weight > 0

    npc.reset()

    assert npc.vote_weight == 0.0 and len(npc) == 4
    assert VOTE_WEIGHTS[0] == 0.0


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


def test_true_and_pseudo_label_rows_survive_packing_and_rows_stored_before_load_as_pseudo() -> None:
    npc, stream = seeded(capacity=9)
    npc.learn(stream[:3], torch.tensor([2, 0, 1]))
    npc.observe(stream[3:6], one_hot_scores([1, 1, 0], 3))

    fresh, _ = seeded(capacity=9)
    fresh.load_rows(npc.rows())
    assert fresh.rows()[:, 4].tolist() == [-3.0, -1.0, -2.0, 1.0, 1.0, 0.0]
    assert fresh.describe()["labelled_rows"] == 3
    torch.testing.assert_close(fresh.vote(stream), npc.vote(stream), rtol=0, atol=0)

    # rows stored before true labels were kept: labels 0..C-1, all read as pseudo-labels
    old = np.concatenate([F.normalize(stream[:2]).numpy(), [[2.0], [0.0]]], axis=1)
    fresh.load_rows(old.astype(np.float32))
    assert fresh.rows()[:, 4].tolist() == [2.0, 0.0]
    assert fresh.class_counts() == [2, 1, 2] and fresh.describe()["labelled_rows"] == 0


def test_a_state_dict_without_the_labelled_flags_loads_its_added_rows_as_pseudo_labels() -> None:
    npc, stream = seeded(capacity=6)
    npc.learn(stream[:2], torch.tensor([0, 1]))
    state = npc.state_dict()
    assert state["labelled"].tolist() == [True] * 5
    del state["labelled"]  # a checkpoint saved before true labels were kept

    restored = AdaNPC(num_classes=3, feature_dim=4, capacity=6)
    restored.load_state_dict(state)

    assert restored.rows()[:, 4].tolist() == [0.0, 1.0]
    assert restored.seed_size == 3


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
    npc, stream = seeded(capacity=30, policy="fifo")  # room for every row: none leaves
    for start in range(0, 25, 5):
        before = npc.observed
        npc.observe(stream[start:start + 5], one_hot_scores(STREAM_LABELS[start:start + 5], 3))
        npc.learn(stream[start:start + 1], torch.tensor([2]))  # a joined label
        writer_store.append_memory(AdaNPC.name, npc.rows(since=before), cap=npc.capacity)

    # another replica, seeded from the same training data, then the store: on Redis it has its own
    # connection to the shared namespace; an embedded store is only ever shared within a process
    shared = backend == "redis"
    reader_store = make_store(namespace=writer_store.namespace) if shared else writer_store
    replica, _ = seeded(capacity=30, policy="fifo")
    replica.load_rows(reader_store.load_memory(AdaNPC.name))

    assert len(replica) == len(npc) == 3 + 30
    np.testing.assert_array_equal(replica.rows(), npc.rows())
    assert (replica.rows()[:, 4] == -3.0).sum() == 5  # every joined label, still a true label
    assert replica.describe()["labelled_rows"] == 5
    torch.testing.assert_close(replica.vote(stream), npc.vote(stream), rtol=0, atol=0)


def test_an_empty_store_memory_leaves_a_replica_at_its_seed(store: Store) -> None:
    replica, stream = seeded()
    before = replica.vote(stream)

    replica.load_rows(store.load_memory(AdaNPC.name))

    assert len(replica) == 3
    torch.testing.assert_close(replica.vote(stream), before, rtol=0, atol=0)
