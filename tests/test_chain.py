"""Chain replication, deterministically: real KVNodes over a simulated network and a Clock.

The ECS's part (marking a failed server dead in a new epoch) is played by the test with
L{SimNet.set_ring}; everything else is the servers' own code over the real AMP wire format.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from chainstore import chain, protocol
from chainstore.amp_server import KVServerProtocol
from chainstore.console import ConsoleFactory
from chainstore.control import BATCH, StaleEpoch, pack_ops, pack_section
from chainstore.errors import KeyNotFound, NotResponsible, ServerStopped
from chainstore.ring import NodeInfo, Ring
from chainstore.storage import STORE_NAMES
from simnet import SimNet


@pytest.fixture
def net(tmp_path):
    net = SimNet(tmp_path)
    yield net
    net.close()


def keys_headed_by(ring: Ring, name: str, count: int) -> list[bytes]:
    found = []
    i = 0
    while len(found) < count:
        key = b"key%d" % i
        if ring.head(key).name == name:
            found.append(key)
        i += 1
    return found


def replicas_of(net: SimNet, ring: Ring, key: bytes) -> dict[str, bytes | None]:
    """What every member of the key's ring chain holds in the store of its position."""
    index = ring.owner_index(__import__("chainstore.ring").ring.position(key))
    return {n.name: net.nodes[n.name].stores[STORE_NAMES[p]].get(key)
            for p, n in enumerate(ring.ring_chain(index))}


def put(net: SimNet, ring: Ring, key: bytes, value: bytes) -> Deferred[bool]:
    return net.nodes[ring.head(key).name].put(key, value)


def test_a_write_is_answered_only_after_the_tail_applied_it(net):
    ring = net.cluster(5)
    key = keys_headed_by(ring, "n0", 1)[0]
    head, middle, tail = ring.chain(key)
    done = put(net, ring, key, b"v1")
    # Nothing has crossed the network yet: the head has it, the client has no answer.
    assert not done.called
    assert replicas_of(net, ring, key) == {head.name: b"v1", middle.name: None, tail.name: None}
    assert net.settle(done) is False
    assert replicas_of(net, ring, key) == {head.name: b"v1", middle.name: b"v1",
                                           tail.name: b"v1"}
    assert net.settle(put(net, ring, key, b"v2")) is True
    net.run(1.0)
    assert net.nodes[tail.name].get(key) == b"v2"


def test_every_store_holds_exactly_its_roles(net):
    ring = net.cluster(5)
    written = {}
    for name in ("n0", "n1", "n2", "n3", "n4"):
        for key in keys_headed_by(ring, name, 20):
            written[key] = b"value-" + key
            net.settle(put(net, ring, key, written[key]))
    for name, node in net.nodes.items():
        for position, store_name in enumerate(STORE_NAMES):
            expected = {k for k in written
                        if ring.ring_chain(ring.owner_index(
                            __import__("chainstore.ring").ring.position(k)))[position].name
                        == name}
            assert {k for k, _ in node.stores[store_name].items()} == expected


def test_serials_are_persisted_with_the_data(net):
    ring = net.cluster(3)
    keys = keys_headed_by(ring, "n1", 5)
    for key in keys:
        net.settle(put(net, ring, key, b"x"))
    for position, node in enumerate(ring.chain(keys[0])):
        store = net.nodes[node.name].stores[STORE_NAMES[position]]
        cid, serial = store.chain_state()
        assert serial == 5
        assert cid == "|".join(n.name for n in ring.chain(keys[0])) + "@0"


def test_writes_in_flight_are_batched_and_all_answered(net):
    ring = net.cluster(3)
    keys = keys_headed_by(ring, "n0", 600)
    answers = [put(net, ring, k, b"v") for k in keys]
    head = net.nodes["n0"].chain.replicas["n0"]
    # Forwarding waits for the end of the reactor turn, so writes that arrive together
    # travel together: 600 writes, 256 per batch, none answered yet.
    assert not head.window
    net.clock.advance(0)
    assert chain.WINDOW_BATCHES == 2
    assert [len(b.ops) for b in head.window] == [256, 256]
    assert len(head.pending) == 88  # the next batch forms while the window is full
    net.run(1.0)
    assert all(d.called for d in answers)
    assert head.window == type(head.window)() and head.acked == 600
    stats = net.nodes["n0"].stats()["coordinator_chain"]
    assert (stats["batches_sent"], stats["writes_sent"]) == (3, 600)


def deliver(net: SimNet) -> None:
    """Move bytes on every link until none move, without ending a reactor turn (no
    callLater(0) runs): what the servers do within one turn."""
    for _ in range(1_000):
        if not [p for _, _, p in list(net.links) if p.pump(advanceClock=False)]:
            return
    raise AssertionError("the network never went quiet")


