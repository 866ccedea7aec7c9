"""Moving key ranges between stores and servers, in bounded batches.

The ECS decides what moves where (``ecs/planner.py``); a server carries out its part here:
streaming a range of one of its stores to another server (one batch in flight, so memory is
bounded by the batch size whatever the range size), copying a range between its own stores,
dropping a range it no longer holds, and writing batches it receives. A copy never deletes at the
source: data is dropped only when the ECS says so, after the new owner has confirmed every batch
and the ring has switched, so an interrupted migration loses nothing and can be redone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NamedTuple, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.protocols import amp

from chainstore.control import (
    PAIR_HEADER_BYTES,
    ControlFailed,
    ReceiveRange,
    pack_items,
    unpack_items,
)
from chainstore.logs import get_logger
from chainstore.ring import KeyRange, position
from chainstore.storage import STORE_NAMES, Store
from chainstore.storage.backend import ring_order

log = get_logger("chainstore.migration")

_T = TypeVar("_T")

#: Keys per batch a copy sends: one page, exported as a database image (fewer keys when theirs
#: and their values' bytes reach BATCH_BYTES). The target writes a batch in one go, while the
#: writes of its own chains wait: as an image, 1,024 keys of 100 bytes cost it about 1.8 ms of
#: CPU (python -m bench.range_ops). With images, 1,024 copied each range at 224,000-254,000
#: keys/s against 190,000-227,000 with 512, the writer's p99 at 21-22 ms against 19-20
#: (python -m bench.reconfig --keys 1000000, one run each, docs/DESIGN.md).
BATCH_KEYS = 1024
#: Request ids (and their keys: a few dozen bytes each) per batch sent along with a copy.
REQUEST_BATCH = 1000
BATCH_BYTES = 512 * 1024
#: Rows read from a store per query; the reactor runs between two queries, so this bounds
#: how long a copy, move or drop holds it at a time (a page of 1,024 rows of 100-byte values
#: reads, moves or drops in 1-3 ms, one of BATCH_BYTES of big values in about as long).
PAGE_ROWS = 1024
#: Batches of a copy sent and not yet confirmed by the target: two, so that the source reads
#: the next page while the target writes a batch. The target answers each batch in the turn
#: it writes it (L{BatchQueue}); when it wrote every batch one read had brought in one turn, it
#: answered a page's two together and sat idle while the source read the next (each copy ran
#: at about 68,000 keys a second, against about 90,000 now). Four ran at 120,000-140,000, but
#: a target serving writes (a leave's) then made the background writer's p99 57 ms against 28
#: (python -m bench.reconfig --keys 1000000, one run each, docs/DESIGN.md).
COPY_WINDOW = 2
#: Keys deleted per transaction when a range is dropped or a store cleared: a run of rows,
#: under a millisecond for 1,024.
DROP_KEYS = 1024


def store_named(stores: Any, name: str) -> Store:
    if name not in STORE_NAMES:
        raise ValueError(f"unknown store {name!r}; stores are {', '.join(STORE_NAMES)}")
    return stores[name]


async def turn(clock: IReactorTime, rest: float = 0.0) -> None:
    """Let the reactor run (other connections, timers) before going on, C{rest} seconds
    at least."""
    await deferLater(clock, rest, lambda: None)


#: How long bulk work (a copy's pages, a local move, a drop) rests, as a share of the time it
#: worked since its last rest. A server moving data flat out takes a CPU the writes going on
#: need (two CPUs here, four servers and the load); resting half as long as it works kept the
#: background writer's p99 during joins and leaves at 25-37 ms against 41-59 ms, for a copy
#: step about a quarter slower (python -m bench.reconfig --keys 100000,1000000; DESIGN.md,
#: "Where a writer's time goes during a join or a leave").
BULK_REST = 0.5


class Pace:
    """Rests between the steps of bulk work, L{BULK_REST} times as long as the work since the
    last rest took (wall time, less what L{idle} and L{busy} mark as waiting for others), so the
    writes going on meanwhile find a CPU."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.mark = clock.seconds()
        self.worked = 0.0

    def idle(self) -> None:
        """Our work stops here until L{busy}: a copy's source waiting for its target to
        confirm a batch does no work, and resting for that too made the copy wait twice."""
        self.worked += self.clock.seconds() - self.mark

    def busy(self) -> None:
        self.mark = self.clock.seconds()

    async def __call__(self) -> None:
        worked = self.worked + self.clock.seconds() - self.mark
        await turn(self.clock, max(0.0, worked * BULK_REST))
        self.worked = 0.0
        self.mark = self.clock.seconds()


