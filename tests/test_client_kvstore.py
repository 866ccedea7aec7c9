"""KVStore without sockets: real AMP servers (KVServerProtocol on KVNodes) behind iosim.

Every connection the client opens is an iosim pair that serialises through the real AMP wire
format (so 120,000-byte values really cross as BigBytes chunks); bytes move only when the test
pumps them and time only when it advances the Clock. Each test names the behaviour it proves.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.amp import AMP as PeerAMP
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from chainstore.amp_server import KVServerProtocol
from chainstore.cache import make_cache
from chainstore.console import ConsoleProtocol
from chainstore.errors import (
    InvalidKey,
    KeyNotFound,
    NotResponsible,
    ServerError,
    ServerStopped,
    ValueTooLarge,
    WriteLocked,
)
from chainstore.limits import MAX_VALUE_BYTES
from chainstore.node import RUNNING, STOPPED, KVNode
from chainstore.ring import NodeInfo, Ring, position
from chainstore.storage import STORE_NAMES, StoreSet
from client.errors import ClientClosed, RequestTimedOut, WrongProtocol
from client import kvstore
from client.kvstore import KVStore

Address = tuple[str, int]


class RecordingServer(KVServerProtocol):
    """The real AMP responder, noting each command it receives (address, time, name)."""

    def __init__(self, node: KVNode, network: FakeNetwork, address: Address) -> None:
        super().__init__(node)
        self.network = network
        self.address = address

    def locateResponder(self, name: bytes) -> Any:
        self.network.received.append((self.address, self.network.clock.seconds(),
                                      name.decode()))
        return super().locateResponder(name)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    def __init__(self, network: FakeNetwork, address: Address) -> None:
        self.network = network
        self.address = address

    def connect(self, factory: Any) -> Deferred[Any]:
        net, address = self.network, self.address
        net.connects[address] += 1
        node = net.nodes.get(address)
        if node is None or address in net.down:
            return fail(ConnectionRefusedError(f"{address[0]}:{address[1]}"))
        client = factory.buildProtocol(IPv4Address("TCP", *address))
        if address in net.consoles:
            server: Any = ConsoleProtocol(node)
        else:
            server = RecordingServer(node, net, address)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                             iosim.makeFakeClient(client), greet=False, clock=net.clock)
        net.pumps.append((address, pump))
        return succeed(client)


class FakeNetwork:
    """KVNodes by AMP address; C{down} refuse connections, C{hung} never deliver bytes."""

    def __init__(self, clock: Clock, tmp_path: Any) -> None:
        self.clock = clock
        self.tmp_path = tmp_path
        self.nodes: dict[Address, KVNode] = {}
        self.down: set[Address] = set()
        self.hung: set[Address] = set()
        self.consoles: set[Address] = set()
        self.connects: Counter[Address] = Counter()
        self.pumps: list[tuple[Address, iosim.IOPump]] = []
        self.received: list[tuple[Address, float, str]] = []

    def add_node(self, info: NodeInfo, ring: Ring | None = None) -> KVNode:
        node = KVNode(info, make_cache("LRU", 0), self.clock, ring=ring,
                      connect=self.peer_connect)
        node.stores = StoreSet.open(str(self.tmp_path / info.name))
        self.nodes[(info.host, info.amp_port)] = node
        return node

    def peer_connect(self, info: NodeInfo) -> Deferred[Any]:
        """How a node reaches its chain successor: an iosim connection like the client's."""
        return self.endpoint(info.host, info.amp_port).connect(Factory.forProtocol(PeerAMP))

    def endpoint(self, host: str, port: int) -> FakeEndpoint:
        return FakeEndpoint(self, (host, port))

    def flush(self) -> None:
        """Deliver bytes on every connection that is not hung until none move."""
        for _ in range(1000):
            moved = False
            for address, pump in list(self.pumps):
                if address not in self.hung and pump.pump():
                    moved = True
            if not moved:
                return
        raise AssertionError("the connections never went quiet")

    def disconnect(self, address: Address) -> None:
        """Close every connection to C{address} from the server's side."""
        for a, pump in self.pumps:
            if a == address:
                pump.serverIO.loseConnection()
        self.flush()

    def commands(self, name: str, address: Address | None = None) -> list[tuple[Address, float]]:
        return [(a, t) for a, t, n in self.received
                if n == name and (address is None or a == address)]

    def close(self) -> None:
        for node in self.nodes.values():
            if node.stores is not None:
                node.stores.close()


