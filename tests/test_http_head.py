"""The bound on a request's head under httptools (`service/http_head.py`), on a real uvicorn
server in a thread with a small ASGI app, probed with raw sockets: what it refuses, what it
never refuses, and that a refusal waits for the answers the connection owes."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from service.http_head import MAX_HEAD_BYTES, bounded_head
from tests.harness import exchange, pieces, statuses
from tests.redis_server import free_port

SLOW_S = 0.5


async def app(scope, receive, send) -> None:
    """200 with the body's length; /slow answers after SLOW_S."""
    assert scope["type"] == "http"
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_S)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def port(request) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=bounded_head(),
                            loop=request.param, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(10)


def header_lines(total: int) -> bytes:
    """`total` bytes or so of headers, in lines of about 100."""
    return b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 90) for i in range(total // 100))


def test_a_head_over_the_bound_sent_slowly_gets_431_and_the_connection_closes(port):
    for head in (b"GET / HTTP/1.1\r\nHost: a\r\n" + header_lines(20_000),  # many headers
                 b"GET / HTTP/1.1\r\nHost: a\r\nx-big: " + b"a" * 20_000,  # one header
                 b"GET /" + b"a" * 20_000):  # the URL
        answer, closed = exchange(port, *pieces(head + b"\r\n\r\n"))
        assert statuses(answer) == [431], answer[:200]
        assert closed
        assert b"date: " in answer and b"server: uvicorn" in answer
        assert f"longer than {MAX_HEAD_BYTES} bytes".encode() in answer
        length = int(re.search(rb"content-length: (\d+)", answer).group(1))
        assert len(answer.split(b"\r\n\r\n", 1)[1]) == length


def test_a_head_within_the_bound_is_served_also_after_other_requests(port):
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + header_lines(12_000)
    last = head + b"Connection: close\r\n\r\n"
    answer, _ = exchange(port, *pieces(head + b"\r\n"), *pieces(head + b"\r\n"), *pieces(last))
    assert statuses(answer) == [200, 200, 200], answer[:300]


def test_bodies_never_count_as_a_head(port):
    body = b"b" * 40_960
    request = (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    # pipelined in one send, and a large body arriving slowly in pieces
    answer, _ = exchange(port, request + request + b"GET / HTTP/1.1\r\nHost: a\r\n"
                         b"Connection: close\r\n\r\n")
    assert statuses(answer) == [200, 200, 200], answer[:300]
    slow = (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % 200_000) + b"b" * 200_000
    answer, _ = exchange(port, *pieces(slow, 8192), pause_s=0.002)
    assert statuses(answer) == [200] and answer.endswith(b"200000"), answer[:300]


def test_trailers_over_the_bound_after_a_chunked_body_get_431(port):
    start = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\nhello\r\n0\r\n")
    answer, closed = exchange(port, start, *pieces(header_lines(20_000)), b"\r\n")
    assert statuses(answer) == [431] and closed, answer[:300]
    answer, _ = exchange(port, start + header_lines(2_000) + b"\r\n"
                         b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert statuses(answer) == [200, 200], answer[:300]


def test_a_refusal_waits_for_the_answer_the_connection_owes(port):
    # the slow request is answered after SLOW_S; the head after it goes over the bound before
    answer, closed = exchange(port, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n",
                              *pieces(b"GET / HTTP/1.1\r\nHost: a\r\n" + header_lines(20_000)))
    assert statuses(answer) == [200, 431], answer[:300]
    assert closed


def test_bytes_after_a_request_that_closes_the_connection_are_ignored(port):
    answer, closed = exchange(port, b"GET /slow HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                              *pieces(b"z" * 30_000))
    assert statuses(answer) == [200], answer[:300]
    assert closed
