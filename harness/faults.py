"""Storage faults on demand, for tests: a SQLite store whose statements fail as a full disk,
an I/O error or a corrupt page would make them fail.

L{inject} puts a L{FaultyConnection} between a store's L{SQLiteDBM} and its SQLite connection.
Armed (L{FaultyConnection.arm}), it raises SQLite's own exception for the chosen statements,
either before running them or, for ``COMMIT``, after SQLite has kept the transaction open, as a
full disk does: the writes then sit in the open transaction, visible to this connection, which
is exactly what must never be read, forwarded or committed later.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from chainstore.storage import Store
from chainstore.storage.sqlitedbm import SQLiteDBM

DISK_FULL = "database or disk is full"
IO_ERROR = "disk I/O error"
CORRUPT = "database disk image is malformed"


def writes(sql: str) -> bool:
    """Statements that change data: the ones a full disk refuses."""
    return sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE", "COMMIT")


def commits(sql: str) -> bool:
    return sql.strip().upper() == "COMMIT"


def reads(sql: str) -> bool:
    return sql.lstrip().upper().startswith("SELECT")


class FaultyConnection:
    """A sqlite3 connection that raises, once armed, for the statements C{which} selects."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.message: str | None = None
        self.which: Callable[[str], bool] = writes
        self.after = 0
        #: statements refused so far
        self.refused = 0

    def arm(self, message: str = DISK_FULL, which: Callable[[str], bool] = writes,
            after: int = 0) -> None:
        """Fail the statements C{which} selects, from the C{after}+1-th of them on."""
        self.message, self.which, self.after = message, which, after

    def disarm(self) -> None:
        self.message = None

    def _check(self, sql: str) -> None:
        if self.message is None or not self.which(sql):
            return
        if self.after > 0:
            self.after -= 1
            return
        self.refused += 1
        error = sqlite3.DatabaseError if self.message == CORRUPT else sqlite3.OperationalError
        raise error(self.message)

    def execute(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def inject(store: Store) -> FaultyConnection:
    """Put a L{FaultyConnection} (disarmed) under C{store}, an open SQLite store."""
    db = store.db
    assert isinstance(db, SQLiteDBM) and db._db is not None
    faulty = FaultyConnection(db._db)
    db._db = faulty  # type: ignore[assignment]
    return faulty
