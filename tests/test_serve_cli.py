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
from collections.abc import Callable
from pathlib import Path

import pytest

from service.cli import server_parts
from service.demo import digits_split
from tests.harness import exchange, pieces, statuses
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


def _serve_and_predict(environment: dict[str, str],
                       probe: Callable[[int], None] | None = None) -> str:
    """Start `adaptd serve`, wait for ready (60 s at most), predict 8 digits, run `probe` on its
    port, stop it with SIGTERM; the process's output."""
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
        if probe is not None:
            probe(port)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught, as a process should
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    return output


def _heads_probe(parser: str) -> Callable[[int], None]:
    """What each parser does with a request's head: a HTTP/1.1 request without Host (h11
    refuses it, httptools takes it: which one serves), a head of 20 KiB sent in 2 KiB pieces
    (both refuse it once 16 KiB of it wait: 400 from h11, 431 from httptools), one of 12 KiB
    (both take it), and two requests with 40 KiB bodies sent back to back on one connection
    (neither counts a body as a head)."""
    def probe(port: int) -> None:
        no_host, _ = exchange(port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert statuses(no_host) == ([200] if parser == "httptools" else [400]), no_host[:200]
        padding = b"x-padding: " + b"a" * 20_480 + b"\r\n"
        too_large, _ = exchange(port, *pieces(b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + padding
                                              + b"Connection: close\r\n\r\n"))
        if parser == "httptools":
            assert statuses(too_large) == [431], too_large[:300]
            assert b"longer than 16384 bytes" in too_large
        else:
            assert statuses(too_large) == [400], too_large[:300]
        padding = b"x-padding: " + b"a" * 12_288 + b"\r\n"
        fits, _ = exchange(port, *pieces(b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + padding
                                         + b"Connection: close\r\n\r\n"))
        assert statuses(fits) == [200], fits[:300]
        body = b'{"labels": "' + b"a" * 40_960 + b'"}'
        request = (b"POST /v1/feedback HTTP/1.1\r\nHost: a\r\nContent-Type: application/json"
                   b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n")
        both, _ = exchange(port, request + b"\r\n" + body + request
                           + b"Connection: close\r\n\r\n" + body)
        assert statuses(both) == [422, 422], both[:300]
    return probe


def test_adaptd_serve_with_no_configuration_is_ready_within_60_seconds_and_predicts():
    output = _serve_and_predict(_environment(), probe=_heads_probe("httptools"))
    # httptools and uvloop are installed with adaptd, and `auto` takes them
    assert "HTTP parser httptools, event loop uvloop" in output
    assert "Request line and headers longer than 16384 bytes refused." in output


def test_adaptd_serve_runs_on_h11_and_asyncio_when_told_to():
    output = _serve_and_predict(_environment() | {"ADAPTD_HTTP": "h11", "ADAPTD_LOOP": "asyncio"},
                                probe=_heads_probe("h11"))
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
