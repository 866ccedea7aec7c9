"""Fenced copies (issue 10, part 4): a late batch of an aborted reconfiguration attempt never
lands after the retry wiped the range, and a source whose ECS link drops stops streaming.

Servers are real KVNodes on SQLite stores with their ServerControlProtocol, driven over iosim
by a recording ECS peer (tests/test_ecs_link.py); a copy's connection to its target is an iosim
pair the test pumps by hand, so a batch can be held on the wire and delivered late.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.protocols import amp
from twisted.test import iosim

from chainstore import control, migration
from chainstore.amp_server import KVServerProtocol
from chainstore.ecs_link import ServerControlProtocol
from chainstore.node import KVNode
from chainstore.ring import KeyRange, position
from test_ecs_coordinator import KEYS, Cluster
from test_ecs_link import HALF, PEER, Link, RecordingECS, make_node, ring

RANGE = KeyRange(HALF, 0)


class Wire:
    """Copy connections to one target, each pumped only when the test says so."""

    def __init__(self, target: KVNode) -> None:
        self.target = target
        self.pumps: list[iosim.IOPump] = []
        self.batches = 0  # ReceiveRange boxes the target received, accepted or not
        self.refused: list[str] = []

    def connect(self, host: str, port: int) -> Deferred[amp.AMP]:
        assert (host, port) == (PEER.host, PEER.amp_port)
        wire = self

        class Target(KVServerProtocol):
            @control.ReceiveRange.responder
            def receive_range(self, **kwargs: Any) -> Deferred[dict[str, Any]]:
                wire.batches += 1
                try:
                    written = super().receive_range(**kwargs)
                except control.StaleEpoch as e:
                    wire.refused.append(str(e))
                    raise

                def refused(failure: Any) -> Any:
                    failure.trap(control.StaleEpoch)
                    wire.refused.append(str(failure.value))
                    return failure
                return written.addErrback(refused)

        client, _server, pump = iosim.connectedServerAndClient(
            lambda: Target(self.target), amp.AMP, greet=False, clock=self.target.clock)
        self.pumps.append(pump)
        return succeed(client)


class TargetLink(Link):
    """The ECS's control link to the copies' target (for the DropRange that prepares it)."""

    def __init__(self, node: KVNode) -> None:
        self.clock, self.node, self.shutdowns = node.clock, node, 0
        self.ecs = RecordingECS()
        self.server = ServerControlProtocol(node, node.clock, lambda: None)
        _, _, pump = iosim.connectedServerAndClient(
            lambda: self.ecs, lambda: self.server, greet=False, clock=node.clock)
        self.pumps = [pump]
        self.pump()

    def prepare(self, attempt: int) -> None:
        self.call(control.DropRange, store="replica1", start=RANGE.start, end=RANGE.end,
                  attempt=attempt)


def in_range(count: int) -> list[bytes]:
    return [k for k in (b"k%05d" % i for i in range(count * 4)) if position(k) in RANGE][:count]


def contents(store: Any) -> dict[bytes, bytes]:
    return dict(store.items())


def copy_args(epoch: int) -> dict[str, Any]:
    return {"operation": 1, "store": "coordinator", "start": RANGE.start, "end": RANGE.end,
            "target_host": PEER.host, "target_port": PEER.amp_port,
            "target_store": "replica1", "epoch": epoch}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    # Small batches: a copy of 30 keys is three batches.
    monkeypatch.setattr(migration, "BATCH_KEYS", 10)
    # One batch unconfirmed at a time, so that exactly one is held on the wire.
    monkeypatch.setattr(migration, "COPY_WINDOW", 1)
    holder: dict[str, Wire] = {}
    source = Link(tmp_path / "old", connect_peer=lambda h, p: holder["wire"].connect(h, p))
    source.pump()
    target = make_node(tmp_path, source.clock, PEER)
    target.set_ring(ring(PEER, epoch=5))
    wire = holder["wire"] = Wire(target)
    migration.write_batch(source.node.stores["coordinator"], [(k, b"old") for k in in_range(30)])
    yield source, target, wire
    target.stores.close()
    source.close()


def stream_one_batch(source: Link, wire: Wire, epoch: int) -> iosim.IOPump:
    """Start a CopyRange at C{source}; the first batch lands and is confirmed, and the second
    is left on the wire, sent but not delivered. The copy's pump."""
    source.ecs.callRemote(control.CopyRange, **copy_args(epoch)).addErrback(lambda f: None)
    source.pump()
    copy = wire.pumps[-1]
    while wire.batches < 1:
        copy.pump(advanceClock=False)
    source.clock.advance(0)  # the batch's turn at the target: written, confirmed
    copy.pump(advanceClock=False)  # the confirmation reaches the source: batch 2 is sent
    assert wire.batches == 1 and copy.clientIO.stream
    return copy


def drop_ecs_link(link: Link) -> None:
    link.pumps[0].serverIO.loseConnection()
    link.pumps[0].flush(advanceClock=False)
    assert link.ecs.lost


