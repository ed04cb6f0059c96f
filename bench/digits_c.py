"""B1, Digits-C: continual test-time adaptation on a stream of corrupted handwritten digits.

The demo CNN, trained on one half of scikit-learn's digits, meets the other half under ten
corruptions in a row (fresh randomness per domain, shuffled, no reset between domains), then the
clean half again, which shows what the stream did to clean accuracy (forgetting).

Two ways through the stream:
- in process, batches of 64 through the same engine the service runs (`service.runtime.
  build_engine`), for each method and each test-time normalisation (`batch`: the references'
  batch statistics; `robust`: the service default);
- through the running service (`adaptd serve` on loopback), one sample per request, a few
  requests in flight, so the micro-batcher and the adaptation buffer do what they do in
  production.

    python -m bench.digits_c                       # in process, every method, both norms
    python -m bench.digits_c --service             # and through the service, one per request
    python -m bench.digits_c --methods none,tent --norms batch

Prints a markdown table per run: error per domain (%), mean over the corrupted domains, clean error
after the stream, and backward samples (samples that entered a gradient step).
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.corruptions import DOMAINS, corrupt
from service.demo import digits_split

METHODS = ["none", "bn", "tent", "eta", "eata", "psmt", "adanpc", "eata+adanpc"]
SEED = 2024


@dataclass
class Domain:
    name: str
    inputs: np.ndarray
    labels: np.ndarray


@dataclass
class Result:
    method: str
    mode: str
    errors: dict[str, float] = field(default_factory=dict)
    backward_samples: int = 0
    seconds: float = 0.0

    @property
    def mean_error(self) -> float:
        return float(np.mean([v for k, v in self.errors.items() if k != "clean_after"]))


def stream(seed: int = SEED) -> list[Domain]:
    """The continual stream: every corruption of the test half, then the clean test half."""
    _, _, x_test, y_test = digits_split()
    domains = []
    for index, name in enumerate([*DOMAINS, "clean_after"]):
        rng = np.random.default_rng(seed + index)
        order = rng.permutation(len(x_test))
        x = x_test[order] if name == "clean_after" else corrupt(name, x_test[order], rng)
        domains.append(Domain(name, x, y_test[order]))
    return domains


def method_settings(method: str, norm: str, **extra: object):
    from service.settings import load_settings

    adapter = {"name": method, "norm": norm, "restore": False, **extra}
    return load_settings(None, adapter=adapter)


def run_in_process(method: str, norm: str, domains: list[Domain], batch_size: int = 64) -> Result:
    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine

    metrics = Metrics()
    engine = build_engine(method_settings(method, norm), metrics, EventLog(metrics))
    result = Result(method, f"in process, batch {batch_size}, {norm} BN")
    started = time.perf_counter()
    for domain in domains:
        wrong = 0
        for start in range(0, len(domain.inputs), batch_size):
            out = engine.forward(domain.inputs[start:start + batch_size], adapt=True)
            wrong += int((out.predictions != domain.labels[start:start + batch_size]).sum())
        result.errors[domain.name] = 100.0 * wrong / len(domain.inputs)
    result.seconds = time.perf_counter() - started
    result.backward_samples = engine.adapter.backward_samples
    engine.close()
    return result


def run_through_service(method: str, domains: list[Domain], concurrency: int = 8,
                        port: int = 18765) -> Result:
    """One sample per request to `adaptd serve`, `concurrency` requests in flight, in order."""
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env |= {"ADAPTD_ADAPTER__NAME": method, "ADAPTD_ADAPTER__RESTORE": "false",
            "ADAPTD_LOG_LEVEL": "warning"}
    adaptd = str(Path(sys.executable).with_name("adaptd"))
    server = subprocess.Popen([adaptd, "serve", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)
        result = Result(method, f"service, 1 sample/request, {concurrency} in flight, robust BN")
        started = time.perf_counter()
        predictions = asyncio.run(_send_stream(base, domains, concurrency))
        result.seconds = time.perf_counter() - started
        for domain in domains:
            got = np.array([predictions[(domain.name, i)] for i in range(len(domain.labels))])
            result.errors[domain.name] = 100.0 * float((got != domain.labels).mean())
        state = httpx.get(f"{base}/v1/state", timeout=10).json()
        result.backward_samples = state["adapter"]["backward_samples"]
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_ready(base: str, server: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"adaptd serve exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("adaptd serve was not ready within 120 s")


async def _send_stream(base: str, domains: list[Domain], concurrency: int) -> dict:
    import httpx

    predictions: dict[tuple[str, int], int] = {}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def one(domain: Domain, index: int) -> None:
            try:
                body = {"inputs": [domain.inputs[index].tolist()]}
                reply = await client.post("/v1/predict", json=body)
                reply.raise_for_status()
                predictions[(domain.name, index)] = reply.json()["predictions"][0]["prediction"]
            finally:
                gate.release()

        tasks = []
        for domain in domains:
            for index in range(len(domain.inputs)):
                await gate.acquire()  # keep the stream's order up to `concurrency` in flight
                tasks.append(asyncio.create_task(one(domain, index)))
        await asyncio.gather(*tasks)
    return predictions


def table(results: list[Result], domains: list[Domain]) -> str:
    names = [d.name for d in domains if d.name != "clean_after"]
    header = ["method", "mode", *names, "mean", "clean after", "backward samples", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.method, r.mode, *[f"{r.errors[n]:.1f}" for n in names],
                 f"**{r.mean_error:.1f}**", f"{r.errors['clean_after']:.1f}",
                 f"{r.backward_samples:,}", f"{r.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--norms", default="batch,robust")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--service", action="store_true", help="also one sample per request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    methods = args.methods.split(",")
    domains = stream()
    results = []
    for norm in args.norms.split(","):
        for method in methods:
            if norm == "batch" and method in ("none", "adanpc"):
                continue  # they do not use test-time BN statistics; the robust run has them
            results.append(run_in_process(method, norm, domains, args.batch_size))
            print(table(results[-1:], domains).splitlines()[-1], flush=True)
    if args.service:
        for method in methods:
            results.append(run_through_service(method, domains, args.concurrency))
            print(table(results[-1:], domains).splitlines()[-1], flush=True)
    print(f"\nDigits-C, {len(domains) - 1} domains x {len(domains[0].labels)} samples, continual; "
          f"error %; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print(table(results, domains))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"mean_error": r.mean_error}
                                         for r in results], indent=1))


if __name__ == "__main__":
    main()
