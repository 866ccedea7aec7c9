"""A TCP fault proxy for the torture harness: delays, one-way drops and partitions of one link.

``tc netem`` is not available where the harness runs, so every link between two servers (and
between a client or the ECS and a server) goes through a L{FaultProxy}: a port on 127.0.0.1
that opens one connection to its target for each connection it accepts and copies the bytes both
ways (TLS between the two ends passes through untouched: the proxy never holds a key). "forward" is the direction from the connecting side to the target, "backward" the answers.
Faults are switched while connections are open:

 - L{FaultProxy.delay}: every chunk waits the given latency before it is passed on, in order.
 - L{FaultProxy.blackhole}: the bytes of one direction (or both) are dropped while the
   connections stay open. A TCP stream never has a hole in it, so when the blackhole is lifted
   a connection that lost bytes is aborted (as TCP would end it after its retransmissions time
   out); it is never resumed with bytes missing.
 - L{FaultProxy.partition}: open connections are aborted and new ones closed as soon as they
   are accepted.
 - L{FaultProxy.heal}: lifts every fault.

Memory stays bounded whatever the peers do: each direction is a streaming producer registered
with the transport it writes to, and stops reading its source while that transport's buffer is
full or while more than C{queue_limit} bytes wait out a delay.

L{ProxyFabric} makes one proxy per directed link (source name, target name), writes each
server's ``--peer-routes`` file, and applies faults between named nodes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from chainstore.logs import get_logger
from chainstore.tls import Credentials, client_endpoint

log = get_logger("torture.proxy")

FORWARD = "forward"
BACKWARD = "backward"
BOTH = "both"
_DIRECTIONS = {FORWARD: (FORWARD,), BACKWARD: (BACKWARD,), BOTH: (FORWARD, BACKWARD)}

# Bytes one direction may hold back for a delay before it stops reading its source: with a
# delay d, a direction carries at most about QUEUE_LIMIT / d bytes a second.
QUEUE_LIMIT = 256 * 1024


def directions(direction: str) -> tuple[str, ...]:
    """The directions that C{direction} ("forward", "backward" or "both") names."""
    try:
        return _DIRECTIONS[direction]
    except KeyError:
        raise ValueError(f"direction {direction!r}: choose forward, backward or both") from None


def unsent_bytes(transport: Any) -> int:
    """Bytes written to C{transport} that it has not yet handed to the kernel."""
    # Twisted offers no public count; its FileDescriptor keeps them in dataBuffer (from offset
    # on) and in _tempDataLen.
    return (len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
            + getattr(transport, "_tempDataLen", 0))


@implementer(IPushProducer)
class _Pipe:
    """One direction of one proxied connection: what C{source} delivers is written to C{sink},
    after the proxy's delay for this direction, unless the direction is blackholed.

    Registered with C{sink} as its producer, so a full sink pauses the reading of C{source}.
    """

    def __init__(self, link: _Link, direction: str, source: Any, sink: Any) -> None:
        self.link = link
        self.proxy = link.proxy
        self.direction = direction
        self.source = source
        self.sink = sink
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self._call: IDelayedCall | None = None
        self._pauses: set[str] = set()
        self._finishing = False
        sink.registerProducer(self, True)

    def receive(self, data: bytes) -> None:
        proxy = self.proxy
        if self.direction in proxy.blackholed:
            proxy.dropped[self.direction] += len(data)
            self.link.holed = True
            return
        delay = proxy.delays[self.direction]
        if delay <= 0 and not self.queue:
            self._write(data)
            return
        now = proxy.clock.seconds()
        # Never before an earlier chunk: a delay shortened meanwhile must not reorder bytes.
        due = max(now + delay, self.queue[-1][0]) if self.queue else now + delay
        self.queue.append((due, data))
        self.queued += len(data)
        if self.queued >= proxy.queue_limit:
            self._pause("queue")
        proxy.observe(self.queued + unsent_bytes(self.sink))
        if self._call is None:
            self._schedule(now)

    def _schedule(self, now: float) -> None:
        self._call = self.proxy.clock.callLater(max(0.0, self.queue[0][0] - now), self._deliver)

    def _deliver(self) -> None:
        self._call = None
        now = self.proxy.clock.seconds()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            self.queued -= len(data)
            self._write(data)
        if self.queued < self.proxy.queue_limit:
            self._resume("queue")
        if self.queue:
            self._schedule(now)
        elif self._finishing:
            self._close_sink()

    def _write(self, data: bytes) -> None:
        self.proxy.forwarded[self.direction] += len(data)
        self.sink.write(data)
        self.proxy.observe(self.queued + unsent_bytes(self.sink))

    def finish(self) -> None:
        """The source is gone: close the sink once the bytes held for a delay are written."""
        self._finishing = True
        if not self.queue:
            self._close_sink()

    def _close_sink(self) -> None:
        # A transport with a paused producer registered never completes loseConnection.
        self.sink.unregisterProducer()
        self.sink.loseConnection()

    def discard(self) -> None:
        """Forget the bytes held for a delay (the connection is being aborted)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.queue.clear()
        self.queued = 0
        self._finishing = False

    def _pause(self, reason: str) -> None:
        if not self._pauses:
            self.source.pauseProducing()
        self._pauses.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses:
                self.source.resumeProducing()

    @property
    def paused(self) -> bool:
        return bool(self._pauses)

    # IPushProducer, called by the sink transport as its write buffer fills and drains.
    def pauseProducing(self) -> None:
        self._pause("sink")

    def resumeProducing(self) -> None:
        self._resume("sink")

    def stopProducing(self) -> None:
        # The sink is gone; _Link closes the other side when it learns of it.
        pass


