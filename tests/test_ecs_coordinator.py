"""The ECS state machine with real server-side objects and no sockets.

A L{Cluster} holds a real L{ECS} (a Clock, a StateFile in tmp_path, a fake launcher that "starts"
a server by building it in memory) and, per server, a real KVNode on SQLite stores with a
ServerControlProtocol connected to the ECS's ECSProtocol through iosim. Server-to-server copies
go through iosim too, into a real KVServerProtocol. Bytes move only when the test pumps and time
only when it advances the Clock, so heartbeats, timeouts and the steps of a reconfiguration are
deterministic. A "hung" server's connections are no longer pumped (a SIGSTOP or a partition); a
"dropped" one loses its connection (a SIGKILL, as the ECS sees it).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim

from chainstore import control
from chainstore.amp_server import KVServerProtocol
from chainstore.cache import make_cache
from chainstore.chain import LEASE_SECONDS
from chainstore.ecs_link import COPY_BATCH_TIMEOUT, ServerControlProtocol
from chainstore.errors import KeyNotFound, WriteLocked
from chainstore.node import RUNNING, STOPPED, KVNode
from chainstore.ring import RING_BITS, KeyRange, NodeInfo, Ring, position
from chainstore.storage import STORE_NAMES, StoreSet
from ecs import reconfiguration
from ecs.config import ECSConfig, NodeSlot
from ecs.coordinator import ECS
from ecs.protocol import AdminError
from ecs.server import ECSProtocol
from ecs.state import ACTIVE, FAILED, REMOVED, StateFile

INTERVAL, TIMEOUT = 1.0, 3.0
ECS_LINK = "(ECS link)"  # tags the pumps of servers' links to the ECS


def pool(count: int) -> tuple[NodeSlot, ...]:
    return tuple(NodeSlot(f"s{i}", "127.0.0.1", 6000 + i, 7000 + i, f"data/s{i}")
                 for i in range(1, count + 1))


class Server:
    """One in-memory KVServer: a KVNode on real stores and its control link's protocol."""

    def __init__(self, cluster: Cluster, slot: NodeSlot) -> None:
        self.slot = slot
        self.name = slot.name
        me = NodeInfo(slot.name, slot.host, slot.console_port, slot.amp_port)
        # Chain links between servers go over iosim too, like the ECS's copies.
        self.node = KVNode(me, make_cache("LRU", 50), cluster.clock, state=STOPPED,
                           connect=lambda info: cluster.connect_peer(info.host, info.amp_port))
        self.node.stores = StoreSet.open(str(cluster.tmp_path / slot.name))
        self.shutdowns = 0
        self.control: ServerControlProtocol | None = None

    def keys(self, store: str = "coordinator") -> set[bytes]:
        return {k for k, _ in self.node.stores[store].items()}

    def shutdown(self) -> None:
        self.shutdowns += 1


class FakeLauncher:
    """Records launches; with C{auto_start} a launched slot comes up at once (in memory)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.auto_start = True
        self.launched: list[str] = []
        self.stopped: list[str] = []

    def launch(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> None:
        self.launched.append(slot.name)
        if self.auto_start:
            self.cluster.start_server(slot)

    def stop(self, name: str) -> Deferred[None]:
        self.stopped.append(name)
        return succeed(None)

    def stop_all(self) -> Deferred[None]:
        return succeed(None)


class Cluster:
    def __init__(self, tmp_path: Any, replication: int = 1, initial: int = 3,
                 slots: int = 6, placement: str = "hash") -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        # "hash" by default: most tests below predict a join's moves from the slots' addresses.
        self.config = ECSConfig(
            heartbeat_interval=INTERVAL, failure_timeout=TIMEOUT, replication=replication,
            initial_nodes=initial, register_timeout=5.0, nodes=pool(slots), placement=placement,
            state_file=str(tmp_path / "ecs" / "state.json")).validated()
        self.launcher = FakeLauncher(self)
        self.servers: dict[str, Server] = {}
        # (names of the servers at either end, pump); a hung server's pumps stand still
        self.pumps: list[tuple[frozenset[str], iosim.IOPump]] = []
        self.hung: set[str] = set()
        # servers whose ECS link stands still (they still talk to each other)
        self.cut_from_ecs: set[str] = set()
        self.peer_gate: Deferred[None] | None = None
        self.cut_copies_to: set[str] = set()
        self.hang_copies_to: set[str] = set()
        # every coordinator made (a restart makes another), stopped by close()
        self.made: list[ECS] = []
        self.ecs = self.new_ecs()

    def new_ecs(self) -> ECS:
        return self.own(ECS(self.config, self.clock, self.launcher,
                            StateFile(self.config.state_file)))

    def own(self, ecs: ECS) -> ECS:
        """Stop C{ecs} at close(): work it left under way would otherwise be ended by the
        garbage collector, during a later test."""
        self.made.append(ecs)
        return ecs

    # -- servers and connections -----------------------------------------------------------------

    def start_server(self, slot: NodeSlot) -> Server:
        old = self.servers.get(slot.name)
        if old is not None:
            # A relaunch is a new process on the same data directory; the old one is gone.
            self.pumps = [(names, p) for names, p in self.pumps if slot.name not in names]
            self.hung.discard(slot.name)
            old.node.stores.close()
        server = self.servers[slot.name] = Server(self, slot)
        self.connect_to_ecs(server)
        return server

    def connect_to_ecs(self, server: Server) -> None:
        ctrl = ServerControlProtocol(server.node, self.clock, server.shutdown,
                                     connect_peer=self.connect_peer)
        server.control = ctrl
        ecs_side = ECSProtocol(self.ecs)
        pump = iosim.connect(ecs_side, iosim.makeFakeServer(ecs_side), ctrl,
                             iosim.makeFakeClient(ctrl), greet=False, clock=self.clock)
        self.pumps.append((frozenset([server.name, ECS_LINK]), pump))

    def connect_peer(self, host: str, port: int) -> Deferred[amp.AMP]:
        target = next((s for s in self.servers.values()
                       if (s.slot.host, s.slot.amp_port) == (host, port)), None)
        if target is None:
            return fail(ConnectionRefusedError(f"{host}:{port}"))
        cluster = self

        class Target(KVServerProtocol):
            @control.ReceiveRange.responder
            def receive_range(self, **kwargs: Any) -> dict[str, Any]:
                if target.name in cluster.cut_copies_to:
                    self.transport.loseConnection()  # the target dies mid-copy
                    return Deferred()  # type: ignore[return-value]
                if target.name in cluster.hang_copies_to:
                    return Deferred()  # type: ignore[return-value]  # never confirmed
                return super().receive_range(**kwargs)

        def connect(_: Any = None) -> amp.AMP:
            client = amp.AMP()
            server = Target(target.node)
            pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                                 iosim.makeFakeClient(client), greet=False, clock=self.clock)
            self.pumps.append((frozenset([target.name]), pump))
            return client

        if self.peer_gate is not None:
            # Each connection its own Deferred: copies from several sources wait at once.
            connected: Deferred[amp.AMP] = Deferred()

            def opened(passed: Any) -> Any:
                connected.callback(connect())
                return passed

            self.peer_gate.addCallback(opened)
            return connected
        return succeed(connect())

    def drop(self, name: str) -> None:
        """The server's process is gone: its connections close."""
        for names, pump in self.pumps:
            if name in names:
                pump.serverIO.loseConnection()
        self.settle()
        self.hung.add(name)

    # -- driving ---------------------------------------------------------------------------------

    def settle(self, until: Deferred[Any] | None = None, limit: int = 20_000) -> None:
        """Move bytes and run due calls until nothing moves (or C{until} has fired)."""
        quiet = 0
        for _ in range(limit):
            if until is not None and until.called:
                return
            moved = False
            for names, pump in list(self.pumps):
                if not names & self.hung and not (ECS_LINK in names
                                                   and names & self.cut_from_ecs):
                    moved = pump.pump(advanceClock=False) or moved
            self.clock.advance(0)
            quiet = 0 if moved else quiet + 1
            if until is None and quiet >= 3:
                return
        if until is not None:
            raise AssertionError("the operation did not finish")

    def run(self, coroutine: Any) -> Any:
        """Run an ECS coroutine (or a Deferred) to its end; return its result or raise its
        error."""
        results: list[Any] = []
        d = coroutine if isinstance(coroutine, Deferred) else Deferred.fromCoroutine(coroutine)
        d.addBoth(results.append)
        for _ in range(200):
            if results:
                break
            self.settle()
            if not results:
                self.clock.advance(0.01)
        assert results, "the operation did not finish"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def pass_time(self, seconds: float, step: float = 0.25) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.settle()

    def start(self) -> None:
        self.ecs.start()
        self.settle()
        assert len(self.ecs.state.ring_members) == self.config.initial_nodes

    # -- data ------------------------------------------------------------------------------------

    def ring(self) -> Ring:
        return self.ecs.state.ring()

    def put_all(self, keys: list[bytes]) -> None:
        ring = self.ring()
        for key in keys:
            head = ring.chain(key)[0].name
            self.servers[head].node.put(key, b"v-" + key)

    def check_placement(self, keys: list[bytes], read: bool = True) -> None:
        """Every key is stored exactly where the ring says (and readable at its tail)."""
        ring = self.ring()
        expected = {name: {s: set() for s in STORE_NAMES} for name in self.servers}
        if read:
            # A new tail may have asked its lease of a predecessor still on the old ring: it
            # asks again 0.1 s later (chainstore.chain.LEASE_RETRY_SECONDS).
            for _ in range(3):
                self.clock.advance(0.1)
                self.settle()
        for key in keys:
            chain = ring.chain(key)
            for role, node in enumerate(chain):
                expected[node.name][STORE_NAMES[role]].add(key)
            if read:
                assert self.servers[chain[-1].name].node.get(key) == b"v-" + key
        for name, server in self.servers.items():
            if name in self.hung:
                continue
            for store in STORE_NAMES:
                assert server.keys(store) == expected[name][store], (name, store)

    def close(self) -> None:
        for ecs in self.made:
            ecs.stop()
        for server in self.servers.values():
            if server.node.stores is not None:
                server.node.stores.close()


