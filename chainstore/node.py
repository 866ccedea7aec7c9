"""A KVServer's request logic, independent of any protocol or socket.

The AMP responder and the text console both translate their requests into calls on L{KVNode}
and its errors (L{chainstore.errors}) into their own replies, so both protocols always agree.
Writes return Deferreds, because with replication a write completes only when the chain's tail
has applied it; reads are served at once from the local store.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from chainstore.cache import Cache
from chainstore.control import StaleEpoch
from chainstore.errors import KeyNotFound, NotResponsible, ServerStopped, WriteLocked
from chainstore.limits import check_key, check_value
from chainstore.logs import get_logger
from chainstore.ring import KeyRange, NodeInfo, Ring, position
from chainstore.storage import STORE_NAMES, Store, StoreSet

log = get_logger("chainstore.node")

STOPPED = "stopped"
RUNNING = "running"


class KVNode:
    """One server's view of the ring, its three stores and its cache.

    C{stores} is None until the storage service opens them; until then and while C{state} is
    L{STOPPED}, every request is refused with L{ServerStopped}.
    """

    def __init__(self, me: NodeInfo, cache: Cache, clock: IReactorTime,
                 ring: Ring | None = None, state: str = RUNNING) -> None:
        self.me = me
        self.clock = clock
        self.cache = cache
        self.stores: StoreSet | None = None
        # Alone (no ECS) a server owns the whole ring: a chain of one, head and tail at once.
        self.ring = ring if ring is not None else Ring((me,), epoch=0, replication=1)
        self.state = state
        # Ranges being moved by the ECS: writes to their keys are refused, reads go on.
        self.write_locks: list[KeyRange] = []
        # Ranges whose tail role is being handed over: reads are refused for the moment of the
        # switch, so an old tail never answers after a new one has committed a write.
        self.read_locks: list[KeyRange] = []
        self.counts: Counter[str] = Counter()
        self.started_at = clock.seconds()

    # -- requests -------------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> Deferred[bool]:
        """Store C{value} under C{key}; fires with True if it replaced a value."""
        check_key(key)
        check_value(value)
        store = self._head_store(key)
        updated = store.put(key, value)
        if self.cache.capacity:
            self.cache.put(key, value)
        self.counts["put"] += 1
        return succeed(updated)

    def delete(self, key: bytes) -> Deferred[None]:
        """Remove C{key}; fails with L{KeyNotFound} if it held no value."""
        check_key(key)
        store = self._head_store(key)
        self.cache.discard(key)
        self.counts["delete"] += 1
        if not store.delete(key):
            raise KeyNotFound(f"no value is stored under {key!r}")
        return succeed(None)

    def get(self, key: bytes) -> bytes:
        """The value of C{key}, served only by the tail of its chain."""
        check_key(key)
        store = self._tail_store(key)
        self.counts["get"] += 1
        value = self.cache.get(key)
        if value is None:
            value = store.get(key)
            if value is None:
                raise KeyNotFound(f"no value is stored under {key!r}")
            self.cache.put(key, value)
        return value

    # -- the ring -------------------------------------------------------------------------------

    def set_ring(self, ring: Ring) -> bool:
        """Adopt C{ring} if it is newer than ours; return whether anything changed.

        The ECS never issues two rings with one epoch, so an equal epoch is the ring we have.
        The cache is dropped on every change: the ranges this server is the tail of may have
        changed, and a cache must never outlive the tail role it was filled under.
        """
        if ring.epoch < self.ring.epoch:
            raise StaleEpoch(f"epoch {ring.epoch} is older than this server's {self.ring.epoch}")
        if ring.epoch == self.ring.epoch:
            return False
        self.ring = ring
        self.cache.clear()
        # Locks belong to the reconfiguration that the new ring completes (or supersedes).
        self.write_locks.clear()
        self.read_locks.clear()
        log.info("epoch {epoch}: {count} servers in the ring", epoch=ring.epoch, count=len(ring))
        return True

    def _serving(self) -> StoreSet:
        if self.state != RUNNING or self.stores is None:
            raise ServerStopped("the server is not serving requests")
        return self.stores

    def _head_store(self, key: bytes) -> Store:
        stores = self._serving()
        pos = position(key)
        ring = self.ring
        index = ring.owner_index(pos)
        chain = ring.chain_for_index(index)
        if not chain or chain[0] != self.me:
            raise NotResponsible(f"{self.me.name} is not the head of this key's chain")
        for locked in self.write_locks:
            if pos in locked:
                raise WriteLocked("this key's range is being moved; writes are refused")
        return stores[STORE_NAMES[ring.ring_chain(index).index(self.me)]]

    def _tail_store(self, key: bytes) -> Store:
        stores = self._serving()
        pos = position(key)
        ring = self.ring
        index = ring.owner_index(pos)
        chain = ring.chain_for_index(index)
        if not chain or chain[-1] != self.me:
            raise NotResponsible(f"{self.me.name} is not the tail of this key's chain")
        for locked in self.read_locks:
            if pos in locked:
                raise NotResponsible("this key's range is being handed to another server")
        return stores[STORE_NAMES[ring.ring_chain(index).index(self.me)]]

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "name": self.me.name,
            "state": self.state,
            "epoch": self.ring.epoch,
            "uptime_s": round(self.clock.seconds() - self.started_at, 1),
            "puts": self.counts["put"],
            "gets": self.counts["get"],
            "deletes": self.counts["delete"],
        }
        stats.update(self.cache.stats())
        if self.stores is not None:
            for name, store in self.stores.stores.items():
                stats[f"{name}_keys"] = len(store)
        return stats