def test_an_ack_does_not_forward_a_write_its_head_has_not_committed(net):
    ring = net.cluster(3)
    keys = keys_headed_by(ring, "n0", 3)
    head, middle, tail = ring.chain(keys[0])
    head_store = net.nodes[head.name].stores["coordinator"]
    middle_store = net.nodes[middle.name].stores["replica1"]
    first = [put(net, ring, keys[0], b"one")]
    net.clock.advance(0)
    first.append(put(net, ring, keys[1], b"two"))
    net.clock.advance(0)  # two batches in flight: the window is full
    deliver(net)
    net.clock.advance(0)  # the middle forwards them
    # A write taken in this turn, not committed yet, waits behind the full window...
    third = put(net, ring, keys[2], b"three")
    assert head_store.uncommitted
    # ...when the acks come back within the same turn: it is not forwarded uncommitted. (The
    # tail, another process, ends its own turn: its acknowledgement goes out.)
    deliver(net)
    net.nodes[tail.name].chain._end_turn()
    deliver(net)
    assert all(d.called for d in first) and not third.called
    assert middle_store.get(keys[2]) is None and head_store.uncommitted
    net.clock.advance(0)  # committed, then forwarded
    assert not head_store.uncommitted
    assert net.settle(third) is False
    assert middle_store.get(keys[2]) == b"three"


def put_boxes(keys: list[bytes], value: bytes) -> bytes:
    """The bytes of a client's Put boxes, one per key, as they arrive on the wire."""
    out = b""
    for i, key in enumerate(keys):
        box = protocol.Put.makeArguments({"key": key, "value": value}, None)
        box[b"_command"], box[b"_ask"] = b"Put", b"%d" % (i + 1)
        out += box.serialize()
    return out


BOUND = 1_000_000
VALUE = b"v" * 100_000
ONE_WRITE = chain.OP_HEADER_BYTES + 5 + len(VALUE)


def test_a_backed_up_head_stops_reading_its_clients_refuses_nothing_and_resumes(net, monkeypatch):
    monkeypatch.setattr(chain, "MAX_QUEUED_BYTES", BOUND)
    ring = net.cluster(3)
    *keys, c1, c2 = keys_headed_by(ring, "n0", 42)
    node = net.nodes["n0"]
    client, transport = KVServerProtocol(node), StringTransport()
    client.makeConnection(transport)
    console = ConsoleFactory(node).buildProtocol(None)
    console.makeConnection(StringTransport())
    console.transport.clear()
    # 40 writes of 100 KB, all read at once; the successor has acknowledged none of them.
    client.dataReceived(put_boxes(keys, VALUE))
    net.clock.advance(0)  # committed and forwarded; the batch is not delivered
    successor = ring.chain(keys[0])[1].name
    black_hole(net, "n0", successor)  # ... and never will be on this connection
    head = node.chain.replicas["n0"]
    # Past the bound the connection reads nothing more: the write that crossed it is the last.
    assert node.chain.backlogged and transport.producerState == "paused"
    assert BOUND < node.chain.backlog()[1] <= BOUND + ONE_WRITE
    assert head.last_serial == BOUND // ONE_WRITE + 1
    assert transport.value() == b""  # nothing refused (and nothing acknowledged yet)
    # The console's writes wait too, in order, behind the reads before them.
    console.dataReceived(b"put %s x\nput %s y\n" % (c1, c2))
    assert console.transport.producerState == "paused" and console.transport.value() == b""
    # Replication from peers goes on: n0 is the tail of another range and applies its writes.
    # (Its acknowledgement goes to that range's head, n0's successor, on the dead connection.)
    other_head = next(n.name for n in ring.nodes
                      if ring.chain(keys_headed_by(ring, n.name, 1)[0])[-1].name == "n0")
    other = keys_headed_by(ring, other_head, 1)[0]
    other_put = net.nodes[other_head].put(other, b"w")
    net.run(1.0)
    assert node.stores["replica2"].get(other) == b"w"
    assert node.chain.backlogged and transport.producerState == "paused"
    assert head.last_serial == BOUND // ONE_WRITE + 1
    # The forward times out, is resent on a new connection and acknowledged: the backlog
    # drains, the held writes go on and so does reading, in rounds of about half the bound.
    most = 0
    for _ in range(200):
        net.run(0.5)
        most = max(most, node.chain.backlog()[1])
        if transport.value().count(b"_answer") == len(keys):
            break
    assert transport.value().count(b"_answer") == len(keys)
    assert b"_error" not in transport.value()
    assert most <= BOUND + ONE_WRITE
    assert not node.chain.backlogged and transport.producerState == "producing"
    assert console.transport.value() == b"put_success %s\r\nput_success %s\r\n" % (c1, c2)
    for key in keys:
        assert set(replicas_of(net, ring, key).values()) == {VALUE}
    assert net.settle(other_put) is False


def test_a_held_write_of_a_closed_connection_is_dropped(net, monkeypatch):
    monkeypatch.setattr(chain, "MAX_QUEUED_BYTES", BOUND)
    ring = net.cluster(3)
    keys = keys_headed_by(ring, "n0", 12)
    node = net.nodes["n0"]
    client, transport = KVServerProtocol(node), StringTransport()
    client.makeConnection(transport)
    client.dataReceived(put_boxes(keys, VALUE))
    net.clock.advance(0)
    assert node.chain.backlogged and len(node.chain._room_waiters) == 1
    client.connectionLost(Failure(ConnectionDone()))
    assert not node.chain._room_waiters  # it holds nothing for a connection that is gone
    net.run(1.0)
    assert not node.chain.backlogged
    assert node.stores[STORE_NAMES[0]].get(keys[-1]) is None