KEYS = [b"key%04d" % i for i in range(400)]


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


@pytest.fixture
def running(cluster):
    cluster.start()
    cluster.put_all(KEYS)
    return cluster


def keys_moving_to(cluster: Cluster, slot: NodeSlot) -> list[bytes]:
    me = NodeInfo(slot.name, slot.host, slot.console_port, slot.amp_port)
    ring = cluster.ring()
    new = Ring(ring.nodes + (me,), epoch=ring.epoch + 1, replication=ring.replication)
    return [k for k in KEYS if new.chain(k)[0].name == slot.name]


# -- bringing the ring up -------------------------------------------------------------------------

def test_first_start_launches_the_initial_servers_forms_the_ring_and_starts_them(cluster):
    cluster.start()
    ecs = cluster.ecs
    assert cluster.launcher.launched == ["s1", "s2", "s3"]
    assert sorted(ecs.state.ring_members) == ["s1", "s2", "s3"]
    assert ecs.state.serving and ecs.state.epoch >= 1
    for server in cluster.servers.values():
        assert server.node.state == RUNNING
        assert server.node.ring.epoch == ecs.state.epoch
        assert {n.name for n in server.node.ring.nodes} == {"s1", "s2", "s3"}
        assert ecs.state.members[server.name].status == ACTIVE
    status = json.loads(json.dumps(ecs.status()))
    assert status["ring"] == [n.name for n in cluster.ring().nodes]
    assert all(m["connected"] and "range" in m for m in status["members"])
    assert status["operation"] is None


# -- adding -------------------------------------------------------------------------------------

def test_add_node_moves_exactly_the_new_range_and_the_source_drops_it(running):
    slot = running.config.slot("s4")
    moving = keys_moving_to(running, slot)
    assert moving, "the test needs keys in the new range"
    old_ring = running.ring()
    sources = {old_ring.chain(k)[0].name for k in moving}
    names = running.run(running.ecs.add_nodes(1, "LRU", 10))
    assert names == ["s4"]
    ring = running.ring()
    assert ring.epoch > old_ring.epoch
    assert running.servers["s4"].keys() == set(moving)
    for name in sources:
        assert not running.servers[name].keys() & set(moving)
    running.check_placement(KEYS)
    assert running.servers["s4"].node.state == RUNNING
    last = running.ecs.last_reconfiguration
    assert last["keys"] == len(moving) and last["bytes"] > 0
    assert all(not s.node.write_locks and not s.node.read_locks
               for s in running.servers.values())


def test_add_two_nodes_at_once(running):
    names = running.run(running.ecs.add_nodes(2, "FIFO", 0))
    assert sorted(names) == ["s4", "s5"]
    assert len(running.ring()) == 5
    running.check_placement(KEYS)


def test_writes_go_on_during_the_copy_and_are_locked_only_to_catch_up(running):
    slot = running.config.slot("s4")
    moving = keys_moving_to(running, slot)
    old_ring = running.ring()
    staying = [k for k in KEYS if k not in moving]
    running.peer_gate = Deferred()  # the bulk copy's connection to the new server waits
    done: list[Any] = []
    Deferred.fromCoroutine(running.ecs.add_nodes(1, "LRU", 10)).addBoth(done.append)
    running.settle()
    assert not done and running.ecs.operation.step == "copying"
    # During the bulk copy the moving range takes writes: the source records them.
    for key in moving[:5]:
        head = running.servers[old_ring.chain(key)[0].name].node
        running.run(head.put(key, b"during-" + key))
        assert head.get(key) == b"during-" + key
    running.run(running.servers[old_ring.chain(moving[5])[0].name].node.delete(moving[5]))
    for key in staying[:5]:
        running.run(running.servers[old_ring.chain(key)[0].name].node.put(key, b"v-" + key))
    # a busy ECS refuses a second admin command, clearly
    with pytest.raises(AdminError, match="busy: adding s4 is in progress"):
        running.run(running.ecs.add_nodes(1, "LRU", 10))
    with pytest.raises(AdminError, match="busy"):
        running.run(running.ecs.remove_node("s1"))
    with pytest.raises(AdminError, match="busy"):
        running.run(running.ecs.set_serving(False))
    assert running.ecs.status()["operation"]["description"] == "adding s4"
    # The bulk copy ends; a second pass sends the keys written meanwhile, still unlocked.
    gate, running.peer_gate = running.peer_gate, Deferred()
    gate.callback(None)
    running.settle()
    assert not done and running.ecs.operation.step == "catching up"
    key = moving[11]
    head = running.servers[old_ring.chain(key)[0].name].node
    running.run(head.put(key, b"second-" + key))
    # The final pass (only what that pass missed) waits in turn: now, and only now, the moving
    # range refuses writes; reads go on.
    gate, running.peer_gate = running.peer_gate, Deferred()
    gate.callback(None)
    running.settle()
    assert not done and running.ecs.operation.step == "final catch-up"
    for key in moving[6:11]:
        head = running.servers[old_ring.chain(key)[0].name].node
        with pytest.raises(WriteLocked):
            head.put(key, b"new")
        with pytest.raises(WriteLocked):
            head.delete(key)
        assert head.get(key) == b"v-" + key
    for key in staying[5:10]:
        running.run(running.servers[old_ring.chain(key)[0].name].node.put(key, b"v-" + key))
    gate, running.peer_gate = running.peer_gate, None
    gate.callback(None)
    running.settle()
    assert done == [["s4"]]
    # after the switch the new owner serves what was written during the copy, and takes writes
    new_owner = running.servers["s4"].node
    for key in moving[:5]:
        assert new_owner.get(key) == b"during-" + key
        running.run(new_owner.put(key, b"v-" + key))
    assert new_owner.get(moving[11]) == b"second-" + moving[11]
    running.run(new_owner.put(moving[11], b"v-" + moving[11]))
    with pytest.raises(KeyNotFound):
        new_owner.get(moving[5])
    running.check_placement([k for k in KEYS if k != moving[5]])


