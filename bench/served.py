"""A server process under measurement: a free local port, its resident memory, its readiness.

Shared by the benchmarks that start a real server (`bench.overload`, `bench.serve`): the server is
a child process bound to 127.0.0.1, polled until a GET answers 200, and its resident set size is
read from /proc (so Linux only).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time

HOST = "127.0.0.1"


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """The resident set size of process `pid` (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def tree_rss_bytes(pid: int) -> int:
    """The resident set size of `pid` and all its descendants, summed: what a server that runs
    its model in worker processes (MLServer's inference pool, LitServe's workers) holds."""
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += rss_bytes(current)
        except (FileNotFoundError, RuntimeError):  # gone meanwhile, or a zombie
            pass
        pending.extend(children.get(current, []))
    return total


class PeakRss:
    """The largest RSS of a process, sampled every 10 ms in a thread while in the `with`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def get_status(port: int, path: str) -> int:
    """The status of one GET on a connection of its own."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    await reader.read()
    writer.close()
    return status


def wait_ready(process: subprocess.Popen, port: int, path: str, name: str,
               timeout: float = 120.0) -> None:
    """Poll GET `path` until it answers 200; raise (and terminate the process) if the process
    exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode} before it was "
                               "ready")
        try:
            if asyncio.run(get_status(port, path)) == 200:
                return
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"{name} was not ready within {timeout:.0f} s")