def test_a_duplicate_request_id_is_not_applied_twice(net):
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n2", 1)[0]
    head = net.nodes[ring.head(key).name]
    net.settle(head.put(key, b"first", request_id=b"req-1"))
    net.settle(head.put(key, b"second", request_id=b"req-2"))
    # A retry of req-1 arrives late: it must not overwrite req-2's value.
    net.settle(head.put(key, b"first", request_id=b"req-1"))
    net.run(1.0)
    assert set(replicas_of(net, ring, key).values()) == {b"second"}
    assert head.chain.replicas[ring.head(key).name].last_serial == 2


def test_a_retried_put_answered_as_a_duplicate_leaves_the_tails_cache_alone(net):
    # torture combined, seed 404 (/work/shared/evidence/craq-combined-seed404): a put's
    # client-level retry reached the key's last live member (head and tail at once, after its
    # head and middle failed) after a delete and a newer put; the member answered it as a
    # duplicate without applying it, but wrote the retried value through its cache, and the
    # next get read the old value from the cache.
    ring = net.cluster(5)
    key = keys_headed_by(ring, "n1", 1)[0]
    head, middle, tail = ring.chain(key)
    net.settle(net.nodes[head.name].put(key, b"p4-34", request_id=b"req-put"))
    assert net.nodes[tail.name].get(key) == b"p4-34"  # the tail caches it
    net.kill(head.name)
    ring = _mark_dead(net, ring, head.name)
    net.kill(middle.name)
    ring = _mark_dead(net, ring, middle.name)
    assert ring.chain(key) == (tail,)
    last = net.nodes[tail.name]
    net.run(3.0)  # the leases the tail granted its old predecessor run out
    net.settle(last.delete(key, request_id=b"req-delete"))
    net.settle(last.put(key, b"p3-49", request_id=b"req-newer"))
    # The retry is answered (the write was applied before), and applied no second time.
    assert net.settle(last.put(key, b"p4-34", request_id=b"req-put")) is True
    assert last.stores[STORE_NAMES[2]].get(key) == b"p3-49"
    assert last.get(key) == b"p3-49"


def test_a_retried_put_on_a_standalone_server_leaves_its_cache_alone(net):
    ring = net.cluster(1, replication=1)
    node = net.nodes[ring.head(b"k").name]
    net.settle(node.put(b"k", b"first", request_id=b"req-1"))
    net.settle(node.put(b"k", b"second", request_id=b"req-2"))
    net.settle(node.put(b"k", b"first", request_id=b"req-1"))
    assert node.get(b"k") == b"second"


def test_writes_of_an_older_ring_are_ignored_and_of_a_newer_one_held_until_it_is_adopted(net):
    ring = net.cluster(3)
    node = net.nodes["n1"]
    owner = ring.chain(keys_headed_by(ring, "n0", 1)[0])[0].name
    replica = node.chain.replicas[owner]
    assert not replica.is_head
    with pytest.raises(StaleEpoch):
        node.chain.grant_lease(ring.epoch + 1, owner)
    batch = b"".join(pack_section(BATCH, owner, 0, pack_ops([(1, 0, b"k", b"v", b"")])))
    node.chain.relayed(ring.epoch - 1, batch)  # (its sender resends when it adopts ours)
    node.chain.relayed(ring.epoch + 1, batch)
    assert replica.last_serial == 0 and replica.store.get(b"k") is None
    node.set_ring(Ring(ring.nodes, epoch=ring.epoch + 1, replication=ring.replication))
    assert node.chain.replicas[owner] is replica
    assert replica.last_serial == 1 and replica.store.get(b"k") == b"v"


def _mark_dead(net: SimNet, ring: Ring, name: str, order: list[str] | None = None) -> Ring:
    new = Ring(ring.nodes, epoch=ring.epoch + 1, replication=ring.replication,
               dead=ring.dead | {name})
    net.set_ring(new, order)
    return new


def test_middle_failure_the_head_resends_its_window_to_the_tail(net):
    ring = net.cluster(5)
    keys = keys_headed_by(ring, "n0", 300)
    head, middle, tail = ring.chain(keys[0])
    acked = [put(net, ring, k, b"early") for k in keys[:100]]
    net.run(0.5)
    assert all(d.called for d in acked)
    net.kill(middle.name)
    in_flight = [put(net, ring, k, b"late") for k in keys[100:]]
    net.run(0.5)
    assert not any(d.called for d in in_flight)
    # The ECS tells the successor first, then the predecessor, which resends its window.
    order = [tail.name] + [n for n in net.nodes if n not in (tail.name, middle.name)]
    ring = _mark_dead(net, ring, middle.name, order)
    # The dead middle may still answer reads until the read lease the tail granted it runs
    # out (chainstore/craq.py): until then the tail takes no write that bypasses it.
    accept_from = net.nodes[tail.name].chain.replicas[head.name].accept_from
    assert accept_from > net.clock.seconds()
    net.run(accept_from - net.clock.seconds() - 0.1)
    assert not any(d.called for d in in_flight)
    net.run(0.5)
    assert all(d.called and d.result is False for d in in_flight)
    for key in keys:
        want = b"early" if key in keys[:100] else b"late"
        assert net.nodes[head.name].stores["coordinator"].get(key) == want
        assert net.nodes[tail.name].stores["replica2"].get(key) == want
        assert net.nodes[tail.name].get(key) == want