def drive(network: FakeNetwork, d: Deferred[Any], max_steps: int = 10_000) -> Any:
    """Pump, then jump the clock to the next scheduled call, until C{d} fires; its result.

    Raises what C{d} failed with.
    """
    clock = network.clock
    for _ in range(max_steps):
        network.flush()
        if d.called:
            break
        calls = clock.getDelayedCalls()
        if not calls:
            raise AssertionError("nothing is scheduled and the Deferred has not fired")
        clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))
    else:
        raise AssertionError(f"the Deferred did not fire within {max_steps} steps")
    return result_of(d)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a fired Deferred, raising its failure."""
    assert d.called, "the Deferred has not fired"
    results: list[Any] = []
    d.addBoth(results.append)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


# -- the tests ----------------------------------------------------------------------------------

HOST = "127.0.0.1"


def node_info(i: int) -> NodeInfo:
    return NodeInfo(f"n{i}", HOST, 50000 + i, 51000 + i)


def amp(info: NodeInfo) -> Address:
    return (info.host, info.amp_port)


class ScriptedRandom:
    """Hands out the given jitter fractions in order, and counts them."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.used = 0

    def random(self) -> float:
        value = self.values[self.used]
        self.used += 1
        return value


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def net(clock: Clock, tmp_path: Any) -> Any:
    network = FakeNetwork(clock, tmp_path)
    yield network
    network.close()


def make_store(net: FakeNetwork, addresses: list[Address], **knobs: Any) -> KVStore:
    knobs.setdefault("random", random.Random(1))
    return KVStore(net.clock, addresses, endpoint_factory=net.endpoint, **knobs)


def standalone(net: FakeNetwork) -> tuple[KVNode, Address]:
    node = net.add_node(node_info(0))
    return node, amp(node.me)


def key_headed_by(ring: Ring, name: str) -> bytes:
    """A key whose chain in C{ring} starts at C{name}."""
    for i in range(10_000):
        key = b"k%d" % i
        if ring.head(key).name == name:
            return key
    raise AssertionError(f"no key is headed by {name}")


# -- the basic API ------------------------------------------------------------------------------

def test_put_get_delete_round_trip_with_str_and_bytes(net: FakeNetwork) -> None:
    node, address = standalone(net)
    store = make_store(net, [address])
    assert drive(net, store.put("greeting", "héllo")) is False
    assert drive(net, store.put(b"greeting", b"hello")) is True
    assert drive(net, store.get("greeting")) == b"hello"
    assert node.stores["coordinator"].get(b"greeting") == b"hello"
    assert drive(net, store.delete("greeting")) is None
    with pytest.raises(KeyNotFound):
        drive(net, store.get("greeting"))
    with pytest.raises(KeyNotFound):
        drive(net, store.delete(b"greeting"))
    assert drive(net, store.put("v", "héllo")) is False
    assert drive(net, store.get("v")) == "héllo".encode("utf-8")


def test_key_not_found_surfaces_at_once_without_retry(net: FakeNetwork) -> None:
    _, address = standalone(net)
    store = make_store(net, [address])
    with pytest.raises(KeyNotFound):
        drive(net, store.get("missing"))
    assert len(net.commands("Get")) == 1
    assert net.clock.getDelayedCalls() == []
    assert net.clock.seconds() == 0


def test_values_of_120000_bytes_round_trip_over_amp(net: FakeNetwork) -> None:
    node, address = standalone(net)
    store = make_store(net, [address])
    value = random.Random(3).randbytes(MAX_VALUE_BYTES)
    assert drive(net, store.put("big", value)) is False
    assert node.stores["coordinator"].get(b"big") == value
    assert drive(net, store.get("big")) == value