class _Link:
    """One accepted connection, its connection to the target and the two pipes between them."""

    def __init__(self, proxy: FaultProxy, inbound: _Inbound) -> None:
        self.proxy = proxy
        self.inbound = inbound
        self.outbound: _Outbound | None = None
        self.forward: _Pipe | None = None
        self.backward: _Pipe | None = None
        self.dial: Deferred[Any] | None = None
        self.inbound_open = True
        self.outbound_open = False
        self.holed = False  # some bytes were dropped: the streams can never be whole again
        self.done: Deferred[None] = Deferred()
        self._aborting = False
        self._finished = False

    def start(self, endpoint: IStreamClientEndpoint) -> None:
        # Read nothing from the client until there is somewhere to write it.
        self.inbound.transport.pauseProducing()
        self.dial = connectProtocol(endpoint, _Outbound(self))
        self.dial.addErrback(self._dial_failed)

    def dialed(self, outbound: _Outbound) -> None:
        self.dial = None
        self.outbound = outbound
        self.outbound_open = True
        if not self.inbound_open:
            outbound.transport.loseConnection()
            return
        inbound_t, outbound_t = self.inbound.transport, outbound.transport
        self.forward = _Pipe(self, FORWARD, inbound_t, outbound_t)
        self.backward = _Pipe(self, BACKWARD, outbound_t, inbound_t)
        inbound_t.resumeProducing()

    def _dial_failed(self, failure: Failure) -> None:
        self.dial = None
        if self.inbound_open and not self._aborting:
            log.debug("{proxy}: cannot reach the target: {error}", proxy=self.proxy._label(),
                      error=failure.getErrorMessage())
            self.inbound.transport.loseConnection()
        self._maybe_done()

    def inbound_lost(self) -> None:
        self.inbound_open = False
        if self.dial is not None:
            self.dial.cancel()
        elif self.forward is not None:
            self.forward.finish()
        self._maybe_done()

    def outbound_lost(self) -> None:
        self.outbound_open = False
        if self.backward is not None:
            self.backward.finish()
        self._maybe_done()

    def abort(self) -> None:
        """Drop both connections at once, and whatever they still hold."""
        self._aborting = True
        for pipe in (self.forward, self.backward):
            if pipe is not None:
                pipe.discard()
        if self.dial is not None:
            self.dial.cancel()
        if self.inbound_open:
            self.inbound.transport.abortConnection()
        if self.outbound_open and self.outbound is not None:
            self.outbound.transport.abortConnection()

    def buffered(self) -> int:
        return sum(pipe.queued + unsent_bytes(pipe.sink)
                   for pipe in (self.forward, self.backward) if pipe is not None)

    def _maybe_done(self) -> None:
        if self._finished or self.inbound_open or self.outbound_open or self.dial is not None:
            return
        self._finished = True
        for pipe in (self.forward, self.backward):
            if pipe is not None:
                pipe.discard()
        self.proxy.links.discard(self)
        self.done.callback(None)


