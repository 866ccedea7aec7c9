"""A dbm-interface key-value file on SQLite, the stores' default backend.

Why not the stdlib dbm modules: this Python ships only ``dbm.dumb``, which keeps its index in a
separate file rewritten on ``sync``/``close``, so ``kill -9`` loses every key written since.
SQLite (in the standard library) commits each write atomically to a write-ahead log: once a write
has returned, it survives the death of the process, and a crash mid-write leaves the previous
state, never a torn one. Memory stays bounded by SQLite's page cache, not by the data.

Durability levels (``durability`` argument):

``crash`` (default)
    WAL with ``synchronous=NORMAL``: every returned write survives a crash of the server process
    (its data is in the OS page cache), but a power cut may lose the last moments of writes. With
    chain replication, an acknowledged write is on three machines' page caches.
``power``
    WAL with ``synchronous=FULL``: each commit is fsynced; survives power loss, at the disk's
    fsync rate.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator

DURABILITY = {"crash": "NORMAL", "power": "FULL"}

# Keys are compared as raw bytes (SQLite's memcmp order for BLOBs), so iteration is in byte order.
_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID"
_PAGE = 512


class SQLiteDBM:
    """A mutable mapping of bytes to bytes, stored in one SQLite file; the dbm interface."""

    def __init__(self, path: str | os.PathLike[str], durability: str = "crash") -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {sorted(DURABILITY)}, not {durability!r}")
        self.path = os.fspath(path)
        # isolation_level=None: autocommit, each statement is its own transaction unless
        # batch() opens one explicitly.
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={DURABILITY[durability]}")
        self._db.execute(_SCHEMA)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"{self.path} is closed")
        return self._db

    def __getitem__(self, key: bytes) -> bytes:
        row = self._conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return bytes(row[0])

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        row = self._conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return default if row is None else bytes(row[0])

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._conn.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))

    def __delitem__(self, key: bytes) -> None:
        if self._conn.execute("DELETE FROM kv WHERE k = ?", (key,)).rowcount == 0:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return self._conn.execute("SELECT 1 FROM kv WHERE k = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0]

    def __iter__(self) -> Iterator[bytes]:
        for key, _ in self.items():
            yield key

    def keys(self) -> list[bytes]:
        return list(self)

    def items(self, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """All pairs in key order, strictly after C{after}, fetched a page at a time.

        Paging by key (rather than holding one cursor open) keeps memory bounded and lets
        writes happen between pages; a key written behind the cursor is not seen, as with any
        dbm iterator under concurrent writes.
        """
        while True:
            if after is None:
                rows = self._conn.execute(
                    "SELECT k, v FROM kv ORDER BY k LIMIT ?", (_PAGE,)
                ).fetchall()
            else:
                rows = self._conn.execute(
                    "SELECT k, v FROM kv WHERE k > ? ORDER BY k LIMIT ?", (after, _PAGE)
                ).fetchall()
            for k, v in rows:
                yield bytes(k), bytes(v)
            if len(rows) < _PAGE:
                return
            after = bytes(rows[-1][0])

    def update_many(self, puts: list[tuple[bytes, bytes]], deletes: list[bytes] = ()) -> None:
        """Apply many writes in one atomic transaction: all of them survive a crash, or none."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            if puts:
                conn.executemany("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", puts)
            if deletes:
                conn.executemany("DELETE FROM kv WHERE k = ?", [(k,) for k in deletes])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def clear(self) -> None:
        self._conn.execute("DELETE FROM kv")

    def sync(self) -> None:
        """Checkpoint the write-ahead log into the main file (every write is already durable)."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        if self._db is not None:
            try:
                self.sync()
            finally:
                self._db.close()
                self._db = None

    def __enter__(self) -> SQLiteDBM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(path: str | os.PathLike[str], flag: str = "c", durability: str = "crash") -> SQLiteDBM:
    """Open like C{dbm.open}: flag 'w' needs an existing file, 'c' creates, 'n' empties."""
    if flag not in ("w", "c", "n"):
        raise ValueError(f"flag must be one of 'w', 'c', 'n', not {flag!r}")
    if flag == "w" and not os.path.exists(path):
        raise FileNotFoundError(path)
    db = SQLiteDBM(path, durability)
    if flag == "n":
        db.clear()
    return db
