"""The TCP fault proxy (torture.proxy) on real loopback sockets, and the server's peer routes.

Proxy tests use the real reactor on 127.0.0.1 only; every wait is bounded by a timeout, and
every port and connection a test opens is closed at its end, also when it fails. Peer routes are
tested without sockets (MemoryReactorClock), the --peer-routes option through twistd's Options.
"""

from __future__ import annotations

import hashlib

import pytest
import pytest_twisted
import yaml
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport, SynchronousResolver
from twisted.protocols import amp
from twisted.python import usage

from chainstore import pki, tls
from chainstore.config import ServerConfig, load_peer_routes
from chainstore.peers import PeerPool, tcp_connector
from chainstore.ring import NodeInfo
from chainstore.service import KVServerService
from chainstore.tap import Options
from torture.proxy import BACKWARD, FORWARD, FaultProxy, ProxyFabric

TIMEOUT = 10.0  # seconds any one wait may take before the test fails


class Peer(Protocol):
    """Either end of a test connection: records what arrives, optionally echoes it back."""

    def __init__(self, echo: bool = False, paused: bool = False) -> None:
        self.echo = echo
        self.paused = paused
        self.data = bytearray()
        self.made: Deferred[Peer] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        if self.paused:
            self.transport.pauseProducing()
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.echo:
            self.transport.write(data)
        for n, d in list(self._waiting):
            if len(self.data) >= n:
                self._waiting.remove((n, d))
                d.callback(bytes(self.data))

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)

    def received(self, n: int) -> Deferred[bytes]:
        """Fires with everything received once at least C{n} bytes have arrived."""
        if len(self.data) >= n:
            return succeed(bytes(self.data))
        d: Deferred[bytes] = Deferred()
        self._waiting.append((n, d))
        return d


class Loopback:
    """Ports, proxies and connections of one test on 127.0.0.1, all closed by L{close}."""

    def __init__(self, reactor: object) -> None:
        self.reactor = reactor
        self.ports: list[object] = []
        self.proxies: list[FaultProxy] = []
        self.peers: list[Peer] = []

    def server(self, **peer_options: bool) -> tuple[int, list[Peer]]:
        """Listen on a free port; returns it and the list its accepted Peers are appended to."""
        accepted: list[Peer] = []

        def build() -> Peer:
            peer = Peer(**peer_options)
            accepted.append(peer)
            self.peers.append(peer)
            return peer

        port = self.reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.ports.append(port)
        return port.getHost().port, accepted

    def proxy(self, target_port: int, **options: object) -> FaultProxy:
        proxy = FaultProxy(self.reactor, 0, "127.0.0.1", target_port, **options)
        self.proxies.append(proxy)
        proxy.start()
        return proxy

    async def connect(self, port: int) -> Peer:
        peer = Peer()
        self.peers.append(peer)
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=TIMEOUT)
        await within(self.reactor, connectProtocol(endpoint, peer))
        return peer

    async def close(self) -> None:
        for proxy in self.proxies:
            await within(self.reactor, proxy.close())
        for peer in self.peers:
            if peer.transport is not None and not peer.closed.called:
                peer.transport.abortConnection()
                await within(self.reactor, peer.closed)
        for port in self.ports:
            await port.stopListening()


def within(reactor: object, d: Deferred, timeout: float = TIMEOUT) -> Deferred:
    """C{d}, failed with TimeoutError if it has not fired after C{timeout} seconds."""
    return d.addTimeout(timeout, reactor)


async def received(reactor: object, peer: Peer, n: int) -> bytes:
    if len(peer.data) >= n:
        return bytes(peer.data)
    return await within(reactor, peer.received(n))


async def until(reactor: object, predicate, what: str, timeout: float = TIMEOUT) -> None:
    """Poll C{predicate} every 5 ms until it holds; fail after C{timeout} seconds."""
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.fixture
def net(reactor):
    return Loopback(reactor)


