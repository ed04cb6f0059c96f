"""Classes in runs: the class-run filter (`adapter.runs = "filter"`) and robust statistics whose
layers move by graded momenta (`adapter.norm_layers = "graded"`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from adapters.tta.norm import RobustBatchNorm, class_run_scales, configure_norm, grade_momenta
from adapters.tta.runs import ClassRunFilter
from drift import Alarm
from service.demo import digits_split
from service.settings import Settings
from tests.harness import built_engine


def noisy_votes(labels: np.ndarray, accuracy: float, classes: int, seed: int = 0) -> torch.Tensor:
    """A model's probabilities: right with `accuracy`, else a random other class, 0.7 on the
    class voted for and the rest spread."""
    rng = np.random.default_rng(seed)
    voted = np.where(rng.random(len(labels)) < accuracy, labels,
                     (labels + rng.integers(1, classes, len(labels))) % classes)
    probs = np.full((len(labels), classes), 0.3 / (classes - 1))
    probs[np.arange(len(labels)), voted] = 0.7
    return torch.from_numpy(probs).float()


def error(probs: torch.Tensor, labels: np.ndarray) -> float:
    return float((probs.argmax(1).numpy() != labels).mean())


def test_shuffled_traffic_is_served_as_the_model_answers() -> None:
    labels = np.random.default_rng(1).integers(0, 10, 3000)
    model = noisy_votes(labels, 0.6, 10)
    runs = ClassRunFilter(10)
    served = runs.filter(model)
    assert float((served.argmax(1) == model.argmax(1)).float().mean()) > 0.99
    assert runs.stickiness() < 0.1


def test_classes_in_runs_are_answered_better_than_by_the_model() -> None:
    labels = np.repeat(np.random.default_rng(2).integers(0, 10, 30), 100)  # runs of 100
    model = noisy_votes(labels, 0.6, 10)
    runs = ClassRunFilter(10)
    served = runs.filter(model)
    assert error(model, labels) == pytest.approx(0.4, abs=0.03)
    assert error(served, labels) < 0.5 * error(model, labels)
    assert runs.stickiness() > 0.9


def test_a_new_run_takes_over_within_a_few_samples() -> None:
    runs = ClassRunFilter(3)
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 200))
    after = runs.filter(torch.tensor([[0.1, 0.8, 0.1]] * 10)).argmax(1).tolist()
    assert after[-1] == 1 and after.index(1) <= 4


def test_a_repeated_request_keeps_the_models_answer() -> None:
    runs = ClassRunFilter(10)
    answer = torch.full((1, 10), 0.05)
    answer[0, 7] = 0.55
    served = torch.cat([runs.filter(answer) for _ in range(500)])
    assert (served.argmax(1) == 7).all()


def test_a_filter_without_commit_ends_as_it_began() -> None:
    runs = ClassRunFilter(3)
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 50))
    before = (runs.mix.copy(), runs.sequence().posterior.copy(), runs.belief.copy(),
              runs.filtered)
    first = runs.filter(torch.tensor([[0.2, 0.7, 0.1]] * 5), commit=False)
    again = runs.filter(torch.tensor([[0.2, 0.7, 0.1]] * 5), commit=False)
    assert torch.equal(first, again)
    after = (runs.mix, runs.sequence().posterior, runs.belief, runs.filtered)
    assert all(np.array_equal(a, b) for a, b in zip(before[:3], after[:3], strict=True))
    assert before[3] == after[3] == 50


def test_reset_forgets_the_runs_and_a_row_without_mass_passes_unchanged() -> None:
    runs = ClassRunFilter(3)
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 100))
    runs.reset()
    assert runs.stickiness() == pytest.approx(np.mean([0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99]))
    assert np.allclose(runs.mix, 1 / 3)
    zero = torch.zeros(1, 3)
    assert torch.equal(runs.filter(zero), zero)


@pytest.mark.parametrize("kwargs", [
    {"num_classes": 1}, {"num_classes": 3, "stickiness": (0.5, 0.9)},
    {"num_classes": 3, "stickiness": (0.0, 1.0)}, {"num_classes": 3, "share": 1.0},
    {"num_classes": 3, "window": 0},
])
def test_filter_settings_that_cannot_work_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        ClassRunFilter(**kwargs)


def served_with_labels(runs: ClassRunFilter, model: torch.Tensor, labels: np.ndarray,
                       labelled: np.ndarray, delay: int = 100, request: int = 16) -> torch.Tensor:
    """The filter over `model`'s rows, `request` at a time, learning the labels of the rows in
    `labelled` `delay` rows after they were served, as the label path gives them."""
    served, places = [], []
    for start in range(0, len(model), request):
        rows, placed = runs.filter_and_place(model[start:start + request])
        served.append(rows)
        places.append(placed)
        back = np.arange(start - delay, start - delay + request)
        back = back[(back >= 0) & labelled[np.clip(back, 0, None)]]
        if len(back):
            runs.learn_labels(np.concatenate(places)[back], labels[back])
    return torch.cat(served)


def test_labels_that_show_shuffled_classes_keep_a_shift_of_the_models_mix_from_looking_like_a_run(
        ) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 3000)
    model = noisy_votes(labels, 0.75, 10, seed=3)
    shifted = slice(1500, 2000)  # the model now answers class 0 for half the rows, as after a
    favoured = rng.random(500) < 0.5  # new corruption: no run of the classes, a change of its mix
    model[shifted][favoured] = torch.tensor([0.7] + [0.3 / 9] * 9)
    alone = ClassRunFilter(10).filter(model)
    labelled = rng.random(3000) < 0.1
    runs = ClassRunFilter(10)
    taught = served_with_labels(runs, model, labels, labelled)
    rows = labels[shifted]
    assert error(alone[shifted], rows) > error(model[shifted], rows) + 0.03  # taken for a run
    assert error(taught[shifted], rows) <= error(model[shifted], rows) + 0.005
    assert runs.pairs > 200 and runs.describe()["labelled_stickiness"] < 0.05


def test_labels_in_runs_serve_the_runs_as_the_filter_does_without_them() -> None:
    labels = np.repeat(np.random.default_rng(2).integers(0, 10, 30), 100)
    model = noisy_votes(labels, 0.6, 10)
    alone = ClassRunFilter(10).filter(model)
    runs = ClassRunFilter(10)
    taught = served_with_labels(runs, model, labels, np.random.default_rng(4).random(3000) < 0.1)
    assert runs.pairs > 200 and runs.describe()["labelled_stickiness"] > 0.9
    assert torch.equal(taught.argmax(1), alone.argmax(1))  # labels veto no run the model shows


def test_what_labels_said_fades_once_they_stop_coming() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 10, 1000)
    shuffled = noisy_votes(labels, 0.75, 10, seed=5)
    runs, unlabelled = ClassRunFilter(10), ClassRunFilter(10)
    served_with_labels(runs, shuffled, labels, rng.random(1000) < 0.2)
    unlabelled.filter(shuffled)
    assert runs.describe()["labelled_stickiness"] < 0.05
    in_runs = np.repeat(rng.integers(0, 10, 20), 100)  # then classes in runs, and no labels
    model = noisy_votes(in_runs, 0.6, 10, seed=6)
    served, without = runs.filter(model), unlabelled.filter(model)
    assert runs.describe()["labelled_stickiness"] == pytest.approx(np.mean(runs.rho), abs=0.01)
    # vetoed for `window` rows after the last label, then faded: from row 500 on as without
    late = slice(500, None)
    assert error(served[late], in_runs[late]) <= error(without[late], in_runs[late]) + 0.01
    assert error(without[late], in_runs[late]) < error(model[late], in_runs[late]) - 0.2


def test_labels_of_rows_the_filter_did_not_place_teach_it_nothing() -> None:
    runs = ClassRunFilter(3)
    _, first = runs.filter_and_place(torch.tensor([[0.8, 0.1, 0.1]] * 4))
    other = first.copy()
    other[:, 0] = (other[:, 0] + 1) % 2**24  # another process's sequence
    unfiltered = first[:2].copy()
    unfiltered[:, 1] += 4  # the places of the next two rows, not filtered yet
    bad = first.copy()
    bad[0, 1] = np.nan
    assert runs.learn_labels(other, np.array([0, 1, 2, 0])) == 0
    assert runs.learn_labels(unfiltered, np.array([0, 1])) == 0
    assert runs.learn_labels(first, np.array([0.5, -1, 3, np.nan])) == 0  # not classes
    assert runs.learn_labels(bad[:2], np.array([0, 1])) == 0  # row 0 unplaced: no pair for row 1
    # a label pairs with the nearest labelled row before it: row 0 has none, row 2 has row 1
    assert runs.learn_labels(first[[0, 2]], np.array([0, 2])) == 1
    assert runs.learn_labels(first[[2, 3]], np.array([2, 1])) == 1  # row 2's label again: none
    assert runs.pairs == 2
    runs.reset()  # a new sequence: the places before it are another's
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 4))
    assert runs.learn_labels(first, np.array([0, 1, 2, 0])) == 0 and runs.pairs == 0


def test_placed_rows_carry_the_token_of_their_stretch_of_positions() -> None:
    from adapters.tta.runs import PLACES

    runs = ClassRunFilter(3)
    sequence = runs.sequence()
    sequence.filtered = PLACES - 1
    _, places = runs.filter_and_place(torch.tensor([[0.8, 0.1, 0.1]] * 2))
    assert places[0].tolist() == [sequence.token, PLACES - 1]
    assert places[1].tolist() == [(sequence.token + 1) % PLACES, 0]
    assert places.dtype == np.float32


def test_labels_keep_teaching_across_the_boundary_of_two_stretches_of_positions() -> None:
    from adapters.tta.runs import PLACES

    runs = ClassRunFilter(3, remembered=8)
    runs.sequence().filtered = PLACES - 20
    labels = np.zeros(40, dtype=np.int64)
    places = []
    for start in range(0, 40, 4):  # 40 rows across the boundary, each labelled 8 rows later
        places.append(runs.filter_and_place(torch.tensor([[0.8, 0.1, 0.1]] * 4))[1])
        if start >= 8:
            back = slice(start - 8, start - 4)
            learnt = runs.learn_labels(np.concatenate(places)[back], labels[back])
            assert learnt == (3 if start == 8 else 4)  # the first label pairs with none
    assert runs.pairs == 31 and len(runs.sequence().labelled) == 8


def test_a_filter_without_commit_keeps_what_labels_said() -> None:
    runs = ClassRunFilter(3, window=10)
    shuffled = np.random.default_rng(8).integers(0, 3, 40)
    _, places = runs.filter_and_place(noisy_votes(shuffled, 0.8, 3, seed=8))
    runs.learn_labels(places, shuffled)
    runs.filter(noisy_votes(shuffled[:20], 0.8, 3, seed=9))  # past the window: fading
    before = runs.label_belief.copy()
    runs.filter(noisy_votes(shuffled[:5], 0.8, 3, seed=10), commit=False)
    assert np.array_equal(before, runs.label_belief)
    runs.filter(noisy_votes(shuffled[:5], 0.8, 3, seed=10))
    assert not np.array_equal(before, runs.label_belief)  # committed, it fades


def test_labels_sent_back_teach_the_services_filter_whether_classes_run(backend, request) -> None:
    import asyncio
    import uuid

    from tests.harness import serving, settings_for

    store = {"url": request.getfixturevalue("redis_server").url,
             "namespace": f"runs-{uuid.uuid4().hex[:8]}"} if backend == "redis" else {}
    x, y, _, _ = digits_split()
    order = np.random.default_rng(7).permutation(len(x))[:320]  # shuffled classes

    async def serve() -> tuple[dict, int, list[int]]:
        async with serving(settings_for(store=store, drift={"enabled": False})) as (client, app):
            joined = []
            for start in range(0, len(order), 16):
                rows = order[start:start + 16]
                ids = [f"r{i}" for i in rows]
                reply = await client.post("/v1/predict", json={"inputs": x[rows].tolist(),
                                                               "ids": ids})
                assert reply.status_code == 200
                if start >= 32:  # every label back two requests late
                    back = order[start - 32:start - 16]
                    join = await client.post("/v1/feedback", json={"labels": [
                        {"id": f"r{i}", "label": int(y[i])} for i in back]})
                    joined.append(join.json()["joined"])
            state = (await client.get("/v1/state")).json()["learning"]["runs"]
            return state, app.state.runtime.engine.runs.pairs, joined

    state, pairs, joined = asyncio.run(serve())
    assert sum(joined) == 288
    assert pairs == 287 and state["labelled_pairs"] == pairs  # every label after the first
    assert state["labelled_stickiness"] < 0.1


def test_a_retried_row_is_placed_nowhere() -> None:
    from service.engine import RUNS_PLACE

    with built_engine(Settings(drift={"enabled": False})) as engine:
        x, _, _, _ = digits_split()
        assert engine.runs is not None
        served = engine.forward(x[:8])
        places = served.arrays[RUNS_PLACE]
        assert places.shape == (8, 2) and places[:, 1].tolist() == list(range(8))
        assert RUNS_PLACE not in engine.forward(x[8:12], adapt=False).arrays
        assert engine.forward(x[12:14]).arrays[RUNS_PLACE][:, 1].tolist() == [8, 9]


def interleaved(runs_of: list[np.ndarray], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The rows of several callers' streams, each in order, dealt at random: (labels, groups)."""
    rng = np.random.default_rng(seed)
    left = [list(labels) for labels in runs_of]
    labels, groups = [], []
    while any(left):
        caller = int(rng.choice([c for c, rows in enumerate(left) if rows]))
        labels.append(left[caller].pop(0))
        groups.append(f"camera-{caller}")
    return np.array(labels), groups