class Batch(NamedTuple):
    """One C{ReceiveRange} of a copy: its pairs as a database image made inside the store
    (L{Store.export_page}), or packed (C{items}, L{control.pack_items}) when the page had to be
    read row by row."""

    keys: int
    #: its keys and values as a batch of pairs counts them (a pair's header too), whichever
    #: way it travels: the bytes a copy reports moved
    size: int
    items: bytes = b""
    image: bytes | None = None


async def batches(store: Store, rng: KeyRange, clock: IReactorTime) -> AsyncIterator[Batch]:
    """C{store}'s pairs whose keys fall in C{rng}, in batches of at most L{BATCH_KEYS} keys and
    about L{BATCH_BYTES}, the reactor running between two pages (L{Pace}). Only the range's
    part of the store is read (its run of rows, chainstore/storage/sqlitedbm.py). A batch is a
    page: exported as an image when the store can (L{Store.export_page}, nothing read into
    Python), else read with L{Store.range_page} (at most L{PAGE_ROWS} rows, cut into batches).

    Each page is a new query after the last row of the one before, so writes between pages
    are allowed: a key written behind the cursor is not seen (a copy's write tracker has it).
    """
    cursor: Any = None
    pace = Pace(clock)
    while True:
        exported = store.export_page(rng, cursor, BATCH_KEYS, BATCH_BYTES)
        if exported is not None:
            image, count, size, cursor = exported
            found = [Batch(count, size + count * PAIR_HEADER_BYTES, image=image)] if count \
                else []
        else:
            page, cursor = store.range_page(rng, cursor, PAGE_ROWS, True, BATCH_BYTES)
            found = list(_packed(page))
        if found:
            pace.idle()
            for batch in found:
                yield batch
            pace.busy()
        if cursor is None:
            return
        await pace()


def _packed(page: list[tuple[bytes, bytes | None]]) -> Iterator[Batch]:
    """A page read row by row, as batches of at most L{BATCH_KEYS} pairs and about
    L{BATCH_BYTES} (the last pair may cross it)."""
    batch: list[tuple[bytes, bytes]] = []
    size = 0
    for key, value in page:
        assert value is not None
        batch.append((key, value))
        size += len(key) + len(value)
        if len(batch) >= BATCH_KEYS or size >= BATCH_BYTES:
            items = pack_items(batch)
            yield Batch(len(batch), len(items), items)
            batch, size = [], 0
    if batch:
        items = pack_items(batch)
        yield Batch(len(batch), len(items), items)


def write_batch(store: Store, puts: list[tuple[bytes, bytes]],
                deletes: list[bytes] | tuple[()] = ()) -> None:
    """Apply a batch to a store, atomically where the backend can."""
    store.write_batch(puts, deletes)


async def copy_range(
    source: Store, rng: KeyRange, target: amp.AMP, target_store: str, epoch: int,
    progress: Callable[[int, int], None], clock: IReactorTime,
    batch_timeout: float | None = None,
) -> tuple[int, int]:
    """Stream C{source}'s keys in C{rng} to C{target_store} over C{target}; (keys, bytes) sent.

    At most L{COPY_WINDOW} batches are unconfirmed at a time (memory stays bounded by the
    batch size whatever the range's). With C{batch_timeout}, a batch the target does not
    confirm in time fails the copy (a hung target must not hold the source's lock, and the
    ECS's operation, forever).
    """
    keys = nbytes = 0
    window: deque[tuple[Deferred[Any], int, int]] = deque()

    async def confirm_oldest() -> None:
        nonlocal keys, nbytes
        sent, count, size = window[0]
        await sent
        window.popleft()
        keys += count
        nbytes += size
        progress(keys, nbytes)

    try:
        async with source.lock.reading():
            async for batch in batches(source, rng, clock):
                sent = target.callRemote(ReceiveRange, epoch=epoch, store=target_store,
                                         items=batch.items, image=batch.image)
                if batch_timeout is not None:
                    sent.addTimeout(batch_timeout, clock)
                window.append((sent, batch.keys, batch.size))
                if len(window) >= COPY_WINDOW:
                    await confirm_oldest()
            while window:
                await confirm_oldest()
    finally:
        # A failed or cancelled copy leaves no batch whose failure nobody would consume.
        for sent, _, _ in window:
            sent.addErrback(lambda _: None)
            sent.cancel()
    return keys, nbytes


