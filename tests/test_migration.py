"""Range migration without sockets: the batch encoding, bounded batches, a copy streamed over
iosim into a real KVServerProtocol (epoch-checked), and the local move/drop with a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.protocols import amp
from twisted.test import iosim

from chainstore import migration
from chainstore.amp_server import KVServerProtocol
from chainstore.cache import make_cache
from chainstore.control import ControlFailed, ReceiveRange, StaleEpoch, pack_items, unpack_items
from chainstore.limits import MAX_VALUE_BYTES
from chainstore.node import KVNode
from chainstore.ring import KeyRange, NodeInfo, Ring, position
from chainstore.storage import StoreSet
from chainstore.storage.backend import ring_order
from chainstore.storage.sqlitedbm import image_pairs

HALF = 1 << 127
# Two halves of the ring: (0, 2^127] and (2^127, 0], wrapping.
LOW, HIGH = KeyRange(0, HALF), KeyRange(HALF, 0)


def keys(n: int, prefix: str = "k") -> list[bytes]:
    return [f"{prefix}{i:05d}".encode() for i in range(n)]


@pytest.fixture
def stores(tmp_path):
    s = StoreSet.open(str(tmp_path / "src"))
    yield s
    s.close()


def fill(store: Any, items: dict[bytes, bytes]) -> None:
    migration.write_batch(store, list(items.items()))


def contents(store: Any) -> dict[bytes, bytes]:
    return dict(store.items())


def run(d: Deferred[Any], step: Any, limit: int = 100_000) -> Any:
    """Drive C{step} until C{d} fires; return its result or raise its failure."""
    # Collect the outcome before any answer can arrive: AMP hands an error that finds no
    # errback to its own handler, which drops the connection and swallows the error.
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(limit):
        if results:
            break
        step()
    assert results, "the operation never finished"
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


# -- the batch encoding ---------------------------------------------------------------------------

pairs = st.lists(st.tuples(st.binary(min_size=1, max_size=20),
                           st.binary(max_size=300)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(pairs)
def test_pack_unpack_round_trip(items):
    assert list(unpack_items(pack_items(items))) == items


def test_pack_unpack_round_trip_of_the_largest_values():
    items = [(b"a", b"x" * MAX_VALUE_BYTES), (b"b" * 20, bytes(range(256)) * 468),
             (b"c", b""), (b"d", b"\x00" * MAX_VALUE_BYTES)]
    assert list(unpack_items(pack_items(items))) == items


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=40)),
                min_size=1, max_size=5), st.data())
def test_every_truncated_batch_is_refused(items, data):
    payload = pack_items(items)
    ends, offset = set(), 0
    for key, value in items:
        offset += 5 + len(key) + len(value)
        ends.add(offset)
    # any cut except at a pair boundary (that is a shorter, valid batch)
    cut = data.draw(st.integers(1, len(payload) - 1).filter(lambda c: c not in ends))
    # Whatever the cut (inside a header, a key or a value, even with an empty value), the
    # receiver must refuse the batch rather than write a shortened key.
    with pytest.raises(ValueError, match="truncated"):
        list(unpack_items(payload[:cut]))


def test_truncated_key_before_an_empty_value_is_refused():
    payload = pack_items([(b"abcdef", b"")])
    with pytest.raises(ValueError, match="truncated"):
        list(unpack_items(payload[:-2]))


# -- batches --------------------------------------------------------------------------------------

def pairs_of(batch: migration.Batch) -> list[tuple[bytes, bytes]]:
    """A batch's pairs, whichever way it travels; and its size is what it reports."""
    if batch.image is None:
        pairs = list(unpack_items(batch.items))
        assert batch.size == len(batch.items)
    else:
        assert batch.items == b""
        pairs = image_pairs(batch.image)
        assert batch.size == len(pack_items(pairs))
    assert batch.keys == len(pairs)
    return pairs


def all_batches(store: Any, rng: KeyRange) -> list[list[tuple[bytes, bytes]]]:
    clock = Clock()
    found: list[list[tuple[bytes, bytes]]] = []

    async def collect() -> None:
        async for batch in migration.batches(store, rng, clock):
            found.append(pairs_of(batch))

    run(Deferred.fromCoroutine(collect()), lambda: clock.advance(0))
    return found


