"""Reads at any chain member (CRAQ), deterministically: real KVNodes over a simulated network
(iosim, the real AMP wire format) and a Clock. The ECS's part is played by the test."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from chainstore import craq
from chainstore.errors import KeyNotFound, NotResponsible, ServerStopped
from chainstore.ring import Ring
from simnet import SimNet


@pytest.fixture
def net(tmp_path):
    net = SimNet(tmp_path)
    yield net
    net.close()


def key_of(ring: Ring, head: str, n: int = 0) -> bytes:
    found, i = [], 0
    while len(found) <= n:
        key = b"key%d" % i
        if ring.head(key).name == head:
            found.append(key)
        i += 1
    return found[n]


def read(net: SimNet, name: str, key: bytes) -> Any:
    """A get at server C{name}, run until answered (a Deferred when it asks the tail)."""
    answer = net.nodes[name].get(key)
    return net.settle(answer) if isinstance(answer, Deferred) else answer


def start(net: SimNet, count: int = 3) -> tuple[Ring, bytes, list[str]]:
    ring = net.cluster(count)
    key = key_of(ring, "n0")
    names = [n.name for n in ring.chain(key)]
    net.settle(net.nodes[names[0]].put(key, b"old"))
    net.run(1.0)  # every member holds a read lease
    return ring, key, names


def ask_the_tail_at_once(net: SimNet) -> None:
    """Dirty reads ask the tail without first waiting for their write's acknowledgement (the
    tests of that path: a dirty read that waits, then finds its key clean, asks nobody)."""
    for node in net.nodes.values():
        node.member_reads.dirty_wait = None


def pump_once(net: SimNet, source: str, target: str) -> None:
    """Deliver what is waiting on the links from C{source} to C{target}, once (the answers
    the receiver writes stay queued until the next pump)."""
    for s, t, pump in net.links:
        if (s, t) == (source, target):
            pump.pump()


def test_dirty_keys_hold_one_entry_per_write_in_flight_and_acks_clear_them():
    dirty = craq.DirtyKeys()
    dirty.applied(1, b"a")
    dirty.applied(2, b"b")
    dirty.applied(3, b"a")
    assert (len(dirty), dirty.serial(b"a"), dirty.serial(b"b")) == (2, 3, 2)
    dirty.acked(1)  # a's newer write is still in flight
    assert (len(dirty), dirty.serial(b"a")) == (2, 3)
    dirty.acked(2)
    assert b"b" not in dirty and len(dirty) == 1
    dirty.acked(3)
    assert len(dirty) == 0 and not dirty._order


def test_clean_reads_are_answered_at_every_member_without_asking_the_tail(net):
    ring, key, (head, middle, tail) = start(net)
    for name in (head, middle, tail):
        assert net.nodes[name].get(key) == b"old"  # at once, no Deferred
    for name in (head, middle):
        stats = net.nodes[name].stats()
        assert (stats["gets_local"], stats["gets_resolved"]) == (1, 0)
    with pytest.raises(KeyNotFound):
        net.nodes[middle].get(key_of(ring, "n0", 1))
    # Nothing was left dirty, and the cache holds the clean value.
    for name in (head, middle):
        assert len(net.nodes[name].chain.replicas["n0"].dirty) == 0
    assert net.nodes[middle].cache.get(key) == b"old"


def test_a_dirty_read_the_tail_has_not_applied_answers_the_tails_value(net):
    ring, key, (head, middle, tail) = start(net)
    ask_the_tail_at_once(net)
    done = net.nodes[head].put(key, b"new")
    # Applied at the head, not yet forwarded: the head's own store holds "new".
    assert net.nodes[head].stores["coordinator"].get(key) == b"new"
    assert isinstance(net.nodes[head].get(key), Deferred)
    assert read(net, head, key) == b"old"
    assert net.nodes[head].stats()["gets_resolved"] == 2
    net.settle(done)
    assert read(net, head, key) == b"new"
    assert read(net, middle, key) == b"new"


def test_a_dirty_read_of_a_write_the_tail_applied_is_answered_from_the_local_value(net):
    ring, key, (head, middle, tail) = start(net)
    ask_the_tail_at_once(net)
    done = net.nodes[head].put(key, b"new")
    net.clock.advance(0)  # the head forwards
    pump_once(net, head, middle)
    net.clock.advance(0)  # the middle forwards
    pump_once(net, middle, tail)  # the tail applies; its answer is still on its way back
    assert net.nodes[tail].get(key) == b"new"
    assert not done.called and key in net.nodes[head].chain.replicas["n0"].dirty
    queried = net.nodes[head].get(key)
    assert isinstance(queried, Deferred)
    for _ in range(2):
        pump_once(net, head, tail)  # only the version query and its answer move
    assert queried.result == b"new"
    assert not done.called
    net.settle(done)


def test_a_read_racing_the_acknowledgement_answers_what_the_tail_had_when_it_answered(net):
    ring, key, (head, middle, tail) = start(net)
    ask_the_tail_at_once(net)
    done = net.nodes[head].put(key, b"new")
    queried = net.nodes[head].get(key)  # dirty: asks the tail, which has not got the write
    answers: list[Any] = []
    queried.addBoth(answers.append)
    pump_once(net, head, tail)  # the tail answers "old" (its value: ours is not committed)
    # Before that answer arrives (the head's connection to the tail is held up), the write
    # reaches the tail and its ack comes back on the tail's own connection to the head: the
    # key is clean at the head and the head's store holds "new".
    held = [link for link in net.links if link[:2] == (head, tail)]
    net.links = [link for link in net.links if link not in held]
    net.settle(done)
    assert key not in net.nodes[head].chain.replicas["n0"].dirty
    assert answers == []
    net.links.extend(held)
    net.flush()
    # The read overlapped the write; it answers the version the tail had committed when it
    # answered, not the value the head holds by the time the answer arrives.
    assert answers == [b"old"]


def test_several_writes_in_flight_resolve_to_the_committed_one(net):
    ring, key, (head, middle, tail) = start(net)
    ask_the_tail_at_once(net)
    first = net.nodes[head].put(key, b"v1")
    net.settle(first)
    writes = [net.nodes[head].put(key, b"v%d" % i) for i in (2, 3, 4)]
    assert net.nodes[head].chain.replicas["n0"].dirty.serial(key) == \
        net.nodes[head].chain.replicas["n0"].last_serial
    assert read(net, head, key) == b"v1"
    for d in writes:
        net.settle(d)
    assert read(net, head, key) == b"v4"
    assert len(net.nodes[head].chain.replicas["n0"].dirty) == 0


def test_a_tail_failure_during_a_dirty_read_refuses_it_and_the_new_tail_resolves_the_next(net):
    ring, key, (head, middle, tail) = start(net)
    done = net.nodes[head].put(key, b"new")
    queried = net.nodes[head].get(key)
    net.kill(tail)
    net.flush()
    with pytest.raises(NotResponsible):
        net.settle(queried)
    new = Ring(ring.nodes, epoch=ring.epoch + 1, replication=3, dead={tail})
    net.set_ring(new)
    # The middle is the tail now, after the lease it granted the old tail: until then the
    # write is not acknowledged and dirty reads are refused, never answered with "new".
    with pytest.raises(NotResponsible):
        read(net, head, key)
    granted = net.nodes[middle].chain.replicas["n0"].granted_until
    net.run(granted - net.clock.seconds() + 0.2)
    assert net.settle(done) is True
    assert read(net, head, key) == b"new"
    assert read(net, middle, key) == b"new"


def test_a_middle_failure_during_dirty_reads_leaves_them_answered_by_the_tail(net):
    ring, key, (head, middle, tail) = start(net)
    net.kill(middle)
    done = net.nodes[head].put(key, b"new")
    net.clock.advance(0)
    assert read(net, head, key) == b"old"  # the tail does not have it
    new = Ring(ring.nodes, epoch=ring.epoch + 1, replication=3, dead={middle})
    net.set_ring(new, [tail, head])
    assert read(net, head, key) == b"old"
    # The tail takes the head's resent window once the lease it granted the middle is over.
    accept_from = net.nodes[tail].chain.replicas["n0"].accept_from
    net.run(accept_from - net.clock.seconds() + 0.5)
    assert net.settle(done) is True
    assert read(net, head, key) == b"new"


def test_a_head_cut_off_from_the_new_ring_answers_only_until_its_lease_ends(net):
    """The old head misses the ring that marks it dead and keeps its link to its successor
    (a head cut off from the ECS): its lease runs out before the chain commits any write
    without it, so it never answers a value older than an acknowledged write."""
    ring, key, (head, middle, tail) = start(net)
    zombie = net.nodes[head]
    new = Ring(ring.nodes, epoch=ring.epoch + 1, replication=3, dead={head})
    net.set_ring(new, [n for n in net.nodes if n != head])
    lease = zombie.chain.replicas["n0"].up_lease_until
    accept_from = net.nodes[middle].chain.replicas["n0"].accept_from
    assert accept_from >= lease > net.clock.seconds()
    # The new head refuses writes while the old one may still answer reads...
    with pytest.raises(ServerStopped):
        net.nodes[middle].put(key, b"new")
    assert zombie.get(key) == b"old"
    # ...and it cannot renew its lease (the middle is in another epoch now).
    net.run(accept_from - net.clock.seconds() + 0.1)
    assert zombie.chain.replicas["n0"].up_lease_until <= net.clock.seconds()
    assert net.settle(net.nodes[middle].put(key, b"new")) is True
    # Without a lease the zombie asks the tail, which refuses its old epoch.
    with pytest.raises(NotResponsible):
        read(net, head, key)
    assert read(net, tail, key) == b"new"


def test_a_head_cut_off_from_the_new_ring_never_answers_a_delete_with_not_found(net):
    """A delete of a key the old head does not hold used to be answered "not found" from its
    own store once its earlier writes were acknowledged: cut off from the ECS, it did so
    after the new chain had put the key (torture combined, seed 5436: a delete answered
    "not found" 16 ms after a put to the key was acknowledged, and the next get read the
    put). A delete now goes down the chain like any write, whether or not it finds the key."""
    ring, key, (head, middle, tail) = start(net)
    zombie = net.nodes[head]
    other = next(k for k in (b"absent%d" % i for i in range(1000))
                 if [n.name for n in ring.chain(k)] == [head, middle, tail])
    new = Ring(ring.nodes, epoch=ring.epoch + 1, replication=3, dead={head})
    net.set_ring(new, [n for n in net.nodes if n != head])
    net.run(net.nodes[middle].chain.replicas["n0"].accept_from - net.clock.seconds() + 0.1)
    assert net.settle(net.nodes[middle].put(other, b"new")) is False
    assert zombie.stores["coordinator"].get(other) is None
    answers: list[Any] = []
    zombie.delete(other).addBoth(answers.append)
    net.run(2.0)
    assert not any(isinstance(a, Failure) and a.check(KeyNotFound) for a in answers), answers
    assert read(net, tail, other) == b"new"


def test_a_paused_middle_that_wakes_after_a_reconfiguration_does_not_answer(net):
    ring, key, (head, middle, tail) = start(net)
    zombie = net.nodes[middle]
    net.down.add(middle)  # paused: it neither sends nor receives
    net.run(3.0)          # past the failure timeout: its lease has run out meanwhile
    new = Ring(ring.nodes, epoch=ring.epoch + 1, replication=3, dead={middle})
    net.set_ring(new, [n for n in net.nodes if n != middle])
    assert net.settle(net.nodes[head].put(key, b"new")) is True
    net.down.discard(middle)  # wakes with its old ring and its old value
    assert zombie.ring.epoch == ring.epoch and zombie.stores["replica1"].get(key) == b"old"
    with pytest.raises(NotResponsible):
        read(net, middle, key)
    net.run(1.0)  # its renewals are refused too
    with pytest.raises(NotResponsible):
        read(net, middle, key)
    assert read(net, head, key) == b"new"


def test_a_restarted_head_never_answers_a_write_it_did_not_forward(net):
    ring, key, (head, middle, tail) = start(net)
    lost = net.nodes[head].put(key, b"never-forwarded")
    net.clock.advance(0)  # committed at the head; its forward dies in the socket buffer
    net.links = [(s, t, p) for s, t, p in net.links if (s, t) != (head, middle)]
    net.kill(head)
    assert net.nodes[middle].stores["replica1"].get(key) == b"old"
    lost.addErrback(lambda f: None)
    restarted = net.restart(ring.node(head), ring)
    net.run(1.0)  # it holds a lease again, and the key is clean as far as it knows
    replica = restarted.chain.replicas["n0"]
    assert restarted.stores["coordinator"].get(key) == b"never-forwarded"
    assert not replica.trusted and key not in replica.dirty
    assert read(net, head, key) == b"old"


def test_a_member_caches_clean_values_only(net):
    ring, key, (head, middle, tail) = start(net)
    ask_the_tail_at_once(net)
    assert read(net, middle, key) == b"old"
    assert net.nodes[middle].cache.get(key) == b"old"
    done = net.nodes[head].put(key, b"new")
    net.clock.advance(0)
    pump_once(net, head, middle)  # the middle applies "new": its cached "old" goes
    assert net.nodes[middle].cache.get(key) is None
    assert read(net, middle, key) == b"old"  # the tail has not committed "new"
    assert net.nodes[middle].cache.get(key) is None
    net.settle(done)
    assert read(net, middle, key) == b"new"
    assert net.nodes[middle].cache.get(key) == b"new"


def test_a_dirty_read_waits_for_the_acknowledgement_and_is_answered_locally(net):
    ring, key, (head, middle, tail) = start(net)
    done = net.nodes[head].put(key, b"new")
    for name in (head, middle):
        queried = net.nodes[name].get(key)
        assert isinstance(queried, Deferred) and not queried.called  # dirty: it waits
        net.settle(done)  # the ack comes back up the chain
        assert queried.result == b"new"
        done = net.nodes[head].put(key, b"new")
        net.clock.advance(0)
        pump_once(net, head, middle)
    net.settle(done)
    for name in (head, middle):
        stats = net.nodes[name].stats()
        # no version query: the wait found the key clean
        assert (stats["gets_waited"], stats["gets_resolved"], stats["gets_local"]) == (1, 0, 1)


def test_a_dirty_read_whose_acknowledgement_is_late_asks_the_tail(net):
    ring, key, (head, middle, tail) = start(net)
    net.cut.add(frozenset((middle, tail)))  # the write cannot reach the tail
    done = net.nodes[head].put(key, b"new")
    net.clock.advance(0)
    queried = net.nodes[head].get(key)
    assert isinstance(queried, Deferred)
    net.clock.advance(craq.DIRTY_WAIT)  # no ack: it asks the tail, which has "old" committed
    net.flush()
    assert queried.result == b"old"
    stats = net.nodes[head].stats()
    assert (stats["gets_waited"], stats["gets_resolved"]) == (1, 1)
    net.cut.discard(frozenset((middle, tail)))
    assert net.settle(done) is True
    assert read(net, head, key) == b"new"


def test_a_read_waiting_for_an_acknowledgement_is_refused_when_its_member_leaves_the_chain(net):
    ring, key, (head, middle, tail) = start(net)
    net.nodes[head].put(key, b"new")
    queried = net.nodes[middle].get(key)  # not dirty yet at the middle: answered at once
    assert queried == b"old"
    net.clock.advance(0)
    pump_once(net, head, middle)  # the middle applies "new" and forwards it
    queried = net.nodes[middle].get(key)
    assert isinstance(queried, Deferred) and not queried.called
    # The ECS marks the middle dead (it was cut off); it learns so before any ack arrives.
    net.nodes[middle].set_ring(Ring(ring.nodes, epoch=ring.epoch + 1, replication=3,
                                    dead={middle}))
    with pytest.raises(NotResponsible):
        net.settle(queried)
    assert net.nodes[middle].stats()["gets_resolved"] == 0  # refused, never answered


def test_dirty_reads_that_stop_waiting_while_acks_are_stuck_do_not_pile_up(net):
    """Each read of a dirty key waits for the key's write in the replica's waiters and stops
    waiting after DIRTY_WAIT; while the acknowledgement is stuck (a successor hung until its
    replacement) a client reading the key over and over must not grow them without bound."""
    ring, key, (head, middle, tail) = start(net)
    net.cut.add(frozenset((middle, tail)))  # the write cannot reach the tail
    done = net.nodes[head].put(key, b"new")
    net.clock.advance(0)
    replica = net.nodes[head].chain.replicas[head]
    for _ in range(20):  # (1 s: the tail's own lease, which the middle cannot renew, lasts)
        reads = [net.nodes[head].get(key) for _ in range(50)]
        net.clock.advance(craq.DIRTY_WAIT)  # no ack: each asks the tail, which has "old"
        net.flush()
        assert [r.result for r in reads] == [b"old"] * 50
        # the put's own wait, and at most as many given-up reads again as are live
        assert len(replica.waiters) <= 2 * (1 + 50)
    net.cut.discard(frozenset((middle, tail)))
    assert net.settle(done) is True
    assert replica.waiters == [] and replica.cancelled_waiters == 0
    assert read(net, head, key) == b"new"
