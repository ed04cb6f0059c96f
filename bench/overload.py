"""Overload: many concurrent large prediction requests against one `adaptd serve` process.

A real `adaptd serve` (the demo model, the in-process store) is started on a free port of
127.0.0.1, and `--requests` requests of `--samples` samples each are sent at once, each on its
own connection (a small HTTP/1.1 client on asyncio streams, so the client costs little CPU next
to the server). Every request is bounded by `--timeout` seconds. Reported per run: how many were
accepted (200), shed (503, with their Retry-After) or anything else; the p50 and p99 latency of
the accepted ones, from connecting to the last byte of the answer; and the server's resident
memory (VmRSS from /proc, so Linux only) when idle before the load, at its peak during it
(sampled every 10 ms) and 2 s after the last answer.

Two runs by default: the batcher's admission bounds as configured by default
(`batcher.max_queued_samples` = 16 × max_batch_size, `batcher.max_inflight_requests` = 512), and
the bounds raised out of reach, which is how the service behaved before it had them.

    python -m bench.overload                         # 300 requests of 256 samples, both runs
    python -m bench.overload --runs bounded          # the defaults only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.served import HOST, PeakRss, free_port, rss_bytes, wait_ready
from service.demo import digits_split

ADAPTD = str(Path(sys.executable).with_name("adaptd"))
RUNS = {
    "bounded": {},
    "unbounded": {"ADAPTD_BATCHER__MAX_QUEUED_SAMPLES": "100000000",
                  "ADAPTD_BATCHER__MAX_INFLIGHT_REQUESTS": "1000000"},
}


async def _post(port: int, request: bytes, timeout: float) -> tuple[int, float, dict[str, str]]:
    """(status, seconds, headers) of one request on a connection of its own; status 0 when it
    failed or ran out of time."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            await reader.readexactly(int(headers.get("content-length", 0)))
            writer.close()
    except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
        return 0, time.perf_counter() - started, {}
    return status, time.perf_counter() - started, headers


def _request(samples: int) -> bytes:
    _, _, x_test, _ = digits_split()
    inputs = x_test[np.arange(samples) % len(x_test)].tolist()
    body = json.dumps({"inputs": inputs}).encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def _serve(port: int, environment: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")} | environment
    env["ADAPTD_LOG_LEVEL"] = "warning"
    process = subprocess.Popen([ADAPTD, "serve", "--host", HOST, "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(process, port, "/readyz", "adaptd serve")
    return process


def _one_run(environment: dict[str, str], requests: int, request: bytes,
             timeout: float) -> dict[str, object]:
    port = free_port()
    process = _serve(port, environment)
    try:
        asyncio.run(_post(port, request, timeout))  # one request first: warm, as in service
        time.sleep(1.0)
        idle = rss_bytes(process.pid)

        async def load() -> list[tuple[int, float, dict[str, str]]]:
            return await asyncio.gather(*[_post(port, request, timeout)
                                          for _ in range(requests)])

        started = time.perf_counter()
        with PeakRss(process.pid) as peak:
            results = asyncio.run(load())
        elapsed = time.perf_counter() - started
        time.sleep(2.0)
        after = rss_bytes(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    accepted = sorted(seconds for status, seconds, _ in results if status == 200)
    shed = [headers for status, _, headers in results if status == 503]
    other = Counter(status for status, _, _ in results if status not in (200, 503))
    return {
        "accepted": len(accepted), "shed": len(shed),
        "other": ", ".join(f"{n} × {status or 'no answer'}" for status, n in sorted(other.items()))
                 or "0",
        "retry_after": sorted({h.get("retry-after", "-") for h in shed}),
        "p50": float(np.percentile(accepted, 50)) if accepted else float("nan"),
        "p99": float(np.percentile(accepted, 99)) if accepted else float("nan"),
        "idle": idle, "peak": max(peak.peak, idle), "after": after, "elapsed": elapsed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="concurrent requests")
    parser.add_argument("--samples", type=int, default=256, help="samples per request")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    args = parser.parse_args(argv)
    request = _request(args.samples)
    results = {run: _one_run(RUNS[run], args.requests, request, args.timeout)
               for run in args.runs}

    mib = 1024 * 1024
    print(f"# Overload, one `adaptd serve` ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]})")
    print(f"`python -m bench.overload --requests {args.requests} --samples {args.samples}`: "
          f"{args.requests} concurrent requests of {args.samples} samples "
          f"({len(request) / mib:.2f} MiB each)\n")
    print("| batcher bounds | accepted | shed (503) | other | Retry-After | accepted p50 | "
          "accepted p99 | all answered in | RSS idle | RSS peak | RSS after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    names = {"bounded": "defaults (1,024 samples, 512 requests)",
             "unbounded": "out of reach (as before)"}
    for run, r in results.items():
        print(f"| {names[run]} | {r['accepted']} | {r['shed']} | {r['other']} | "
              f"{', '.join(r['retry_after']) or '-'} | {r['p50']:.2f} s | {r['p99']:.2f} s | "
              f"{r['elapsed']:.1f} s | {r['idle'] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | "
              f"{r['after'] / mib:.0f} MiB |")


if __name__ == "__main__":
    main()
