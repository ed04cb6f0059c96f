"""The online mixture serves the candidate the labels favour: never much worse than the best."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from adapters.mixture import FixedShareMixture
from adapters.task import task_named
from tests.harness import built_engine, metric, serving
from tests.test_guard import BINARY, binary_stream


def test_fixed_share_lets_a_candidate_that_becomes_best_take_over():
    mixture = FixedShareMixture(["a", "b"], eta=0.5, share=0.01)
    mixture.learn(np.tile([0.0, 1.0], (500, 1)))  # a is right for a long time
    assert mixture.weights[0] > 0.98  # b keeps its floor, about σ/2 / (1 − e^−η)
    mixture.learn(np.tile([1.0, 0.0], (30, 1)))  # then b is: the share lets it back fast
    assert mixture.weights[1] > 0.9


def test_a_candidate_that_starts_low_has_the_floor_until_labels_raise_it():
    mixture = FixedShareMixture(["newest_label", "source", "adapted"], eta=2.0, share=0.001,
                                start_low=("newest_label",))
    assert mixture.weights[0] == pytest.approx(0.001 / 3)
    assert mixture.weights[1] == mixture.weights[2] == pytest.approx((1 - 0.001 / 3) / 2)
    mixture.learn(np.tile([0.0, 1.0, 1.0], (8, 1)))  # right where both stages are wrong
    assert mixture.weights[0] > 0.9
    with pytest.raises(ValueError, match="no candidate"):
        FixedShareMixture(["a", "b"], start_low=("a", "b"))


def test_a_candidate_untried_until_the_first_label_starts_at_a_prior_that_few_labels_move():
    # the newest label and River's learner serve nothing before the first label: they start at
    # 0.05 each, not the floor, so that a regressor's small gaps raise them within dozens of
    # labels (from the floor, 0.001 / 4, the same gap of 0.05 a label took 80)
    names = ["newest_label", "learner", "source", "adapted"]
    mixture = FixedShareMixture(names, eta=2.0, share=0.001, start_low=("source",),
                                start_untried=("newest_label", "learner"))
    assert mixture.weights[:2] == pytest.approx([0.05, 0.05])
    assert mixture.weights[2] == pytest.approx(0.001 / 4)
    assert mixture.weights[3] == pytest.approx(1 - 0.1 - 0.001 / 4)
    gap = np.tile([0.40, 0.45, 0.45, 0.45], (30, 1))  # the newest label better by 0.05
    mixture.learn(gap)
    assert mixture.weights[0] > 0.5
    floor = FixedShareMixture(names, eta=2.0, share=0.001, start_low=("newest_label", "source"))
    floor.learn(gap)
    assert floor.weights[0] < 0.05
    with pytest.raises(ValueError, match="nothing for the others"):
        FixedShareMixture(["a"] + [f"u{i}" for i in range(20)], start_untried=tuple(
            f"u{i}" for i in range(20)))
    with pytest.raises(ValueError, match="not both"):
        FixedShareMixture(["a", "b"], start_low=("a",), start_untried=("a",))
    # never below the floor, whatever the share
    wide = FixedShareMixture(["a", "b", "c"], share=0.3, start_untried=("a",))
    assert wide.weights[0] == pytest.approx(0.1)


def test_the_default_regressor_starts_its_untried_candidates_at_005_and_serves_the_model():
    from service.engine import CANDIDATE_ARRAYS
    from service.settings import load_settings

    model = {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
             "input_shape": [3]}
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32) * 100
    with built_engine(load_settings(None, model=model)) as engine:
        assert engine.mixture is not None
        weights = dict(zip(engine.mixture.names, engine.mixture.weights, strict=True))
        # both of River's trees (`mixture.learner = "auto"`), each a candidate at 0.05
        assert weights == pytest.approx({"newest_label": 0.05, "recent_residual": 0.05,
                                         "learner.hat": 0.05, "learner.ht": 0.05,
                                         "adapted": 0.8})
        for rows in np.split(x, 4):
            out = engine.forward(rows)
            # no label yet: both repeat the model's answer, and the mixture gives it back exactly
            assert np.array_equal(out.outputs, out.arrays[CANDIDATE_ARRAYS["adapted"]])


def test_the_source_starts_level_where_only_labels_change_the_model_and_low_beside_an_adapter():
    from service.engine import CANDIDATE_ARRAYS
    from service.settings import load_settings

    model = {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
             "input_shape": [3]}
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    supervised = {"enabled": True, "train": "all"}
    with built_engine(load_settings(None, model=model, supervised=supervised)) as engine:
        weights = dict(zip(engine.mixture.names, engine.mixture.weights, strict=True))
        # the supervised step changes nothing before the first label: the source is the
        # adapted model's equal until labels tell them apart
        # (no recent residual: the supervised step changes the model it would be added to)
        assert weights == pytest.approx({"newest_label": 0.05, "learner.hat": 0.05,
                                         "learner.ht": 0.05, "source": 0.425, "adapted": 0.425})
        out = engine.forward(x)
        assert np.array_equal(out.arrays[CANDIDATE_ARRAYS["source"]],
                              out.arrays[CANDIDATE_ARRAYS["adapted"]])
        assert np.array_equal(out.outputs, out.arrays[CANDIDATE_ARRAYS["adapted"]])
    with built_engine(load_settings(None, model=model, adapter={"name": "bn"},
                                    mixture={"enabled": True})) as engine:
        weights = dict(zip(engine.mixture.names, engine.mixture.weights, strict=True))
        assert weights["source"] == pytest.approx(0.001 / len(weights))  # the floor
        assert weights["adapted"] > 0.85


def test_lowering_a_candidate_before_labels_moves_its_weight_to_the_others():
    mixture = FixedShareMixture(["newest_label", "source", "adapted"], eta=[2.0, 0.1],
                                start_untried=("newest_label",))
    assert mixture.weights == pytest.approx([0.05, 0.475, 0.475])
    assert mixture.lower("source")
    floor = 0.001 / 3
    assert mixture.weights == pytest.approx([0.05 * (1 - floor) / 0.525, floor,
                                             0.475 * (1 - floor) / 0.525])
    assert sum(mixture.weights) == pytest.approx(1.0)
    assert not mixture.lower("missing")
    mixture.learn(np.array([[0.0, 1.0, 1.0]]))
    before = list(mixture.weights)
    assert not mixture.lower("adapted")  # after a label the labels move the weights
    assert mixture.weights == before


def test_the_mixture_combines_and_scores_both_tasks():
    mixture = FixedShareMixture(["source", "adapted"], scale=2.0)
    mixture.weights = [0.25, 0.75]
    combined = mixture.combine({"source": torch.tensor([[1.0, 0.0]]),
                                "adapted": torch.tensor([[0.0, 1.0]])})
    assert combined.tolist() == [[0.25, 0.75]]
    # a classifier's loss is the error accuracy counts: the source predicts class 0, wrongly;
    # the adapted model predicts 1, rightly, however unsure it is
    losses = mixture.losses(task_named("classification"),
                            {"source": np.array([[0.9, 0.1], [0.6, 0.4]]),
                             "adapted": np.array([[0.45, 0.55], [0.2, 0.8]])},
                            np.array([1.0, 0.0]))
    assert losses.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    losses = mixture.losses(task_named("regression"),
                            {"source": np.array([[0.0]]), "adapted": np.array([[4.0]])},
                            np.array([[2.0]]))
    assert losses.tolist() == [[0.5, 0.5]]  # |e| / (|e| + 2) for errors of 2 each


@pytest.mark.parametrize("mixed", [False, True])
def test_served_with_the_mixture_the_labels_outvote_an_adapter_gone_wrong(mixed):
    # Tent at 1,000 times its rate with the collapse guard off and the shadow comparison too
    # slow to act within the stream: only the mixture can keep what is served good
    x, y = binary_stream(2048)
    settings = {"model": BINARY, "batcher": {"max_wait_ms": 0},
                "adapter": {"name": "tent", "learning_rate": 1.0, "max_learning_rate": 1.0,
                            "adapt_batch_size": 32, "collapse_min_ratio": 0},
                "shadow": {"window": 5000, "min_labels": 5000}, "error_memory": {"kind": "off"},
                "mixture": {"enabled": mixed, "eta": 0.5, "learner": "off",
                            "newest_label": "off"}}

    async def scenario():
        async with serving(**settings) as (client, app):
            wrong = []
            for start in range(0, len(x), 32):
                reply = await client.post("/v1/predict",
                                          json={"inputs": x[start:start + 32].tolist()})
                rows = reply.json()["predictions"]
                truth = y[start:start + 32]
                wrong += [row["prediction"] != t for row, t in zip(rows, truth, strict=True)]
                labels = [{"id": row["id"], "label": int(t)}
                          for row, t in zip(rows, y[start:start + 32], strict=True)]
                await client.post("/v1/feedback", json={"labels": labels})
            state = (await client.get("/v1/state")).json()
            weight = metric(app, "adaptd_mixture_weight", candidate="source")
            return float(np.mean(wrong[len(wrong) // 2:])), state, weight

    error, state, weight = asyncio.run(scenario())
    if not mixed:
        assert error > 0.2  # what the adapter alone serves: the source is right on every sample
        assert "mixture" not in state["learning"]
        return
    assert error < 0.02
    weights = state["learning"]["mixture"]["weights"]
    assert set(weights) == {"source", "adapted"} and weights["source"] > 0.95
    assert weight == pytest.approx(weights["source"])


def labels_back_after_each_request(settings: dict, x: np.ndarray, y: np.ndarray,
                                   learner: str = "learner.ht"):
    """Requests of 16, each one's labels back before the next: (the classes or values served,
    /v1/state, the weight of River's `learner` in /metrics)."""
    async def scenario():
        async with serving(**settings) as (client, app):
            served = []
            for start in range(0, len(x), 16):
                reply = await client.post("/v1/predict",
                                          json={"inputs": x[start:start + 16].tolist()})
                rows = reply.json()["predictions"]
                served += [row["prediction"] for row in rows]
                answer = await client.post("/v1/feedback", json={"labels": [
                    {"id": row["id"], "label": t if isinstance(t, float) else int(t)}
                    for row, t in zip(rows, y[start:start + 16].tolist(), strict=True)]})
                assert answer.status_code == 200
            state = (await client.get("/v1/state")).json()
            return np.array(served), state, metric(app, "adaptd_mixture_weight",
                                                   candidate=learner)
    return asyncio.run(scenario())