def test_adding_beyond_the_pool_is_refused(tmp_path):
    c = Cluster(tmp_path, slots=4)
    try:
        c.start()
        with pytest.raises(AdminError, match="cannot add 2: 0 idle registered server"):
            c.run(c.ecs.add_nodes(2, "LRU", 10))
        assert c.launcher.launched == ["s1", "s2", "s3"]
        assert len(c.ring()) == 3
        assert c.run(c.ecs.add_nodes(1, "LRU", 10)) == ["s4"]
    finally:
        c.close()


@pytest.mark.parametrize("args, message", [
    ((0, "LRU", 1), "count must be at least 1"),
    ((1, "MRU", 1), "unknown cache strategy 'MRU'"),
    ((1, "LRU", -1), "cache size must be 0 or more"),
])
def test_bad_add_arguments_are_refused(running, args, message):
    with pytest.raises(AdminError, match=message):
        running.run(running.ecs.add_nodes(*args))


def test_a_launched_server_that_never_registers_fails_the_add_and_keeps_the_ring(running):
    running.launcher.auto_start = False
    epoch = running.ring().epoch
    results: list[Any] = []
    Deferred.fromCoroutine(running.ecs.add_nodes(1, "LRU", 10)).addBoth(results.append)
    running.pass_time(running.config.register_timeout + 1)
    assert results and results[0].check(AdminError)
    assert "s4 did not register within 5.0s" in results[0].getErrorMessage()
    assert running.ecs.state.members["s4"].status == FAILED
    assert "s4" in running.launcher.stopped
    assert running.ring().epoch == epoch and len(running.ring()) == 3
    # and the ECS is free again; the slot can be used
    running.launcher.auto_start = True
    assert running.run(running.ecs.add_nodes(1, "LRU", 10)) == ["s4"]
    running.check_placement(KEYS)


def test_a_copy_whose_target_dies_aborts_releases_the_locks_and_keeps_the_old_ring(running):
    old_ring = running.ring()
    running.cut_copies_to.add("s4")
    with pytest.raises(AdminError, match="adding s4 failed while copying"):
        running.run(running.ecs.add_nodes(1, "LRU", 10))
    ecs = running.ecs
    assert ecs.state.ring_members == [n for n in ecs.state.ring_members if n != "s4"]
    assert running.ring().nodes == old_ring.nodes and ecs.state.epoch == old_ring.epoch
    for name in ("s1", "s2", "s3"):
        server = running.servers[name]
        assert server.node.write_locks == [] and server.node.read_locks == []
        assert server.node.ring.epoch == old_ring.epoch
        assert name in ecs.links  # the source's link survived the failed copy
    assert ecs.operation is None and not ecs.busy.locked
    # the old owners still accept writes for the range that was to move
    moving = keys_moving_to(running, running.config.slot("s4"))
    for key in moving[:3]:
        running.servers[old_ring.chain(key)[0].name].node.put(key, b"v-" + key)
    running.check_placement(KEYS)
    # the migration can be redone
    running.cut_copies_to.clear()
    assert running.run(ecs.add_nodes(1, "LRU", 10)) == ["s4"]
    assert running.ring().epoch > old_ring.epoch
    running.check_placement(KEYS)


def test_a_copy_whose_target_hangs_times_out_and_frees_the_ecs(running):
    old_ring = running.ring()
    running.hang_copies_to.add("s4")
    results: list[Any] = []
    Deferred.fromCoroutine(running.ecs.add_nodes(1, "LRU", 10)).addBoth(results.append)
    running.pass_time(COPY_BATCH_TIMEOUT - 1)
    assert not results and running.ecs.busy.locked
    running.pass_time(2)
    assert results and results[0].check(AdminError)
    assert "adding s4 failed while copying" in results[0].getErrorMessage()
    assert running.ring().nodes == old_ring.nodes
    for name in ("s1", "s2", "s3"):
        node = running.servers[name].node
        assert node.write_locks == [] and not node.stores["coordinator"].lock.locked
    running.check_placement(KEYS)


# -- removing -------------------------------------------------------------------------------------

def test_remove_node_moves_everything_to_the_successor_and_ends_it(running):
    ring = running.ring()
    index = ring.index_of("s2")
    successor = ring.nodes[(index + 1) % len(ring)].name
    had = running.servers["s2"].keys()
    assert had
    before = running.servers[successor].keys()
    message = running.run(running.ecs.remove_node("s2"))
    assert message == "s2 removed; 2 servers in the ring"
    assert running.servers[successor].keys() == before | had
    assert running.servers["s2"].keys() == set()
    assert running.ecs.state.members["s2"].status == REMOVED
    assert "s2" not in running.ecs.links
    running.clock.advance(1)
    assert running.servers["s2"].shutdowns == 1
    del running.servers["s2"]
    running.check_placement(KEYS)


def test_remove_errors_are_clear(running):
    with pytest.raises(AdminError, match="unknown server 'nope'; known servers: s1, s2, s3"):
        running.run(running.ecs.remove_node("nope"))
    running.run(running.ecs.remove_node("s1"))
    with pytest.raises(AdminError, match="s1 is not in the ring"):
        running.run(running.ecs.remove_node("s1"))
    running.run(running.ecs.remove_node("s2"))
    with pytest.raises(AdminError, match="s3 is the last server in the ring"):
        running.run(running.ecs.remove_node("s3"))
    assert running.ecs.state.ring_members == ["s3"]
    for name in ("s1", "s2"):
        running.servers.pop(name).node.stores.close()
    running.check_placement(KEYS)


# -- heartbeats -----------------------------------------------------------------------------------

def test_servers_that_answer_heartbeats_are_never_declared_failed(running):
    epoch = running.ring().epoch
    running.pass_time(10 * TIMEOUT)
    assert len(running.ring()) == 3 and running.ring().epoch == epoch
    status = running.ecs.status()
    assert all(m["last_heartbeat_s"] <= INTERVAL for m in status["members"])


@pytest.mark.parametrize("how", ["hung", "dropped"])
def test_a_silent_server_is_declared_failed_after_the_timeout_and_the_ring_updated(running,
                                                                                   how):
    epoch = running.ring().epoch
    if how == "hung":
        running.hung.add("s2")
    else:
        running.drop("s2")
    running.pass_time(TIMEOUT - INTERVAL)
    assert "s2" in running.ecs.state.ring_members  # not before the timeout
    running.pass_time(2 * INTERVAL)
    ecs = running.ecs
    assert "s2" not in ecs.state.ring_members
    assert ecs.state.members["s2"].status == FAILED
    assert ecs.state.epoch > epoch
    for name in ("s1", "s3"):
        assert running.servers[name].node.ring.epoch == ecs.state.epoch
        assert {n.name for n in running.servers[name].node.ring.nodes} == {"s1", "s3"}
    # with replication 1 the failed server's keys are gone; every other key is where it was
    lost = {k for k in KEYS if Ring(running.ring().nodes + (running.servers["s2"].node.me,),
                                    replication=1).chain(k)[0].name == "s2"}
    survivors = [k for k in KEYS if k not in lost]
    for name in ("s1", "s3"):
        assert running.servers[name].keys() == {
            k for k in survivors if running.ring().chain(k)[0].name == name}
    # the ECS goes on working: the failed slot is launched afresh, and starts empty
    assert running.run(ecs.add_nodes(1, "LRU", 10)) == ["s2"]
    assert running.launcher.launched.count("s2") == 2
    lost_keys = sorted(lost)
    running.check_placement(survivors)
    assert not running.servers["s2"].keys() & set(lost_keys)


# -- replication 3 --------------------------------------------------------------------------------

def place_by_role(cluster: Cluster, keys: list[bytes]) -> None:
    """Put every key in the store of its role on each chain member (what the chain would do)."""
    ring = cluster.ring()
    for key in keys:
        for role, node in enumerate(ring.chain(key)):
            cluster.servers[node.name].node.stores[STORE_NAMES[role]].put(key, b"v-" + key)


@pytest.fixture
def ring3(tmp_path):
    """Three servers at replication 3, every key in the store of its role on its chain."""
    c = Cluster(tmp_path, replication=3, initial=3)
    c.start()
    place_by_role(c, KEYS)
    yield c
    c.close()


