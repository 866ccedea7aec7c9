"""Moving key ranges between stores and servers, in bounded batches.

The ECS decides what moves where (``ecs/planner.py``); a server carries out its part here:
streaming a range of one of its stores to another server (one batch in flight, so memory is
bounded by the batch size whatever the range size), copying a range between its own stores,
dropping a range it no longer holds, and writing batches it receives. A copy never deletes at the
source: data is dropped only when the ECS says so, after the new owner has confirmed every batch
and the ring has switched, so an interrupted migration loses nothing and can be redone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.protocols import amp

from chainstore.control import ReceiveRange, pack_items, unpack_items
from chainstore.logs import get_logger
from chainstore.ring import KeyRange, position
from chainstore.storage import STORE_NAMES, Store

log = get_logger("chainstore.migration")

BATCH_KEYS = 1000
BATCH_BYTES = 512 * 1024


def store_named(stores: Any, name: str) -> Store:
    if name not in STORE_NAMES:
        raise ValueError(f"unknown store {name!r}; stores are {', '.join(STORE_NAMES)}")
    return stores[name]


def batches(store: Store, rng: KeyRange) -> Iterator[list[tuple[bytes, bytes]]]:
    """The pairs of C{store} whose keys fall in C{rng}, in batches of bounded size."""
    batch: list[tuple[bytes, bytes]] = []
    size = 0
    for key, value in store.items():
        if position(key) not in rng:
            continue
        batch.append((key, value))
        size += len(key) + len(value)
        if len(batch) >= BATCH_KEYS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def write_batch(store: Store, puts: list[tuple[bytes, bytes]],
                deletes: list[bytes] | tuple[()] = ()) -> None:
    """Apply a batch to a store, atomically where the backend can."""
    store.write_batch(puts, deletes)


async def copy_range(
    source: Store, rng: KeyRange, target: amp.AMP, target_store: str, epoch: int,
    progress: Callable[[int, int], None] = lambda keys, nbytes: None,
    clock: IReactorTime | None = None, batch_timeout: float | None = None,
) -> tuple[int, int]:
    """Stream C{source}'s keys in C{rng} to C{target_store} over C{target}; (keys, bytes) sent.

    With C{clock} and C{batch_timeout}, a batch the target does not confirm in time fails the
    copy (a hung target must not hold the source's lock, and the ECS's operation, forever).
    """
    keys = nbytes = 0
    async with source.lock.reading():
        for batch in batches(source, rng):
            payload = pack_items(batch)
            sent = target.callRemote(ReceiveRange, epoch=epoch, store=target_store,
                                     items=payload)
            if clock is not None and batch_timeout is not None:
                sent.addTimeout(batch_timeout, clock)
            await sent
            keys += len(batch)
            nbytes += len(payload)
            progress(keys, nbytes)
    return keys, nbytes


async def send_requests(requests: list[tuple[bytes, bytes]], target: amp.AMP, target_store: str,
                        epoch: int, clock: IReactorTime | None = None,
                        batch_timeout: float | None = None) -> int:
    """Send (request id, key) pairs to the target along with a copy; how many were sent."""
    for start in range(0, len(requests), BATCH_KEYS):
        sent = target.callRemote(ReceiveRange, epoch=epoch, store=target_store, items=b"",
                                 requests=pack_items(requests[start:start + BATCH_KEYS]))
        if clock is not None and batch_timeout is not None:
            sent.addTimeout(batch_timeout, clock)
        await sent
    return len(requests)


def receive_range(target: Store, payload: bytes, deletes: bytes | None = None) -> int:
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
    """(puts, deletes) batches that bring a copy up to date for C{keys}, in key order."""
    puts: list[tuple[bytes, bytes]] = []
    deletes: list[bytes] = []
    size = 0
    for key in sorted(keys):
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


def move_dirty(source: Store, target: Store, keys: set[bytes]) -> int:
    moved = 0
    for puts, deletes in dirty_batches(source, keys):
        write_batch(target, puts, deletes)
        moved += len(puts) + len(deletes)
    return moved


async def move_local(source: Store, target: Store, rng: KeyRange, clock: IReactorTime) -> int:
    """Copy C{source}'s keys in C{rng} into C{target}, yielding to the reactor between batches."""
    moved = 0
    async with source.lock.reading():
        for batch in batches(source, rng):
            write_batch(target, batch)
            moved += len(batch)
            await deferLater(clock, 0, lambda: None)
    return moved


def key_batches(store: Store, rng: KeyRange) -> Iterator[list[bytes]]:
    """The keys of C{store} in C{rng}, in batches; values are not read."""
    batch: list[bytes] = []
    # Store.keys() lets the batches be deleted while we go.
    for key in store.keys():
        if position(key) in rng:
            batch.append(key)
            if len(batch) >= BATCH_KEYS:
                yield batch
                batch = []
    if batch:
        yield batch


async def drop_range(store: Store, rng: KeyRange, clock: IReactorTime) -> int:
    """Delete C{store}'s keys in C{rng}, a batch at a time.

    The iterator pages by key, so deleting the keys it has passed does not disturb it.
    """
    dropped = 0
    async with store.lock.writing():
        for keys in key_batches(store, rng):
            write_batch(store, [], keys)
            dropped += len(keys)
            await deferLater(clock, 0, lambda: None)
    return dropped