def test_a_window_resent_after_a_middle_failure_is_applied_once(net, monkeypatch):
    """The framing of Relay (a box read and written directly, sections of batches of several
    AMP chunks, values passed on as memoryviews of the batch): a window that reached the tail
    through a middle, resent to the tail by the head when the middle fails, is applied there
    once, whole and in serial order."""
    ring = net.cluster(5)
    keys = keys_headed_by(ring, "n0", 40)
    head, middle, tail = ring.chain(keys[0])
    tail_node = net.nodes[tail.name]
    tail_replica = tail_node.chain.replicas[head.name]
    # Values of 30,000 bytes: a batch of them is cut at 512 KiB and spans several 65,535-byte
    # chunks of its box; each value differs, so a mix-up of offsets would show.
    values = {k: bytes([i % 251]) * 29_990 + b"%010d" % i for i, k in enumerate(keys)}
    applied: list[int] = []
    real_apply_ops = tail_replica.store.apply_ops

    def recording_apply_ops(ops, serial):
        applied.extend(op[0] for op in ops)
        real_apply_ops(ops, serial)

    monkeypatch.setattr(tail_replica.store, "apply_ops", recording_apply_ops)
    # The tail applies what reaches it but never acknowledges: the head's window still holds
    # every batch the tail already has.
    real_ack_head = tail_node.chain._ack_head
    monkeypatch.setattr(tail_node.chain, "_ack_head", lambda replica: None)
    first = [net.nodes[head.name].put(k, values[k], b"id-%d" % i)
             for i, k in enumerate(keys[:30])]
    net.run(0.5)
    head_replica = net.nodes[head.name].chain.replicas[head.name]
    assert not any(d.called for d in first)
    sent = [op[0] for batch in head_replica.window for op in batch.ops]
    assert len(head_replica.window) == 2 and sent == applied and len(sent) > 2
    assert all(len(pack_ops(b.ops)) > 65_535 for b in head_replica.window)  # several chunks
    # The middle fails; more writes wait at the head meanwhile (and one of them is a delete).
    net.kill(middle.name)
    monkeypatch.setattr(tail_node.chain, "_ack_head", real_ack_head)
    later = [net.nodes[head.name].put(k, values[k], b"id-%d" % (30 + i))
             for i, k in enumerate(keys[30:39])]
    later.append(net.nodes[head.name].delete(keys[0], b"id-delete"))
    order = [tail.name] + [n for n in net.nodes if n not in (tail.name, middle.name)]
    ring = _mark_dead(net, ring, middle.name, order)
    # (The tail takes writes once the read lease it granted the middle has run out.)
    net.run(chain.LEASE_SECONDS + 1.0)
    assert all(d.called for d in first + later)
    # Every serial applied once, in order: the resent batches the tail had were skipped.
    assert applied == list(range(1, 41))
    assert tail_replica.last_serial == head_replica.last_serial == 40
    assert head_replica.acked == 40 and not head_replica.window
    assert tail_node.get(keys[1]) == values[keys[1]]
    for key in keys[1:39]:
        assert tail_replica.store.get(key) == values[key]
    assert tail_replica.store.get(keys[0]) is None


def test_head_failure_the_middle_becomes_head_and_continues_the_serials(net):
    ring = net.cluster(5)
    keys = keys_headed_by(ring, "n3", 50)
    head, middle, tail = ring.chain(keys[0])
    for key in keys[:40]:
        net.settle(put(net, ring, key, b"acked"))
    net.kill(head.name)
    ring = _mark_dead(net, ring, head.name)
    assert ring.head(keys[0]) == middle
    # The new head takes writes once the read lease it granted the old head has run out.
    accept_from = net.nodes[middle.name].chain.replicas[head.name].accept_from
    with pytest.raises(ServerStopped):
        put(net, ring, keys[40], b"too early")
    net.clock.advance(accept_from - net.clock.seconds())
    for key in keys[40:]:
        net.settle(put(net, ring, key, b"after"))
    replica = net.nodes[middle.name].chain.replicas[head.name]
    assert replica.is_head and replica.last_serial == 50
    for key in keys:
        assert net.nodes[tail.name].get(key) == (b"acked" if key in keys[:40] else b"after")


def test_tail_failure_the_middle_becomes_tail_after_the_lease_it_granted(net):
    ring = net.cluster(5)
    keys = keys_headed_by(ring, "n1", 20)
    head, middle, tail = ring.chain(keys[0])
    for key in keys[:10]:
        net.settle(put(net, ring, key, b"acked"))
    net.run(1.0)  # the tail holds a fresh lease from the middle
    granted = net.nodes[middle.name].chain.replicas[head.name].granted_until
    assert granted > net.clock.seconds()
    net.kill(tail.name)
    in_flight = [put(net, ring, k, b"late") for k in keys[10:]]
    net.flush()
    ring = _mark_dead(net, ring, tail.name)
    # Until the lease it granted has run out, the new tail neither reads nor acknowledges.
    with pytest.raises(NotResponsible):
        net.nodes[middle.name].get(keys[0])
    assert not any(d.called for d in in_flight)
    net.clock.advance(granted - net.clock.seconds() + 0.01)
    net.flush()
    assert all(d.called for d in in_flight)
    net.run(1.0)
    assert net.nodes[middle.name].get(keys[0]) == b"acked"
    assert net.nodes[middle.name].get(keys[15]) == b"late"