def test_with_replication_3_every_store_holds_its_roles_after_joins_and_leaves(tmp_path):
    c = Cluster(tmp_path, replication=3, initial=3)
    try:
        c.start()
        place_by_role(c, KEYS)
        c.check_placement(KEYS, read=False)
        c.run(c.ecs.add_nodes(1, "LRU", 10))
        c.check_placement(KEYS, read=False)
        c.run(c.ecs.add_nodes(1, "LRU", 10))
        c.check_placement(KEYS, read=False)
        c.run(c.ecs.remove_node("s1"))
        c.servers.pop("s1").node.stores.close()
        c.check_placement(KEYS, read=False)
        assert len(c.ring()) == 4
        # a failure loses nothing: the other replicas hold every key
        c.hung.add("s3")
        c.pass_time(TIMEOUT + 2 * INTERVAL)
        # Skipped at once, but repaired only once a read lease it may hold has run out: the
        # repair's new tails would not wait for it.
        assert "s3" in c.ecs.state.dead and "s3" in c.ecs.state.ring_members
        c.pass_time(LEASE_SECONDS + 1.0)
        assert "s3" not in c.ecs.state.ring_members
        c.check_placement(KEYS, read=False)
    finally:
        c.close()


def test_a_change_whose_locked_server_relinks_before_the_commit_aborts(ring3):
    # An old member read-locked for the switch loses its ECS link and registers again while
    # the other members' read locks are still on their way. Its locks stay (ServerControl-
    # Protocol) until the ECS sends it the ring over the new link, which the ECS does on
    # registration: still the old ring then, so its read lock is lifted. Had the change gone
    # on to commit, it would answer reads, under the lease it holds, of a range whose new
    # chain takes writes without it.
    c = ring3
    old_ring = c.ring()
    real_call = c.ecs.calls.call
    victim: list[str] = []
    relinked = Deferred()

    def call(name: str, command: Any, timeout: Any = None, **kwargs: Any) -> Deferred[Any]:
        if command is not control.LockRanges or not kwargs["reads"]:
            return real_call(name, command, timeout, **kwargs)
        if victim:  # the others' read locks wait for the victim's new link
            return relinked.addCallback(lambda _: None).addCallback(
                lambda _: real_call(name, command, timeout, **kwargs))
        victim.append(name)
        server = c.servers[name]

        def relink(answer: Any) -> Any:
            assert server.node.read_locks
            for _, pump in [e for e in c.pumps if e[1].client is server.control]:
                pump.serverIO.loseConnection()
            c.clock.callLater(0.01, c.connect_to_ecs, server)
            c.clock.callLater(0.05, relinked.callback, None)
            return answer

        return real_call(name, command, timeout, **kwargs).addCallback(relink)

    c.ecs.calls.call = call  # type: ignore[method-assign]
    with pytest.raises(AdminError, match=r"adding s4 failed while switching: the link to "
                                         r"s\d dropped while it held this change's locks"):
        c.run(c.ecs.add_nodes(1, "LRU", 10))
    c.ecs.calls.call = real_call  # type: ignore[method-assign]
    c.settle()
    assert relinked.called
    assert c.ring().nodes == old_ring.nodes and c.ring().epoch == old_ring.epoch
    assert all(s.node.ring.epoch == old_ring.epoch for s in c.servers.values()
               if s.name != "s4")
    assert all(not s.node.read_locks and not s.node.write_locks and not s.node.orphaned_locks
               for s in c.servers.values())
    # and the join goes through when tried again
    assert c.run(c.ecs.add_nodes(1, "LRU", 10)) == ["s4"]
    c.check_placement(KEYS, read=False)


def test_locks_a_dropped_link_left_are_lifted_by_the_next_heartbeat_when_the_ring_missed(ring3):
    # The ring the ECS sends a server that registers again lifts the locks of its old link;
    # if that one call failed, the server's heartbeat report still counts them, and the ECS,
    # with no change running, sends the ring again.
    c = ring3
    node = c.servers["s2"].node
    orphan = KeyRange(1, 2)
    node.read_locks.append(orphan)
    node.orphaned_locks.append((True, orphan))
    c.pass_time(2 * INTERVAL)
    assert node.read_locks == [] and node.orphaned_locks == []


@pytest.mark.parametrize("beside", [False, True])
def test_bulk_copies_go_one_at_a_time_and_the_locked_steps_reach_every_server_at_once(
        ring3, beside):
    # A join at replication 3 copies from three sources and moves data on two servers. The
    # bulk of it goes one move or copy at a time (side by side they take the CPUs from the
    # writes going on), or with copies-beside-moves one move and one copy; but each write
    # lock, drain and catch-up under the lock used to be a round trip of its own, one server
    # after another, all inside the time writes are refused.
    c = ring3
    c.ecs.reconfigurer.copies_beside_moves = beside
    open_calls: dict[str, int] = {}
    most_open: dict[tuple[str, str], int] = {}
    # bulk copies and moves under way, and what was under way each time one began
    bulk: dict[str, int] = {}
    most_bulk: list[dict[str, int]] = []
    real_call = c.ecs.calls.call

    def call(name: str, command: Any, timeout: Any = None, **kwargs: Any) -> Deferred[Any]:
        d = real_call(name, command, timeout, **kwargs)
        kind = command.__name__
        if command in (control.CopyRange, control.MoveLocal):
            kind = "catch-up" if "tracker" in kwargs else "bulk"
            if kind == "bulk":
                step = command.__name__
                bulk[step] = bulk.get(step, 0) + 1
                most_bulk.append(dict(bulk))

                def ended(result: Any, step: str = step) -> Any:
                    bulk[step] -= 1
                    return result

                d.addBoth(ended)
        open_calls[kind] = open_calls.get(kind, 0) + 1
        operation = c.ecs.reconfigurer.operation
        key = (kind, operation.step if operation is not None else "")
        most_open[key] = max(most_open.get(key, 0), open_calls[kind])

        def closed(result: Any) -> Any:
            open_calls[kind] -= 1
            return result

        return d.addBoth(closed)

    c.ecs.calls.call = call  # type: ignore[method-assign]
    assert c.run(c.ecs.add_nodes(1, "LRU", 10)) == ["s4"]
    c.check_placement(KEYS, read=False)
    assert most_open[("bulk", "copying")] == (2 if beside else 1)
    assert all(n <= 1 for seen in most_bulk for n in seen.values())
    assert any(seen.get("CopyRange") and seen.get("MoveLocal") for seen in most_bulk) == beside
    heads = most_open[("LockRanges", "locking writes")]
    assert heads >= 2 and most_open[("DrainWrites", "locking writes")] == heads
    assert most_open[("catch-up", "final catch-up")] >= 2
    assert most_open[("LockRanges", "switching")] >= 2


@pytest.mark.parametrize("beside", [False, True])
def test_a_failed_copy_at_replication_3_aborts_and_leaves_no_tracker(ring3, beside):
    # The abort stops every write tracker the attempt started (a tracker left behind records
    # keys for ever), releases the locks and keeps the old ring; the join can be redone. With
    # copies beside the moves, the moves under way end first and their trackers stop too.
    c = ring3
    c.ecs.reconfigurer.copies_beside_moves = beside
    old_ring = c.ring()
    c.cut_copies_to.add("s4")
    with pytest.raises(AdminError, match="adding s4 failed while copying"):
        c.run(c.ecs.add_nodes(1, "LRU", 10))
    c.settle()
    assert c.ring().nodes == old_ring.nodes
    for name in ("s1", "s2", "s3"):
        node = c.servers[name].node
        assert node.write_locks == [] and node.read_locks == []
        assert all(not node.stores[store].trackers for store in STORE_NAMES), name
    assert c.ecs.operation is None and not c.ecs.busy.locked
    c.cut_copies_to.clear()
    assert c.run(c.ecs.add_nodes(1, "LRU", 10)) == ["s4"]
    c.check_placement(KEYS, read=False)


