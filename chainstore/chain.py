"""Chain replication of writes: serial numbers, the pending-ack window, leases.

Each server keeps, per store, a L{Replica}: its part in the chain of the one range that store
holds. The head assigns each write the range's next serial, applies it, and forwards batches of
writes to its live successor; a middle applies them in serial order and forwards them on; the
tail applies them and acknowledges to the head, which passes the acknowledgement on to the
middle. Nothing is answered: all of it travels one way, in L{control.Relay} boxes, one per peer
and reactor turn carrying every section this server has for that peer (in a ring of three a
server's successor is its range's middle, its predecessor's tail and its second predecessor's
head, so that is one box for all three chains). An acknowledgement means "applied at the tail"
and is cumulative by serial. The outstanding forwards of a node are its pending-ack window, a
bounded queue of batches; the writes waiting for the acknowledgement are Deferreds.

One-way messages are lost only with their connection, so a member resends its window when its
link to the successor drops (and a tail its acknowledgement when its link to the head does),
when a new ring is adopted (the receiver ignores what belongs to an older ring and holds what
belongs to a newer one until it adopts it), and when nothing has been acknowledged for
L{ACK_TIMEOUT} (a link that looks open but delivers nothing): a receiver that finds a write
missing closes the link, which makes its predecessor resend.

The serial is persisted with the data (atomically, in the same store) together with the chain's
identity; a replica skips writes it already has (serial <= its last), so after a failure a
predecessor can resend its whole window to a new successor without applying anything twice.

Reads are served by the tail only while it holds a lease from its predecessor, renewed when a
third of the seconds granted remain and counted from when the request was sent, so a tail paused
past the ECS's failure timeout does not answer reads when it wakes. A predecessor that becomes
tail because its successor failed waits until the lease it granted has run out before it reads
or acknowledges.
See docs/DESIGN.md, "Chain replication".

A storage error stops all of it (L{ChainReplicator.fail}): a write is forwarded or acknowledged
only once its store has committed it, and after a failure nothing is.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from heapq import heapify, heappop, heappush
from itertools import count
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from chainstore.control import (
    ACK,
    BATCH,
    DELETE,
    PROBE,
    PUT,
    RESENT,
    RESUMED,
    ControlFailed,
    RenewLease,
    StaleEpoch,
    pack_ops,
    pack_section,
    send_relay,
    unpack_ops,
    unpack_sections,
)
from chainstore.craq import READ_QUERY_TIMEOUT, DirtyKeys
from chainstore.errors import NotResponsible, ServerStopped, StorageFailed
from chainstore.logs import get_logger
from chainstore.peers import PeerPool
from chainstore.ring import NodeInfo, Ring
from chainstore.storage import STORE_NAMES, Store

log = get_logger("chainstore.chain")

Op = tuple[int, int, bytes, bytes, bytes]  # serial, kind, key, value, request id

LEASE_SECONDS = 2.0
#: How much sooner than the ECS could declare this server failed its read leases end
#: (monotonic clocks of two machines drift apart a little).
LEASE_BOUND_MARGIN = 0.25
# Batches a head has in flight (not yet acknowledged by the tail). Few: while they travel, new
# writes gather into the next batch, so under load each message carries many writes (measured:
# 1-2 gave ~10% more chain puts at 32 in flight than 32 did, on this 2-core machine); the
# backlog is bounded in writes and bytes, below. A middle forwards at once what it receives:
# the head's window bounds it.
WINDOW_BATCHES = 2
BATCH_OPS = 256
# A batch is also cut at this many bytes of writes (past its first write), so that a Relay box
# stays far below the cap of a server's AMP listener (chainstore/amp_server.py): 256 writes of
# 120 KB values would otherwise make a 30 MB box.
BATCH_BYTES = 512 * 1024
# Bytes of an op in a batch besides its key, value and request id (control.pack_ops' header).
OP_HEADER_BYTES = 15
# The write backlog of this server: writes applied here and not yet acknowledged by their
# successor (every replica's queued and in-flight writes, as a head and as a middle). Past either
# bound, its client connections stop reading requests (L{ChainReplicator.backlogged}; they wait
# in L{ChainReplicator.wait_for_room}) until the backlog is down to half of both; nothing is
# refused. Counted as a batch packs them (key, value, request id, OP_HEADER_BYTES): 20,000
# writes of 120 KB would be 2.4 GB, hence the bound in bytes. A middle's queue is bounded by its
# predecessor's window (WINDOW_BATCHES batches), so only what heads take from clients can grow.
MAX_QUEUED_OPS = 20_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024
# After a link drops, the window is resent on a new connection this much later.
RETRY_SECONDS = 0.2
# A window with nothing acknowledged for this long is taken for a lost link (a hung process, a
# half-open connection): the connection is dropped and the window resent on a new one.
# Generous: a new tail waits out a lease before it acknowledges.
ACK_TIMEOUT = 10.0
# Relay boxes of a newer ring than this server's are held until it adopts that ring (the rings
# of a reconfiguration reach the members a moment apart); past this many bytes of them the link
# is closed instead, and its sender resends later.
EARLY_BYTES = 16 * 1024 * 1024
# A lease request refused (or failed) is asked again this soon: until it is granted, reads of
# the range are refused (or, for LEASE_WAIT, wait). Also the least wait between two renewals.
LEASE_RETRY_SECONDS = 0.1
# How long a read that finds no lease waits for one being asked for (L{ChainReplicator.leased})
# before it is refused: a server that has just adopted a ring asks at once, but the granter
# may not be there yet (another epoch, no Alive answered yet) and the next request goes out
# LEASE_RETRY_SECONDS later; a client that read right after the ECS said "serving" was
# refused. A few retries and round trips; a tail that gets no lease within it refuses as before.
LEASE_WAIT = 0.5
# Enough for every write of the clients' retry deadline at full speed (about 30 s at 5,000
# writes/s); an entry costs about 150 bytes.
RECENT_REQUESTS = 150_000


@dataclass
class _Batch:
    first: int
    last: int
    ops: list[Op]
    size: int = 0  # bytes of its ops (_op_bytes)
    sent: float = 0.0  # when it was last sent (the clock's seconds)


def _after(ops: list[Op], serial: int) -> list[Op]:
    """The writes of C{ops} after C{serial}. Serials rise within a batch: usually all of it
    is new (a resent window is not)."""
    if not ops or ops[0][0] > serial:
        return ops
    return [op for op in ops if op[0] > serial]


def _vouched(replica: Replica) -> int:
    """What C{replica} knows its tail to have applied: nothing yet after a restart, when its
    acked is its own last serial (writes it applied and may never have forwarded)."""
    return 0 if replica.resumed else replica.acked


def _op_bytes(op: Op) -> int:
    return OP_HEADER_BYTES + len(op[2]) + len(op[3]) + len(op[4])


_tokens = count(1)
# orders the waiters of one serial by arrival (Deferreds do not compare)
_arrivals = count()


@dataclass(eq=False)
class Replica:
    """This server's part in the chain of the range owned (in the ring) by C{owner}."""

    owner: str
    chain_id: str
    store_name: str
    store: Store
    last_serial: int
    acked: int = 0
    successor: NodeInfo | None = None
    predecessor: NodeInfo | None = None
    is_head: bool = False
    is_tail: bool = False
    successor_is_tail: bool = False
    live_length: int = 1
    pending: list[Op] = field(default_factory=list)
    window: deque[_Batch] = field(default_factory=deque)
    # (serial, arrival, Deferred) fired when the serial is acknowledged: a heap, lowest serial
    # first. A read of a dirty key (chainstore/craq.py) waits for an older serial than the
    # writes queued after it, and stops waiting (cancelled) after DIRTY_WAIT: its entry stays
    # until its serial is acknowledged, and these are dropped once they are half the heap.
    waiters: list[tuple[int, int, Deferred[int]]] = field(default_factory=list)
    cancelled_waiters: int = 0
    generation: int = 0
    # set after a lost link until the whole window has been resent, so that no newer batch
    # overtakes an older one on the way to the successor
    retry: Any = None
    paused: bool = False
    # True from a restart until a write forwarded since is acknowledged (acked > resumed_from):
    # the successor may skip a gap of writes that were applied here and never forwarded (never
    # acknowledged to anyone).
    resumed: bool = False
    resumed_from: int = 0
    # the head of the live chain (a tail acknowledges to it)
    head: NodeInfo | None = None
    # as a head whose successor is a middle: the last acknowledgement passed on to it
    acked_down: int = 0
    # fires every ACK_TIMEOUT while the window is not empty (L{ChainReplicator._ack_overdue})
    ack_timer: Any = None
    # as a tail: the next acknowledgement resent after the link to the head dropped
    reack: Any = None
    # batch sections that came before the replica may take writes (accept_from), in order:
    # (epoch, flags, acked, writes)
    held: list[tuple[int, int, int, list[Op]]] = field(default_factory=list)
    # the highest serial this process has queued for its successor (0 after a restart: it
    # does not know what its successor got, so it forwards whatever it receives)
    forwarded: int = 0
    opened: bool = False
    # forwarded batches and the writes they carried (their ratio is the batching achieved)
    batches_sent: int = 0
    ops_sent: int = 0
    # as tail: reads and acks allowed until lease_until, not before tail_from
    lease_until: float = 0.0
    tail_from: float = 0.0
    # as predecessor of the tail: the latest lease expiry granted to it
    granted_until: float = 0.0
    # the next request for this replica's read lease (a DelayedCall; ChainReplicator._renew_now)
    renewal: Any = None
    # reads waiting for this replica's lease (ChainReplicator.leased)
    # (a dict, insertion-ordered, so that each one that times out leaves in O(1))
    lease_waiters: dict[Deferred[None], None] = field(default_factory=dict)
    # names this object among every replica of the process (request ids refer to it)
    token: int = field(default_factory=lambda: next(_tokens))
    # writes in pending and window, and their bytes (_op_bytes): this replica's backlog
    queued_ops: int = 0
    queued_bytes: int = 0
    # Reads at any member (chainstore/craq.py). As head or middle: the keys with writes in
    # flight, and the read lease granted by the successor (clean reads answered here until then)
    dirty: DirtyKeys = field(default_factory=DirtyKeys)
    up_lease_until: float = 0.0
    # as successor of a head or middle: the latest expiry granted to it
    granted_up_until: float = 0.0
    # no write enters the chain here before this: the lease granted to a predecessor that has
    # left the chain (it may still answer reads until then)
    accept_from: float = 0.0
    # False when the store continues a chain from an earlier process: a head's writes that died
    # unforwarded with it stay in the store, so none of its values is vouched for
    trusted: bool = True

    def queue(self, ops: list[Op]) -> None:
        self.pending.extend(ops)
        self.queued_ops += len(ops)
        self.queued_bytes += sum(_op_bytes(op) for op in ops)

    def drop_queue(self) -> None:
        self.pending.clear()
        self.window.clear()
        self.queued_ops = self.queued_bytes = 0


