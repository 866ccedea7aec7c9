"""The three named stores of a server, each a dbm file with its own readers/writer lock.

A server is the head of its own range (``coordinator``), the middle of its predecessor's
(``replica1``) and the tail of its predecessor's predecessor's (``replica2``). A standalone server
keeps its data in ``coordinator`` only.

Storage is fail-stop (docs/DESIGN.md, "When storage fails"): the first error of a backend (disk
full, I/O error, corruption) marks the store failed, rolls back what it had not committed, tells
its owner (L{Store.on_failure}) and raises L{StorageFailed}; a failed store never reads or writes
again. Beside the stores a manifest (chainstore/storage/integrity.py) records which of them
have held data, so that a store file found missing, empty or corrupt at start is refused
(L{StoreIntegrityError}) rather than taken for a new, empty store.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from chainstore.errors import StorageFailed
from chainstore.ring import KeyRange, position
from chainstore.storage import sqlitedbm
from chainstore.storage.backend import Backend, DumbDBM
from chainstore.storage.integrity import Manifest, check_stores
from chainstore.storage.rwlock import ReadWriteLock

STORE_NAMES = ("coordinator", "replica1", "replica2")


def _open_sqlite(path: str, durability: str) -> Backend:
    return sqlitedbm.open(path + ".sqlite", "c", durability=durability)


def _open_dumb(path: str, durability: str) -> Backend:
    # Kept for comparison and for users who need a plain dbm file: it loses its index on
    # kill -9 (see docs/DESIGN.md), so it is never the default.
    return DumbDBM(path)


#: Backend name -> opener(path without suffix, durability) returning a L{Backend}.
BACKENDS: dict[str, Callable[[str, str], Backend]] = {
    "sqlite": _open_sqlite, "dumb": _open_dumb}

#: What a backend raises when its storage fails: SQLite's errors (a full disk is
#: "database or disk is full", corruption "database disk image is malformed"), and the OS's.
STORAGE_ERRORS = (sqlite3.Error, OSError)

_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(method: _F) -> _F:
    """Refuse once the store has failed; turn a storage error into L{StorageFailed}."""
    @functools.wraps(method)
    def guarded(self: Store, *args: Any, **kwargs: Any) -> Any:
        if self.failure is not None:
            raise StorageFailed(f"storage failed: {self.failure}")
        try:
            return method(self, *args, **kwargs)
        except STORAGE_ERRORS as e:
            raise self._failed(e) from e
    return guarded  # type: ignore[return-value]


class Store:
    """One named mapping of bytes to bytes (a L{Backend}), and the lock that guards moving it.

    Every operation raises L{StorageFailed} once the store has failed (see the module
    docstring); L{on_failure} is called once, with the store and the reason, when it does.
    """

    def __init__(self, name: str, db: Backend, path: str = "") -> None:
        self.name = name
        self.db = db
        self.path = path or name
        self.lock = ReadWriteLock()
        # Dirty sets of copies in progress (chainstore/migration.py): range -> keys written.
        self.trackers: dict[int, tuple[Any, set[bytes]]] = {}
        #: why the store failed, None while it works
        self.failure: str | None = None
        self.on_failure: Callable[[Store, str], None] = lambda store, reason: None
        #: whether the manifest records that this store has held data; the first write of a
        #: value calls L{on_first_data} (which records it) when it is not
        self.held_data = True
        self.on_first_data: Callable[[Store], None] = lambda store: None
        # a put waits in the open group transaction (apply_one)
        self._group_puts = False

    def _failed(self, error: Exception) -> StorageFailed:
        if self.failure is None:
            self.failure = f"store {self.name} ({self.path}): {error}"
            self.abandon()
            self.on_failure(self, self.failure)
        return StorageFailed(f"storage failed: {self.failure}")

    def abandon(self) -> None:
        """Roll back writes not yet committed (L{apply_one}): nobody was told they were done.
        Never raises: it runs while the store is failing or the server stops."""
        self._group_puts = False
        try:
            self.db.abandon()
        except Exception:
            pass

    def _wrote(self) -> None:
        if not self.held_data:
            self.on_first_data(self)
            self.held_data = True

    @_guarded
    def get(self, key: bytes) -> bytes | None:
        return self.db.get(key)

    @_guarded
    def put(self, key: bytes, value: bytes) -> bool:
        """Store C{value}; return True if the key already held a value."""
        existed = key in self.db
        self.db[key] = value
        self._wrote()
        return existed

    @_guarded
    def delete(self, key: bytes) -> bool:
        """Remove C{key}; return False if it held no value."""
        try:
            del self.db[key]
        except KeyError:
            return False
        return True

    def items(self, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """All pairs in ring order (L{chainstore.storage.backend.ring_order}), strictly after
        the key C{after} if given, whatever the backend. Writes while the iteration runs are
        allowed; a key deleted meanwhile may still be yielded (with its old value) or skipped,
        but it is never an error.
        """
        return self._guarded_iter(self.db.items, after)

    def keys(self) -> Iterator[bytes]:
        """Every key in ring order; values are not read. Deleting keys already passed is
        safe (SQLite pages by home and key; another backend's key list is copied first)."""
        return self._guarded_iter(iter, self.db)

    def _guarded_iter(self, start: Callable[..., Iterator[Any]], *args: Any) -> Iterator[Any]:
        it = self._guarded_call(start, *args)
        while True:
            try:
                item = self._guarded_call(next, it)
            except StopIteration:
                return
            yield item

    @_guarded
    def _guarded_call(self, function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)

    @_guarded
    def __len__(self) -> int:
        return len(self.db)

    @_guarded
    def range_page(self, rng: KeyRange, cursor: Any, limit: int, values: bool = True,
                   max_bytes: int | None = None) -> tuple[list[tuple[bytes, bytes | None]], Any]:
        """The next page of C{rng}'s pairs and the cursor of the one after it (None: no more);
        L{Backend.range_page}. The SQLite backend reads only the range's run of rows."""
        return self.db.range_page(rng.start, rng.end, cursor, limit, values, max_bytes)

    @_guarded
    def write_batch(self, puts: list[tuple[bytes, bytes]],
                    deletes: Iterable[bytes] = ()) -> None:
        """Apply a batch (a range copy's), atomically where the backend can; deleting a
        missing key is not an error."""
        self.db.update_many(puts, list(deletes))
        if puts:
            self._wrote()

    @_guarded
    def move_page(self, source: Store, rng: KeyRange, cursor: Any, limit: int,
                  max_bytes: int | None = None) -> tuple[int, Any]:
        """Copy the next page of C{source}'s pairs in C{rng} into this store, atomically
        where the backend can; (pairs copied, cursor of the next page or None). A failure
        reading C{source} fails this store too: either way the server stops serving."""
        if source.failure is not None:
            raise StorageFailed(f"storage failed: {source.failure}")
        copied, cursor = self.db.move_page(source.db, rng.start, rng.end, cursor, limit,
                                           max_bytes)
        if copied:
            self._wrote()
        return copied, cursor

    @_guarded
    def export_page(self, rng: KeyRange, cursor: Any, limit: int, max_bytes: int | None = None,
                    ) -> tuple[bytes | None, int, int, Any] | None:
        """The next page of C{rng}'s pairs as a copy batch's database image, made inside the
        backend; None when it must be read with L{range_page} (L{Backend.export_page})."""
        return self.db.export_page(rng.start, rng.end, cursor, limit, max_bytes)

    @_guarded
    def import_image(self, image: bytes) -> int:
        """Write a copy batch's image (L{export_page} at another server), atomically where
        the backend can; the pairs written. L{ValueError} if it is not one: the sender's
        mistake, not a failure of this store."""
        count = self.db.import_image(image)
        if count:
            self._wrote()
        return count

    @_guarded
    def drop_page(self, rng: KeyRange, cursor: Any, limit: int) -> tuple[int, Any]:
        """Delete the next page of C{rng}'s keys, atomically where the backend can; (keys
        deleted, cursor of the next page or None)."""
        return self.db.drop_page(rng.start, rng.end, cursor, limit)

    @_guarded
    def clear(self) -> None:
        """Delete every key (the serials stay: see L{set_chain_state})."""
        self.db.clear()

    # -- chain replication: writes with their serial (chainstore/chain.py) ------------------

    def _track(self, keys: Any) -> None:
        for key in keys:
            pos = position(key)
            for rng, dirty in self.trackers.values():
                if pos in rng:
                    dirty.add(key)

    @_guarded
    def chain_state(self) -> tuple[str, int]:
        """(chain identity, last applied serial) recorded with this store's data."""
        return self.db.chain_state()

    @_guarded
    def set_chain_state(self, chain: str, serial: int) -> None:
        self.db.set_chain_state(chain, serial)

    @_guarded
    def apply_one(self, kind: int, key: bytes, value: bytes, serial: int) -> bool:
        """Apply one write (kind 0 put, 1 delete) with its serial; whether the key existed.

        Not durable before L{commit}: a head applies the writes of one reactor turn, then
        commits them together before it forwards or acknowledges any of them.
        """
        if self.trackers:
            self._track((key,))
        existed = self.db.apply_one(kind == 1, key, value, serial)
        if kind == 0:
            # A backend without transactions (dbm.dumb) has written it already.
            if self.db.uncommitted:
                self._group_puts = True
            else:
                self._wrote()
        return existed

    @_guarded
    def commit(self) -> None:
        """Make the writes of L{apply_one} durable (one commit for all of them)."""
        self.db.commit()
        if self._group_puts:
            self._group_puts = False
            self._wrote()

    @property
    def uncommitted(self) -> bool:
        return self.db.uncommitted

    @_guarded
    def apply_ops(self, ops: list[tuple[int, int, bytes, bytes, bytes]], serial: int) -> None:
        """Apply replicated writes (serial, kind, key, value, request id) in order, atomically
        where the backend can, recording C{serial} as the last applied."""
        if self.trackers:
            # A middle or tail store may be the source of a move as well as a head's.
            self._track(op[2] for op in ops)
        self.db.apply_ops(((op[1] == 1, op[2], op[3]) for op in ops), serial)
        if any(op[1] == 0 for op in ops):
            self._wrote()

    @_guarded
    def sync(self) -> None:
        self.db.sync()

    def close(self) -> None:
        """Close the file. A failed store is closed without committing anything more, and
        without raising (its failure was reported when it happened)."""
        if self.failure is None:
            self.db.close()
            return
        self.abandon()
        try:
            self.db.close()
        except Exception:
            pass


class StoreSet:
    """The coordinator, replica1 and replica2 stores of one server, opened in one directory."""

    def __init__(self, stores: dict[str, Store]) -> None:
        self.stores = stores

    @classmethod
    def open(cls, directory: str, backend: str = "sqlite", durability: str = "crash") -> StoreSet:
        """Open (or create) the stores of C{directory}. With the SQLite backend, first check
        them against the manifest (L{check_stores}): L{StoreIntegrityError} if one is not
        what it should be."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown storage backend {backend!r}; known: {sorted(BACKENDS)}")
        # Private, as the keys are: other local users have no business reading the data.
        os.makedirs(directory, mode=0o700, exist_ok=True)
        manifest = Manifest(directory)
        if backend == "sqlite":
            check_stores(directory, manifest, STORE_NAMES)
        opener = BACKENDS[backend]
        stores: dict[str, Store] = {}
        try:
            for name in STORE_NAMES:
                path = os.path.join(directory, name)
                store = stores[name] = Store(name, opener(path, durability), path)
                store.on_first_data = manifest.record
                # A file with data the manifest does not know (written before manifests
                # existed, or just before a crash) is recorded now.
                store.held_data = name in manifest.held
                if not store.held_data and len(store) > 0:
                    store._wrote()
        except BaseException:
            for store in stores.values():
                store.close()
            raise
        return cls(stores)

    def abandon(self) -> None:
        """Roll back every store's uncommitted writes (L{Store.abandon})."""
        for store in self.stores.values():
            store.abandon()

    def __getitem__(self, name: str) -> Store:
        return self.stores[name]

    @property
    def coordinator(self) -> Store:
        return self.stores["coordinator"]

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