def test_members_cut_off_from_the_ecs_together_hold_no_lease_once_it_declares_them_failed(
        ring3):
    # The middle and the tail of a chain lose the ECS but not each other. Each grants the
    # other its read lease; unbounded, they renewed them for ever while the ECS declared them
    # failed and let the head take writes alone, so the old tail (or middle) answered reads
    # that missed those writes. A server's leases now end before the ECS may declare it failed.
    c = ring3
    head, middle, tail = [n.name for n in c.ring().chain(KEYS[0])]
    c.cut_from_ecs |= {middle, tail}
    cut_at = c.clock.seconds()
    leases: list[tuple[float, float, float]] = []
    while not {middle, tail} <= c.ecs.state.dead:
        c.pass_time(0.05, step=0.05)
        assert c.clock.seconds() < cut_at + 3 * TIMEOUT, "the ECS never declared them failed"
        held_tail = c.servers[tail].node.chain.replicas[head].lease_until
        held_middle = c.servers[middle].node.chain.replicas[head].up_lease_until
        leases.append((c.clock.seconds(), held_tail, held_middle))
    declared = c.clock.seconds()
    assert declared >= cut_at + TIMEOUT
    # Their leases were renewed while the ECS could still hear of them (reads went on)...
    assert any(t > cut_at + LEASE_SECONDS for _, t, _ in leases)
    # ... and ended before it could declare either of them failed.
    assert all(t <= cut_at + TIMEOUT and m <= cut_at + TIMEOUT for _, t, m in leases), leases
    now = c.clock.seconds()
    assert c.servers[tail].node.chain.replicas[head].lease_until <= now
    assert c.servers[middle].node.chain.replicas[head].up_lease_until <= now


class SlowSaves:
    """A state store whose saves take C{delay} seconds of the Clock, as etcd's round trips do
    (a StateFile's have completed when they return)."""

    def __init__(self, inner: Any, clock: Clock, delay: float) -> None:
        self.inner, self.clock, self.delay = inner, clock, delay

    def load(self) -> Any:
        return self.inner.load()

    def save(self, state: Any) -> Deferred[None]:
        saved = self.inner.save(state)
        d: Deferred[None] = Deferred()
        self.clock.callLater(self.delay, lambda: saved.chainDeferred(d))
        return d


def test_an_alive_that_arrives_while_the_ecs_declares_its_server_failed_grants_no_lease_time(
        ring3):
    # A server's lease bound promises that the ECS does not declare it failed before then:
    # the leases it grants end by it. The ECS decided a silent middle had failed and was
    # saving its death (an etcd round trip) when the partition healed for a moment and the
    # middle's Alive came in: answered with the failure timeout, it let the middle grant
    # leases a failure timeout past the ECS's decision, while the chain went on without it.
    c = ring3
    c.ecs.state_file = SlowSaves(c.ecs.state_file, c.clock, 0.3)
    middle = c.ring().chain(KEYS[0])[1].name
    c.cut_from_ecs.add(middle)
    while middle not in c.ecs._failing:
        c.pass_time(0.05, step=0.05)
        assert c.clock.seconds() < 3 * TIMEOUT, "the ECS never declared it failed"
    decided = c.clock.seconds()
    # Its death is being saved; the Alives it sent while cut off reach the ECS now.
    c.cut_from_ecs.discard(middle)
    c.settle()
    assert middle in c.ecs.links  # (dropped once its death is saved)
    assert c.servers[middle].node.chain.lease_bound <= decided
    c.pass_time(0.5, step=0.05)
    assert middle in c.ecs.state.dead
    assert c.servers[middle].node.chain.lease_bound <= decided


def test_removing_below_the_replication_factor_needs_force(tmp_path):
    c = Cluster(tmp_path, replication=3, initial=3)
    try:
        c.start()
        with pytest.raises(AdminError, match="fewer than the replication factor 3; add --force"):
            c.run(c.ecs.remove_node("s1"))
        c.run(c.ecs.remove_node("s1", force=True))
        assert not c.ecs.state.serving
        assert all(c.servers[n].node.state == STOPPED for n in ("s2", "s3"))
    finally:
        c.close()


# -- restarts and epochs --------------------------------------------------------------------------

def test_a_restarted_ecs_resumes_the_same_ring_with_a_higher_epoch(running):
    old = running.ecs
    members, epoch = list(old.state.ring_members), old.state.epoch
    # the ECS process dies: its connections close; the servers keep serving
    old.heartbeats.stop()
    for _, pump in running.pumps:
        pump.clientIO.loseConnection()
    running.settle()
    running.pumps.clear()
    assert not old.links
    for key in KEYS[:5]:
        assert running.servers[running.ring().chain(key)[-1].name].node.get(key) == b"v-" + key
    # a new ECS on the same state file; the servers reconnect (their ClientService would)
    new = running.ecs = running.new_ecs()
    assert new.resumed
    launched = len(running.launcher.launched)
    new.start()
    for server in running.servers.values():
        running.connect_to_ecs(server)
    running.settle()
    assert new.state.ring_members == members
    assert new.state.epoch > epoch
    assert len(running.launcher.launched) == launched  # they came back: nothing relaunched
    for server in running.servers.values():
        assert server.node.ring.epoch == new.state.epoch
        assert server.node.state == RUNNING
    running.check_placement(KEYS)
    assert running.run(new.add_nodes(1, "LRU", 10)) == ["s4"]
    running.check_placement(KEYS)


def test_a_stale_set_metadata_is_refused_by_the_server(running):
    ecs = running.ecs
    stale = ecs._metadata()
    running.run(ecs.add_nodes(1, "LRU", 10))
    current = ecs.state.epoch
    assert stale["epoch"] < current
    with pytest.raises(control.StaleEpoch):
        running.run(_awaitable(ecs._call("s1", control.SetMetadata, **stale)))
    assert running.servers["s1"].node.ring.epoch == current
    assert len(running.servers["s1"].node.ring) == 4


async def _awaitable(d: Deferred[Any]) -> Any:
    return await d


def test_status_shows_the_operation_with_progress(running):
    running.peer_gate = Deferred()
    Deferred.fromCoroutine(running.ecs.add_nodes(1, "LRU", 10))
    running.settle()
    op = running.ecs.status()["operation"]
    assert op["description"] == "adding s4" and op["step"] == "copying"
    gate, running.peer_gate = running.peer_gate, None
    gate.callback(None)
    running.settle()
    assert running.ecs.status()["operation"] is None
    assert running.ecs.last_reconfiguration["keys"] == len(
        [k for k in KEYS if running.ring().chain(k)[0].name == "s4"])


def crash_ecs(cluster: Cluster) -> None:
    """The ECS process dies: heartbeats stop and every control connection closes."""
    cluster.ecs.heartbeats.stop()
    for _, pump in cluster.pumps:
        pump.clientIO.loseConnection()
    cluster.settle()
    cluster.pumps.clear()


def test_a_restarted_ecs_waits_for_its_servers_to_come_back_before_relaunching_them(running):
    epoch = running.ecs.state.epoch
    crash_ecs(running)
    running.ecs = running.new_ecs()
    launched = list(running.launcher.launched)
    running.ecs.start()
    # The servers' reconnect back-off brings them back after 4s: longer than failure-timeout,
    # within register-timeout. They are neither relaunched (a second process on the same
    # stores and ports) nor declared failed (which, without replicas, would lose their data).
    running.pass_time(4)
    assert running.launcher.launched == launched
    for server in running.servers.values():
        running.connect_to_ecs(server)
    running.pass_time(2 * TIMEOUT)
    assert running.launcher.launched == launched
    assert sorted(running.ecs.state.ring_members) == ["s1", "s2", "s3"]
    assert running.ecs.state.epoch == epoch + 1
    running.check_placement(KEYS)


class FlakyDisk:
    """A state store whose saves fail (a full disk; with etcd, a request that timed out) while
    it is C{full}, and the first time a state C{fails_on} picks is saved."""

    def __init__(self, inner: Any, fails_on: Any = lambda state: False) -> None:
        self.inner, self.fails_on = inner, fails_on
        self.full = False
        self.failed = 0

    def load(self) -> Any:
        return self.inner.load()

    def save(self, state: Any) -> Deferred[None]:
        if self.full or (not self.failed and self.fails_on(state)):
            self.failed += 1
            return fail(OSError(28, "No space left on device"))
        return self.inner.save(state)


