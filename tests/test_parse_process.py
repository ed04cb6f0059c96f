"""Large /v1/predict bodies parsed in a process of their own (`Runtime.parse_process`)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from service.demo import digits_split
from service.runtime import PARSE_PROCESS_TRIES
from tests.harness import running_service, serving, settings_for

IMAGES = digits_split()[2][:64]
# 64 demo images are about 150 KB of JSON: above this threshold, parsed in the parse process
THRESHOLD = 20_000

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="the parse process is off on one CPU")


def body(**fields) -> bytes:
    return json.dumps({"inputs": IMAGES.tolist(), **fields}).encode()


async def post(client, content: bytes):
    return await client.post("/v1/predict", content=content,
                             headers={"content-type": "application/json"})


def answers(reply) -> list[tuple[int, list[float]]]:
    return [(row["prediction"], row["probabilities"]) for row in reply.json()["predictions"]]


def test_a_large_body_parsed_in_the_parse_process_is_served_as_one_parsed_here() -> None:
    async def run(threshold):
        overrides = {"adapter": {"name": "none"}, "batcher": {"parse_process_bytes": threshold}}
        async with serving(settings_for(**overrides)) as (client, app):
            ids = [f"s{i}" for i in range(len(IMAGES))]
            reply = await post(client, body(ids=ids))
            assert reply.status_code == 200, reply.text
            assert [row["id"] for row in reply.json()["predictions"]] == ids
            started = app.state.runtime._parsers is not None
            return answers(reply), started

    here, started_here = asyncio.run(run(None))
    elsewhere, started = asyncio.run(run(THRESHOLD))
    assert (started_here, started) == (False, True)
    assert elsewhere == here


BAD = {
    "a sample of the wrong shape": (
        lambda: json.dumps({"inputs": [*IMAGES[:63].tolist(), [[0.0] * 16] * 16]}).encode(),
        "inputs[63]"),
    "a string among the numbers": (
        lambda: body().replace(b"0.0", b'"x"', 1), "inputs[0]"),
    "malformed JSON": (lambda: body()[:-2], "JSON decode error"),
    "an id that is not a string": (lambda: body(ids=[1] * 64), "ids"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_large_bad_body_gets_the_same_4xx_from_the_parse_process(case: str) -> None:
    make, expected = BAD[case]
    content = make()
    assert len(content) > THRESHOLD

    async def run(threshold):
        overrides = {"adapter": {"name": "none"}, "batcher": {"parse_process_bytes": threshold}}
        async with serving(settings_for(**overrides)) as (client, app):
            reply = await post(client, content)
            return reply.status_code, reply.json(), app.state.runtime._parsers is not None

    here, elsewhere = asyncio.run(run(None)), asyncio.run(run(THRESHOLD))
    assert (here[2], elsewhere[2]) == (False, True)  # parsed here, then in the parse process
    assert elsewhere[:2] == here[:2]
    assert here[0] == 422 and expected in json.dumps(here[1])


def test_a_parse_process_that_dies_is_replaced_and_no_request_fails() -> None:
    async def run():
        overrides = {"adapter": {"name": "none"}, "batcher": {"parse_process_bytes": THRESHOLD}}
        async with serving(settings_for(**overrides)) as (client, app):
            runtime = app.state.runtime
            assert (await post(client, body())).status_code == 200
            first = runtime._parsers
            for pid in list(first._processes):
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            assert (await post(client, body())).status_code == 200  # parsed here, this once
            assert (await post(client, body())).status_code == 200  # in a new process
            assert runtime._parsers is not None and runtime._parsers is not first
        assert runtime._parsers is None  # stopped with the service

    asyncio.run(run())


class NoProcesses(ProcessPoolExecutor):
    """A pool whose process cannot start, as when the machine has no memory or pids left."""

    def submit(self, *args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")


def test_a_parse_process_that_cannot_start_leaves_every_body_parsed_here(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("service.runtime.ProcessPoolExecutor", NoProcesses)

    async def run():
        overrides = {"adapter": {"name": "none"}, "batcher": {"parse_process_bytes": THRESHOLD}}
        async with serving(settings_for(**overrides)) as (client, app):
            for _ in range(PARSE_PROCESS_TRIES + 2):
                assert (await post(client, body())).status_code == 200
            runtime = app.state.runtime
            assert runtime._parser_failures == PARSE_PROCESS_TRIES
            assert runtime.parse_process(10**6) is None  # no more tries

    with caplog.at_level(logging.WARNING, logger="adaptd"):
        asyncio.run(run())
    assert "large bodies are parsed in this process from now on" in caplog.text


def test_a_failure_reported_for_a_pool_already_replaced_changes_nothing() -> None:
    async def run():
        overrides = {"adapter": {"name": "none"}, "batcher": {"parse_process_bytes": THRESHOLD}}
        async with serving(settings_for(**overrides)) as (_, app):
            runtime = app.state.runtime
            old = runtime.parse_process(10**6)
            runtime.parse_process_failed(old, OSError("died"))
            new = runtime.parse_process(10**6)
            runtime.parse_process_failed(old, OSError("died, reported late"))
            assert runtime.parse_process(10**6) is new and runtime._parser_failures == 1

    asyncio.run(run())


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(child) for child in (task / "children").read_text().split()}
    return found


@pytest.mark.slow
def test_the_parse_process_ends_with_a_server_killed_outright() -> None:
    import urllib.request

    environment = {"ADAPTD_ADAPTER__NAME": "none",
                   "ADAPTD_BATCHER__PARSE_PROCESS_BYTES": str(THRESHOLD)}
    with running_service(environment) as port:
        server = next(p for p in children(os.getpid())
                      if b"adaptd" in Path(f"/proc/{p}/cmdline").read_bytes())
        before = children(server)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=body(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert reply.status == 200
        workers = {p for p in children(server) - before
                   if b"multiprocessing" in Path(f"/proc/{p}/cmdline").read_bytes()}
        assert workers, "no parse process started"
        os.kill(server, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists()
                                                   and b"Z" not in _state(p) for p in workers):
            time.sleep(0.1)
        assert not any(Path(f"/proc/{p}").exists() and b"Z" not in _state(p) for p in workers)


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return b"X"