def test_each_group_is_followed_as_a_sequence_of_its_own() -> None:
    rng = np.random.default_rng(11)
    cameras = [np.repeat(rng.integers(0, 10, 10), 100) for _ in range(8)]  # each in runs
    labels, groups = interleaved(cameras)
    model = noisy_votes(labels, 0.6, 10, seed=11)
    apart, together = ClassRunFilter(10), ClassRunFilter(10)
    by_group, mixed = apart.filter(model, groups=groups), together.filter(model)
    # interleaved, the runs are not runs: the filter without groups serves the model's answers
    assert error(mixed, labels) > error(model, labels) - 0.02
    assert error(by_group, labels) < 0.5 * error(model, labels)
    assert apart.describe()["groups"] == 8 and "groups" not in together.describe()
    assert apart.filtered == len(labels) and apart.sequence("camera-3").filtered == 1000


def test_rows_of_no_group_are_filtered_as_they_were() -> None:
    labels = np.repeat(np.random.default_rng(3).integers(0, 10, 20), 50)
    model = noisy_votes(labels, 0.6, 10, seed=3)
    assert torch.equal(ClassRunFilter(10).filter(model),
                       ClassRunFilter(10).filter(model, groups=[None] * len(labels)))


def test_labels_pair_within_their_groups_sequence() -> None:
    rng = np.random.default_rng(12)
    cameras = [np.repeat(rng.integers(0, 10, 4), 100) for _ in range(6)]
    labels, groups = interleaved(cameras, seed=12)
    model = noisy_votes(labels, 0.6, 10, seed=12)
    runs = ClassRunFilter(10)
    _, places = runs.filter_and_place(model, groups=groups)
    assert runs.learn_labels(places, labels) == len(labels) - 6  # each camera's first: no pair
    assert runs.describe()["labelled_stickiness"] > 0.9  # globally they alternate; apart, runs


