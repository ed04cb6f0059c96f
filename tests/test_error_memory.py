"""ReLoop2 error memory: the estimate over a hand-made memory, the bound, trimming, persistence,
and the hashed sketch against the exact memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adapters.memory.error_memory import ErrorMemory, HashedErrorMemory, build_error_memory

# three keys in 2-D: the x axis, the y axis and the diagonal; the query (0.6, 0.8) has cosine
# similarities 0.6, 0.8 and 1.4 / sqrt(2) = 0.989949 to them, so with K = 2 the diagonal and the
# y axis are its neighbours, weighted softmax([0.989949, 0.8] / 0.1)
KEYS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
QUERY = torch.tensor([[0.6, 0.8]])
DIAGONAL_WEIGHT = 1.0 / (1.0 + math.exp((0.8 - 1.4 / math.sqrt(2)) / 0.1))
Y_AXIS_WEIGHT = 1.0 - DIAGONAL_WEIGHT

CLASS_LABELS = torch.tensor([0, 1, 1])
CLASS_PREDICTIONS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
VALUE_LABELS = torch.tensor([1.0, 2.0, 3.0])
VALUE_PREDICTIONS = torch.tensor([1.5, 1.5, 1.5])


def classification_memory(**options: object) -> ErrorMemory:
    memory = ErrorMemory(feature_dim=2, output_dim=2, k=2, temperature=0.1, **options)
    memory.add(KEYS, CLASS_LABELS, CLASS_PREDICTIONS)
    return memory


def regression_memory(**options: object) -> ErrorMemory:
    memory = ErrorMemory(feature_dim=2, output_dim=1, task="regression", k=2, temperature=0.1,
                         **options)
    memory.add(KEYS, VALUE_LABELS, VALUE_PREDICTIONS)
    return memory


def random_rows(count: int, seed: int = 0, width: int = 4, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(count, width, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    predictions = torch.softmax(torch.randn(count, classes, generator=generator), 1)
    return features, labels, predictions


# --- the estimate, by hand --------------------------------------------------------------------


def test_the_neighbour_weights_are_the_softmax_of_the_top_k_similarities_over_tau() -> None:
    assert DIAGONAL_WEIGHT == pytest.approx(0.869834, abs=1e-6)
    memory = classification_memory(gamma=0.0, compensation_weight=1.0)

    # with gamma = 0 the error is ȳ - ȳ_base, which exposes the weights: both neighbours are
    # labelled 1, so ȳ = (0, 1), and ȳ_base = 0.869834 (0.3, 0.7) + 0.130166 (0.6, 0.4)
    error = memory.error_estimate(QUERY, torch.tensor([[0.5, 0.5]]))

    base = DIAGONAL_WEIGHT * np.array([0.3, 0.7]) + Y_AXIS_WEIGHT * np.array([0.6, 0.4])
    np.testing.assert_allclose(error.numpy(), [np.array([0.0, 1.0]) - base], rtol=1e-5)
    np.testing.assert_allclose(error.numpy(), [[-0.339050, 0.339050]], atol=1e-6)


def test_gamma_one_corrects_toward_the_neighbours_labels() -> None:
    memory = classification_memory(gamma=1.0, compensation_weight=0.5)

    corrected = memory.compensate(QUERY, torch.tensor([[0.8, 0.2]]))

    # ȳ = (0, 1); y_err = ȳ - ŷ = (-0.8, 0.8); ŷ + 0.5 y_err = (0.4, 0.6)
    np.testing.assert_allclose(corrected.numpy(), [[0.4, 0.6]], atol=1e-6)


def test_gamma_zero_adds_the_neighbours_mean_error_whatever_the_query_predicts() -> None:
    memory = classification_memory(gamma=0.0, compensation_weight=0.5)

    corrected = memory.compensate(QUERY.repeat(2, 1), torch.tensor([[0.8, 0.2], [0.6, 0.4]]))

    shift = 0.5 * 0.339050
    np.testing.assert_allclose(corrected.numpy(),
                               [[0.8 - shift, 0.2 + shift], [0.6 - shift, 0.4 + shift]], atol=1e-6)


def test_probabilities_are_clamped_to_zero_one_then_renormalised() -> None:
    memory = ErrorMemory(feature_dim=2, output_dim=3, k=1, gamma=0.0, compensation_weight=1.0)
    # one row: true class 2, predicted (0.6, 0.3, 0.1): its error is (-0.6, -0.3, 0.9)
    memory.add(torch.tensor([[1.0, 0.0]]), torch.tensor([2]), torch.tensor([[0.6, 0.3, 0.1]]))

    corrected = memory.compensate(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.2, 0.5, 0.3]]))

    # ŷ + y_err = (-0.4, 0.2, 1.2) -> clamped (0, 0.2, 1) -> divided by 1.2
    np.testing.assert_allclose(corrected.numpy(), [[0.0, 0.2 / 1.2, 1.0 / 1.2]], atol=1e-6)


def test_regression_uses_the_same_estimate_unclamped() -> None:
    query_prediction = torch.tensor([2.0])

    toward_labels = regression_memory(gamma=1.0, compensation_weight=0.5)
    with_base = regression_memory(gamma=0.0, compensation_weight=0.5)

    # ȳ = 0.869834 * 3 + 0.130166 * 2 = 2.869834; ȳ_base = 1.5
    label_mean = 2.0 + DIAGONAL_WEIGHT
    gamma_one = toward_labels.compensate(QUERY, query_prediction)
    gamma_zero = with_base.compensate(QUERY, query_prediction)
    assert gamma_one.shape == (1,)
    assert float(gamma_one) == pytest.approx(2.0 + 0.5 * (label_mean - 2.0), abs=1e-5)
    assert float(gamma_one) == pytest.approx(2.434917, abs=1e-5)
    assert float(gamma_zero) == pytest.approx(2.0 + 0.5 * (label_mean - 1.5), abs=1e-5)
    assert float(gamma_zero) == pytest.approx(2.684917, abs=1e-5)


def test_an_empty_memory_returns_the_predictions_unchanged() -> None:
    memory = ErrorMemory(feature_dim=2, output_dim=3)
    predictions = torch.softmax(torch.randn(5, 3), 1)

    corrected = memory.compensate(torch.randn(5, 2), predictions)

    assert torch.equal(corrected, predictions)


def test_features_are_compared_by_direction_only() -> None:
    memory = classification_memory()
    prediction = torch.tensor([[0.8, 0.2]])

    near = memory.compensate(QUERY, prediction)
    scaled = memory.compensate(QUERY * 25.0, prediction)

    torch.testing.assert_close(scaled, near)


def test_logits_instead_of_probabilities_are_refused() -> None:
    memory = classification_memory()

    with pytest.raises(ValueError, match="softmax"):
        memory.compensate(QUERY, torch.tensor([[2.0, -1.0]]))


# --- the bound, trimming, reset ---------------------------------------------------------------


def test_the_memory_keeps_only_the_newest_capacity_rows() -> None:
    memory = ErrorMemory(feature_dim=4, output_dim=3, capacity=50)
    features, labels, predictions = random_rows(130)

    for start in range(0, 130, 7):
        memory.add(features[start:start + 7], labels[start:start + 7],
                   predictions[start:start + 7])

    assert len(memory) == 50
    assert memory.observed == 130
    kept = memory.rows()
    np.testing.assert_allclose(kept[:, :4], torch.nn.functional.normalize(features[80:]).numpy(),
                               atol=1e-6)
    np.testing.assert_array_equal(kept[:, 4:7].argmax(1), labels[80:].numpy())


def test_a_batch_larger_than_the_capacity_keeps_its_newest_rows() -> None:
    memory = ErrorMemory(feature_dim=4, output_dim=3, capacity=10)
    features, labels, predictions = random_rows(25)

    memory.add(features, labels, predictions)

    assert len(memory) == 10
    np.testing.assert_allclose(memory.rows()[:, 7:], predictions[15:].numpy(), atol=1e-7)


@pytest.mark.parametrize("kind", ["exact", "hashed"])
def test_storage_stops_growing_at_the_capacity(kind: str) -> None:
    memory = build_error_memory(kind, feature_dim=4, output_dim=3, capacity=64)
    features, labels, predictions = random_rows(640)

    memory.add(features[:64], labels[:64], predictions[:64])
    at_capacity = memory.nbytes
    for start in range(64, 640, 64):
        memory.add(features[start:start + 64], labels[start:start + 64],
                   predictions[start:start + 64])

    assert len(memory) == 64
    assert memory.nbytes == at_capacity


def test_trim_keeps_the_newest_rows_in_order() -> None:
    memory = ErrorMemory(feature_dim=4, output_dim=3, capacity=40)
    features, labels, predictions = random_rows(70)
    memory.add(features, labels, predictions)  # 30 rows wrapped around the ring

    memory.trim(keep_recent=15)

    assert len(memory) == 15
    np.testing.assert_allclose(memory.rows()[:, 7:], predictions[55:].numpy(), atol=1e-7)
    memory.add(features[:5], labels[:5], predictions[:5])  # still FIFO after a trim
    assert len(memory) == 20
    np.testing.assert_allclose(memory.rows()[-5:, 7:], predictions[:5].numpy(), atol=1e-7)


def test_trim_to_more_than_the_memory_holds_changes_nothing() -> None:
    memory = classification_memory()
    before = memory.rows()

    memory.trim(keep_recent=100)

    np.testing.assert_array_equal(memory.rows(), before)


def test_reset_empties_the_memory() -> None:
    memory = classification_memory()

    memory.reset()

    assert len(memory) == 0
    assert memory.rows().shape == (0, 6)


# --- persistence ------------------------------------------------------------------------------


def test_rows_round_trip_into_a_fresh_memory() -> None:
    memory = ErrorMemory(feature_dim=4, output_dim=3, capacity=40)
    features, labels, predictions = random_rows(70)
    memory.add(features, labels, predictions)
    queries, _, query_predictions = random_rows(8, seed=1)

    restored = ErrorMemory(feature_dim=4, output_dim=3, capacity=40)
    restored.load_rows(memory.rows())

    np.testing.assert_array_equal(restored.rows(), memory.rows())
    assert torch.equal(restored.compensate(queries, query_predictions),
                       memory.compensate(queries, query_predictions))


def test_rows_since_are_what_one_add_contributed() -> None:
    memory = classification_memory()
    before = memory.observed

    memory.add(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), torch.tensor([[0.5, 0.5]]))

    added = memory.rows(since=before)
    np.testing.assert_allclose(added, [[1.0, 0.0, 1.0, 0.0, 0.5, 0.5]])


def test_rows_of_the_wrong_width_are_refused() -> None:
    memory = ErrorMemory(feature_dim=4, output_dim=3)

    with pytest.raises(ValueError, match=r"expected \(n, 10\)"):
        memory.load_rows(np.zeros((2, 7), dtype=np.float32))


@pytest.mark.parametrize("kind", ["exact", "hashed"])
def test_state_dict_round_trip(kind: str) -> None:
    memory = build_error_memory(kind, feature_dim=4, output_dim=3, capacity=40)
    features, labels, predictions = random_rows(70)
    memory.add(features, labels, predictions)
    queries, _, query_predictions = random_rows(8, seed=1)

    restored = build_error_memory(kind, feature_dim=4, output_dim=3, capacity=40)
    restored.load_state_dict(memory.state_dict())

    assert restored.observed == 70
    np.testing.assert_array_equal(restored.rows(), memory.rows())
    torch.testing.assert_close(restored.compensate(queries, query_predictions),
                               memory.compensate(queries, query_predictions))


# --- the hashed sketch ------------------------------------------------------------------------


def test_hashed_agrees_with_exact_when_neighbours_share_their_key() -> None:
    # two clusters of identical keys on opposite directions: SimHash puts x and -x in
    # complementary buckets in every table, and the exact memory gives the far cluster a weight
    # of exp(-2 / tau) ~ 2e-9
    keys = torch.tensor([[1.0, 2.0, 0.5]] * 4 + [[-1.0, -2.0, -0.5]] * 3)
    labels = torch.tensor([3.0, 5.0, 4.0, 6.0, -1.0, -2.0, -3.0])
    predictions = torch.tensor([4.0, 4.0, 4.0, 4.0, 0.0, 0.0, 0.0])
    exact = ErrorMemory(feature_dim=3, output_dim=1, task="regression", k=4, gamma=0.5)
    hashed = HashedErrorMemory(feature_dim=3, output_dim=1, task="regression", gamma=0.5)
    for memory in (exact, hashed):
        memory.add(keys, labels, predictions)
    queries = torch.tensor([[2.0, 4.0, 1.0], [-0.5, -1.0, -0.25]])
    query_predictions = torch.tensor([3.0, -1.0])

    from_exact = exact.compensate(queries, query_predictions)
    from_hashed = hashed.compensate(queries, query_predictions)

    # first cluster: ȳ = 4.5, ȳ_base = 4: 3 + 0.5 (0.5 (4.5 - 3) + 0.5 (4.5 - 4)) = 3.5
    # second: ȳ = -2, ȳ_base = 0: -1 + 0.5 (0.5 (-2 + 1) + 0.5 (-2 - 0)) = -1.75
    np.testing.assert_allclose(from_hashed.numpy(), [3.5, -1.75], atol=1e-6)
    np.testing.assert_allclose(from_exact.numpy(), from_hashed.numpy(), atol=1e-6)


def test_hashed_classification_keeps_probability_rows() -> None:
    memory = HashedErrorMemory(feature_dim=4, output_dim=3, compensation_weight=0.9, gamma=0.0)
    features, labels, predictions = random_rows(500)
    memory.add(features, labels, predictions)
    queries, _, query_predictions = random_rows(64, seed=2)

    corrected = memory.compensate(queries, query_predictions)

    assert bool((corrected >= 0).all())
    torch.testing.assert_close(corrected.sum(1), torch.ones(64))


def test_hashed_sums_forget_rows_that_leave_the_window() -> None:
    small = HashedErrorMemory(feature_dim=4, output_dim=3, capacity=30)
    features, labels, predictions = random_rows(100)
    small.add(features, labels, predictions)

    fresh = HashedErrorMemory(feature_dim=4, output_dim=3, capacity=30)
    fresh.add(features[70:], labels[70:], predictions[70:])
    queries, _, query_predictions = random_rows(16, seed=3)

    torch.testing.assert_close(small.error_estimate(queries, query_predictions),
                               fresh.error_estimate(queries, query_predictions))


def test_hashed_memory_after_trim_matches_one_built_from_the_kept_rows() -> None:
    memory = HashedErrorMemory(feature_dim=4, output_dim=3, capacity=60)
    features, labels, predictions = random_rows(60)
    memory.add(features, labels, predictions)

    memory.trim(keep_recent=20)

    fresh = HashedErrorMemory(feature_dim=4, output_dim=3, capacity=60)
    fresh.add(features[40:], labels[40:], predictions[40:])
    queries, _, query_predictions = random_rows(16, seed=4)
    torch.testing.assert_close(memory.error_estimate(queries, query_predictions),
                               fresh.error_estimate(queries, query_predictions))


def test_hashed_query_with_no_colliding_row_is_not_corrected() -> None:
    memory = HashedErrorMemory(feature_dim=2, output_dim=1, task="regression", bits=16, tables=1)
    memory.add(torch.tensor([[1.0, 0.0]]), torch.tensor([10.0]), torch.tensor([0.0]))

    corrected = memory.compensate(torch.tensor([[-1.0, 0.0]]), torch.tensor([1.0]))

    assert float(corrected) == 1.0


# --- choosing a kind --------------------------------------------------------------------------


def test_build_error_memory_names_the_kinds_and_their_options() -> None:
    assert isinstance(build_error_memory("exact", feature_dim=2, output_dim=2), ErrorMemory)
    with pytest.raises(ValueError, match="exact, hashed"):
        build_error_memory("faiss", feature_dim=2, output_dim=2)
    with pytest.raises(ValueError, match=r"no option \['k'\]"):
        build_error_memory("hashed", feature_dim=2, output_dim=2, k=10)


def test_a_batch_of_64_queries_against_10k_rows_runs_in_one_pass() -> None:
    memory = ErrorMemory(feature_dim=32, output_dim=10)
    generator = torch.Generator().manual_seed(0)
    memory.add(torch.randn(10_000, 32, generator=generator),
               torch.randint(0, 10, (10_000,), generator=generator),
               torch.softmax(torch.randn(10_000, 10, generator=generator), 1))

    corrected = memory.compensate(torch.randn(64, 32, generator=generator),
                                  torch.softmax(torch.randn(64, 10, generator=generator), 1))

    assert corrected.shape == (64, 10)
    torch.testing.assert_close(corrected.sum(1), torch.ones(64))


def test_a_feature_mean_is_subtracted_before_comparing_directions() -> None:
    # around the mean (10, 10) the keys (11, 10) and (10, 11) point along x and y; uncentred
    # they would be almost parallel
    memory = ErrorMemory(feature_dim=2, output_dim=1, task="regression", k=1,
                         compensation_weight=1.0, feature_mean=torch.tensor([10.0, 10.0]))
    memory.add(torch.tensor([[11.0, 10.0], [10.0, 11.0]]), torch.tensor([1.0, -1.0]),
               torch.tensor([0.0, 0.0]))

    corrected = memory.compensate(torch.tensor([[10.0, 12.0], [13.0, 10.1]]),
                                  torch.tensor([0.0, 0.0]))

    np.testing.assert_allclose(corrected.numpy(), [-1.0, 1.0])
    np.testing.assert_allclose(memory.rows()[:, :2], [[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("kind", ["exact", "hashed"])
def test_packed_rows_added_later_are_what_add_would_have_stored(kind: str) -> None:
    torch.manual_seed(3)
    features, labels = torch.randn(20, 6), torch.randint(0, 3, (20,))
    predictions = torch.softmax(torch.randn(20, 3), 1)
    direct = build_error_memory(kind, feature_dim=6, output_dim=3, feature_mean=torch.ones(6))
    packed = build_error_memory(kind, feature_dim=6, output_dim=3, feature_mean=torch.ones(6))
    direct.add(features, labels, predictions)
    packed.add_rows(packed.pack(features, labels, predictions))
    assert len(packed) == 20 and packed.observed == 20
    np.testing.assert_array_equal(packed.rows(), direct.rows())
    query = torch.randn(4, 6)
    base = torch.softmax(torch.randn(4, 3), 1)
    torch.testing.assert_close(packed.compensate(query, base), direct.compensate(query, base))


def test_recency_lets_the_newest_of_equally_similar_errors_count_most():
    """Two rows with the same key and opposite errors: by similarity alone they cancel; with a
    half-life of one row the newer weighs twice the older, and the older leaves the top-K when
    rows as similar and newer arrive."""
    from adapters.memory.error_memory import ErrorMemory

    key = torch.tensor([[1.0, 0.0]])
    def memory(half_life):
        m = ErrorMemory(feature_dim=2, output_dim=1, task="regression", k=2,
                        compensation_weight=1.0, half_life=half_life)
        m.add(key, torch.tensor([1.0]), torch.tensor([[0.0]]))  # older: the model was 1 low
        m.add(key, torch.tensor([-1.0]), torch.tensor([[0.0]]))  # newer: 1 high
        return m

    assert float(memory(None).compensate(key, torch.tensor([[0.0]]))) == pytest.approx(0.0)
    # weights 1/3 and 2/3: (1/3)(+1) + (2/3)(-1)
    assert float(memory(1.0).compensate(key, torch.tensor([[0.0]]))) == pytest.approx(-1 / 3)
    recent = memory(1.0)
    recent.add(key, torch.tensor([-1.0]), torch.tensor([[0.0]]))
    assert float(recent.compensate(key, torch.tensor([[0.0]]))) == pytest.approx(-1.0)
    assert recent.describe()["half_life"] == 1.0
    with pytest.raises(ValueError, match="half_life must be positive"):
        ErrorMemory(feature_dim=2, output_dim=1, task="regression", half_life=0.0)


def test_a_classifiers_rows_age_only_with_rows_of_their_own_label():
    """Classes in runs: a run of class 1 must not age class 0's rows away. Three rows of class 0
    at the query's key, then fifty of class 1 at a key 0.6 as similar: counted over all rows,
    class 0's rows would be fifty rows old (logit bias -17 at a half-life of 2, below class 1's
    rows) and the query would be corrected towards class 1; counted within their label they are
    0 to 2 rows old and remain its neighbours. A regressor's rows age with every row."""
    from adapters.memory.error_memory import ErrorMemory

    memory = ErrorMemory(feature_dim=2, output_dim=2, k=3, compensation_weight=0.5,
                         half_life=2.0)
    near, far = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]])
    memory.add(near.repeat(3, 1), torch.zeros(3, dtype=torch.long), torch.full((3, 2), 0.5))
    memory.add(far.repeat(50, 1), torch.ones(50, dtype=torch.long), torch.full((50, 2), 0.5))
    assert memory._age()[:3].tolist() == [2.0, 1.0, 0.0]
    corrected = memory.compensate(near, torch.tensor([[0.5, 0.5]]))
    assert corrected[0, 0] == pytest.approx(0.75)  # 0.5 + 0.5 * (1 - 0.5): class 0's labels
    # a ring buffer that wrapped, then trimmed and reloaded: every age is the count of live
    # rows of its label added after it
    generator = torch.Generator().manual_seed(0)
    ring = ErrorMemory(feature_dim=2, output_dim=3, k=3, capacity=5, half_life=2.0)
    for _ in range(4):
        labels = torch.randint(0, 3, (3,), generator=generator)
        ring.add(torch.randn(3, 2, generator=generator), labels, torch.full((3, 3), 1 / 3))

    def brute(memory):
        labels = memory._targets[:memory._size].argmax(dim=1)
        sequence = memory._sequence[:memory._size]
        return [float(((labels == labels[i]) & (sequence > sequence[i])).sum())
                for i in range(memory._size)]

    assert ring._age().tolist() == brute(ring)
    ring.trim(keep_recent=3)
    assert ring._age().tolist() == brute(ring)
    reloaded = ErrorMemory(feature_dim=2, output_dim=3, k=3, capacity=5, half_life=2.0)
    reloaded.load_state_dict(ring.state_dict())
    assert reloaded._age().tolist() == brute(reloaded) == ring._age().tolist()
    regressor = ErrorMemory(feature_dim=2, output_dim=1, task="regression", k=3, half_life=2.0)
    regressor.add(near.repeat(3, 1), torch.zeros(3), torch.zeros(3))
    regressor.add(far.repeat(50, 1), torch.ones(50), torch.zeros(50))
    assert regressor._age()[:3].tolist() == [52.0, 51.0, 50.0]


def test_a_hashed_memory_with_a_half_life_stops_the_start_saying_why():
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine
    from tests.harness import settings_for

    settings = settings_for(error_memory={"kind": "hashed", "half_life": 100})
    metrics = Metrics()
    with pytest.raises(ValueError, match="set kind = 'exact' or unset half_life"):
        build_engine(settings, metrics, EventLog(metrics))