class _Inbound(Protocol):
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.link: _Link | None = None

    def connectionMade(self) -> None:
        self.link = self.proxy.accept(self)

    def dataReceived(self, data: bytes) -> None:
        if self.link is not None and self.link.forward is not None:
            self.link.forward.receive(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.link is not None:
            self.link.inbound_lost()


class _Outbound(Protocol):
    def __init__(self, link: _Link) -> None:
        self.link = link

    def connectionMade(self) -> None:
        self.link.dialed(self)

    def dataReceived(self, data: bytes) -> None:
        if self.link.backward is not None:
            self.link.backward.receive(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.link.outbound_lost()


class FaultProxy:
    """A TCP proxy from a local port to C{target_host:target_port} whose faults can be switched
    at run time. Call L{start} to listen; L{port} is then the bound port.

    Counters, for tests and the harness: C{accepted} and C{refused} connections, C{forwarded}
    and C{dropped} bytes per direction, and C{high_water}, the most bytes the proxy ever held
    for one direction of one connection (delay queue plus the sink's unsent buffer).
    """

    def __init__(self, reactor: Any, listen_port: int, target_host: str, target_port: int, *,
                 clock: Any = None, interface: str = "127.0.0.1", connect_timeout: float = 5.0,
                 queue_limit: int = QUEUE_LIMIT) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.listen_port = listen_port
        self.interface = interface
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        self.queue_limit = queue_limit
        self.delays = {FORWARD: 0.0, BACKWARD: 0.0}
        self.blackholed: set[str] = set()
        self.partitioned = False
        self.links: set[_Link] = set()
        self.accepted = 0
        self.refused = 0
        self.forwarded = {FORWARD: 0, BACKWARD: 0}
        self.dropped = {FORWARD: 0, BACKWARD: 0}
        self.high_water = 0
        self._listening: Any = None
        self._closed = False

    @property
    def target(self) -> str:
        return f"{self.target_host}:{self.target_port}"

    @property
    def port(self) -> int:
        """The local port the proxy listens on."""
        if self._listening is None:
            raise RuntimeError("the proxy is not listening: call start() first")
        return int(self._listening.getHost().port)

    @property
    def address(self) -> tuple[str, int]:
        return (self.interface, self.port)

    def _label(self) -> str:
        port = self._listening.getHost().port if self._listening is not None else "-"
        return f"proxy {port} -> {self.target}"

    def start(self) -> int:
        """Listen (at once: a port in use raises here); return the bound port."""
        if self._listening is None:
            factory = Factory.forProtocol(lambda: _Inbound(self))
            self._listening = self.reactor.listenTCP(self.listen_port, factory,
                                                     interface=self.interface)
        return self.port

    # -- faults ---------------------------------------------------------------------------------

    def delay(self, seconds: float, direction: str = BOTH) -> None:
        """Hold every later chunk in C{direction} for C{seconds} before passing it on (0: none).
        Chunks keep their order; a chunk is never delivered before its delay has passed."""
        if seconds < 0:
            raise ValueError(f"delay must be 0 or more seconds, not {seconds}")
        for d in directions(direction):
            self.delays[d] = float(seconds)
        log.info("{proxy}: delay {direction} {seconds}s", proxy=self._label(),
                 direction=direction, seconds=seconds)

    def blackhole(self, direction: str = BOTH) -> None:
        """Drop every byte that arrives in C{direction} from now on (bytes already held for a
        delay still arrive); connections stay open and new ones are accepted."""
        self.blackholed.update(directions(direction))
        log.info("{proxy}: blackhole {direction}", proxy=self._label(), direction=direction)

    def partition(self) -> None:
        """Abort every connection, and close new ones as soon as they are accepted."""
        self.partitioned = True
        log.info("{proxy}: partition ({n} connections aborted)", proxy=self._label(),
                 n=len(self.links))
        for link in list(self.links):
            link.abort()

    def heal(self) -> None:
        """Lift every fault: no delay, no blackhole, no partition. Connections that lost bytes to
        a blackhole are aborted, since their streams have holes; the others carry on."""
        self.partitioned = False
        self.blackholed.clear()
        for d in self.delays:
            self.delays[d] = 0.0
        holed = [link for link in self.links if link.holed]
        log.info("{proxy}: healed ({n} connections with lost bytes aborted)",
                 proxy=self._label(), n=len(holed))
        for link in holed:
            link.abort()

    def close(self) -> Deferred[None]:
        """Stop listening and abort every connection; fires when all of them are gone."""
        self._closed = True
        waits: list[Deferred[Any]] = [link.done for link in self.links]
        for link in list(self.links):
            link.abort()
        if self._listening is not None:
            stopped = self._listening.stopListening()
            if isinstance(stopped, Deferred):
                waits.append(stopped)
        d: Deferred[Any] = DeferredList(waits, consumeErrors=True)
        return d.addCallback(lambda _: None)

    # -- state ----------------------------------------------------------------------------------

    def buffered_bytes(self) -> int:
        """Bytes the proxy holds right now: delay queues plus its transports' unsent buffers."""
        return sum(link.buffered() for link in self.links)

    def observe(self, held: int) -> None:
        """Note that one direction of one connection holds C{held} bytes (for C{high_water})."""
        if held > self.high_water:
            self.high_water = held

    def accept(self, inbound: _Inbound) -> _Link | None:
        """A connection came in: close it (partitioned), or dial the target for it."""
        if self.partitioned or self._closed:
            self.refused += 1
            inbound.transport.abortConnection()
            return None
        self.accepted += 1
        link = _Link(self, inbound)
        self.links.add(link)
        endpoint = HostnameEndpoint(self.reactor, self.target_host, self.target_port,
                                    timeout=self.connect_timeout)
        link.start(endpoint)
        return link


class ProxyFabric:
    """One L{FaultProxy} per directed link between named nodes (servers, the ECS, clients).

    The link (a, b) carries the connections that a opens to b: its "forward" direction is a's
    bytes to b. Servers learn the proxies in front of their peers from L{write_routes}
    (``--peer-routes``); a server reaches the ECS through L{endpoint} (``--ecs``); a client
    through L{endpoint_factory}.
    """

    def __init__(self, reactor: Any, clock: Any = None, host: str = "127.0.0.1") -> None:
        self.reactor = reactor
        self.clock = clock
        self.host = host
        self.proxies: dict[tuple[str, str], FaultProxy] = {}

    def add(self, source: str, target: str, target_host: str, target_port: int) -> FaultProxy:
        """Start the proxy that C{source} dials to reach C{target} at its real address."""
        if (source, target) in self.proxies:
            raise ValueError(f"the link {source} -> {target} already has a proxy")
        proxy = FaultProxy(self.reactor, 0, target_host, target_port, clock=self.clock,
                           interface=self.host)
        proxy.start()
        self.proxies[(source, target)] = proxy
        return proxy

    def proxy(self, source: str, target: str) -> FaultProxy:
        try:
            return self.proxies[(source, target)]
        except KeyError:
            raise KeyError(f"no proxy on the link {source} -> {target}") from None

    def endpoint(self, source: str, target: str) -> str:
        """A client endpoint string for C{source} to reach C{target} (such as ``--ecs``)."""
        host, port = self.proxy(source, target).address
        return f"tcp:{host}:{port}"

    def routes(self, source: str, targets: Iterable[str] | None = None) -> dict[str, str]:
        """Peer name -> ``"host:port"`` of the proxies on C{source}'s links (to C{targets})."""
        wanted = None if targets is None else set(targets)
        return {t: f"{p.interface}:{p.port}" for (s, t), p in sorted(self.proxies.items())
                if s == source and (wanted is None or t in wanted)}

    def write_routes(self, source: str, path: str | Path,
                     targets: Iterable[str] | None = None) -> Path:
        """Write C{source}'s ``--peer-routes`` file (see L{routes}); return its path."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.routes(source, targets), default_flow_style=False),
                        encoding="utf-8")
        return path

    def endpoint_factory(self, source: str, timeout: float = 10.0,
                         credentials: Credentials | None = None
                         ) -> Callable[[str, int], IStreamClientEndpoint]:
        """A client library C{endpoint_factory} for C{source}: an address that a link from
        C{source} proxies is dialled at its proxy, any other address directly.

        With C{credentials}, mutual TLS end to end through the proxy (which passes the bytes
        on untouched): the server's certificate must name the host the client meant to reach,
        the server's own, not the proxy's address, as it would behind any TCP relay."""
        by_target = {(p.target_host, p.target_port): p
                     for (s, _), p in self.proxies.items() if s == source}

        def factory(host: str, port: int) -> IStreamClientEndpoint:
            proxy = by_target.get((host, port))
            dial_host, dial_port = proxy.address if proxy is not None else (host, port)
            return client_endpoint(self.reactor, credentials, dial_host, dial_port, timeout,
                                   name=host)
        return factory

    def between(self, a: str, b: str) -> list[FaultProxy]:
        """The proxies of the links a -> b and b -> a that exist."""
        return [self.proxies[k] for k in ((a, b), (b, a)) if k in self.proxies]

    # -- faults between named nodes ------------------------------------------------------------

    def partition(self, a: str, b: str) -> None:
        """Cut a and b apart both ways: connections between them are aborted and refused."""
        for proxy in self._between(a, b):
            proxy.partition()

    def isolate(self, name: str) -> None:
        """Partition C{name} from every node it has a link with."""
        for (s, t), proxy in self.proxies.items():
            if name in (s, t):
                proxy.partition()

    def drop(self, source: str, target: str) -> None:
        """One-way partition: no byte from C{source} reaches C{target}, on the connections
        either of them opened; bytes from C{target} to C{source} still flow."""
        self._between(source, target)  # a typo in a name must not quietly drop nothing
        if (source, target) in self.proxies:
            self.proxies[(source, target)].blackhole(FORWARD)
        if (target, source) in self.proxies:
            self.proxies[(target, source)].blackhole(BACKWARD)

    def delay(self, a: str, b: str, seconds: float) -> None:
        """Add C{seconds} of latency to every byte between a and b, both ways."""
        for proxy in self._between(a, b):
            proxy.delay(seconds, BOTH)

    def heal(self, a: str | None = None, b: str | None = None) -> None:
        """Lift the faults between a and b, or on every link when no names are given."""
        if a is None and b is None:
            proxies = list(self.proxies.values())
        elif a is not None and b is not None:
            proxies = self._between(a, b)
        else:
            raise ValueError("give both node names, or neither to heal every link")
        for proxy in proxies:
            proxy.heal()

    def close(self) -> Deferred[None]:
        """Close every proxy; fires when all their ports and connections are gone."""
        d: Deferred[Any] = DeferredList([p.close() for p in self.proxies.values()],
                                        consumeErrors=True)
        return d.addCallback(lambda _: None)

    def _between(self, a: str, b: str) -> list[FaultProxy]:
        proxies = self.between(a, b)
        if not proxies:
            raise KeyError(f"no proxy on a link between {a} and {b}")
        return proxies
