"""Bounds on what one connection can make a process hold, for every listener.

Every port is reachable by strangers, so what a peer sends, or refuses to read, must not grow
our memory without bound (docs/DESIGN.md, "Bounds per connection"):

- L{BoundedAMP}, a base for the AMP protocols: a box larger than C{max_box_bytes} closes the
  connection as soon as it is seen to be too large (each key and value is at most 64 KiB, so
  little more than the cap is ever buffered); requests stop being read while the transport's
  unsent bytes exceed its buffer (the protocol is the transport's streaming producer) or while
  C{max_unanswered} of the connection's requests wait for their answers, and resume below.
- L{CappedFactory}, a base for the listeners' factories: at most C{max_connections} connections
  at once; the next ones are closed on accept, and logged. Of those, under TLS, at most
  L{MAX_UNVERIFIED_PER_HOST} from one address may be without a finished handshake, and
  clients and admins may hold all but L{PEER_RESERVE}: neither strangers from one address nor
  the holders of client certificates can take the slots the cluster's own servers need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols import amp
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from chainstore.logs import get_logger

log = get_logger("chainstore.bounds")

#: Connections one listener serves at once (a constructor argument of each factory).
MAX_CONNECTIONS = 1024
#: Of those, the ones only servers and the ECS may use: a server has a few connections per
#: peer (chain links, copies, lease renewals), so clients filling the listener would otherwise
#: stop replication. (Roles are known once the TLS handshake is done: clients and admins past
#: their share are closed then.)
PEER_RESERVE = 64
#: TLS connections from one address that may be waiting for their handshake at once. Before
#: the handshake nobody is known, and each waits up to tls.HANDSHAKE_TIMEOUT: one host opening
#: connections and never finishing them would otherwise fill the listener, servers' slots too.
#: A legitimate peer's handshake takes milliseconds.
MAX_UNVERIFIED_PER_HOST = 64
#: Requests of one AMP connection that may wait for their answers before reading pauses. The
#: client library multiplexes many requests on one connection (the benchmark keeps 32 in flight).
MAX_UNANSWERED = 256
#: The largest AMP box the ECS and the ECS link take. Their biggest legitimate box is a
#: SetMetadata: a ring of nodes in one AmpList value plus the dead members in another, each at
#: most 64 KiB by AMP's own limit per value, so about 128 KiB; a client's data box carries at most
#: a 120,000-byte value in two 65,535-byte chunks plus a key and a request id.
CONTROL_BOX_BYTES = 256 * 1024

# Why reading is paused: the transport's buffer is full, too many requests are unanswered, or a
# write was read while the server's write backlog is over its bounds (chainstore/chain.py
# MAX_QUEUED_BYTES; the write waits, held, for room).
WRITES, REQUESTS, BACKLOG = "writes", "requests", "backlog"
# Paused because the transport's buffer is full, a protocol stops handling what it receives at
# once but stops reading the socket only once this much is waiting unhandled. A TLS transport
# says its buffer is full whenever it holds writes back until its handshake is done, and the
# handshake needs the socket read.
READ_AHEAD_BYTES = 64 * 1024


def stops_reading(pauses: set[str], unhandled: int) -> bool:
    """Whether a protocol paused for C{pauses}, with C{unhandled} bytes received and not yet
    handled, should stop reading its socket."""
    return REQUESTS in pauses or BACKLOG in pauses \
        or (bool(pauses) and unhandled > READ_AHEAD_BYTES)


def watch_writes(producer: IPushProducer, transport: Any) -> Any:
    """Register C{producer} as the streaming producer of the connection under C{transport}, so
    that it is paused while the connection's unsent bytes exceed its buffer; return that
    consumer (for L{release_if_closing}).

    Under a wrapping transport (TLS) the producer goes on the socket's transport beneath it: a
    TLS transport keeps a connection that has a producer open until the producer unregisters,
    whoever asked it to close.
    """
    while isinstance(transport, ProtocolWrapper) and transport.transport is not None:
        transport = transport.transport
    transport.registerProducer(producer, True)
    return transport


def release_if_closing(consumer: Any) -> None:
    """Unregister from C{consumer} if it is closing: a socket transport that resumes its paused
    producer after flushing its buffer would otherwise wait for it instead of closing."""
    if consumer is not None and getattr(consumer, "disconnecting", False) \
            and getattr(consumer, "producer", None) is not None:
        consumer.unregisterProducer()


def peer_of(transport: Any) -> str:
    """C{host:port} of the other end of C{transport}, for log lines."""
    try:
        peer = transport.getPeer()
    except Exception:
        return "?"
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)


class Counted(Protocol):
    """A protocol whose end is reported to the L{CappedFactory} that built it (its
    C{listener}; None for a dialled connection)."""

    on_lost: Callable[[], None] | None = None
    listener: CappedFactory | None = None

    def connectionLost(self, reason: Any = None) -> None:
        release, self.on_lost = self.on_lost, None
        if release is not None:
            release()
        super().connectionLost(reason)


class Refused(Protocol):
    """Stands in for a protocol beyond the cap: closes its connection at once."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class CappedFactory(Factory):
    """A listener's factory serving at most C{max_connections} connections at once.

    Subclasses build their protocol (a L{Counted}) in L{build_protocol}. A connection beyond the
    cap is accepted and closed at once (returning None would do under plain TCP, but not under a
    wrapping factory such as TLS's), and the refusals are logged: the first when the listener
    fills, their number when it has room again.
    """

    noisy = False

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.connections = 0
        self.refused = 0
        #: TLS connections without a finished handshake, per peer address
        self.unverified: dict[str, int] = {}
        #: finished handshakes of roles outside the peer reserve (clients, admins)
        self.unreserved = 0
        #: connections refused since the start (metrics: refused, reason overloaded)
        self.refused_total = 0

    def build_protocol(self, addr: Any) -> Counted:
        raise NotImplementedError

    def buildProtocol(self, addr: Any) -> Protocol:
        if self.connections >= self.max_connections:
            if not self.refused:
                log.warn("{factory}: {count} connections are open, the limit: refusing "
                         "{peer} and any other until one closes",
                         factory=type(self).__name__, count=self.connections,
                         peer=_address(addr))
            self.refused += 1
            self.refused_total += 1
            return Refused()
        proto = self.build_protocol(addr)
        self.connections += 1
        proto.on_lost = self._released
        proto.listener = self
        return proto

    def admit_unverified(self, host: str) -> bool:
        """A TLS connection from C{host} begins its handshake: whether it may (then it counts
        until L{verified})."""
        waiting = self.unverified.get(host, 0)
        if waiting >= MAX_UNVERIFIED_PER_HOST:
            self.refused_total += 1
            log.warn("{factory}: {count} connections from {host} have not finished their TLS "
                     "handshake: closing another", factory=type(self).__name__, count=waiting,
                     host=host)
            return False
        self.unverified[host] = waiting + 1
        return True

    def verified(self, host: str) -> None:
        """The handshake of a connection from C{host} ended (done, or the connection closed)."""
        waiting = self.unverified.get(host, 0) - 1
        if waiting > 0:
            self.unverified[host] = waiting
        else:
            self.unverified.pop(host, None)

    def admit_unreserved(self) -> bool:
        """A client or admin finished its handshake: whether it may stay (then it counts until
        L{release_unreserved})."""
        if self.unreserved >= self.max_connections - PEER_RESERVE:
            self.refused_total += 1
            log.warn("{factory}: clients and admins hold {count} connections, all but the "
                     "{reserve} kept for servers: closing another", factory=type(self).__name__,
                     count=self.unreserved, reserve=PEER_RESERVE)
            return False
        self.unreserved += 1
        return True

    def release_unreserved(self) -> None:
        self.unreserved -= 1

    def _released(self) -> None:
        self.connections -= 1
        if self.refused:
            log.warn("{factory}: refused {count} connections while at its limit of {limit}",
                     factory=type(self).__name__, count=self.refused, limit=self.max_connections)
            self.refused = 0