def test_the_newest_label_takes_over_where_labels_come_in_runs():
    # labels that persist, whatever the inputs say (runs of 64 of one class, labels back after
    # each request of 16): the source model is right on about half, the label that arrived last
    # on all but the first request of a run of the other class (about 7 in 8)
    x, _ = binary_stream(2048)
    y = np.repeat(np.random.default_rng(1).integers(0, 2, size=32), 64)
    settings = {"model": BINARY, "batcher": {"max_wait_ms": 0}, "adapter": {"name": "none"},
                "error_memory": {"kind": "off"},
                "mixture": {"enabled": True, "newest_label": "on", "learner": "off"}}

    served, state, _ = labels_back_after_each_request(settings, x, y)
    weights = state["learning"]["mixture"]["weights"]
    assert set(weights) == {"newest_label", "adapted"}  # nothing learns: the model as served
    half = len(y) // 2
    newest = np.concatenate([[-1] * 16, np.repeat(y[15::16][:-1], 16)])  # the label last back
    model = (x.sum(1) <= 0).astype(int)  # what the model alone serves (right on the inputs)
    served_error = (served[half:] != y[half:]).mean()
    assert (model[half:] != y[half:]).mean() > 0.4
    # after each switch of class the weights swing back to the model for a request or so
    assert served_error < (newest[half:] != y[half:]).mean() + 0.06 < 0.2
    assert weights["newest_label"] > 0.9


@pytest.mark.parametrize(("task", "shape", "newest", "expected", "built"), [
    ("regression", [3], "auto", ["newest_label", "source", "compensated"], "on"),
    ("classification", [3], "auto", ["newest_label", "source", "compensated"], "probation"),
    ("classification", [1, 16, 16], "auto", ["source", "compensated"], "off"),  # images
    ("classification", [1, 16, 16], "on", ["newest_label", "source", "compensated"], "on"),
    ("regression", [3], "probation", ["newest_label", "source", "compensated"], "probation"),
    ("regression", [3], "off", ["source", "compensated"], "off"),
])
def test_the_newest_label_is_a_candidate_on_probation_for_a_tabular_classifier_unless_said(
        task, shape, newest, expected, built):
    from service.runtime import mixture_candidates, newest_label
    from service.settings import load_settings

    settings = load_settings(None, model={"task": task, "input_shape": shape, "num_classes": None
                                          if task == "regression" else 10},
                             error_memory={"kind": "exact"}, adapter={"name": "none"},
                             mixture={"enabled": True, "newest_label": newest, "learner": "off"})
    assert mixture_candidates(settings, shadow=True) == expected
    assert newest_label(settings) == built


@pytest.mark.parametrize("kind", ["ht", "arf"])
def test_a_river_learner_takes_over_where_the_concept_is_one_the_model_never_learnt(kind):
    # the truth is the sign of the first feature, which the binary model's own rule (the sum of
    # all four) gets right on about two samples in three; a tree learns it from the labels
    x, _ = binary_stream(1024)
    y = (x[:, 0] > 0).astype(int)
    settings = {"model": BINARY, "batcher": {"max_wait_ms": 0}, "adapter": {"name": "none"},
                "error_memory": {"kind": "off"},
                "mixture": {"enabled": True, "learner": kind, "newest_label": "off"}}
    served, state, weight = labels_back_after_each_request(settings, x, y, f"learner.{kind}")
    half = len(y) // 2
    model = (x.sum(1) <= 0).astype(int)
    assert (model[half:] != y[half:]).mean() > 0.25
    assert (served[half:] != y[half:]).mean() < 0.1
    learning = state["learning"]
    name = f"learner.{kind}"
    assert learning["learners"] == {name: {"kind": kind, "learnt": len(y), "failures": 0,
                                           "asleep": False}}
    assert set(learning["mixture"]["weights"]) == {name, "adapted"}
    assert learning["mixture"]["weights"][name] > 0.9
    assert weight == pytest.approx(learning["mixture"]["weights"][name])


def test_a_river_regressor_learns_the_values_the_model_misses():
    from tests.test_guard import REGRESSOR

    x = np.random.default_rng(2).normal(size=(1024, 3)).astype(np.float32)
    y = 3.0 * x[:, 0] + 1.0  # nothing the regressor's random weights know
    settings = {"model": REGRESSOR, "batcher": {"max_wait_ms": 0}, "adapter": {"name": "none"},
                "error_memory": {"kind": "off"},
                "mixture": {"enabled": True, "learner": "ht", "newest_label": "off"}}
    served, state, _ = labels_back_after_each_request(settings, x, y)
    half = len(y) // 2
    assert np.abs(served[half:] - y[half:]).mean() < 0.5 * np.abs(y[half:] - y.mean()).mean()
    assert state["learning"]["mixture"]["weights"]["learner.ht"] > 0.9


