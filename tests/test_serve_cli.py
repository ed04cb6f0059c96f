"""`adaptd serve`, as the README starts it: ready within 60 s, serving, and stopping cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service.cli import server_parts
from service.demo import digits_split
from tests.redis_server import free_port

# every test here starts `adaptd serve` in a process of its own, several seconds each
pytestmark = pytest.mark.slow

ADAPTD = str(Path(sys.executable).with_name("adaptd"))


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def _serve_and_predict(environment: dict[str, str]) -> str:
    """Start `adaptd serve`, wait for ready (60 s at most), predict 8 digits, stop it with
    SIGTERM; the process's output."""
    port = free_port()
    process = subprocess.Popen([ADAPTD, "serve", "--port", str(port)], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        status = None
        while time.monotonic() - started < 60:
            if process.poll() is not None:
                raise AssertionError(process.stdout.read().decode())
            try:
                status, _ = _get(f"{base}/readyz")
            except (urllib.error.URLError, ConnectionError):
                status = None
            if status == 200:
                break
            time.sleep(0.25)
        assert status == 200, "not ready within 60 s"
        _, _, x_test, y_test = digits_split()
        body = json.dumps({"inputs": x_test[:8].tolist()}).encode()
        request = urllib.request.Request(f"{base}/v1/predict", data=body,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            predictions = json.load(reply)["predictions"]
        assert [p["prediction"] for p in predictions] == y_test[:8].tolist()
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught, as a process should
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    return output


def test_adaptd_serve_with_no_configuration_is_ready_within_60_seconds_and_predicts():
    output = _serve_and_predict(_environment())
    # httptools and uvloop are installed with adaptd, and `auto` takes them
    assert "HTTP parser httptools, event loop uvloop" in output


def test_adaptd_serve_runs_on_h11_and_asyncio_when_told_to():
    output = _serve_and_predict(_environment() | {"ADAPTD_HTTP": "h11", "ADAPTD_LOOP": "asyncio"})
    assert "HTTP parser h11, event loop asyncio" in output


def test_auto_takes_the_pure_python_parts_where_the_c_ones_do_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "httptools", None)  # `import httptools` raises ImportError
    assert server_parts("auto", "auto") == ("h11", "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert server_parts("auto", "auto") == ("h11", "asyncio")
    assert server_parts("h11", "asyncio") == ("h11", "asyncio")
    with pytest.raises(ImportError, match="http = 'httptools', but httptools does not import"):
        server_parts("httptools", "auto")
    with pytest.raises(ImportError, match="loop = 'uvloop', but uvloop does not import"):
        server_parts("auto", "uvloop")


def test_adaptd_serve_refuses_a_parser_that_does_not_import(tmp_path):
    # first on the path, a `httptools` package that raises as it is imported
    (tmp_path / "httptools").mkdir()
    (tmp_path / "httptools" / "__init__.py").write_text("raise ImportError('not here')\n")
    result = subprocess.run(
        [ADAPTD, "serve", "--port", str(free_port())],
        env=_environment() | {"ADAPTD_HTTP": "httptools", "PYTHONPATH": str(tmp_path)},
        capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"invalid configuration" in result.stderr
    assert b"http = 'httptools', but httptools does not import here" in result.stderr


def test_adaptd_serve_refuses_a_bad_configuration_with_a_message():
    environment = _environment() | {"ADAPTD_STORE__URL": "postgres://nowhere"}
    result = subprocess.run([ADAPTD, "serve"], env=environment, capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"invalid configuration" in result.stderr
    assert b"use 'memory' or redis://" in result.stderr


def test_adaptd_serve_refuses_a_renamed_key_naming_the_new_one(tmp_path):
    config = tmp_path / "adaptd.toml"
    config.write_text("[adapter]\ncalibration_data = \"reference.safetensors\"\n")
    environment = _environment() | {"ADAPTD_COMPENSATION__KIND": "exact"}
    result = subprocess.run([ADAPTD, "serve"], env=environment, capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"invalid configuration" in result.stderr
    assert b"ADAPTD_COMPENSATION__KIND" in result.stderr
    assert b"`[compensation]` is now `[error_memory]`" in result.stderr
    result = subprocess.run([ADAPTD, "serve", "--config", str(config)], env=_environment(),
                            capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"adapter.calibration_data is now model.reference_data" in result.stderr


def test_adaptd_serve_refuses_a_model_that_does_not_fit_its_declared_shape():
    result = subprocess.run(
        [ADAPTD, "serve", "--model-factory", "tests.models:regressor", "--port", str(free_port())],
        env=_environment() | {"PYTHONPATH": str(Path(__file__).parents[1])},
        capture_output=True, timeout=60,
    )
    assert result.returncode != 0
    assert b"set model.input_shape to the shape of one sample" in result.stderr
