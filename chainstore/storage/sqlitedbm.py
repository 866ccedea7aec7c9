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
from contextlib import contextmanager
from itertools import groupby
from operator import itemgetter
from typing import Any

DURABILITY = {"crash": "NORMAL", "power": "FULL"}

# The layout: every row is kept under its key's *home*, the top 64 bits of its ring position (the
# key's MD5, chainstore.ring.position) shifted into SQLite's signed range, as the table's rowid
# (INTEGER PRIMARY KEY). So the table is in ring order, and everything a reconfiguration does is
# a run of rows: a range copy or a local move reads consecutive rows and writes them into a run
# of the target (a page of 256 keys lands in a few pages of the file), a drop deletes a run. With
# the key as primary key instead (a unique index on the key, a bucket index for ranges and rows
# in insertion order), a row copied cost an insert into two indexes at random places: 100-byte
# pairs read, sent and written at 10 us of CPU per key, moved between two local files at 7-8,
# dropped at 11, against 4, 1.3-1.8 and 0.6-0.75 this way (200,000 keys, /tmp benchmarks of both
# layouts, docs/DESIGN.md "Where a copy's time goes"). A get or a put still finds its row through
# one b-tree, the table's own.
#
# A rowid table, not WITHOUT ROWID: the latter keeps whole rows in its key b-tree, where a value
# over ~1 KB spills into half-empty overflow pages (100,000 values of 1,000 bytes took 468 MB
# instead of 107 MB, gets were 4x slower).
#
# Two keys whose positions share their top 64 bits (about n**2 / 2**65 for n keys: one in 3,700
# at 100 million, and a birthday search of 2**32 hashes for someone who wants one) cannot both
# have their home: the later one is kept in kv_spill, by key. A key is in one of the two tables,
# never both; the spill is looked at only while it may hold rows (SQLiteDBM._spill), so the
# usual get, put and delete are one statement on kv.
_HOME_BIAS = 1 << 63
_LOWEST, _HIGHEST = -_HOME_BIAS, _HOME_BIAS - 1
_COLUMNS = "(p INTEGER PRIMARY KEY, k BLOB NOT NULL, v BLOB NOT NULL)"
_SCHEMA = f"CREATE TABLE IF NOT EXISTS kv {_COLUMNS}"
_SPILL_SCHEMA = ("CREATE TABLE IF NOT EXISTS kv_spill "
                 "(k BLOB PRIMARY KEY, p INTEGER NOT NULL, v BLOB NOT NULL)")
_SPILL_INDEX = "CREATE INDEX IF NOT EXISTS kv_spill_p ON kv_spill (p, k)"
# The number of keys, one row kept in the transaction of each insert and delete, so that
# len() (stats, at every request for them) reads one row instead of counting the file.
# Inserts into kv are counted by a trigger (an upsert that updates does not fire it), deletes
# and the spill's rows by the code that writes them: an AFTER DELETE trigger runs its program
# once per deleted row, and cost 6.5 of the 17.8 us of CPU a deleted key took in the layout
# before this one.
_COUNT_SCHEMA = ("CREATE TABLE IF NOT EXISTS kv_count "
                 "(id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)")
_COUNT_TRIGGER = ("CREATE TRIGGER IF NOT EXISTS kv_count_insert AFTER INSERT ON kv "
                  "BEGIN UPDATE kv_count SET n = n + 1 WHERE id = 0; END")
_UNCOUNT = "UPDATE kv_count SET n = n - ? WHERE id = 0"
_UPDATE = "UPDATE kv SET v = ? WHERE p = ? AND k = ?"
_INSERT = "INSERT INTO kv (p, k, v) VALUES (?, ?, ?) ON CONFLICT (p) DO NOTHING"
# One statement for a batch: a new key is inserted, an existing one updated in place (INSERT OR
# REPLACE would delete and insert, 3-5x the cost of an update), and a key whose home holds
# another key is skipped, which the row count shows (L{SQLiteDBM._put_many}).
_UPSERT = ("INSERT INTO kv (p, k, v) VALUES (?, ?, ?) "
           "ON CONFLICT (p) DO UPDATE SET v = excluded.v WHERE k = excluded.k")
