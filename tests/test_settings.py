"""Settings: defaults serve the demo; a TOML file, ADAPTD_* variables and flags override it."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
import torch
from harness import serving
from pydantic import ValidationError

from service.runtime import torch_threads
from service.settings import load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("ADAPTD_"):
            monkeypatch.delenv(name)


def test_with_no_configuration_the_demo_model_is_served_on_the_in_process_store():
    settings = load_settings()
    assert settings.model.factory == "service.demo:digits_cnn"
    assert settings.store.url == "memory"
    assert settings.adapter.name == "auto"  # bn for the demo CNN (tests/test_runs.py)
    assert (settings.adapter.norm, settings.adapter.norm_layers, settings.adapter.runs) == \
        ("robust", "auto", "auto")
    assert settings.namespace == "digits-cnn"


def test_flags_beat_environment_which_beats_the_file_which_beats_defaults(tmp_path, monkeypatch):
    config = tmp_path / "adaptd.toml"
    config.write_text(
        "port = 9000\n"
        "[store]\nurl = \"redis://file:6379/0\"\nrecord_ttl_s = 60\n"
        "[batcher]\nmax_batch_size = 16\nmax_wait_ms = 2\n"
        "[adapter]\nname = \"tent\"\n"
    )
    monkeypatch.setenv("ADAPTD_STORE__URL", "redis://env:6379/0")
    monkeypatch.setenv("ADAPTD_BATCHER__MAX_WAIT_MS", "7")
    settings = load_settings(config, batcher={"max_wait_ms": 9})
    assert settings.port == 9000  # file
    assert settings.store.url == "redis://env:6379/0"  # environment over file
    assert settings.store.record_ttl_s == 60  # file, beside an environment override in its table
    assert settings.batcher.max_batch_size == 16  # file
    assert settings.batcher.max_wait_ms == 9  # flag over environment
    assert settings.adapter.name == "tent"


def test_the_config_file_can_be_named_by_adaptd_config(tmp_path, monkeypatch):
    config = tmp_path / "adaptd.toml"
    config.write_text("[adapter]\nname = \"tent\"\n")
    monkeypatch.setenv("ADAPTD_CONFIG", str(config))
    assert load_settings().adapter.name == "tent"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[store]\nurl = \"postgres://x\"\n", "use 'memory' or redis://"),
        ("[store]\nrecord_tll_s = 5\n", "Extra inputs are not permitted"),
        ("[batcher]\nmax_batch_size = 0\n", "greater than 0"),
        ("[model]\nclass_names = [\"a\", \"b\"]\n", "2 names for 10 classes"),
        ("[model]\ntask = \"ranking\"\n", "'classification' or 'regression'"),
        ("[supervised]\nreplay = 100\n", "only supervised.replay_steps rehearses"),
        ("[supervised]\nreplay_steps = 3\n", "needs samples to replay"),
        ("[supervised]\ntrain = \"everything\"\n", "'auto', 'norm', 'lowrank' or 'all'"),
        ("[supervised]\naverage = 1.0\n", "less than 1"),
    ],
)
def test_a_mistake_in_the_config_file_is_an_error_that_names_it(tmp_path, toml, message):
    config = tmp_path / "adaptd.toml"
    config.write_text(toml)
    with pytest.raises(ValidationError, match=message):
        load_settings(config)


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


# --- renamed in this version: the old keys are refused, from every source, naming the new ones ---

RENAMED_KEYS = [
    # (TOML, environment variable, what the message must name)
    ("[compensation]\nkind = \"exact\"\n", "ADAPTD_COMPENSATION__KIND", "`[error_memory]`"),
    ("[adapter]\ncalibration_data = \"reference.safetensors\"\n",
     "ADAPTD_ADAPTER__CALIBRATION_DATA", "model.reference_data"),
    ("[feedback.supervised]\nenabled = true\n", "ADAPTD_FEEDBACK__SUPERVISED__ENABLED",
     "`[supervised]`"),
    ("[correction]\nenabled = true\n", "ADAPTD_CORRECTION__ENABLED", "`[output_corrector]`"),
    ("[adapter]\ncalibration_samples = 100\n", "ADAPTD_ADAPTER__CALIBRATION_SAMPLES",
     "model.reference_samples"),
]


@pytest.mark.parametrize(("toml", "variable", "new"), RENAMED_KEYS)
def test_an_old_key_in_the_config_file_is_refused_naming_the_new_one(tmp_path, toml, variable,
                                                                     new):
    config = tmp_path / "adaptd.toml"
    config.write_text(toml)
    with pytest.raises(ValidationError, match=re.escape(new)) as refused:
        load_settings(config)
    assert refused.value.errors()[0]["type"] == "renamed_setting"
    assert " is now " in str(refused.value)


@pytest.mark.parametrize(("toml", "variable", "new"), RENAMED_KEYS)
def test_an_old_environment_variable_is_refused_naming_the_new_one(monkeypatch, toml, variable,
                                                                   new):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValidationError, match=re.escape(new)) as refused:
        load_settings()
    assert refused.value.errors()[0]["loc"] == (variable,)
    assert refused.value.errors()[0]["type"] == "renamed_setting"


@pytest.mark.parametrize(
    "variable", ["adaptd_compensation__k", "ADAPTD_CORRECTION__HIDDEN", "ADAPTD_COMPENSATION"]
)
def test_an_old_top_level_section_is_refused_whatever_the_case_or_depth(monkeypatch, variable):
    # the environment source drops variables of an unknown top-level section without a word
    monkeypatch.setenv(variable, "3")
    with pytest.raises(ValidationError, match="is now `"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "new"),
    [("ADAPTD_FEEDBACK", '{"supervised": {"enabled": true}}', "`[supervised]`"),
     ("ADAPTD_ADAPTER", '{"calibration_data": "r.safetensors"}', "model.reference_data")],
)
def test_an_old_key_inside_a_json_section_variable_is_refused(monkeypatch, variable, value, new):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=re.escape(new)):
        load_settings()


@pytest.mark.parametrize(
    ("overrides", "new"),
    [({"compensation": {"kind": "exact"}}, "`[error_memory]`"),
     ({"adapter": {"calibration_data": "r.safetensors"}}, "model.reference_data"),
     ({"feedback": {"supervised": {"enabled": True}}}, "`[supervised]`"),
     ({"correction": {"enabled": True}}, "`[output_corrector]`")],
)
def test_an_old_key_as_an_override_is_refused_naming_the_new_one(overrides, new):
    with pytest.raises(ValidationError, match=re.escape(new)):
        load_settings(None, **overrides)


def test_an_old_key_error_shows_only_that_keys_value(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTD_API_TOKEN", "s3cret-token")
    config = tmp_path / "adaptd.toml"
    config.write_text("[compensation]\nkind = \"exact\"\n[correction]\nenabled = true\n")
    with pytest.raises(ValidationError) as refused:
        load_settings(config)
    assert [e["loc"] for e in refused.value.errors()] == [("compensation",), ("correction",)]
    assert "s3cret" not in str(refused.value)


def test_the_new_keys_are_read_from_the_file_and_the_environment(tmp_path, monkeypatch):
    config = tmp_path / "adaptd.toml"
    config.write_text(
        "[model]\ntask = \"regression\"\ninput_shape = [4]\n"
        "reference_data = \"reference.safetensors\"\n"
        "[error_memory]\nkind = \"exact\"\nk = 7\n"
        "[supervised]\nenabled = true\nrank = 8\n"
        "[output_corrector]\nenabled = true\nhidden = 16\n"
    )
    monkeypatch.setenv("ADAPTD_ERROR_MEMORY__WEIGHT", "0.25")
    monkeypatch.setenv("ADAPTD_SUPERVISED__BATCH_SIZE", "16")
    monkeypatch.setenv("ADAPTD_OUTPUT_CORRECTOR__STEPS", "3")
    settings = load_settings(config)
    assert settings.model.reference_data == Path("reference.safetensors")
    assert (settings.error_memory.kind, settings.error_memory.k,
            settings.error_memory.weight) == ("exact", 7, 0.25)
    assert (settings.supervised.enabled, settings.supervised.rank,
            settings.supervised.batch_size) == (True, 8, 16)
    assert (settings.output_corrector.enabled, settings.output_corrector.hidden,
            settings.output_corrector.steps) == (True, 16, 3)
    for old in ("compensation", "correction"):
        assert not hasattr(settings, old)
    assert not hasattr(settings.feedback, "supervised")
    assert not hasattr(settings.adapter, "calibration_data")


def test_the_new_keys_are_read_from_overrides_and_the_defaults_are_off(monkeypatch):
    monkeypatch.setenv("ADAPTD_MODEL__REFERENCE_DATA", "env.safetensors")
    settings = load_settings(None, error_memory={"kind": "hashed"}, supervised={"enabled": True})
    assert settings.model.reference_data == Path("env.safetensors")
    assert (settings.error_memory.kind, settings.supervised.enabled) == ("hashed", True)
    defaults = load_settings(None, model={"reference_data": None})
    assert defaults.model.reference_data is None
    assert (defaults.error_memory.kind, defaults.supervised.enabled,
            defaults.output_corrector.enabled) == ("off", False, False)


def test_the_output_corrector_is_for_regression_only():
    with pytest.raises(ValidationError, match="output_corrector corrects a regression model's "
                       "values; for classification use error_memory"):
        load_settings(None, output_corrector={"enabled": True})
    assert load_settings(None, model={"task": "regression", "input_shape": [4]},
                         output_corrector={"enabled": True}).output_corrector.enabled


def test_torch_threads_leave_a_core_to_the_requests_unless_set(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    assert torch_threads(load_settings(None)) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    assert torch_threads(load_settings(None)) == 1
    assert torch_threads(load_settings(None, torch_threads=2)) == 2
    with pytest.raises(ValidationError, match="torch_threads"):
        load_settings(None, torch_threads=0)

    async def started() -> int:
        async with serving(torch_threads=1):
            return torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        assert asyncio.run(started()) == 1
    finally:
        torch.set_num_threads(before)


def test_the_complete_toml_file_in_the_docs_loads_as_the_defaults(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    start = text.index("```toml", text.index("## A complete TOML file")) + len("```toml")
    config = tmp_path / "adaptd.toml"
    config.write_text(text[start:text.index("```", start)])
    assert load_settings(config).model_dump() == load_settings(None).model_dump()


@pytest.mark.parametrize(("eta", "message"), [
    ([], "one rate or a list of 1 to 8"), ([1.0] * 9, "one rate or a list of 1 to 8"),
    ([0], r"each rate lies in \(0, 100\]"), (-1, r"each rate lies in \(0, 100\]"),
    (float("inf"), r"each rate lies in \(0, 100\]"), ([2, 101], r"each rate lies in \(0, 100\]"),
    (True, "each rate is a number"), ([2, True], "each rate is a number"),
    (["a"], "each rate is a number"), ([[1]], "each rate is a number"),
    ([2, 2.0], "each rate once"), ([0.1, 0.1000001], "each rate once"),
])
def test_a_bad_mixture_eta_is_refused_at_start_with_one_message(eta, message):
    with pytest.raises(ValidationError, match=message):
        load_settings(None, mixture={"eta": eta})


@pytest.mark.parametrize(("value", "expected"), [("[2.0, 0.1]", [2.0, 0.1]), ("0.5", 0.5)])
def test_mixture_eta_comes_from_the_environment_as_a_number_or_a_json_list(monkeypatch, value,
                                                                            expected):
    monkeypatch.setenv("ADAPTD_MIXTURE__ETA", value)
    assert load_settings(None).mixture.eta == expected