def test_the_learner_is_refused_for_several_values_and_said_idle_without_the_mixture():
    from service.runtime import mixture_candidates
    from service.settings import load_settings

    forecaster = {"factory": "tests.models:forecaster", "name": "fc", "task": "regression",
                  "input_shape": [3]}
    with pytest.raises(ValueError, match="predict one value"), built_engine(load_settings(
            None, model=forecaster, mixture={"enabled": True, "learner": "hat"})):
        pass
    with built_engine(load_settings(None, model=BINARY,
                                    mixture={"enabled": False, "learner": "hat"})) as engine:
        assert engine.online == {}
        assert any("mixture.learner = 'hat'" in w for w in engine.warnings)
    settings = load_settings(None, model=BINARY, adapter={"name": "none"},
                             mixture={"enabled": True, "learner": "arf", "newest_label": "off"})
    assert mixture_candidates(settings, shadow=False) == ["learner.arf", "adapted"]
    settings = load_settings(None, model=BINARY, adapter={"name": "none"},
                             mixture={"enabled": True, "learner": ["arf", "ht"],
                                      "newest_label": "off"})
    assert mixture_candidates(settings, shadow=False) == ["learner.arf", "learner.ht", "adapted"]
    with pytest.raises(ValueError, match="each learner once"):
        load_settings(None, mixture={"learner": ["ht", "ht"]})
    for bad in ([], ["off"], ["auto", "ht"], ["forest"]):
        with pytest.raises(ValueError, match="a list of them; got"):
            load_settings(None, mixture={"learner": bad})


@pytest.mark.parametrize(("model", "learner"), [
    (BINARY, ["hat", "ht"]),  # a tabular classifier
    ({"factory": "tests.models:regressor", "name": "reg", "task": "regression",
      "input_shape": [3]}, ["hat", "ht"]),  # a tabular regressor of one value
    ({"factory": "tests.models:forecaster", "name": "fc", "task": "regression",
      "input_shape": [3]}, "off"),  # River's regressors are single-target
    ({}, "off"),  # the demo: images, not rows
])
def test_auto_serves_a_tabular_model_with_both_hoeffding_trees_in_the_mixture(model, learner):
    from service.settings import load_settings

    with built_engine(load_settings(None, model=model)) as engine:
        learning = engine.describe_learning()
        assert engine.settings.mixture.learner == learner
        assert engine.settings.mixture.enabled is (learner != "off")
        assert bool(engine.online) is (learner != "off")
        assert ("mixture" in learning) is (learner != "off")
        if learner != "off":
            assert {name: part["kind"] for name, part in learning["learners"].items()} == {
                "learner.hat": "hat", "learner.ht": "ht"}
            assert {"learner.hat", "learner.ht"} <= set(learning["mixture"]["weights"])
            # the newest label: on probation for a classifier, on for a regressor
            assert "newest_label" in learning["mixture"]["weights"]
            classifier = model is BINARY
            assert learning["mixture"].get("probation") == (
                ["newest_label"] if classifier else None)
            assert engine.settings.mixture.newest_label == ("probation" if classifier else "on")
        assert not any("mixture" in w for w in engine.warnings)
    # an explicit choice stands; `enabled = true` mixes the stages alone, as before `auto`
    with built_engine(load_settings(None, model=BINARY,
                                    mixture={"enabled": "auto", "learner": "arf"})) as engine:
        assert [learner.kind for learner in engine.online.values()] == ["arf"]
    with built_engine(load_settings(None, model=BINARY, mixture={"enabled": True},
                                    shadow={"enabled": True}, adapter={"name": "bn"})) as engine:
        assert engine.online == {} and engine.mixture is not None
        assert not any(name.startswith("learner") for name in engine.mixture.names)
    # an image classifier's mixture, on by hand, keeps to its stages: no newest label
    with built_engine(load_settings(None, mixture={"enabled": True},
                                    adapter={"name": "bn"})) as engine:
        assert engine.mixture is not None and "newest_label" not in engine.mixture.names
        assert engine.settings.mixture.newest_label == "off"
    # the mixture said off takes its learner with it, unsaid
    with built_engine(load_settings(None, model=BINARY, mixture={"enabled": False})) as engine:
        assert engine.mixture is None and engine.online == {}
        assert not any("mixture" in w for w in engine.warnings)
    # a learner named for images: auto leaves the mixture off and says the learner is idle
    with built_engine(load_settings(None, mixture={"learner": "hat"})) as engine:
        assert engine.mixture is None and engine.online == {}
        assert any("mixture.learner = 'hat'" in w for w in engine.warnings)


def test_auto_leaves_rows_of_more_than_tabular_features_to_the_model():
    from service.runtime import resolve_auto
    from service.settings import TABULAR_FEATURES, load_settings

    class Rows:
        def __init__(self, width: int) -> None:
            self.input_shape, self.task = (width,), task_named("classification")
            self.num_classes, self.num_outputs, self.width = 2, 2, 2
            self.module = torch.nn.Linear(width, 2)

    for width, on in [(TABULAR_FEATURES, True), (TABULAR_FEATURES + 1, False)]:
        resolved = resolve_auto(load_settings(None, model=BINARY), Rows(width))
        assert resolved.mixture.enabled is on
        assert resolved.mixture.learner == (["hat", "ht"] if on else "off")