def _next_batch(pending: list[Op]) -> tuple[list[Op], int]:
    """Cut the next batch off the front of C{pending}: at most BATCH_OPS writes and, past the
    first, at most BATCH_BYTES of them as packed for a batch section; and its size in bytes."""
    count = size = taken = 0
    for op in pending:
        size += _op_bytes(op)
        if count == BATCH_OPS or (count and size > BATCH_BYTES):
            break
        count += 1
        taken = size
    batch = pending[:count]
    del pending[:count]
    return batch, taken


def chain_id(ring: Ring, index: int) -> str:
    """The identity of a range's chain: its members, and the epoch at which they formed it."""
    names = "|".join(n.name for n in ring.ring_chain(index))
    return f"{names}@{ring.nodes[index].chain_epoch}"


class ChainReplicator:
    def __init__(self, me: NodeInfo, peers: PeerPool, clock: IReactorTime,
                 monotonic: Callable[[], float], lease: float = LEASE_SECONDS,
                 on_apply: Callable[[list[bytes]], None] = lambda keys: None) -> None:
        self.me = me
        # told the keys of every batch a middle or tail applies (the node drops them from its
        # cache: only clean values may be cached)
        self.on_apply = on_apply
        self.peers = peers
        self.clock = clock
        self.monotonic = monotonic
        self.lease = lease
        # Leases granted by the process before this one on the same stores ended at most a
        # lease after this one started (L{_open_replica}).
        self.started = monotonic()
        #: Under an ECS, the moment (monotonic) until which this server may grant read leases:
        #: the ECS cannot declare it failed before then (see L{ecs_contact}). None: no ECS.
        self.lease_bound: float | None = None
        self.epoch = 0
        self.replicas: dict[str, Replica] = {}
        self._turn: set[Replica] = set()
        # request id -> (replica, serial) of the write that carried it, kept per server rather
        # than per replica: a reconfiguration can move a range into another of this server's
        # stores, and a retry arriving there must still be recognised (bounded, oldest first)
        # Each entry: (replica token, serial, key, sequence number); token 0 for an id that came
        # with a range copied from another server. Copies carry the ids of the keys they move.
        self.recent: OrderedDict[bytes, tuple[int, int, bytes, int]] = OrderedDict()
        self._recent_seq = 0
        self._turn_call: Any = None
        #: the storage error that stopped this server's chains, None while they work
        self.failed: StorageFailed | None = None
        #: the write backlog passed MAX_QUEUED_OPS or MAX_QUEUED_BYTES and is not yet down to
        #: half of both: client connections read no further write (see L{wait_for_room})
        self.backlogged = False
        self._room_waiters: deque[Deferred[None]] = deque()
        self._releasing = False
        # The sections of this turn, per peer: (batch parts, acks by owner)
        self._outbox: dict[NodeInfo, tuple[list[bytes], dict[str, int]]] = {}
        self._ending = False
        # Relay boxes of a newer ring than ours, held until we adopt it: (epoch, data)
        self._early: list[tuple[int, bytes]] = []
        self._early_bytes = 0
        #: Relay boxes sent, and their sections (batches and acknowledgements)
        self.relays_sent = 0
        self.sections_sent = 0
        self.stopped = False
        if peers is not None:
            peers.on_lost = self._link_lost

    # -- configuration ---------------------------------------------------------------------------

    def adopt(self, ring: Ring, stores: Any) -> None:
        """Re-derive every replica's links from C{ring}; called for every new epoch."""
        self.epoch = ring.epoch
        # Sections not sent yet belong to the ring before: a box carries its epoch, and an
        # acknowledgement of an old chain must never reach a new one (serials restart). What
        # they carried is resent below.
        self._outbox.clear()
        if self.failed is not None:
            return
        old = self.replicas
        self.replicas = {}
        names = [n.name for n in ring.nodes]
        if self.me.name not in names or self.me.name in ring.dead or stores is None:
            for replica in old.values():
                self._fail_waiters(replica, NotResponsible("this server left the chain"))
            self._update_backlog()
            return
        me_index = names.index(self.me.name)
        n = len(ring.nodes)
        for position in range(ring.chain_length):
            owner_index = (me_index - position) % n
            owner = ring.nodes[owner_index].name
            cid = chain_id(ring, owner_index)
            store = stores[STORE_NAMES[position]]
            previous = old.pop(owner, None)
            if previous is None or previous.chain_id != cid or previous.store is not store:
                if previous is not None:
                    self._fail_waiters(previous, NotResponsible("the chain was rebuilt"))
                replica = self._open_replica(owner, cid, STORE_NAMES[position], store,
                                             ring.chain_length > 1)
            else:
                replica = previous
            self._relink(replica, ring, owner_index)
            self.replicas[owner] = replica
        for unused in STORE_NAMES[ring.chain_length:]:
            # A store with no role in this ring starts afresh if it gets one again: a chain of
            # the same names may come back later, and the serial kept from before would make
            # this store skip that chain's new writes as already applied.
            if stores[unused].chain_state() != ("", 0):
                stores[unused].set_chain_state("", 0)
        for replica in old.values():
            self._fail_waiters(replica, NotResponsible("this server left the range's chain"))
        for replica in self.replicas.values():
            # What we sent under the ring before may have been ignored by a successor that
            # already had this one: resend it (a successor skips what it has). A tail tells
            # its head, which may be new, how far it is.
            if replica.successor is not None:
                if replica.window or replica.acked:
                    self._resend_now(replica)
            elif replica.head is not None and replica.head != self.me \
                    and self.monotonic() >= replica.tail_from:
                self._ack_head(replica)
        self._ask_leases()
        self._update_backlog()
        self._replay_early()
        self._send_later()

    def _open_replica(self, owner: str, cid: str, store_name: str, store: Store,
                      leases: bool) -> Replica:
        stored_chain, serial = store.chain_state()
        if stored_chain != cid:
            # A new chain for this store (a planned change, drained first): serials restart.
            serial = 0
            store.set_chain_state(cid, 0)
        # Continuing a chain this store already belonged to (the process restarted): writes it
        # applied but never forwarded died with its window, so its successor may be behind.
        replica = Replica(owner, cid, store_name, store, serial, acked=serial,
                          resumed=serial > 0, resumed_from=serial, opened=True,
                          trusted=serial == 0)
        if stored_chain == cid and leases:
            # And the leases that process granted in this chain, to its successor or upstream,
            # died with its memory while their holders may still read under them: taken as
            # granted up to a lease from our start, they are waited out before this replica
            # reads or acknowledges as tail, or takes writes (as a new tail or from a new
            # predecessor would wait out its own).
            forgotten = self.started + self.lease
            replica.granted_until = replica.granted_up_until = forgotten
            replica.accept_from = forgotten
        return replica

    def _relink(self, replica: Replica, ring: Ring, owner_index: int) -> None:
        live = ring.chain_for_index(owner_index)
        replica.head = live[0]
        i = live.index(self.me)
        successor = live[i + 1] if i + 1 < len(live) else None
        was_tail = replica.is_tail
        predecessor = live[i - 1] if i > 0 else None
        if replica.predecessor is not None and predecessor != replica.predecessor:
            # The predecessor left the chain and may answer reads until the lease we granted
            # it runs out: no write may be committed without it before then.
            replica.accept_from = max(replica.accept_from, replica.granted_up_until)
        replica.predecessor = predecessor
        replica.is_head = i == 0
        replica.is_tail = successor is None
        replica.successor_is_tail = i + 2 == len(live)
        replica.live_length = len(live)
        if replica.opened:
            replica.opened = False
            if not replica.is_head and not replica.is_tail:
                # A middle learns what the tail has from its head: a stale "acked" from the
                # store would let it trim writes from its window that the tail never got.
                replica.acked = 0
        if successor != replica.successor:
            # A lease vouches for our place in the chain only while its granter follows us.
            replica.up_lease_until = 0.0
            if successor is not None and replica.window:
                log.info("resending {count} batches of {owner}'s range to {to}",
                         count=len(replica.window), owner=replica.owner, to=successor.name)
            replica.successor = successor
            replica.generation += 1
            replica.paused = False
            replica.acked_down = 0
            # (the window goes to the new successor when the ring is adopted: adopt)
        if successor is None:
            replica.paused = False
        if replica.is_tail and not was_tail:
            replica.dirty.clear()  # a tail's store is the committed version
            # Our old successor may hold a lease we granted: neither read nor acknowledge
            # before it has run out, so it can never answer after we have moved on.
            replica.tail_from = replica.granted_until
            delay = max(0.0, replica.tail_from - self.monotonic())
            self.clock.callLater(delay, self._take_tail, replica, replica.generation)

    def _take_tail(self, replica: Replica, generation: int) -> None:
        if replica.generation != generation or not replica.is_tail:
            return
        replica.drop_queue()
        self._advance(replica, replica.last_serial)
        self._ack_head(replica)
        self._send_later()

    def _ask_leases(self) -> None:
        """After a new ring: a replica that holds no lease (a new role, a new successor) asks
        at once, not at its next renewal: it refuses reads until it holds one."""
        for replica in list(self.replicas.values()):
            if self._lacks_lease(replica) or (replica.live_length > 1
                                              and replica.renewal is None):
                self._renew_now(replica)

    def stop(self) -> None:
        self.stopped = True
        self.peers.close()
        for replica in self.replicas.values():
            self._fail_waiters(replica, ServerStopped("the server is stopping"))

    def fail(self, error: StorageFailed) -> None:
        """A store failed: every waiting write fails with C{error}; nothing more is committed,
        forwarded, acknowledged, read (no lease) or granted. For good (a restart clears it)."""
        if self.failed is not None:
            return
        self.failed = error
        if self._turn_call is not None and self._turn_call.active():
            self._turn_call.cancel()
        self._turn.clear()
        for replica in self.replicas.values():
            # Not forwarded: a write is forwarded only once committed here, and these may not
            # be. Their waiters fail below; answers still on their way are ignored (generation).
            replica.drop_queue()
            replica.lease_until = replica.up_lease_until = 0.0
            for call in (replica.retry, replica.ack_timer, replica.reack):
                if call is not None and call.active():
                    call.cancel()
            replica.held.clear()
            self._fail_waiters(replica, error)
        self._outbox.clear()
        self._early.clear()
        self._early_bytes = 0
        self.peers.close()
        # Writes held back by the backlog go on, to be refused with the error.
        self._update_backlog()

    # -- the head --------------------------------------------------------------------------------

    def write(self, replica: Replica, kind: int, key: bytes, value: bytes,
              request_id: bytes) -> tuple[bool, Deferred[int]]:
        """Apply a client write at the head; (key existed, fires when the tail has it)."""
        seen = self.recent.get(request_id) if request_id else None
        if seen is not None:
            earlier, serial = seen[0], seen[1]
            if earlier == replica.token:
                # A retry of a write we already carry: wait for (or report) the same write.
                return True, self._wait(replica, serial)
            # Applied here in a role this server has since left, or on another server whose
            # range was copied here: either way the range moved in a reconfiguration, which
            # drains every write to its tail before it commits. The write is in this store; answer once this head's writes are at the
            # tail, and never apply it twice (a later write may have replaced it).
            return True, self.settled(replica)
        if self.failed is not None:
            raise self.failed
        self._check_accepting(replica)
        # Not refused when the backlog is over its bounds: the connections stop reading then
        # (backlogged), so at most the writes they had already read come in past them.
        serial = replica.last_serial + 1
        try:
            existed = replica.store.apply_one(kind, key, value, serial)
        except StorageFailed as e:
            # The group transaction is rolled back, so are the turn's earlier writes: fail them
            # all (they are queued but not forwarded; nothing is until its commit).
            self.fail(e)
            raise
        replica.last_serial = serial
        self.remember(replica.token, request_id, serial, key)
        if not replica.is_tail:
            replica.dirty.applied(serial, key)
            replica.queue([(serial, kind, key, value, request_id)])
            replica.forwarded = serial
            self._update_backlog()
        # Committed, then forwarded (or, at a tail, acknowledged) at the end of this turn.
        self._end_turn_later(replica)
        return existed, self._wait(replica, serial)

    # -- middle and tail -------------------------------------------------------------------------

    def relayed(self, epoch: int, data: bytes,
                observe: Callable[[str, float], None] | None = None) -> None:
        """A L{control.Relay} box from a peer. Raises L{ControlFailed} when the peer must
        resend (a write is missing, the box does not parse, too much waits for a newer ring):
        its connection is then closed (L{chainstore.amp_server}), and the peer resends on a
        new one. C{observe(role, started)} times each batch applied as middle or tail."""
        try:
            # Every section is read before any is applied: a box that does not parse changes
            # nothing.
            sections = [(kind, flags, owner, acked, unpack_ops(payload) if kind == BATCH else [])
                        for kind, flags, owner, acked, payload in unpack_sections(data)]
        except ValueError as e:
            raise ControlFailed(f"a Relay that does not parse: {e}") from None
        if self.failed is not None:
            return  # this server serves nothing more (the ECS repairs it away)
        if epoch != self.epoch:
            if epoch > self.epoch:
                self._hold_early(epoch, data)
            # else: sent under a ring before ours; the sender resends when it adopts ours
            return
        try:
            for kind, flags, owner, acked, ops in sections:
                if kind == ACK:
                    self._take_ack(owner, acked)
                    continue
                replica = self.replicas.get(owner)
                if replica is None or replica.is_head:
                    log.warn("ignored writes of {owner}'s range: {me} follows nobody in its "
                             "chain at epoch {epoch}", owner=owner, me=self.me.name,
                             epoch=epoch)
                    continue
                if replica.held or self.monotonic() < replica.accept_from:
                    self._hold(replica, flags, acked, ops)
                    continue
                started = self.monotonic() if observe is not None else 0.0
                self._take_batch(replica, flags, acked, ops)
                if observe is not None:
                    observe("tail" if replica.is_tail else "middle", started)
        finally:
            self._send_later()

    def _take_batch(self, replica: Replica, flags: int, acked: int, ops: list[Op]) -> None:
        """Apply a batch section from our predecessor in order, forward it or acknowledge
        it. L{ControlFailed} if a write is missing before it (the predecessor must resend)."""
        if self.failed is not None:
            return
        if acked > replica.acked and not replica.is_tail:
            # what the head passes on of the tail's progress (never past what we forwarded)
            self._advance(replica, min(acked, replica.last_serial))
        owner = replica.owner
        fresh = _after(ops, replica.last_serial)
        if fresh:
            if fresh[0][0] != replica.last_serial + 1:
                if not flags & RESUMED:
                    raise ControlFailed(f"{owner}'s writes from serial {fresh[0][0]} came "
                                        f"after {replica.last_serial}: a write is missing")
                # The predecessor restarted: the writes in between were applied only there and
                # acknowledged to nobody; we go on from its numbering.
                log.warn("{owner}'s chain resumes at serial {serial} after {last}: skipping "
                         "writes its predecessor never forwarded", owner=owner,
                         serial=fresh[0][0], last=replica.last_serial)
                if not replica.is_tail:
                    # and so may our successor, until it has acknowledged a write past the gap
                    replica.resumed = True
                    replica.resumed_from = max(replica.resumed_from, fresh[0][0] - 1)
            try:
                replica.store.apply_ops(fresh, fresh[-1][0])
            except StorageFailed as e:
                # Nothing of the batch is applied (one transaction): the predecessor keeps it
                # in its window and resends it to whoever the ECS makes its successor.
                self.fail(e)
                return
            replica.last_serial = fresh[-1][0]
            for op in fresh:
                self.remember(replica.token, op[4], op[0], op[2])
            if not replica.is_tail:
                for op in fresh:
                    replica.dirty.applied(op[0], op[2])
            self.on_apply([op[2] for op in fresh])
        if replica.is_tail:
            # (Every batch, new or not, is acknowledged: a resent one asks for it.)
            if flags & PROBE and replica.head is not None and replica.head != self.me:
                log.warn("{owner}'s head has heard no acknowledgement for a while: dialling "
                         "it again", owner=owner)
                self.peers.drop(replica.head, abort=True)
            if self.monotonic() >= replica.tail_from:
                # (a tail has no window or queue: only reads may wait for its serials)
                replica.acked = replica.last_serial
                if replica.waiters:
                    self._advance(replica, replica.acked)
                self._ack_head(replica)
            return
        # Forward what this process has not forwarded yet, including writes it already held
        # from before a restart (its old window died with it; the successor skips duplicates).
        onward = _after(ops, replica.forwarded)
        if onward:
            replica.forwarded = onward[-1][0]
            replica.queue(onward)
            self._update_backlog()
            self._end_turn_later(replica)
        if replica.successor is not None and not replica.paused \
                and (flags & PROBE or (flags & RESENT and not onward)):
            # Resent to us: our window goes on again, so that the tail acknowledges again
            # whatever acknowledgement was lost (and, on a probe, redials the head first).
            self._send_window(replica, flags & (RESENT | PROBE))

    def _take_ack(self, owner: str, acked: int) -> None:
        """The tail of C{owner}'s range has applied every write up to C{acked} (sent by the
        tail to the head, passed on by the head to the middle)."""
        replica = self.replicas.get(owner)
        if replica is not None and not replica.is_tail and acked > replica.acked:
            if acked > replica.last_serial:
                log.warn("ignored an acknowledgement of {owner}'s writes up to {acked}: this "
                         "server has applied only {last}", owner=owner, acked=acked,
                         last=replica.last_serial)
                return
            self._advance(replica, acked)

    def _hold(self, replica: Replica, flags: int, acked: int, ops: list[Op]) -> None:
        """Keep a batch until the replica may take writes (accept_from), after those held."""
        replica.held.append((self.epoch, flags, acked, ops))
        if len(replica.held) == 1:
            delay = max(0.0, replica.accept_from - self.monotonic())
            self.clock.callLater(delay, self._take_held, replica)

    def _take_held(self, replica: Replica) -> None:
        if self.failed is not None or self.replicas.get(replica.owner) is not replica \
                or replica.is_head:
            replica.held.clear()
            return
        wait = replica.accept_from - self.monotonic()
        if wait > 0:
            self.clock.callLater(wait, self._take_held, replica)
            return
        held, replica.held = replica.held, []
        try:
            for epoch, flags, acked, ops in held:
                # (sent under a ring before ours: ignored, as it would be now; resent on adopt)
                if epoch == self.epoch:
                    self._take_batch(replica, flags, acked, ops)
        except ControlFailed as e:
            # (no link to close here: the predecessor resends after ACK_TIMEOUT)
            log.warn("dropped held writes of {owner}'s range: {error}", owner=replica.owner,
                     error=e)
        self._send_later()

    def _hold_early(self, epoch: int, data: bytes) -> None:
        if self._early_bytes + len(data) > EARLY_BYTES:
            raise ControlFailed(f"{self._early_bytes} bytes of writes already wait for epoch "
                                f"{epoch}")
        self._early.append((epoch, data))
        self._early_bytes += len(data)

    def _replay_early(self) -> None:
        early, self._early, self._early_bytes = self._early, [], 0
        for epoch, data in early:
            if epoch >= self.epoch:
                try:
                    self.relayed(epoch, data)
                except ControlFailed as e:
                    log.warn("dropped writes held for epoch {epoch}: {error}", epoch=epoch,
                             error=e)

    # -- forwarding ------------------------------------------------------------------------------

    def _end_turn_later(self, replica: Replica) -> None:
        # Everything that arrived in this reactor turn (one read from the network) is committed
        # in one transaction and forwarded in one batch.
        self._turn.add(replica)
        self._send_later()

    def _send_later(self) -> None:
        """End this reactor turn soon (L{_end_turn}): commit, forward, send the outbox."""
        if not self._ending and (self._turn_call is None or not self._turn_call.active()):
            self._turn_call = self.clock.callLater(0, self._end_turn)

    def _end_turn(self) -> None:
        self._ending = True
        try:
            self._end_turn_now()
        finally:
            self._ending = False
        if self._turn or self._outbox:
            # (writes taken while it ran, from the callbacks of the writes it acknowledged)
            self._send_later()

    def _end_turn_now(self) -> None:
        turn, self._turn = self._turn, set()
        for replica in turn:
            try:
                replica.store.commit()
            except StorageFailed as e:
                # Every store's turn fails with it: no write of this turn is forwarded or
                # acknowledged (some may be committed in another store: their outcome is
                # unknown to their clients, which is what the error they get says).
                self.fail(e)
                return
        for replica in turn:
            if self.replicas.get(replica.owner) is not replica:
                continue
            if not replica.is_tail:
                self._flush(replica)
            elif self.monotonic() >= replica.tail_from:
                # (A head left alone too: its old tail may answer reads until the lease we
                # granted it runs out, so no write is acknowledged before then; _take_tail.)
                self._advance(replica, replica.last_serial)
        for replica in self.replicas.values():
            # A head passes the tail's progress on to its middle (with its next batch, or
            # alone): the middle trims its window and answers its dirty reads by it.
            if replica.acked > replica.acked_down and replica.successor is not None \
                    and not replica.successor_is_tail and not replica.paused:
                self._ack_down(replica)
        if self._outbox:
            self._send_outbox()

    def commit_now(self, store: Store) -> None:
        """Commit C{store}'s waiting writes before a read of it: nobody reads uncommitted data."""
        if store.uncommitted:
            try:
                store.commit()
            except StorageFailed as e:
                self.fail(e)
                raise

    def _flush(self, replica: Replica) -> None:
        if replica.paused:
            return
        while replica.pending and replica.successor is not None \
                and (len(replica.window) < WINDOW_BATCHES or not replica.is_head):
            ops, size = _next_batch(replica.pending)
            batch = _Batch(ops[0][0], ops[-1][0], ops, size)
            replica.window.append(batch)
            replica.batches_sent += 1
            replica.ops_sent += len(ops)
            self._send(replica, batch)

    def _send(self, replica: Replica, batch: _Batch | None, flags: int = 0) -> None:
        """A batch section for the successor (C{batch} None: an empty one, which a tail
        acknowledges), in this turn's box to it."""
        successor = replica.successor
        assert successor is not None
        if replica.resumed:
            flags |= RESUMED
        if batch is not None:
            payload = pack_ops(batch.ops)
            batch.sent = self.clock.seconds()
            if replica.ack_timer is None or not replica.ack_timer.active():
                replica.ack_timer = self.clock.callLater(ACK_TIMEOUT, self._ack_overdue,
                                                         replica)
        else:
            payload = b""
        replica.acked_down = replica.acked
        self._out(successor).extend(pack_section(BATCH, replica.owner, _vouched(replica),
                                                 payload, flags))

    def _ack_down(self, replica: Replica) -> None:
        assert replica.successor is not None
        replica.acked_down = replica.acked
        if not replica.resumed:
            self._out(replica.successor, replica.owner, replica.acked)

    def _ack_head(self, replica: Replica) -> None:
        """As tail: tell the head how far we are (at the end of the turn)."""
        if replica.head is not None and replica.head != self.me:
            self._out(replica.head, replica.owner, replica.acked)

    def _out(self, node: NodeInfo, ack_owner: str | None = None, acked: int = 0) -> list[bytes]:
        """The parts of this turn's batch sections for C{node} (given C{ack_owner}, records
        an acknowledgement for it instead: only the highest of a turn goes)."""
        entry = self._outbox.get(node)
        if entry is None:
            entry = self._outbox[node] = ([], {})
            self._send_later()
        if ack_owner is not None:
            acks = entry[1]
            if acked > acks.get(ack_owner, -1):
                acks[ack_owner] = acked
        return entry[0]

    def _send_outbox(self) -> None:
        outbox, self._outbox = self._outbox, {}
        epoch = self.epoch
        for node, (parts, acks) in outbox.items():
            for owner, acked in acks.items():
                parts.extend(pack_section(ACK, owner, acked))
            # A box takes another section only while both fit in BATCH_BYTES, so that no box
            # is larger than one batch section (a batch of BATCH_BYTES and one more write).
            boxes, box, size = [], [], 0
            for i in range(0, len(parts), 3):  # (sections are three parts each)
                section = parts[i:i + 3]
                length = len(section[0]) + len(section[1]) + len(section[2])
                if box and size + length > BATCH_BYTES:
                    boxes.append(b"".join(box))
                    box, size = [], 0
                box.extend(section)
                size += length
            boxes.append(b"".join(box))
            self.relays_sent += len(boxes)
            self.sections_sent += len(parts) // 3
            proto = self.peers.open(node)
            if proto is not None:
                for data in boxes:
                    send_relay(proto, epoch, data)
            else:
                # (A failed dial is a lost link: the windows are resent, _link_lost.)
                self.peers.get(node).addCallbacks(self._send_boxes, lambda failure: None,
                                                  (epoch, boxes))

    def _send_boxes(self, proto: Any, epoch: int, boxes: list[bytes]) -> None:
        if epoch == self.epoch and self.failed is None:
            for data in boxes:
                send_relay(proto, epoch, data)

    def _call_peer(self, node: NodeInfo, timeout: float, command: Any,
                   **arguments: Any) -> Deferred[Any]:
        """C{command} to peer C{node} over the pool, failing with L{TimeoutError} if it is not
        answered within C{timeout} (dial included). A call that times out is taken for a lost
        peer (hung, or a half-open connection): its connection is aborted, so the next call to
        C{node} dials again."""
        used: list[Any] = []

        def call(proto: Any) -> Deferred[Any]:
            used.append(proto)
            return proto.callRemote(command, **arguments)  # type: ignore[no-any-return]

        def timed_out(failure: Failure) -> Failure:
            if failure.check(TimeoutError) and used:
                self.peers.drop(node, abort=True, proto=used[0])
            return failure

        d = self.peers.get(node).addCallback(call)
        return d.addTimeout(timeout, self.clock).addErrback(timed_out)

    def _link_lost(self, node: NodeInfo) -> None:
        """The connection to peer C{node} dropped (or could not be made): what we sent on it
        may be lost. Our windows to it are resent, and a tail's acknowledgement, on a new
        connection a moment later."""
        if self.failed is not None or self.stopped:
            return
        for replica in self.replicas.values():
            if replica.successor == node:
                if replica.window:
                    self._pause(replica)
                elif replica.retry is None or not replica.retry.active():
                    # Nothing in flight, so nothing to hold back: only an acknowledgement
                    # passed on may be lost, and the resend (an empty batch) carries it again.
                    replica.retry = self.clock.callLater(RETRY_SECONDS, self._resend, replica)
            if replica.is_tail and replica.head == node and replica.head != self.me \
                    and (replica.reack is None or not replica.reack.active()):
                replica.reack = self.clock.callLater(RETRY_SECONDS, self._reack, replica)

    def _reack(self, replica: Replica) -> None:
        if self.replicas.get(replica.owner) is replica and replica.is_tail \
                and self.failed is None and self.monotonic() >= replica.tail_from:
            self._ack_head(replica)

    def _pause(self, replica: Replica, flags: int = RESENT) -> None:
        """Send nothing more to the successor until the window is resent (RETRY_SECONDS)."""
        replica.generation += 1
        replica.paused = True
        if replica.retry is not None and replica.retry.active():
            if flags == RESENT:
                return
            replica.retry.cancel()
        replica.retry = self.clock.callLater(RETRY_SECONDS, self._resend, replica, flags)

    def _ack_overdue(self, replica: Replica) -> None:
        replica.ack_timer = None
        if self.replicas.get(replica.owner) is not replica or not replica.window \
                or replica.successor is None or self.failed is not None or self.stopped:
            return
        due = replica.window[0].sent + ACK_TIMEOUT - self.clock.seconds()
        if due > 0 or replica.paused:
            # The oldest batch still waiting was sent (or resent) lately: watch it.
            replica.ack_timer = self.clock.callLater(max(due, RETRY_SECONDS),
                                                     self._ack_overdue, replica)
            return
        log.warn("no acknowledgement of {owner}'s writes for {seconds:.0f}s: dropping the "
                 "link to {to} and resending", owner=replica.owner, seconds=ACK_TIMEOUT,
                 to=replica.successor.name)
        self.peers.drop(replica.successor, abort=True)
        self._pause(replica, RESENT | PROBE)

    def _resend_now(self, replica: Replica) -> None:
        if replica.retry is not None and replica.retry.active():
            replica.retry.cancel()
        self._resend(replica)

    def _resend(self, replica: Replica, flags: int = RESENT) -> None:
        replica.paused = False
        if replica.successor is None or self.replicas.get(replica.owner) is not replica \
                or self.failed is not None or self.stopped:
            return
        self._send_window(replica, flags)
        self._flush_later(replica)
        self._send_later()

    def _send_window(self, replica: Replica, flags: int = RESENT) -> None:
        """Send the whole window again, marked as resent (an empty batch if it is empty, so
        that the tail acknowledges again); each batch carries the tail's progress."""
        if replica.window:
            for batch in list(replica.window):
                self._send(replica, batch, flags)
        else:
            self._send(replica, None, flags)

    def _advance(self, replica: Replica, acked: int) -> None:
        if acked > replica.acked:
            replica.acked = acked
            if replica.resumed and acked > replica.resumed_from:
                replica.resumed = False
        replica.dirty.acked(replica.acked)
        window, waiters = replica.window, replica.waiters
        while window and window[0].last <= replica.acked:
            batch = window.popleft()
            replica.queued_ops -= len(batch.ops)
            replica.queued_bytes -= batch.size
        while waiters and waiters[0][0] <= replica.acked:
            d = heappop(waiters)[2]
            if d.called:  # cancelled: nobody waits for it any more
                replica.cancelled_waiters -= 1
            else:
                d.callback(replica.acked)
        self._flush_later(replica)
        self._update_backlog()

    def _flush_later(self, replica: Replica) -> None:
        # Not at once: writes taken in this reactor turn are not committed before its end, and
        # nothing is forwarded uncommitted; and so the writes of the whole turn (an ack and the
        # client writes read beside it) travel in one batch.
        if replica.pending and not replica.is_tail:
            self._end_turn_later(replica)

    # -- the write backlog -----------------------------------------------------------------------

    def backlog(self) -> tuple[int, int]:
        """(writes, bytes) applied here and not yet acknowledged by a successor."""
        replicas = self.replicas.values()
        return sum(r.queued_ops for r in replicas), sum(r.queued_bytes for r in replicas)

    def wait_for_room(self) -> Deferred[None]:
        """Fires when the backlog is down to half its bounds (L{backlogged} is False), one
        waiter at a time, oldest first: a waiter's write may fill it again, and then the others
        wait on. Cancel it when its connection is lost."""
        def cancel(d: Deferred[None]) -> None:
            if d in self._room_waiters:
                self._room_waiters.remove(d)

        d: Deferred[None] = Deferred(cancel)
        self._room_waiters.append(d)
        self._release()
        return d

    def _update_backlog(self) -> None:
        ops, size = self.backlog()
        if not self.backlogged:
            if ops > MAX_QUEUED_OPS or size > MAX_QUEUED_BYTES:
                self.backlogged = True
                log.info("{ops} writes ({size} bytes) wait for their successors: client "
                         "connections stop reading until half have been acknowledged",
                         ops=ops, size=size)
        elif ops <= MAX_QUEUED_OPS // 2 and size <= MAX_QUEUED_BYTES // 2:
            self.backlogged = False
            self._release()

    def _release(self) -> None:
        if self._releasing:
            return  # the loop below is running: it goes on while there is room
        self._releasing = True
        try:
            while self._room_waiters and not self.backlogged:
                self._room_waiters.popleft().callback(None)
        finally:
            self._releasing = False

    def settle_heads(self) -> Deferred[Any]:
        """Fires once every write taken so far by this server as a head is at its tail."""
        return gatherResults([self.settled(r) for r in self.replicas.values() if r.is_head])

    def settled(self, replica: Replica) -> Deferred[int]:
        """Fires once every write this replica has applied is at the tail."""
        return self._wait(replica, replica.last_serial)

    def acknowledged(self, replica: Replica, serial: int) -> Deferred[int]:
        """Fires when C{replica} has the tail's acknowledgement of C{serial} (at once if it
        has); fails as a waiting write does when the chain is rebuilt or the server stops."""
        return self._wait(replica, serial)

    def _wait(self, replica: Replica, serial: int) -> Deferred[int]:
        if self.failed is not None:
            return fail(self.failed)
        if replica.acked >= serial:
            return succeed(replica.acked)

        def cancel(d: Deferred[int]) -> None:
            # Its entry stays in the heap (removing it there is O(n)) until its serial is
            # acknowledged; so that reads that keep timing out while acknowledgements are
            # stuck do not grow the heap without bound, the cancelled ones are dropped once
            # they are half of it.
            waiters = replica.waiters
            replica.cancelled_waiters += 1
            if replica.cancelled_waiters * 2 > len(waiters):
                waiters[:] = [w for w in waiters if w[2] is not d and not w[2].called]
                heapify(waiters)
                replica.cancelled_waiters = 0

        d: Deferred[int] = Deferred(cancel)
        heappush(replica.waiters, (serial, next(_arrivals), d))
        return d

    def _fail_waiters(self, replica: Replica, error: Exception) -> None:
        """C{replica} is done with (the server left its chain, stops or failed): its waiting
        writes fail, its lease is no longer renewed, and reads waiting for one look again (and
        find the replica gone)."""
        replica.generation += 1
        waiters, replica.waiters = replica.waiters, []
        replica.cancelled_waiters = 0
        for _, _, d in sorted(waiters):  # (in serial order, as they came: no two arrivals tie)
            if not d.called:
                d.errback(error)
        if replica.renewal is not None and replica.renewal.active():
            replica.renewal.cancel()
        replica.renewal = None
        self._wake_readers(replica)

    def remember(self, token: int, request_id: bytes, serial: int, key: bytes) -> None:
        if request_id:
            recent = self.recent
            if request_id in recent:
                del recent[request_id]  # keep the entries in sequence order
            self._recent_seq += 1
            recent[request_id] = (token, serial, key, self._recent_seq)
            if len(recent) > RECENT_REQUESTS:
                recent.popitem(last=False)

    def request_mark(self) -> int:
        """A mark for L{requests_since}: the ids remembered from now on come after it."""
        return self._recent_seq

    def requests_since(self, mark: int) -> list[tuple[bytes, tuple[int, int, bytes, int]]]:
        """The remembered writes (request id, (token, serial, key, sequence)) after C{mark},
        oldest first: a copy of a range carries the ids of its keys' writes, so that the
        range's new head knows them too. A copy of the table made at C speed, nothing hashed:
        L{chainstore.migration.requests_in} picks the range's a chunk per reactor turn."""
        entries = list(self.recent.items())
        return entries[bisect_right(entries, mark, key=lambda entry: entry[1][3]):]

    def adopt_requests(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Ids of writes applied on another server to keys copied here."""
        for request_id, key in pairs:
            if request_id not in self.recent:
                self.remember(0, request_id, 0, key)

    # -- leases ----------------------------------------------------------------------------------

    def can_read(self, replica: Replica) -> bool:
        if not replica.is_tail:
            return False
        now = self.monotonic()
        if replica.live_length == 1:
            # No lease to hold, but one granted to an old tail to wait out.
            return replica.tail_from <= now
        return replica.tail_from <= now < replica.lease_until

    def leased(self, replica: Replica) -> Deferred[None] | None:
        """For a read that found C{replica} without a lease: a Deferred that fires when it
        gets one, or after L{LEASE_WAIT}, or when the replica is done with; the read then
        looks again by the usual rules (at that moment, still inside its own interval). None
        when no lease is on its way (nothing to wait for: refuse now)."""
        if self.failed is not None or self.replicas.get(replica.owner) is not replica \
                or replica.live_length < 2 or replica.renewal is None \
                or (replica.is_tail and replica.tail_from > self.monotonic()):
            # (A new tail waits out the lease it granted before it reads: up to a lease.)
            return None
        waiters = replica.lease_waiters

        def cancel(d: Deferred[None]) -> None:
            waiters.pop(d, None)
        d: Deferred[None] = Deferred(cancel)
        waiters[d] = None
        return d.addTimeout(LEASE_WAIT, self.clock, onTimeoutCancel=lambda result, timeout: None)

    def _wake_readers(self, replica: Replica) -> None:
        waiters, replica.lease_waiters = replica.lease_waiters, {}
        for d in list(waiters):
            d.callback(None)

    def _renew_now(self, replica: Replica) -> None:
        """Ask for C{replica}'s lease now, and again later: when a third of the lease granted
        remains (L{_leased}), soon after a refusal (L{_renew_failed}), and after a third of a
        full lease if no answer comes (a hung connection times out only after a lease)."""
        if replica.renewal is not None and replica.renewal.active():
            replica.renewal.cancel()
        replica.renewal = None
        if self.failed is not None or self.replicas.get(replica.owner) is not replica \
                or replica.live_length < 2:
            return
        self._renew_in(replica, self.lease / 3)
        try:
            self._renew(replica)
        except Exception:
            log.failure("renewing the lease of {owner}'s range failed", owner=replica.owner,
                        level=LogLevel.error)

    def _renew_in(self, replica: Replica, delay: float) -> None:
        if replica.renewal is not None and replica.renewal.active():
            replica.renewal.cancel()
        replica.renewal = self.clock.callLater(delay, self._renew_now, replica)

    def _renew(self, replica: Replica) -> None:
        """Ask for this replica's read lease: a tail from its predecessor, a head or middle
        from its successor (L{chainstore.craq})."""
        sent = self.monotonic()
        if replica.is_tail:
            assert replica.predecessor is not None
            # An answer later than a lease grants nothing (the lease runs from the request).
            d = self._call_peer(replica.predecessor, self.lease, RenewLease, epoch=self.epoch,
                                owner=replica.owner)
            d.addCallbacks(self._renewed, self._renew_failed, (replica, sent), None, (replica,))
            return
        successor = replica.successor
        assert successor is not None
        d = self._call_peer(successor, self.lease, RenewLease, epoch=self.epoch,
                            owner=replica.owner, upstream=True)
        d.addCallbacks(self._renewed_up, self._renew_failed, (replica, sent, successor), None,
                       (replica,))

    def _renewed(self, result: dict[str, float], replica: Replica, sent: float) -> None:
        seconds = min(result["seconds"], self.lease)
        replica.lease_until = max(replica.lease_until, sent + seconds)
        self._leased(replica, sent, seconds)

    def _renewed_up(self, result: dict[str, float], replica: Replica, sent: float,
                    successor: NodeInfo) -> None:
        # Only a lease from the member that follows us now vouches for our place in the chain.
        if replica.successor == successor and not replica.is_tail:
            seconds = min(result["seconds"], self.lease)
            replica.up_lease_until = max(replica.up_lease_until, sent + seconds)
            self._leased(replica, sent, seconds)

    def _leased(self, replica: Replica, sent: float, seconds: float) -> None:
        """C{replica} was granted C{seconds} from C{sent}: ask again when a third of them
        remains. A fixed period would not do: a granter near its lease bound grants less than
        a lease, and a lease shorter than the period ran out before the next renewal."""
        if replica.renewal is not None and self.replicas.get(replica.owner) is replica:
            due = sent + seconds * 2 / 3 - self.monotonic()
            self._renew_in(replica, max(due, LEASE_RETRY_SECONDS))
        if not self._lacks_lease(replica):  # (an answer that came too late grants nothing)
            self._wake_readers(replica)

    def _lacks_lease(self, replica: Replica) -> bool:
        if replica.live_length < 2 or self.replicas.get(replica.owner) is not replica:
            return False
        held = replica.lease_until if replica.is_tail else replica.up_lease_until
        return held <= self.monotonic()

    def _renew_failed(self, failure: Failure, replica: Replica) -> None:
        log.debug("lease renewal for {owner}'s range failed: {error}", owner=replica.owner,
                  error=failure.getErrorMessage())
        if replica.renewal is not None and replica.renewal.active() \
                and replica.renewal.getTime() - self.clock.seconds() > LEASE_RETRY_SECONDS:
            # The granter may not have adopted the new ring yet, or heard from the ECS, or a
            # third of our lease is all that remains: ask again soon.
            self._renew_in(replica, LEASE_RETRY_SECONDS)

    def grant_lease(self, epoch: int, owner: str, upstream: bool = False) -> float:
        """Our successor, the tail of C{owner}'s range, renews its lease; or (C{upstream}) our
        predecessor, a head or middle, renews the lease under which it answers reads."""
        if self.failed is not None:
            raise ControlFailed(str(self.failed))
        if epoch != self.epoch:
            raise StaleEpoch(f"lease for epoch {epoch}; this server is at {self.epoch}")
        replica = self.replicas.get(owner)
        now = self.monotonic()
        seconds = self.lease
        if self.lease_bound is not None:
            seconds = min(seconds, self.lease_bound - now)
            if seconds <= 0:
                raise ControlFailed(f"{self.me.name} has not heard from the ECS lately: it "
                                    "grants no read lease")
        if upstream:
            if replica is None or replica.predecessor is None:
                raise NotResponsible(f"{self.me.name} follows nobody in {owner}'s chain")
            replica.granted_up_until = max(replica.granted_up_until, now + seconds)
            return seconds
        if replica is None or not replica.successor_is_tail:
            raise NotResponsible(f"{self.me.name} grants no lease in {owner}'s chain")
        replica.granted_until = max(replica.granted_until, now + seconds)
        return seconds

    def ecs_contact(self, sent: float, timeout: float) -> None:
        """The ECS answered an L{control.Alive} this server sent at C{sent} (monotonic): it
        received it later than that, so it declares this server failed no sooner than
        C{timeout} after C{sent}. Only then may a new chain take writes without this server,
        and any read lease it granted must have run out by then: this server's leases end by
        that moment, less L{LEASE_BOUND_MARGIN}.

        Without it, two members cut off from the ECS together but still talking to each
        other would go on granting each other leases, and answering reads, while the ECS
        formed a new chain of their range that commits writes they never see."""
        bound = sent + timeout - LEASE_BOUND_MARGIN
        if self.lease_bound is None or bound > self.lease_bound:
            self.lease_bound = bound

    # -- reads at any member (chainstore/craq.py) ------------------------------------------------

    def _check_accepting(self, replica: Replica) -> None:
        """Refuse a write into the chain while a predecessor that left may still answer reads
        (until the lease we granted it runs out)."""
        wait = replica.accept_from - self.monotonic()
        if wait > 0:
            raise ServerStopped(f"{self.me.name} takes writes of {replica.owner}'s range in "
                                f"{wait:.2f}s, when the read lease of the member that left "
                                f"(or one its previous process granted) has run out")

    def query_tail(self, tail: NodeInfo, command: Any, **arguments: Any) -> Deferred[Any]:
        """C{command} to the tail C{tail}, over the peer pool, within READ_QUERY_TIMEOUT."""
        return self._call_peer(tail, READ_QUERY_TIMEOUT, command, **arguments)

    # -- queries ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "relay": {"boxes_sent": self.relays_sent, "sections_sent": self.sections_sent},
        }
        stats.update({
            f"{r.store_name}_chain": {
                "owner": r.owner, "serial": r.last_serial, "acked": r.acked,
                "window": len(r.window), "pending": len(r.pending),
                "role": "head" if r.is_head else "tail" if r.is_tail else "middle",
                "batches_sent": r.batches_sent, "writes_sent": r.ops_sent,
            }
            for r in self.replicas.values()
        })
        return stats


__all__ = ["ChainReplicator", "Replica", "PUT", "DELETE"]