_DELETE = "DELETE FROM kv WHERE p = ? AND k = ?"
# A local move's run of rows, from the attached source file, by home (as _UPSERT: a key whose
# home holds another key here is skipped, which the row count shows).
_COPY_RUN = ("INSERT INTO kv (p, k, v) SELECT p, k, v FROM source.kv WHERE p >= ? AND p <= ? "
             "ORDER BY p ON CONFLICT (p) DO UPDATE SET v = excluded.v WHERE k = excluded.k")
# A range copy's batch between servers: a database image (Connection.serialize) of this one
# table, rows with their homes, made and written inside SQLite (SQLiteDBM.export_page and
# import_image). Read into Python, packed, unpacked and written with executemany, a 100-byte
# pair cost about 3.8 us of CPU over both ends; as an image about 2.2 (docs/DESIGN.md, "A
# copy's batch is a database image").
IMAGE_TABLE = f"CREATE TABLE kv {_COLUMNS}"
# The most bytes an image may take. SQLite's pages hold a run's rows with room to spare (about
# 150 bytes per 100-byte pair, more for some sizes of values), so an image of a page under the
# byte bound of a batch (512 KiB of keys and values) may be larger still; past this it is made
# again of half the rows, and a copy's box stays under 700,000 bytes, as one of pairs does, far
# below the 1 MiB a server's listener takes (docs/DESIGN.md, "Bounds per connection").
IMAGE_BYTES = 640 * 1024
_COPY_IMAGE = ("INSERT INTO kv (p, k, v) SELECT p, k, v FROM incoming.kv ORDER BY p "
               "ON CONFLICT (p) DO UPDATE SET v = excluded.v WHERE k = excluded.k")
_FIND = {column: (f"SELECT {column} FROM kv WHERE p = ? AND k = ?",
                   f"SELECT {column} FROM kv_spill WHERE k = ?") for column in ("v", "1")}
_SPILL_UPDATE = "UPDATE kv_spill SET v = ? WHERE k = ?"
_SPILL_INSERT = "INSERT INTO kv_spill (k, p, v) VALUES (?, ?, ?)"
_SPILL_DELETE = "DELETE FROM kv_spill WHERE k = ?"
_PAGE = 512
# Rows moved per transaction when a file made by an older version is opened.
_UPGRADE_ROWS = 10_000
# The chain this file's data belongs to and the serial of the last write applied, updated in the
# same transaction as the write (see chainstore/chain.py).
_CHAIN_SCHEMA = ("CREATE TABLE IF NOT EXISTS chain "
                 "(id INTEGER PRIMARY KEY CHECK (id = 0), chain TEXT NOT NULL, "
                 "serial INTEGER NOT NULL)")
_SET_SERIAL = ("INSERT INTO chain (id, chain, serial) VALUES (0, '', ?) "
               "ON CONFLICT (id) DO UPDATE SET serial = excluded.serial")


def home(key: bytes) -> int:
    """The row id C{key} is kept under: the top 64 bits of its ring position, minus 2**63,
    so that row order is ring order."""
    return _home_of(int.from_bytes(hashlib.md5(key).digest()[:8], "big"))


def _home_of(top: int) -> int:
    """The home of the positions whose top 64 bits are C{top} (tests make it coarser, so
    that keys share homes)."""
    return top - _HOME_BIAS


def _position(key: bytes) -> int:
    return int.from_bytes(hashlib.md5(key).digest(), "big")


def _bytes(data: bytes | str) -> bytes:
    """Keys and values as bytes; str is encoded as UTF-8, as the stdlib dbm modules do."""
    # Without this a str would be stored as TEXT, which never equals (or sorts among) the BLOB
    # of the same bytes.
    return data.encode("utf-8") if isinstance(data, str) else data


