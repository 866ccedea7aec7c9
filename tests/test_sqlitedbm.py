"""The SQLite dbm backend keeps the dbm interface: a mapping of bytes to bytes, in ring order."""

from __future__ import annotations

import sqlite3

import pytest

from chainstore.storage import sqlitedbm
from chainstore.storage.backend import ring_order
from chainstore.storage.sqlitedbm import DURABILITY, SQLiteDBM


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store.sqlite"


@pytest.fixture
def db(path):
    d = sqlitedbm.open(path, "c")
    yield d
    d.close()


def test_get_set_del_contains_len(db):
    assert len(db) == 0
    assert b"k" not in db
    assert db.get(b"k") is None
    assert db.get(b"k", b"default") == b"default"
    with pytest.raises(KeyError):
        db[b"k"]
    db[b"k"] = b"v1"
    assert db[b"k"] == b"v1"
    assert b"k" in db
    assert len(db) == 1
    db[b"k"] = b"v2"
    assert db[b"k"] == b"v2"
    assert db.get(b"k") == b"v2"
    assert len(db) == 1
    db[b"j"] = b"w"
    assert len(db) == 2
    del db[b"k"]
    assert b"k" not in db
    assert len(db) == 1
    with pytest.raises(KeyError):
        del db[b"k"]
    assert db[b"j"] == b"w"


def test_values_are_bytes_not_memoryviews(db):
    db[b"k"] = b"v"
    assert type(db[b"k"]) is bytes
    assert type(db.get(b"k")) is bytes
    assert all(type(k) is bytes and type(v) is bytes for k, v in db.items())
    assert all(type(k) is bytes for k in db)


def test_str_keys_and_values_are_utf8_bytes_as_in_dbm(db):
    db["clé"] = "välue"
    assert db["clé".encode()] == "välue".encode()
    assert "clé" in db
    assert "clé".encode() in db
    assert list(db) == ["clé".encode()]
    assert 42 not in db
    del db["clé"]
    assert len(db) == 0


def test_iteration_is_in_ring_order(db):
    keys = [b"b", b"a", b"\xff", b"\x00", b"ab", b"A", b"aa", b"\x7f", b"~", b"0", b""]
    for k in keys:
        db[k] = k + b"!"
    in_order = sorted(keys, key=ring_order)
    assert in_order != sorted(keys)
    assert list(db) == in_order
    assert db.keys() == in_order
    assert list(db.items()) == [(k, k + b"!") for k in in_order]


def test_iteration_pages_across_more_than_one_page(db):
    n = 3 * sqlitedbm._PAGE + 17
    keys = sorted((b"key%06d" % i for i in range(n)), key=ring_order)
    # Written out of order, so the order must come from the store.
    db.update_many([(k, k[::-1]) for k in sorted(keys)])
    assert len(db) == n
    assert list(db) == keys
    items = list(db.items())
    assert items == [(k, k[::-1]) for k in keys]


def test_iteration_of_exactly_one_page(db):
    keys = sorted((b"k%05d" % i for i in range(sqlitedbm._PAGE)), key=ring_order)
    db.update_many([(k, b"v") for k in keys])
    assert list(db) == keys


def test_items_after(db):
    n = 2 * sqlitedbm._PAGE + 10
    keys = sorted((b"k%05d" % i for i in range(n)), key=ring_order)
    db.update_many([(k, b"v" + k) for k in keys])
    assert [k for k, _ in db.items(after=keys[0])] == keys[1:]
    assert [k for k, _ in db.items(after=keys[600])] == keys[601:]
    # A bound that is not a key: the keys after it in ring order follow.
    bound = b"k00599x"
    assert [k for k, _ in db.items(after=bound)] == \
        [k for k in keys if ring_order(k) > ring_order(bound)]
    assert list(db.items(after=keys[-1])) == []


def test_items_sees_writes_between_pages(db):
    page = sqlitedbm._PAGE
    keys = sorted((b"a%05d" % i for i in range(page + 5)), key=ring_order)
    db.update_many([(k, b"v") for k in keys])
    it = db.items()
    first = next(it)
    assert first == (keys[0], b"v")
    # Written while iterating: after the cursor and beyond the first page, so it must be seen.
    late = next(b"z%d" % i for i in range(1000) if ring_order(b"z%d" % i) > ring_order(keys[-1]))
    db[late] = b"late"
    rest = list(it)
    assert rest[-1] == (late, b"late")
    assert len(rest) == page + 5


def test_update_many_applies_puts_then_deletes(db):
    db[b"old"] = b"1"
    db[b"gone"] = b"2"
    db.update_many([(b"new", b"3"), (b"old", b"4")], [b"gone", b"never-there"])
    assert dict(db.items()) == {b"new": b"3", b"old": b"4"}
    # A delete of a key put in the same batch wins: deletes come after puts.
    db.update_many([(b"x", b"5")], [b"x"])
    assert b"x" not in db


def test_update_many_is_atomic_when_a_put_fails(db):
    db[b"keep"] = b"before"
    batch = [(b"a", b"1"), (b"keep", b"after"), (b"bad", None), (b"z", b"2")]
    with pytest.raises(sqlite3.IntegrityError):
        db.update_many(batch)  # type: ignore[list-item]
    assert dict(db.items()) == {b"keep": b"before"}
    # The connection is usable and not left inside a transaction.
    db.update_many([(b"a", b"1")])
    assert db[b"a"] == b"1"


def test_update_many_is_atomic_when_the_deletes_fail(db):
    db[b"keep"] = b"before"

    def deletes():
        yield b"keep"
        raise RuntimeError("the caller's iterator broke")

    with pytest.raises(RuntimeError):
        db.update_many([(b"new", b"1")], deletes())
    assert dict(db.items()) == {b"keep": b"before"}