def test_a_ring_whose_commit_was_not_saved_reaches_no_server(running):
    # The save at a join's commit point failed. The ring stayed in the ECS's memory, and the
    # next heartbeats sent it to the servers as "behind on the ring": the new server took
    # writes for its range, which the ECS, restarted on its state file, gave back to the
    # old head, without them. A ring reaches the servers only once it is saved.
    c = running
    slot = c.config.nodes[3]
    key = keys_moving_to(c, slot)[0]
    c.ecs.state_file = FlakyDisk(c.ecs.state_file, lambda state: slot.name in state.ring_members)
    saved_epoch = c.ring().epoch
    joined: list[Any] = []
    Deferred.fromCoroutine(c.ecs.add_nodes(1, "LRU", 10)).addBoth(joined.append)
    while not c.ecs.state_file.failed:
        c.settle()
        c.clock.advance(0.01)
    assert c.ecs.state.epoch > saved_epoch
    c.pass_time(4 * INTERVAL)
    acknowledged = None
    for server in c.servers.values():
        try:
            answer = server.node.put(key, b"acknowledged")
        except Exception:
            continue
        c.settle()
        if answer.called:
            acknowledged = answer.result
            assert acknowledged is True  # (it replaced the value the key held)
            break
    # The ECS restarts on its state file; every acknowledged write is still there.
    crash_ecs(c)
    c.ecs = c.new_ecs()
    c.ecs.start()
    for server in c.servers.values():
        c.connect_to_ecs(server)
    c.pass_time(2 * INTERVAL)
    tail = c.servers[c.ring().chain(key)[-1].name].node
    assert tail.get(key) == (b"v-" + key if acknowledged is None else b"acknowledged")


def test_a_death_whose_save_failed_reaches_no_server_until_it_is_saved(ring3):
    # The ECS declared a server failed and could not save it: the ring marking it dead stayed
    # in memory, and the next heartbeats sent it to the others as "behind on the ring" (their
    # chains went on without it, while a restarted ECS would resume the ring with it). The
    # death is saved again until it is, and only then sent.
    c = ring3
    disk = c.ecs.state_file = FlakyDisk(c.ecs.state_file)
    epoch = c.ring().epoch
    disk.full = True
    c.hung.add("s2")
    c.pass_time(TIMEOUT + 3 * INTERVAL)
    assert "s2" in c.ecs.state.dead and c.ecs.state.epoch > epoch and disk.failed
    assert all(c.servers[n].node.ring.epoch == epoch for n in ("s1", "s3"))
    disk.full = False
    c.pass_time(reconfiguration.SAVE_RETRY_MAX)
    # Saved and sent (and repaired away since, the ring without it).
    saved = c.ecs.state_file.inner.load()
    assert "s2" in saved.dead or "s2" not in saved.ring_members
    for name in ("s1", "s3"):
        ring = c.servers[name].node.ring
        assert ring.epoch == saved.epoch
        assert "s2" in ring.dead or "s2" not in {n.name for n in ring.nodes}


def test_a_restarted_ecs_relaunches_servers_that_do_not_come_back(running):
    crash_ecs(running)
    running.ecs = running.new_ecs()
    launched = len(running.launcher.launched)
    running.ecs.start()
    # only s1 and s3 come back; s2's process died with the ECS's host, say
    for name in ("s1", "s3"):
        running.connect_to_ecs(running.servers[name])
    running.pass_time(running.config.register_timeout + INTERVAL)
    assert running.launcher.launched[launched:] == ["s2"]
    # relaunched on its data directory, s2 keeps its keys and the ring is whole
    assert sorted(running.ecs.state.ring_members) == ["s1", "s2", "s3"]
    running.check_placement(KEYS)


def test_a_restarted_ecs_with_replicas_gives_its_servers_failure_timeout_not_more(ring3):
    # The servers that outlived the ECS redial within a second or two; one that does not
    # within failure-timeout died meanwhile and is repaired away from its replicas (its
    # chains' writes waited for it for register-timeout before), not relaunched.
    c = ring3
    crash_ecs(c)
    c.ecs = c.new_ecs()
    launched = list(c.launcher.launched)
    c.ecs.start()
    c.pass_time(1)
    for name in ("s1", "s3"):
        c.connect_to_ecs(c.servers[name])
    # failure-timeout and a heartbeat round from the restart; before, register-timeout more
    c.pass_time(TIMEOUT + 2 * INTERVAL)
    assert "s2" in c.ecs.state.dead
    assert c.launcher.launched == launched


def test_an_ecs_restarted_with_a_shorter_failure_timeout_keeps_the_old_one_for_the_leases(
        ring3):
    # A server's leases end before its ECS may declare it failed, by the failure timeout that
    # ECS answered its Alive with. Restarted with a shorter one (the operator's new setting),
    # the ECS declared the servers that had not come back failed by that one, after a
    # heartbeat round (register-timeout before a899d1f): a middle and a tail cut off together
    # still granted each other leases under the old bound while their chains went on without
    # them. The longest failure timeout answered is saved with the state, and a restarted ECS
    # declares nobody failed before it has passed since its start.
    c = ring3
    bounds = {name: c.servers[name].node.chain.lease_bound for name in ("s2", "s3")}
    crash_ecs(c)
    started = c.clock.seconds()
    assert all(bound > started + 1.5 for bound in bounds.values())  # (failure-timeout 3 s)
    c.config = replace(c.config, failure_timeout=1.0, heartbeat_interval=0.5).validated()
    c.ecs = c.new_ecs()
    c.ecs.start()
    c.connect_to_ecs(c.servers["s1"])
    declared: dict[str, float] = {}
    while len(declared) < 2:
        c.pass_time(0.05, step=0.05)
        declared.update({n: c.clock.seconds() for n in ("s2", "s3")
                         if n in c.ecs.state.dead and n not in declared})
        assert c.clock.seconds() < started + 10 * TIMEOUT, "never declared failed"
    for name, bound in bounds.items():
        assert declared[name] >= bound, (name, declared[name] - started, bound - started)


def test_a_restarted_ecs_with_replicas_keeps_servers_that_come_back_within_failure_timeout(
        ring3):
    c = ring3
    members = list(c.ecs.state.ring_members)
    crash_ecs(c)
    c.ecs = c.new_ecs()
    c.ecs.start()
    c.pass_time(TIMEOUT - 1)
    for server in c.servers.values():
        c.connect_to_ecs(server)
    c.pass_time(2 * TIMEOUT)
    assert c.ecs.state.ring_members == members and not c.ecs.state.dead


def last_to_leave(c: Cluster, names: list[str]) -> str:
    """Of dead members C{names}, the one the ECS marked dead last."""
    return max(names, key=lambda n: c.ecs.state.members[n].left_at)


def test_a_whole_cluster_outage_keeps_the_last_copies_and_the_last_to_leave_rejoins(tmp_path):
    c = Cluster(tmp_path, replication=3, initial=3)
    try:
        c.start()
        place_by_role(c, KEYS)
        members = list(c.ecs.state.ring_members)
        for name in members:
            c.drop(name)
        c.pass_time(TIMEOUT + 4 * INTERVAL)
        # Every replica is down: they are dead, but no repair takes the last copies away.
        assert c.ecs.state.dead == set(members)
        assert c.ecs.state.ring_members == members
        assert c.ecs.status()["degraded"]
        # One that left before another comes back on its files: the chain may have taken
        # writes after it left, so it does not rejoin and the range stays down.
        back = last_to_leave(c, members)
        early = next(n for n in members if n != back)
        c.start_server(c.config.slot(early))
        c.pass_time(4 * INTERVAL)
        assert c.ecs.state.dead == set(members) and c.ecs.state.ring_members == members
        # The last to leave comes back: nothing can have been written since it left, so it
        # rejoins its chains and serves again; the others are repaired away meanwhile.
        c.start_server(c.config.slot(back))
        c.pass_time(4 * INTERVAL)
        assert back in c.ecs.state.ring_members and back not in c.ecs.state.dead
        node = c.servers[back].node
        for key in KEYS[:20]:
            assert node.get(key) == b"v-" + key
        assert set(c.ecs.state.ring_members) == {back}
    finally:
        c.close()