def test_invalid_keys_and_values_fail_without_a_round_trip(net: FakeNetwork) -> None:
    _, address = standalone(net)
    store = make_store(net, [address])
    cases = [
        (store.put("k" * 21, "v"), InvalidKey),
        (store.put("a b", "v"), InvalidKey),
        (store.put("clé", "v"), InvalidKey),
        (store.get(""), InvalidKey),
        (store.delete(b"tab\there"), InvalidKey),
        (store.put("k", b"x" * (MAX_VALUE_BYTES + 1)), ValueTooLarge),
    ]
    for d, error in cases:
        # Already failed: no pumping, no clock, no server involved.
        assert d.called
        with pytest.raises(error):
            result_of(d)
    assert sum(net.connects.values()) == 0
    assert net.received == []


def test_keyrange_keyrange_read_and_stats(net: FakeNetwork) -> None:
    node, address = standalone(net)
    store = make_store(net, [address])
    assert drive(net, store.keyrange()) == node.ring.keyrange_text()
    assert drive(net, store.keyrange_read()) == node.ring.keyrange_read_text()
    drive(net, store.put("a", "1"))
    stats = drive(net, store.stats())
    assert stats["name"] == "n0" and stats["puts"] == 1


# -- connections --------------------------------------------------------------------------------

def test_one_connection_serves_many_requests_and_one_ring_fetch(net: FakeNetwork) -> None:
    _, address = standalone(net)
    store = make_store(net, [address])
    # Twenty requests at once, before any byte moved: they share one connect and one fetch.
    pending = [store.put(f"key{i}", f"value{i}") for i in range(20)]
    for d in pending:
        assert drive(net, d) is False
    for i in range(100):
        assert drive(net, store.get(f"key{i % 20}")) == b"value%d" % (i % 20)
    assert net.connects[address] == 1
    assert len(net.commands("GetMetadata")) == 1
    assert len(net.commands("Put")) == 20 and len(net.commands("Get")) == 100


def test_a_dropped_connection_is_reopened_on_next_use(net: FakeNetwork) -> None:
    _, address = standalone(net)
    store = make_store(net, [address])
    drive(net, store.put("a", "1"))
    net.disconnect(address)
    assert drive(net, store.get("a")) == b"1"
    assert net.connects[address] == 2
    # Reopening needed no back-off: the closed connection was forgotten when it closed.
    assert net.clock.seconds() == 0


def test_close_closes_connections_and_refuses_later_requests(net: FakeNetwork) -> None:
    node, address = standalone(net)
    store = make_store(net, [address])
    drive(net, store.put("a", "1"))
    server_io = net.pumps[0][1].serverIO
    closed = store.close()
    assert not closed.called
    net.flush()
    assert closed.called and result_of(closed) is None
    assert server_io.disconnected
    with pytest.raises(ClientClosed):
        result_of(store.get("a"))


def test_the_text_console_is_recognised_and_named(net: FakeNetwork) -> None:
    _, address = standalone(net)
    net.consoles.add(address)
    store = make_store(net, [address])
    with pytest.raises(WrongProtocol, match="text console.*not its AMP port"):
        drive(net, store.refresh_metadata())
    with pytest.raises(WrongProtocol):
        drive(net, store.put("a", "1"))
    # Not retried: a wrong port does not get right by waiting.
    assert net.clock.seconds() == 0


# -- routing and the ring -----------------------------------------------------------------------

def three_node_ring(net: FakeNetwork, replication: int = 3, epoch: int = 1) -> Ring:
    infos = [node_info(i) for i in range(3)]
    ring = Ring(tuple(infos), epoch=epoch, replication=replication)
    for info in infos:
        net.add_node(info, ring=ring)
    return ring


