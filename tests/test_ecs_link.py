"""The server's end of the ECS link (ServerControlProtocol) over iosim, against a real KVNode.

The ECS side is a small AMP peer that records what the server sends and lets the test send
control commands; every box crosses the real AMP wire format.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from chainstore import control, migration
from chainstore.amp_server import KVServerProtocol
from chainstore.cache import make_cache
from chainstore.ecs_link import ServerControlProtocol
from chainstore.errors import NotResponsible, ServerStopped, WriteLocked
from chainstore.node import RUNNING, STOPPED, KVNode
from chainstore.ring import KeyRange, NodeInfo, Ring, position
from chainstore.storage import StoreSet

ME = NodeInfo("s1", "127.0.0.1", 6001, 7001)
PEER = NodeInfo("s2", "127.0.0.1", 6002, 7002)
HALF = 1 << 127


class RecordingECS(amp.AMP):
    """Accepts (or refuses) registrations and records progress reports."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.refuse = refuse
        self.registrations: list[dict[str, Any]] = []
        self.progress: list[tuple[int, int, int]] = []
        self.lost = False

    @control.Register.responder
    def register(self, **kwargs: Any) -> dict[str, Any]:
        self.registrations.append(kwargs)
        if self.refuse:
            raise control.RegistrationRefused("name taken")
        return {"message": "welcome"}

    @control.CopyProgress.responder
    def copy_progress(self, operation: int, keys: int, bytes: int) -> dict[str, Any]:
        self.progress.append((operation, keys, bytes))
        return {}

    def connectionLost(self, reason: Any) -> None:
        self.lost = True
        super().connectionLost(reason)


def make_node(tmp_path: Any, clock: Clock, me: NodeInfo, state: str = STOPPED) -> KVNode:
    node = KVNode(me, make_cache("LRU", 100), clock, state=state)
    node.stores = StoreSet.open(str(tmp_path / me.name))
    return node


class Link:
    """One server (KVNode + ServerControlProtocol) connected to a RecordingECS."""

    def __init__(self, tmp_path: Any, refuse: bool = False, connect_peer: Any = None) -> None:
        self.clock = Clock()
        self.node = make_node(tmp_path, self.clock, ME)
        self.shutdowns = 0
        self.ecs = RecordingECS(refuse)
        self.server = ServerControlProtocol(self.node, self.clock, self._shutdown,
                                            connect_peer=connect_peer)
        self.pumps: list[iosim.IOPump] = []
        _, _, pump = iosim.connectedServerAndClient(
            lambda: self.ecs, lambda: self.server, greet=False, clock=self.clock)
        self.pumps.append(pump)

    def _shutdown(self) -> None:
        self.shutdowns += 1

    def pump(self) -> None:
        for p in self.pumps:
            p.pump()

    def call(self, command: Any, limit: int = 10_000, **kwargs: Any) -> Any:
        """Send a control command from the ECS side; run until it is answered."""
        results: list[Any] = []
        self.ecs.callRemote(command, **kwargs).addBoth(results.append)
        for _ in range(limit):
            if results:
                break
            self.pump()
            self.clock.advance(0)
        assert results, f"{command.__name__} was never answered"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def close(self) -> None:
        self.node.stores.close()


@pytest.fixture
def link(tmp_path):
    lk = Link(tmp_path)
    lk.pump()
    yield lk
    lk.close()


def ring(*nodes: NodeInfo, epoch: int) -> Ring:
    return Ring(tuple(nodes), epoch=epoch, replication=1)


def wire(r: Ring) -> dict[str, Any]:
    return {"epoch": r.epoch, "replication": r.replication,
            "nodes": [{"name": n.name, "host": n.host, "console_port": n.console_port,
                       "amp_port": n.amp_port} for n in r.nodes]}


def result_of(d: Deferred[Any], clock: Clock | None = None) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    if not out and clock is not None:
        clock.advance(0)  # a write is committed and answered at the end of its reactor turn
    assert out, "not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_register_is_sent_on_connect_with_the_servers_addresses_and_epoch(link):
    assert link.ecs.registrations == [{"name": "s1", "host": "127.0.0.1", "console_port": 6001,
                                       "amp_port": 7001, "epoch": 0}]
    assert not link.ecs.lost


def test_a_refused_registration_drops_the_link(tmp_path):
    lk = Link(tmp_path, refuse=True)
    try:
        for _ in range(5):
            lk.pump()
        assert lk.ecs.registrations and lk.ecs.lost
    finally:
        lk.close()


