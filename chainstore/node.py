"""A KVServer's request logic, independent of any protocol or socket.

The AMP responder and the text console both translate their requests into calls on L{KVNode}
and its errors (L{chainstore.errors}) into their own replies, so both protocols always agree.
Writes return Deferreds, because with replication a write completes only when the chain's tail
has applied it; reads are served at once from the local store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from chainstore.cache import Cache
from chainstore.chain import DELETE, PUT, ChainReplicator, Replica
from chainstore.control import StaleEpoch
from chainstore.craq import MemberReads, answer_version
from chainstore.errors import (
    KeyNotFound,
    NotResponsible,
    ServerStopped,
    StorageFailed,
    WriteLocked,
)
from chainstore.limits import check_key, check_request_id, check_value
from chainstore.logs import get_logger
from chainstore.metrics import RequestMetrics
from chainstore.migration import BatchQueue
from chainstore.peers import Connector, PeerPool, tcp_connector
from chainstore.ring import KeyRange, NodeInfo, Ring, position
from chainstore.storage import Store, StoreSet

log = get_logger("chainstore.node")

STOPPED = "stopped"
RUNNING = "running"
# A store failed: the server answers every request with StorageFailed until it is restarted.
FAILED = "failed"


class KVNode:
    """One server's view of the ring, its three stores, its cache and its chains.

    C{stores} is None until the service opens them; until then and while C{state} is
    L{STOPPED}, every client request is refused with L{ServerStopped}. Assigning C{stores} or
    C{ring} re-derives the server's place in every chain (L{ChainReplicator.adopt}).

    Storage is fail-stop: the first error of a store puts the node in state L{FAILED} for
    good (L{storage_failed}); see docs/DESIGN.md, "When storage fails".
    """

    def __init__(self, me: NodeInfo, cache: Cache, clock: IReactorTime,
                 ring: Ring | None = None, state: str = RUNNING,
                 connect: Connector | None = None,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.me = me
        self.clock = clock
        self.cache = cache
        self.state = state
        self.chain = ChainReplicator(
            me, PeerPool(connect or _lazy_tcp(clock)), clock, monotonic or clock.seconds,
            on_apply=self._applied)
        self.member_reads = MemberReads(self.chain, cache)
        self._stores: StoreSet | None = None
        # Alone (no ECS) a server owns the whole ring: a chain of one, head and tail at once.
        self._ring = ring if ring is not None else Ring((me,), epoch=0, replication=1)
        # Ranges being moved by the ECS: writes to their keys are refused, reads go on.
        self.write_locks: list[KeyRange] = []
        # Ranges whose tail role is being handed over: reads are refused for the moment of the
        # switch, so an old tail never answers after a new one has committed a write.
        self.read_locks: list[KeyRange] = []
        # Locks set over an ECS link that has since dropped, (reads, range) with each range
        # the very object in its list: they stay until the ECS, over a new link, tells this
        # server its ring (docs/DESIGN.md, "Locks outlive the link that set them").
        self.orphaned_locks: list[tuple[bool, KeyRange]] = []
        # The reconfiguration attempt (its epoch) the ECS last prepared this server for as a
        # copy's target (C{DropRange} with C{attempt}): C{ReceiveRange} batches of any other
        # attempt are refused, so a late batch of an aborted attempt cannot land after the
        # retry wiped the range. None until the first preparation.
        self.copy_attempt: int | None = None
        #: copy batches received, waiting for their turn to be written
        self.copy_batches = BatchQueue(clock)
        self.counts: Counter[str] = Counter()
        #: requests by command and result, latencies (chainstore/metrics.py)
        self.metrics = RequestMetrics(monotonic or clock.seconds)
        self.started_at = clock.seconds()
        #: why the storage failed (state FAILED), None while it works
        self.failure: str | None = None
        #: called once with the reason when the storage fails (the service drops its ECS link)
        self.failure_listeners: list[Callable[[str], None]] = []
        #: the server's reactor stall probe (chainstore/reactor_lag.py), None without one
        self.reactor_lag: Any = None

    @property
    def stores(self) -> StoreSet | None:
        return self._stores

    @stores.setter
    def stores(self, stores: StoreSet | None) -> None:
        self._stores = stores
        if stores is not None:
            for store in stores.stores.values():
                store.on_failure = self.storage_failed
        self.chain.adopt(self._ring, stores)

    def storage_failed(self, store: Store, reason: str) -> None:
        """A store failed: stop serving at once and for good. Every write waiting for its
        answer fails, nothing not committed is forwarded or read, the other stores' uncommitted
        writes are rolled back, and the listeners (the ECS link) are told."""
        if self.failure is not None:
            return
        self.failure = reason
        self.state = FAILED
        log.critical("storage failed, this server stops serving: {reason}", reason=reason)
        self.cache.clear()
        self.chain.fail(StorageFailed(f"storage failed: {reason}"))
        if self._stores is not None:
            self._stores.abandon()
        for listener in self.failure_listeners:
            try:
                listener(reason)
            except Exception:
                log.failure("a storage failure listener failed")

    @property
    def ring(self) -> Ring:
        return self._ring

    @ring.setter
    def ring(self, ring: Ring) -> None:
        self._ring = ring
        self.cache.clear()
        self.chain.adopt(ring, self._stores)

    # -- requests -------------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes, request_id: bytes = b"") -> Deferred[bool]:
        """Store C{value} under C{key}; fires with True if it replaced a value, once the tail
        of the key's chain has applied the write."""
        return self._timed("put", self.metrics.put_timer, self._put, key, value, request_id)

    def _timed(self, command: str, timer: Any, call: Callable[..., Deferred[Any]],
               *args: Any) -> Deferred[Any]:
        """C{call(*args)}, counted and timed as C{command} (by C{timer} when it succeeds)."""
        started = self.metrics.clock()
        try:
            d = call(*args)
        except Exception as e:
            self.metrics.failed(command, e)
            raise
        return d.addCallbacks(timer.passed, self.metrics.request_failed, (started,), None,
                              (command,))

    def _put(self, key: bytes, value: bytes, request_id: bytes) -> Deferred[bool]:
        check_key(key)
        check_value(value)
        check_request_id(request_id)
        replica = self._head_replica(key)
        # A retry of a write this server already carries is answered, not applied again: its
        # value may have been replaced since, so it must not reach the cache either.
        duplicate = bool(request_id) and request_id in self.chain.recent
        existed, committed = self.chain.write(replica, PUT, key, value, request_id)
        if replica.is_tail and self.cache.capacity and not duplicate:
            self.cache.put(key, value)
        else:
            self.cache.discard(key)  # not committed yet: a head caches clean values only
        self.counts["put"] += 1
        return committed.addCallback(lambda _: existed)

    def delete(self, key: bytes, request_id: bytes = b"") -> Deferred[None]:
        """Remove C{key}; fails with L{KeyNotFound} if it held no value."""
        return self._timed("delete", self.metrics.delete_timer, self._delete, key, request_id)

    def _delete(self, key: bytes, request_id: bytes) -> Deferred[None]:
        check_key(key)
        check_request_id(request_id)
        replica = self._head_replica(key)
        self.counts["delete"] += 1
        # Down the chain even when the key is missing here: "not found" is a read of the key,
        # and only the tail's acknowledgement proves this server is still the head of a chain
        # that commits. Answered from the store once earlier writes were acknowledged, a head
        # cut off from the ECS answered "not found" for a key the new chain had put.
        # A delete that finds nothing changes nothing, so it is not remembered by its request
        # id: a retry runs again (and answers "not found", or deletes a value put meanwhile,
        # both as if it had run once, then), instead of answering "deleted" as a retry of a
        # delete that was applied does.
        if replica.store.get(key) is None and request_id not in self.chain.recent:
            request_id = b""
        existed, committed = self.chain.write(replica, DELETE, key, b"", request_id)
        self.cache.discard(key)

        def answered(_: object) -> None:
            if not existed:
                raise KeyNotFound(f"no value is stored under {key!r}")

        return committed.addCallback(answered)

    def get(self, key: bytes) -> bytes | Deferred[bytes]:
        """The value of C{key}, from any member of its chain: the tail under its lease, a head
        or middle as L{chainstore.craq} says (a Deferred when it asks the tail)."""
        started = self.metrics.clock()
        try:
            check_key(key)
            replica, chain = self._member_replica(key)
            value = self._get(key, replica, chain)
        except Exception as e:
            self.metrics.failed("get", e)
            raise
        role = "tail" if replica.is_tail else "head" if replica.is_head else "middle"
        if isinstance(value, Deferred):
            return value.addCallbacks(self.metrics.get_timers[role].passed,
                                      self.metrics.request_failed, (started,), None, ("get",))
        self.metrics.get_timers[role].passed(None, started)
        return value

    def _get(self, key: bytes, replica: Replica, chain: tuple[NodeInfo, ...],
             wait: bool = True) -> bytes | Deferred[bytes]:
        if not replica.is_tail:
            self.counts["get"] += 1
            return self.member_reads.read(replica, key, chain[-1])
        if not self.chain.can_read(replica):
            # A tail without a current lease may have been replaced while it was away; one
            # that is being granted its lease (just after it took its role) answers then.
            leased = self.chain.leased(replica) if wait else None
            if leased is not None:
                return leased.addCallback(lambda _: self._get(key, *self._same(key, replica),
                                                              wait=False))
            raise NotResponsible(f"{self.me.name} holds no read lease for this key's range")
        self.counts["get"] += 1
        store = replica.store
        value = self.cache.get(key)
        if value is None:
            self.chain.commit_now(store)
            value = store.get(key)
            if value is None:
                raise KeyNotFound(f"no value is stored under {key!r}")
            self.cache.put(key, value)
        return value

    def _applied(self, keys: list[bytes]) -> None:
        for key in keys:
            self.cache.discard(key)

    def read_version(self, epoch: int, owner: str, key: bytes, newest: int, held: int,
                     wait: bool = True) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """A head or middle of C{owner}'s range asks this tail, before answering a read of
        C{key}, which serial is committed (L{chainstore.craq})."""
        if epoch != self._ring.epoch:
            raise StaleEpoch(f"read of epoch {epoch}; this server is at {self._ring.epoch}")
        replica, _ = self._member_replica(key)
        if replica.owner != owner or not replica.is_tail:
            raise NotResponsible(f"{self.me.name} is not the reading tail of {owner}'s range")
        if not self.chain.can_read(replica):
            leased = self.chain.leased(replica) if wait else None
            if leased is None:
                raise NotResponsible(f"{self.me.name} holds no read lease for {owner}'s range")
            return leased.addCallback(
                lambda _: self.read_version(epoch, owner, key, newest, held, wait=False))
        self.chain.commit_now(replica.store)

        def value_of(key: bytes) -> bytes | None:
            value = self.cache.get(key)
            return replica.store.get(key) if value is None else value
        return answer_version(replica, key, newest, held, value_of)

    # -- the ring -------------------------------------------------------------------------------

    def set_ring(self, ring: Ring) -> bool:
        """Adopt C{ring} if it is newer than ours; return whether anything changed.

        The ECS never issues two rings with one epoch, so an equal epoch is the ring we have.
        The cache is dropped on every change: the ranges this server is the tail of may have
        changed, and a cache must never outlive the tail role it was filled under.
        """
        if ring.epoch < self._ring.epoch:
            raise StaleEpoch(f"epoch {ring.epoch} is older than this server's {self._ring.epoch}")
        if ring.epoch == self._ring.epoch:
            return False
        # Locks belong to the reconfiguration that the new ring completes (or supersedes).
        self.write_locks.clear()
        self.read_locks.clear()
        self.orphaned_locks.clear()
        self.ring = ring
        log.info("epoch {epoch}: {count} servers in the ring{dead}", epoch=ring.epoch,
                 count=len(ring), dead=f", {sorted(ring.dead)} dead" if ring.dead else "")
        return True

    def release_orphaned_locks(self) -> int:
        """Lift the locks of dropped ECS links (L{orphaned_locks}); how many were still held.
        For the ECS to call, over a live link, once it has told this server its ring: the
        change that set them has then committed (a newer ring, which lifted them already) or
        aborted."""
        released = sum(self.unlock(reads, rng) for reads, rng in self.orphaned_locks)
        self.orphaned_locks.clear()
        return released

    def unlock(self, reads: bool, rng: KeyRange) -> bool:
        """Lift the lock C{rng}, that very object (another lock of an equal range stays);
        whether it was held."""
        locks = self.read_locks if reads else self.write_locks
        for i, held in enumerate(locks):
            if held is rng:
                del locks[i]
                return True
        return False

    def holds(self, reads: bool, rng: KeyRange) -> bool:
        return any(held is rng for held in (self.read_locks if reads else self.write_locks))

    def _serving(self) -> StoreSet:
        if self.failure is not None:
            raise StorageFailed(f"storage failed: {self.failure}")
        if self.state != RUNNING or self._stores is None:
            raise ServerStopped("the server is not serving requests")
        return self._stores

    def _head_replica(self, key: bytes) -> Replica:
        self._serving()
        pos = position(key)
        ring = self._ring
        index = ring.owner_index(pos)
        chain = ring.chain_for_index(index)
        if not chain or chain[0] != self.me:
            raise NotResponsible(f"{self.me.name} is not the head of this key's chain")
        for locked in self.write_locks:
            if pos in locked:
                raise WriteLocked("this key's range is being moved; writes are refused")
        replica = self.chain.replicas.get(ring.nodes[index].name)
        if replica is None:
            raise ServerStopped("this server's chains are not ready")
        return replica

    def _member_replica(self, key: bytes) -> tuple[Replica, tuple[NodeInfo, ...]]:
        """This server's replica of C{key}'s range and the range's live chain, for a read."""
        self._serving()
        pos = position(key)
        ring = self._ring
        index = ring.owner_index(pos)
        chain = ring.chain_for_index(index)
        if self.me not in chain:
            raise NotResponsible(f"{self.me.name} is not in this key's chain")
        for locked in self.read_locks:
            if pos in locked:
                raise NotResponsible("this key's range is being handed to another chain")
        replica = self.chain.replicas.get(ring.nodes[index].name)
        if replica is None:
            raise NotResponsible(f"{self.me.name}'s chains are not ready")
        return replica, chain

    def _same(self, key: bytes, replica: Replica) -> tuple[Replica, tuple[NodeInfo, ...]]:
        """C{key}'s replica and chain again, after a wait: still C{replica}, or refused."""
        again, chain = self._member_replica(key)
        if again is not replica:
            raise NotResponsible(f"{self.me.name} changed its part in this key's chain")
        return replica, chain

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "name": self.me.name,
            "state": self.state,
            "epoch": self.ring.epoch,
            "uptime_s": round(self.clock.seconds() - self.started_at, 1),
            "puts": self.counts["put"],
            "gets": self.counts["get"],
            "deletes": self.counts["delete"],
            # gets a head or middle answered from its own store, and those it checked with the
            # tail (chainstore/craq.py)
            "gets_local": self.member_reads.local,
            "gets_resolved": self.member_reads.resolved,
            "gets_waited": self.member_reads.waited,
        }
        stats.update(self.cache.stats())
        if self.failure is not None:
            stats["failure"] = f"storage failed: {self.failure}"
        elif self._stores is not None:
            for name, store in self._stores.stores.items():
                stats[f"{name}_keys"] = len(store)
        stats.update(self.chain.stats())
        if self.reactor_lag is not None:
            stats.update(self.reactor_lag.stats())
        stats.update(self.metrics.stats())
        return stats


def _lazy_tcp(reactor: Any) -> Connector:
    # Built on first use: unit tests pass a Clock, which cannot dial, and never replicate.
    def connect(node: NodeInfo) -> Deferred[Any]:
        return tcp_connector(reactor)(node)
    return connect