def _head_and_leased_tail(net: SimNet) -> tuple[Ring, bytes, NodeInfo, NodeInfo]:
    """A chain of five servers down to its head and tail (the middle dead), a key written
    and the tail holding a fresh lease from the head: (ring, key, head, tail)."""
    ring = net.cluster(5)
    key = keys_headed_by(ring, "n1", 1)[0]
    head, middle, tail = ring.chain(key)
    net.kill(middle.name)
    ring = _mark_dead(net, ring, middle.name)
    net.run(1.0)
    net.settle(put(net, ring, key, b"old"))
    net.run(1.0)  # the tail holds a fresh lease from the head
    assert net.nodes[tail.name].get(key) == b"old"
    return ring, key, head, tail


def test_a_head_left_alone_waits_out_the_lease_it_granted_before_it_reads_or_acknowledges(net):
    # python -m torture --long --seed 8128 (combined): a chain down to two, head and tail; the
    # tail is cut off and declared failed, which leaves the head alone. It acknowledged a delete
    # and a put at once, while the cut-off tail, under the lease the head had just granted it,
    # still answered the value they had replaced. A chain of one needs no lease to read, but
    # until the one it granted has run out its old tail may answer.
    ring, key, head, tail = _head_and_leased_tail(net)
    granted = net.nodes[head.name].chain.replicas[head.name].granted_until
    assert granted > net.clock.seconds()
    net.down.add(tail.name)  # cut off, alive: it still answers under its lease
    ring = _mark_dead(net, ring, tail.name)
    alone = net.nodes[head.name]
    answer = alone.put(key, b"new")
    net.flush()
    assert not answer.called
    with pytest.raises(NotResponsible):
        alone.get(key)
    net.clock.advance(granted - net.clock.seconds() + 0.01)
    net.flush()
    assert answer.called
    assert alone.get(key) == b"new"


def test_a_restarted_granter_waits_out_the_leases_its_previous_process_granted(net):
    # The lease a replica granted lives in its process's memory (granted_until): a head killed
    # and started again on its files, in the same ring, has forgotten the lease it granted its
    # tail just before. The tail is then cut off and declared failed, leaving the head alone:
    # it took the tail role at once, acknowledging a put while the cut-off tail still answered
    # the value it replaced under the lease the old process had granted.
    ring, key, head, tail = _head_and_leased_tail(net)
    held = net.nodes[tail.name].chain.replicas[head.name].lease_until
    assert held > net.clock.seconds() + 1.0
    net.kill(head.name)
    restarted = net.restart(head, ring)
    net.flush()
    net.down.add(tail.name)  # cut off, alive: it still answers under its lease
    assert net.nodes[tail.name].get(key) == b"old"
    ring = _mark_dead(net, ring, tail.name)
    answer = None
    while answer is None or not answer.called:
        if net.clock.seconds() < held:
            with pytest.raises(NotResponsible):
                restarted.get(key)
        if answer is None:
            try:
                answer = restarted.put(key, b"new")
            except ServerStopped:  # (refused until then: the client tries again)
                pass
        net.flush()
        if answer is None or not answer.called:
            net.clock.advance(0.05)
    assert net.clock.seconds() >= held  # acknowledged only once the old lease ran out
    assert restarted.get(key) == b"new"


def test_a_paused_tail_does_not_answer_reads_when_it_wakes(net):
    ring = net.cluster(5)
    key = keys_headed_by(ring, "n2", 1)[0]
    head, middle, tail = ring.chain(key)
    net.settle(put(net, ring, key, b"old"))
    net.run(1.0)
    zombie = net.nodes[tail.name]
    assert zombie.get(key) == b"old"
    # The tail is paused: it neither sends nor receives. The ECS declares it failed and the
    # cluster moves on to a new epoch without it, and a new value is committed.
    net.down.add(tail.name)
    others = [n for n in net.nodes if n != tail.name]
    new = Ring(ring.nodes, epoch=ring.epoch + 1, replication=3, dead={tail.name})
    net.run(3.0)
    for name in others:
        net.nodes[name].set_ring(new)
    net.settle(net.nodes[head.name].put(key, b"new"))
    # The zombie wakes with its old ring: its lease has expired and cannot be renewed. (A
    # read waits a moment for the lease it keeps asking for, then is refused.)
    net.down.discard(tail.name)
    net.run(1.0)
    assert zombie.ring.epoch == ring.epoch
    answer = zombie.get(key)
    assert isinstance(answer, Deferred)
    net.run(chain.LEASE_WAIT - 0.1)
    assert not answer.called
    with pytest.raises(NotResponsible):
        net.settle(answer)
    assert net.nodes[middle.name].get(key) == b"new"


def test_a_restarted_replica_skips_what_it_already_has(net, tmp_path):
    ring = net.cluster(3)
    keys = keys_headed_by(ring, "n0", 30)
    head, middle, tail = ring.chain(keys[0])
    for key in keys[:20]:
        net.settle(put(net, ring, key, b"v"))
    # The middle restarts: new process, same files; the head resends what it had in flight.
    net.kill(middle.name)
    in_flight = [put(net, ring, k, b"w") for k in keys[20:]]
    net.flush()
    restarted = net.restart(middle, ring)
    assert restarted.chain.replicas[head.name].last_serial == 20
    # (a restarted replica takes writes once the leases its old process may have granted ran out)
    net.run(chain.LEASE_SECONDS + 1.0)
    assert all(d.called for d in in_flight)
    assert net.nodes[tail.name].chain.replicas[head.name].last_serial == 30