async def send_requests(requests: list[tuple[bytes, bytes]], target: amp.AMP, target_store: str,
                        epoch: int, clock: IReactorTime | None = None,
                        batch_timeout: float | None = None) -> int:
    """Send (request id, key) pairs to the target along with a copy; how many were sent."""
    for start in range(0, len(requests), REQUEST_BATCH):
        sent = target.callRemote(ReceiveRange, epoch=epoch, store=target_store, items=b"",
                                 requests=pack_items(requests[start:start + REQUEST_BATCH]))
        if clock is not None and batch_timeout is not None:
            sent.addTimeout(batch_timeout, clock)
        await sent
    return len(requests)


#: Remembered request ids looked at per reactor turn when a copy picks its range's.
SCAN_IDS = 5000


async def requests_in(remembered: list[tuple[bytes, tuple[int, int, bytes, int]]],
                      rng: KeyRange, clock: IReactorTime) -> list[tuple[bytes, bytes]]:
    """(request id, key) of the C{remembered} writes (L{ChainReplicator.requests_since}) whose
    key is in C{rng}, hashing L{SCAN_IDS} keys per reactor turn: all 150,000 a server
    remembers take about 150 ms."""
    found: list[tuple[bytes, bytes]] = []
    for start in range(0, len(remembered), SCAN_IDS):
        if start:
            await turn(clock)
        found.extend((request_id, entry[2]) for request_id, entry in
                     remembered[start:start + SCAN_IDS] if position(entry[2]) in rng)
    return found


#: Bytes of copy batches a target holds waiting for their turn: room for the windows of several
#: copies at once (each at most COPY_WINDOW batches of about BATCH_BYTES). More is not a
#: legitimate source's, and is refused rather than held.
QUEUED_BYTES = 16 * 1024 * 1024


class BatchQueue:
    """A copy target's batches, written in the order they came, one per reactor turn.

    A source keeps several batches unconfirmed, and one read of its connection often holds
    them all: written in the turn that read them, they would be written back to back, a few
    milliseconds each, while the writes of the target's own chains that arrived meanwhile wait
    behind every one. One a turn, those go between two batches.
    """

    def __init__(self, clock: IReactorTime, max_bytes: int = QUEUED_BYTES) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self._queue: deque[tuple[Callable[[], Any], int, Deferred[Any]]] = deque()
        self._call: Any = None

    def submit(self, write: Callable[[], _T], size: int) -> Deferred[_T]:
        """Run C{write} (a batch of C{size} bytes) in a later turn, after those submitted
        before; its result, or its error."""
        if self.queued_bytes + size > self.max_bytes and self._queue:
            raise ControlFailed(f"{self.queued_bytes} bytes of copy batches are waiting "
                                "to be written; send fewer at a time")
        done: Deferred[_T] = Deferred()
        self._queue.append((write, size, done))
        self.queued_bytes += size
        if self._call is None:
            self._call = self.clock.callLater(0, self._next)
        return done

    def _next(self) -> None:
        write, size, done = self._queue.popleft()
        self.queued_bytes -= size
        self._call = self.clock.callLater(0, self._next) if self._queue else None
        try:
            result = write()
        except BaseException:
            done.errback()
        else:
            done.callback(result)


def receive_range(target: Store, payload: bytes, deletes: bytes | None = None,
                  image: bytes | None = None) -> int:
    """Write a copy's batch (L{ReceiveRange}); the keys written or deleted. L{ValueError}
    if it does not parse, with nothing written."""
    if image is not None:
        if payload or deletes:
            raise ValueError("a copy batch carries an image or pairs, not both")
        return target.import_image(image)
    items = list(unpack_items(payload))
    doomed = [key for key, _ in unpack_items(deletes)] if deletes else []
    write_batch(target, items, doomed)
    return len(items) + len(doomed)