def test_writes_go_to_the_head_and_reads_to_the_tail(net: FakeNetwork) -> None:
    ring = three_node_ring(net)
    store = make_store(net, [amp(ring.nodes[0])], read_policy="tail")
    keys = [key_headed_by(ring, n.name) for n in ring.nodes]
    metadata_fetches = 0
    for key in keys:
        head, tail = ring.head(key), ring.tail(key)
        assert head != tail
        assert drive(net, store.put(key, b"v-" + key)) is False
        for address, node in net.nodes.items():
            held = node.stores["coordinator"].get(key)
            assert held == (b"v-" + key if address == amp(head) else None)
        # The chain, not the client, carried the write to the tail's replica2 store.
        assert net.nodes[amp(tail)].stores[STORE_NAMES[2]].get(key) == b"v-" + key
        assert drive(net, store.get(key)) == b"v-" + key
        drive(net, store.delete(key))
        # Each request went straight to the right server: no refusal, no second attempt.
        client_commands = {"Put", "Get", "Delete"}
        assert [(a, n) for a, _, n in net.received if n in client_commands] == [
            (amp(head), "Put"), (amp(tail), "Get"), (amp(head), "Delete")]
        metadata_fetches += len(net.commands("GetMetadata"))
        net.received.clear()
    assert {amp(ring.head(k)) for k in keys} == set(net.nodes)
    assert metadata_fetches == 1


def test_reads_are_spread_over_every_member_of_the_chain_by_default(net: FakeNetwork) -> None:
    ring = three_node_ring(net)
    store = make_store(net, [amp(ring.nodes[0])])
    assert store.read_policy == "any"
    key = key_headed_by(ring, "n1")
    drive(net, store.put(key, b"v"))
    net.received.clear()
    for i in range(60):
        assert drive(net, store.get(key)) == b"v"
        if i % 10 == 0:
            drive(net, store.put(key, b"v"))  # a write in flight now and then
    readers = Counter(a for a, _, n in net.received if n == "Get")
    # Each member answered (no refusal, so no second attempt) and none took most of them.
    assert set(readers) == {amp(n) for n in ring.chain(key)}
    assert sum(readers.values()) == 60 and max(readers.values()) < 35
    # A member we could not reach lately is asked only when every other one is too.
    net.down.add(amp(ring.chain(key)[0]))
    net.disconnect(amp(ring.chain(key)[0]))
    for _ in range(20):
        assert drive(net, store.get(key)) == b"v"
    with pytest.raises(ValueError):
        make_store(net, [amp(ring.nodes[0])], read_policy="head")


def test_a_member_that_hung_is_read_from_again_once_it_answers(net: FakeNetwork) -> None:
    # A client that only reads never reconnects to a member it gave up on by itself: the
    # suspicion must end, or that member's share of the reads stays on the others for good.
    ring = three_node_ring(net)
    store = make_store(net, [amp(ring.nodes[0])], timeout=1.0, deadline=30.0)
    keys = [b"key%d" % i for i in range(30)]
    for key in keys:
        drive(net, store.put(key, b"v"))
    victim = ring.nodes[1]
    mine = [k for k in keys
            if ring.chain(k)[position(k) % len(ring.chain(k))].name == victim.name]
    assert mine
    net.hung.add(amp(victim))
    assert drive(net, store.get(mine[0])) == b"v"  # timed out there, answered elsewhere
    net.hung.discard(amp(victim))
    net.flush()  # (the Get that timed out reaches it now)
    net.received.clear()
    for key in mine:
        assert drive(net, store.get(key)) == b"v"
    assert amp(victim) not in {a for a, _, n in net.received if n == "Get"}
    net.clock.advance(kvstore.SUSPECT_SECONDS)
    net.received.clear()
    for key in mine:
        assert drive(net, store.get(key)) == b"v"
    assert [a for a, _, n in net.received if n == "Get"] == [amp(victim)] * len(mine)


def test_keys_read_now_and_then_each_go_to_the_one_member_their_position_names(
        net: FakeNetwork) -> None:
    # So each member reads, and caches, a third of its ranges' keys (client/readers.py).
    ring = three_node_ring(net)
    store = make_store(net, [amp(ring.nodes[0])])
    keys = [b"key%d" % i for i in range(30)]
    for key in keys:
        drive(net, store.put(key, b"v"))
    places = Counter()
    for _ in range(2):
        for key in keys:
            net.received.clear()
            assert drive(net, store.get(key)) == b"v"
            chain = ring.chain(key)
            member = chain[position(key) % len(chain)]
            assert [a for a, _, n in net.received if n == "Get"] == [amp(member)]
            places[chain.index(member)] += 1
    assert set(places) == {0, 1, 2}