class SQLiteDBM:
    """A mutable mapping of bytes to bytes, stored in one SQLite file; the dbm interface.

    Iteration is in ring order, the order a range of the ring is read in: by the top 64 bits of
    the keys' positions (their MD5), then by key (L{chainstore.storage.backend.ring_order}).
    Every method except L{close} raises L{ValueError} once the file is closed.
    """

    def __init__(self, path: str | os.PathLike[str], durability: str = "crash") -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {sorted(DURABILITY)}, not {durability!r}")
        self.path = os.fspath(path)
        self.durability = durability
        self._db: sqlite3.Connection | None = None
        # Whether kv_spill may hold rows: never false while it does (a rolled-back insert
        # leaves it true, which costs only a look into an empty table).
        self._spill = False
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
            db.execute(_CHAIN_SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db
        try:
            self._upgrade()
            self._spill = db.execute("SELECT EXISTS (SELECT 1 FROM kv_spill)").fetchone()[0] == 1
        except BaseException:
            self._rollback()
            db.close()
            self._db = None
            raise

    # -- the layout, and files of older versions ---------------------------------------------

    def _upgrade(self) -> None:
        """Make the tables of this layout, and move the pairs of a file made by an older
        version (a table kv keyed by the key) into them, L{_UPGRADE_ROWS} pairs per
        transaction, each deleted from the old table in the transaction that adds it to the
        new one: the log stays small, and an interrupted upgrade resumes where it stopped."""
        conn = self._conn
        # (a development version had a column p too, not the primary key)
        keyed = {row[1] for row in conn.execute("PRAGMA table_info(kv)") if row[5]}
        if keyed and keyed != {"p"} and not self._has("table", "kv_before"):
            conn.execute("BEGIN IMMEDIATE")
            for (trigger,) in conn.execute("SELECT name FROM sqlite_master "
                                           "WHERE type = 'trigger'").fetchall():
                conn.execute(f'DROP TRIGGER "{trigger}"')
            conn.execute("DROP INDEX IF EXISTS kv_b")
            conn.execute("DROP INDEX IF EXISTS kv_p")
            conn.execute("DROP TABLE IF EXISTS kv_count")
            conn.execute("ALTER TABLE kv RENAME TO kv_before")
            conn.execute("COMMIT")
        if not self._has("table", "kv_count"):
            # The tables, the count and its trigger start in one transaction.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_SCHEMA)
            conn.execute(_SPILL_SCHEMA)
            conn.execute(_SPILL_INDEX)
            conn.execute(_COUNT_SCHEMA)
            conn.execute("INSERT INTO kv_count (id, n) VALUES (0, 0)")
            conn.execute(_COUNT_TRIGGER)
            conn.execute("COMMIT")
        if self._has("table", "kv_before"):
            self._spill = True  # until the pairs are in, a spilled one may be among them
            while True:
                rows = conn.execute("SELECT k, v FROM kv_before ORDER BY k LIMIT ?",
                                    (_UPGRADE_ROWS,)).fetchall()
                conn.execute("BEGIN")
                try:
                    if rows:
                        self._put_many(conn, [(_bytes(k), _bytes(v)) for k, v in rows])
                        conn.execute("DELETE FROM kv_before WHERE k <= ?", (rows[-1][0],))
                    else:
                        conn.execute("DROP TABLE kv_before")
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
                if not rows:
                    break

    def _has(self, kind: str, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = ? AND name = ?",
                                  (kind, name)).fetchone() is not None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"{self.path} is closed")
        return self._db

    # -- writes, in the caller's transaction ----------------------------------------------------

    def _put(self, conn: sqlite3.Connection, key: bytes, value: Any, at: int | None = None,
             ) -> bool:
        """Write one pair; whether the key held a value. C{at}: the key's home if known."""
        at = home(key) if at is None else at
        if self._spill and conn.execute(_SPILL_UPDATE, (value, key)).rowcount:
            return True
        if conn.execute(_UPDATE, (value, at, key)).rowcount:
            return True
        if not conn.execute(_INSERT, (at, key, value)).rowcount:
            # another key's home: see the layout above
            conn.execute(_SPILL_INSERT, (key, at, value))
            conn.execute(_UNCOUNT, (-1,))
            self._spill = True
        return False

    def _put_many(self, conn: sqlite3.Connection, pairs: Iterable[tuple[bytes, Any]]) -> None:
        """Write the pairs in order: one statement for all of them, unless the spill has rows
        or one of them finds another key at its home, when they go one at a time (again:
        writing a pair twice in order leaves what writing it once did)."""
        rows = [(home(key), key, value) for key, value in pairs]
        if not self._spill and conn.executemany(_UPSERT, rows).rowcount == len(rows):
            return
        for at, key, value in rows:
            self._put(conn, key, value, at)

    def _delete_many(self, conn: sqlite3.Connection, keys: Iterable[bytes]) -> int:
        """Delete these keys (a missing one is no error) and count them off; how many were
        deleted."""
        keys = list(keys)
        deleted = conn.executemany(_DELETE, [(home(key), key) for key in keys]).rowcount
        if self._spill:
            deleted += conn.executemany(_SPILL_DELETE, [(key,) for key in keys]).rowcount
        if deleted > 0:
            conn.execute(_UNCOUNT, (deleted,))
        return deleted

    # -- the mapping ------------------------------------------------------------------------

    def __getitem__(self, key: bytes | str) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(_bytes(key))
        return value

    def get(self, key: bytes | str, default: bytes | None = None) -> bytes | None:
        row = self._find(_bytes(key), "v")
        return default if row is None else bytes(row[0])

    def _find(self, key: bytes, column: str) -> tuple[Any] | None:
        """C{column} (C{"v"}, or C{"1"} not to read the value) of C{key}'s row, at its home or
        in the spill; None if it has none."""
        conn = self._conn
        at_home, spilled = _FIND[column]
        row = conn.execute(at_home, (home(key), key)).fetchone()
        if row is None and self._spill:
            row = conn.execute(spilled, (key,)).fetchone()
        return row

    def __setitem__(self, key: bytes | str, value: bytes | str) -> None:
        self._in_transaction(lambda conn: self._put(conn, _bytes(key), _bytes(value)))

    def __delitem__(self, key: bytes | str) -> None:
        key = _bytes(key)
        if not self._in_transaction(lambda conn: self._delete_many(conn, [key])):
            raise KeyError(key)

    def _in_transaction(self, write: Any) -> Any:
        # A write and its count in one transaction (the group's, if one is open).
        conn = self._conn
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")
        try:
            result = write(conn)
            if own:
                conn.execute("COMMIT")
        except BaseException:
            if own:
                self._rollback()
            raise
        return result

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (bytes, str)):
            return False
        # the value unread: it may be 120 KB
        return self._find(_bytes(key), "1") is not None

    def __len__(self) -> int:
        # One row, kept with every insert and delete (see _COUNT_SCHEMA): not a count of the file.
        return self._conn.execute("SELECT n FROM kv_count WHERE id = 0").fetchone()[0]

    def __iter__(self) -> Iterator[bytes]:
        # Keys only: values may be 120 KB each, and iterating keys must not read them.
        return self._paged(False, None, lambda key, value: key)

    def keys(self) -> list[bytes]:
        return list(self)

    def items(self, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """All pairs in ring order, strictly after the key C{after}, fetched a page at a time.

        Paging (rather than holding one cursor open) keeps memory bounded and lets writes
        happen between pages; a key written behind the cursor is not seen, as with any dbm
        iterator under concurrent writes.
        """
        return self._paged(True, after, lambda key, value: (key, value))

    def _paged(self, values: bool, after: bytes | None, convert: Any) -> Iterator[Any]:
        # Check now, not at the first next(): a closed file fails where items() is called.
        self._conn
        return self._pages(values, after, convert)

    def _pages(self, values: bool, after: bytes | None, convert: Any) -> Iterator[Any]:
        last = None if after is None else (home(_bytes(after)), _bytes(after))
        while True:
            rows = self._rows(self._conn, "", _LOWEST, _HIGHEST, last, _PAGE, values)
            for at, key, value in rows:
                yield convert(key, value)
            if len(rows) < _PAGE:
                return
            last = rows[-1][:2]

    def _rows(self, conn: sqlite3.Connection, schema: str, low: int, high: int,
              after: tuple[int, bytes] | None, limit: int, values: bool,
              spill: bool | None = None) -> list[tuple[int, bytes, Any]]:
        """The first C{limit} rows (home, key, value or its length) in ring order of both
        tables of C{schema} (C{""} or C{"source."}) with homes from C{low} to C{high}, after
        (home, key) C{after}. C{spill}: whether to look at the spill (this file's flag if
        None)."""
        column = "v" if values else "length(v)"
        start = low if after is None else max(low, after[0])
        rows = [(at, bytes(k), v) for at, k, v in conn.execute(
            f"SELECT p, k, {column} FROM {schema}kv WHERE p >= ? AND p <= ? ORDER BY p LIMIT ?",
            (start, high, limit + 1))]
        if after is not None and rows and rows[0][0] == after[0] and rows[0][1] <= after[1]:
            del rows[0]
        del rows[limit:]
        if self._spill if spill is None else spill:
            where, args = ("p >= ?", (low,)) if after is None else ("(p, k) > (?, ?)", after)
            spilled = conn.execute(
                f"SELECT p, k, {column} FROM {schema}kv_spill WHERE {where} AND p <= ? "
                "ORDER BY p, k LIMIT ?", (*args, high, limit)).fetchall()
            if spilled:
                rows = sorted(rows + [(at, bytes(k), v) for at, k, v in spilled])[:limit]
        return rows

    # -- batches and the chain's writes ------------------------------------------------------------

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
            self._put_many(conn, ((_bytes(k), _bytes(v)) for k, v in puts))
            self._delete_many(conn, (_bytes(k) for k in deletes))
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
                existed = self._delete_many(conn, [key]) > 0
            else:
                existed = self._put(conn, key, value)
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

    def apply_ops(self, ops: Iterable[tuple[bool, bytes, Any]], serial: int) -> None:
        """Writes (delete?, key, value) in order and the serial of the last, atomically."""
        self.commit()
        conn = self._conn
        conn.execute("BEGIN")
        try:
            # Runs of puts go to SQLite in one call each (the common case: a whole batch).
            for delete, run in groupby(ops, key=itemgetter(0)):
                if delete:
                    self._delete_many(conn, (key for _, key, _ in run))
                else:
                    self._put_many(conn, ((key, value) for _, key, value in run))
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

    # -- ranges of the ring --------------------------------------------------------------------

    def range_page(self, start: int, end: int, cursor: Any, limit: int, values: bool = True,
                   max_bytes: int | None = None) -> tuple[list[tuple[bytes, bytes | None]], Any]:
        """The next page of the pairs (key, value) of the ring range (start, end] (the whole
        ring if start == end), and the cursor to pass for the page after it (None: there is
        none). C{cursor} is None for the first page. At most C{limit} rows are read, so a page
        may hold fewer pairs (even none: rows at the range's two ends whose positions fall
        outside it) while there are more; with C{max_bytes}, the page ends once its keys and
        values hold that many bytes. With C{values} false the values are None.

        Only the range's rows are read, in ring order (they are a run of the table); the
        cursor is (the span's place, the last (home, key) read), so keys deleted behind it (a
        drop deleting what it reads) do not disturb it, and a key written meanwhile behind it
        is not seen.
        """
        rows, cursor, _ = self._page(self._conn, "", self._spill, start, end, cursor, limit,
                                     max_bytes, values)
        return [(key, bytes(value) if values else None) for _, key, value in rows], cursor

    def _page(self, conn: sqlite3.Connection, schema: str, spill: bool, start: int, end: int,
              cursor: Any, limit: int, max_bytes: int | None, values: bool,
              ) -> tuple[list[tuple[int, bytes, Any]], Any, bool]:
        """The rows (home, key, value or its length) of the next page of the ring range (start,
        end] of C{schema}'s tables, the cursor after it, and whether every row of kv with a
        home from the first row's to the last's is in the page (none left out at an end of
        the range): then kv's part of the page is those homes."""
        spans = _spans(start, end)
        place, last = cursor if cursor is not None else (0, None)
        found: list[tuple[int, bytes, Any]] = []
        whole = True
        left = limit
        while place < len(spans):
            low, high, above, upto = spans[place]
            rows = self._rows(conn, schema, low, high, last, left, values, spill)
            for row in rows:
                last = row[:2]
                at, key, value = row
                if (above is not None and at == low) or (upto is not None and at == high):
                    pos = _position(key)
                    if (above is not None and pos <= above) or (upto is not None and pos > upto):
                        whole = False
                        continue
                found.append(row)
                if max_bytes is not None:
                    max_bytes -= len(key) + (len(value) if values else value)
                    if max_bytes <= 0:
                        return found, (place, last), whole
            left -= len(rows)
            if left <= 0:
                return found, (place, last), whole
            place, last = place + 1, None
            if found and place < len(spans):
                # A page stays inside one span, so that its rows are one run of homes.
                return found, (place, None), whole
        return found, None, whole

    def move_page(self, source: SQLiteDBM, start: int, end: int, cursor: Any, limit: int,
                  max_bytes: int | None = None) -> tuple[int, Any]:
        """Copy the next page of C{source}'s ring range (start, end] into this file, in one
        transaction (a key here already is overwritten); (pairs copied, cursor), the page and
        the cursor as L{range_page}'s. Done inside SQLite (C{source} attached to this
        connection, one C{INSERT ... SELECT} of the page's run of rows): values never
        become Python objects, and in the usual page (L{_move_run}) no row does. C{source}
        must be another file."""
        if source.path == self.path:
            raise ValueError("a store cannot move a range into itself")
        with self._attached(source.path, "source") as conn:
            if not (source._spill or self._spill):
                moved = self._move_run(conn, start, end, cursor, limit, max_bytes)
                if moved is not None:
                    return moved
            rows, cursor, whole = self._page(conn, "source.", source._spill, start, end,
                                             cursor, limit, max_bytes, False)
            with self._transaction(conn):
                self._copy_rows(conn, rows, whole and not source._spill)
        return len(rows), cursor

    @contextmanager
    def _attached(self, path: str, name: str) -> Iterator[sqlite3.Connection]:
        """This file's connection, with C{path} attached as C{name} for one page's work (the
        group transaction committed first): nothing stays attached between reactor turns,
        when the group transaction (apply_one) may be open on the connection."""
        self.commit()
        conn = self._conn
        conn.execute(f"ATTACH DATABASE ? AS {name}", (path,))
        try:
            yield conn
        finally:
            if not conn.in_transaction:
                conn.execute(f"DETACH DATABASE {name}")

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One transaction around the block: committed, or rolled back if it raises."""
        conn.execute("BEGIN")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _move_run(self, conn: sqlite3.Connection, start: int, end: int, cursor: Any,
                  limit: int, max_bytes: int | None) -> tuple[int, Any] | None:
        """L{move_page}'s page without reading its rows into Python, when it can be (None
        when it cannot: the caller reads them): when L{_run} finds the page, and when each
        row lands at its home here (a key here at a copied key's home goes pair by pair)."""
        found = _run(conn, "source.", start, end, cursor, limit, max_bytes)
        if found is None or not found[2]:
            return None if found is None else (0, found[4])
        first, until, count, _, after = found
        conn.execute("BEGIN")
        try:
            copied = conn.execute(_COPY_RUN, (first, until)).rowcount
            if copied != count:
                self._rollback()
                return None
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return count, after

    def _copy_rows(self, conn: sqlite3.Connection, rows: list[tuple[int, bytes, Any]],
                   run: bool) -> None:
        """Write the pairs of C{rows}, read from the attached source; C{run}: they are all of
        the source's kv rows from the first one's home to the last one's, and nothing else."""
        if not rows:
            return
        if run and not self._spill:
            copied = conn.execute(_COPY_RUN, (rows[0][0], rows[-1][0])).rowcount
            if copied == len(rows):
                return
        # A page with spilled rows or rows left out, or a key here at a copied key's home:
        # the pairs one at a time, as read (a spilled source key is read from its spill).
        for at, key, _ in rows:
            row = conn.execute("SELECT v FROM source.kv WHERE p = ? AND k = ?",
                               (at, key)).fetchone() or conn.execute(
                "SELECT v FROM source.kv_spill WHERE k = ?", (key,)).fetchone()
            if row is not None:
                self._put(conn, key, row[0], at)

    # -- a range copy's batches, as database images ---------------------------------------------

    def export_page(self, start: int, end: int, cursor: Any, limit: int,
                    max_bytes: int | None = None) -> tuple[bytes | None, int, int, Any] | None:
        """The next page of the ring range (start, end] (at most C{limit} rows, as
        L{range_page} reads it, or fewer: a run under C{max_bytes}) as a database image
        (L{IMAGE_TABLE}, rows with their homes): (image, rows, bytes of their keys and values,
        cursor after it), the image None and the rows 0 when nothing is left. Made inside
        SQLite, no row read into Python. None when the page must be read with L{range_page}
        instead (spilled rows, a home at an end of the range, a single row of C{max_bytes}:
        L{_run}). An image over L{IMAGE_BYTES} is made again of half the rows. Commits the
        open group transaction first: nothing uncommitted leaves the server."""
        if self._spill:
            return None
        while True:
            with self._attached(":memory:", "outbox") as conn:
                found = _run(conn, "", start, end, cursor, limit, max_bytes, shrink=True)
                if found is None or not found[2]:
                    return None if found is None else (None, 0, 0, found[4])
                first, until, count, size, after = found
                conn.execute(f"CREATE TABLE outbox.kv {_COLUMNS}")
                conn.execute("INSERT INTO outbox.kv SELECT p, k, v FROM kv "
                             "WHERE p >= ? AND p <= ?", (first, until))
                image = conn.serialize(name="outbox")
            if len(image) <= IMAGE_BYTES or count == 1:
                return image, count, size, after
            limit = count // 2

    def import_image(self, image: bytes) -> int:
        """Write the pairs of a database image made by L{export_page} (another server's, so
        checked first: L{ValueError} if it is not such an image, with nothing written), in
        one transaction, a key here already overwritten; how many. Inside SQLite, values
        never read into Python, unless this file has spilled rows or a key here is at a
        copied key's home: then pair by pair."""
        with self._attached(":memory:", "incoming") as conn:
            count = _check_image(conn, "incoming", image)
            with self._transaction(conn):
                if self._spill or conn.execute(_COPY_IMAGE).rowcount != count:
                    # Spilled rows here, or a key here at a copied key's home: pair by pair.
                    conn.execute("ROLLBACK")
                    conn.execute("BEGIN")
                    for at, key, value in conn.execute(
                            "SELECT p, k, v FROM incoming.kv").fetchall():
                        self._put(conn, key, value, at)
        return count

    def drop_page(self, start: int, end: int, cursor: Any, limit: int) -> tuple[int, Any]:
        """Delete the next page (as L{range_page} reads it, values unread) of the ring range
        (start, end], in one transaction; (keys deleted, cursor of the next page or None).
        The page's run of rows goes in one C{DELETE}."""
        self.commit()
        conn = self._conn
        rows, cursor, whole = self._page(conn, "", self._spill, start, end, cursor, limit,
                                         None, False)
        conn.execute("BEGIN")
        try:
            if rows and whole and not self._spill:
                deleted = conn.execute("DELETE FROM kv WHERE p >= ? AND p <= ?",
                                       (rows[0][0], rows[-1][0])).rowcount
                if deleted:
                    conn.execute(_UNCOUNT, (deleted,))
            else:
                deleted = self._delete_many(conn, (key for _, key, _ in rows))
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return deleted, cursor

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


def _spans(start: int, end: int) -> list[tuple[int, int, int | None, int | None]]:
    """The runs of homes of the ring range (start, end] in ring order, each with the bounds
    the positions of its keys at its two ends must pass: (lowest home, highest home, above
    this or None, at most this or None)."""
    if start == end:
        return [(_LOWEST, _HIGHEST, None, None)]
    low, high = _home_of(start >> 64), _home_of(end >> 64)
    if start < end:
        return [(low, high, start, end)]
    return [(low, _HIGHEST, start, None), (_LOWEST, high, None, end)]


def _run(conn: sqlite3.Connection, schema: str, start: int, end: int, cursor: Any, limit: int,
         max_bytes: int | None, shrink: bool = False) -> tuple[int, int, int, int, Any] | None:
    """The next page of the ring range (start, end] of C{schema}'s kv, as L{SQLiteDBM._page}
    would read it, found without reading its rows: (first home, last home, rows, bytes of
    their keys and values, cursor after it), rows 0 when nothing is left. None when it cannot
    be found so, and the caller must read the page row by row: when the page holds a home at
    an end of the range (there the keys' exact positions decide, see L{SQLiteDBM._page}), or
    when it reaches C{max_bytes} (the rows decide where it ends) unless C{shrink}: then the
    page is the longest run of at most C{limit} rows found, halving, to hold fewer bytes (a
    prefix of L{SQLiteDBM._page}'s). The caller makes sure no spilled row may be in the range:
    then homes are unique, and a page is the run of homes from after the cursor's to its
    C{limit}-th."""
    spans = _spans(start, end)
    place, last = cursor if cursor is not None else (0, None)
    while True:
        # As _page: a span with nothing left after the cursor is passed in the same call.
        if place >= len(spans):
            return 0, 0, 0, 0, None
        low, high, above, upto = spans[place]
        first = low if last is None else last[0] + 1
        if above is not None and first <= low:
            return None
        while True:
            row = conn.execute(f"SELECT p FROM {schema}kv WHERE p >= ? AND p <= ? ORDER BY p "
                               "LIMIT 1 OFFSET ?", (first, high, limit - 1)).fetchone()
            until = high if row is None else row[0]
            if upto is not None and until >= high:
                return None
            count, size = conn.execute(
                f"SELECT count(*), total(length(k) + length(v)) FROM {schema}kv "
                "WHERE p >= ? AND p <= ?", (first, until)).fetchone()
            if not count or max_bytes is None or size < max_bytes:
                break
            if not shrink or limit == 1:
                return None
            # (at least halved: a few queries even for rows of very uneven sizes)
            limit = max(1, limit * max_bytes // (2 * int(size)))
        if count:
            break
        place, last = place + 1, None
    if row is None:
        after = (place + 1, None) if place + 1 < len(spans) else None
    else:
        key = conn.execute(f"SELECT k FROM {schema}kv WHERE p = ?", (until,)).fetchone()[0]
        after = (place, (until, bytes(key)))
    return first, until, count, int(size), after


def _check_image(conn: sqlite3.Connection, schema: str, image: bytes) -> int:
    """Load C{image} into C{schema} (an attached in-memory database of C{conn}) and check that
    it is what L{SQLiteDBM.export_page} makes: one table, L{IMAGE_TABLE}, sound pages, keys and
    values that are blobs, each key at its home; its rows. It comes from another server, and
    a mistake here would leave keys that no get finds: L{ValueError} if anything is wrong
    (SQLite's own errors included, so that a bad image is never taken for a failure of this
    server's storage)."""
    # (SQLite cannot load fewer bytes than its smallest page; an empty image is a MemoryError)
    if len(image) < 512:
        raise ValueError(f"a copy batch of {len(image)} bytes is not a database image")
    try:
        conn.deserialize(image, name=schema)
        tables = conn.execute(f"SELECT type, name, tbl_name, sql FROM {schema}.sqlite_schema"
                              ).fetchall()
        if tables != [("table", "kv", "kv", IMAGE_TABLE)]:
            names = ", ".join(f"{kind} {name}" for kind, name, _, _ in tables[:4])
            raise ValueError(f"a copy batch's image holds {names or 'nothing'}, not just a "
                             "table kv of a copy's columns")
        problems = [row[0] for row in conn.execute(f"PRAGMA {schema}.quick_check")]
        if problems != ["ok"]:
            raise ValueError(f"a copy batch's image is damaged: {'; '.join(problems[:3])}")
        count = 0
        for at, key, blob in conn.execute(f"SELECT p, k, typeof(v) = 'blob' FROM {schema}.kv"):
            if type(key) is not bytes or not blob or home(key) != at:
                raise ValueError(f"a copy batch's image has a row at {at} that is not a "
                                 "key and a value at the key's home")
            count += 1
    except sqlite3.Error as e:
        raise ValueError(f"a copy batch's image does not read: {e}") from None
    return count


def image_pairs(image: bytes) -> list[tuple[bytes, bytes]]:
    """The pairs of a copy batch's image (L{SQLiteDBM.export_page}), checked as
    L{SQLiteDBM.import_image} checks it: for a backend that cannot take the image itself."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.execute("ATTACH DATABASE ':memory:' AS incoming")
        _check_image(conn, "incoming", image)
        return conn.execute("SELECT k, v FROM incoming.kv").fetchall()
    finally:
        conn.close()


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