def test_batches_hold_exactly_the_range_in_bounded_batches(stores, monkeypatch):
    monkeypatch.setattr(migration, "BATCH_KEYS", 50)
    monkeypatch.setattr(migration, "BATCH_BYTES", 4000)
    store = stores["coordinator"]
    items = {k: bytes([i % 251]) * (i % 300) for i, k in enumerate(keys(600))}
    fill(store, items)
    for rng in (LOW, HIGH, KeyRange(5, 5)):
        got: dict[bytes, bytes] = {}
        sizes = []
        for batch in all_batches(store, rng):
            assert 1 <= len(batch) <= 50
            size = sum(len(k) + len(v) for k, v in batch)
            # a batch closes as soon as it reaches the byte bound: only its last pair may cross it
            assert size - len(batch[-1][0]) - len(batch[-1][1]) < 4000
            sizes.append(size)
            got.update(batch)
        expected = {k: v for k, v in items.items() if position(k) in rng}
        assert got == expected
        assert max(sizes) >= 3000  # the byte bound, not only the key bound, was exercised


def test_the_default_bounds_cut_large_values_into_small_batches(stores):
    store = stores["coordinator"]
    fill(store, {k: b"v" * MAX_VALUE_BYTES for k in keys(12)})
    batches = all_batches(store, KeyRange(7, 7))
    assert sum(len(b) for b in batches) == 12
    per_batch = -(-migration.BATCH_BYTES // (MAX_VALUE_BYTES + 6))
    assert all(len(b) <= per_batch for b in batches)
    # (an image holds a run under the bound, found by halving: at most twice as many)
    assert -(-12 // per_batch) <= len(batches) <= 2 * -(-12 // per_batch)


# -- copy_range over the wire ---------------------------------------------------------------------

class CountingClient(amp.AMP):
    """Notes how many commands are awaiting an answer at once (flow control)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0

    def callRemote(self, command: Any, **kwargs: Any) -> Deferred[Any]:
        self.in_flight += 1
        self.calls += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def done(result: Any) -> Any:
            self.in_flight -= 1
            return result

        return super().callRemote(command, **kwargs).addBoth(done)


@pytest.fixture
def target(tmp_path):
    clock = Clock()
    me = NodeInfo("t", "127.0.0.1", 6001, 7001)
    node = KVNode(me, make_cache("LRU", 10), clock, ring=Ring((me,), epoch=3, replication=1))
    node.stores = StoreSet.open(str(tmp_path / "target"))
    yield node
    node.stores.close()


def connect(node: KVNode) -> tuple[CountingClient, iosim.IOPump]:
    client, _server, pump = iosim.connectedServerAndClient(
        lambda: KVServerProtocol(node), CountingClient, greet=False, clock=node.clock)
    return client, pump


def test_copy_range_streams_the_range_into_the_target_store(stores, target, monkeypatch):
    monkeypatch.setattr(migration, "BATCH_KEYS", 40)
    source = stores["coordinator"]
    items = {k: (b"%d" % i) * (1 + i % 7) for i, k in enumerate(keys(500))}
    items[b"big"] = b"B" * MAX_VALUE_BYTES  # crosses as a multi-chunk BigBytes
    fill(source, items)
    target.stores["replica1"].put(b"other", b"stays")
    client, pump = connect(target)
    progress: list[tuple[int, int]] = []
    d = Deferred.fromCoroutine(migration.copy_range(
        source, HIGH, client, "replica1", 4, lambda k, b: progress.append((k, b)),
        target.clock))
    sent_keys, sent_bytes = run(d, pump.pump)
    expected = {k: v for k, v in items.items() if position(k) in HIGH}
    assert sent_keys == len(expected)
    assert contents(target.stores["replica1"]) == {**expected, b"other": b"stays"}
    assert contents(target.stores["coordinator"]) == {}
    # a bounded window of batches in flight, and the progress reports climb to the totals
    assert client.max_in_flight == migration.COPY_WINDOW
    assert client.calls == len(progress) >= len(expected) // 40
    assert progress[-1] == (sent_keys, sent_bytes)
    assert [k for k, _ in progress] == sorted(k for k, _ in progress)
    # the source keeps everything: only the ECS decides when to drop
    assert contents(source) == items


@pytest.mark.parametrize("epoch", [3, 2])
def test_a_copy_for_an_old_epoch_is_refused_and_writes_nothing(stores, target, epoch):
    fill(stores["coordinator"], {k: b"v" for k in keys(30)})
    client, pump = connect(target)
    d = Deferred.fromCoroutine(migration.copy_range(
        stores["coordinator"], KeyRange(1, 1), client, "coordinator", epoch,
        lambda k, b: None, target.clock))
    with pytest.raises(StaleEpoch, match=f"epoch {epoch}"):
        run(d, pump.pump)
    assert len(target.stores["coordinator"]) == 0


def test_receive_range_needs_open_stores(target):
    stores, target.stores = target.stores, None
    try:
        client, pump = connect(target)
        d = client.callRemote(ReceiveRange, epoch=9, store="coordinator",
                              items=pack_items([(b"k", b"v")]))
        with pytest.raises(ControlFailed, match="not open"):
            run(d, pump.pump)
    finally:
        target.stores = stores


def test_an_unknown_store_name_is_refused(stores):
    with pytest.raises(ValueError, match="unknown store 'replica3'"):
        migration.store_named(stores, "replica3")


# -- local moves and drops ------------------------------------------------------------------------

def test_move_local_copies_the_range_and_yields_between_batches(stores, monkeypatch):
    monkeypatch.setattr(migration, "BATCH_KEYS", 25)
    monkeypatch.setattr(migration, "PAGE_ROWS", 25)
    clock = Clock()
    src, dst = stores["replica1"], stores["coordinator"]
    items = {k: k * 3 for k in keys(300)}
    fill(src, items)
    fill(dst, {b"dst-only": b"1"})
    d = Deferred.fromCoroutine(migration.move_local(src, dst, LOW, clock))
    expected = {k: v for k, v in items.items() if position(k) in LOW}
    # It does not run to completion in one go: it waits for the reactor after each batch.
    assert not d.called
    assert len(dst) == 1 + 25
    moved = run(d, lambda: clock.advance(0))
    assert moved == len(expected)
    assert contents(dst) == {**expected, b"dst-only": b"1"}
    assert contents(src) == items  # a move copies; the drop comes later


def test_the_keys_written_during_a_move_follow_it_a_batch_per_reactor_turn(stores, monkeypatch):
    monkeypatch.setattr(migration, "BATCH_KEYS", 40)
    clock = Clock()
    src, dst = stores["replica1"], stores["coordinator"]
    fill(src, {k: b"new" for k in keys(100)})
    fill(dst, {k: b"old" for k in keys(130)})
    dirty = set(keys(130))  # the last 30 were deleted at the source: deletions to carry
    # the first batch: 40 keys in ring order, the deleted among them deleted
    first = sorted(dirty, key=ring_order)[:40]
    gone = sum(1 for k in first if k not in keys(100))
    d = Deferred.fromCoroutine(migration.move_dirty(src, dst, dirty, clock))
    assert not d.called and 0 < gone < 40 and len(dst) == 130 - gone
    assert run(d, lambda: clock.advance(0)) == 130
    assert contents(dst) == {k: b"new" for k in keys(100)}


def test_move_local_holds_a_read_lock_on_the_source(stores, monkeypatch):
    monkeypatch.setattr(migration, "PAGE_ROWS", 4)
    clock = Clock()
    src = stores["replica1"]
    fill(src, {k: b"v" for k in keys(10)})
    d = Deferred.fromCoroutine(migration.move_local(src, stores["replica2"], KeyRange(0, 0),
                                                    clock))
    assert src.lock.readers == 1
    run(d, lambda: clock.advance(0))
    assert not src.lock.locked


def test_drop_range_deletes_only_the_range_under_the_write_lock(stores, monkeypatch):
    monkeypatch.setattr(migration, "DROP_KEYS", 30)
    clock = Clock()
    store = stores["coordinator"]
    items = {k: b"v" + k for k in keys(400)}
    fill(store, items)
    d = Deferred.fromCoroutine(migration.drop_range(store, HIGH, clock))
    assert not d.called
    # client writes are refused while the drop holds the store's lock
    assert store.lock.writer
    dropped = run(d, lambda: clock.advance(0))
    expected_left = {k: v for k, v in items.items() if position(k) in LOW}
    assert dropped == len(items) - len(expected_left)
    assert contents(store) == expected_left
    assert not store.lock.locked


@pytest.mark.parametrize("operation", ["drop", "move", "copy"])
def test_bulk_work_rests_half_as_long_as_it_worked(stores, monkeypatch, operation):
    # Flat out, a server moving data takes a CPU from the writes going on; between its pages
    # it rests BULK_REST (half) of the time the page took.
    monkeypatch.setattr(migration, "DROP_KEYS", 30)
    monkeypatch.setattr(migration, "PAGE_ROWS", 30)
    monkeypatch.setattr(migration, "BATCH_KEYS", 30)
    clock = Clock()
    src, dst = stores["coordinator"], stores["replica1"]
    fill(src, {k: b"v" + k for k in keys(400)})
    name = {"drop": "drop_page", "move": "move_page", "copy": "export_page"}[operation]
    owner = dst if operation == "move" else src
    real = getattr(owner, name)
    calls: list[float] = []

    def working(*args: Any, **kwargs: Any) -> Any:
        calls.append(clock.seconds())
        clock.advance(0.010)  # the page takes 10 ms
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, working)

    async def copy() -> int:
        return sum([batch.keys async for batch in migration.batches(src, KeyRange(0, 0), clock)])

    coroutine = {"drop": lambda: migration.drop_range(src, KeyRange(0, 0), clock),
                 "move": lambda: migration.move_local(src, dst, KeyRange(0, 0), clock),
                 "copy": copy}[operation]()
    d = Deferred.fromCoroutine(coroutine)
    assert len(calls) == 1
    clock.advance(0.0049)
    assert len(calls) == 1  # still resting
    clock.advance(0.0002)
    assert len(calls) == 2
    assert run(d, lambda: clock.advance(0.001)) == 400
    assert migration.BULK_REST == 0.5
    # each page began 10 ms of work plus 5 ms of rest after the one before
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(gaps) >= 10 and all(0.015 <= g < 0.0161 for g in gaps), gaps


def test_drop_range_of_an_empty_range_is_a_no_op(stores):
    clock = Clock()
    d = Deferred.fromCoroutine(migration.drop_range(stores["replica2"], LOW, clock))
    assert run(d, lambda: clock.advance(0)) == 0


def test_write_batch_on_the_dumb_backend(tmp_path):
    dumb = StoreSet.open(str(tmp_path / "dumb"), backend="dumb")
    try:
        store = dumb["coordinator"]
        migration.write_batch(store, [(b"a", b"1"), (b"b", b"2")])
        migration.write_batch(store, [(b"c", b"3")], [b"a", b"missing"])
        assert contents(store) == {b"b": b"2", b"c": b"3"}
    finally:
        dumb.close()


@pytest.mark.parametrize("backend", ["sqlite", "dumb"])
def test_drop_range_reads_keys_only_and_survives_many_batches(tmp_path, monkeypatch, backend):
    sets = StoreSet.open(str(tmp_path / backend), backend=backend)
    try:
        store = sets["coordinator"]
        pairs = [(b"k%05d" % i, b"v%d" % i) for i in range(2 * migration.BATCH_KEYS + 500)]
        migration.write_batch(store, pairs)
        # A drop needs no value: reading them would cost as much as the data.
        monkeypatch.setattr(type(store), "items", lambda *a, **k: pytest.fail("values read"))
        clock = Clock()
        d = Deferred.fromCoroutine(migration.drop_range(store, HIGH, clock))
        dropped = run(d, lambda: clock.advance(0))
        kept = {k: v for k, v in pairs if position(k) not in HIGH}
        assert dropped == len(pairs) - len(kept) > migration.BATCH_KEYS
        monkeypatch.undo()
        assert contents(store) == kept
    finally:
        sets.close()


def test_a_copy_under_writes_ends_with_an_exact_copy(stores, target, monkeypatch):
    # Small pages and batches: the copy runs over many reactor turns, and writes land between
    # them, ahead of its cursor and behind it: updates, deletes and new keys.
    monkeypatch.setattr(migration, "PAGE_ROWS", 20)
    monkeypatch.setattr(migration, "BATCH_KEYS", 30)
    source = stores["coordinator"]
    fill(source, {k: b"0" for k in keys(1500)})
    tracker = migration.start_tracking(source, HIGH)
    client, pump = connect(target)
    clock = target.clock
    d = Deferred.fromCoroutine(migration.copy_range(
        source, HIGH, client, "replica1", 4, lambda k, b: None, clock))
    serial = 0
    written = keys(1500)[::7] + keys(300, "new")
    turns = 0
    while not d.called:
        turns += 1
        for key in written[turns % 7::29][:5]:
            serial += 1
            source.apply_one(1 if serial % 5 == 0 else 0, key, b"%d" % serial, serial)
        source.commit()
        pump.pump()
        clock.advance(0)
    assert turns > 10
    run(d, pump.pump)
    dirty = migration.stop_tracking(stores, tracker)
    assert dirty
    d = Deferred.fromCoroutine(migration.copy_dirty(source, dirty, client, "replica1", 4))
    run(d, pump.pump)
    expected = {k: v for k, v in contents(source).items() if position(k) in HIGH}
    assert contents(target.stores["replica1"]) == expected


def test_a_copy_rests_for_its_own_reading_not_for_the_wait_on_its_target(stores, monkeypatch):
    # Between two pages a copy's source waits for its target to confirm a batch; that wait is
    # no work of its own, and resting half as long again made the copy wait twice.
    monkeypatch.setattr(migration, "BATCH_KEYS", 30)
    clock = Clock()
    src = stores["coordinator"]
    fill(src, {k: b"v" + k for k in keys(400)})
    real = src.export_page
    calls: list[float] = []

    def reading(*args: Any, **kwargs: Any) -> Any:
        calls.append(clock.seconds())
        clock.advance(0.010)  # the page takes 10 ms to read
        return real(*args, **kwargs)

    monkeypatch.setattr(src, "export_page", reading)

    async def copy_pages() -> int:
        copied = 0
        async for batch in migration.batches(src, KeyRange(0, 0), clock):
            copied += batch.keys
            await deferLater(clock, 0.020, lambda: None)  # the target confirms 20 ms later
        return copied

    d = Deferred.fromCoroutine(copy_pages())
    assert run(d, lambda: clock.advance(0.001)) == 400
    # each page began 10 ms of reading, 20 ms of waiting and 5 ms of rest after the one before
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(gaps) >= 10 and all(0.035 <= g < 0.0361 for g in gaps), gaps


def test_a_target_writes_batches_in_order_one_per_reactor_turn():
    clock = Clock()
    queue = migration.BatchQueue(clock)
    events: list[Any] = []
    results: list[Any] = []
    for n in range(3):
        queue.submit(lambda n=n: events.append(n) or n, 10).addBoth(results.append)
    assert events == [] and queue.queued_bytes == 30
    # Something else the reactor has to do, due after the three batches were taken (in one
    # read, say): it runs after the first batch, not after all three.
    clock.callLater(0, events.append, "other")
    clock.advance(0)
    assert events == [0, "other", 1, 2] and results == [0, 1, 2]
    assert queue.queued_bytes == 0 and not clock.getDelayedCalls()


def test_a_failed_batch_fails_alone():
    clock = Clock()
    queue = migration.BatchQueue(clock)
    results: list[Any] = []

    def broken() -> None:
        raise StaleEpoch("too late")
    queue.submit(broken, 1).addBoth(results.append)
    queue.submit(lambda: "next", 1).addBoth(results.append)
    clock.advance(0)
    clock.advance(0)
    results[0].trap(StaleEpoch)
    assert results[1] == "next"


def test_a_target_refuses_batches_past_its_queue_bound():
    clock = Clock()
    queue = migration.BatchQueue(clock, max_bytes=100)
    queue.submit(lambda: None, 60)
    # One batch larger than the bound is taken when nothing waits (a copy must progress)...
    with pytest.raises(ControlFailed, match="60 bytes of copy batches are waiting"):
        queue.submit(lambda: None, 60)
    clock.advance(0)
    queue.submit(lambda: None, 150)
    # ...but nothing is held beyond it.
    with pytest.raises(ControlFailed):
        queue.submit(lambda: None, 1)