def test_heartbeat_reports_epoch_and_state(link):
    answer = link.call(control.Heartbeat, epoch=5)
    assert (answer["epoch"], answer["state"]) == (0, STOPPED)
    link.call(control.SetMetadata, **wire(ring(ME, PEER, epoch=3)))
    link.call(control.SetState, state=RUNNING)
    answer = link.call(control.Heartbeat, epoch=3)
    assert (answer["epoch"], answer["state"]) == (3, RUNNING)
    # and its chains with their lag and window, for the ECS's status (chainstore.metrics)
    report = json.loads(answer["report"])
    assert ("s1", "head", 0, 0) in {(c["owner"], c["role"], c["lag"], c["window"])
                                    for c in report["chains"]}


def test_set_metadata_adopts_newer_rings_and_refuses_stale_ones(link):
    link.call(control.SetMetadata, **wire(ring(ME, PEER, epoch=4)))
    assert link.node.ring.epoch == 4
    assert {n.name for n in link.node.ring.nodes} == {"s1", "s2"}
    with pytest.raises(control.StaleEpoch, match="epoch 2 is older"):
        link.call(control.SetMetadata, **wire(ring(ME, epoch=2)))
    assert link.node.ring.epoch == 4 and len(link.node.ring) == 2
    assert not link.ecs.lost  # a declared error keeps the link up


def test_set_state_starts_and_stops_serving(link):
    with pytest.raises(ServerStopped):
        link.node.get(b"k")
    link.call(control.SetState, state=RUNNING)
    result_of(link.node.put(b"k", b"v"), link.clock)
    assert link.node.get(b"k") == b"v"
    link.call(control.SetState, state=STOPPED)
    with pytest.raises(ServerStopped):
        link.node.put(b"k", b"w")
    with pytest.raises(control.ControlFailed, match="unknown state 'paused'"):
        link.call(control.SetState, state="paused")
    assert link.node.state == STOPPED


def keys_in(rng: KeyRange, count: int, inside: bool = True) -> list[bytes]:
    found = []
    i = 0
    while len(found) < count:
        key = b"key%d" % i
        if (position(key) in rng) == inside:
            found.append(key)
        i += 1
    return found


def test_write_locks_refuse_writes_in_the_range_only_and_reads_go_on(link):
    link.call(control.SetState, state=RUNNING)
    low = KeyRange(0, HALF)
    inside, outside = keys_in(low, 3), keys_in(low, 3, inside=False)
    for key in inside + outside:
        result_of(link.node.put(key, b"old"), link.clock)
    link.call(control.LockRanges, ranges=[{"start": 0, "end": HALF}], reads=False)
    for key in inside:
        with pytest.raises(WriteLocked):
            link.node.put(key, b"new")
        with pytest.raises(WriteLocked):
            link.node.delete(key)
        assert link.node.get(key) == b"old"  # reads are still served
    for key in outside:
        result_of(link.node.put(key, b"new"), link.clock)
        assert link.node.get(key) == b"new"
    link.call(control.UnlockRanges, ranges=[{"start": 0, "end": HALF}], reads=False)
    result_of(link.node.put(inside[0], b"new"), link.clock)
    assert link.node.get(inside[0]) == b"new"
    assert link.node.write_locks == []


def test_read_locks_refuse_reads_in_the_range_for_the_switch(link):
    link.call(control.SetState, state=RUNNING)
    high = KeyRange(HALF, 0)
    key, other = keys_in(high, 1)[0], keys_in(high, 1, inside=False)[0]
    result_of(link.node.put(key, b"v"), link.clock)
    result_of(link.node.put(other, b"w"), link.clock)
    link.call(control.LockRanges, ranges=[{"start": HALF, "end": 0}], reads=True)
    with pytest.raises(NotResponsible):
        link.node.get(key)
    assert link.node.get(other) == b"w"
    link.call(control.UnlockRanges, ranges=[{"start": HALF, "end": 0}], reads=True)
    assert link.node.get(key) == b"v"


def test_unlocking_a_range_that_is_not_locked_changes_nothing(link):
    link.call(control.LockRanges, ranges=[{"start": 1, "end": 2}], reads=False)
    link.call(control.UnlockRanges, ranges=[{"start": 3, "end": 4}], reads=False)
    assert link.node.write_locks == [KeyRange(1, 2)]


def test_a_new_ring_clears_the_locks_of_the_reconfiguration_it_completes(link):
    link.call(control.LockRanges, ranges=[{"start": 1, "end": 2}], reads=False)
    link.call(control.LockRanges, ranges=[{"start": 1, "end": 2}], reads=True)
    link.call(control.SetMetadata, **wire(ring(ME, epoch=7)))
    assert link.node.write_locks == [] and link.node.read_locks == []


def relink(lk: Link) -> RecordingECS:
    """Drop the server's ECS link and connect it to the ECS again, as its ClientService does
    (the node, and what it holds, stay)."""
    lk.server.connectionLost(Failure(ConnectionLost("the ECS link dropped")))
    lk.ecs = RecordingECS()
    lk.server = ServerControlProtocol(lk.node, lk.clock, lk._shutdown)
    _, _, pump = iosim.connectedServerAndClient(
        lambda: lk.ecs, lambda: lk.server, greet=False, clock=lk.clock)
    lk.pumps = [pump]
    lk.pump()
    return lk.ecs


