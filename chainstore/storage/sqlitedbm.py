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

import hashlib
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
# instead of 107 MB, gets were 4x slower). Files made with the older WITHOUT ROWID schema are
# converted when opened (L{SQLiteDBM._to_rowid_table}).
#
# b is the key's ring bucket: the top BUCKET_BITS bits of its ring position (its MD5), so the
# ring is cut into 64 arcs of equal size. It is indexed (kv_b, whose entries are (b, rowid)): a
# range of the ring is the buckets it covers, read through that index a page at a time, those
# it only partly covers (at most two) filtered by position, instead of every row of the file
# (hashing every key to find one range was a reactor stall that grew with the store). A bucket
# rather than the exact position, because a new row then goes to the end of its bucket's run
# of the index: a transaction of a thousand new keys changes at most 64 index pages, where an
# index of exact positions (random for every key) changed nearly a thousand, each written to
# the log at commit: loading 200,000 keys cost 3.6 times the CPU of no index that way, 1.35-1.5
# times this way. Files made before b existed get it on open (L{SQLiteDBM._upgrade}).
BUCKET_BITS = 6
_SHIFT = 8 - BUCKET_BITS
_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL, b INTEGER)"
_BUCKET_INDEX = "CREATE INDEX IF NOT EXISTS kv_b ON kv (b)"
# The number of keys, one row kept in the transaction of each insert and delete, so that
# len() (stats, at every request for them) reads one row instead of counting the file.
# Inserts are counted by a trigger (an upsert that updates does not fire it), deletes by the
# code that deletes (_delete_many), from the rows each DELETE removed: an AFTER DELETE trigger
# cost 6.5 of the 17.8 us of CPU a deleted key took (a drop of 50,000 keys from a store of
# 200,000), where the insert trigger costs about 1.3 of 8 us per new key.
_COUNT_SCHEMA = ("CREATE TABLE IF NOT EXISTS kv_count "
                 "(id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)")
_COUNT_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS kv_count_insert AFTER INSERT ON kv "
    "BEGIN UPDATE kv_count SET n = n + 1 WHERE id = 0; END",
)
_UNCOUNT = "UPDATE kv_count SET n = n - ? WHERE id = 0"
# An upsert changes the value in place; INSERT OR REPLACE deletes the row and inserts a new one,
# which costs 3-5x more for an update.
_PUT = ("INSERT INTO kv (k, v, b) VALUES (?, ?, ?) "
        "ON CONFLICT (k) DO UPDATE SET v = excluded.v")
_UPDATE = "UPDATE kv SET v = ? WHERE k = ?"
_INSERT = "INSERT INTO kv (k, v, b) VALUES (?, ?, ?)"
_DELETE = "DELETE FROM kv WHERE k = ?"
_PAGE = 512
# Rows given buckets (or moved out of a WITHOUT ROWID table) per transaction when a file made by
# an older version is opened.
_UPGRADE_ROWS = 10_000
# The chain this file's data belongs to and the serial of the last write applied, updated in the
# same transaction as the write (see chainstore/chain.py).
_CHAIN_SCHEMA = ("CREATE TABLE IF NOT EXISTS chain "
                 "(id INTEGER PRIMARY KEY CHECK (id = 0), chain TEXT NOT NULL, "
                 "serial INTEGER NOT NULL)")
_SET_SERIAL = ("INSERT INTO chain (id, chain, serial) VALUES (0, '', ?) "
               "ON CONFLICT (id) DO UPDATE SET serial = excluded.serial")


def bucket(key: bytes) -> int:
    """The ring bucket of C{key}: the top L{BUCKET_BITS} bits of its ring position
    (chainstore.ring.position, the MD5 of the key)."""
    return hashlib.md5(key).digest()[0] >> _SHIFT