# -- forwarding ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bytes_go_through_both_ways(reactor, net):
    port, _ = net.server(echo=True)
    proxy = net.proxy(port)
    try:
        assert proxy.port != port
        client = await net.connect(proxy.port)
        message = bytes(range(256)) * 40
        client.transport.write(message)
        assert await received(reactor, client, len(message)) == message
        assert proxy.forwarded == {FORWARD: len(message), BACKWARD: len(message)}
        assert proxy.accepted == 1 and proxy.dropped == {FORWARD: 0, BACKWARD: 0}
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_closing_one_side_closes_the_other(reactor, net):
    port, accepted = net.server()
    proxy = net.proxy(port)
    try:
        client = await net.connect(proxy.port)
        await until(reactor, lambda: accepted, "the target accepted the proxied connection")
        client.transport.write(b"last words")
        client.transport.loseConnection()
        await within(reactor, accepted[0].closed)
        assert bytes(accepted[0].data) == b"last words"
        await until(reactor, lambda: not proxy.links, "the proxy forgot the connection")
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_a_target_that_is_down_closes_the_client(reactor, net):
    port, _ = net.server()
    await net.ports.pop().stopListening()  # nothing listens there now
    proxy = net.proxy(port)
    try:
        client = await net.connect(proxy.port)
        await within(reactor, client.closed)
        assert not proxy.links
    finally:
        await net.close()


# -- delay -----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delay_adds_at_least_the_latency_each_way(reactor, net):
    port, _ = net.server(echo=True)
    proxy = net.proxy(port)
    try:
        client = await net.connect(proxy.port)
        proxy.delay(0.15)
        start = reactor.seconds()
        client.transport.write(b"ping")
        await received(reactor, client, 4)
        assert reactor.seconds() - start >= 0.3  # 0.15 there and 0.15 back
        proxy.delay(0)
        proxy.delay(0.2, FORWARD)
        start = reactor.seconds()
        client.transport.write(b"pong")
        assert await received(reactor, client, 8) == b"pingpong"
        assert reactor.seconds() - start >= 0.2
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_a_shortened_delay_never_reorders_bytes(reactor, net):
    port, accepted = net.server()
    proxy = net.proxy(port)
    try:
        client = await net.connect(proxy.port)
        await until(reactor, lambda: accepted, "the target accepted the proxied connection")
        proxy.delay(0.3, FORWARD)
        client.transport.write(b"first ")
        await until(reactor, lambda: proxy.buffered_bytes() == 6, "the proxy holds 'first '")
        proxy.delay(0, FORWARD)
        client.transport.write(b"second")
        assert await received(reactor, accepted[0], 12) == b"first second"
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_the_delay_runs_on_the_injected_clock(reactor, net):
    clock = Clock()
    port, accepted = net.server()
    proxy = net.proxy(port, clock=clock)
    try:
        client = await net.connect(proxy.port)
        await until(reactor, lambda: accepted, "the target accepted the proxied connection")
        proxy.delay(1.0, FORWARD)
        client.transport.write(b"late")
        await until(reactor, lambda: proxy.buffered_bytes() == 4, "the proxy holds the chunk")
        clock.advance(0.999)
        assert proxy.forwarded[FORWARD] == 0  # the real reactor's time does not count
        clock.advance(0.001)
        assert proxy.forwarded[FORWARD] == 4
        assert await received(reactor, accepted[0], 4) == b"late"
    finally:
        await net.close()


# -- blackhole, partition, heal --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_blackhole_forward_drops_client_bytes_but_answers_still_flow(reactor, net):
    port, accepted = net.server()
    proxy = net.proxy(port)
    try:
        client = await net.connect(proxy.port)
        client.transport.write(b"a")
        await until(reactor, lambda: accepted and accepted[0].data == b"a", "'a' got through")
        target = accepted[0]
        proxy.blackhole(FORWARD)
        client.transport.write(b"b" * 1000)
        await until(reactor, lambda: proxy.dropped[FORWARD] == 1000, "the proxy dropped 'b's")
        target.transport.write(b"answer")
        assert await received(reactor, client, 6) == b"answer"
        assert proxy.forwarded == {FORWARD: 1, BACKWARD: 6}
        assert bytes(target.data) == b"a"
        assert not client.closed.called and not target.closed.called
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_heal_aborts_connections_with_holes_and_keeps_whole_ones(reactor, net):
    port, accepted = net.server(echo=True)
    proxy = net.proxy(port)
    try:
        whole = await net.connect(proxy.port)
        whole.transport.write(b"1")
        await received(reactor, whole, 1)
        proxy.blackhole(BACKWARD)
        holed = await net.connect(proxy.port)
        holed.transport.write(b"x")  # echoed by the target, dropped on its way back
        await until(reactor, lambda: proxy.dropped[BACKWARD] == 1, "the echo was dropped")
        proxy.heal()
        await within(reactor, holed.closed)
        whole.transport.write(b"2")
        assert await received(reactor, whole, 2) == b"12"
        fresh = await net.connect(proxy.port)
        fresh.transport.write(b"3")
        assert await received(reactor, fresh, 1) == b"3"
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_partition_closes_connections_and_refuses_new_ones_until_healed(reactor, net):
    port, accepted = net.server(echo=True)
    proxy = net.proxy(port)
    try:
        before = await net.connect(proxy.port)
        before.transport.write(b"hi")
        await received(reactor, before, 2)
        proxy.partition()
        await within(reactor, before.closed)
        await until(reactor, lambda: all(p.closed.called for p in accepted),
                    "the target's side was closed too")

        during = await net.connect(proxy.port)
        during.transport.write(b"anyone?")
        await within(reactor, during.closed)
        assert bytes(during.data) == b"" and proxy.refused == 1
        assert len(accepted) == 1  # the target never saw the refused connection

        proxy.heal()
        after = await net.connect(proxy.port)
        after.transport.write(b"back")
        assert await received(reactor, after, 4) == b"back"
    finally:
        await net.close()


