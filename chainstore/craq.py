"""Reads at any member of a chain, still linearizable (CRAQ, Terrace & Freedman 2009).

A chain's tail answers reads from its store, under the lease its predecessor grants (see
L{chainstore.chain}). Here the head and the middle answer too:

- L{DirtyKeys}, per replica: the keys that have a write applied here and not yet acknowledged
  by the tail, each with its highest such serial. Filled where a write is applied (the head's
  C{write}, a middle's C{receive}), emptied by the acknowledgements coming back up the chain.
  It holds one entry per write in flight and nothing else: no old values, no growth with the
  number of keys.
- A read of a **clean** key (not in L{DirtyKeys}) is answered from the local store (or the
  cache) while the member holds a read lease from its successor: no write that this member has
  not applied can be committed while that lease runs (the successor waits out what it granted
  before it takes writes from anyone else; docs/DESIGN.md, "Reads at any member").
- A read of a **dirty** key at a member that holds its lease first waits, at most
  L{DIRTY_WAIT}, for the acknowledgement of the key's newest write here, which is already on
  its way up the chain; then it is read again under the same rules. Usually the key is clean by
  then and the read is answered locally: no message at all, where asking the tail costs a
  query and its answer (about 270 us of CPU a message on the benchmark's machine).
- A read of a key still dirty after that wait, or any read without a lease, asks the tail
  which serial it has applied (L{ReadVersion}: the key, the serial of this member's newest write to it and the last
  serial this member holds; no value). If the tail has applied that newest write, the local
  value is the committed one; otherwise the committed value is older than anything kept here
  and the tail sends it in the same answer. So a member keeps no previous versions at all: the
  tail's store is the committed version.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.python.failure import Failure

from chainstore.control import ReadVersion
from chainstore.errors import KeyNotFound, NotResponsible
from chainstore.logs import get_logger

if TYPE_CHECKING:
    from chainstore.cache import Cache
    from chainstore.chain import ChainReplicator, Replica
    from chainstore.ring import NodeInfo

log = get_logger("chainstore.craq")

# A version query unanswered within this is given up and the read refused (NotResponsible, so
# the client retries elsewhere): a tail that does not answer is being replaced.
READ_QUERY_TIMEOUT = 1.0
# How long a read of a dirty key waits for its write's acknowledgement before it asks the
# tail: a chain's round trip is a few ms, so this is only reached when the chain is slow (a
# successor replaced, a new tail waiting out a lease), where asking the tail is no slower.
DIRTY_WAIT = 0.05
# "newest" of a member that cannot vouch for any local value (a store that may hold writes the
# chain never got): the tail always sends its value.
UNKNOWN = 2**62


class DirtyKeys:
    """Keys with writes applied here and not yet acknowledged by the tail: key -> the highest
    such serial. Bounded by the writes in flight (one entry per write, cleared by acks)."""

    def __init__(self) -> None:
        self._serials: dict[bytes, int] = {}
        # (serial, key) in serial order, so that an ack clears in O(writes acknowledged)
        self._order: deque[tuple[int, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._serials)

    def __contains__(self, key: bytes) -> bool:
        return key in self._serials

    def serial(self, key: bytes) -> int | None:
        return self._serials.get(key)

    def applied(self, serial: int, key: bytes) -> None:
        self._serials[key] = serial
        self._order.append((serial, key))

    def acked(self, acked: int) -> None:
        order, serials = self._order, self._serials
        while order and order[0][0] <= acked:
            serial, key = order.popleft()
            if serials.get(key) == serial:
                del serials[key]

    def clear(self) -> None:
        self._serials.clear()
        self._order.clear()


def vouches(replica: Replica, now: float) -> bool:
    """Whether a non-tail member may answer reads of its clean keys from its own store: it
    holds a read lease from its successor and its store holds nothing unforwarded."""
    return replica.trusted and now < replica.up_lease_until


class MemberReads:
    """The reads a head or a middle answers: clean ones locally, the rest via the tail."""

    def __init__(self, chain: ChainReplicator, cache: Cache) -> None:
        self.chain = chain
        self.cache = cache
        # reads answered here, from the store or cache / resolved with the tail; reads of a
        # dirty key that waited for its acknowledgement first (then counted as one of those)
        self.local = 0
        self.resolved = 0
        self.waited = 0
        # None: dirty reads ask the tail at once (tests of that path)
        self.dirty_wait: float | None = DIRTY_WAIT

    def read(self, replica: Replica, key: bytes, tail: NodeInfo,
             wait: bool = True) -> bytes | Deferred[bytes]:
        if vouches(replica, self.chain.monotonic()):
            serial = replica.dirty.serial(key)
            if serial is None:  # clean
                self.local += 1
                value = self.cache.get(key)
                if value is None:
                    value = replica.store.get(key)
                    if value is None:
                        raise KeyNotFound(f"no value is stored under {key!r}")
                    self.cache.put(key, value)
                return value
            if wait and self.dirty_wait is not None:
                return self._wait_clean(replica, key, tail, serial)
        self.resolved += 1
        return self._resolve(replica, key, tail)

    def _wait_clean(self, replica: Replica, key: bytes, tail: NodeInfo,
                    serial: int) -> Deferred[bytes]:
        """Read C{key} again once the write C{serial} is acknowledged here (or L{DIRTY_WAIT}
        has passed), with the rules of any read at that moment: answered at that moment, it is
        still inside the read's own interval, so it stays linearizable."""
        self.waited += 1
        chain = self.chain

        def again(_: object) -> bytes | Deferred[bytes]:
            if chain.replicas.get(replica.owner) is not replica or replica.is_tail:
                # The chain was rebuilt meanwhile: this replica's rules no longer apply.
                raise NotResponsible(f"{chain.me.name} changed its part in this key's chain")
            return self.read(replica, key, tail, wait=False)

        def slow(failure: Failure) -> bytes | Deferred[bytes]:
            failure.trap(TimeoutError)
            return again(None)

        d = chain.acknowledged(replica, serial)
        d.addTimeout(self.dirty_wait, chain.clock)
        return d.addCallbacks(again, slow)

    def _resolve(self, replica: Replica, key: bytes, tail: NodeInfo) -> Deferred[bytes]:
        # The local value as of now, with the serial of this member's newest write to the key
        # (a clean key's newest is at most what the tail has acknowledged to us).
        local = replica.store.get(key)
        newest = replica.dirty.serial(key)
        if newest is None:
            newest = replica.acked
        if not replica.trusted:
            newest = UNKNOWN
        d = self.chain.query_tail(tail, ReadVersion, epoch=self.chain.epoch,
                                  owner=replica.owner, key=key, newest=newest,
                                  held=replica.last_serial)

        def answered(answer: dict[str, Any]) -> bytes:
            if answer.get("found") is not None:
                # The tail's committed version is not the one we hold: it sent its own.
                value = answer.get("value") if answer["found"] else None
            else:
                value = local
            if value is None:
                raise KeyNotFound(f"no value is stored under {key!r}")
            return bytes(value)

        def failed(failure: Failure) -> Failure:
            if failure.check(KeyNotFound):
                return failure
            log.debug("a read of {owner}'s range could not be resolved with {tail}: {error}",
                      owner=replica.owner, tail=tail.name, error=failure.getErrorMessage())
            raise NotResponsible(f"{self.chain.me.name} could not check this key's version "
                                 f"with the tail ({failure.getErrorMessage()})")

        return d.addCallbacks(answered).addErrback(failed)


def answer_version(replica: Replica, key: bytes, newest: int, held: int,
                   value_of: Any) -> dict[str, Any]:
    """The tail's answer to L{ReadVersion}: the serial it has applied, and its value of C{key}
    unless the asker's holds it (its newest write to the key applied here, and nothing here
    that it lacks)."""
    serial = replica.last_serial
    if newest <= serial <= held:
        return {"serial": serial}
    value = value_of(key)
    if value is None:
        return {"serial": serial, "found": False}
    return {"serial": serial, "found": True, "value": value}


__all__ = ["DIRTY_WAIT", "DirtyKeys", "MemberReads", "READ_QUERY_TIMEOUT", "UNKNOWN",
           "answer_version", "vouches"]