def test_update_many_commits_durably(path):
    db = sqlitedbm.open(path)
    db.update_many([(b"k%d" % i, b"v%d" % i) for i in range(100)])
    # No close: a second connection (as after a crash) must see the committed batch.
    other = sqlite3.connect(path)
    try:
        assert other.execute("SELECT COUNT(*) FROM kv").fetchone()[0] == 100
    finally:
        other.close()
        db.close()


def test_flag_c_creates_and_keeps(path):
    with sqlitedbm.open(path, "c") as db:
        db[b"k"] = b"v"
    with sqlitedbm.open(path, "c") as db:
        assert db[b"k"] == b"v"


def test_flag_w_needs_an_existing_file(path):
    with pytest.raises(FileNotFoundError):
        sqlitedbm.open(path, "w")
    assert not path.exists()
    with sqlitedbm.open(path, "c") as db:
        db[b"k"] = b"v"
    with sqlitedbm.open(path, "w") as db:
        assert db[b"k"] == b"v"
        db[b"k2"] = b"v2"
    with sqlitedbm.open(path, "w") as db:
        assert dict(db.items()) == {b"k": b"v", b"k2": b"v2"}


def test_flag_n_empties(path):
    with sqlitedbm.open(path, "c") as db:
        db[b"k"] = b"v"
    with sqlitedbm.open(path, "n") as db:
        assert len(db) == 0
        db[b"fresh"] = b"1"
    with sqlitedbm.open(path) as db:
        assert dict(db.items()) == {b"fresh": b"1"}


@pytest.mark.parametrize("flag", ["r", "x", "", "cw"])
def test_unknown_flags_are_refused(path, flag):
    with pytest.raises(ValueError, match="flag"):
        sqlitedbm.open(path, flag)


def test_closed_db_raises_and_close_is_idempotent(path):
    db = sqlitedbm.open(path)
    db[b"k"] = b"v"
    db.close()
    db.close()
    for operation in (
        lambda: db[b"k"],
        lambda: db.get(b"k"),
        lambda: db.__setitem__(b"k", b"v"),
        lambda: db.__delitem__(b"k"),
        lambda: b"k" in db,
        lambda: len(db),
        lambda: list(db),
        lambda: db.items(),
        lambda: db.keys(),
        lambda: db.update_many([(b"a", b"b")]),
        lambda: db.sync(),
        lambda: db.clear(),
    ):
        with pytest.raises(ValueError, match="closed"):
            operation()


def test_context_manager_closes(path):
    with sqlitedbm.open(path) as db:
        db[b"k"] = b"v"
    with pytest.raises(ValueError):
        db[b"k"]


@pytest.mark.parametrize("durability,synchronous", [("crash", 1), ("power", 2)])
def test_durability_sets_wal_and_synchronous(path, durability, synchronous):
    with sqlitedbm.open(path, durability=durability) as db:
        conn = db._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # 1 is NORMAL, 2 is FULL.
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == synchronous
    assert set(DURABILITY) == {"crash", "power"}


def test_unknown_durability_is_refused(path):
    with pytest.raises(ValueError, match="durability"):
        SQLiteDBM(path, "maybe")
    with pytest.raises(ValueError, match="durability"):
        sqlitedbm.open(path, durability="none")


def test_reopen_keeps_data_and_sync_truncates_the_log(path):
    db = sqlitedbm.open(path)
    db.update_many([(b"k%03d" % i, b"v" * i) for i in range(300)])
    del db[b"k000"]
    db.sync()
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size == 0
    db.close()
    with sqlitedbm.open(path, "w") as db:
        assert len(db) == 299
        assert db[b"k299"] == b"v" * 299
        assert b"k000" not in db


def test_arbitrary_binary_values(db):
    big = bytes(range(256)) * 468 + b"\x00" * 192  # 120,000 bytes, all byte values
    assert len(big) == 120_000
    values = {
        b"big": big,
        b"nul": b"\x00",
        b"nuls": b"\x00\x00a\x00",
        b"empty": b"",
        b"crlf": b"line\r\nnext\n",
        b"latin": "é€".encode("utf-8") + b"\xff\xfe",
    }
    for k, v in values.items():
        db[k] = v
    for k, v in values.items():
        assert db[k] == v
    assert dict(db.items()) == values


def test_binary_keys_with_nul_bytes(db):
    # b"a\x00" and b"a" must be different keys (a C-string store would merge them).
    db[b"a"] = b"1"
    db[b"a\x00"] = b"2"
    db[b"a\x00b"] = b"3"
    assert len(db) == 3
    assert [db[k] for k in (b"a", b"a\x00", b"a\x00b")] == [b"1", b"2", b"3"]
    assert list(db) == [b"a", b"a\x00", b"a\x00b"]


def test_big_values_survive_reopen(path):
    big = bytes(reversed(range(256))) * 470
    with sqlitedbm.open(path) as db:
        db[b"big"] = big
        db[b"big2"] = big[:-1] + b"\x00"
    with sqlitedbm.open(path, "w") as db:
        assert db[b"big"] == big
        assert db[b"big2"] == big[:-1] + b"\x00"


def test_files_of_the_older_without_rowid_schema_still_work(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
    conn.execute("INSERT INTO kv VALUES (?, ?)", (b"old", b"1"))
    conn.commit()
    conn.close()
    with sqlitedbm.open(path, "w") as db:
        assert db[b"old"] == b"1"
        db[b"old"] = b"2"
        db.update_many([(b"new", b"3")], [b"missing"])
        assert dict(db.items()) == {b"new": b"3", b"old": b"2"}
        assert len(db) == 2