def test_a_group_beyond_the_last_kept_is_forgotten_and_its_labels_teach_nothing() -> None:
    runs = ClassRunFilter(3, groups=2)
    _, first = runs.filter_and_place(torch.tensor([[0.8, 0.1, 0.1]] * 4),
                                     groups=["a", "b", "a", "b"])
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 2), groups=["b", "c"])  # "a" served least lately
    assert runs.describe()["groups"] == 2
    assert runs.learn_labels(first[[0, 2]], np.array([0, 0])) == 0  # a's rows: forgotten
    assert runs.learn_labels(first[[1, 3]], np.array([0, 0])) == 1  # b's still pair
    assert runs.sequence("a").filtered == 0  # a new sequence if it comes back


def test_a_group_seen_first_in_a_batch_not_committed_is_not_kept() -> None:
    runs = ClassRunFilter(3)
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 3), commit=False, groups=["x"] * 3)
    assert "groups" not in runs.describe() and runs.filtered == 0
    with pytest.raises(ValueError, match="2 groups for 3 rows"):
        runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 3), groups=["x", "y"])


def test_rows_that_teach_nothing_are_served_by_the_filter_as_it_stands() -> None:
    runs = ClassRunFilter(3)
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 30))
    before = (runs.mix.copy(), runs.belief.copy(), runs.sequence().posterior.copy())
    again = torch.tensor([[0.6, 0.3, 0.1]] * 1000)  # one request sent again and again
    learn = np.zeros(1000, dtype=bool)
    served, places = runs.filter_and_place(again, learn=learn)
    assert (places == -1).all() and runs.filtered == 30
    assert runs.learn_labels(places[:2], np.array([0, 0])) == 0
    assert np.array_equal(before[0], runs.mix) and np.array_equal(before[1], runs.belief)
    assert np.array_equal(before[2], runs.sequence().posterior)
    assert torch.allclose(served, served[:1].expand_as(served))  # every copy served alike


def test_the_service_follows_the_groups_its_callers_name() -> None:
    import asyncio

    from tests.harness import serving, settings_for

    x, y, _, _ = digits_split()
    fours, sevens = x[y == 4][:32], x[y == 7][:32]

    async def serve() -> tuple[dict, list[int]]:
        async with serving(settings_for(drift={"enabled": False})) as (client, _):
            answers = []
            for start in range(0, 32, 4):  # two cameras, one request each in turn
                for group, rows in (("gate-4", fours), ("gate-7", sevens)):
                    reply = await client.post("/v1/predict", json={
                        "inputs": rows[start:start + 4].tolist(), "group": group})
                    assert reply.status_code == 200
                    answers += [p["prediction"] for p in reply.json()["predictions"]]
            return (await client.get("/v1/state")).json()["learning"]["runs"], answers

    state, answers = asyncio.run(serve())
    assert state["groups"] == 2 and state["filtered"] == 64
    assert answers.count(4) + answers.count(7) >= 60


