"""A dbm-interface key-value file on SQLite, the stores' default backend.

Why not the stdlib dbm modules: this Python ships only ``dbm.dumb``, which keeps its index in
memory and in a separate ``.dir`` file. A new key is appended to that file at once, but an update
whose value needs more 512-byte blocks than the old one is moved to the end of the data file and
recorded only in the in-memory index until ``sync``/``close``: ``kill -9`` loses every such
update since the last sync (tests/test_crash.py shows it), and a kill during the rewrite of the
index (every ``sync``, ``close`` and delete) leaves it truncated. SQLite (in the standard library)
commits each write atomically to a write-ahead log: once a write has returned, it survives the
death of the process, and a crash mid-write leaves the previous state, never a torn one. Memory
stays bounded by SQLite's page cache, not by the data.

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
from collections.abc import Iterable, Iterator
from itertools import groupby
from operator import itemgetter
from typing import Any

DURABILITY = {"crash": "NORMAL", "power": "FULL"}

# Keys are compared as raw bytes (SQLite's memcmp order for BLOBs), so iteration is in byte order.
# A rowid table, not WITHOUT ROWID: the latter keeps whole rows in its key b-tree, where a value
# over ~1 KB spills into half-empty overflow pages (100,000 values of 1,000 bytes took 468 MB
# instead of 107 MB, gets were 4x slower), and COUNT(*) has to walk the values; here the primary
# key index holds only the keys, so len() scans ~1M keys in under 10 ms. Files made with the
# older WITHOUT ROWID schema still open and work: every statement below suits both.
_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL)"
# An upsert changes the value in place; INSERT OR REPLACE deletes the row and inserts a new one,
# which costs 3-5x more for an update.
_PUT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
_UPDATE = "UPDATE kv SET v = ? WHERE k = ?"
_INSERT = "INSERT INTO kv (k, v) VALUES (?, ?)"
_DELETE = "DELETE FROM kv WHERE k = ?"
_PAGE = 512
# The chain this file's data belongs to and the serial of the last write applied, updated in the
# same transaction as the write (see chainstore/chain.py).
_CHAIN_SCHEMA = ("CREATE TABLE IF NOT EXISTS chain "
                 "(id INTEGER PRIMARY KEY CHECK (id = 0), chain TEXT NOT NULL, "
                 "serial INTEGER NOT NULL)")
_SET_SERIAL = ("INSERT INTO chain (id, chain, serial) VALUES (0, '', ?) "
               "ON CONFLICT (id) DO UPDATE SET serial = excluded.serial")


def _bytes(data: bytes | str) -> bytes:
    """Keys and values as bytes; str is encoded as UTF-8, as the stdlib dbm modules do."""
    # Without this a str would be stored as TEXT, which never equals (or sorts among) the BLOB
    # of the same bytes.
    return data.encode("utf-8") if isinstance(data, str) else data


class SQLiteDBM:
    """A mutable mapping of bytes to bytes, stored in one SQLite file; the dbm interface.

    Iteration is in byte order of the keys. Every method except L{close} raises L{ValueError}
    once the file is closed.
    """

    def __init__(self, path: str | os.PathLike[str], durability: str = "crash") -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {sorted(DURABILITY)}, not {durability!r}")
        self.path = os.fspath(path)
        # isolation_level=None: autocommit, each statement is its own transaction unless
        # update_many() opens one explicitly.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={DURABILITY[durability]}")
            db.execute(_SCHEMA)
            db.execute(_CHAIN_SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db: sqlite3.Connection | None = db
        # Serial of the last write in the open group transaction (apply_one), None if none.
        self._group_serial: int | None = None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"{self.path} is closed")
        return self._db

    def __getitem__(self, key: bytes | str) -> bytes:
        key = _bytes(key)
        row = self._conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return bytes(row[0])

    def get(self, key: bytes | str, default: bytes | None = None) -> bytes | None:
        row = self._conn.execute("SELECT v FROM kv WHERE k = ?", (_bytes(key),)).fetchone()
        return default if row is None else bytes(row[0])

    def __setitem__(self, key: bytes | str, value: bytes | str) -> None:
        self._conn.execute(_PUT, (_bytes(key), _bytes(value)))

    def __delitem__(self, key: bytes | str) -> None:
        key = _bytes(key)
        if self._conn.execute("DELETE FROM kv WHERE k = ?", (key,)).rowcount == 0:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (bytes, str)):
            return False
        row = self._conn.execute("SELECT 1 FROM kv WHERE k = ?", (_bytes(key),)).fetchone()
        return row is not None

    def __len__(self) -> int:
        # A scan of the primary key index, which holds only the keys (see _SCHEMA).
        return self._conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0]

    def __iter__(self) -> Iterator[bytes]:
        # Keys only: values may be 120 KB each, and iterating keys must not read them.
        return self._paged("k", None, lambda row: bytes(row[0]))

    def keys(self) -> list[bytes]:
        return list(self)

    def items(self, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """All pairs in key order, strictly after C{after}, fetched a page at a time.

        Paging by key (rather than holding one cursor open) keeps memory bounded and lets
        writes happen between pages; a key written behind the cursor is not seen, as with any
        dbm iterator under concurrent writes.
        """
        return self._paged("k, v", after, lambda row: (bytes(row[0]), bytes(row[1])))

    def _paged(self, columns: str, after: bytes | None, convert: Any) -> Iterator[Any]:
        # Check now, not at the first next(): a closed file fails where items() is called.
        self._conn
        return self._pages(columns, after, convert)

    def _pages(self, columns: str, after: bytes | None, convert: Any) -> Iterator[Any]:
        while True:
            if after is None:
                rows = self._conn.execute(
                    f"SELECT {columns} FROM kv ORDER BY k LIMIT ?", (_PAGE,)
                ).fetchall()
            else:
                rows = self._conn.execute(
                    f"SELECT {columns} FROM kv WHERE k > ? ORDER BY k LIMIT ?",
                    (_bytes(after), _PAGE),
                ).fetchall()
            for row in rows:
                yield convert(row)
            if len(rows) < _PAGE:
                return
            after = bytes(rows[-1][0])

    def update_many(self, puts: Iterable[tuple[bytes, bytes]],
                    deletes: Iterable[bytes] = ()) -> None:
        """Apply many writes in one atomic transaction: all of them survive a crash, or none.

        The puts are applied first, then the deletes; deleting a missing key is not an error.
        If anything fails, nothing is applied and the error is raised.
        """
        self.commit()
        conn = self._conn
        conn.execute("BEGIN")
        try:
            conn.executemany(_PUT, ((_bytes(k), _bytes(v)) for k, v in puts))
            conn.executemany("DELETE FROM kv WHERE k = ?", ((_bytes(k),) for k in deletes))
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def chain_state(self) -> tuple[str, int]:
        """The chain identity and last applied serial recorded with the data."""
        row = self._conn.execute("SELECT chain, serial FROM chain WHERE id = 0").fetchone()
        return ("", 0) if row is None else (row[0], row[1])

    def set_chain_state(self, chain: str, serial: int) -> None:
        self.commit()
        self._conn.execute(
            "INSERT INTO chain (id, chain, serial) VALUES (0, ?, ?) ON CONFLICT (id) "
            "DO UPDATE SET chain = excluded.chain, serial = excluded.serial", (chain, serial))

    def apply_one(self, delete: bool, key: bytes, value: bytes, serial: int) -> bool:
        """One write and its serial, in the open group transaction (opened if needed); whether
        the key held a value before. Nothing is durable until L{commit}."""
        conn = self._conn
        if self._group_serial is None:
            conn.execute("BEGIN")
        self._group_serial = serial
        try:
            # One statement when the key exists (the usual update) or for a delete; the row
            # count says whether it existed.
            if delete:
                existed = conn.execute(_DELETE, (key,)).rowcount > 0
            else:
                existed = conn.execute(_UPDATE, (value, key)).rowcount > 0
                if not existed:
                    conn.execute(_INSERT, (key, value))
        except BaseException:
            # Every write of the group goes: the caller must treat them all as failed (the
            # server stops serving, see chainstore/node.py), never forward or answer them.
            self._rollback()
            self._group_serial = None
            raise
        return existed

    @property
    def uncommitted(self) -> bool:
        """Whether writes of L{apply_one} wait for L{commit}."""
        return self._group_serial is not None

    def commit(self) -> None:
        """Commit the group transaction of L{apply_one}, with the serial of its last write.

        Writes that arrive together (one reactor turn) share one commit: that is most of the
        cost of a write.
        """
        if self._group_serial is not None:
            conn = self._conn
            try:
                conn.execute(_SET_SERIAL, (self._group_serial,))
                conn.execute("COMMIT")
            except BaseException:
                # A COMMIT that fails (a full disk) may leave the transaction open: its writes
                # would then be read on this connection and committed by whatever statement
                # comes next. Roll it back; the marker goes only once nothing is open.
                self._rollback()
                self._group_serial = None
                raise
            self._group_serial = None

    def abandon(self) -> None:
        """Roll back the group transaction of L{apply_one}: its writes were never committed,
        so nobody was told they were done, and they must not become durable later."""
        if self._group_serial is not None:
            self._rollback()
            self._group_serial = None

    def _rollback(self) -> None:
        # After some failures SQLite has already rolled the transaction back itself, and a
        # second ROLLBACK would raise "no transaction is active".
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def apply_ops(self, ops: Iterable[tuple[bool, bytes, bytes]], serial: int) -> None:
        """Writes (delete?, key, value) in order and the serial of the last, atomically."""
        self.commit()
        conn = self._conn
        conn.execute("BEGIN")
        try:
            # Runs of puts go to SQLite in one call each (the common case: a whole batch).
            for delete, run in groupby(ops, key=itemgetter(0)):
                if delete:
                    conn.executemany(_DELETE, ((key,) for _, key, _ in run))
                else:
                    conn.executemany(_PUT, ((key, value) for _, key, value in run))
            conn.execute(_SET_SERIAL, (serial,))
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def clear(self) -> None:
        self.commit()
        self._conn.execute("DELETE FROM kv")

    def sync(self) -> None:
        """Checkpoint the write-ahead log into the main file (every write is already durable).

        Not needed for durability; it bounds the log's size and costs an fsync of the file.
        """
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Commit, checkpoint and close; closing again does nothing."""
        if self._db is not None:
            try:
                self.commit()
                self.sync()
            finally:
                self._db.close()
                self._db = None

    def __enter__(self) -> SQLiteDBM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_file(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with the SQLite file at C{path} (C{PRAGMA quick_check}, which reads every
    page but does not compare indexes with their tables), or None if nothing is."""
    try:
        db = sqlite3.connect(os.fspath(path), isolation_level=None)
    except sqlite3.Error as e:
        return str(e)
    try:
        rows = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as e:
        return str(e)
    finally:
        db.close()
    problems = [str(row[0]) for row in rows if row[0] != "ok"]
    return "; ".join(problems[:3]) or None


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
