"""Random command sequences against a Store and a KVNode, compared with a dict model.

Hypothesis drives puts, gets, deletes, iteration, the store's lock and close/reopen of the files
(persistence), and shrinks any failure to the shortest sequence that shows it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from chainstore.cache import STRATEGIES, make_cache
from chainstore.errors import InvalidKey, KeyNotFound, ValueTooLarge
from chainstore.limits import MAX_VALUE_BYTES
from chainstore.node import KVNode
from chainstore.ring import NodeInfo
from chainstore.storage import STORE_NAMES, StoreSet
from chainstore.storage.backend import ring_order

# Closing a store checkpoints it, which fsyncs; on a tmpfs that costs nothing, and these tests
# check the model, not the disk (tests/test_crash.py does that).
_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

SETTINGS = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Few distinct keys, so that updates, deletes of present keys and hits are common.
store_keys = st.one_of(
    st.sampled_from([b"a", b"b", b"a\x00", b"\xff", b"key"]),
    st.binary(min_size=1, max_size=4),
)
# Mostly small values; sometimes ones big enough to outgrow a dbm.dumb block (512 bytes).
values = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=500, max_size=1500),
)


class StoreMachine(RuleBasedStateMachine):
    """A Store of one backend against a dict; the files are reopened now and then."""

    backend = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="chainstore-model-", dir=_TMP)
        self.stores = StoreSet.open(self.directory, self.backend)
        self.model: dict[bytes, bytes] = {}
        self.read_locked = False

    @property
    def store(self):
        return self.stores.coordinator

    def teardown(self) -> None:
        try:
            self.stores.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    @rule(key=store_keys, value=values)
    def put(self, key: bytes, value: bytes) -> None:
        existed = self.store.put(key, value)
        assert existed == (key in self.model)
        self.model[key] = value

    @rule(key=store_keys)
    def get(self, key: bytes) -> None:
        assert self.store.get(key) == self.model.get(key)

    @rule(key=store_keys)
    def delete(self, key: bytes) -> None:
        assert self.store.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule()
    def items(self) -> None:
        assert list(self.store.items()) == sorted(self.model.items(),
                                                  key=lambda pair: ring_order(pair[0]))

    @rule(after=store_keys)
    def items_after(self, after: bytes) -> None:
        expected = sorted(((k, v) for k, v in self.model.items()
                           if ring_order(k) > ring_order(after)),
                          key=lambda pair: ring_order(pair[0]))
        assert list(self.store.items(after)) == expected

    @rule()
    def reopen(self) -> None:
        # Close (as a clean shutdown does) and open the files again: the data must persist.
        # The lock is in memory and belongs to the old Store; it does not survive.
        self.stores.close()
        self.stores = StoreSet.open(self.directory, self.backend)
        self.read_locked = False

    @rule()
    def sync(self) -> None:
        self.store.sync()

    @precondition(lambda self: not self.read_locked)
    @rule()
    def lock_for_migration(self) -> None:
        d = self.store.lock.acquire_read()
        assert d.called
        self.read_locked = True

    @precondition(lambda self: self.read_locked)
    @rule()
    def unlock(self) -> None:
        self.store.lock.release_read()
        self.read_locked = False

    @invariant()
    def the_lock_shows_who_holds_it(self) -> None:
        # Bulk operations order themselves on it; client writes are refused by the node's
        # range locks instead (see test_ecs_link.py), so only the lock's own state is checked.
        assert self.store.lock.locked == self.read_locked

    @invariant()
    def sizes_match(self) -> None:
        assert len(self.store) == len(self.model)
        for name in STORE_NAMES[1:]:
            assert len(self.stores[name]) == 0


class DumbStoreMachine(StoreMachine):
    backend = "dumb"


TestSQLiteStore = StoreMachine.TestCase
TestSQLiteStore.settings = SETTINGS
TestDumbStore = DumbStoreMachine.TestCase
TestDumbStore.settings = SETTINGS


# -- KVNode ----------------------------------------------------------------------------------

ME = NodeInfo("model", "127.0.0.1", 50000, 51000)
# Few keys, so that a stale cache entry (a put, a delete, a get of one key) is found quickly;
# the store machine above covers arbitrary binary keys.
NODE_KEYS = (b"a", b"~!", b"x" * 20)
node_keys = st.sampled_from(NODE_KEYS)
bad_keys = st.sampled_from([b"", b"a b", b"x" * 21, b"\xff", b"tab\tkey", b"nl\n"])
node_values = st.binary(min_size=1, max_size=60)
# Mostly caches smaller than the key set, so that evictions happen; 0 disables the cache.
cache_sizes = st.integers(0, 3)


def outcome(call: Any, *args: Any) -> tuple[str, Any]:
    """("ok", result) or ("error", exception) of a call, raised at once or in a Deferred."""
    try:
        result = call(*args)
    except Exception as e:
        return "error", e
    if isinstance(result, Deferred):
        box: list[Any] = []
        result.addBoth(box.append)
        # A standalone write completes at the end of its reactor turn (its group commit), with
        # no chain to wait for.
        getattr(call, "__self__").clock.advance(0)
        assert box, "a standalone write must complete within its reactor turn"
        if isinstance(box[0], Failure):
            return "error", box[0].value
        return "ok", box[0]
    return "ok", result


class NodeMachine(RuleBasedStateMachine):
    """A standalone KVNode (cache, coordinator store, Clock) against a dict."""

    strategy = "LRU"

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="chainstore-node-model-", dir=_TMP)
        self.clock = Clock()
        self.node: KVNode | None = None
        self.model: dict[bytes, bytes] = {}

    @initialize(capacity=cache_sizes)
    def start(self, capacity: int) -> None:
        self.node = KVNode(ME, make_cache(self.strategy, capacity), self.clock)
        self.node.stores = StoreSet.open(self.directory)

    def teardown(self) -> None:
        try:
            if self.node is not None and self.node.stores is not None:
                stores, self.node.stores = self.node.stores, None
                stores.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    @rule(key=node_keys, value=node_values)
    def put(self, key: bytes, value: bytes) -> None:
        assert outcome(self.node.put, key, value) == ("ok", key in self.model)
        self.model[key] = value

    @rule(key=node_keys)
    def get(self, key: bytes) -> None:
        kind, result = outcome(self.node.get, key)
        if key in self.model:
            assert (kind, result) == ("ok", self.model[key])
        else:
            assert kind == "error" and isinstance(result, KeyNotFound)

    @rule(key=node_keys)
    def delete(self, key: bytes) -> None:
        kind, result = outcome(self.node.delete, key)
        if key in self.model:
            assert kind == "ok"
            del self.model[key]
        else:
            assert kind == "error" and isinstance(result, KeyNotFound)

    @rule(key=bad_keys, value=node_values)
    def refused(self, key: bytes, value: bytes) -> None:
        for call, args, error_type in (
            (self.node.put, (key, value), InvalidKey),
            (self.node.get, (key,), InvalidKey),
            (self.node.delete, (key,), InvalidKey),
            (self.node.put, (b"a", b"v" * (MAX_VALUE_BYTES + 1)), ValueTooLarge),
        ):
            kind, error = outcome(call, *args)
            assert kind == "error" and isinstance(error, error_type)

    @rule()
    def reopen_stores(self) -> None:
        # The files close and open again under the same node, in the order the service stops
        # and starts it (take the stores away, close them, open them, hand them back); its
        # cache is kept and must still agree with them.
        stores, self.node.stores = self.node.stores, None
        stores.close()
        self.node.stores = StoreSet.open(self.directory)

    @rule(capacity=cache_sizes, seconds=st.floats(0, 100))
    def restart(self, capacity: int, seconds: float) -> None:
        # A new node (a cold cache, maybe of another size) on the same files, a while later.
        stores, self.node.stores = self.node.stores, None
        stores.close()
        self.clock.advance(seconds)
        self.start(capacity)

    @invariant()
    def every_key_reads_as_in_the_model(self) -> None:
        # After every step, not only when a get happens to be drawn: a stale cache entry shows
        # at once. The reads are real requests, so they also move entries in LRU and LFU.
        for key in NODE_KEYS:
            self.get(key)

    @invariant()
    def stats_agree(self) -> None:
        stats = self.node.stats()
        assert stats["coordinator_keys"] == len(self.model)
        assert stats["replica1_keys"] == stats["replica2_keys"] == 0
        assert stats["cache_entries"] <= stats["cache_capacity"]
        assert stats["uptime_s"] == pytest.approx(self.clock.seconds() - self.node.started_at,
                                                  abs=0.06)


# One machine per strategy, so that each gets its share of examples.
NODE_SETTINGS = settings(SETTINGS, max_examples=40)


def _node_test(strategy: str) -> type:
    machine = type(f"{strategy}NodeMachine", (NodeMachine,), {"strategy": strategy})
    case = machine.TestCase
    case.settings = NODE_SETTINGS
    return case


TestFIFONode = _node_test("FIFO")
TestLRUNode = _node_test("LRU")
TestLFUNode = _node_test("LFU")
assert set(STRATEGIES) == {"FIFO", "LRU", "LFU"}