# -- copies while writes go on: a bulk pass, then the keys written meanwhile -------------------

_trackers = iter(range(1, 1 << 62))


def start_tracking(store: Store, rng: KeyRange) -> int:
    """From now on, record every key written to C{store} in C{rng}; the tracker's id."""
    tracker = next(_trackers)
    store.trackers[tracker] = (rng, set())
    return tracker


def stop_tracking(stores: Any, tracker: int) -> set[bytes]:
    """End a tracker (wherever it is) and return the keys it recorded."""
    for store in stores.stores.values():
        entry = store.trackers.pop(tracker, None)
        if entry is not None:
            return entry[1]
    raise KeyError(tracker)


def dirty_batches(store: Store, keys: set[bytes]) -> Iterator[tuple[list[tuple[bytes, bytes]],
                                                                     list[bytes]]]:
    """(puts, deletes) batches that bring a copy up to date for C{keys}, in ring order (the
    target's rows then go in ascending order of their homes)."""
    puts: list[tuple[bytes, bytes]] = []
    deletes: list[bytes] = []
    size = 0
    for key in sorted(keys, key=ring_order):
        value = store.get(key)
        if value is None:
            deletes.append(key)
        else:
            puts.append((key, value))
            size += len(key) + len(value)
        if len(puts) + len(deletes) >= BATCH_KEYS or size >= BATCH_BYTES:
            yield puts, deletes
            puts, deletes, size = [], [], 0
    if puts or deletes:
        yield puts, deletes


async def copy_dirty(source: Store, keys: set[bytes], target: amp.AMP, target_store: str,
                     epoch: int, clock: IReactorTime | None = None,
                     batch_timeout: float | None = None) -> tuple[int, int]:
    """Send the current state of C{keys} (values, or deletions) to the target store."""
    count = nbytes = 0
    for puts, deletes in dirty_batches(source, keys):
        payload = pack_items(puts)
        sent = target.callRemote(ReceiveRange, epoch=epoch, store=target_store, items=payload,
                                 deletes=pack_items((k, b"") for k in deletes))
        if clock is not None and batch_timeout is not None:
            sent.addTimeout(batch_timeout, clock)
        await sent
        count += len(puts) + len(deletes)
        nbytes += len(payload)
    return count, nbytes


async def move_dirty(source: Store, target: Store, keys: set[bytes],
                     clock: IReactorTime) -> int:
    """Bring C{target} up to date for C{keys} (current values, or deletions) from C{source},
    a batch per transaction, the reactor running between two: the keys written during a bulk
    move grow with its length (with the store), so in one go they were a stall of their own."""
    moved = 0
    for puts, deletes in dirty_batches(source, keys):
        if moved:
            await turn(clock)
        write_batch(target, puts, deletes)
        moved += len(puts) + len(deletes)
    return moved


async def move_local(source: Store, target: Store, rng: KeyRange, clock: IReactorTime) -> int:
    """Copy C{source}'s keys in C{rng} into C{target}, a page (L{PAGE_ROWS} rows, about
    L{BATCH_BYTES}) per transaction, yielding to the reactor between pages. The SQLite backend
    copies each page inside SQLite (L{Store.move_page})."""
    moved = 0
    cursor: Any = None
    pace = Pace(clock)
    async with source.lock.reading():
        while True:
            copied, cursor = target.move_page(source, rng, cursor, PAGE_ROWS, BATCH_BYTES)
            moved += copied
            if cursor is None:
                return moved
            await pace()


async def drop_range(store: Store, rng: KeyRange, clock: IReactorTime) -> int:
    """Delete C{store}'s keys in C{rng}, at most L{DROP_KEYS} per transaction, the reactor
    running between two; only the range's part of the store is read, no value (SQLite deletes
    each page by rowid, L{Store.drop_page})."""
    dropped = 0
    async with store.lock.writing():
        cursor: Any = None
        pace = Pace(clock)
        while True:
            deleted, cursor = store.drop_page(rng, cursor, DROP_KEYS)
            dropped += deleted
            if cursor is None:
                return dropped
            await pace()
