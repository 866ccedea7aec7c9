"""What a store needs of its file: the L{Backend} protocol, and the ``dbm.dumb`` backend.

L{chainstore.storage.store.Store} talks to its backend only through L{Backend}; the SQLite
file (L{chainstore.storage.sqlitedbm.SQLiteDBM}, the default) and L{DumbDBM} both implement
it, so the store never asks which one it has. Keys and values are bytes; iteration is in ring
order whatever the backend (L{ring_order}: the order a range of the ring is read in).
"""

from __future__ import annotations

import dbm.dumb
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from chainstore.ring import KeyRange, position
from chainstore.storage.sqlitedbm import image_pairs


def ring_order(key: bytes) -> tuple[int, bytes]:
    """Where C{key} comes when a backend is iterated: by the top 64 bits of its ring position
    (what the SQLite layout keys its rows by), then by the key's bytes."""
    return position(key) >> 64, key


@runtime_checkable
class Backend(Protocol):
    """A mapping of bytes to bytes in one file, with the chain state recorded beside it."""

    def get(self, key: bytes) -> bytes | None: ...
    def __setitem__(self, key: bytes, value: bytes) -> None: ...
    def __delitem__(self, key: bytes) -> None:
        """Remove C{key}; L{KeyError} if it holds no value."""
    def __contains__(self, key: object) -> bool: ...
    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[bytes]:
        """Every key in L{ring_order}, values unread; deleting keys already passed is safe."""

    def items(self, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """The pairs in L{ring_order}, strictly after the key C{after}; writes meanwhile are
        allowed."""

    def range_page(self, start: int, end: int, cursor: Any, limit: int, values: bool = True,
                   max_bytes: int | None = None) -> tuple[list[tuple[bytes, bytes | None]], Any]:
        """The next page of the pairs (key, value, or None without C{values}) of the ring
        range (start, end], the whole ring if start == end, and the cursor of the page after
        it (None: no more); C{cursor} None starts. At most C{limit} entries are read (a page
        may hold fewer, even none, while more follow), and a page ends once its keys and
        values hold C{max_bytes}. Keys deleted behind the cursor do not disturb it."""

    def update_many(self, puts: Iterable[tuple[bytes, bytes]],
                    deletes: Iterable[bytes] = ()) -> None:
        """The puts, then the deletes (a missing key is no error), atomically if it can."""

    def move_page(self, source: Any, start: int, end: int, cursor: Any, limit: int,
                  max_bytes: int | None = None) -> tuple[int, Any]:
        """Copy the next page (as L{range_page} reads it) of the ring range (start, end] of
        C{source}, another file of the same backend, into this one, atomically if it can;
        (pairs copied, cursor of the next page or None)."""

    def export_page(self, start: int, end: int, cursor: Any, limit: int,
                    max_bytes: int | None = None) -> tuple[bytes | None, int, int, Any] | None:
        """The next page (as L{range_page} reads it) of the ring range (start, end] as a copy
        batch's database image (chainstore/storage/sqlitedbm.py): (image or None when
        nothing is left, pairs, bytes of their keys and values, cursor of the next page or
        None); None when the page must be read with L{range_page} instead."""

    def import_image(self, image: bytes) -> int:
        """Write the pairs of another server's copy batch image (L{export_page}), atomically
        if it can; how many. L{ValueError}, nothing written, if it is not such an image."""

    def drop_page(self, start: int, end: int, cursor: Any, limit: int) -> tuple[int, Any]:
        """Delete the next page (as L{range_page} reads it) of the ring range (start, end],
        atomically if it can; (keys deleted, cursor of the next page or None)."""

    def clear(self) -> None:
        """Delete every key; the chain state stays. SQLite does it by replacing the file,
        in a time that does not grow with the data."""

    def chain_state(self) -> tuple[str, int]:
        """(chain identity, serial of the last applied write)."""

    def set_chain_state(self, chain: str, serial: int) -> None: ...

    def apply_one(self, delete: bool, key: bytes, value: bytes, serial: int) -> bool:
        """One write and its serial, in the group transaction if the backend has one (made
        durable by L{commit}); whether the key held a value."""

    def apply_ops(self, ops: Iterable[tuple[bool, bytes, Any]], serial: int) -> None:
        """Writes (delete?, key, value) in order and the serial of the last, atomically if
        it can. A value may be any bytes-like object (a replica passes memoryviews of the
        batch it received)."""

    @property
    def uncommitted(self) -> bool:
        """Whether writes of L{apply_one} wait for L{commit}."""

    def commit(self) -> None: ...

    def abandon(self) -> None:
        """Roll back the writes of L{apply_one} not committed yet (if it can)."""

    def sync(self) -> None: ...
    def close(self) -> None: ...


class DumbDBM:
    """L{Backend} on the stdlib ``dbm.dumb`` (``--backend dumb``).

    No transactions: every write is applied at once, L{commit} and L{abandon} do nothing, and
    a batch is not atomic. It loses updates on ``kill -9`` (docs/DESIGN.md), and its chain
    state lives only in memory, which is why a server under an ECS refuses it
    (L{chainstore.config.ServerConfig.validated}).
    """

    def __init__(self, path: str) -> None:
        self._db: Any = dbm.dumb.open(path, "c")
        self._chain_state: tuple[str, int] = ("", 0)

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._db[key] = value

    def __delitem__(self, key: bytes) -> None:
        del self._db[key]

    def __contains__(self, key: object) -> bool:
        return key in self._db

    def __len__(self) -> int:
        return len(self._db)

    def __iter__(self) -> Iterator[bytes]:
        # dbm.dumb lists its keys in insertion order; the list is a copy (they are in memory).
        return iter(sorted(self._db.keys(), key=ring_order))

    def items(self, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        # dbm.dumb's own items() would read every value at once: read them lazily.
        keys = sorted(self._db.keys(), key=ring_order)
        if after is not None:
            keys = [k for k in keys if ring_order(k) > ring_order(after)]
        return self._items(keys)

    def _items(self, keys: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
        for key in keys:
            value = self._db.get(key)
            if value is not None:
                yield key, value

    def range_page(self, start: int, end: int, cursor: Any, limit: int, values: bool = True,
                   max_bytes: int | None = None) -> tuple[list[tuple[bytes, bytes | None]], Any]:
        # Every key hashed and sorted for each page: fine for the small stores this backend
        # is for (it is refused under an ECS, which is what moves ranges). The cursor is the
        # last (place in ring order, key) returned.
        rng = KeyRange(start, end)

        def order(key: bytes) -> tuple[bool, int, bytes]:
            # A range that wraps past zero runs from above start to the top, then from 0.
            pos = position(key)
            return (start > end and pos <= end, pos, key)

        entries = sorted(order(key) for key in self._db.keys() if position(key) in rng)
        if cursor is not None:
            entries = [e for e in entries if e > cursor]
        found: list[tuple[bytes, bytes | None]] = []
        for entry in entries[:limit]:
            value = self._db.get(entry[2]) if values else None
            found.append((entry[2], value))
            if max_bytes is not None:
                max_bytes -= len(entry[2]) + (len(value) if value is not None else 0)
                if max_bytes <= 0:
                    break
        return found, (entries[len(found) - 1] if len(found) < len(entries) else None)

    def update_many(self, puts: Iterable[tuple[bytes, bytes]],
                    deletes: Iterable[bytes] = ()) -> None:
        for key, value in puts:
            self._db[key] = value
        for key in deletes:
            if key in self._db:
                del self._db[key]

    def move_page(self, source: Any, start: int, end: int, cursor: Any, limit: int,
                  max_bytes: int | None = None) -> tuple[int, Any]:
        page, cursor = source.range_page(start, end, cursor, limit, True, max_bytes)
        self.update_many(page)
        return len(page), cursor

    def export_page(self, start: int, end: int, cursor: Any, limit: int,
                    max_bytes: int | None = None) -> None:
        return None  # (its copies go as pairs: range_page)

    def import_image(self, image: bytes) -> int:
        pairs = image_pairs(image)
        self.update_many(pairs)
        return len(pairs)

    def drop_page(self, start: int, end: int, cursor: Any, limit: int) -> tuple[int, Any]:
        page, cursor = self.range_page(start, end, cursor, limit, False)
        self.update_many([], [key for key, _ in page])
        return len(page), cursor

    def clear(self) -> None:
        self._db.clear()

    def chain_state(self) -> tuple[str, int]:
        return self._chain_state

    def set_chain_state(self, chain: str, serial: int) -> None:
        self._chain_state = (chain, serial)

    def apply_one(self, delete: bool, key: bytes, value: bytes, serial: int) -> bool:
        existed = key in self._db
        if delete:
            if existed:
                del self._db[key]
        else:
            self._db[key] = value
        self._chain_state = (self._chain_state[0], serial)
        return existed

    def apply_ops(self, ops: Iterable[tuple[bool, bytes, Any]], serial: int) -> None:
        for delete, key, value in ops:
            if not delete:
                self._db[key] = bytes(value)  # dbm.dumb takes bytes only
            elif key in self._db:
                del self._db[key]
        self._chain_state = (self._chain_state[0], serial)

    @property
    def uncommitted(self) -> bool:
        return False

    def commit(self) -> None:
        pass

    def abandon(self) -> None:
        pass

    def sync(self) -> None:
        self._db.sync()

    def close(self) -> None:
        self._db.close()