def test_bad_fault_arguments_are_refused(reactor):
    proxy = FaultProxy(reactor, 0, "127.0.0.1", 1)  # never started: nothing listens
    with pytest.raises(ValueError, match="forward, backward or both"):
        proxy.blackhole("sideways")
    with pytest.raises(ValueError, match="0 or more"):
        proxy.delay(-1)
    with pytest.raises(RuntimeError, match="start"):
        proxy.port
    assert proxy.blackholed == set() and proxy.delays == {FORWARD: 0.0, BACKWARD: 0.0}


# -- bounded memory --------------------------------------------------------------------------------


def _payload(size: int) -> bytes:
    block = hashlib.sha256(b"chainstore").digest() * 2048  # 64 KiB, not all one byte
    return (block * (size // len(block) + 1))[:size]


@pytest_twisted.ensureDeferred
async def test_a_slow_consumer_pauses_the_proxy_reader(reactor, net):
    """16 MiB into a target that reads nothing: without backpressure the proxy would hold most
    of it (loopback kernel buffers take a few MiB at most); with it, about one read chunk. The
    client closes after its last byte: the close reaches the target after all of them."""
    size, bound = 16 * 1024 * 1024, 1024 * 1024
    port, accepted = net.server(paused=True)
    proxy = net.proxy(port)
    try:
        client = await net.connect(proxy.port)
        payload = _payload(size)
        client.transport.write(payload)
        client.transport.loseConnection()  # after the last byte: the target must still get all
        await until(reactor, lambda: proxy.links and next(iter(proxy.links)).forward is not None
                    and next(iter(proxy.links)).forward.paused, "the proxy paused its reader")
        assert proxy.buffered_bytes() < bound
        target = accepted[0]
        target.transport.resumeProducing()
        got = await received(reactor, target, size)
        assert got == payload
        assert 0 < proxy.high_water < bound, proxy.high_water
        await within(reactor, target.closed)  # the client's close follows its bytes
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_a_delay_holds_at_most_its_queue_limit(reactor, net):
    """1 MiB through a 50 ms delay: without the limit all of it would wait in the queue."""
    size, limit = 1024 * 1024, 64 * 1024
    port, accepted = net.server()
    proxy = net.proxy(port, queue_limit=limit)
    try:
        client = await net.connect(proxy.port)
        await until(reactor, lambda: accepted, "the target accepted the proxied connection")
        proxy.delay(0.05, FORWARD)
        payload = _payload(size)
        client.transport.write(payload)
        assert await received(reactor, accepted[0], size) == payload
        # The limit, plus one 64 KiB read past it, plus the sink's buffer before it pauses us.
        assert 0 < proxy.high_water < limit + 3 * 64 * 1024, proxy.high_water
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_a_close_follows_delayed_bytes_into_a_full_sink(reactor, net):
    """The client's close is passed on after its delayed bytes, even when writing them fills
    the target's buffer (a transport with a paused producer would never finish closing)."""
    size = 1024 * 1024
    port, accepted = net.server(paused=True)
    proxy = net.proxy(port, queue_limit=4 * size)  # all of it waits out the delay at once
    try:
        client = await net.connect(proxy.port)
        await until(reactor, lambda: accepted, "the target accepted the proxied connection")
        proxy.delay(0.05, FORWARD)
        payload = _payload(size)
        client.transport.write(payload)
        client.transport.loseConnection()
        await until(reactor, lambda: proxy.forwarded[FORWARD] == size, "the delay passed")
        target = accepted[0]
        target.transport.resumeProducing()
        assert await received(reactor, target, size) == payload
        await within(reactor, target.closed)
    finally:
        await net.close()


# -- the fabric ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fabric_links_routes_and_one_way_drops(reactor, net, tmp_path):
    port_a, accepted_a = net.server(echo=True)
    port_b, accepted_b = net.server(echo=True)
    fabric = ProxyFabric(reactor)
    try:
        ab = fabric.add("a", "b", "127.0.0.1", port_b)
        ba = fabric.add("b", "a", "127.0.0.1", port_a)
        fabric.add("client", "a", "127.0.0.1", port_a)
        with pytest.raises(ValueError):
            fabric.add("a", "b", "127.0.0.1", port_b)

        path = fabric.write_routes("a", tmp_path / "a-routes.yaml")
        assert load_peer_routes(str(path)) == {"b": ("127.0.0.1", ab.port)}
        assert fabric.routes("client") == {"a": f"127.0.0.1:{fabric.proxy('client', 'a').port}"}
        assert fabric.routes("a", targets=["c"]) == {}
        assert fabric.endpoint("b", "a") == f"tcp:127.0.0.1:{ba.port}"

        # A client's endpoint factory dials the proxy for a proxied address, others directly.
        factory = fabric.endpoint_factory("client")
        via = Peer()
        await within(reactor, connectProtocol(factory("127.0.0.1", port_a), via))
        net.peers.append(via)
        assert fabric.proxy("client", "a").accepted == 1

        # One way: a's bytes never reach b, on a's connection to b or on b's connection to a;
        # b's bytes still reach a.
        fabric.drop("a", "b")
        assert ab.blackholed == {FORWARD} and ba.blackholed == {BACKWARD}
        fabric.heal("a", "b")
        assert not ab.blackholed and not ba.blackholed
        fabric.partition("a", "b")
        assert ab.partitioned and ba.partitioned
        assert not fabric.proxy("client", "a").partitioned
        with pytest.raises(KeyError):
            fabric.partition("a", "nobody")
        fabric.heal()
        assert not ab.partitioned
    finally:
        await within(reactor, fabric.close())
        await net.close()


@pytest_twisted.ensureDeferred
async def test_fabric_clients_speak_tls_through_the_proxy_to_the_server_they_meant(
        reactor, net, tmp_path):
    directory = str(tmp_path / "pki")
    pki.init_ca(directory)
    # Certificates for the server's own host only: neither names the proxy's 127.0.0.1.
    pki.issue(directory, "server", "named", ["localhost"])
    pki.issue(directory, "server", "elsewhere", ["127.0.0.2"])
    pki.issue(directory, "client", "client")

    accepted: list[Peer] = []

    def build() -> Peer:
        peer = Peer(echo=True)
        accepted.append(peer)
        net.peers.append(peer)
        return peer

    async def listen(holder: str) -> int:
        endpoint = tls.server_endpoint(reactor, "tcp:0:interface=127.0.0.1",
                                       tls.load(tls.TLSFiles.in_dir(directory, holder)))
        port = await endpoint.listen(Factory.forProtocol(build))
        net.ports.append(port)
        return port.getHost().port

    named, elsewhere = await listen("named"), await listen("elsewhere")
    fabric = ProxyFabric(reactor)
    try:
        proxy = fabric.add("client", "named", "localhost", named)
        fabric.add("client", "elsewhere", "localhost", elsewhere)
        factory = fabric.endpoint_factory(
            "client", credentials=tls.load(tls.TLSFiles.in_dir(directory, "client")))

        # Dialled at the proxy, checked against the host the client meant (localhost).
        via = Peer()
        await within(reactor, connectProtocol(factory("localhost", named), via))
        net.peers.append(via)
        via.transport.write(b"hello")
        assert await received(reactor, via, 5) == b"hello"
        assert proxy.accepted == 1 and proxy.forwarded[FORWARD] > 5  # TLS records, not b"hello"
        assert tls.peer_identity(accepted[0].transport) == pki.Identity("client", "client")
        assert tls.peer_identity(via.transport) == pki.Identity("named", "server")

        # A server whose certificate does not name the host meant is refused, proxy or not.
        wrong = Peer()
        await within(reactor, connectProtocol(factory("localhost", elsewhere), wrong))
        wrong.transport.write(b"secret")
        await within(reactor, wrong.closed)
        assert not wrong.data and fabric.proxy("client", "elsewhere").accepted == 1
        assert all(not peer.data for peer in accepted[1:])
    finally:
        await within(reactor, fabric.close())
        await net.close()


# -- peer routes in the server ---------------------------------------------------------------------


class RecordingResolver(SynchronousResolver):
    """Resolves every name to 127.0.0.1 at once (as MemoryReactor's own resolver does), but
    remembers which (host, port) each dial asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, *args, **kwargs):
        self.asked.append((hostName, portNumber))
        return super().resolveHostName(receiver, hostName, portNumber, *args, **kwargs)


def _memory_reactor() -> tuple[MemoryReactorClock, RecordingResolver]:
    reactor = MemoryReactorClock()
    resolver = RecordingResolver()
    reactor.installNameResolver(resolver)
    return reactor, resolver


def test_tcp_connector_dials_the_route_of_a_routed_peer_and_others_directly():
    reactor, resolver = _memory_reactor()
    connect = tcp_connector(reactor, routes={"b": ("proxyhost", 7001)})
    d = connect(NodeInfo("b", "10.0.0.2", 5000, 5001))
    connect(NodeInfo("c", "10.0.0.3", 6000, 6001))
    tcp_connector(reactor)(NodeInfo("b", "10.0.0.2", 5000, 5001))
    reactor.advance(0)  # HostnameEndpoint resolves on the next turn, then dials
    assert resolver.asked == [("proxyhost", 7001), ("10.0.0.3", 6001), ("10.0.0.2", 5001)]
    assert [c[1] for c in reactor.tcpClients] == [7001, 6001, 5001]
    # The routed dial completes into the pool's AMP protocol like any other.
    reactor.tcpClients[0][2].buildProtocol(None).makeConnection(StringTransport())
    assert isinstance(d.result, amp.AMP)


def test_the_service_dials_peers_through_the_routes_file(tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text('s2: "127.0.0.2:7002"\n')
    config = ServerConfig(name="s1", data_dir=str(tmp_path / "s1"),
                          peer_routes=str(routes)).validated()
    reactor, resolver = _memory_reactor()
    service = KVServerService(config, reactor)
    pool: PeerPool = service.node.chain.peers
    pool.get(NodeInfo("s2", "127.0.0.1", 6001, 6002))
    pool.get(NodeInfo("s3", "127.0.0.1", 6003, 6004))
    reactor.advance(0)
    assert resolver.asked == [("127.0.0.2", 7002), ("127.0.0.1", 6004)]


# -- the --peer-routes option ----------------------------------------------------------------------


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An empty working directory, so no etc/kvserver.yaml is picked up."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parse(*argv: str) -> ServerConfig:
    options = Options()
    options.parseOptions(list(argv))
    return options.config


def test_a_good_routes_file_is_accepted_by_flag_and_by_yaml(elsewhere):
    path = elsewhere / "routes.yaml"
    path.write_text('s2: "127.0.0.1:7002"\ns3: "[::1]:7003"\n7: "localhost:7007"\n')
    assert parse("--peer-routes", str(path)).peer_routes == str(path)
    assert load_peer_routes(str(path)) == {
        "s2": ("127.0.0.1", 7002), "s3": ("::1", 7003), "7": ("localhost", 7007)}
    config_file = elsewhere / "server.yaml"
    config_file.write_text(yaml.safe_dump({"peer-routes": str(path)}))
    assert parse("--config", str(config_file)).peer_routes == str(path)
    assert parse().peer_routes is None
    empty = elsewhere / "empty.yaml"
    empty.write_text("")
    assert load_peer_routes(str(empty)) == {}


@pytest.mark.parametrize("text, words", [
    (None, "cannot read peer-routes file"),
    ("s2: [unclosed\n", "not valid YAML"),
    ("- 127.0.0.1:7002\n", "must hold a mapping"),
    ('yes: "127.0.0.1:7002"\n', "is not a server name"),
    ('"bad name": "127.0.0.1:7002"\n', "is not a server name"),
    ("s2: 7002\n", 'give "host:port"'),
    ('s2: "127.0.0.1"\n', 'give "host:port"'),
    ('s2: ":7002"\n', 'give "host:port"'),
    ('s2: "::1:7002"\n', "IPv6"),
    ('s2: "127.0.0.1:0"\n', "must be 1-65535"),
    ('s2: "127.0.0.1:70000"\n', "must be 1-65535"),
    ('s2: "127.0.0.1:http"\n', "must be 1-65535"),
])
def test_a_bad_routes_file_is_a_usage_error_that_says_what_is_wrong(elsewhere, text, words):
    path = elsewhere / "routes.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(usage.UsageError) as info:
        parse("--peer-routes", str(path))
    assert words in str(info.value)
    assert str(path) in str(info.value)

