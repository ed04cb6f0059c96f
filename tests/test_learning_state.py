"""Say what is on: every learning part with its settings as built, and every configured part
that will do nothing, in `/v1/state` and in the start-up log."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adapters.tta.eata import ETA
from adapters.tta.runs import STICKINESS
from tests.harness import serving
from tests.models import binary

BINARY = {"factory": "tests.models:binary", "name": "bin", "task": "classification",
          "input_shape": [4], "num_classes": 2}


@pytest.fixture
def binary_reference(tmp_path):
    path = tmp_path / "reference.safetensors"
    inputs = np.random.default_rng(1).normal(size=(512, 4)).astype(np.float32)
    save_file({"inputs": torch.from_numpy(inputs)}, str(path))
    return str(path)


async def state_of(**settings):
    async with serving(**settings) as (client, _):
        return (await client.get("/v1/state")).json()


def test_state_lists_every_learning_part_with_what_auto_chose():
    state = asyncio.run(state_of(adapter={"name": "tent"}, supervised={"enabled": True},
                                 error_memory={"kind": "hashed"}))
    learning = state["learning"]
    assert learning["adapter"] == {"name": "tent", "learning_rate": 0.001, "norm": "robust",
                                   "norm_momenta": [0.02, 0.00873, 0.002]}  # norm_layers auto
    assert learning["runs"]["filtered"] == 0  # runs = auto: the filter is there, unused yet
    assert learning["supervised"]["trains"] == "norm"  # train = auto on a model with BatchNorm
    assert learning["error_memory"]["kind"] == "hashed" and learning["error_memory"]["bits"] == 8
    assert "adanpc" not in learning and "output_corrector" not in learning
    assert learning["collapse_guard"] and learning["shadow"] and learning["drift"]


def test_the_defaults_say_their_drift_actions_have_nothing_to_act_on(caplog):
    with caplog.at_level(logging.WARNING, logger="adaptd"):
        state = asyncio.run(state_of())
    learning = state["learning"]
    adapter = learning.pop("adapter")
    # bn with graded statistics (each layer's momentum below the one before) and the filter
    assert (adapter["name"], adapter["learning_rate"], adapter["norm"]) == ("bn", 0.0, "robust")
    first, second, third = adapter["norm_momenta"]
    assert first == 0.02 and first > second > third > 0
    assert learning == {"collapse_guard": True, "shadow": True, "drift": True,
                        "runs": {"filtered": 0,  # nothing served yet: the grid's mean
                                 "stickiness": round(float(np.mean(STICKINESS)), 3),
                                 "labelled_pairs": 0, "settling": False,
                                 "settled_rows": 0}}
    assert [w.split(" has ")[0] for w in state["warnings"]] == [
        "drift action boost_lr", "drift action trim_memory"]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("inert: ")]
    assert logged == [f"inert: {w}" for w in state["warnings"]]


def test_eata_on_two_classes_says_it_will_rarely_step(binary_reference):
    state = asyncio.run(state_of(model={**BINARY, "reference_data": binary_reference},
                                 adapter={"name": "eata"}, drift={"enabled": False}))
    assert len(state["warnings"]) == 1
    assert state["warnings"][0].startswith("eata's filters select 0.0% of the reference data's")
    # with the redundancy filter off the same model steps, and nothing is said
    state = asyncio.run(state_of(model={**BINARY, "reference_data": binary_reference},
                                 adapter={"name": "eata", "options": {"d_margin": 1.0}},
                                 drift={"enabled": False}))
    assert state["warnings"] == []


def test_the_selection_rate_leaves_the_adapter_as_it_was():
    adapter = ETA(binary(), num_classes=2)
    outputs = torch.randn(512, 2) * 5
    adapter.current_model_probs = torch.tensor([0.3, 0.7])
    assert adapter.selection_rate(outputs) < 0.05
    assert torch.equal(adapter.current_model_probs, torch.tensor([0.3, 0.7]))
    ten = torch.nn.functional.one_hot(torch.arange(512) % 10, 10).float() * 8
    assert ETA(torch.nn.Sequential(torch.nn.BatchNorm1d(10)), num_classes=10).selection_rate(
        ten) > 0.5  # confident and spread over ten classes: most are far from their mean


def test_the_start_up_checks_leave_the_served_model_as_it_was():
    from service.runtime import inert_settings
    from tests.harness import settings_for

    async def scenario():
        settings = settings_for(adapter={"name": "eata"})
        async with serving(settings) as (_, app):
            engine = app.state.runtime.engine
            before = {k: v.clone() for k, v in engine.adapter.state_dict().items()}
            from service.reference import load_reference_data
            resolved = engine.settings  # what start-up checks: `auto` made concrete
            inert_settings(resolved, engine, load_reference_data(resolved, engine.model))
            after = engine.adapter.state_dict()
            return [k for k in before if not torch.equal(before[k], after[k])]

    assert asyncio.run(scenario()) == []


def test_balanced_statistics_say_where_they_have_nothing_to_balance():
    def balanced_warnings(**settings):
        state = asyncio.run(state_of(drift={"enabled": False}, **settings))
        return [w for w in state["warnings"] if "'balanced'" in w]

    assert balanced_warnings(adapter={"name": "bn", "norm": "balanced"}, model=BINARY) == []
    (said,) = balanced_warnings(adapter={"name": "none", "norm": "balanced"})
    assert "does nothing for adapter 'none'" in said
    regressor = {"factory": "tests.models:regressor", "name": "reg", "task": "regression",
                 "input_shape": [3]}
    (said,) = balanced_warnings(adapter={"name": "bn", "norm": "balanced"}, model=regressor)
    assert "a regressor has none" in said


def test_the_supervised_step_says_when_its_replay_or_reference_settings_cannot_act():
    def supervised_warnings(**settings):
        state = asyncio.run(state_of(drift={"enabled": False}, **settings))
        return [w for w in state["warnings"] if w.startswith("supervised.")]

    (said,) = supervised_warnings(supervised={"train": "all", "replay": 100, "replay_steps": 2})
    assert "which is off: set supervised.enabled = true" in said
    (said,) = supervised_warnings(supervised={"average": 0.9})
    assert "which is off: set supervised.enabled = true" in said
    assert supervised_warnings(supervised={"enabled": True, "train": "all", "replay": 100,
                                           "replay_steps": 2, "reference_batch": 8}) == []
    (said,) = supervised_warnings(adapter={"name": "bn", "norm": "batch"},
                                  supervised={"enabled": True, "reference_batch": 8})
    assert "each reference batch is normalised by itself" in said
