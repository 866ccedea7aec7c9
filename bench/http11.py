"""A small HTTP/1.1 client on Twisted: keep-alive connections, one request at a time on each.

For etcd's v3 JSON gateway. HTTP/1.1 pipelining cannot be relied on (servers may answer it
serially or not at all), so N requests in flight need N connections: L{ConnectionPool} keeps
them and hands each request an idle one. Responses are framed by C{Content-Length} or by
chunked transfer coding (Go's server chunks a body it cannot buffer whole, e.g. a large value).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

#: Bounds that keep a confused peer from making the client buffer without end.
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024


class HTTPProtocolError(Exception):
    """The response is not HTTP/1.1 as this client reads it, or the connection cannot serve."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class HTTP11Client(Protocol):
    """One keep-alive connection. C{request} sends at most one request at a time; its Deferred
    fires with the L{Response}. A response that says C{Connection: close}, a framing error or a
    lost connection makes the connection unusable (L{usable} false)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._pending: Deferred[Response] | None = None
        self._buffer = bytearray()
        self._state = "idle"            # idle, head, body, chunk-size, chunk-data, trailers
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._remaining = 0
        self._body_bytes = 0
        self._close_after = False
        self.usable = True

    def request(self, method: str, path: str, body: bytes = b"",
                headers: Sequence[tuple[str, str]] = ()) -> Deferred[Response]:
        if self._pending is not None:
            raise HTTPProtocolError("a request is already outstanding on this connection")
        if not self.usable:
            raise HTTPProtocolError("the connection is closed")
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}",
                 f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers)]
        self._pending = Deferred()
        self._state = "head"
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)  # type: ignore[union-attr]
        return self._pending

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def dataReceived(self, data: bytes) -> None:
        if self._pending is None:
            self._fail(HTTPProtocolError(f"{len(data)} bytes arrived with no request pending"))
            return
        self._buffer += data
        try:
            while self._pending is not None and self._step():
                pass
        except HTTPProtocolError as e:
            self._fail(e)

    def _step(self) -> bool:
        """Consume what the buffer holds for the current state; False when it needs more."""
        if self._state == "head":
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    raise HTTPProtocolError("response headers too long")
                return False
            head = bytes(self._buffer[:end]).decode("latin-1")
            del self._buffer[:end + 4]
            self._read_head(head)
            return True
        if self._state == "body":
            take = min(self._remaining, len(self._buffer))
            self._append(bytes(self._buffer[:take]))
            del self._buffer[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._complete()
                return True
            return False
        if self._state == "chunk-size":
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > 1024:
                    raise HTTPProtocolError("chunk size line too long")
                return False
            text = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
            del self._buffer[:end + 2]
            try:
                size = int(text, 16)
            except ValueError:
                raise HTTPProtocolError(f"bad chunk size {text[:20]!r}") from None
            if size < 0:
                raise HTTPProtocolError("negative chunk size")
            self._remaining = size
            self._state = "chunk-data" if size else "trailers"
            return True
        if self._state == "chunk-data":
            # The chunk's data, then its CRLF.
            if len(self._buffer) < self._remaining + 2:
                return False
            if self._buffer[self._remaining:self._remaining + 2] != b"\r\n":
                raise HTTPProtocolError("chunk data not followed by CRLF")
            self._append(bytes(self._buffer[:self._remaining]))
            del self._buffer[:self._remaining + 2]
            self._state = "chunk-size"
            return True
        if self._state == "trailers":
            end = self._buffer.find(b"\r\n")
            if end < 0:
                return False
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 2]
            if not line:          # the empty line that ends the trailers
                self._complete()
            return True
        raise HTTPProtocolError(f"unexpected state {self._state}")

    def _read_head(self, head: str) -> None:
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HTTPProtocolError(f"bad status line {status_line[:80]!r}")
        try:
            self._status = int(parts[1])
        except ValueError:
            raise HTTPProtocolError(f"bad status {parts[1][:20]!r}") from None
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise HTTPProtocolError(f"bad header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        self._headers = headers
        self._body = []
        self._body_bytes = 0
        self._close_after = (headers.get("connection", "").lower() == "close"
                             or parts[0] == "HTTP/1.0")
        if 100 <= self._status < 200:
            raise HTTPProtocolError(f"interim response {self._status} not supported")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = "chunk-size"
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise HTTPProtocolError("bad Content-Length") from None
            if not 0 <= self._remaining <= MAX_BODY_BYTES:
                raise HTTPProtocolError(f"Content-Length {self._remaining} out of bounds")
            self._state = "body"
            if self._remaining == 0:
                self._complete()
        elif self._status in (204, 304):
            self._complete()
        else:
            # A body delimited by the close of the connection cannot be kept alive: refuse it
            # rather than wait for a close that a keep-alive server never sends.
            raise HTTPProtocolError("response has neither Content-Length nor chunked coding")

    def _append(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY_BYTES:
            raise HTTPProtocolError("response body too large")
        self._body.append(data)

    def _complete(self) -> None:
        d, self._pending = self._pending, None
        self._state = "idle"
        response = Response(self._status, self._headers, b"".join(self._body))
        if self._close_after:
            self.usable = False
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif self._buffer:
            # Bytes beyond the response we asked for: the stream can no longer be trusted.
            self.usable = False
            self.transport.abortConnection()  # type: ignore[union-attr]
        assert d is not None
        d.callback(response)

    def _fail(self, error: Exception) -> None:
        self.usable = False
        self.transport.abortConnection()  # type: ignore[union-attr]
        self._fail_pending(Failure(error))

    def _fail_pending(self, failure: Failure) -> None:
        d, self._pending = self._pending, None
        if d is not None:
            d.errback(failure)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.usable = False
        self._fail_pending(reason)


class ConnectionPool:
    """Requests spread over keep-alive connections, one in flight on each; a request that finds
    none idle waits for the first to come free. With as many connections as requests in
    flight, none ever waits."""

    def __init__(self, connections: Sequence[HTTP11Client]) -> None:
        if not connections:
            raise ValueError("a pool needs at least one connection")
        self.connections = list(connections)
        self._idle: deque[HTTP11Client] = deque(self.connections)
        self._queued: deque[tuple[tuple[Any, ...], Deferred[Response]]] = deque()

    def request(self, method: str, path: str, body: bytes = b"",
                headers: Sequence[tuple[str, str]] = ()) -> Deferred[Response]:
        args = (method, path, body, headers)
        while self._idle:
            conn = self._idle.popleft()
            if conn.usable:
                return self._send(conn, args)
        if not any(c.usable for c in self.connections):
            raise HTTPProtocolError("every connection of the pool is closed")
        d: Deferred[Response] = Deferred()
        self._queued.append((args, d))
        return d

    def _send(self, conn: HTTP11Client, args: tuple[Any, ...]) -> Deferred[Response]:
        d = conn.request(*args)
        d.addBoth(self._released, conn)
        return d

    def _released(self, result: Any, conn: HTTP11Client) -> Any:
        if conn.usable:
            if self._queued:
                args, waiting = self._queued.popleft()
                self._send(conn, args).chainDeferred(waiting)
            else:
                self._idle.append(conn)
        elif self._queued and not any(c.usable for c in self.connections):
            error = Failure(HTTPProtocolError("every connection of the pool is closed"))
            while self._queued:
                self._queued.popleft()[1].errback(error)
        return result

    def close(self) -> None:
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.loseConnection()
