"""Fail-stop storage (docs/DESIGN.md, "When storage fails"): a store that fails (a full disk, an
I/O error, corruption; injected with harness.faults) stops the server at once. Every
waiting write is answered with an error, nothing uncommitted is read or forwarded, nothing is
acknowledged that is not committed, and the server leaves the ECS."""

from __future__ import annotations

import json
import os

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from chainstore.cache import make_cache
from chainstore.config import ServerConfig
from chainstore.console import ConsoleFactory
from chainstore.errors import StorageFailed
from chainstore.node import KVNode
from chainstore.ring import NodeInfo, Ring
from chainstore.service import KVServerService
from chainstore.storage import StoreSet, sqlitedbm
from harness import faults
from simnet import SimNet

ME = NodeInfo("s1", "127.0.0.1", 50001, 51001)


class Console:
    def __init__(self, node: KVNode) -> None:
        self.node = node
        self.transport = StringTransport()
        self.proto = ConsoleFactory(node).buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.take()

    def take(self) -> list[bytes]:
        self.node.clock.advance(0)  # the end of the reactor turn: commit, then answer
        lines = self.transport.value().split(b"\r\n")[:-1]
        self.transport.clear()
        return lines

    def ask(self, line: bytes) -> bytes:
        self.proto.dataReceived(line + b"\r\n")
        (reply,) = self.take()
        return reply


def committed(path: str) -> dict[bytes, bytes]:
    """What a SQLite store file holds, read afresh (what a restart would find)."""
    db = sqlitedbm.open(path)
    try:
        return dict(db.items())
    finally:
        db.close()


def test_a_full_disk_answers_every_write_with_an_error_at_once_and_loses_no_acknowledged_one(
        tmp_path):
    data = str(tmp_path / "data")
    node = KVNode(ME, make_cache("LRU", 100), Clock())
    node.stores = StoreSet.open(data)
    console = Console(node)
    for i in range(100):
        assert console.ask(b"put k%d value%d" % (i, i)) == b"put_success k%d" % i
    # The disk fills: COMMIT fails and SQLite keeps the transaction open, with the turn's
    # writes visible to this connection.
    disk = faults.inject(node.stores.coordinator)
    disk.arm(faults.DISK_FULL, faults.commits)
    console.proto.dataReceived(b"".join(b"put n%d late\r\n" % i for i in range(5)))
    replies = console.take()  # the same turn's end: no write waits for a reply
    assert len(replies) == 5
    assert all(r.startswith(b"error storage failed: ") and b"disk is full" in r
               for r in replies), replies
    # No dirty read, from a new connection either; the server stays failed, stats says why.
    other = Console(node)
    assert other.ask(b"get n0").startswith(b"error storage failed")
    assert other.ask(b"get k1").startswith(b"error storage failed")
    assert other.ask(b"put k1 again").startswith(b"error storage failed")
    stats = json.loads(other.ask(b"stats")[len(b"stats "):])
    assert stats["state"] == "failed" and "disk is full" in stats["failure"]
    # Space comes back and the server stops: nothing unacknowledged is committed then.
    disk.disarm()
    node.chain.stop()
    node.stores.close()
    held = committed(os.path.join(data, "coordinator.sqlite"))
    assert held == {b"k%d" % i: b"value%d" % i for i in range(100)}


def test_a_write_failing_mid_turn_at_the_head_leaves_every_replica_identical(tmp_path):
    net = SimNet(tmp_path)
    ring = net.cluster(3)
    names = [n.name for n in ring.chain(b"key0")]
    head = net.nodes[names[0]]
    keys = [k for k in (b"key%d" % i for i in range(400)) if ring.chain(k)[0].name == names[0]]
    acked, late = keys[:20], keys[20:25]
    for key in acked:
        assert net.settle(head.put(key, b"v-" + key)) is False
    # The third new key of the next turn fails at the head (an INSERT refused by a full disk):
    # its group transaction, with the turn's two earlier writes, is rolled back.
    disk = faults.inject(head.stores.coordinator)
    disk.arm(faults.DISK_FULL, lambda sql: sql.startswith("INSERT"), after=2)
    first = [head.put(key, b"late") for key in late[:2]]
    with pytest.raises(StorageFailed):
        head.put(late[2], b"late")
    with pytest.raises(StorageFailed):
        head.put(late[3], b"late")
    outcomes: list[object] = []
    for d in first:
        d.addBoth(outcomes.append)
    net.run(2.0)
    assert len(outcomes) == 2 and all(isinstance(o.value, StorageFailed) for o in outcomes)
    # Nothing of the failed turn reached the successors: head, middle and tail hold the same.
    expected = {key: b"v-" + key for key in acked}
    assert dict(net.nodes[names[1]].stores["replica1"].items()) == expected
    assert dict(net.nodes[names[2]].stores["replica2"].items()) == expected
    head.chain.stop()
    head.stores.close()
    assert committed(str(tmp_path / names[0] / "coordinator.sqlite")) == expected
    head.stores = None
    net.close()


