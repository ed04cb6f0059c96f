"""Settings: defaults serve the demo; a TOML file, ADAPTD_* variables and flags override it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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
    assert settings.adapter.name == "none"
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