def test_a_delete_of_a_missing_key_waits_for_earlier_writes(net):
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n1", 1)[0]
    head = net.nodes[ring.head(key).name]
    first = head.delete(key, request_id=b"r1")
    with pytest.raises(KeyNotFound):
        net.settle(first)
    # Its retry finds nothing either: "not found" again, never "deleted".
    with pytest.raises(KeyNotFound):
        net.settle(head.delete(key, request_id=b"r1"))
    net.settle(head.put(key, b"v"))
    net.settle(head.delete(key))
    net.run(1.0)
    assert set(replicas_of(net, ring, key).values()) == {None}


def test_a_restarted_head_resumes_its_chain_past_writes_it_never_forwarded(net):
    ring = net.cluster(3)
    keys = keys_headed_by(ring, "n0", 30)
    head, middle, tail = ring.chain(keys[0])
    for key in keys[:10]:
        net.settle(put(net, ring, key, b"acked"))
    # Writes committed at the head whose forward never leaves it: the head dies with its
    # window, and comes back on the same files.
    lost = [put(net, ring, k, b"never-forwarded") for k in keys[10:15]]
    black_hole(net, head.name, middle.name)
    net.clock.advance(0)  # committed locally; never delivered
    net.kill(head.name)
    assert not any(d.called for d in lost)
    # The middle learns the tail's progress from the head, which must not pass on its own last
    # serial as acknowledged: the tail has only 10 (the middle would trim writes from its
    # window that the tail may still need).
    middle_chain, tail_replica = net.nodes[middle.name].chain, \
        net.nodes[tail.name].chain.replicas[head.name]
    real_advance, told = middle_chain._advance, []

    def advance(replica, acked):
        told.append((acked, tail_replica.last_serial))
        real_advance(replica, acked)
    middle_chain._advance = advance
    restarted = net.restart(head, ring)
    assert restarted.chain.replicas[head.name].last_serial == 15
    # (a restarted replica takes writes once the leases its old process may have granted ran out)
    net.run(chain.LEASE_SECONDS + 0.1)
    # New writes flow again: the successor skips the gap of writes nobody acknowledged.
    for key in keys[15:]:
        assert net.settle(restarted.put(key, b"after")) is False
    assert told and all(acked <= at_tail for acked, at_tail in told)
    net.run(1.0)
    for key in keys[:10]:
        assert net.nodes[tail.name].get(key) == b"acked"
    for key in keys[15:]:
        assert net.nodes[tail.name].get(key) == b"after"
    for d in lost:
        d.addErrback(lambda f: None)


def test_a_restarted_middle_forwards_what_its_old_window_lost(net):
    ring = net.cluster(3)
    keys = keys_headed_by(ring, "n0", 20)
    head, middle, tail = ring.chain(keys[0])
    for key in keys[:5]:
        net.settle(put(net, ring, key, b"acked"))
    # The middle applies writes but its link to the tail is cut: nothing is acknowledged.
    net.cut.add(frozenset((middle.name, tail.name)))
    waiting = [put(net, ring, k, b"in-flight") for k in keys[5:]]
    net.run(0.5)
    assert not any(d.called for d in waiting)
    assert net.nodes[middle.name].chain.replicas[head.name].last_serial == 20
    # It crashes: what it had queued for the tail is lost with the process; the head sees its
    # connection drop. It restarts on its files, the link heals, the head resends its window.
    for source, target, pump in list(net.links):
        if middle.name in (source, target):
            net.links.remove((source, target, pump))
            if tail.name not in (source, target):
                pump.clientIO.loseConnection()
                pump.serverIO.loseConnection()
                pump.pump()
    net.cut.clear()
    net.restart(middle, ring)
    # (a restarted replica takes writes once the leases its old process may have granted ran out)
    net.run(chain.LEASE_SECONDS + 1.0)
    # Every write the head acknowledges is at the tail: none was answered from the middle's
    # memory of writes it had never passed on.
    assert all(d.called for d in waiting)
    for key in keys:
        want = b"acked" if key in keys[:5] else b"in-flight"
        assert net.nodes[tail.name].stores["replica2"].get(key) == want


def test_a_server_that_missed_a_ring_does_not_take_a_re_formed_chain_for_its_old_one(net):
    ring = net.cluster(3)
    keys = keys_headed_by(ring, "n1", 6)
    head, middle, tail = ring.chain(keys[0])
    for key in keys[:5]:
        net.settle(put(net, ring, key, b"old"))
    # Meanwhile the chain changed and came back with the same members (epochs 2 and 3): the
    # head and the middle went through it, so their stores hold another chain's state and
    # their serials start again; the tail missed ring 2 and still holds serial 5 of the old
    # chain. The ECS gives the re-formed chain the epoch it was formed at.
    for node in (head, middle):
        store = net.nodes[node.name].chain.replicas[head.name].store
        store.set_chain_state("the chain of ring 2", 0)
    reformed = Ring(tuple(replace(n, chain_epoch=3) if n.name == head.name else n
                          for n in ring.nodes), epoch=3, replication=3)
    net.set_ring(reformed)
    tail_replica = net.nodes[tail.name].chain.replicas[head.name]
    assert tail_replica.last_serial == 0  # a new chain: not serial 5 of the old one
    # So the new chain's first write (serial 1 again) is applied at the tail, not skipped as
    # one it already had (and then acknowledged without being there).
    net.settle(put(net, reformed, keys[5], b"new"))
    assert tail_replica.last_serial == 1
    assert net.nodes[tail.name].get(keys[5]) == b"new"