def test_the_learner_first_learns_the_labelled_reference_data(tmp_path):
    from safetensors.torch import save_file

    from service.settings import load_settings

    inputs = np.random.default_rng(3).normal(size=(400, 4)).astype(np.float32)
    path = tmp_path / "reference.safetensors"
    save_file({"inputs": torch.from_numpy(inputs),
               "labels": torch.from_numpy((inputs[:, 0] > 0).astype(np.int64))}, str(path))
    settings = load_settings(None, model={**BINARY, "reference_data": str(path)},
                             adapter={"name": "none"},
                             mixture={"enabled": True, "learner": "ht"})
    with built_engine(settings) as engine:
        assert engine.online["learner.ht"].learnt == 400
        probe = np.random.default_rng(4).normal(size=(200, 4)).astype(np.float32)
        guessed = engine.online["learner.ht"].predict(probe)
        assert guessed is not None
        assert (guessed.argmax(1).numpy() == (probe[:, 0] > 0)).mean() > 0.9


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_the_learner_sleeps_until_the_first_label_and_is_then_judged_on_what_it_would_have_guessed(
        backend, tmp_path, monkeypatch, request):
    import uuid

    from safetensors.torch import save_file

    from adapters.labels.online_learner import OnlineLearner
    from service.engine import LEARNER_ASLEEP, candidate_array

    # the reference data's labels follow the first feature, the stream's the second: what the
    # learner guesses changes as it learns the stream
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(300, 4)).astype(np.float32)
    path = tmp_path / "reference.safetensors"
    save_file({"inputs": torch.from_numpy(reference),
               "labels": torch.from_numpy((reference[:, 0] > 0).astype(np.int64))}, str(path))
    x = rng.normal(size=(528, 4)).astype(np.float32)
    y = (x[:, 1] > 0).astype(int)
    store = {"url": "memory"}
    if backend == "redis":  # the marker and the inputs go through Redis's records as well
        store = {"url": request.getfixturevalue("redis_server").url,
                 "namespace": f"sleep-{uuid.uuid4().hex}"}
    settings = {"model": {**BINARY, "reference_data": str(path)}, "batcher": {"max_wait_ms": 0},
                "adapter": {"name": "none"}, "error_memory": {"kind": "off"}, "store": store,
                "mixture": {"enabled": True, "learner": "ht", "newest_label": "off"}}

    async def scenario():
        async with serving(**settings) as (client, app):
            engine = app.state.runtime.engine
            learner = engine.online["learner.ht"]
            slept = learner.predict(x[:512]).numpy()  # its guesses as it sleeps
            asleep = engine.describe_learning()["learners"]["learner.ht"]["asleep"]
            guessed = []  # (by the learner itself, rows), for every guess
            original = OnlineLearner.predict

            def counted(itself, inputs):
                guessed.append((itself is learner, len(inputs)))
                return original(itself, inputs)
            monkeypatch.setattr(OnlineLearner, "predict", counted)
            for start in range(0, 512, 16):  # served asleep: no guess made, none kept
                await client.post("/v1/predict", json={
                    "inputs": x[start:start + 16].tolist(),
                    "ids": [f"s{i}" for i in range(start, start + 16)]})
            before = list(guessed)
            kept = app.state.runtime.store.raw.get_prediction("s0").arrays
            seen = []
            learn = engine.mixture.learn
            engine.mixture.learn = lambda losses: (seen.append(losses), learn(losses))
            await client.post("/v1/feedback", json={"labels": [
                {"id": f"s{i}", "label": int(y[i])} for i in range(448)]})
            awake = original(learner, x[448:512]).numpy()  # after 448 stream labels
            await client.post("/v1/feedback", json={"labels": [
                {"id": f"s{i}", "label": int(y[i])} for i in range(448, 512)]})
            after = engine.describe_learning()
            await client.post("/v1/predict", json={"inputs": x[512:].tolist()})
            return slept, asleep, before, kept, seen, awake, after, guessed

    slept, asleep, before, kept, seen, awake, after, guessed = asyncio.run(scenario())
    assert asleep is True and before == []  # no guesses and no cost before any label
    assert candidate_array("learner.ht") not in kept and LEARNER_ASLEEP in kept
    assert "inputs" in kept
    # each record served asleep is judged on the guess it would have had, also after the
    # learner learnt: by then it guesses otherwise on some of them
    assert (awake.argmax(1) != slept[448:].argmax(1)).any()
    wrong = (slept.argmax(1) != y[:512]).astype(float)
    np.testing.assert_array_equal(np.concatenate(seen)[:, 0], wrong)  # the learner is first
    assert after["learners"]["learner.ht"]["asleep"] is False
    assert after["mixture"]["labels"] == 512
    # the copy as it slept guessed at the joins, in slices; awake, it guesses every batch
    assert guessed == [(False, 256), (False, 192), (False, 64), (True, 16)]


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_records_of_other_learners_teach_the_mixture_nothing_and_a_failed_guess_only_its_own(
        backend, request):
    import uuid
    from dataclasses import replace

    from adapters.labels.online_learner import OnlineLearner
    from service.engine import candidate_array

    x, _ = binary_stream(48)
    y = (x[:, 0] > 0).astype(int)
    store = {"url": "memory"}
    if backend == "redis":  # each learner's outputs kept under its own name in Redis's records
        store = {"url": request.getfixturevalue("redis_server").url,
                 "namespace": f"learners-{uuid.uuid4().hex}"}
    settings = {"model": BINARY, "batcher": {"max_wait_ms": 0}, "adapter": {"name": "none"},
                "error_memory": {"kind": "off"}, "store": store,
                "mixture": {"enabled": True, "learner": ["hat", "ht"]}}
    original = OnlineLearner.predict

    def ht_broken(learner, inputs):  # the Hoeffding tree raises, awake or as it slept
        if learner.kind == "ht":
            raise RuntimeError("river broke")
        return original(learner, inputs)

    async def scenario(monkeypatch):
        async with serving(**settings) as (client, app):
            engine, raw = app.state.runtime.engine, app.state.runtime.store.raw
            await client.post("/v1/predict", json={  # served asleep
                "inputs": x[:16].tolist(), "ids": [f"a{i}" for i in range(16)]})
            monkeypatch.setattr(OnlineLearner, "predict", ht_broken)
            first = await client.post("/v1/feedback", json={"labels": [
                {"id": f"a{i}", "label": int(y[i])} for i in range(16)]})
            monkeypatch.setattr(OnlineLearner, "predict", original)
            slept = engine.describe_learning()
            await client.post("/v1/predict", json={
                "inputs": x[16:32].tolist(), "ids": [f"b{i}" for i in range(16)]})
            kept = raw.get_prediction("b0")
            hat, ht = candidate_array("learner.hat"), candidate_array("learner.ht")
            assert hat in kept.arrays and ht in kept.arrays
            # a record of an older process (one learner, `candidate.learner`), and one of a
            # replica whose learners are HAT and ARF
            older = {k: v for k, v in kept.arrays.items() if k not in (hat, ht)}
            other = {k: v for k, v in kept.arrays.items() if k != ht}
            older["candidate.learner"] = kept.arrays[hat]
            other["candidate.learner.arf"] = kept.arrays[ht]
            raw.put_predictions([replace(kept, id="older", arrays=older),
                                 replace(kept, id="other", arrays=other)])
            second = await client.post("/v1/feedback", json={"labels": [
                {"id": "older", "label": int(y[16])}, {"id": "other", "label": int(y[16])},
                *({"id": f"b{i}", "label": int(y[16 + i])} for i in range(16))]})
            return first.json(), slept, second.json(), engine.describe_learning()

    with pytest.MonkeyPatch.context() as monkeypatch:
        first, slept, second, after = asyncio.run(scenario(monkeypatch))
    # the broken tree's guesses for the records served asleep repeated the model's, counted as
    # its failures; the other tree guessed and learnt as usual, and the mixture learnt them all
    assert first["joined"] == 16 and slept["mixture"]["labels"] == 16
    assert slept["learners"]["learner.ht"]["failures"] == 1
    assert slept["learners"]["learner.hat"]["failures"] == 0
    assert slept["learners"]["learner.ht"]["learnt"] == slept["learners"]["learner.hat"]["learnt"]
    # both foreign records were joined and learnt by the trees, never scored as their candidates
    assert second["joined"] == 18 and after["mixture"]["labels"] == 32
    assert after["learners"]["learner.hat"]["learnt"] == slept["learners"]["learner.hat"][
        "learnt"] + 18


