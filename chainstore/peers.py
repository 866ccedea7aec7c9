"""Connections from one server to the other servers' AMP ports, opened once and reused.

Chain replication forwards every write to the next server and a tail renews its lease with the
one before it; both go through this pool, which dials on first use, shares a pending dial among
callers and forgets a connection when it is lost (the next use dials again). Replication is
one-way, so it must hear of a lost connection: L{PeerPool.on_lost} is told of every one, and of
every dial that fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.protocols import amp

from chainstore.ring import NodeInfo
from chainstore.roles import SERVER, RoleGuard
from chainstore.tls import Credentials, client_endpoint

Connector = Callable[[NodeInfo], Deferred[amp.AMP]]

# Peer server name -> (host, port) to dial instead of the peer's advertised AMP address.
Routes = Mapping[str, tuple[str, int]]


def no_delay(transport: Any) -> None:
    """Send small AMP boxes at once: with Nagle's algorithm on, a request waits for the ACK of
    the previous one, which the peer delays (up to 40 ms on Linux)."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


def tcp_connector(reactor: Any, timeout: float = 5.0, routes: Routes | None = None,
                  credentials: Credentials | None = None) -> Connector:
    """A connector that dials a peer's AMP port over TCP, with mutual TLS given C{credentials}
    (the peer's certificate must name the host dialled).

    A peer named in C{routes} is dialled at the mapped address instead of its advertised
    C{host:amp_port} (the fault-injection harness puts a proxy there); other peers at their own.
    """
    routes = dict(routes or {})

    def connect(node: NodeInfo) -> Deferred[amp.AMP]:
        host, port = routes.get(node.name, (node.host, node.amp_port))
        endpoint = client_endpoint(reactor, credentials, host, port, timeout)
        return connectProtocol(endpoint, _PeerProtocol())
    return connect


class _PeerProtocol(RoleGuard):
    # the server we dialled must hold a server certificate
    peer_roles = frozenset({SERVER})
    lost: Callable[[], None] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)

    def connectionLost(self, reason: Any) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if self.lost is not None:
            self.lost()


def _key(node: NodeInfo) -> str:
    # (by address: the name a ring gives a server does not change where it is reached)
    return f"{node.host}:{node.amp_port}"


class PeerPool:
    def __init__(self, connect: Connector) -> None:
        self._connect = connect
        self._open: dict[str, amp.AMP] = {}
        self._dialing: dict[str, list[Deferred[amp.AMP]]] = {}
        #: called with the peer whenever a connection to it is lost or a dial to it fails
        self.on_lost: Callable[[NodeInfo], None] = lambda node: None

    def open(self, node: NodeInfo) -> amp.AMP | None:
        """The open connection to C{node}, if there is one."""
        return self._open.get(_key(node))

    def get(self, node: NodeInfo) -> Deferred[amp.AMP]:
        key = _key(node)
        proto = self._open.get(key)
        if proto is not None:
            return succeed(proto)
        waiter: Deferred[amp.AMP] = Deferred()
        if key in self._dialing:
            self._dialing[key].append(waiter)
            return waiter
        self._dialing[key] = [waiter]
        self._connect(node).addCallbacks(self._opened, self._failed, (key, node), None,
                                         (key, node))
        return waiter

    def _opened(self, proto: amp.AMP, key: str, node: NodeInfo) -> None:
        self._open[key] = proto

        def lost() -> None:
            if self._open.get(key) is proto:
                del self._open[key]
            self.on_lost(node)

        proto.lost = lost  # type: ignore[attr-defined]
        for waiter in self._dialing.pop(key, []):
            waiter.callback(proto)

    def _failed(self, failure: Any, key: str, node: NodeInfo) -> None:
        for waiter in self._dialing.pop(key, []):
            waiter.errback(failure)
        self.on_lost(node)

    def drop(self, node: NodeInfo, abort: bool = False, proto: amp.AMP | None = None) -> None:
        """Forget the connection to C{node}: the next use dials again. With C{abort} (a peer
        that stopped answering) it is closed at once, without flushing what is unsent. Given
        C{proto}, only that connection is closed (a newer one to C{node} stays)."""
        key = _key(node)
        if proto is None or self._open.get(key) is proto:
            proto = self._open.pop(key, None)
        if proto is not None and proto.transport is not None:
            if abort:
                proto.transport.abortConnection()
            else:
                proto.transport.loseConnection()

    def close(self) -> None:
        for proto in list(self._open.values()):
            if proto.transport is not None:
                proto.transport.loseConnection()
        self._open.clear()