def test_locks_outlive_the_link_that_set_them_until_the_ecs_gives_the_ring_again(link):
    """An old tail whose link drops between the switch's read lock and the new ring must not
    read again: the change may have committed. It did here not (the ring stays at its epoch):
    the ECS's ring over the new link, the same epoch, lifts the orphaned locks."""
    key = next(k for k in (b"k%d" % i for i in range(100)) if position(k) > HALF)
    link.call(control.SetMetadata, **wire(ring(ME, epoch=3)))
    link.call(control.SetState, state=RUNNING)
    result_of(link.node.put(key, b"v"), link.clock)
    link.call(control.LockRanges, ranges=[{"start": HALF, "end": 0}], reads=False)
    link.call(control.LockRanges, ranges=[{"start": HALF, "end": 0}], reads=True)
    relink(link)
    assert link.ecs.registrations  # registered again
    with pytest.raises(NotResponsible):
        link.node.get(key)
    with pytest.raises(WriteLocked):
        link.node.put(key, b"w")
    # the new link cannot unlock what the dropped one locked: only the ring does
    link.call(control.UnlockRanges, ranges=[{"start": HALF, "end": 0}], reads=True)
    with pytest.raises(NotResponsible):
        link.node.get(key)
    link.call(control.SetMetadata, **wire(ring(ME, epoch=3)))
    assert link.node.get(key) == b"v"
    assert link.node.write_locks == [] and link.node.read_locks == []
    assert link.node.orphaned_locks == []


def test_the_ring_over_a_new_link_keeps_that_links_own_locks(link):
    """A change running on the new link may lock before the ECS's ring reaches the server:
    only the dropped link's locks go, even where the ranges are equal."""
    link.call(control.SetMetadata, **wire(ring(ME, epoch=3)))
    link.call(control.LockRanges, ranges=[{"start": 1, "end": 2}], reads=True)
    relink(link)
    link.call(control.LockRanges, ranges=[{"start": 1, "end": 2}], reads=True)
    link.call(control.LockRanges, ranges=[{"start": 5, "end": 6}], reads=False)
    assert link.node.read_locks == [KeyRange(1, 2), KeyRange(1, 2)]
    link.call(control.SetMetadata, **wire(ring(ME, epoch=3)))
    assert link.node.read_locks == [KeyRange(1, 2)]
    assert link.node.write_locks == [KeyRange(5, 6)]
    link.call(control.UnlockRanges, ranges=[{"start": 1, "end": 2}], reads=True)
    link.call(control.UnlockRanges, ranges=[{"start": 5, "end": 6}], reads=False)
    assert link.node.read_locks == [] and link.node.write_locks == []


def test_a_newer_ring_lifts_the_locks_of_a_dropped_link_too(link):
    link.call(control.SetMetadata, **wire(ring(ME, epoch=3)))
    link.call(control.LockRanges, ranges=[{"start": 1, "end": 2}], reads=True)
    relink(link)
    link.call(control.LockRanges, ranges=[{"start": 3, "end": 4}], reads=False)
    link.call(control.SetMetadata, **wire(ring(ME, epoch=4)))
    assert link.node.read_locks == [] and link.node.write_locks == []
    assert link.node.orphaned_locks == [] and link.server._locks == []


def test_clear_stores_empties_all_three_and_the_cache(link):
    link.call(control.SetState, state=RUNNING)
    result_of(link.node.put(b"k", b"v"), link.clock)
    link.node.get(b"k")  # fills the cache
    for name in ("replica1", "replica2"):
        link.node.stores[name].put(b"r", b"x")
    link.call(control.ClearStores)
    assert [len(s) for s in link.node.stores.stores.values()] == [0, 0, 0]
    assert len(link.node.cache) == 0


def test_move_local_and_drop_range_over_the_link(link):
    stores = link.node.stores
    migration.write_batch(stores["replica1"], [(b"k%d" % i, b"v") for i in range(50)])
    expected = {b"k%d" % i for i in range(50) if position(b"k%d" % i) in KeyRange(0, HALF)}
    moved = link.call(control.MoveLocal, source="replica1", target="coordinator", start=0,
                      end=HALF)
    assert moved == {"keys": len(expected)}
    assert {k for k, _ in stores["coordinator"].items()} == expected
    dropped = link.call(control.DropRange, store="replica1", start=0, end=HALF)
    assert dropped == {"keys": len(expected)}
    assert {k for k, _ in stores["replica1"].items()} == {b"k%d" % i for i in range(50)} - expected