def _address(addr: Any) -> str:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    return f"{host}:{port}" if host is not None else str(addr)


@implementer(IPushProducer)
class BoundedAMP(Counted, amp.AMP):
    """An AMP protocol that bounds the box it reads, its unanswered requests and its unsent
    answers (see the module's docstring). Subclasses may lower or raise C{max_box_bytes}."""

    max_box_bytes = CONTROL_BOX_BYTES
    max_unanswered = MAX_UNANSWERED

    # bytes of the box being read so far (each string with its 2-byte length)
    _box_bytes = 0
    _unanswered = 0
    # inside dataReceived: a resume there lets the running loop go on instead of re-entering
    _receiving = False
    # a box was too large, or the transport stopped us: read nothing more
    _halted = False
    # the transport was told to stop reading (pauseProducing)
    _reading_stopped = False
    # the transport we are the producer of (see watch_writes)
    _consumer: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pauses: set[str] = set()

    def connectionMade(self) -> None:
        super().connectionMade()
        # The transport pauses us (pauseProducing) when its write buffer is full.
        self._consumer = watch_writes(self, self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._halted:
            return
        self._receiving = True
        try:
            super().dataReceived(data)
        finally:
            self._receiving = False
        self._update_reading()

    def stringReceived(self, string: bytes) -> None:
        if self._halted:
            return
        self._box_bytes += 2 + len(string)
        if self._box_bytes > self.max_box_bytes:
            self._refuse_box()
            return
        super().stringReceived(string)
        if self.state == "init":
            # The box ended (or none has begun).
            self._box_bytes = 0

    def _refuse_box(self) -> None:
        log.warn("closing the AMP connection from {peer}: it sent a box of over {limit} bytes",
                 peer=peer_of(self.transport), limit=self.max_box_bytes)
        self._halted = True
        self.paused = True  # the string loop stops before the next string
        self._currentBox = None
        self.transport.abortConnection()

    # -- requests waiting for their answers ------------------------------------------------------

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred[Any]:
        answer = super().dispatchCommand(box)
        if answer.called:
            return answer
        self._unanswered += 1
        if self._unanswered >= self.max_unanswered:
            self._pause(REQUESTS)
        answer.addBoth(self._answered)
        return answer

    def _answered(self, result: Any) -> Any:
        self._unanswered -= 1
        if self._unanswered <= self.max_unanswered // 2:
            self._resume(REQUESTS)
        return result

    # -- IPushProducer: the transport's write buffer ---------------------------------------------

    def pauseProducing(self) -> None:
        self._pause(WRITES)

    def resumeProducing(self) -> None:
        release_if_closing(self._consumer)
        self._resume(WRITES)

    def stopProducing(self) -> None:
        self._halted = True
        self.paused = True

    def _pause(self, why: str) -> None:
        self._pauses.add(why)
        self.paused = True  # the string loop stops before the next string
        self._update_reading()

    def _resume(self, why: str) -> None:
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if self._halted or self.transport is None:
            return
        if not self._pauses:
            self.paused = False
            if not self._receiving:
                # Strings received before the pause, still unparsed.
                self.dataReceived(b"")
        self._update_reading()

    def _update_reading(self) -> None:
        if self._halted or self.transport is None:
            return
        stop = stops_reading(self._pauses, len(self._unprocessed))
        if stop != self._reading_stopped:
            self._reading_stopped = stop
            if stop:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()