def test_not_responsible_refreshes_the_ring_and_retries_at_once(net: FakeNetwork) -> None:
    infos = [node_info(i) for i in range(3)]
    old = Ring(tuple(infos[:2]), epoch=1, replication=1)
    for info in infos[:2]:
        net.add_node(info, ring=old)
    store = make_store(net, [amp(infos[0])])
    assert drive(net, store.refresh_metadata()) == old
    # A third server joins: some keys change heads. Every server learns the new ring.
    new = Ring(tuple(infos), epoch=2, replication=1)
    net.add_node(infos[2], ring=new)
    for node in net.nodes.values():
        node.ring = new
    key = next(b"k%d" % i for i in range(10_000)
               if new.head(b"k%d" % i).name == "n2" and old.head(b"k%d" % i).name == "n1")
    net.received.clear()
    assert drive(net, store.put(key, b"moved")) is False
    assert [a for a, _ in net.commands("Put")] == [amp(infos[1]), amp(infos[2])]
    # The ring came from the server that refused, which knows the newer one.
    assert [a for a, _ in net.commands("GetMetadata")] == [amp(infos[1])]
    assert store.ring is not None and store.ring.epoch == 2
    assert net.nodes[amp(infos[2])].stores["coordinator"].get(key) == b"moved"
    assert net.clock.seconds() == 0


def test_not_responsible_forever_backs_off_after_max_refreshes_and_gives_up_at_the_deadline(
        net: FakeNetwork) -> None:
    node, address = standalone(net)
    sent: list[float] = []

    def refuse(key: bytes, value: bytes, request_id: bytes = b"") -> Any:
        sent.append(net.clock.seconds())
        raise NotResponsible("confused server")

    node.put = refuse  # type: ignore[method-assign]
    store = make_store(net, [address], max_refreshes=3, deadline=5.0)
    with pytest.raises(NotResponsible):
        drive(net, store.put("a", "1"))
    # Four at once (the first and three refreshes), then backed off, never past the deadline.
    assert sent[:4] == [0, 0, 0, 0] and len(sent) > 5
    assert all(b > a for a, b in zip(sent[4:], sent[5:])) and sent[-1] <= 5.0
    assert len(net.commands("GetMetadata")) == len(sent)


def test_a_new_tail_waiting_for_its_read_lease_is_retried_until_it_has_one(
        net: FakeNetwork) -> None:
    node, address = standalone(net)
    real_get = node.get
    refusals = iter(range(8))

    def get(key: bytes) -> Any:
        if next(refusals, None) is not None:
            raise NotResponsible("server0 holds no read lease for this key's range")
        return real_get(key)

    drive(net, make_store(net, [address]).put("a", "1"))
    node.get = get  # type: ignore[method-assign]
    assert drive(net, make_store(net, [address], max_refreshes=3).get("a")) == b"1"


def n0_heads_a_stored_key(net: FakeNetwork) -> tuple[list[NodeInfo], KVStore, bytes]:
    """Two servers, chains of one; a client that knows n0 has put a key n0 heads."""
    infos = [node_info(i) for i in range(2)]
    old = Ring(tuple(infos), epoch=1, replication=1)
    for info in infos:
        net.add_node(info, ring=old)
    store = make_store(net, [amp(infos[0])])
    key = key_headed_by(old, "n0")
    drive(net, store.put(key, b"1"))
    return infos, store, key