# -- liveness: the lease loop and calls to hung peers --------------------------------------------

def test_lease_renewals_survive_an_exception(net, monkeypatch):
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n0", 1)[0]
    head, middle, tail = ring.chain(key)
    net.settle(put(net, ring, key, b"v"))
    net.run(1.0)
    tail_chain = net.nodes[tail.name].chain
    assert net.nodes[tail.name].get(key) == b"v"
    real_get = tail_chain.peers.get
    raised = []

    def get_once(node):
        if not raised:
            raised.append(node)
            raise RuntimeError("injected")
        return real_get(node)

    monkeypatch.setattr(tail_chain.peers, "get", get_once)
    net.run(1.0)  # a renewal round raised
    assert raised
    # Leases go on being renewed: the tail still reads, many leases later.
    net.run(5 * chain.LEASE_SECONDS)
    assert net.nodes[tail.name].get(key) == b"v"


def test_reads_right_after_the_ring_wait_for_leases_refused_at_first(net):
    """The ECS says "serving" once every server has its state, and each server asks for its
    read leases when it adopts the ring, as the ECS's calls go out. A granter that has not yet
    had an Alive answered (or adopts the ring a moment later) refuses, and the next request
    goes out LEASE_RETRY_SECONDS later: reads in between were refused (server_not_responsible
    for every key of the range, at every member, in tests/test_craq_console.py on CI)."""
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n0", 1)[0]
    head, middle, tail = (net.nodes[n.name] for n in ring.chain(key))
    for node in net.nodes.values():
        node.chain.lease_bound = 0.0  # under an ECS: no lease before its first Alive answer
    for node in (head, tail):
        node.chain.ecs_contact(net.clock.seconds(), 3.0)
    net.flush()  # the middle refuses the tail's and the head's first requests
    done = head.put(key, b"v")
    for _ in range(3):
        net.clock.advance(0)
        net.flush()
    assert done.called  # writes need no lease
    assert not any(n.chain.can_read(n.chain.replicas["n0"]) for n in (head, middle, tail))
    net.clock.advance(0.01)
    middle.chain.ecs_contact(net.clock.seconds(), 3.0)  # its first Alive is answered now
    # The middle holds the tail's lease; the tail and the head have none: the tail's read,
    # and the head's (which asks the tail), wait for it instead of being refused.
    reads = [node.get(key) for node in (tail, middle, head)]
    answers: list[list[object]] = [[], [reads[1]], []]
    for read, answer in ((reads[0], answers[0]), (reads[2], answers[2])):
        assert isinstance(read, Deferred)
        read.addBoth(answer.append)
    net.flush()
    assert answers[0] == answers[2] == []
    net.clock.advance(chain.LEASE_RETRY_SECONDS)  # the tail and the head ask again
    net.flush()
    assert answers == [[b"v"]] * 3
    assert tail.chain.can_read(tail.chain.replicas["n0"])


def test_a_lease_cut_short_by_the_lease_bound_is_renewed_before_it_runs_out(net):
    """A granter grants only up to its lease bound (its last Alive answered plus the ECS's
    failure timeout): with a 1 s timeout and Alive every 0.5 s, leases of 0.25-0.75 s. Renewed
    every third of a full lease (0.67 s), the tail held none for part of each period."""
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n0", 1)[0]
    head, middle, tail = (net.nodes[n.name] for n in ring.chain(key))
    net.settle(head.put(key, b"v"))
    net.run(1.0)
    replica = tail.chain.replicas["n0"]
    refused = []
    for step in range(160):  # 8 s
        if step % 10 == 0:
            for node in net.nodes.values():
                node.chain.ecs_contact(net.clock.seconds(), 1.0)
        net.flush()
        if not tail.chain.can_read(replica):
            refused.append(round(net.clock.seconds(), 2))
        net.clock.advance(0.05)
    assert refused == []
    assert tail.get(key) == b"v"


def black_hole(net: SimNet, source: str, target: str) -> None:
    """The open connection from C{source} to C{target} delivers nothing any more and never
    closes (a half-open TCP connection, or a peer hung on it); new connections work."""
    net.links = [(s, t, p) for s, t, p in net.links if (s, t) != (source, target)]