def test_the_learners_serve_nothing_before_their_first_label_and_survive_what_goes_wrong():
    from dataclasses import replace

    from service.engine import INPUTS

    x, _ = binary_stream(64)
    y = (x[:, 0] > 0).astype(int)
    on = {"model": BINARY, "batcher": {"max_wait_ms": 0}, "adapter": {"name": "none"},
          "error_memory": {"kind": "off"},
          "mixture": {"enabled": True, "learner": ["ht", "hat"]}}

    async def scenario():
        async with serving(**{**on, "mixture": {"enabled": False}}) as (client, _):
            alone = (await client.post("/v1/predict", json={"inputs": x[:16].tolist()})).json()
        async with serving(**on) as (client, app):
            engine = app.state.runtime.engine
            first = (await client.post("/v1/predict", json={
                "inputs": x[:16].tolist(), "ids": [f"a{i}" for i in range(16)]})).json()
            # a record kept without its inputs (predicted by a replica without the learner)
            raw = app.state.runtime.store.raw
            kept = raw.get_prediction("a0")
            arrays = {k: v for k, v in kept.arrays.items() if k != INPUTS}
            raw.put_predictions([replace(kept, id="bare", arrays=arrays)])
            answer = await client.post("/v1/feedback", json={"labels": [
                {"id": "bare", "label": int(y[0])},
                *({"id": f"a{i}", "label": int(y[i])} for i in range(16))]})
            learnt = engine.online["learner.ht"].learnt
            # River raising is that learner's failure, not the request's nor the other's
            def broken(*_):
                raise RuntimeError("river broke")
            engine.online["learner.ht"].predict = broken
            engine.online["learner.ht"].learn = broken
            second = await client.post("/v1/predict", json={
                "inputs": x[16:32].tolist(), "ids": [f"b{i}" for i in range(16)]})
            taught = await client.post("/v1/feedback", json={"labels": [
                {"id": f"b{i}", "label": int(y[16 + i])} for i in range(16)]})
            reset = await client.post("/v1/admin/reset")
            state = (await client.get("/v1/state")).json()
            return alone, first, answer.json(), learnt, second, taught.json(), reset, state

    alone, first, answer, learnt, second, taught, reset, state = asyncio.run(scenario())
    # before its first label the learner repeats the model: the answers are the model's own
    np.testing.assert_allclose([p["probabilities"] for p in first["predictions"]],
                               [p["probabilities"] for p in alone["predictions"]], rtol=1e-6)
    assert answer["joined"] == 17 and learnt == 16  # the bare record's label taught it nothing
    assert second.status_code == 200 and taught["joined"] == 16
    assert reset.status_code == 200
    learners = state["learning"]["learners"]
    assert learners["learner.ht"]["learnt"] == 16 and learners["learner.ht"]["failures"] == 2
    assert learners["learner.hat"]["learnt"] == 32 and learners["learner.hat"]["failures"] == 0
    # the broken learner's guesses repeated the last stage; both are kept through the reset
    # every record kept its inputs but the bare one, which kept no guess of the learner's either
    # (served while it slept): the mixture learnt from the other 32 labels
    assert state["learning"]["mixture"]["labels"] == 32


@pytest.mark.parametrize("kind", ["ht", "hat", "arf"])
@pytest.mark.parametrize("regression", [False, True])
def test_every_river_learner_is_built_with_the_memory_bound(kind, regression):
    # River's own defaults let ARF's regressor grow without bound in a long run (B6's
    # `--growth`: 365 MB and 9.5 ms a label after 100,000 labels); the bound is checked every
    # MEMORY_CHECK_LABELS labels, beyond any test's stream, so its parameters are what is checked
    from adapters.labels.online_learner import MEMORY_CHECK_LABELS, MEMORY_MIB, river_model

    model = river_model(kind, regression, seed=42)
    trees = model.n_models if kind == "arf" else 1
    assert model.max_size * trees == pytest.approx(MEMORY_MIB)
    assert model.memory_estimate_period == MEMORY_CHECK_LABELS


def serve_with_labels_late(mixture: FixedShareMixture, right: dict[str, np.ndarray],
                           y: np.ndarray, delay: int) -> float:
    """Two classes, candidates that serve the class in `right` (one per sample), each label
    learnt `delay` samples after its sample was served, as the service does: the candidates'
    losses and what each rate served then. The share of samples served right."""
    task, eye = task_named("classification"), torch.eye(2)
    kept, served = [], []
    for t in range(len(y)):
        rates = mixture.outputs({name: eye[guess[t:t + 1]] for name, guess in right.items()})
        served.append(int(mixture.serve(rates).argmax()))
        kept.append(rates[:, 0].numpy())
        if t >= delay:
            s = t - delay
            mixture.learn(mixture.losses(
                task, {name: eye[guess[s:s + 1]].numpy() for name, guess in right.items()},
                y[s:s + 1]))
            mixture.learn_served(mixture.served_losses(task, kept[s][None], y[s:s + 1]))
    return float((np.array(served) == y).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_with_labels_late_and_classes_in_runs_the_slow_rate_is_served(seed):
    # runs of 400 of each class, labels 100 late: `steady` is right on 90% of samples anywhere,
    # `chaser` guesses the class of the label that arrived last, wrong on the first 100 of each
    # run. The labels show `chaser` right while a run lasts, so a fast rate moves to it just
    # before the next run starts, where it is wrong
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(12) % 2, 400)
    right = {"steady": np.where(rng.random(len(y)) < 0.9, y, 1 - y),
             "chaser": np.concatenate([np.full(100, y[0]), y[:-100]])}
    fast = serve_with_labels_late(FixedShareMixture(list(right), eta=2.0), right, y, 100)
    slow = serve_with_labels_late(FixedShareMixture(list(right), eta=0.1), right, y, 100)
    rates = FixedShareMixture(list(right), eta=[2.0, 0.1])
    both = serve_with_labels_late(rates, right, y, 100)
    assert fast < 0.76 < 0.82 < slow  # worse than either candidate alone (0.90, 0.77)
    assert both > slow - 0.03 and rates.rate_share[1] > 0.99
    # the rates' losses differ by a whole label on some samples and swing within each run, so
    # the shares learn slowly (0.14 here)
    assert rates.share_eta < 0.2


@pytest.mark.parametrize("seed", [0, 1])
def test_a_candidate_on_probation_costs_less_at_a_change_of_class_and_keeps_its_runs(seed):
    # three runs of 400: the fast rate takes `chaser` up within the first run and serves it
    # through the first 100 samples of the second, until the shares have learnt; on probation
    # the fast rate serves it no more than the slow rate weighs it. With labels back at once
    # `chaser` is right on all but one sample a run, and both serve it
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3) % 2, 400)
    steady = np.where(rng.random(len(y)) < 0.9, y, 1 - y)
    for delay, at_least in ((100, 0.03), (1, 0.0)):
        right = {"steady": steady, "chaser": np.concatenate([np.full(delay, y[0]), y[:-delay]])}
        plain = serve_with_labels_late(FixedShareMixture(list(right), eta=[2.0, 0.1]),
                                       right, y, delay)
        kept = serve_with_labels_late(FixedShareMixture(list(right), eta=[2.0, 0.1],
                                                        probation=("chaser",)), right, y, delay)
        assert kept >= plain + at_least
        if delay == 1:
            assert kept > 0.99