def _position(key: bytes) -> int:
    return int.from_bytes(hashlib.md5(key).digest(), "big")


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
        self.durability = durability
        self._db: sqlite3.Connection | None = None
        self._connect()
        # Serial of the last write in the open group transaction (apply_one), None if none.
        self._group_serial: int | None = None

    def _connect(self) -> None:
        # isolation_level=None: autocommit, each statement is its own transaction unless
        # update_many() opens one explicitly.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={DURABILITY[self.durability]}")
            db.execute(_SCHEMA)
            db.execute(_CHAIN_SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db
        try:
            self._upgrade()
        except BaseException:
            self._rollback()
            db.close()
            self._db = None
            raise

    def _upgrade(self) -> None:
        """Bring a file made by an older version to this schema (a new file gets it empty):
        a rowid table, the bucket column and its index, the key count. Done in transactions
        of L{_UPGRADE_ROWS} rows, so the write-ahead log stays small and an interrupted
        upgrade resumes where it stopped."""
        conn = self._conn
        self._to_rowid_table()
        if "b" not in {row[1] for row in conn.execute("PRAGMA table_info(kv)")}:
            conn.execute("ALTER TABLE kv ADD COLUMN b INTEGER")
        if not self._has("index", "kv_b"):
            self._add_buckets()
            conn.execute(_BUCKET_INDEX)
        # A development version indexed exact positions (a column p): the index goes, the
        # column stays empty for new rows.
        conn.execute("DROP INDEX IF EXISTS kv_p")
        if not self._has("table", "kv_count"):
            # The count and the triggers that keep it start in one transaction.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_COUNT_SCHEMA)
            conn.execute("INSERT INTO kv_count (id, n) SELECT 0, COUNT(*) FROM kv")
            for trigger in _COUNT_TRIGGERS:
                conn.execute(trigger)
            conn.execute("COMMIT")
        # A file of the version that counted deletes by a trigger too: the code counts them now.
        conn.execute("DROP TRIGGER IF EXISTS kv_count_delete")

    def _has(self, kind: str, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = ? AND name = ?",
                                  (kind, name)).fetchone() is not None

    def _to_rowid_table(self) -> None:
        # Pages of a range go by rowid within a bucket, and a WITHOUT ROWID table has none:
        # its rows move to a rowid table in key order, then it is dropped (one transaction).
        conn = self._conn
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'kv'"
                           ).fetchone()[0]
        if "WITHOUT ROWID" not in sql.upper():
            return
        conn.execute(_SCHEMA.replace(" kv ", " kv_rowid "))
        while True:
            last = conn.execute("SELECT MAX(k) FROM kv_rowid").fetchone()[0]
            conn.execute("BEGIN")
            moved = conn.execute(
                "INSERT INTO kv_rowid (k, v) SELECT k, v FROM kv WHERE k > ? ORDER BY k LIMIT ?",
                (b"" if last is None else last, _UPGRADE_ROWS)).rowcount
            if last is None:
                # b"" sorts first, but is a key of its own
                moved += conn.execute("INSERT OR IGNORE INTO kv_rowid (k, v) "
                                      "SELECT k, v FROM kv WHERE k = ?", (b"",)).rowcount
            conn.execute("COMMIT")
            if moved < _UPGRADE_ROWS:
                break
        conn.execute("BEGIN")
        conn.execute("DROP TABLE kv")  # and its triggers: the count is made again
        conn.execute("DROP TABLE IF EXISTS kv_count")
        conn.execute("ALTER TABLE kv_rowid RENAME TO kv")
        conn.execute("COMMIT")

    def _add_buckets(self) -> None:
        conn = self._conn
        after = 0
        while True:
            rows = conn.execute("SELECT rowid, k FROM kv WHERE rowid > ? AND b IS NULL "
                                "ORDER BY rowid LIMIT ?", (after, _UPGRADE_ROWS)).fetchall()
            if not rows:
                return
            conn.execute("BEGIN")
            conn.executemany("UPDATE kv SET b = ? WHERE rowid = ?",
                             [(bucket(bytes(k)), rowid) for rowid, k in rows])
            conn.execute("COMMIT")
            after = rows[-1][0]

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
        key = _bytes(key)
        self._conn.execute(_PUT, (key, _bytes(value), bucket(key)))

    def __delitem__(self, key: bytes | str) -> None:
        key = _bytes(key)
        conn = self._conn
        # The delete and its count in one transaction (the group's, if one is open).
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")
        try:
            deleted = self._delete_many(conn, [(key,)])
            if own:
                conn.execute("COMMIT")
        except BaseException:
            if own:
                self._rollback()
            raise
        if not deleted:
            raise KeyError(key)

    @staticmethod
    def _delete_many(conn: sqlite3.Connection, keys: Iterable[tuple[Any]]) -> int:
        """Delete these keys (a missing one is no error) and count them off; how many were
        deleted. In the caller's transaction."""
        deleted = conn.executemany(_DELETE, keys).rowcount
        if deleted > 0:
            conn.execute(_UNCOUNT, (deleted,))
        return deleted

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (bytes, str)):
            return False
        row = self._conn.execute("SELECT 1 FROM kv WHERE k = ?", (_bytes(key),)).fetchone()
        return row is not None

    def __len__(self) -> int:
        # One row, kept by triggers (see _COUNT_SCHEMA): not a count of the file.
        return self._conn.execute("SELECT n FROM kv_count WHERE id = 0").fetchone()[0]

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
            conn.executemany(_PUT, _with_buckets((_bytes(k), _bytes(v)) for k, v in puts))
            self._delete_many(conn, ((_bytes(k),) for k in deletes))
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
                existed = self._delete_many(conn, [(key,)]) > 0
            else:
                existed = conn.execute(_UPDATE, (value, key)).rowcount > 0
                if not existed:
                    conn.execute(_INSERT, (key, value, bucket(key)))
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
                    self._delete_many(conn, ((key,) for _, key, _ in run))
                else:
                    conn.executemany(_PUT, _with_buckets((key, value) for _, key, value in run))
            conn.execute(_SET_SERIAL, (serial,))
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def clear(self) -> None:
        """Delete every key; the chain state stays. The file is replaced by a new one that
        holds only the chain state, so this takes the same time whatever the data: deleting
        rows, in one statement or in chunks, takes time that grows with them (200,000 keys
        took 33 s in transactions of 256 on the shared 2-CPU machine).

        Safe at any crash: the old file is checkpointed and its log removed before the new
        one, complete and closed, is renamed over it, so either holds a consistent state."""
        self.commit()
        chain, serial = self.chain_state()
        fresh = self.path + ".new"
        for leftover in (fresh, fresh + "-wal", fresh + "-shm"):
            if os.path.exists(leftover):
                os.remove(leftover)
        new = SQLiteDBM(fresh, self.durability)
        try:
            new.set_chain_state(chain, serial)
        finally:
            new.close()
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        self._db = None
        for side in ("-wal", "-shm"):
            if os.path.exists(self.path + side):
                os.remove(self.path + side)
        os.replace(fresh, self.path)
        self._connect()

    def range_page(self, start: int, end: int, cursor: Any, limit: int, values: bool = True,
                   max_bytes: int | None = None) -> tuple[list[tuple[bytes, bytes | None]], Any]:
        """The next page of the pairs (key, value) of the ring range (start, end] (the whole
        ring if start == end), and the cursor to pass for the page after it (None: there is
        none). C{cursor} is None for the first page. At most C{limit} rows are read, so a page
        may hold fewer pairs (even none: rows of a partly covered bucket that are not in the
        range) while there are more; with C{max_bytes}, the page ends once its keys and values
        hold that many bytes. With C{values} false the values are None.

        Only the range's buckets are read (kv_b), in bucket order, each by rowid; the cursor
        is (the bucket's place in that order, the last rowid read), so keys deleted behind it
        (a drop deleting what it reads) do not disturb it, and a key written meanwhile behind
        it is not seen.
        """
        segments = _segments(start, end)
        place, last = cursor if cursor is not None else (0, None)
        columns = "rowid, k, v" if values else "rowid, k"
        found: list[tuple[bytes, bytes | None]] = []
        left = limit
        while place < len(segments):
            bucket_id, low, high = segments[place]
            where, args = "b = ?", [bucket_id]
            if last is not None:
                where += " AND rowid > ?"
                args.append(last)
            rows = self._conn.execute(
                f"SELECT {columns} FROM kv WHERE {where} ORDER BY rowid LIMIT ?",
                (*args, left)).fetchall()
            for row in rows:
                last = row[0]
                key = bytes(row[1])
                if low is not None or high is not None:
                    pos = _position(key)
                    if (low is not None and pos <= low) or (high is not None and pos > high):
                        continue
                value = bytes(row[2]) if values else None
                found.append((key, value))
                if max_bytes is not None:
                    max_bytes -= len(key) + (len(value) if value is not None else 0)
                    if max_bytes <= 0:
                        return found, (place, last)
            left -= len(rows)
            if left <= 0:
                return found, (place, last)
            place, last = place + 1, None
        return found, None

    def move_page(self, source: SQLiteDBM, start: int, end: int, cursor: Any, limit: int,
                  max_bytes: int | None = None) -> tuple[int, Any]:
        """Copy the next page of C{source}'s ring range (start, end] into this file, in one
        transaction (a key here already is overwritten); (pairs copied, cursor), the page and
        the cursor as L{range_page}'s. Done inside SQLite (C{source} attached to this
        connection, C{INSERT ... SELECT}): keys and values never become Python objects (a
        quarter of a 200,000-key store moved at 7-8 us of CPU per key, against 10-11 with
        each pair read into Python and bound again for the insert). C{source} must be
        another file."""
        if source.path == self.path:
            raise ValueError("a store cannot move a range into itself")
        self.commit()
        conn = self._conn
        # Attached for this page only: nothing is left attached between reactor turns, when
        # the group transaction (apply_one) may be open on this connection.
        conn.execute("ATTACH DATABASE ? AS source", (source.path,))
        try:
            chosen, cursor = self._page_rows(conn, "source.kv", start, end, cursor, limit,
                                             max_bytes)
            conn.execute("BEGIN")
            try:
                for bucket_id, rowids in chosen:
                    conn.execute(
                        f"INSERT INTO kv (k, v, b) SELECT k, v, b FROM source.kv WHERE b = ? "
                        f"AND rowid IN ({','.join('?' * len(rowids))}) "
                        "ON CONFLICT (k) DO UPDATE SET v = excluded.v", (bucket_id, *rowids))
                conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        finally:
            if not conn.in_transaction:
                conn.execute("DETACH DATABASE source")
        return sum(len(rowids) for _, rowids in chosen), cursor

    def drop_page(self, start: int, end: int, cursor: Any, limit: int) -> tuple[int, Any]:
        """Delete the next page (as L{range_page} reads it, keys and values unread) of the ring
        range (start, end], in one transaction; (keys deleted, cursor of the next page or None).
        Rows are deleted by rowid inside SQLite, none read into Python: 11 us of CPU per key
        where reading the keys and deleting them by key took 17-18."""
        self.commit()
        conn = self._conn
        chosen, cursor = self._page_rows(conn, "kv", start, end, cursor, limit, None)
        conn.execute("BEGIN")
        try:
            deleted = 0
            for bucket_id, rowids in chosen:
                deleted += conn.execute(
                    f"DELETE FROM kv WHERE b = ? AND rowid IN ({','.join('?' * len(rowids))})",
                    (bucket_id, *rowids)).rowcount
            if deleted:
                conn.execute(_UNCOUNT, (deleted,))
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return deleted, cursor

    @staticmethod
    def _page_rows(conn: sqlite3.Connection, table: str, start: int, end: int, cursor: Any,
                   limit: int, max_bytes: int | None) -> tuple[list[tuple[int, list[int]]], Any]:
        """The rowids of the next page of the ring range (start, end] of C{table}, per bucket:
        ([(bucket, rowids)], cursor), with L{range_page}'s limits; keys are read only in the
        buckets the range covers in part (to filter by position), values never (only their
        length, which SQLite knows without reading them)."""
        segments = _segments(start, end)
        place, last = cursor if cursor is not None else (0, None)
        chosen: list[tuple[int, list[int]]] = []
        left = limit
        while place < len(segments):
            bucket_id, low, high = segments[place]
            partial = low is not None or high is not None
            where, args = "b = ?", [bucket_id]
            if last is not None:
                where += " AND rowid > ?"
                args.append(last)
            key = "k" if partial else "NULL"
            size = "0" if max_bytes is None else "length(k) + length(v)"
            rows = conn.execute(
                f"SELECT rowid, {key}, {size} FROM {table} WHERE {where} "
                "ORDER BY rowid LIMIT ?", (*args, left)).fetchall()
            rowids: list[int] = []
            full = False
            for rowid, k, size in rows:
                last = rowid
                if partial:
                    pos = _position(bytes(k))
                    if (low is not None and pos <= low) or (high is not None and pos > high):
                        continue
                rowids.append(rowid)
                if max_bytes is not None:
                    max_bytes -= size
                    if max_bytes <= 0:
                        full = True
                        break
            if rowids:
                chosen.append((bucket_id, rowids))
            left -= len(rows)
            if full or left <= 0:
                return chosen, (place, last)
            place, last = place + 1, None
        return chosen, None

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


def _segments(start: int, end: int) -> list[tuple[int, int | None, int | None]]:
    """The buckets of the ring range (start, end] in ring order, each with the bounds its keys'
    positions must pass: (bucket, above this or None, at most this or None)."""
    if start == end:
        return [(b, None, None) for b in range(1 << BUCKET_BITS)]
    shift = 128 - BUCKET_BITS
    first, final = start >> shift, end >> shift
    count = (final - first) % (1 << BUCKET_BITS) + 1
    if start > end and first == final:
        count += 1 << BUCKET_BITS  # almost the whole ring: its bucket at both ends
    buckets = [(first + i) % (1 << BUCKET_BITS) for i in range(count)]
    return [(b, start if i == 0 else None, end if i == count - 1 else None)
            for i, b in enumerate(buckets)]


def _with_buckets(pairs: Iterable[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes, int]]:
    return ((key, value, bucket(key)) for key, value in pairs)


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