def test_an_unknown_store_is_a_clear_error_and_keeps_the_link(link):
    with pytest.raises(control.ControlFailed, match="unknown store"):
        link.call(control.DropRange, store="replica7", start=0, end=1)
    assert not link.ecs.lost
    assert link.call(control.Heartbeat, epoch=0)["epoch"] == 0


def test_commands_needing_stores_fail_clearly_when_they_are_closed(link):
    stores, link.node.stores = link.node.stores, None
    try:
        with pytest.raises(control.ControlFailed, match="stores are not open"):
            link.call(control.ClearStores)
    finally:
        link.node.stores = stores
    assert not link.ecs.lost


def test_shutdown_stops_serving_then_calls_the_shutdown_callable_after_a_delay(link):
    link.call(control.SetState, state=RUNNING)
    link.call(control.Shutdown)
    assert link.node.state == STOPPED
    assert link.shutdowns == 0  # the answer must leave before the process ends
    link.clock.advance(0.05)
    assert link.shutdowns == 0
    link.clock.advance(0.1)
    assert link.shutdowns == 1


class PeerNetwork:
    """Connects a copy's source to a target KVNode through iosim; can refuse or cut."""

    def __init__(self, link: Link, target: KVNode) -> None:
        self.link, self.target = link, target
        self.refuse = False
        self.cut_after: int | None = None
        self.received = 0

    def connect(self, host: str, port: int) -> Deferred[amp.AMP]:
        assert (host, port) == (self.target.me.host, self.target.me.amp_port)
        if self.refuse:
            return fail(ConnectionRefusedError(f"{host}:{port}"))
        network = self

        class Target(KVServerProtocol):
            @control.ReceiveRange.responder
            def receive_range(self, **kwargs: Any) -> dict[str, Any]:
                if network.cut_after is not None and network.received >= network.cut_after:
                    # the target dies in the middle of the copy
                    self.transport.loseConnection()
                    return Deferred()  # type: ignore[return-value]
                network.received += 1
                return super().receive_range(**kwargs)

        client, _server, pump = iosim.connectedServerAndClient(
            lambda: Target(self.target), amp.AMP, greet=False, clock=self.link.clock)
        self.link.pumps.append(pump)
        return succeed(client)


@pytest.fixture
def copy_setup(tmp_path):
    holder: dict[str, Any] = {}
    lk = Link(tmp_path, connect_peer=lambda h, p: holder["net"].connect(h, p))
    target = make_node(tmp_path, lk.clock, PEER)
    net = holder["net"] = PeerNetwork(lk, target)
    lk.pump()
    migration.write_batch(lk.node.stores["coordinator"],
                          [(b"k%04d" % i, b"v" * 100) for i in range(2500)])
    yield lk, target, net
    target.stores.close()
    lk.close()


def copy_args(epoch: int = 1) -> dict[str, Any]:
    return {"operation": 7, "store": "coordinator", "start": HALF, "end": 0,
            "target_host": PEER.host, "target_port": PEER.amp_port,
            "target_store": "replica1", "epoch": epoch}


def test_copy_range_streams_to_the_peer_and_reports_progress(copy_setup):
    lk, target, _net = copy_setup
    result = lk.call(control.CopyRange, **copy_args())
    expected = {k for k, _ in lk.node.stores["coordinator"].items() if position(k) > HALF}
    assert result["keys"] == len(expected) > migration.BATCH_KEYS
    assert {k for k, _ in target.stores["replica1"].items()} == expected
    lk.pump()
    assert lk.ecs.progress and lk.ecs.progress[-1] == (7, result["keys"], result["bytes"])


def test_a_copy_to_an_unreachable_peer_fails_clearly_and_keeps_the_link(copy_setup):
    lk, _target, net = copy_setup
    net.refuse = True
    with pytest.raises(control.ControlFailed, match="cannot reach 127.0.0.1:7002"):
        lk.call(control.CopyRange, **copy_args())
    assert not lk.ecs.lost


def test_a_copy_whose_peer_dies_fails_clearly_and_keeps_the_link(copy_setup):
    lk, _target, net = copy_setup
    net.cut_after = 1
    with pytest.raises(control.ControlFailed, match="127.0.0.1:7002"):
        lk.call(control.CopyRange, **copy_args())
    # The ECS must still be able to unlock this server: the link stays up.
    assert not lk.ecs.lost
    assert lk.call(control.Heartbeat, epoch=0)["state"] == STOPPED
    assert not lk.node.stores["coordinator"].lock.locked


def test_a_copy_for_a_stale_epoch_is_refused_by_the_peer(copy_setup):
    lk, target, _net = copy_setup
    target.set_ring(ring(PEER, epoch=5))
    with pytest.raises(control.StaleEpoch):
        lk.call(control.CopyRange, **copy_args(epoch=5))
    assert len(target.stores["replica1"]) == 0
    assert not lk.ecs.lost