def test_a_range_whose_chain_all_failed_is_repaired_from_a_replica_that_comes_back(tmp_path):
    c = Cluster(tmp_path, replication=3, initial=5, slots=5)
    try:
        c.start()
        place_by_role(c, KEYS)
        ring = c.ring()
        chain = [n.name for n in ring.ring_chain(0)]  # three consecutive servers
        for name in chain:
            c.drop(name)
        c.pass_time(TIMEOUT + 4 * INTERVAL)
        assert c.ecs.state.dead == set(chain)
        members = list(c.ecs.state.ring_members)
        assert sorted(members) == sorted(n.name for n in ring.nodes)  # nothing repaired away
        # The last of that chain to leave comes back on its files (it is stale for other
        # ranges, so it cannot simply rejoin): the repair now copies the orphaned range from it.
        back = last_to_leave(c, chain)
        c.start_server(c.config.slot(back))
        c.pass_time(8 * INTERVAL)
        survivors = [n for n in members if n not in chain]
        assert c.ecs.state.ring_members == survivors and not c.ecs.state.dead
        assert c.ecs.state.members[back].status == "idle"  # out of the ring, its files stale
        c.hung.add(back)
        # Every key, the orphaned range's included, is on each of its three new replicas.
        c.check_placement(KEYS, read=False)
    finally:
        c.close()


def cut_from_ecs(c: Cluster, name: str) -> list[tuple[frozenset[str], iosim.IOPump]]:
    """A partition between server C{name} and the ECS only: its control link stands still
    (what either side sends waits), its links to other servers go on. Returns the cut link."""
    control_link = c.servers[name].control
    cut = [(names, pump) for names, pump in c.pumps if pump.client is control_link]
    c.pumps = [entry for entry in c.pumps if entry not in cut]
    return cut


@pytest.mark.parametrize("initial", [3, 5])
def test_a_chain_that_left_one_by_one_comes_back_only_from_the_last_to_leave(tmp_path,
                                                                             initial):
    # The torture run orphan-range seed 8080 (docs/DESIGN.md, "When every replica of a range
    # is down"): the head of a chain is killed, a second later its middle is cut off from the
    # ECS, a second later its tail pauses. The ECS marks them dead in that order, every replica
    # of the range down. The tail wakes, learns the first two deaths (not its own), and as the
    # only member left acknowledges a new value. Then the others come back first: the range
    # must stay down rather than come back from their stale copies (with 3 servers a member
    # would rejoin its chains as it is, with 5 the repair would copy the range from it), until
    # the tail, the last to leave, returns.
    c = Cluster(tmp_path, replication=3, initial=initial, slots=initial)
    try:
        c.start()
        key = KEYS[0]
        head, middle, tail = (n.name for n in c.ring().chain(key))
        members = list(c.ecs.state.ring_members)
        c.run(c.servers[head].node.put(key, b"v1"))
        c.drop(head)
        c.pass_time(INTERVAL)
        middle_link = cut_from_ecs(c, middle)
        c.pass_time(INTERVAL)
        c.hung.add(tail)
        c.pass_time(TIMEOUT + 4 * INTERVAL)
        left = c.ecs.state.departures()
        assert left[head] < left[middle] < left[tail]
        assert c.ecs.state.ring_members == members  # nothing repaired away
        # The tail wakes: it adopts the rings the ECS sent it while it was paused (the first
        # two deaths), then loses its link to the ECS, which had marked it dead meanwhile.
        c.hung.discard(tail)
        c.settle()
        assert [n.name for n in c.servers[tail].node.ring.chain(key)] == [tail]
        c.run(c.servers[tail].node.put(key, b"v2"))
        assert c.servers[middle].node.stores[STORE_NAMES[1]].get(key) == b"v1"

        def still_down() -> None:
            assert c.ecs.state.ring_members == members
            assert {head, middle, tail} <= c.ecs.state.dead

        # The head, the first to leave, restarts on its files; then the middle's partition
        # heals and it reconnects. Neither holds v2: the range stays down.
        c.start_server(c.config.slot(head))
        c.pass_time(2 * LEASE_SECONDS + 4 * INTERVAL)
        still_down()
        c.pumps.extend(middle_link)
        c.settle()
        c.connect_to_ecs(c.servers[middle])
        c.pass_time(2 * LEASE_SECONDS + 4 * INTERVAL)
        still_down()
        # The tail reconnects: the range comes back from it, with the value it acknowledged.
        c.connect_to_ecs(c.servers[tail])
        c.pass_time(2 * LEASE_SECONDS + 4 * INTERVAL)
        assert not c.ecs.state.dead
        chain = c.ring().chain(key)
        assert c.servers[chain[-1].name].node.get(key) == b"v2"
        for role, node in enumerate(chain):
            assert c.servers[node.name].node.stores[STORE_NAMES[role]].get(key) == b"v2"
    finally:
        c.close()


def _delete_then_retry(c: Cluster, head: KVNode, tail: KVNode, key: bytes) -> None:
    """Another client deletes C{key}; then the put of C{b"first"} under request id rid-1 is
    retried at C{head}: answered as done (a retry reports the key as existing), and not
    applied again. A new request id is a new write."""
    c.run(head.delete(key, request_id=b"rid-2"))
    assert c.run(head.put(key, b"first", request_id=b"rid-1")) is True
    with pytest.raises(KeyNotFound):
        tail.get(key)
    c.run(head.put(key, b"again", request_id=b"rid-3"))
    assert tail.get(key) == b"again"


def test_a_retried_write_is_not_applied_again_after_its_range_moved_to_another_store(tmp_path):
    # A put reaches every replica but its acknowledgement dies with its head; the client
    # retries with the same request id. Meanwhile the repair merges the dead head's range into
    # its successor's own range (another store on that server), and another client deletes
    # the key. The retry must be answered as done: applying it again would bring back a value
    # that an acknowledged delete removed.
    c = Cluster(tmp_path, replication=3, initial=3)
    try:
        c.start()
        ring = c.ring()
        key = KEYS[0]
        head, middle, _ = (n.name for n in ring.chain(key))
        c.run(c.servers[head].node.put(key, b"first", request_id=b"rid-1"))
        c.drop(head)
        c.pass_time(TIMEOUT + 4 * INTERVAL)
        assert head not in c.ecs.state.ring_members  # repaired: the range has a new owner
        new_head, *_, tail = (c.servers[n.name].node for n in c.ring().chain(key))
        assert new_head is c.servers[middle].node
        _delete_then_retry(c, new_head, tail, key)
    finally:
        c.close()


def test_a_retried_write_is_not_applied_again_by_the_head_a_join_gave_its_range(tmp_path):
    # A put is applied and replicated, its answer lost; a join then gives the key's range to a
    # new server, whose head store is a copy. Another client deletes the key there. The first
    # client's retry (same request id) reaches the new head: it must be answered as done, not
    # applied again, so the request ids travel with the copied range.
    c = Cluster(tmp_path, replication=3, initial=3)
    try:
        c.start()
        new_slot = c.config.nodes[3]
        key = keys_moving_to(c, new_slot)[0]
        old_head = c.servers[c.ring().chain(key)[0].name].node
        c.run(old_head.put(key, b"first", request_id=b"rid-1"))
        c.run(c.ecs.add_nodes(1, "LRU", 50))
        chain = c.ring().chain(key)
        assert chain[0].name == new_slot.name
        new_head, tail = c.servers[chain[0].name].node, c.servers[chain[-1].name].node
        assert new_head.stores["coordinator"].get(key) == b"first"
        _delete_then_retry(c, new_head, tail, key)
    finally:
        c.close()


# -- balanced placement ---------------------------------------------------------------------------

def _shares(ring: Ring) -> dict[str, float]:
    return {n.name: ((ring.range_of(i).end - ring.range_of(i).start) % (1 << RING_BITS)
                     or 1 << RING_BITS) / (1 << RING_BITS) for i, n in enumerate(ring.nodes)}