def test_a_late_batch_of_an_aborted_attempt_is_refused_after_the_retry_wiped_the_range(
        setup, tmp_path):
    source, target, wire = setup
    fence = TargetLink(target)
    # Attempt 6: the ECS prepares the target (wipes the range) and the source streams it.
    fence.prepare(6)
    held = stream_one_batch(source, wire, 6)
    assert len(target.stores["replica1"]) == 10
    # The attempt aborts (the source's ECS link drops: say the ECS declared it failed); its
    # second batch is still on the wire.
    drop_ecs_link(source)
    # Attempt 7, the retry, from another source whose data is current: half the keys were
    # rewritten since, the others deleted. The ECS wipes the target's range, then copies.
    current = {k: b"new" for k in in_range(30)[::2]}
    links: list[Link] = []

    def connect(host: str, port: int) -> Deferred[amp.AMP]:
        d = wire.connect(host, port)
        links[0].pumps.append(wire.pumps[-1])  # the retry's copy is pumped freely
        return d

    retry = Link(tmp_path / "retry", connect_peer=connect)
    links.append(retry)
    retry.pump()
    migration.write_batch(retry.node.stores["coordinator"], list(current.items()))
    fence.prepare(7)
    assert retry.call(control.CopyRange, **copy_args(7))["keys"] == len(current)
    assert contents(target.stores["replica1"]) == current
    # The old attempt's batch arrives now: it must not bring back old values or deleted keys.
    for _ in range(10):
        held.pump(advanceClock=False)
    assert contents(target.stores["replica1"]) == current
    assert wire.refused == ["copy of attempt 6, but this server was prepared for attempt 7"]
    retry.close()


def test_a_source_whose_ecs_link_drops_sends_no_further_batch(setup):
    source, target, wire = setup
    # The target is not fenced here (never prepared): only the source can stop the copy.
    held = stream_one_batch(source, wire, 6)
    drop_ecs_link(source)
    for _ in range(10):
        held.pump(advanceClock=False)
        source.clock.advance(1)
    # The batch already on the wire arrives; the third is never sent.
    assert wire.batches == 2
    assert len(target.stores["replica1"]) == 20
    # The copy ended: its read lock on the source store is released, its connection closed.
    assert not source.node.stores["coordinator"].lock.locked
    assert held.clientIO.disconnected


def test_a_prepared_target_takes_only_the_batches_of_its_attempt(setup):
    source, target, wire = setup
    fence = TargetLink(target)
    client = wire.connect(PEER.host, PEER.amp_port).result  # type: ignore[attr-defined]
    pump = wire.pumps[-1]

    def send(epoch: int, key: bytes) -> Any:
        out: list[Any] = []
        client.callRemote(control.ReceiveRange, epoch=epoch, store="replica1",
                          items=control.pack_items([(key, b"v")])).addBoth(out.append)
        pump.flush()
        return out[0]

    # Never prepared (a server that has not taken part in a reconfiguration since it
    # started): any copy newer than its ring is taken, as before.
    a, b, x = in_range(3)
    assert send(9, a) == {}
    fence.prepare(7)
    for epoch in (6, 8, 9):
        send(epoch, x).trap(control.StaleEpoch)
    assert send(7, b) == {}
    # A drop without an attempt (after a commit) does not move the fence.
    fence.call(control.DropRange, store="coordinator", start=1, end=2)
    assert target.copy_attempt == 7
    assert set(contents(target.stores["replica1"])) == {b}  # the preparation wiped a


def test_a_batch_waiting_for_its_turn_is_refused_if_the_fence_moved_meanwhile(setup):
    # A target writes its copy batches one per reactor turn (migration.BatchQueue). One that
    # was taken while its attempt was current, but is still waiting when the ECS aborts that
    # attempt and prepares the next, must not be written after the new attempt's wipe.
    _, target, wire = setup
    fence = TargetLink(target)
    fence.prepare(7)
    client = wire.connect(PEER.host, PEER.amp_port).result  # type: ignore[attr-defined]
    key = in_range(1)[0]
    out: list[Any] = []
    client.callRemote(control.ReceiveRange, epoch=7, store="replica1",
                      items=control.pack_items([(key, b"stale")])).addBoth(out.append)
    wire.pumps[-1].flush(advanceClock=False)
    assert wire.batches == 1 and out == []  # taken, waiting for its turn
    # Attempt 8's preparation arrives before that turn.
    prepared: list[Any] = []
    fence.ecs.callRemote(control.DropRange, store="replica1", start=RANGE.start,
                         end=RANGE.end, attempt=8).addBoth(prepared.append)
    fence.pumps[0].flush(advanceClock=False)
    assert target.copy_attempt == 8
    while not prepared:
        target.clock.advance(0)
        fence.pump()
    wire.pumps[-1].flush()
    out[0].trap(control.StaleEpoch)
    assert wire.refused == ["copy of attempt 7, but this server was prepared for attempt 8"]
    assert key not in contents(target.stores["replica1"])


def test_a_reconfiguration_prepares_each_copy_target_for_its_own_attempt(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start()
        cluster.put_all(KEYS)
        before = cluster.ecs.state.last_epoch
        assert cluster.run(cluster.ecs.add_nodes(1, "LRU", 10)) == ["s4"]
        # The join copied into s4, prepared for the attempt's epoch (now the ring's).
        assert cluster.servers["s4"].node.copy_attempt == cluster.ecs.state.epoch > before
        cluster.check_placement(KEYS)
    finally:
        cluster.close()
