"""A bound on a request's head (its request line and headers) under uvicorn's httptools parser.

uvicorn's h11 parser refuses a head that grows past `h11_max_incomplete_event_size` (16 KiB by
h11's default) with 400. Its httptools parser has no such bound: it keeps whatever a client sends
until the blank line that ends the head, 8 MB of headers included, for every open connection.
`bounded_head()` is that parser with the same bound, `MAX_HEAD_BYTES`, answered 431 `Request Header
Fields Too Large` and the connection closed; `adaptd serve` passes the same number to h11, so both
parsers refuse what the other refuses.

The count is exact without reading the bytes again: a chunk that the parser finished with still
in a head, having started in one (or between requests) and completed no request, is head bytes
all through. A chunk that completes a request resets the count, so the requests before it in a
pipelined chunk never count against the next one's head; what a head can hold before it is
refused is then `MAX_HEAD_BYTES` plus one chunk the transport read (256 KiB at most under uvloop).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import orjson

MAX_HEAD_BYTES = 16 * 1024


def head_too_large_response(limit: int = MAX_HEAD_BYTES) -> bytes:
    """The whole 431 answer: status line, headers and an `ErrorResponse` body."""
    body = orjson.dumps({"detail": f"the request line and headers are longer than {limit} "
                                   f"bytes; send less in the headers or the URL"})
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n"
            b"connection: close\r\n\r\n" + body)


@functools.cache
def bounded_head() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, refusing a head over `MAX_HEAD_BYTES` with 431 (made on
    first use: importing it imports httptools, which `http = "h11"` does without)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHead(HttpToolsProtocol):
        max_head_bytes = MAX_HEAD_BYTES

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True  # a connection starts where a request's head would
            self._head_bytes = 0
            self._completed = 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True  # what comes next is the next request's head
            self._completed += 1
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            completed = self._completed
            super().data_received(data)
            if self.transport.is_closing():  # refused (400) by the parser itself
                return
            if completed != self._completed or not self._in_head:
                self._head_bytes = 0  # a request completed, or a body is under way
                return
            # it started in this head (a body only ends in a head by completing its request)
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self.logger.warning("Request line and headers longer than %d bytes refused.",
                                    self.max_head_bytes)
                self.transport.write(head_too_large_response(self.max_head_bytes))
                self.transport.close()

    return BoundedHead