def test_a_refused_connection_learns_the_ring_from_another_server(net: FakeNetwork) -> None:
    infos, store, key = n0_heads_a_stored_key(net)
    # n0 dies; the ECS gives its range to n1 (the data move is not the client's business).
    net.down.add(amp(infos[0]))
    net.disconnect(amp(infos[0]))
    net.nodes[amp(infos[1])].ring = Ring((infos[1],), epoch=2, replication=1)
    net.received.clear()
    assert drive(net, store.put(key, b"2")) is False
    assert net.nodes[amp(infos[1])].stores["coordinator"].get(key) == b"2"
    assert [a for a, _ in net.commands("GetMetadata")] == [amp(infos[1])]
    # The refresh asked n1 first: n0 was tried once (the refused put), not again for the ring.
    assert net.connects[amp(infos[0])] == 2
    assert store.ring is not None and store.ring.epoch == 2
    # One back-off between the refused connect and the retry, within the first cap.
    assert 0 < net.clock.seconds() < store.backoff_base


def test_a_server_whose_storage_failed_is_left_for_the_ring_another_server_knows(
        net: FakeNetwork) -> None:
    # It answers ServerError to everything until restarted and never hears of the ring the
    # ECS makes without it: raising at once left every key it headed failing for good.
    infos, store, key = n0_heads_a_stored_key(net)
    failed = net.nodes[amp(infos[0])]
    failed.storage_failed(failed.stores["coordinator"], "disk I/O error")
    with pytest.raises(ServerError):
        drive(net, make_store(net, [amp(infos[0])], deadline=1.0).get(key))
    # The ECS repairs it away: n1 heads the whole ring (the data move is not the client's).
    net.nodes[amp(infos[1])].stores["coordinator"].put(key, b"1")
    net.nodes[amp(infos[1])].ring = Ring((infos[1],), epoch=2, replication=1)
    net.received.clear()
    assert drive(net, store.put(key, b"2")) is True
    assert net.nodes[amp(infos[1])].stores["coordinator"].get(key) == b"2"
    assert [a for a, _ in net.commands("GetMetadata")] == [amp(infos[1])]
    assert store.ring is not None and store.ring.epoch == 2


def test_a_bootstrap_address_that_is_down_is_skipped(net: FakeNetwork) -> None:
    _, address = standalone(net)
    store = make_store(net, [(HOST, 9), address])
    assert drive(net, store.put("a", "1")) is False
    assert net.connects[(HOST, 9)] == 1


def test_an_unreachable_cluster_raises_the_last_error_at_the_deadline(net: FakeNetwork) -> None:
    from twisted.internet.error import ConnectionRefusedError as Refused

    store = make_store(net, [(HOST, 9)], deadline=3.0, backoff_max=0.5)
    with pytest.raises(Refused):
        drive(net, store.get("a"))
    assert net.clock.seconds() <= 3.0
    assert net.connects[(HOST, 9)] > 5


# -- back-off -----------------------------------------------------------------------------------