def test_a_middle_whose_store_fails_acknowledges_nothing_and_the_chain_goes_on_without_it(
        tmp_path):
    net = SimNet(tmp_path)
    ring = net.cluster(3)
    names = [n.name for n in ring.chain(b"key0")]
    head, middle = net.nodes[names[0]], net.nodes[names[1]]
    keys = [k for k in (b"key%d" % i for i in range(400)) if ring.chain(k)[0].name == names[0]]
    for key in keys[:10]:
        net.settle(head.put(key, b"v"))
    faults.inject(middle.stores["replica1"]).arm(faults.IO_ERROR)
    waiting = head.put(keys[10], b"w")
    results: list[object] = []
    waiting.addBoth(results.append)
    net.run(2.0)
    assert results == [] and middle.state == "failed"
    # The ECS declares it failed: the head resends its window to the tail, which acks.
    net.kill(names[1])
    net.set_ring(Ring(ring.nodes, epoch=2, replication=3, dead=frozenset({names[1]})),
                 order=[names[2], names[0]])
    net.run(4.0)
    assert results == [False]
    tail = net.nodes[names[2]].stores["replica2"]
    assert dict(tail.items()) == dict(head.stores.coordinator.items())
    net.close()


def test_a_server_whose_storage_fails_leaves_the_ecs_and_refuses_to_serve_again(tmp_path):
    config = ServerConfig(name="s1", data_dir=str(tmp_path / "data"), tls="off",
                          ecs="tcp:127.0.0.1:49999", listen="tcp:51001:interface=127.0.0.1",
                          console="tcp:50001:interface=127.0.0.1").validated()
    reactor = MemoryReactorClock()
    service = KVServerService(config, reactor, credentials=None)
    service.privilegedStartService()
    service.startService()
    try:
        node = service.node
        node.set_ring(Ring((node.me,), epoch=1, replication=1))
        node.state = "running"
        assert service.ecs_link.running
        faults.inject(node.stores.coordinator).arm(faults.IO_ERROR)
        with pytest.raises(StorageFailed):
            node.put(b"k", b"v")
        # No link, so no heartbeats: the ECS's failure detector declares it failed.
        assert not service.ecs_link.running
        from chainstore.ecs_link import ServerControlProtocol
        from chainstore.control import ControlFailed
        link = ServerControlProtocol(node, reactor, lambda: None)
        with pytest.raises(ControlFailed):
            link.set_state("running")
        assert node.state == "failed"
    finally:
        service.stopService()



def _start_warnings(data_dir: str) -> list[str]:
    """The warnings a standalone server logs as it starts on C{data_dir}."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher
    config = ServerConfig(name="s1", data_dir=data_dir, tls="off",
                          listen="tcp:51001:interface=127.0.0.1",
                          console="tcp:50001:interface=127.0.0.1").validated()
    service = KVServerService(config, MemoryReactorClock(), credentials=None)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service.privilegedStartService()
        service.startService()
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]


def test_the_data_directory_is_made_private_and_an_open_one_is_named(tmp_path):
    # The values are the users' data: other local users must not read them (as etcd, a
    # server warns of a data directory open to them, and makes its own 0700).
    import stat
    made = tmp_path / "made"
    assert not any("data directory" in w for w in _start_warnings(str(made)))
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    opened = tmp_path / "opened"
    opened.mkdir(mode=0o755)
    os.chmod(opened, 0o755)
    warned = [w for w in _start_warnings(str(opened)) if "data directory" in w]
    assert len(warned) == 1 and "0755" in warned[0] and "chmod 700" in warned[0]
