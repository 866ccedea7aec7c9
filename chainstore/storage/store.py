"""The three named stores of a server, each a dbm file with its own readers/writer lock.

A server is the head of its own range (``coordinator``), the middle of its predecessor's
(``replica1``) and the tail of its predecessor's predecessor's (``replica2``). A standalone server
keeps its data in ``coordinator`` only.
"""

from __future__ import annotations

import dbm.dumb
import os
from collections.abc import Callable, Iterator
from typing import Any

from chainstore.ring import position
from chainstore.storage import sqlitedbm
from chainstore.storage.rwlock import ReadWriteLock

STORE_NAMES = ("coordinator", "replica1", "replica2")


def _open_sqlite(path: str, durability: str) -> Any:
    return sqlitedbm.open(path + ".sqlite", "c", durability=durability)


def _open_dumb(path: str, durability: str) -> Any:
    # Kept for comparison and for users who need a plain dbm file: it loses its index on
    # kill -9 (see docs/DESIGN.md), so it is never the default.
    return dbm.dumb.open(path, "c")


#: Backend name -> opener(path without suffix, durability) returning a dbm-like mapping.
BACKENDS: dict[str, Callable[[str, str], Any]] = {"sqlite": _open_sqlite, "dumb": _open_dumb}


class Store:
    """One named dbm mapping of bytes to bytes, and the lock that guards moving it."""

    def __init__(self, name: str, db: Any) -> None:
        self.name = name
        self.db = db
        self.lock = ReadWriteLock()
        # Backends without a place for it (dbm.dumb) keep the chain state in memory only.
        self._chain_state: tuple[str, int] = ("", 0)
        # Dirty sets of copies in progress (chainstore/migration.py): range -> keys written.
        self.trackers: dict[int, tuple[Any, set[bytes]]] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(key)

    def put(self, key: bytes, value: bytes) -> bool:
        """Store C{value}; return True if the key already held a value."""
        existed = key in self.db
        self.db[key] = value
        return existed

    def delete(self, key: bytes) -> bool:
        """Remove C{key}; return False if it held no value."""
        try:
            del self.db[key]
        except KeyError:
            return False
        return True

    def items(self, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """All pairs in byte order of the keys, strictly after C{after} if given.

        Whatever the backend: a migration streams a range in this order. Writes while the
        iteration runs are allowed; a key deleted meanwhile may still be yielded (with its old
        value) or skipped, but it is never an error.
        """
        if isinstance(self.db, sqlitedbm.SQLiteDBM):
            return self.db.items(after)
        # dbm.dumb lists its keys in insertion order, and its items() would read every value
        # at once; sort the keys (they are in memory anyway) and read the values lazily.
        keys = sorted(self.db.keys())
        if after is not None:
            keys = [k for k in keys if k > after]
        return self._dumb_items(keys)

    def _dumb_items(self, keys: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
        for key in keys:
            value = self.db.get(key)
            if value is not None:
                yield key, value

    def __len__(self) -> int:
        return len(self.db)

    # -- chain replication: writes with their serial (chainstore/chain.py) ------------------

    def _track(self, keys: Any) -> None:
        for key in keys:
            pos = position(key)
            for rng, dirty in self.trackers.values():
                if pos in rng:
                    dirty.add(key)

    def chain_state(self) -> tuple[str, int]:
        """(chain identity, last applied serial) recorded with this store's data."""
        if isinstance(self.db, sqlitedbm.SQLiteDBM):
            return self.db.chain_state()
        return self._chain_state

    def set_chain_state(self, chain: str, serial: int) -> None:
        if isinstance(self.db, sqlitedbm.SQLiteDBM):
            self.db.set_chain_state(chain, serial)
        else:
            self._chain_state = (chain, serial)

    def apply_one(self, kind: int, key: bytes, value: bytes, serial: int) -> bool:
        """Apply one write (kind 0 put, 1 delete) with its serial; whether the key existed.

        Not durable before L{commit}: a head applies the writes of one reactor turn, then
        commits them together before it forwards or acknowledges any of them.
        """
        if self.trackers:
            self._track((key,))
        if isinstance(self.db, sqlitedbm.SQLiteDBM):
            return self.db.apply_one(kind == 1, key, value, serial)
        existed = self.put(key, value) if kind == 0 else self.delete(key)
        self._chain_state = (self._chain_state[0], serial)
        return existed

    def commit(self) -> None:
        """Make the writes of L{apply_one} durable (one commit for all of them)."""
        if isinstance(self.db, sqlitedbm.SQLiteDBM):
            self.db.commit()

    @property
    def uncommitted(self) -> bool:
        return isinstance(self.db, sqlitedbm.SQLiteDBM) and self.db.uncommitted

    def apply_ops(self, ops: list[tuple[int, int, bytes, bytes, bytes]], serial: int) -> None:
        """Apply replicated writes (serial, kind, key, value, request id) in order, atomically
        where the backend can, recording C{serial} as the last applied."""
        if self.trackers:
            # A middle or tail store may be the source of a move as well as a head's.
            self._track(op[2] for op in ops)
        if isinstance(self.db, sqlitedbm.SQLiteDBM):
            self.db.apply_ops(((op[1] == 1, op[2], op[3]) for op in ops), serial)
            return
        for _, kind, key, value, _ in ops:
            if kind == 0:
                self.db[key] = value
            else:
                self.delete(key)
        self._chain_state = (self._chain_state[0], serial)

    def sync(self) -> None:
        self.db.sync()

    def close(self) -> None:
        self.db.close()


class StoreSet:
    """The coordinator, replica1 and replica2 stores of one server, opened in one directory."""

    def __init__(self, stores: dict[str, Store]) -> None:
        self.stores = stores

    @classmethod
    def open(cls, directory: str, backend: str = "sqlite", durability: str = "crash") -> StoreSet:
        if backend not in BACKENDS:
            raise ValueError(f"unknown storage backend {backend!r}; known: {sorted(BACKENDS)}")
        os.makedirs(directory, exist_ok=True)
        opener = BACKENDS[backend]
        return cls({
            name: Store(name, opener(os.path.join(directory, name), durability))
            for name in STORE_NAMES
        })

    def __getitem__(self, name: str) -> Store:
        return self.stores[name]

    @property
    def coordinator(self) -> Store:
        return self.stores["coordinator"]

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
