"""A small Redis client: RESP2 framing on Twisted, commands pipelined on one connection.

Redis answers the commands of a connection in the order they were sent, so the client keeps one
queue of Deferreds and fires the oldest with each reply. That is all the benchmark needs: a put
is ``SET`` followed at once by ``WAIT 2 0`` (two commands written together), a get is ``GET``.

No package: the protocol is five reply types, and writing it here keeps the load generator's
cost per request the same kind of cost (Python on Twisted) as for every other system.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any, Union

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


class RedisError(Exception):
    """The server answered a command with an error reply (``-ERR ...``)."""


class ProtocolError(Exception):
    """The bytes received are not RESP, or a reply came that no command waits for."""


#: A decoded reply: simple string (str), integer, bulk string (bytes), nil (None), array (list),
#: or an error reply (a RedisError instance, not raised: it belongs to one command).
Reply = Union[str, int, bytes, None, list[Any], RedisError]


def encode_command(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings (what redis-cli sends)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """Not all of a reply has arrived yet."""


class ReplyParser:
    """Decodes replies from a byte stream that may be cut anywhere.

    C{feed} returns the replies completed by the bytes given, in order; a reply split across
    calls is returned once its last byte arrives.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        start = 0
        try:
            while start < len(self._buffer):
                reply, start = self._parse(start)
                replies.append(reply)
        except _Incomplete:
            pass
        del self._buffer[:start]
        return replies

    def _line(self, start: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", start)
        if end < 0:
            raise _Incomplete()
        return bytes(self._buffer[start:end]), end + 2

    def _parse(self, start: int) -> tuple[Reply, int]:
        line, after = self._line(start)
        if not line:
            raise ProtocolError("empty reply line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace"), after
        if kind == b"-":
            return RedisError(rest.decode("utf-8", "replace")), after
        if kind == b":":
            return _integer(rest), after
        if kind == b"$":
            length = _integer(rest)
            if length < 0:
                return None, after
            if len(self._buffer) < after + length + 2:
                raise _Incomplete()
            if self._buffer[after + length:after + length + 2] != b"\r\n":
                raise ProtocolError("bulk string not followed by CRLF")
            return bytes(self._buffer[after:after + length]), after + length + 2
        if kind == b"*":
            count = _integer(rest)
            if count < 0:
                return None, after
            items = []
            for _ in range(count):
                item, after = self._parse(after)
                items.append(item)
            return items, after
        raise ProtocolError(f"unknown reply type {kind!r}")


def _integer(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise ProtocolError(f"not an integer: {text[:40]!r}") from None


class RedisClient(Protocol):
    """Pipelined commands on one connection; each Deferred fires with its command's reply, or
    fails with L{RedisError} for an error reply. A framing error or a lost connection fails
    every command still waiting."""

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._waiting: deque[Deferred[Reply]] = deque()
        self._lost: Failure | None = None

    def pipeline(self, *commands: tuple[bytes | str | int, ...]) -> list[Deferred[Reply]]:
        """Send C{commands} in one write; one Deferred per command, in order."""
        if self._lost is not None:
            raise ProtocolError(f"connection lost: {self._lost.getErrorMessage()}")
        ds: list[Deferred[Reply]] = []
        for _ in commands:
            d: Deferred[Reply] = Deferred()
            self._waiting.append(d)
            ds.append(d)
        self.transport.write(b"".join(encode_command(*c) for c in commands))  # type: ignore[union-attr]
        return ds

    def command(self, *args: bytes | str | int) -> Deferred[Reply]:
        return self.pipeline(args)[0]

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolError as e:
            self._abort(Failure(e))
            return
        for reply in replies:
            if not self._waiting:
                self._abort(Failure(ProtocolError(f"a reply no command waits for: {reply!r}")))
                return
            d = self._waiting.popleft()
            if isinstance(reply, RedisError):
                d.errback(reply)
            else:
                d.callback(reply)

    def _abort(self, failure: Failure) -> None:
        self._fail_waiting(failure)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _fail_waiting(self, failure: Failure) -> None:
        self._lost = failure
        while self._waiting:
            self._waiting.popleft().errback(failure)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._lost is None:
            self._fail_waiting(reason)


def blocking_command(address: tuple[str, int], *args: bytes | str | int,
                     timeout: float = 5.0) -> Reply:
    """Send one command over a new blocking socket and return its reply (for the driver's
    readiness checks, which run before the reactor). Raises OSError if nothing listens."""
    parser = ReplyParser()
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(encode_command(*args))
        while True:
            data = sock.recv(65536)
            if not data:
                raise ProtocolError("connection closed before the reply")
            replies = parser.feed(data)
            if replies:
                return replies[0]
