"""The online mixture serves the candidate the labels favour: never much worse than the best."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from adapters.mixture import FixedShareMixture
from adapters.task import task_named
from tests.harness import metric, serving
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
                "mixture": {"enabled": mixed, "eta": 0.5}}

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


def test_the_newest_label_takes_over_where_labels_come_in_runs():
    # labels that persist, whatever the inputs say (runs of 64 of one class, labels back after
    # each request of 16): the source model is right on about half, the label that arrived last
    # on all but the first request of a run of the other class (about 7 in 8)
    x, _ = binary_stream(2048)
    y = np.repeat(np.random.default_rng(1).integers(0, 2, size=32), 64)
    settings = {"model": BINARY, "batcher": {"max_wait_ms": 0}, "adapter": {"name": "none"},
                "error_memory": {"kind": "off"},
                "mixture": {"enabled": True, "newest_label": "on"}}

    async def scenario():
        async with serving(**settings) as (client, _):
            served = []
            for start in range(0, len(x), 16):
                reply = await client.post("/v1/predict",
                                          json={"inputs": x[start:start + 16].tolist()})
                rows = reply.json()["predictions"]
                served += [row["prediction"] for row in rows]
                await client.post("/v1/feedback", json={"labels": [
                    {"id": row["id"], "label": int(t)}
                    for row, t in zip(rows, y[start:start + 16], strict=True)]})
            state = (await client.get("/v1/state")).json()
            return np.array(served), state

    served, state = asyncio.run(scenario())
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


@pytest.mark.parametrize(("task", "newest", "expected"), [
    ("regression", "auto", ["newest_label", "source", "compensated"]),
    ("classification", "auto", ["source", "compensated"]),
    ("classification", "on", ["newest_label", "source", "compensated"]),
    ("regression", "off", ["source", "compensated"]),
])
def test_the_newest_label_is_a_candidate_for_a_regressor_unless_said(task, newest, expected):
    from service.runtime import mixture_candidates
    from service.settings import load_settings

    settings = load_settings(None, model={"task": task, "num_classes": None
                                          if task == "regression" else 10},
                             error_memory={"kind": "exact"}, adapter={"name": "none"},
                             mixture={"enabled": True, "newest_label": newest})
    assert mixture_candidates(settings, shadow=True) == expected