@pytest.mark.parametrize("dead", ["head-middle", "middle-tail", "tail-head"])
def test_a_link_that_delivers_nothing_is_dropped_and_the_window_resent(net, dead):
    """Half-open connections (or a peer hung on one) deliver nothing and never close: a batch
    or an acknowledgement sent on one is lost. After ACK_TIMEOUT without an acknowledgement
    the head drops its link and resends, the middle passes the probe on, and the tail dials
    its head again before it acknowledges."""
    ring = net.cluster(5)  # (so that the tail's link to the head carries nothing else)
    keys = keys_headed_by(ring, "n0", 2)
    head, middle, tail = ring.chain(keys[0])
    net.settle(put(net, ring, keys[0], b"first"))
    source, target = {"head-middle": (head, middle), "middle-tail": (middle, tail),
                      "tail-head": (tail, head)}[dead]
    black_hole(net, source.name, target.name)
    done = put(net, ring, keys[1], b"second")
    net.run(chain.ACK_TIMEOUT - 1.0)
    assert not done.called
    net.run(2.0)
    assert done.called and done.result is False
    assert net.nodes[tail.name].get(keys[1]) == b"second"


def test_a_lease_renewal_on_a_hung_connection_times_out_and_the_next_one_redials(net):
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n0", 1)[0]
    head, middle, tail = ring.chain(key)
    net.settle(put(net, ring, key, b"v"))
    net.run(1.0)
    black_hole(net, tail.name, middle.name)
    net.run(2 * chain.LEASE_SECONDS)
    # The renewals that hung timed out and the connection was dialled again: the tail holds
    # a lease and reads (renewals stuck on the old connection would never be answered).
    assert net.nodes[tail.name].get(key) == b"v"
    net.run(5 * chain.LEASE_SECONDS)
    assert net.nodes[tail.name].get(key) == b"v"


@pytest.mark.parametrize("first", ["middle", "head"])
def test_a_forward_at_a_ring_switch_is_taken_as_soon_as_both_share_the_ring(net, first):
    # The ECS sends a new ring to every server at once, but one member adopts it a moment
    # before the next: a batch crossing that moment is held by a successor that is behind
    # until it adopts the ring, or ignored by one that is ahead and resent when the sender
    # adopts it.
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n0", 1)[0]
    head, middle, tail = ring.chain(key)
    newer = replace(ring, epoch=ring.epoch + 1)
    ahead, behind = (middle, head) if first == "middle" else (head, middle)
    net.nodes[ahead.name].set_ring(newer)
    done = put(net, ring, key, b"v")
    net.clock.advance(0)  # the head sends the batch, in its epoch
    net.flush()
    assert net.nodes[middle.name].chain.replicas[head.name].last_serial == 0
    net.clock.advance(0.005)
    net.set_ring(newer, [behind.name, tail.name])
    for _ in range(12):  # 60 ms: far less than the 0.2 s of a resend after a lost link
        net.flush()
        net.clock.advance(0.005)
    assert done.called
    assert net.settle(done) is False
    assert replicas_of(net, newer, key) == {n.name: b"v" for n in (head, middle, tail)}


def test_waits_for_older_serials_than_the_writes_queued_cost_no_more_than_in_order():
    """A read of a dirty key (chainstore/craq.py) waits for its key's write, older than the
    writes queued after it: with the backlog full (MAX_QUEUED_OPS writes waiting), as many
    such reads must not each re-sort the queue (40 s of CPU for 20,000 of each)."""
    clock = Clock()
    replicator = chain.ChainReplicator(NodeInfo("n0", "127.0.0.1", 1, 2), None, clock,
                                       clock.seconds)
    replica = chain.Replica(owner="n0", chain_id="c", store_name="s", store=None,
                            last_serial=0)
    fired: list[tuple[str, int]] = []
    started = time.process_time()
    for serial in range(2, 10_002):  # writes in flight
        replicator.acknowledged(replica, serial).addCallback(lambda _: fired.append(("w", 0)))
    for n in range(10_000):  # reads of a key whose newest write is serial 1
        replicator.acknowledged(replica, 1).addCallback(lambda _, n=n: fired.append(("r", n)))
    assert time.process_time() - started < 2.0  # about 0.05 s; 10 s when each re-sorts
    replicator._advance(replica, 1)
    assert fired == [("r", n) for n in range(10_000)]  # in the order they came
    replicator._advance(replica, 10_001)
    assert len(fired) == 20_000 and not replica.waiters


def test_an_acknowledgement_of_a_chain_never_reaches_the_chain_that_replaces_it(net):
    """A reconfiguration rebuilds the chains (serials start again at 1): an acknowledgement
    the tail had not sent yet when the new ring came must not count for the new chain."""
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n0", 1)[0]
    head, middle, tail = ring.chain(key)
    put(net, ring, key, b"old").addErrback(lambda f: None)
    for _ in range(2):
        net.clock.advance(0)  # the head forwards; then the middle
        deliver(net)
    assert net.nodes[tail.name].chain.replicas[head.name].last_serial == 1
    # The tail's acknowledgement waits for the end of its turn; the new ring comes first.
    rebuilt = Ring(tuple(replace(n, chain_epoch=ring.epoch + 1) for n in ring.nodes),
                   epoch=ring.epoch + 1, replication=ring.replication)
    net.set_ring(rebuilt)
    fresh = net.nodes[head.name].chain.replicas[head.name]
    assert fresh.last_serial == 0 and fresh.acked == 0
    net.run(1.0)
    assert fresh.acked == 0
    assert net.settle(net.nodes[head.name].put(key, b"new")) is True
    assert fresh.acked == 1 and net.nodes[tail.name].get(key) == b"new"
