"""A bound on a request's head (its request line and headers) under uvicorn's httptools parser.

uvicorn's h11 parser refuses a head that grows past `h11_max_incomplete_event_size` (16 KiB by
h11's default) with 400, and trailers after a chunked body the same way. Its httptools parser
has no such bound: it keeps whatever a client sends until the blank line that ends the head (or
the trailers), 8 MB of headers included, for every open connection. `bounded_head()` is that
parser with a bound of `MAX_HEAD_BYTES`: a connection whose reads bring that many bytes in a row
without a byte of body, a finished head or a finished request gets 431 `Request Header Fields
Too Large` and is closed.

- The count is of whole reads: a read that finishes a head or a request, or brings body bytes,
  starts it again, so what a head can hold before it is refused is `MAX_HEAD_BYTES` plus the one
  read that began it (one read of the socket: tens to hundreds of KiB), and a pipelined
  request's body never counts against the next head.
- Answers come in order: where the connection still owes answers to requests before the head
  refused, reading stops and the 431 goes after the last of them. Trailers too long refuse
  their own request at once (its connection closed without a 431 if its answer has begun).
- So bytes after a request that closes its connection (`Connection: close`), which the parser
  ignores, never turn its answer into a 431: the refusal would wait for that answer, and uvicorn
  closes the connection once it is sent.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

import orjson

MAX_HEAD_BYTES = 16 * 1024


def head_too_large_response(limit: int = MAX_HEAD_BYTES,
                            default_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """The whole 431 answer: status line, uvicorn's default headers (`date`, `server`), and an
    `ErrorResponse` body."""
    body = orjson.dumps({"detail": f"the request line and headers are longer than {limit} "
                                   f"bytes; send less in the headers or the URL"})
    head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head += [b"content-type: application/json\r\n",
             b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
             b"connection: close\r\n\r\n"]
    return b"".join(head) + body


@functools.cache
def bounded_head() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, refusing a head over `MAX_HEAD_BYTES` with 431 (made on
    first use: importing it imports httptools, which `http = "h11"` does without)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHead(HttpToolsProtocol):
        max_head_bytes = MAX_HEAD_BYTES

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._stalled_bytes = 0  # of the reads in a row that moved nothing on
            self._moved = False  # this read brought body bytes or finished a head or request
            self._refusing = False  # over the bound, waiting for the answers owed first
            self._in_body = False  # between a request's head and its end (body, trailers)

        def on_headers_complete(self) -> None:
            self._moved = self._in_body = True
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._moved = True
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._moved, self._in_body = True, False
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            self._moved = False
            super().data_received(data)
            if self.transport.is_closing() or self._refusing:
                return  # refused (400) by the parser itself, or refusing already
            if self._moved:
                self._stalled_bytes = 0
                return
            self._stalled_bytes += len(data)
            if self._stalled_bytes > self.max_head_bytes:
                self.logger.warning("Request line and headers longer than %d bytes refused.",
                                    self.max_head_bytes)
                self._refusing = True
                if self._in_body:  # this request's trailers: it is the one refused
                    if self.cycle is not None and self.cycle.response_started:
                        self.transport.close()  # its answer has begun: no room for a 431
                    else:
                        self._refuse()
                elif self._owes_answers():  # to requests before this head
                    self.flow.pause_reading()
                else:
                    self._refuse()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # starts the next pipelined request, if any
            if self._refusing and not self.transport.is_closing():
                if self._owes_answers():
                    self.flow.pause_reading()
                else:
                    self._refuse()

        def _owes_answers(self) -> bool:
            return bool(self.pipeline) or (self.cycle is not None
                                           and not self.cycle.response_complete)

        def _refuse(self) -> None:
            self.transport.write(head_too_large_response(
                self.max_head_bytes, self.server_state.default_headers))
            self.transport.close()

    return BoundedHead