# --- graded momenta ------------------------------------------------------------------------------

def demo_model() -> nn.Module:
    from safetensors.torch import load_file

    from service.demo import WEIGHTS_PATH, digits_cnn

    model = digits_cnn()
    model.load_state_dict(load_file(str(WEIGHTS_PATH)))
    return model.eval()


def test_the_layers_whose_statistics_are_mostly_the_class_get_the_smallest_momenta() -> None:
    x, y, _, _ = digits_split()
    model = demo_model()
    by_labels = class_run_scales(model, torch.from_numpy(x), torch.from_numpy(y))
    by_predictions = class_run_scales(model, torch.from_numpy(x))
    assert by_labels[0] == 1.0 and by_labels[0] > by_labels[1] > by_labels[2] > 0.05
    assert by_predictions == pytest.approx(by_labels, abs=0.02)
    grade_momenta(model, by_labels)
    robust = configure_norm(model, "robust", 0.02)
    momenta = [m.momentum for m in robust.modules() if isinstance(m, RobustBatchNorm)]
    assert momenta == pytest.approx([0.02 * s for s in by_labels])


def test_scales_need_two_classes_and_one_per_layer() -> None:
    model = demo_model()
    x, y, _, _ = digits_split()
    one_class = torch.from_numpy(x[y == 3])
    assert class_run_scales(model, one_class, torch.full((len(one_class),), 3)) == [1.0] * 3
    with pytest.raises(ValueError, match="3 BatchNorm layers"):
        grade_momenta(model, [1.0, 0.5])


def test_the_engine_serves_through_the_filter_and_says_so() -> None:
    settings = Settings(adapter={"name": "bn", "runs": "filter", "norm_layers": "graded"},
                        drift={"enabled": False})
    with built_engine(settings) as engine:
        momenta = [m.momentum for m in engine.model.module.modules()
                   if isinstance(m, RobustBatchNorm)]
        assert momenta[0] == pytest.approx(0.02) and momenta[2] < 0.005
        x, y, _, _ = digits_split()
        run = x[y == 4][:60]
        served = engine.forward(run).predictions
        assert engine.runs is not None and engine.runs.filtered == 60
        assert engine.describe_learning()["runs"] == engine.runs.describe()
        assert engine.warnings == []
        assert float((served == 4).mean()) > 0.9
        before = engine.runs.belief.copy()
        engine.forward(x[:5], adapt=False)  # teaches nothing: the filter does not move
        assert engine.runs.filtered == 60 and np.array_equal(before, engine.runs.belief)
        engine.reset_adapter()
        assert np.allclose(engine.runs.mix, 0.1)


def test_settings_that_do_nothing_are_said() -> None:
    settings = Settings(adapter={"name": "bn", "norm": "balanced", "norm_layers": "graded"},
                        drift={"enabled": False})
    with built_engine(settings) as engine:
        assert any("norm_layers = 'graded'" in w for w in engine.warnings)
        momenta = [m.momentum for m in engine.model.module.modules()
                   if isinstance(m, RobustBatchNorm)]
        assert momenta == [0.02] * 3  # balanced moves its own averages: nothing graded


@pytest.mark.parametrize(("adapter", "filtered"), [
    ({"name": "bn"}, True), ({"name": "tent+adanpc"}, True), ({"name": "none"}, False),
    ({"name": "adanpc"}, False), ({"name": "bn", "runs": "off"}, False),
    ({"name": "none", "runs": "filter"}, True), ({"name": "bn", "norm": "batch"}, True),
])
def test_by_default_the_filter_serves_where_an_adapter_runs(adapter, filtered) -> None:
    with built_engine(Settings(adapter=adapter, drift={"enabled": False})) as engine:
        assert (engine.runs is not None) == filtered
        assert engine.warnings == []


def test_a_batch_of_one_image_repeated_is_served_as_the_image_alone() -> None:
    from adapters.tta.bn import NormStatistics

    adapter = NormStatistics(demo_model(), norm="robust")
    x, _, _, _ = digits_split()
    image = torch.from_numpy(x[:1])
    alone = adapter.infer(image)
    copies = adapter.infer(image.repeat(16, 1, 1, 1))
    assert torch.allclose(copies, alone.expand(16, -1), atol=1e-5)
    layers = [m for m in adapter.model.modules() if isinstance(m, RobustBatchNorm)]
    assert all(m.fixed_momentum is None and m.commit for m in layers)