def test_probation_caps_each_rate_at_the_slowest_rates_weight_and_says_so():
    mixture = FixedShareMixture(["newest_label", "a", "b"], eta=[2.0, 0.1],
                                probation=("newest_label",))
    mixture.rate_weights = np.array([[0.9, 0.05, 0.05], [0.1, 0.6, 0.3]])
    served = mixture.served_weights()
    np.testing.assert_allclose(served, [[0.1, 0.45, 0.45], [0.1, 0.6, 0.3]])
    assert mixture.weights == pytest.approx(mixture.rate_share @ served)
    described = mixture.describe()
    assert described["probation"] == ["newest_label"]
    assert described["rates"][0]["weights"]["newest_label"] == pytest.approx(0.1)
    mixture.rate_weights = np.array([[0.05, 0.9, 0.05], [0.1, 0.6, 0.3]])  # below the cap
    np.testing.assert_array_equal(mixture.served_weights(), mixture.rate_weights)
    one = FixedShareMixture(["newest_label", "a"], eta=2.0, probation=("newest_label",))
    one.weights = [0.9, 0.1]  # one rate: it is the slowest, nothing to cap
    assert one.weights == pytest.approx([0.9, 0.1]) and "probation" not in one.describe()
    alone = FixedShareMixture(["newest_label", "a"], eta=[2.0, 0.1], share=0.0,
                              probation=("newest_label",))
    alone.rate_weights = np.array([[1.0, 0.0], [0.5, 0.5]])  # σ = 0: the rest underflowed
    np.testing.assert_array_equal(alone.served_weights(), alone.rate_weights)  # not NaN
    with pytest.raises(ValueError, match="not a candidate"):
        FixedShareMixture(["a", "b"], probation=("c",))
    with pytest.raises(ValueError, match="no candidate"):
        FixedShareMixture(["a", "b"], probation=("a", "b"))


@pytest.mark.parametrize("gap", [0.5, 0.02])
def test_the_shares_follow_a_steady_gap_between_the_rates_at_any_loss_scale(gap):
    # the slow rate serves better by `gap` on every label: a regressor's rates differ by a little
    # on almost every label, and at a fixed rate of 0.1 a gap of 0.02 moved the shares by 0.6 of a
    # nat in 300 labels (the fast rate still served 0.85); the spread of the losses sets the rate
    rates = FixedShareMixture(["a", "b"], eta=[2.0, 0.1])
    rates.learn_served(np.tile([[0.3 + gap, 0.3]], (300, 1)))
    assert rates.rate_share[1] > 0.95
    # a gap of 0.02 leaves the rate near its start, 1; one of 0.5 spreads the losses, and the
    # rate falls (0.24), where a fixed rate would not
    assert rates.share_eta > 0.9 if gap < 0.1 else rates.share_eta < 0.3


