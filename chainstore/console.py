"""The telnet-style text console: the classic course protocol, exactly (docs/DESIGN.md).

One request per line (``\\r\\n`` or ``\\n``), ISO-8859-1, at most 128 KiB; one reply line per
request, in request order even when a write completes later than the read behind it. Anything
malformed gets ``error <description>`` and the connection goes on serving. Reading pauses while
too many replies wait (by count and by bytes, including the transport's unsent buffer); a client
that shuts down its sending side still gets a reply to every request it sent, then the close.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from chainstore.bounds import (
    BACKLOG,
    MAX_CONNECTIONS,
    REQUESTS,
    WRITES,
    CappedFactory,
    Counted,
    release_if_closing,
    stops_reading,
    watch_writes,
)
from chainstore.errors import (
    InvalidKey,
    KVError,
    NotResponsible,
    ServerError,
    ServerStopped,
    ValueTooLarge,
    WriteLocked,
)
from chainstore.limits import MAX_LINE_BYTES, check_key, check_value
from chainstore.logs import get_logger
from chainstore.node import KVNode

log = get_logger("chainstore.console")

HELP = (
    "help commands: put <key> <value> | get <key> | delete <key> | keyrange | keyrange_read"
    " | stats | help; keys: 1-20 printable ASCII bytes without spaces;"
    " values: the rest of the line, up to 120000 bytes"
)

# Replies that a state error turns a put/get/delete into: they carry no payload.
STATE_REPLIES: dict[type[KVError], bytes] = {
    ServerStopped: b"server_stopped",
    WriteLocked: b"server_write_lock",
    NotResponsible: b"server_not_responsible",
}

# How many requests of one connection may wait for their replies before we stop reading from
# it: a client pipelining without bound must not grow our memory without bound.
MAX_PENDING = 256
# Bytes of replies that may wait behind a slower one before we stop reading, for the same reason:
# 256 replies of 120 KB values would be 30 MB. Replies already handed to the transport are bounded
# by the transport itself, which pauses us (we are its producer) once its buffer is full.
MAX_QUEUED_REPLY_BYTES = 256 * 1024

TOO_LONG = b"error message too long: the limit is %d bytes per line" % MAX_LINE_BYTES


LINE_BREAK = "values may not hold a carriage return: a reply must fit on one line"


class ConsoleError(Exception):
    """A request that cannot be parsed; its text becomes ``error <text>``."""


@dataclass(frozen=True)
class Request:
    command: str
    key: bytes = b""
    value: bytes = b""


_NO_ARGS = ("keyrange", "keyrange_read", "help", "stats")


def parse_line(line: bytes) -> Request:
    """Turn one line (without its line end) into a L{Request} or raise L{ConsoleError}."""
    if line.endswith(b"\r"):
        line = line[:-1]
    word, _, rest = line.lstrip(b" \t").partition(b" ")
    if not word.strip():
        raise ConsoleError("empty request; try help")
    if not word.isascii():
        raise ConsoleError("requests must be ASCII text; try help")
    command = word.decode("ascii").strip().lower()
    if command in _NO_ARGS:
        if rest.strip():
            raise ConsoleError(f"{command} takes no arguments")
        return Request(command)
    if command not in ("put", "get", "delete"):
        shown = command if command.isprintable() else command.encode("unicode_escape").decode()
        raise ConsoleError(f"unknown command {shown[:40]!r}; try help")
    if command == "put":
        key, sep, value = rest.lstrip(b" ").partition(b" ")
        if not key:
            raise ConsoleError("put needs a key and a value: put <key> <value>")
        if not sep or not value.strip():
            raise ConsoleError("put needs a value after the key: put <key> <value>")
    else:
        key, value = rest.strip(b" \t"), b""
        if not key:
            raise ConsoleError(f"{command} needs a key: {command} <key>")
    try:
        check_key(key)
        check_value(value)
    except (InvalidKey, ValueTooLarge) as e:
        raise ConsoleError(str(e)) from None
    if b"\r" in value:
        # A value that could not be sent back in one reply line is refused up front.
        raise ConsoleError(LINE_BREAK)
    return Request(command, key, value)


@implementer(IHalfCloseableProtocol, IPushProducer)
class ConsoleProtocol(Counted):
    """One console connection: frames lines, runs requests on the node, orders the replies."""

    def __init__(self, node: KVNode) -> None:
        self.node = node
        # Received bytes not yet handled: complete lines held back while paused, then the start
        # of the next line. A bytearray, because appending to it and cutting lines off its front
        # are amortised O(1): a line arriving a byte at a time costs O(length), not O(length^2).
        self._buffer = bytearray()
        # How far the buffer is known to hold no newline, so each byte is searched once.
        self._scanned = 0
        self._discarding = False
        self._processing = False
        # One entry per request still waiting for its reply, oldest first; an entry is None
        # until its reply is known.
        self._pending: deque[list[bytes | None]] = deque()
        # bytes of the replies in _pending that are known and wait to be sent
        self._queued = 0
        # why reading is paused: REQUESTS (too many replies wait), WRITES (the transport's
        # buffer is full); empty while reading
        self._pauses: set[str] = set()
        self._lost = False
        # the client shut down its sending side: answer what it sent, then close
        self._eof = False
        # the transport was told to stop reading (pauseProducing)
        self._reading_stopped = False
        # the transport we are the producer of (see watch_writes)
        self._consumer: Any = None
        # the wait for room of a write held back by the write backlog (reading is paused)
        self._room: Deferred[None] | None = None

    @property
    def _paused(self) -> bool:
        return bool(self._pauses)

    def connectionMade(self) -> None:
        # The transport pauses us (pauseProducing) when its write buffer is full.
        self._consumer = watch_writes(self, self.transport)
        me = self.node.me
        self._send(
            f"chainstore KVServer {me.name} at {me.console_address} ready; type help".encode()
        )

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self._pending.clear()
        self._buffer.clear()
        if self._room is not None:
            self._room.cancel()  # the held write is dropped: nobody waits for its reply
        super().connectionLost(reason)

    def readConnectionLost(self) -> None:
        if self._eof or self._lost:
            return
        self._eof = True
        # A last line without its line end is a request cut off (the client may have died
        # mid-line): it is not carried out, like one whose connection was lost.
        self._process()
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def _close_if_done(self) -> None:
        if self._eof and not self._lost and not self._pending and b"\n" not in self._buffer:
            self._lost = True
            self.transport.loseConnection()

    # -- IPushProducer: the transport's write buffer ---------------------------------------------

    def pauseProducing(self) -> None:
        self._pause(WRITES)

    def resumeProducing(self) -> None:
        release_if_closing(self._consumer)
        self._resume(WRITES)

    def stopProducing(self) -> None:
        self._lost = True

    def _pause(self, why: str) -> None:
        self._pauses.add(why)
        self._update_reading()

    def _resume(self, why: str) -> None:
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if self._lost:
            return
        if not self._pauses:
            self._process()
            self._close_if_done()
        self._update_reading()

    def _update_reading(self) -> None:
        if self._lost or self._eof:
            return
        stop = stops_reading(self._pauses, len(self._buffer))
        if stop != self._reading_stopped:
            self._reading_stopped = stop
            if stop:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._lost:
            return
        if self._discarding:
            # The rest of an over-long line: drop it up to its newline.
            end = data.find(b"\n")
            if end < 0:
                return
            self._discarding = False
            data = data[end + 1:]
        self._buffer += data
        self._process()
        self._update_reading()

    def _process(self) -> None:
        """Handle every complete line in the buffer, unless paused or already doing so.

        Re-entry happens when a reply completes synchronously and resumes the transport while a
        line is being handled; the loop that is already running picks up the rest.
        """
        if self._processing:
            return
        self._processing = True
        try:
            buffer = self._buffer
            while not self._lost and not self._paused:
                end = buffer.find(b"\n", self._scanned)
                if end < 0:
                    self._scanned = len(buffer)
                    if len(buffer) > MAX_LINE_BYTES:
                        # Refuse now rather than buffer an endless line; skip to its newline.
                        buffer.clear()
                        self._scanned = 0
                        self._discarding = True
                        self._reply_now(TOO_LONG)
                    break
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                self._scanned = 0
                if len(line) > MAX_LINE_BYTES:
                    self._reply_now(TOO_LONG)
                else:
                    self._handle(line)
                if (len(self._pending) >= MAX_PENDING or self._queued >= MAX_QUEUED_REPLY_BYTES) \
                        and not self._lost:
                    # Stop reading until the replies drain; lines already received wait in the
                    # buffer, so at most MAX_PENDING requests of a connection are in flight.
                    self._pause(REQUESTS)
        finally:
            self._processing = False

    def _handle(self, line: bytes) -> None:
        try:
            request = parse_line(line)
        except ConsoleError as e:
            self._reply_now(b"error " + str(e).encode("latin-1", "replace"))
            return
        if request.command in ("put", "delete") and self.node.chain.backlogged:
            # The server's write backlog is over its bounds: this write waits for room, in its
            # place among the replies, and nothing more is read until then.
            slot: list[bytes | None] = [None]
            self._pending.append(slot)
            self._pause(BACKLOG)
            self._room = self.node.chain.wait_for_room()
            self._room.addCallbacks(self._room_made, lambda f: f.trap(CancelledError),
                                    (slot, request))
            return
        self._carry_out(request, None)

    def _room_made(self, _: None, slot: list[bytes | None], request: Request) -> None:
        self._room = None
        if self._lost:
            return
        self._carry_out(request, slot)
        self._resume(BACKLOG)

    def _carry_out(self, request: Request, slot: list[bytes | None] | None) -> None:
        """Run C{request}; its reply goes in C{slot}, or (None) in a new one."""
        try:
            result = self._dispatch(request)
        except KVError as e:
            result = self._error_reply(request, e)
        except Exception:
            log.failure("console request {command} failed", command=request.command)
            result = self._error_reply(request, None)
        if slot is None:
            if not isinstance(result, Deferred):
                self._reply_now(result)
                return
            slot = [None]
            self._pending.append(slot)
        if isinstance(result, Deferred):
            result.addCallbacks(self._fill, self._fail, (slot,), None, (slot, request))
        else:
            self._fill(result, slot)

    def _dispatch(self, req: Request) -> bytes | Deferred[bytes]:
        node, key = self.node, req.key
        if req.command == "get":
            value = node.get(key)
            if isinstance(value, Deferred):  # a head or middle asks the tail first
                return value.addCallback(_get_reply, key)
            return _get_reply(value, key)
        if req.command == "put":
            return node.put(key, req.value).addCallback(
                lambda updated: (b"put_update %s" if updated else b"put_success %s") % key
            )
        if req.command == "delete":
            return node.delete(key).addCallback(lambda _: b"delete_success %s" % key)
        if req.command == "keyrange":
            return b"keyrange_success " + node.ring.keyrange_text().encode("ascii")
        if req.command == "keyrange_read":
            return b"keyrange_read_success " + node.ring.keyrange_read_text().encode("ascii")
        if req.command == "stats":
            return b"stats " + json.dumps(node.stats(), sort_keys=True).encode("ascii")
        return HELP.encode("ascii")

    @staticmethod
    def _error_reply(req: Request, error: KVError | None) -> bytes:
        """The reply to a request that raised C{error} (None: an unexpected exception).

        A failure of the server (L{ServerError}, such as a failed store, or a bug) is
        ``error <reason>``, never ``get_error``/``delete_error``, which mean "not found"."""
        if error is None:
            return b"error the server failed to carry out the request; see its log"
        state = STATE_REPLIES.get(type(error))
        if state is not None:
            return state
        if isinstance(error, ServerError):
            reason = " ".join(str(error).split())  # one line, whatever the backend said
            return b"error " + reason.encode("latin-1", "replace")
        if req.command == "put":
            return b"put_error %s %s" % (req.key, req.value)
        if req.command in ("get", "delete"):
            return b"%s_error %s" % (req.command.encode(), req.key)
        return b"error " + str(error).encode("latin-1", "replace")

    def _fill(self, reply: bytes, slot: list[bytes | None]) -> None:
        slot[0] = reply
        self._queued += len(reply)
        self._flush()

    def _fail(self, failure: Failure, slot: list[bytes | None], req: Request) -> None:
        if not failure.check(KVError):
            log.failure("console request {command} failed", failure, command=req.command)
        error = failure.value if isinstance(failure.value, KVError) else None
        self._fill(self._error_reply(req, error), slot)

    def _reply_now(self, reply: bytes) -> None:
        if self._pending:
            self._pending.append([reply])
            self._queued += len(reply)
        else:
            self._send(reply)

    def _flush(self) -> None:
        pending = self._pending
        while pending and pending[0][0] is not None:
            reply: bytes = pending.popleft()[0]  # type: ignore[assignment]
            self._queued -= len(reply)
            self._send(reply)
        if len(pending) < MAX_PENDING // 2 and self._queued < MAX_QUEUED_REPLY_BYTES // 2:
            self._resume(REQUESTS)
        self._close_if_done()

    def _send(self, reply: bytes) -> None:
        if not self._lost:
            self.transport.write(reply + b"\r\n")


def _get_reply(value: bytes, key: bytes) -> bytes:
    if b"\n" in value or b"\r" in value:
        # Written over AMP, which carries any bytes. Sent as is, the line break would split the
        # reply and desynchronise the client (Java's readLine ends a line at a bare \r too).
        return b"error the value of %s holds a line break; read it over AMP" % key
    return b"get_success %s %s" % (key, value)


class ConsoleFactory(CappedFactory):
    def __init__(self, node: KVNode, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(max_connections)
        self.node = node

    def build_protocol(self, addr: Any) -> ConsoleProtocol:
        return ConsoleProtocol(self.node)