def test_server_stopped_backs_off_exponentially_with_full_jitter(net: FakeNetwork) -> None:
    node, address = standalone(net)
    node.state = STOPPED
    jitter = ScriptedRandom([0.5, 0.9, 0.1, 0.7, 0.3, 0.99, 0.6])
    store = make_store(net, [address], backoff_base=0.05, backoff_max=0.4, random=jitter)
    net.clock.callLater(0.9, setattr, node, "state", RUNNING)
    assert drive(net, store.put("a", "1")) is False
    arrivals = [t for _, t in net.commands("Put")]
    delays = [b - a for a, b in zip(arrivals, arrivals[1:])]
    caps = [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    expected = [f * cap for f, cap in zip(jitter.values, caps)]
    assert delays == pytest.approx(expected)
    assert jitter.used == 6
    assert node.stores["coordinator"].get(b"a") == b"1"


def test_backoff_delays_stay_within_growing_caps_until_the_deadline(net: FakeNetwork) -> None:
    node, address = standalone(net)
    node.state = STOPPED
    store = make_store(net, [address], deadline=5.0, backoff_base=0.05, backoff_max=0.5,
                       random=random.Random(7))
    with pytest.raises(ServerStopped):
        drive(net, store.get("a"))
    arrivals = [t for _, t in net.commands("Get")]
    delays = [b - a for a, b in zip(arrivals, arrivals[1:])]
    caps = [min(0.5, 0.05 * 2 ** i) for i in range(len(delays))]
    assert len(delays) >= 10 and caps[-1] == 0.5
    assert all(0 <= d < cap for d, cap in zip(delays, caps))
    # Jittered, not fixed: delays under the same cap differ, and some are well under it.
    assert len({round(d, 9) for d in delays[4:]}) == len(delays[4:])
    assert any(d < 0.5 * cap for d, cap in zip(delays, caps))
    # It gave up before the deadline rather than sleeping past it.
    assert arrivals[-1] <= net.clock.seconds() <= 5.0


def test_write_locked_is_retried_until_the_lock_is_gone(net: FakeNetwork) -> None:
    node, address = standalone(net)
    real_put, refusals = node.put, [2]

    def locked_twice(key: bytes, value: bytes, request_id: bytes = b"") -> Any:
        if refusals[0]:
            refusals[0] -= 1
            raise WriteLocked("moving")
        return real_put(key, value, request_id)

    node.put = locked_twice  # type: ignore[method-assign]
    store = make_store(net, [address])
    assert drive(net, store.put("a", "1")) is False
    assert len(net.commands("Put")) == 3
    assert node.stores["coordinator"].get(b"a") == b"1"


# -- timeouts -----------------------------------------------------------------------------------

def test_a_request_without_answer_times_out_and_the_next_one_reconnects(
        net: FakeNetwork) -> None:
    node, address = standalone(net)
    # A deadline with no room for a second attempt: the timeout is final.
    store = make_store(net, [address], timeout=3.0, deadline=5.0)
    drive(net, store.refresh_metadata())
    net.hung.add(address)
    d = store.put("a", "1")
    net.flush()
    net.clock.advance(2.999)
    net.flush()
    assert not d.called
    net.clock.advance(0.001)
    with pytest.raises(RequestTimedOut, match="may or may not have been applied"):
        result_of(d)
    # Not retried: one Put was sent (and never delivered), and nothing is scheduled.
    assert net.clock.getDelayedCalls() == []
    net.hung.discard(address)
    assert drive(net, store.put("b", "2")) is False
    assert net.connects[address] == 2


def test_a_read_from_a_hung_server_is_retried_on_the_new_ring(net: FakeNetwork) -> None:
    infos = [node_info(i) for i in range(2)]
    old = Ring(tuple(infos), epoch=1, replication=1)
    for info in infos:
        net.add_node(info, ring=old)
    store = make_store(net, [amp(infos[0]), amp(infos[1])], timeout=2.0, deadline=30.0)
    key = key_headed_by(old, "n0")
    drive(net, store.put(key, b"v"))
    # n0 hangs; the ECS moves its range (and data) to n1.
    net.hung.add(amp(infos[0]))
    new = Ring((infos[1],), epoch=2, replication=1)
    net.nodes[amp(infos[1])].stores["coordinator"].put(key, b"v")
    net.nodes[amp(infos[1])].ring = new
    assert drive(net, store.get(key)) == b"v"
    assert store.ring == new


def test_an_answer_box_that_never_ends_is_cut_off_at_the_cap() -> None:
    # AMP reads keys and values until the empty key that ends a box: a peer that sends pairs
    # for ever (not a chainstore server, or a hostile one) would grow the client's memory.
    import struct
    from twisted.internet.testing import StringTransport
    from client.kvstore import MAX_ANSWER_BOX, _ClientProtocol
    lost: list[Any] = []
    proto = _ClientProtocol(("127.0.0.1", 1), lost.append)
    transport = StringTransport()
    proto.makeConnection(transport)
    value = b"x" * 60_000
    pair = struct.pack("!H", 2) + b"k1" + struct.pack("!H", len(value)) + value
    sent = 0
    while sent <= MAX_ANSWER_BOX + len(pair) and not transport.disconnecting:
        proto.dataReceived(pair)
        sent += len(pair)
    assert transport.disconnecting and sent <= MAX_ANSWER_BOX + len(pair)
    proto.connectionLost(Failure(ConnectionDone()))
    assert lost == [proto] and "over" in str(proto._wrong)
