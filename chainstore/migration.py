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
from chainstore.storage.sqlitedbm import SQLiteDBM

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
    db = store.db
    if isinstance(db, SQLiteDBM):
        db.update_many(puts, list(deletes))
        return
    for key, value in puts:
        db[key] = value
    for key in deletes:
        if key in db:
            del db[key]


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


def receive_range(target: Store, payload: bytes) -> int:
    items = list(unpack_items(payload))
    write_batch(target, items)
    return len(items)


async def move_local(source: Store, target: Store, rng: KeyRange, clock: IReactorTime) -> int:
    """Copy C{source}'s keys in C{rng} into C{target}, yielding to the reactor between batches."""
    moved = 0
    async with source.lock.reading():
        for batch in batches(source, rng):
            write_batch(target, batch)
            moved += len(batch)
            await deferLater(clock, 0, lambda: None)
    return moved


async def drop_range(store: Store, rng: KeyRange, clock: IReactorTime) -> int:
    """Delete C{store}'s keys in C{rng}, a batch at a time.

    The iterator pages by key, so deleting the keys it has passed does not disturb it.
    """
    dropped = 0
    async with store.lock.writing():
        for batch in batches(store, rng):
            write_batch(store, [], [key for key, _ in batch])
            dropped += len(batch)
            await deferLater(clock, 0, lambda: None)
    return dropped