def test_where_the_best_candidate_switches_and_labels_come_at_once_the_fast_rate_is_served():
    # `a` and `b` take turns at being right (90% against 30%) every 300 samples, labels at once
    # (one sample late): the fast rate follows each turn within a few labels, the slow one
    # within about a hundred
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=3600)
    a_turn = (np.arange(len(y)) // 300) % 2 == 0
    good, bad = rng.random(len(y)) < 0.9, rng.random(len(y)) < 0.3
    right = {"a": np.where(np.where(a_turn, good, bad), y, 1 - y),
             "b": np.where(np.where(a_turn, bad, good), y, 1 - y)}
    fast = serve_with_labels_late(FixedShareMixture(list(right), eta=2.0), right, y, 1)
    slow = serve_with_labels_late(FixedShareMixture(list(right), eta=0.1), right, y, 1)
    rates = FixedShareMixture(list(right), eta=[2.0, 0.1])
    both = serve_with_labels_late(rates, right, y, 1)
    assert slow < fast - 0.03 and both > fast - 0.01 and rates.rate_share[0] > 0.99


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_each_record_keeps_what_every_rate_served_and_the_shares_learn_from_it(backend, request):
    import uuid

    from service.engine import MIXTURE_RATES

    # runs of 64 of one class, whatever the inputs say: the newest label is right on most
    # samples, the model on about half; the records go through the store (Redis's too)
    x, _ = binary_stream(512)
    y = np.repeat(np.random.default_rng(1).integers(0, 2, size=8), 64)
    store = {"url": "memory"}
    if backend == "redis":
        store = {"url": request.getfixturevalue("redis_server").url,
                 "namespace": f"rates-{uuid.uuid4().hex}"}
    settings = {"model": BINARY, "batcher": {"max_wait_ms": 0}, "adapter": {"name": "none"},
                "error_memory": {"kind": "off"}, "store": store,
                "mixture": {"enabled": True, "newest_label": "on", "learner": "off",
                            "eta": [2.0, 0.1]}}

    async def scenario():
        async with serving(**settings) as (client, app):
            reply = await client.post("/v1/predict", json={"inputs": x[:16].tolist(),
                                                           "ids": [f"r{i}" for i in range(16)]})
            kept = app.state.runtime.store.raw.get_prediction("r0").arrays[MIXTURE_RATES]
            served = reply.json()["predictions"][0]["probabilities"]
            await client.post("/v1/feedback", json={"labels": [
                {"id": f"r{i}", "label": int(y[i])} for i in range(16)]})
            first = (await client.get("/v1/state")).json()
            for start in range(16, len(x), 16):  # each request's labels back before the next
                rows = (await client.post("/v1/predict", json={
                    "inputs": x[start:start + 16].tolist()})).json()["predictions"]
                await client.post("/v1/feedback", json={"labels": [
                    {"id": row["id"], "label": int(t)}
                    for row, t in zip(rows, y[start:start + 16], strict=True)]})
            return kept, served, first, (await client.get("/v1/state")).json()

    kept, served, first, state = asyncio.run(scenario())
    # two rates of two classes; before any label both serve the model (the newest label
    # repeats the last stage), so each rate's outputs are what was served
    assert kept.shape == (4,)
    np.testing.assert_allclose(kept.reshape(2, 2), [served, served], atol=1e-6)
    assert first["learning"]["mixture"]["served_labels"] == 16
    mixture = state["learning"]["mixture"]
    assert mixture["eta"] == [2.0, 0.1] and mixture["served_labels"] == 512
    shares = [rate["served"] for rate in mixture["rates"]]
    # the fast rate follows the newest label from the first labels of each run, the slow one
    # keeps some of the model's say: what the fast one served was right more often, its share
    # rose (a share credited with the other rate's losses, or another record's label, falls)
    # (0.915: the slow rate's newest label starts at 0.05 too, so it follows the runs as well)
    assert sum(shares) == pytest.approx(1.0) and shares[0] > 0.905  # from 0.9
    assert mixture["weights"]["newest_label"] > 0.5
    # the shares' rate falls as the rates' losses spread: slower now than after the first labels
    assert 0 < mixture["share_eta"] < first["learning"]["mixture"]["share_eta"] <= 1


def test_the_shares_follow_what_each_rate_served_and_no_eta_makes_a_weight_nan():
    mixture = FixedShareMixture(["a", "b"], eta=[2.0, 0.1])
    assert mixture.rate_share.tolist() == pytest.approx([0.9, 0.1])
    task = task_named("classification")
    served = np.tile([[[1.0, 0.0], [0.0, 1.0]]], (300, 1, 1))  # rate 0 serves 0, rate 1 serves 1
    losses = mixture.served_losses(task, served, np.ones(300))
    assert losses[0].tolist() == [1.0, 0.0]
    mixture.learn_served(losses)
    assert mixture.rate_share[1] > 0.99 and mixture.served_labels == 300
    # a weight vector never becomes NaN, however large η and whatever the losses
    steep = FixedShareMixture(["a", "b"], eta=[2.0, 100.0])
    steep.learn(np.array([[1.0, 1.0], [1.0, 0.0]] * 10))
    assert np.isfinite(steep.rate_weights).all() and steep.rate_weights[1, 1] > 0.99


def test_records_of_another_count_of_rates_teach_the_shares_nothing(redis_server):
    import uuid

    from service.engine import MIXTURE_RATES

    # a rolling restart from two rates to three: the new process joins the old records' labels,
    # whose candidates still teach its weights, but not its shares (what three rates served was
    # never kept for them)
    x, y = binary_stream(64)
    store = {"url": redis_server.url, "namespace": f"restart-{uuid.uuid4().hex}"}
    def settings(eta: list[float]) -> dict:
        return {"model": BINARY, "batcher": {"max_wait_ms": 0}, "adapter": {"name": "none"},
                "error_memory": {"kind": "off"}, "store": store,
                "mixture": {"enabled": True, "newest_label": "on", "learner": "off", "eta": eta}}

    async def scenario():
        async with serving(**settings([2.0, 0.1])) as (client, app):
            await client.post("/v1/predict", json={"inputs": x[:32].tolist(),
                                                   "ids": [f"o{i}" for i in range(32)]})
            kept = app.state.runtime.store.raw.get_prediction("o0").arrays[MIXTURE_RATES]
        async with serving(**settings([2.0, 0.5, 0.1])) as (client, app):
            await client.post("/v1/predict", json={"inputs": x[32:].tolist(),
                                                   "ids": [f"n{i}" for i in range(32)]})
            answer = await client.post("/v1/feedback", json={"labels": [
                {"id": f"{'o' if i < 32 else 'n'}{i % 32}", "label": int(y[i])}
                for i in range(64)]})
            return kept, answer.json(), (await client.get("/v1/state")).json()

    kept, answer, state = asyncio.run(scenario())
    assert kept.shape == (4,) and answer["joined"] == 64
    mixture = state["learning"]["mixture"]
    assert mixture["labels"] == 64 and mixture["served_labels"] == 32


def test_a_regressors_recent_residual_candidate_adds_the_last_stages_mean_residual():
    """The candidate serves the last stage plus its mean residual over the last 16 labels
    (label less what the last stage served); before the first label, and after a reset, the
    last stage itself."""
    from service.engine import CANDIDATE_ARRAYS, RECENT_RESIDUAL, LabelledBatch
    from service.settings import load_settings

    model = {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
             "input_shape": [3]}
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    settings = load_settings(None, model=model, mixture={"enabled": True, "learner": "off"})
    with built_engine(settings) as engine:
        assert engine.mixture is not None and RECENT_RESIDUAL in engine.mixture.names
        adapted = CANDIDATE_ARRAYS["adapted"]
        first = engine.forward(x[:32])
        assert np.array_equal(first.arrays[CANDIDATE_ARRAYS[RECENT_RESIDUAL]],
                              first.arrays[adapted])
        served = first.arrays[adapted][:20]
        labels = served[:, 0] + np.arange(20, dtype=np.float32)  # residuals 0, 1, ..., 19
        candidates = {name: first.arrays[CANDIDATE_ARRAYS.get(name, f"candidate.{name}")][:20]
                      for name in engine.mixture.names}
        engine.learn(LabelledBatch(labels=labels, candidates=candidates,
                                   candidate_labels=labels))
        second = engine.forward(x[32:])
        # the last 16 residuals, 4 to 19: their mean, 11.5, added to what the model serves
        np.testing.assert_allclose(second.arrays[CANDIDATE_ARRAYS[RECENT_RESIDUAL]],
                                   second.arrays[adapted] + 11.5, rtol=1e-5)
        engine.reset_adapter()
        third = engine.forward(x[32:])
        assert np.array_equal(third.arrays[CANDIDATE_ARRAYS[RECENT_RESIDUAL]],
                              third.arrays[adapted])
        # late labels of records served before the reset, or by another replica, refill
        # nothing: their residuals are of another last stage
        assert engine.drift is not None and first.served is not None
        token, clock = first.served
        for where in ((token, clock), (token + 1, third.served[1])):
            engine.learn(LabelledBatch(labels=labels, candidates=candidates,
                                       candidate_labels=labels,
                                       candidate_served=np.array([where] * 20, float)))
        assert not engine._residuals
        # a batch none of whose candidate rows is finite teaches nothing, and does not raise
        unknown = {name: np.full_like(values, np.nan) for name, values in candidates.items()}
        engine.learn(LabelledBatch(labels=labels, candidates=unknown, candidate_labels=labels))
        assert not engine._residuals
        engine.learn(LabelledBatch(labels=labels, candidates=candidates, candidate_labels=labels,
                                   candidate_served=np.array([third.served] * 20, float)))
        assert len(engine._residuals) == 16


def test_the_recent_residual_is_a_regressors_alone_where_nothing_changes_the_model():
    from service.runtime import mixture_candidates, recent_residual
    from service.settings import load_settings

    regressor = {"task": "regression", "input_shape": [3]}
    plain = load_settings(None, model=regressor, adapter={"name": "none"})
    assert recent_residual(plain) == "on"
    # the residuals of what learns from labels are stale once it has learnt them
    for changed in ({"supervised": {"enabled": True}}, {"error_memory": {"kind": "exact"}},
                    {"output_corrector": {"enabled": True}}, {"adapter": {"name": "bn"}}):
        assert recent_residual(load_settings(None, model=regressor, **changed)) == "off"
    said = load_settings(None, model=regressor, supervised={"enabled": True},
                         mixture={"recent_residual": "on"})
    assert recent_residual(said) == "on"

    classifier = load_settings(None, model={"task": "classification", "input_shape": [3],
                                            "num_classes": 3},
                               mixture={"enabled": True, "learner": "off"})
    assert recent_residual(classifier) == "off"
    assert "recent_residual" not in mixture_candidates(classifier, shadow=True)
    said = classifier.model_copy(update={"mixture": classifier.mixture.model_copy(
        update={"recent_residual": "on"})})
    with pytest.raises(ValueError, match="a classifier has none"):
        recent_residual(said)


@pytest.mark.parametrize("seeded", [True, False])
def test_the_newest_label_starts_as_the_reference_datas_last_so_the_first_labels_judge_it(
        tmp_path, seeded):
    # a level that rose to 7 over the model's training rows and stays there in the stream; the
    # model (random weights) misses it. Seeded from the reference data, the newest label serves
    # 7 from the first request, and the first labels back show it right; unseeded it repeats
    # the model until the first label, so those labels cannot tell them apart
    from safetensors.torch import save_file

    rng = np.random.default_rng(5)
    path = tmp_path / "reference.safetensors"
    save_file({"inputs": torch.from_numpy(rng.normal(size=(200, 3)).astype(np.float32)),
               "labels": torch.linspace(0.0, 7.0, 200)}, str(path))
    model = {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
             "input_shape": [3], "reference_data": str(path)}
    x = rng.normal(size=(48, 3)).astype(np.float32)
    settings = {"model": model, "batcher": {"max_wait_ms": 0}, "adapter": {"name": "none"},
                "mixture": {"enabled": True, "learner": "off", "newest_from_reference": seeded}}

    async def scenario():
        async with serving(**settings) as (client, app):
            engine = app.state.runtime.engine
            with torch.inference_mode():
                alone = engine.model.module(torch.from_numpy(x[:16]))[:, 0].numpy()
            first = (await client.post("/v1/predict", json={"inputs": x[:16].tolist()})).json()
            before = (await client.get("/v1/state")).json()["learning"]["mixture"]["weights"]
            await client.post("/v1/feedback", json={"labels": [
                {"id": row["id"], "label": 7.0} for row in first["predictions"]]})
            after = (await client.get("/v1/state")).json()["learning"]["mixture"]["weights"]
            return alone, [row["prediction"] for row in first["predictions"]], before, after

    alone, served, before, after = asyncio.run(scenario())
    assert np.abs(alone - 7.0).min() > 1.0  # the model misses the level on every sample
    assert before["newest_label"] == pytest.approx(0.05)  # a prior, as without the seed
    if seeded:
        # before any label: 0.05 of the say to the reference's last label, 7
        np.testing.assert_allclose(served, 0.95 * alone + 0.05 * 7.0, rtol=1e-4, atol=1e-4)
        assert after["newest_label"] > 0.5
    else:
        np.testing.assert_allclose(served, alone, rtol=1e-5, atol=1e-5)
        assert after["newest_label"] == pytest.approx(0.05, abs=0.01)


def test_the_newest_label_is_seeded_only_by_a_valid_label_and_never_after_a_joined_one():
    from service.settings import load_settings

    model = {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
             "input_shape": [3]}
    with built_engine(load_settings(None, model=model, mixture={"learner": "off",
                                                               "enabled": True})) as engine:
        assert engine._newest_label is None  # no reference data: nothing to seed it with
        assert not engine.seed_newest_label(torch.tensor([float("nan")]))
        assert not engine.seed_newest_label(torch.tensor([1.0, 2.0]))  # not one label
        assert not engine.restore_newest_label([1.0, 2.0])  # not this model's width
        assert not engine.restore_newest_label(["x"])
        assert engine.seed_newest_label(torch.tensor([3.0]))
        assert engine.restore_newest_label([4.0])  # a saved label replaces the reference's
        assert engine._newest_label.tolist() == [[4.0]]
        assert engine.newest_label_row() is None  # a seed is no joined label: never saved
    with built_engine(load_settings(None, model={**BINARY}, mixture={
            "enabled": True, "learner": "off", "newest_label": "on"})) as engine:
        assert not engine.seed_newest_label(torch.tensor([5]))  # no such class
        # a class distribution read as classes (the reference data's labels are made long)
        assert not engine.seed_newest_label(torch.tensor([[0.3, 0.7]]).long())
        assert not engine.restore_newest_label([0.5, 0.6])  # no distribution
        assert engine.seed_newest_label(torch.tensor([1]))
        assert engine._newest_label.tolist() == [[0.0, 1.0]]


def regressor_reference(path, values: np.ndarray) -> dict:
    from safetensors.torch import save_file

    inputs = np.random.default_rng(6).normal(size=(len(values), 3)).astype(np.float32)
    save_file({"inputs": torch.from_numpy(inputs),
               "labels": torch.from_numpy(values.astype(np.float32))}, str(path))
    return {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
            "input_shape": [3], "reference_data": str(path)}


def test_the_seed_is_the_reference_files_last_label_whatever_rows_are_kept(tmp_path):
    from service.settings import load_settings

    model = regressor_reference(tmp_path / "reference.safetensors", np.arange(300.0))
    settings = load_settings(None, model={**model, "reference_samples": 100},
                             mixture={"enabled": True, "learner": "off"})
    with built_engine(settings) as engine:
        assert engine._newest_label.tolist() == [[299.0]]  # not row 99, the last one kept


@pytest.mark.slow
def test_a_restart_starts_the_newest_label_where_a_replica_joined_it_last(tmp_path, redis_server):
    # the reference data ended at 299; the stream has moved on to 5 and 7 by the restart: the
    # second life's newest label is the last label the first one joined, not the reference's.
    # A label joined after the restart is the newest again
    import uuid

    model = regressor_reference(tmp_path / "reference.safetensors", np.arange(300.0))
    store = {"url": redis_server.url, "namespace": uuid.uuid4().hex}
    settings = {"model": model, "store": store, "batcher": {"max_wait_ms": 0},
                "mixture": {"enabled": True, "learner": "off"}}
    x = np.random.default_rng(7).normal(size=(32, 3)).astype(np.float32)

    async def life(labels: list[float] | None):
        async with serving(**settings) as (client, app):
            engine = app.state.runtime.engine
            start = engine._newest_label.tolist()
            if labels is not None:
                reply = (await client.post("/v1/predict",
                                           json={"inputs": x[:len(labels)].tolist()})).json()
                await client.post("/v1/feedback", json={"labels": [
                    {"id": row["id"], "label": value}
                    for row, value in zip(reply["predictions"], labels, strict=True)]})
            return start, engine.newest_label_row()

    first_start, first_end = asyncio.run(life([5.0] * 15 + [7.0]))
    second_start, second_end = asyncio.run(life(None))
    assert first_start == [[299.0]] and first_end == [7.0]
    assert second_start == [[7.0]] and second_end is None  # nothing joined in the second life
    third_start, third_end = asyncio.run(life([8.0]))
    assert third_start == [[7.0]] and third_end == [8.0]


@pytest.mark.slow
@pytest.mark.parametrize("blob", [b"not json", b'{"other": 1}', b'{"newest_label": [1e999]}',
                                  b'{"newest_label": [' + b"9" * 400 + b"]}",
                                  b"[" * 100_000 + b"]" * 100_000, b'{"newest_label": [1, 2]}'])
def test_a_stored_newest_label_that_is_no_label_of_this_model_never_stops_the_start(
        tmp_path, redis_server, blob):
    import uuid

    from service.runtime import MIXTURE_STATE, _open_store
    from service.settings import load_settings

    model = regressor_reference(tmp_path / "reference.safetensors", np.arange(300.0))
    store = {"url": redis_server.url, "namespace": uuid.uuid4().hex}
    settings = {"model": model, "store": store, "batcher": {"max_wait_ms": 0},
                "mixture": {"enabled": True, "learner": "off"}}
    raw = _open_store(load_settings(None, **settings))
    raw.save_state(MIXTURE_STATE, blob)
    raw.close()

    async def scenario():
        async with serving(**settings) as (client, app):
            reply = await client.post("/v1/predict", json={"inputs": [[0.0, 0.0, 0.0]]})
            return reply.status_code, app.state.runtime.engine._newest_label.tolist()

    status, newest = asyncio.run(scenario())
    assert status == 200 and newest == [[299.0]]  # the reference data's, as without the state


def test_the_newest_label_is_saved_only_when_a_label_was_joined_since(tmp_path):
    # a replica whose labels stopped must not overwrite, every save_every_s, the newer label
    # another replica saved under the same key
    from service.runtime import MIXTURE_STATE

    model = regressor_reference(tmp_path / "reference.safetensors", np.arange(300.0))
    settings = {"model": model, "batcher": {"max_wait_ms": 0},
                "mixture": {"enabled": True, "learner": "off"}}
    x = np.random.default_rng(8).normal(size=(4, 3)).astype(np.float32)

    async def scenario():
        async with serving(**settings) as (client, app):
            runtime = app.state.runtime
            await runtime.save_newest_label()
            nothing = await runtime.store.load_state(MIXTURE_STATE)  # a seed is never saved
            reply = (await client.post("/v1/predict", json={"inputs": x.tolist()})).json()
            await client.post("/v1/feedback", json={"labels": [
                {"id": row["id"], "label": 5.0} for row in reply["predictions"]]})
            await runtime.save_newest_label()
            saved = await runtime.store.load_state(MIXTURE_STATE)
            await runtime.store.save_state(MIXTURE_STATE, b'{"newest_label": [9.0]}')  # another
            await runtime.save_newest_label()  # no label joined here since: nothing written
            kept = await runtime.store.load_state(MIXTURE_STATE)
            return nothing, saved, kept

    nothing, saved, kept = asyncio.run(scenario())
    assert nothing is None
    assert saved == b'{"newest_label":[5.0]}' and kept == b'{"newest_label": [9.0]}'