class TwoHeads(nn.Module):
    """BatchNorm layers the scales cannot measure: one no forward reaches, one reached twice,
    and one without running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.shared = nn.BatchNorm1d(8)
        self.unused = nn.BatchNorm1d(8)
        self.batchwise = nn.BatchNorm1d(8, track_running_stats=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.batchwise(self.shared(self.shared(self.first(x)))))


def two_heads() -> nn.Module:
    return TwoHeads().eval()


def test_layers_that_cannot_be_measured_keep_the_full_momentum() -> None:
    x = torch.randn(200, 4)
    assert class_run_scales(two_heads(), x, torch.arange(200) % 3) == [1.0, 1.0]
    robust = configure_norm(two_heads(), "robust")  # the batch-wise layer stays as it was
    assert isinstance(robust.batchwise, nn.BatchNorm1d)
    assert robust(torch.randn(2, 4)).shape == (2, 3)


def test_a_model_without_batchnorm_gets_no_filter_by_default_and_is_told(tmp_path) -> None:
    from safetensors.torch import save_file

    reference = tmp_path / "reference.safetensors"
    save_file({"inputs": torch.randn(64, 4)}, str(reference))
    model = {"factory": "tests.models:poisoned", "name": "mlp", "input_shape": [4],
             "num_classes": 3, "reference_data": str(reference)}
    # by default: no adapter at all
    with built_engine(Settings(model=model, drift={"enabled": False})) as engine:
        assert engine.settings.adapter.name == engine.adapter.name == "none"
        assert engine.runs is None and engine.warnings == []
    # asked for: it serves the model as trained, and says so
    asked = Settings(model=model, adapter={"name": "bn"}, drift={"enabled": False})
    with built_engine(asked) as engine:
        assert engine.adapter.name == "bn" and engine.runs is None
        assert any(w.startswith("adapter bn finds no BatchNorm") for w in engine.warnings)


BINARY = {"factory": "tests.models:binary", "name": "bin", "task": "classification",
          "input_shape": [4], "num_classes": 2}


@pytest.mark.parametrize(("model", "adapter", "resolved"), [
    ({}, "auto", "bn"),  # the demo CNN: BatchNorm2d after each convolution
    (BINARY, "auto", "none"),  # an MLP's BatchNorm1d over features
    ({}, "auto+adanpc", "bn+adanpc"),
    (BINARY, "bn", "bn"),  # a name that is not auto is kept
])
def test_auto_picks_test_time_batchnorm_where_it_normalises_over_positions(
        model, adapter, resolved) -> None:
    settings = Settings(model=model or Settings().model, adapter={"name": adapter},
                        drift={"enabled": False})
    with built_engine(settings) as engine:
        assert engine.settings.adapter.name == resolved
        assert engine.adapter.name == resolved.split("+")[0].replace("adanpc", "none")
        assert (engine.adanpc is not None) == resolved.endswith("adanpc")


def test_the_service_reports_the_adapter_auto_chose() -> None:
    import asyncio

    from tests.harness import serving, settings_for

    async def scenario(model: dict) -> tuple[str, dict]:
        async with serving(settings_for(model=model)) as (client, app):
            state = (await client.get("/v1/state")).json()
            name = app.state.settings.model.name
            metadata = (await client.get(f"/v2/models/{name}")).json()
            return state["adapter"]["name"], metadata

    for model, chosen in ((BINARY, "none"), ({}, "bn")):
        adapter, metadata = asyncio.run(scenario(model))
        assert adapter == metadata["parameters"]["adapter"] == chosen


def test_the_probe_counts_positions_and_leaves_the_model_as_it_was() -> None:
    from adapters.tta.norm import normalises_over_positions

    sequence = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3))  # over time steps
    pooled = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(3))
    assert normalises_over_positions(sequence, (2, 8))
    assert not normalises_over_positions(pooled, (1, 6, 6))  # one value a channel: per feature
    model = demo_model().train()
    model[1].eval()  # modes that differ by module come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert normalises_over_positions(model, (1, 16, 16))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and not model[1].training


@pytest.mark.parametrize("name", ["bn+auto", "auto+tent", "auto+auto", "adanpc+auto"])
def test_auto_comes_first_and_only_adanpc_follows_it(name) -> None:
    with pytest.raises(ValueError, match="'auto' chooses the method"):
        Settings(adapter={"name": name})


def test_the_comparison_with_the_source_judges_what_learns_before_the_filter() -> None:
    from service.engine import BEFORE_RUNS

    with built_engine(Settings(drift={"enabled": False})) as engine:
        x, y, _, _ = digits_split()
        out = engine.forward(x[y == 2][:40])
        assert engine.source is not None and engine.runs is not None
        before = out.arrays[BEFORE_RUNS]
        assert before.shape == out.outputs.shape and not np.allclose(before, out.outputs)


def test_psmt_serves_a_batch_of_one_image_repeated_as_the_image_alone() -> None:
    from adapters.tta.psmt import PSMT

    x, _, _, _ = digits_split()
    adapter = PSMT(demo_model(), reference=torch.from_numpy(x[:256]))
    image = torch.from_numpy(x[:1])
    alone = adapter.infer(image)
    copies = adapter.infer(image.repeat(16, 1, 1, 1))
    assert torch.allclose(copies, alone.expand(16, -1), atol=1e-4)


def test_a_gradient_adapter_learns_slower_within_a_run_than_on_shuffled_traffic() -> None:
    """A batch within a run is mostly one class: the test-time adapter's rate is damped by
    1 − the filter's stickiness; a drift boost multiplies on top; the supervised step, which
    learns from true labels, keeps its own rate."""
    settings = Settings(adapter={"name": "tent", "learning_rate": 1e-3, "runs": "filter"},
                        supervised={"enabled": True, "learning_rate": 2e-3},
                        drift={"enabled": False})
    x, y, x_test, _ = digits_split()
    with built_engine(settings) as engine:
        assert engine.supervised is not None
        for start in range(0, 64, 16):  # shuffled: the rate stays about the base
            engine.forward(x_test[start:start + 16])
        shuffled = engine.adapter.learning_rate
        for k in (4, 7, 1):
            run = x[y == k][:48]
            for start in range(0, len(run), 16):
                engine.forward(run[start:start + 16])
        stickiness = engine.runs.stickiness()  # what the next batch's rate is damped by
        engine.forward(x[y == 1][48:64])
        damped = engine.adapter.learning_rate
        engine.forward(x[:8], adapt=False)  # a retry teaches nothing and moves no rate
        unchanged = engine.adapter.learning_rate
        supervised = engine.supervised.learning_rate
    assert shuffled == pytest.approx(1e-3, rel=0.01)  # a stickiness of about 0 there
    assert stickiness > 0.5 and damped < 0.5e-3
    assert damped == pytest.approx(1e-3 * (1 - stickiness), rel=1e-6)
    assert unchanged == damped and supervised == 2e-3


def test_an_adapter_that_steps_on_a_class_balanced_memory_keeps_its_rate_in_runs() -> None:
    settings = Settings(adapter={"name": "rotta", "learning_rate": 1e-3, "runs": "filter"},
                        drift={"enabled": False})
    x, y, _, _ = digits_split()
    with built_engine(settings) as engine:
        assert engine.adapter.balanced_steps
        for k in (4, 7):
            run = x[y == k][:48]
            for start in range(0, len(run), 16):
                engine.forward(run[start:start + 16])
        assert engine.runs is not None and engine.runs.stickiness() > 0.5
        assert engine.adapter.learning_rate == 1e-3



def test_the_damping_multiplies_a_drift_boost_and_a_reset_brings_the_base_rate_back() -> None:
    from drift.detectors import Alarm

    settings = Settings(adapter={"name": "tent", "learning_rate": 1e-3, "runs": "filter"},
                        drift={"policy": {"boost": 4.0, "half_life": 1e9}})
    x, y, _, _ = digits_split()
    with built_engine(settings) as engine:
        assert engine.drift is not None and engine.runs is not None
        for k in (4, 7):
            run = x[y == k][:48]
            for start in range(0, len(run), 16):
                engine.forward(run[start:start + 16])
        error = Alarm("adwin", "error", True, sample=96, update=96, time=0.0, statistic=None,
                      estimate=0.5)
        engine._act(engine.drift.policy.on_alarm(error, now=engine.drift.samples))
        engine.forward(x[y == 7][48:64])
        boosted = engine.adapter.learning_rate
        stickiness = engine.runs.stickiness()  # the drift monitor re-applies the rates after it
        engine.reset_adapter()  # the filter forgets the runs: no evidence, no damping
        after_reset = engine.adapter.learning_rate
    assert stickiness > 0.5
    assert boosted == pytest.approx(4e-3 * (1 - stickiness), rel=1e-3)
    assert after_reset == pytest.approx(4e-3)  # the boost in force stays, undamped


def test_a_repeated_requests_label_still_joins_and_teaches_the_filter_nothing() -> None:
    import asyncio

    from tests.harness import serving, settings_for

    x, _, _, _ = digits_split()

    async def serve() -> tuple[dict, dict]:
        async with serving(settings_for(drift={"enabled": False})) as (client, app):
            for i, rows in enumerate((x[:2], x[:2], x[2:4])):  # the second request repeats
                reply = await client.post("/v1/predict", json={
                    "inputs": rows.tolist(), "ids": [f"r{i}a", f"r{i}b"]})
                assert reply.status_code == 200
            join = await client.post("/v1/feedback", json={"labels": [
                {"id": f"r{i}{s}", "label": 1} for i in range(3) for s in "ab"]})
            return join.json(), (await client.get("/v1/state")).json()["learning"]["runs"]

    join, runs = asyncio.run(serve())
    assert join["joined"] == 6 and join["rejected"] == []
    assert runs["filtered"] == 4  # the repeated request moved nothing
    assert runs["labelled_pairs"] == 3  # the four rows placed: each label after the first


def test_a_batch_of_more_groups_than_are_kept_places_rows_in_the_sequences_it_keeps() -> None:
    runs = ClassRunFilter(3, groups=1)
    _, places = runs.filter_and_place(torch.tensor([[0.8, 0.1, 0.1]] * 4),
                                      groups=["a", "b", "a", "b"])
    assert runs.describe()["groups"] == 1  # "a", served least lately, forgotten after the batch
    assert runs.learn_labels(places[[1, 3]], np.array([0, 0])) == 1  # b's rows pair
    assert runs.learn_labels(places[[0, 2]], np.array([0, 0])) == 0  # a's: forgotten
    assert places[[1, 3], 1].tolist() == [0, 1]


def test_a_batch_not_committed_changes_which_group_is_forgotten_next_not() -> None:
    runs = ClassRunFilter(3, groups=2)
    one = torch.tensor([[0.8, 0.1, 0.1]])
    _, a = runs.filter_and_place(one, groups=["a"])
    _, b = runs.filter_and_place(one, groups=["b"])
    runs.filter(one, commit=False, groups=["a"])  # a retry: "a" stays the least recently served
    runs.filter(one, groups=["c"])
    assert runs.learn_labels(np.concatenate([a, a]), np.array([0, 0])) == 0
    assert set(runs._groups) == {"b", "c"}


def test_a_batch_that_raises_keeps_no_group_it_made(monkeypatch) -> None:
    runs = ClassRunFilter(3, groups=1)
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]]), groups=["a"])
    step = runs._step

    def fail_on_the_second(sequence, p, row):  # noqa: ANN001, ANN202
        if row == 2:
            raise RuntimeError("a row that fails")
        return step(sequence, p, row)

    monkeypatch.setattr(runs, "_step", fail_on_the_second)
    with pytest.raises(RuntimeError):
        runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 2), groups=["b", "b"])
    assert list(runs._groups) == ["a"] and runs.filtered == 1


def test_groups_unseen_in_a_batch_not_committed_are_followed_apart() -> None:
    runs = ClassRunFilter(3)
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 50))  # the stickiness is learnt: runs
    rows = torch.tensor([[0.8, 0.1, 0.1]] * 20 + [[0.1, 0.8, 0.1]])
    together = runs.filter(rows, commit=False, groups=["g1"] * 20 + ["g2"])
    alone = runs.filter(rows[20:], commit=False, groups=["g2"])
    # g2's row is not held to g1's run (the shared mix and weights moved a little over g1's)
    assert int(together[20].argmax()) == 1 and torch.allclose(together[20], alone[0], atol=0.02)


def test_a_new_groups_first_row_is_served_as_the_model_answers() -> None:
    runs = ClassRunFilter(10)
    labels = np.repeat(np.random.default_rng(4).integers(0, 10, 20), 100)
    runs.filter(noisy_votes(labels, 0.6, 10, seed=4))  # other traffic taught: classes run
    assert runs.stickiness() > 0.5
    first = noisy_votes(np.array([3]), 1.0, 10, seed=5)
    first[0, 9] = 0.01  # a class the model rarely answers beside the one it does
    first = first / first.sum()
    served = runs.filter(first, groups=["new-camera"])
    # no history: the chain's prior is the class mix, so nothing tilts the model's answer
    assert torch.allclose(served, first, atol=1e-6)


def test_a_shift_of_the_inputs_makes_the_filter_stand_aside_while_the_statistics_settle() -> None:
    labels = np.random.default_rng(3).integers(0, 10, 400)
    model = noisy_votes(labels, 0.6, 10)
    runs = ClassRunFilter(10, settle_rows=50)
    runs.filter(model[:100], shifts=np.zeros(100))  # shuffled, the statistics settled
    # the inputs shift: the model's answers stick to one class for a while, which the filter
    # would take for a run; it serves them as they are and learns no stickiness from them
    stuck = torch.tensor([[0.05] * 3 + [0.55] + [0.05] * 6] * 40)
    shifts = np.r_[np.full(5, 1.5), np.zeros(35)]
    served = runs.filter(stuck, shifts=shifts)
    # each row counts for at most 3 x the bound (0.75): the third shifted row passes it, the
    # average stays above it for a few rows after the last, and the filter stands aside 50 more
    until = runs.settling_until
    assert 105 + 50 <= until <= 110 + 50
    assert torch.allclose(served[2:], stuck[2:] / stuck[2:].sum(1, keepdim=True))
    assert runs.describe()["settling"] is True and runs.settled == 38
    settled_belief = runs.belief.copy()
    runs.filter(stuck[:10], shifts=np.zeros(10))  # the same answers, still settling
    assert np.array_equal(runs.belief, settled_belief) and runs.settled == 48
    runs.filter(model[100:200], shifts=np.zeros(100))
    assert runs.describe()["settling"] is False and runs.settled == until - 102 + 1
    assert not np.array_equal(runs.belief, settled_belief)  # learning again
    # without the settling the same answers would have raised the stickiness
    plain = ClassRunFilter(10, settle_rows=50)
    plain.filter(model[:100], shifts=np.zeros(100))
    plain.filter(stuck)
    assert plain.stickiness() > runs.stickiness() + 0.3


def test_one_shifted_row_or_unknown_shifts_change_nothing() -> None:
    labels = np.repeat(np.random.default_rng(4).integers(0, 10, 6), 50)
    model = noisy_votes(labels, 0.6, 10)
    plain = ClassRunFilter(10).filter(model)
    assert torch.equal(ClassRunFilter(10).filter(model, shifts=np.full(300, np.nan)), plain)
    one = np.zeros(300)
    one[120] = 1e6  # a spike: it counts for 0.75, which moves the average by 0.14
    assert torch.equal(ClassRunFilter(10).filter(model, shifts=one), plain)
    off = ClassRunFilter(10, settle_rows=0)
    assert torch.equal(off.filter(model, shifts=np.full(300, 3.0)), plain)
    assert off.settled == 0


def test_a_batch_not_committed_leaves_the_settling_as_it_was() -> None:
    runs = ClassRunFilter(3, settle_rows=20)
    before = (runs.shift, runs.settling_until, runs.settled)
    runs.filter(torch.tensor([[0.6, 0.2, 0.2]] * 30), commit=False, shifts=np.full(30, 2.0))
    assert (runs.shift, runs.settling_until, runs.settled) == before
    with pytest.raises(ValueError, match="2 shifts for 3 rows"):
        runs.filter(torch.tensor([[0.6, 0.2, 0.2]] * 3), shifts=np.zeros(2))


def test_a_layers_shifts_are_about_zero_for_inputs_like_its_statistics_and_far_when_not() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    robust = RobustBatchNorm(bn, momentum=0.02)
    x = 1.0 + 2.0 * torch.randn(64, 4, 8, 8)
    first, second = x.mean((2, 3)), (x * x).mean((2, 3))
    assert robust.shifts(first, second).mean().abs() < 0.1  # each sample within noise of 0
    noisier = 1.0 + 6.0 * torch.randn(8, 4, 8, 8)  # three times the spread: log 9
    assert robust.shifts(noisier.mean((2, 3)), (noisier * noisier).mean((2, 3))).min() > 1.8
    flat = torch.full((2, 4, 8, 8), 1.0)  # no spread at all
    assert robust.shifts(flat.mean((2, 3)), (flat * flat).mean((2, 3))).max() < -5
    robust.watch = True
    robust(x[:3])
    assert robust.shift is not None and robust.shift.shape == (3,)
    robust.commit, robust.shift = False, None
    robust(x[:3])  # a forward that moves no statistics records nothing
    assert robust.shift is None
    features = RobustBatchNorm(nn.BatchNorm1d(4).eval())
    features.watch = True
    features(torch.randn(3, 4))  # one value per sample and channel: moves with the class too
    assert features.shift is None


def test_the_engine_tells_the_filter_when_the_inputs_shift() -> None:
    settings = Settings(adapter={"name": "bn"}, drift={"enabled": False})
    with built_engine(settings) as engine:
        assert engine.runs is not None and len(engine._watched_norms) == 3
        x, _, _, _ = digits_split()
        for start in range(0, 64, 16):
            engine.forward(x[start:start + 16])
        assert engine.runs.settled == 0 and not engine.runs.describe()["settling"]
        flat = 0.1 * x[64:96]  # a contrast far below what the statistics have seen
        engine.forward(flat[:16])
        engine.forward(flat[16:])
        said = engine.describe_learning()["runs"]
        assert said["settling"] is True and said["settled_rows"] > 0
        assert not any(layer.watch for layer in engine._watched_norms)
    off = Settings(adapter={"name": "bn", "runs_settle": 0}, drift={"enabled": False})
    with built_engine(off) as engine:
        assert engine._watched_norms == []


def test_a_stream_whose_shifts_vary_about_a_level_of_its_own_is_no_shift() -> None:
    # samples whose contrast varies (a camera's exposure) keep each sample's shift away from 0
    # and spread, the mean of a log below 0: measured from their own level, no shift at all
    labels = np.repeat(np.random.default_rng(5).integers(0, 10, 16), 100)
    model = noisy_votes(labels, 0.6, 10)
    shifts = -0.4 + 0.2 * np.random.default_rng(6).standard_normal(1600)
    runs = ClassRunFilter(10)
    runs.filter(model[:400], shifts=shifts[:400])
    # at first the statistics are settling from the source's (the level starts at 0, a sample
    # like those they hold); once the level has followed the stream, nothing more
    assert 0 < runs.settled < 300
    settled = runs.settled
    plain = ClassRunFilter(10)
    plain.filter(model[:400])
    plain.belief = runs.belief.copy()
    assert torch.equal(runs.filter(model[400:], shifts=shifts[400:]), plain.filter(model[400:]))
    assert runs.settled == settled
    # rows far noisier than B1's (0.06 to 0.17 about their level): the bound widens with them
    noisy = ClassRunFilter(10)
    noisy.filter(model, shifts=-0.4 + 0.5 * np.random.default_rng(7).standard_normal(1600))
    assert noisy.settled < 0.25 * 1600
    # and a real shift still passes it: the clip grows with the bound
    noisy.filter(model[:100], shifts=3.0 + 0.5 * np.random.default_rng(8).standard_normal(100))
    assert noisy.describe()["settling"] is True


def test_a_stream_that_starts_shifted_is_seen_and_so_is_one_after_a_reset() -> None:
    model = noisy_votes(np.zeros(60, dtype=int), 0.6, 10)
    decaying = 0.8 * np.exp(-np.arange(60) / 20)  # the statistics catching up from the source's
    runs = ClassRunFilter(10)
    runs.filter(model, shifts=decaying)
    assert runs.settled >= 55  # from the third row on
    runs.reset()
    runs.filter(model, shifts=decaying)
    assert runs.settled >= 55


def test_a_repeated_row_while_settling_is_served_as_the_model_answers() -> None:
    runs = ClassRunFilter(3, settle_rows=50)
    runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 200), shifts=np.zeros(200))  # a run of 0
    assert runs.stickiness() > 0.9
    runs.filter(torch.tensor([[0.2, 0.7, 0.1]] * 4), shifts=np.full(4, 1.0))  # a shift
    assert runs.describe()["settling"] is True
    again = torch.tensor([[0.2, 0.7, 0.1]])
    served = runs.filter(again, learn=np.array([False]))
    assert torch.allclose(served, again)


def test_rottas_memory_reports_no_shift_for_the_rows_served() -> None:
    settings = Settings(adapter={"name": "rotta", "runs": "filter"}, drift={"enabled": False})
    with built_engine(settings) as engine:
        x, _, _, _ = digits_split()
        for start in range(0, 6 * 64, 64):  # past the memory's first update
            engine.forward(x[start:start + 64])
            assert engine._shifts(64, None) is None  # the teacher moves no statistics serving
        assert not any(layer.watch for layer in engine._watched_norms)


def test_the_layers_watch_ends_when_the_adapter_raises(monkeypatch) -> None:
    settings = Settings(adapter={"name": "bn"}, drift={"enabled": False})
    with built_engine(settings) as engine:
        x, _, _, _ = digits_split()

        def fails(_: torch.Tensor) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(engine.adapter, "adapt", fails)
        with pytest.raises(RuntimeError, match="boom"):
            engine.forward(x[:4])
        assert not any(layer.watch for layer in engine._watched_norms)


def test_a_repeated_rows_shift_is_left_out() -> None:
    settings = Settings(adapter={"name": "bn"}, drift={"enabled": False})
    with built_engine(settings) as engine:
        x, _, _, _ = digits_split()
        engine.forward(x[:4])
        seen = {}
        original = engine.runs.filter_and_place

        def keep(outputs, groups=None, learn=None, shifts=None):
            seen["shifts"], seen["learn"] = shifts, learn
            return original(outputs, groups, learn, shifts)

        engine.runs.filter_and_place = keep  # type: ignore[method-assign]
        engine.forward(np.concatenate([x[:1], x[10:13]]))  # the first row seen before
        assert seen["learn"].tolist() == [False, True, True, True]
        assert np.isnan(seen["shifts"][0]) and np.isfinite(seen["shifts"][1:]).all()


def test_what_learns_from_labels_takes_the_boost_by_when_their_samples_were_served() -> None:
    """A label-free alarm boosts the test-time adapter at once; the supervised step learns the
    labels of samples served before the boost at its base rate (they show the concept before the
    change, however late they come back), those served after it at the boost, and rests at its
    base rate between labelled batches."""
    from service.engine import LabelledBatch

    settings = Settings(adapter={"name": "tent", "learning_rate": 1e-3, "runs": "off"},
                        supervised={"enabled": True, "learning_rate": 2e-3, "batch_size": 8,
                                    "replay": 64, "replay_steps": 1},
                        drift={"policy": {"boost": 4.0, "half_life": 10_000}})
    x, y, x_test, _ = digits_split()
    with built_engine(settings) as engine:
        assert engine.supervised is not None and engine.drift is not None
        rates: list[float] = []
        step = engine.supervised.step

        def spy(inputs: torch.Tensor, labels: torch.Tensor) -> float:
            rates.append(engine.supervised.learning_rate)
            return step(inputs, labels)

        engine.supervised.step = spy  # type: ignore[method-assign]
        before = engine.forward(x_test[:8]).served  # (token, clock) after the batch
        assert before is not None
        engine.forward(x_test[24:32])  # the batch whose inputs raise the alarm below
        entropy = Alarm("adwin", "entropy", False, sample=8, update=8, time=0.0,
                        statistic=None, estimate=1.0, detail={"direction": "up"})
        assert [a.name for a in engine.drift.policy.on_alarm(
            entropy, now=engine.drift.samples)] == ["boost_lr"]
        engine._apply_rates()
        assert engine.adapter.learning_rate == pytest.approx(4e-3, rel=1e-3)
        assert engine.supervised.learning_rate == 2e-3  # at rest: its base
        after = engine.forward(x_test[8:16]).served
        assert after is not None

        def labelled(rows: slice, served: tuple[int, int]) -> LabelledBatch:
            n = rows.stop - rows.start
            return LabelledBatch(labels=y[rows].astype(np.int64), inputs=x[rows],
                                 learnt_served=np.array([served] * n, dtype=np.float64))

        engine.learn(labelled(slice(0, 8), before))  # arrives after the boost, served before
        engine.learn(labelled(slice(8, 16), after))
        other = (after[0] + 1, after[1])  # served by another process: the boost now
        engine.learn(labelled(slice(16, 24), other))
        # each labelled batch: its own step, then one replay of kept samples, at the boost of
        # when the batch's samples were served
        assert rates[0:2] == pytest.approx([2e-3, 2e-3])
        assert rates[2:4] == pytest.approx([8e-3, 8e-3], rel=1e-3)
        assert rates[4:6] == pytest.approx([8e-3, 8e-3], rel=1e-3)
        assert engine.supervised.learning_rate == 2e-3
