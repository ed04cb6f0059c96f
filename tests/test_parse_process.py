"""Large /v1/predict bodies parsed in a process of their own (`Runtime.parse_process`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from service.demo import digits_split
from tests.harness import serving, settings_for

IMAGES = digits_split()[2][:64]
# 64 demo images are about 100 KB of JSON: above this threshold, parsed in the parse process
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
        async with serving(settings_for(**overrides)) as (client, _):
            reply = await post(client, content)
            return reply.status_code, reply.json()

    here, elsewhere = asyncio.run(run(None)), asyncio.run(run(THRESHOLD))
    assert elsewhere == here
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
