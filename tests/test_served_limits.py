"""`adaptd serve` against clients that misbehave (issue 13): a body of millions of numbers does not
hold the event loop, so liveness keeps answering; a client that sends headers and part of a body
gets 408 and loses its connection. One real process, raw sockets, 127.0.0.1 only."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.harness import running_service

pytestmark = pytest.mark.slow

BODY_TIMEOUT_S = 1.0
# 4,000,000 numbers, within the default 8 MiB body limit
HUGE = b'{"inputs": [[' + b",".join([b"0"] * 4_000_000) + b"]]}"
HEALTHZ_WITHIN_S = 0.1
# a scheduler hiccup on a shared machine can delay one probe; a stalled loop delays all of them
# by seconds (6 to 24 s before the fix), in every attempt
ATTEMPTS = 3
NEVER_S = 2.0


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with running_service({"ADAPTD_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}) as port:
        yield port


def test_healthz_answers_within_100ms_while_4m_number_bodies_are_refused(port):
    assert len(HUGE) < 8 * 1024 * 1024
    worst = []
    for _ in range(ATTEMPTS):
        worst.append(_worst_probe_while_refusing(port))
        assert worst[-1] < NEVER_S, worst
        if worst[-1] < HEALTHZ_WITHIN_S:
            break
    assert min(worst) < HEALTHZ_WITHIN_S, worst


def _worst_probe_while_refusing(port: int) -> float:
    """The slowest /healthz answer among those overlapping three refused 4M-number bodies."""
    spans: list[tuple[float, float]] = []
    statuses: list[int] = []

    def send_huge_bodies() -> None:
        for _ in range(3):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            started = time.monotonic()
            connection.request("POST", "/v1/predict", body=HUGE,
                               headers={"content-type": "application/json"})
            reply = connection.getresponse()
            reply.read()
            spans.append((started, time.monotonic()))
            statuses.append(reply.status)
            connection.close()

    sender = threading.Thread(target=send_huge_bodies)
    probe = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    probes: list[tuple[float, float]] = []
    sender.start()
    while sender.is_alive():
        started = time.monotonic()
        probe.request("GET", "/healthz")
        reply = probe.getresponse()
        reply.read()
        assert reply.status == 200
        probes.append((started, time.monotonic()))
        time.sleep(0.005)
    sender.join()
    probe.close()

    assert statuses == [422, 422, 422]
    during = [end - start for start, end in probes
              if any(start < refused and end > sent for sent, refused in spans)]
    assert during, "no liveness probe overlapped a refused body"
    return max(during)


def _read_until_closed(conn: socket.socket) -> bytes:
    received = b""
    while chunk := conn.recv(65536):  # a connection left open runs into the socket's timeout
        received += chunk
    return received


def test_a_body_that_stops_half_way_gets_408_and_its_connection_is_closed(port):
    head = ("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 4000\r\n\r\n")
    sent = {  # half a body, or none of it, on a raw-body route and a schema-parsed one
        "/v1/predict": b'{"inputs": [[[' + b"0," * 1000,
        "/v1/feedback": b"",
    }
    connections = []
    started = time.monotonic()
    for path, partial in sent.items():
        for _ in range(2):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(head.format(path=path).encode() + partial)
            connections.append(conn)
    answers = [_read_until_closed(conn) for conn in connections]
    elapsed = time.monotonic() - started
    for conn in connections:
        conn.close()

    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"connection: close" in answer.lower()
        assert b"did not arrive within 1 s" in answer
    assert elapsed < BODY_TIMEOUT_S + 5  # generous; without the timeout they stay open