def test_balanced_placement_spreads_the_first_servers_and_splits_the_largest_range(tmp_path):
    c = Cluster(tmp_path, replication=3, initial=3, placement="balanced")
    try:
        c.start()
        shares = _shares(c.ring())
        assert all(abs(s - 1 / 3) < 1e-9 for s in shares.values()), shares
        # Every server has the ECS's positions, not the hashes of its address.
        for server in c.servers.values():
            assert [n.position for n in server.node.ring.nodes] == \
                [n.position for n in c.ring().nodes]
        place_by_role(c, KEYS)
        c.run(c.ecs.add_nodes(1, "LRU", 50))
        shares = _shares(c.ring())
        # The newcomer took half of one range: 1/6 each for it and the server after it.
        assert sorted(round(s * 6, 6) for s in shares.values()) == [1, 1, 2, 2]
        assert round(shares["s4"] * 6, 6) == 1
        c.check_placement(KEYS)
        # Its position is saved: a restarted ECS resumes the same ring.
        saved = StateFile(c.config.state_file).load()
        assert saved is not None
        assert [m.token for m in (saved.members[n] for n in saved.ring_members)] == \
            [c.ecs.state.members[n].token for n in c.ecs.state.ring_members]
        assert saved.ring().nodes == c.ring().nodes
        assert [n.position for n in saved.ring().nodes] == [n.position for n in c.ring().nodes]
        # So are the chains' formation epochs: the join re-formed exactly the chains s4 entered.
        formed = {n.name: n.chain_epoch for n in c.ring().nodes}
        assert {n.name: n.chain_epoch for n in saved.ring().nodes} == formed
        assert sorted(formed.values()) == [1, c.ecs.state.epoch, c.ecs.state.epoch,
                                           c.ecs.state.epoch]
        for server in c.servers.values():
            assert {n.name: n.chain_epoch for n in server.node.ring.nodes} == formed
        # A server that leaves gives its position up.
        c.run(c.ecs.remove_node("s4"))
        assert c.ecs.state.members["s4"].token is None
        assert all(abs(s - 1 / 3) < 1e-9 for s in _shares(c.ring()).values())
        c.check_placement(KEYS)
    finally:
        c.close()


def test_hash_placement_puts_servers_at_the_md5_of_their_console_address(tmp_path):
    c = Cluster(tmp_path, replication=1, initial=3, placement="hash")
    try:
        c.start()
        for node in c.ring().nodes:
            assert node.token is None
            assert node.position == position(node.console_address.encode())
    finally:
        c.close()


def test_status_says_serving_only_once_every_server_took_its_state(running):
    c = running
    c.run(c.ecs.set_serving(False))
    assert c.ecs.status()["serving"] is False
    c.hung.add("s2")  # its answer to SetState is late
    d = Deferred.fromCoroutine(c.ecs.set_serving(True))
    c.settle()
    assert not d.called
    assert c.ecs.state.serving and c.ecs.status()["serving"] is False
    assert c.servers["s2"].node.state == STOPPED
    c.hung.discard("s2")
    c.settle(until=d)
    assert c.ecs.status()["serving"] is True
    assert all(s.node.state == RUNNING for s in c.servers.values())


# -- liveness: repairs retried until they succeed, ring pushes in parallel ------------------------

def test_the_ecs_repairs_after_more_than_five_failed_attempts(running, monkeypatch):
    ecs = running.ecs
    real_run = ecs.reconfigurer.run
    attempts: list[str] = []

    def failing_run(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[1])
        if len(attempts) <= 7:
            return fail(control.ControlFailed(f"injected failure {len(attempts)}"))
        return Deferred.fromCoroutine(real_run(*args, **kwargs))

    monkeypatch.setattr(ecs.reconfigurer, "run", failing_run)
    running.drop("s2")
    running.pass_time(TIMEOUT + 2 * INTERVAL)
    assert "s2" in ecs.state.dead and attempts
    # Back-off (1, 2, 4, ... up to 30 s): seven failures take about two minutes; between the
    # attempts the ECS is not busy.
    running.pass_time(50)
    assert len(attempts) == 6 and "s2" in ecs.state.ring_members
    assert not ecs.busy.locked
    running.pass_time(80)
    assert len(attempts) == 8
    assert "s2" not in ecs.state.ring_members and not ecs.state.dead
    for name in ("s1", "s3"):
        assert running.servers[name].node.ring.epoch == ecs.state.epoch


def test_a_hung_server_does_not_delay_the_others_hearing_of_a_death(running):
    ecs = running.ecs
    names = [n.name for n in running.ring().nodes]
    dead, successor, other = names[1], names[2], names[0]
    # The dead member's successor, the first to be told, no longer answers (not yet declared
    # failed itself). Half-way between two heartbeat rounds (whose answers would make the ECS
    # resend the ring to a server behind), the ECS declares the first one failed.
    running.drop(dead)
    running.hung.add(successor)
    running.clock.advance(INTERVAL / 2)
    ecs._failing.add(dead)
    ecs._declare_failed(dead)
    running.settle()
    assert dead in ecs.state.dead and successor not in ecs.state.dead
    # The other server has the new epoch at once, not after the hung one's call times out.
    assert running.servers[other].node.ring.epoch == ecs.state.epoch
    assert dead in running.servers[other].node.ring.dead


def test_a_server_gone_while_it_is_updated_is_one_log_line_without_a_traceback(running):
    # A server that dies just as it registers (or is updated) is the heartbeats' business: an
    # operator's log gets one line naming it and why, not a ConnectionLost traceback.
    from twisted.internet.error import ConnectionLost
    from twisted.logger import globalLogPublisher
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        ecs = running.ecs
        ecs.calls.call = lambda *a, **k: fail(ConnectionLost("the connection was lost"))
        running.run(ecs._sync("s1"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if "could not update" in e.get("log_format", "")]
    assert len(lines) == 1 and "log_failure" not in lines[0]
    assert "ConnectionLost" in lines[0]["error"] and lines[0]["name"] == "s1"


def test_an_ecs_restarted_before_its_first_ring_formed_starts_its_servers_again(cluster):
    # Stopped while its first servers start (one registered, two launching), an ECS used to
    # resume the empty ring on its next start and wait for an admin for ever.
    cluster.launcher.auto_start = False
    cluster.ecs.start()
    cluster.start_server(cluster.config.slot("s1"))
    cluster.settle()
    saved = StateFile(cluster.config.state_file).load()
    assert saved is not None and not saved.formed and not saved.ring_members
    assert {m.status for m in saved.members.values()} == {"idle", "launching"}
    cluster.ecs.stop()
    for server in cluster.servers.values():  # the launcher's stop_all ended them
        server.node.stores.close()
    cluster.servers.clear()
    cluster.pumps.clear()
    cluster.launcher.auto_start = True
    cluster.ecs = cluster.new_ecs()
    cluster.start()
    assert cluster.ecs.state.formed and cluster.ecs.state.serving
    assert sorted(cluster.ecs.state.ring_members) == ["s1", "s2", "s3"]
    # Once formed, a restart resumes that ring, whatever it holds.
    assert StateFile(cluster.config.state_file).load().formed


def test_with_replace_failed_a_failed_server_is_repaired_away_and_its_slot_joins_again(tmp_path):
    # Off (the default) the ring stays smaller after a repair until an admin adds a server; on,
    # the ECS adds one itself: here the failed server's own slot, launched again, empty, and
    # filled by the join's copies.
    import dataclasses
    c = Cluster(tmp_path, replication=3, initial=3, slots=3)
    try:
        c.config = dataclasses.replace(c.config, replace_failed="on")
        c.ecs = c.new_ecs()
        c.start()
        place_by_role(c, KEYS)
        victim = "s2"
        c.hung.add(victim)
        launched = len(c.launcher.launched)
        c.pass_time(TIMEOUT + 10 * INTERVAL)
        assert c.launcher.launched[launched:] == [victim]
        assert sorted(c.ecs.state.ring_members) == ["s1", "s2", "s3"]
        assert not c.ecs.state.dead and c.ecs.state.members[victim].status == ACTIVE
        assert c.servers[victim].node.ring.epoch == c.ring().epoch
        c.check_placement(KEYS)
    finally:
        c.close()


def test_without_replace_failed_the_ring_stays_smaller_after_a_repair(ring3):
    launched = len(ring3.launcher.launched)
    ring3.hung.add("s2")
    ring3.pass_time(TIMEOUT + 10 * INTERVAL)
    assert ring3.launcher.launched[launched:] == []
    assert sorted(ring3.ecs.state.ring_members) == ["s1", "s3"]
