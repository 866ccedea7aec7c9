"""Ranges of the ring read from a store without reading the rest of it (issue 10, part 5).

The SQLite store keeps each row under its key's home (the top 64 bits of its ring position) as
its rowid, so the table is in ring order; a range copy, move or drop reads only that range's run
of rows, a page at a time with the reactor running between pages; the key count is one row kept
in the same transactions; files of the layouts before (keyed by the key) are moved into this one
when they are opened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from chainstore import migration
from chainstore.control import unpack_items
from chainstore.ring import KeyRange, position
from chainstore.storage import StoreSet, sqlitedbm
from chainstore.storage.backend import DumbDBM
from chainstore.storage.sqlitedbm import image_pairs
from test_migration import run as run_until

HALF = 1 << 127
TOP = (1 << 128) - 1


def keys(n: int, prefix: str = "k") -> list[bytes]:
    return [f"{prefix}{i:05d}".encode() for i in range(n)]


def walk(db: Any, rng: KeyRange, limit: int, values: bool = True,
         max_bytes: int | None = None) -> list[list[tuple[bytes, bytes | None]]]:
    pages = []
    cursor = None
    while True:
        page, cursor = db.range_page(rng.start, rng.end, cursor, limit, values, max_bytes)
        pages.append(page)
        if cursor is None:
            return pages


def keys_of(pages: list[list[tuple[bytes, bytes | None]]]) -> list[bytes]:
    return [k for page in pages for k, _ in page]


def run(d: Deferred[Any], clock: Clock) -> Any:
    """Run the reactor turns of C{clock} until C{d} fires; its result."""
    return run_until(d, lambda: clock.advance(0))


@pytest.fixture
def db(tmp_path):
    with sqlitedbm.open(tmp_path / "s.sqlite") as d:
        yield d


@pytest.fixture
def stores(tmp_path):
    s = StoreSet.open(str(tmp_path / "stores"))
    yield s
    s.close()


@contextmanager
def coarse_homes(bits: int = 3) -> Iterator[None]:
    """Homes of C{bits} bits instead of 64: most keys share theirs with others, the case of
    two keys whose positions share their top 64 bits (the spill's)."""
    real = sqlitedbm._home_of
    drop = 64 - bits
    sqlitedbm._home_of = lambda top: ((top >> drop) << drop) - sqlitedbm._HOME_BIAS
    try:
        yield
    finally:
        sqlitedbm._home_of = real


def homes(coarse: bool) -> Any:
    return coarse_homes() if coarse else nullcontext()


# -- pages of a range --------------------------------------------------------------------------

# A few keys of any bytes, and up to 200 more, so that pages are many and a range that wraps past
# zero has rows at both ends of the ring.
key_sets = st.builds(lambda few, more: few | set(keys(more)),
                     st.sets(st.binary(min_size=1, max_size=8), max_size=40), st.integers(0, 200))

# Any two positions; a range that wraps past zero with keys at both ends; two close together
# (both in one home or in neighbouring ones, or one just past the other: almost the whole ring,
# one home at both ends).
ranges = st.one_of(
    st.tuples(st.integers(0, TOP), st.integers(0, TOP)).map(lambda t: KeyRange(*t)),
    st.tuples(st.integers(HALF, TOP), st.integers(1 << 120, HALF)).map(lambda t: KeyRange(*t)),
    st.tuples(st.integers(0, TOP), st.sampled_from([1 << 121, 1 << 66, 1 << 62])).flatmap(
        lambda t: st.integers(-t[1], t[1]).map(
            lambda d: KeyRange(t[0], (t[0] + d) % (TOP + 1)))))


@settings(max_examples=60, deadline=None)
@given(key_sets, ranges,
       st.integers(1, 30), st.sampled_from([None, 1, 40, 400]), st.booleans(), st.booleans())
def test_range_pages_hold_the_range_once_each_on_both_backends(
        tmp_path_factory, present, rng, limit, max_bytes, values, coarse):
    with homes(coarse):
        range_pages_hold_the_range_once_each(tmp_path_factory, present, rng, limit,
                                             max_bytes, values)


def range_pages_hold_the_range_once_each(tmp_path_factory, present, rng, limit, max_bytes,
                                         values):
    where = tmp_path_factory.mktemp("pages")
    sqlite = sqlitedbm.open(where / "s.sqlite")
    dumb = DumbDBM(str(where / "d"))
    try:
        items = {k: k * 3 for k in present}
        for backend in (sqlite, dumb):
            backend.update_many(list(items.items()))
            pages = walk(backend, rng, limit, values, max_bytes)
            found = keys_of(pages)
            assert sorted(found) == sorted(k for k in items if position(k) in rng)
            assert len(found) == len(set(found))
            for page in pages:
                assert len(page) <= limit
                for key, value in page:
                    assert value == (items[key] if values else None)
                if max_bytes is not None:
                    # the page ends at the first pair that reaches the byte bound
                    assert sum(len(k) + len(v or b"") for k, v in page[:-1]) < max_bytes
        # Deleting what a page returned does not disturb the next (a drop does that).
        doomed = [k for k in items if position(k) in rng]
        cursor, seen = None, []
        while True:
            page, cursor = sqlite.range_page(rng.start, rng.end, cursor, limit, False)
            seen.extend(k for k, _ in page)
            sqlite.update_many([], [k for k, _ in page])
            if cursor is None:
                break
        assert sorted(seen) == sorted(doomed) and len(sqlite) == len(items) - len(doomed)
    finally:
        sqlite.close()
        dumb.close()


@settings(max_examples=40, deadline=None)
@given(key_sets, ranges,
       st.integers(1, 30), st.sampled_from([None, 1, 40, 400]), st.booleans())
def test_a_page_moved_between_files_is_the_page_read_on_both_backends(
        tmp_path_factory, present, rng, limit, max_bytes, coarse):
    with homes(coarse):
        a_page_moved_is_the_page_read(tmp_path_factory, present, rng, limit, max_bytes)


def source_and_target(where: Any, present: set[bytes]) -> Iterator[tuple[Any, Any, Any]]:
    """For each backend in turn: a source holding C{present} (each key's value the key three
    times), a target holding three of them with other values and a key of its own, and a
    check, given the range copied, that the target holds the source's pairs in it and its
    own others."""
    items = {k: k * 3 for k in present}
    for make in (lambda name: sqlitedbm.open(where / f"{name}.sqlite"),
                 lambda name: DumbDBM(str(where / name))):
        source, target = make("source"), make("target")
        try:
            source.update_many(list(items.items()))
            # a key the target holds already is overwritten; one outside the range stays
            target.update_many([(k, b"old") for k in list(items)[:3]] + [(b"\xff" * 9, b"x")])
            before = {k: target.get(k) for k in [*items, b"\xff" * 9]}

            def copied(rng: KeyRange) -> None:
                in_range = {k for k in items if position(k) in rng}
                for key, old in before.items():
                    assert target.get(key) == (items[key] if key in in_range else old)
                assert len(target) == len({k for k, v in before.items() if v is not None}
                                          | in_range)

            yield source, target, copied
        finally:
            source.close()
            target.close()


def a_page_moved_is_the_page_read(tmp_path_factory, present, rng, limit, max_bytes):
    where = tmp_path_factory.mktemp("moves")
    for source, target, copied in source_and_target(where, present):
        read, moved, cursor = [], [], None
        while True:
            page, _ = source.range_page(rng.start, rng.end, cursor, limit, True, max_bytes)
            count, cursor = target.move_page(source, rng.start, rng.end, cursor, limit,
                                             max_bytes)
            read.append(sorted(k for k, _ in page))
            moved.append(count)
            if cursor is None:
                break
        # page for page what range_page reads (and the same cursors)
        assert moved == [len(page) for page in read]
        assert sorted(k for page in read for k in page) == \
            sorted(k for k in present if position(k) in rng)
        copied(rng)


@settings(max_examples=40, deadline=None)
@given(key_sets, ranges, st.integers(1, 30),
       st.booleans())
def test_a_dropped_page_is_the_page_read_on_both_backends(tmp_path_factory, present, rng, limit,
                                                          coarse):
    with homes(coarse):
        a_dropped_page_is_the_page_read(tmp_path_factory, present, rng, limit)


def a_dropped_page_is_the_page_read(tmp_path_factory, present, rng, limit):
    where = tmp_path_factory.mktemp("drops")
    items = {k: k * 3 for k in present}
    for db in (sqlitedbm.open(where / "s.sqlite"), DumbDBM(str(where / "d"))):
        try:
            db.update_many(list(items.items()))
            cursor, dropped = None, []
            while True:
                page, _ = db.range_page(rng.start, rng.end, cursor, limit, False)
                deleted, cursor = db.drop_page(rng.start, rng.end, cursor, limit)
                assert deleted == len(page) and all(db.get(k) is None for k, _ in page)
                dropped.extend(k for k, _ in page)
                if cursor is None:
                    break
            assert sorted(dropped) == sorted(k for k in items if position(k) in rng)
            assert {k: db.get(k) for k in items} == \
                {k: None if k in dropped else v for k, v in items.items()}
            assert len(db) == len(items) - len(dropped) == sum(1 for _ in db)
        finally:
            db.close()


def test_a_page_is_dropped_as_one_run_of_rows(db):
    db.update_many([(k, b"v") for k in keys(600)])
    statements: list[str] = []
    db._conn.set_trace_callback(statements.append)
    deleted, cursor = db.drop_page(5, 5, None, 256)  # the whole ring: no row left out
    assert deleted == 256 and cursor is not None and len(db) == 600 - 256
    deletes = [sql for sql in statements if sql.startswith("DELETE")]
    assert len(deletes) == 1 and deletes[0].startswith("DELETE FROM kv WHERE p >= ")
    assert not [sql for sql in statements if sql.startswith("SELECT p, k, v ")]

def test_a_page_moves_inside_sqlite_and_leaves_nothing_attached(tmp_path):
    source = sqlitedbm.open(tmp_path / "source.sqlite")
    target = sqlitedbm.open(tmp_path / "target.sqlite")
    try:
        source.update_many([(k, b"v" * 50) for k in keys(600)])
        statements: list[str] = []
        target._conn.set_trace_callback(statements.append)
        copied, cursor = target.move_page(source, 0, 0, None, 256, None)
        assert copied == 256 and cursor is not None and len(target) == 256
        # one INSERT ... SELECT of the page's run of rows, no pair bound one by one
        # (the trace repeats a statement for each row its trigger fires on)
        inserts = {sql for sql in statements if sql.startswith("INSERT")}
        assert len(inserts) == 1 and "SELECT p, k, v FROM source.kv WHERE p >= " in inserts.pop()
        assert not [sql for sql in statements if sql.startswith("SELECT p, k, v ")]
        assert [r[1] for r in target._conn.execute("PRAGMA database_list")] == ["main"]
        assert dict(target.items()) == dict(source.range_page(0, 0, None, 256)[0])
        with pytest.raises(ValueError, match="into itself"):
            source.move_page(source, 0, 0, None, 256, None)
    finally:
        source.close()
        target.close()

def test_a_page_moved_leaves_out_the_keys_past_the_range_that_share_its_end_homes(tmp_path):
    # A range's end positions fall inside homes (the top 64 bits of a position): a key whose
    # home is a range's first or last home may be outside it, and only its exact position
    # says so. A page moved as a run of homes must still leave it out.
    source = sqlitedbm.open(tmp_path / "source.sqlite")
    target = sqlitedbm.open(tmp_path / "target.sqlite")
    try:
        inside = keys(300)
        below, above = keys(2, "edge")
        lo, hi = sorted((position(below), position(above)))
        below, above = sorted((below, above), key=position)
        # (lo, hi - 1]: the key at lo is just below it, the key at hi just above it.
        rng = KeyRange(lo, hi - 1)
        source.update_many([(k, b"v") for k in inside + [below, above]])
        assert sqlitedbm.home(below) == sqlitedbm._home_of(rng.start >> 64)
        assert sqlitedbm.home(above) == sqlitedbm._home_of(rng.end >> 64)
        for limit in (1, 7, 1000):
            target.update_many([], list(dict(target.items())))
            cursor = None
            while True:
                _, cursor = target.move_page(source, rng.start, rng.end, cursor, limit, None)
                if cursor is None:
                    break
            assert sorted(target.keys()) == sorted(k for k in inside if position(k) in rng)
    finally:
        source.close()
        target.close()


def test_the_whole_ring_and_the_two_halves_partition_the_keys(db):
    db.update_many([(k, b"v") for k in keys(2000)])
    whole = keys_of(walk(db, KeyRange(7, 7), 300))
    low = keys_of(walk(db, KeyRange(0, HALF), 300))
    high = keys_of(walk(db, KeyRange(HALF, 0), 300))
    assert sorted(whole) == sorted(low + high) == keys(2000)
    assert not set(low) & set(high)


def steps_of(conn: sqlite3.Connection, work: Any) -> int:
    """SQLite virtual machine steps (in hundreds) that C{work} costs on C{conn}."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        work()
    finally:
        conn.set_progress_handler(None, 0)
    return count[0]


def test_a_range_is_read_as_a_run_of_rowids_and_nothing_else(stores):
    store = stores["coordinator"]
    store.write_batch([(k, b"v" * 100) for k in keys(20_000)])
    conn = store.db._conn  # type: ignore[attr-defined]
    # About 1% of the ring, and a wrapping range of about 2%.
    narrow = KeyRange(HALF, HALF + (1 << 121))
    wrapping = KeyRange(TOP - (1 << 121), 1 << 121)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        for rng in (narrow, wrapping):
            for values in (True, False):
                _, cursor = store.range_page(rng, None, 10, values)
                store.range_page(rng, cursor, 10, values)
    finally:
        conn.set_trace_callback(None)
    plans = [" ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
             for sql in statements if sql.startswith("SELECT")]
    assert plans and all("USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan
                         and "SCAN" not in plan for plan in plans), plans

    def copy_of(rng: KeyRange) -> None:
        clock = Clock()

        async def collect() -> None:
            async for _ in migration.batches(store, rng, clock):
                pass

        run(Deferred.fromCoroutine(collect()), clock)

    whole = steps_of(conn, lambda: copy_of(KeyRange(0, 0)))
    part = steps_of(conn, lambda: copy_of(narrow))
    # Reading 1% of the ring costs what it holds, not all of it.
    assert part * 20 < whole, (part, whole)


def test_a_drop_costs_what_its_range_holds_not_the_store(stores):
    narrow = KeyRange(HALF, HALF + (1 << 122))
    expected = sum(1 for k in keys(5000) if position(k) in narrow)
    cost = {}
    for name, rng in (("coordinator", narrow), ("replica1", KeyRange(0, 0))):
        store = stores[name]
        store.write_batch([(k, b"v" * 1000) for k in keys(5000)])
        clock = Clock()
        cost[name] = steps_of(store.db._conn, lambda: run(  # type: ignore[attr-defined]
            Deferred.fromCoroutine(migration.drop_range(store, rng, clock)), clock))
    assert len(stores["coordinator"]) == 5000 - expected and len(stores["replica1"]) == 0
    # about 1.6% of the keys: the cost of reading them, not every key
    assert cost["coordinator"] * 20 < cost["replica1"], cost


# -- bounded chunks with the reactor running between them ---------------------------------------

def turns_seen(monkeypatch: Any, probe: Any) -> list[Any]:
    """What C{probe} says each time the migration code lets the reactor run."""
    seen: list[Any] = []
    real = migration.turn

    async def turn(clock: Any, rest: float = 0.0) -> None:
        seen.append(probe())
        await real(clock, rest)

    monkeypatch.setattr(migration, "turn", turn)
    return seen


@pytest.mark.parametrize("rng", [KeyRange(0, 0), KeyRange(0, HALF)])
def test_a_drop_deletes_a_bounded_chunk_per_reactor_turn(stores, monkeypatch, rng):
    monkeypatch.setattr(migration, "DROP_KEYS", 100)
    store = stores["replica1"]
    store.write_batch([(k, b"v") for k in keys(1000)])
    in_range = sum(1 for k in keys(1000) if position(k) in rng)
    left = turns_seen(monkeypatch, lambda: len(store))
    clock = Clock()
    d = Deferred.fromCoroutine(migration.drop_range(store, rng, clock))
    assert not d.called and len(store) == 1000 - 100
    assert run(d, clock) == in_range and len(store) == 1000 - in_range
    # a chunk of at most 100 keys deleted between two turns of the reactor
    steps = [a - b for a, b in zip([1000, *left], [*left, len(store)])]
    assert all(0 <= step <= 100 for step in steps) and len(left) >= in_range // 100


@pytest.mark.parametrize("exported", [True, False], ids=["as images", "row by row"])
def test_a_copy_reads_a_bounded_page_per_reactor_turn(stores, monkeypatch, exported):
    monkeypatch.setattr(migration, "PAGE_ROWS", 50)
    monkeypatch.setattr(migration, "BATCH_KEYS", 50)
    store = stores["coordinator"]
    store.write_batch([(k, b"v") for k in keys(600)])
    if not exported:
        monkeypatch.setattr(store, "export_page", lambda *args: None)
    clock = Clock()
    got: list[bytes] = []

    async def collect() -> None:
        async for batch in migration.batches(store, KeyRange(3, 3), clock):
            assert (batch.image is not None) == exported
            pairs = image_pairs(batch.image) if exported else unpack_items(batch.items)
            got.extend(k for k, _ in pairs)

    at_turns = turns_seen(monkeypatch, lambda: len(got))
    run(Deferred.fromCoroutine(collect()), clock)
    assert sorted(got) == keys(600)
    # (the whole ring: every row read is returned) at most 50 rows between two turns
    per_turn = [b - a for a, b in zip([0, *at_turns], [*at_turns, len(got)])]
    assert len(at_turns) >= 600 // 50 - 1 and max(per_turn) == 50


def test_clearing_a_store_costs_the_same_whatever_it_holds(tmp_path, monkeypatch):
    statements: dict[int, list[str]] = {}
    real_connect = sqlite3.connect
    for size in (10, 5000):
        with sqlitedbm.open(tmp_path / f"c{size}.sqlite") as db:
            db.update_many([(k, b"v" * 100) for k in keys(size)])
            db.set_chain_state("chain", 77)
            seen = statements[size] = []

            def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
                c = real_connect(*args, **kwargs)
                c.set_trace_callback(seen.append)
                return c

            monkeypatch.setattr(sqlite3, "connect", traced)
            db._conn.set_trace_callback(seen.append)
            try:
                db.clear()
            finally:
                monkeypatch.setattr(sqlite3, "connect", real_connect)
            assert len(db) == 0 and list(db) == [] and db.chain_state() == ("chain", 77)
            db[b"after"] = b"1"
        with sqlitedbm.open(tmp_path / f"c{size}.sqlite", "w") as again:
            assert dict(again.items()) == {b"after": b"1"}
            assert again.chain_state() == ("chain", 77)
        assert not (tmp_path / f"c{size}.sqlite.new").exists()
    # no row is deleted one by one: the same statements for 10 keys as for 5,000
    assert statements[10] == statements[5000]
    assert not any(sql.startswith("DELETE") for sql in statements[5000])


def test_request_ids_are_picked_a_chunk_per_reactor_turn(monkeypatch):
    monkeypatch.setattr(migration, "SCAN_IDS", 1000)
    remembered = [(b"r%d" % i, (0, i, k, i + 1)) for i, k in enumerate(keys(3500))]
    rng = KeyRange(0, HALF)
    turns = turns_seen(monkeypatch, lambda: None)
    clock = Clock()
    found = run(Deferred.fromCoroutine(migration.requests_in(remembered, rng, clock)), clock)
    assert len(turns) == 3
    assert found == [(rid, entry[2]) for rid, entry in remembered
                        if position(entry[2]) in rng]


# -- the key count ----------------------------------------------------------------------------

def test_len_reads_one_row_whatever_the_size_and_stays_exact(db):
    small = steps_of(db._conn, lambda: len(db))
    db.update_many([(k, b"v") for k in keys(20_000)])
    assert steps_of(db._conn, lambda: len(db)) == small
    assert len(db) == 20_000
    # every way of writing: updates do not count, inserts and deletes do
    db[b"k00001"] = b"new"
    db[b"fresh"] = b"1"
    del db[b"k00002"]
    db.update_many([(b"k00003", b"x"), (b"fresh2", b"y")], [b"k00004", b"absent"])
    db.apply_ops([(False, b"fresh3", b"1"), (False, b"k00005", b"2"), (True, b"k00006", b""),
                  (True, b"absent", b"")], 9)
    db.apply_one(False, b"fresh4", b"1", 10)
    db.apply_one(True, b"k00007", b"", 11)
    db.commit()
    # a group rolled back takes its count changes with it
    db.apply_one(False, b"never", b"1", 12)
    db.apply_one(True, b"k00008", b"", 13)
    db.abandon()
    expected = 20_000 + 1 - 1 + 1 - 1 + 1 - 1 + 1 - 1
    assert len(db) == expected == sum(1 for _ in db)


def old_file(path: Any, schema: str, pairs: list[tuple[bytes, bytes]], *more: str) -> None:
    """A store file of an older layout (keyed by the key), with chain state ('c', 41)."""
    conn = sqlite3.connect(path)
    conn.execute(schema)
    conn.execute("CREATE TABLE chain (id INTEGER PRIMARY KEY CHECK (id = 0), "
                 "chain TEXT NOT NULL, serial INTEGER NOT NULL)")
    conn.execute("INSERT INTO chain VALUES (0, 'c', 41)")
    conn.executemany(f"INSERT INTO kv (k, v) VALUES (?, ?)", pairs)
    for sql in more:
        conn.execute(sql)
    conn.commit()
    conn.close()


def test_deletes_are_counted_without_a_trigger_also_in_files_that_had_one(tmp_path):
    path = tmp_path / "old.sqlite"
    # the layout before, whose version before counted deletes by a trigger as well
    old_file(path, "CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL, b INTEGER)",
             [(k, b"v") for k in keys(100)], "CREATE INDEX kv_b ON kv (b)",
             "CREATE TABLE kv_count (id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)",
             "INSERT INTO kv_count VALUES (0, 100)",
             "CREATE TRIGGER kv_count_insert AFTER INSERT ON kv "
             "BEGIN UPDATE kv_count SET n = n + 1 WHERE id = 0; END",
             "CREATE TRIGGER kv_count_delete AFTER DELETE ON kv "
             "BEGIN UPDATE kv_count SET n = n - 1 WHERE id = 0; END")
    with sqlitedbm.open(path, "w") as db:
        triggers = {r[0] for r in db._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert triggers == {"kv_count_insert"}
        assert len(db) == 100
        del db[b"k00001"]
        db.update_many([], [b"k00002", b"k00003", b"absent"])
        assert len(db) == 97 == sum(1 for _ in db)
        with pytest.raises(KeyError):
            del db[b"k00001"]
        assert len(db) == 97

def test_files_of_older_layouts_are_upgraded_on_open_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlitedbm, "_UPGRADE_ROWS", 700)
    for schema in ("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL)",
                   "CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID",
                   "CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL, b INTEGER)"):
        path = tmp_path / f"old{len(schema)}.sqlite"
        old_file(path, schema, [(k, k) for k in keys(2500)])
        began: list[str] = []
        real_connect = sqlite3.connect

        def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            c = real_connect(*args, **kwargs)
            c.set_trace_callback(lambda sql: began.append(sql)
                                 if sql.startswith("BEGIN") else None)
            return c

        monkeypatch.setattr(sqlite3, "connect", traced)
        try:
            db = sqlitedbm.open(path, "w")
        finally:
            monkeypatch.setattr(sqlite3, "connect", real_connect)
        with db:
            # the old table put aside, the new tables made, 4 transactions of rows, the old
            # table dropped
            assert len(began) == 1 + 1 + 4 + 1
            assert len(db) == 2500 and db.chain_state() == ("c", 41)
            assert dict(db.items()) == {k: k for k in keys(2500)}
            tables = {r[0] for r in db._conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert tables == {"kv", "kv_spill", "kv_count", "chain"}
            rng = KeyRange(HALF, 1 << 120)
            assert sorted(keys_of(walk(db, rng, 100))) == \
                [k for k in keys(2500) if position(k) in rng]
            db[b"later"] = b"1"
            del db[b"k00000"]
            assert len(db) == 2500
        with sqlitedbm.open(path, "w") as again:
            assert len(again) == 2500

def test_an_upgrade_interrupted_half_way_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlitedbm, "_UPGRADE_ROWS", 300)
    path = tmp_path / "half.sqlite"
    old_file(path, "CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL, b INTEGER)",
             [(k, b"v" + k) for k in keys(1000)])
    real = sqlitedbm.SQLiteDBM._put_many
    calls = []

    def dies_at_the_third(self: Any, conn: Any, pairs: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise sqlite3.OperationalError("disk I/O error")
        real(self, conn, pairs)

    monkeypatch.setattr(sqlitedbm.SQLiteDBM, "_put_many", dies_at_the_third)
    with pytest.raises(sqlite3.OperationalError):
        sqlitedbm.open(path, "w")
    monkeypatch.setattr(sqlitedbm.SQLiteDBM, "_put_many", real)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM kv_before").fetchone()[0] == 400
    conn.close()
    with sqlitedbm.open(path, "w") as db:
        assert len(db) == 1000
        assert dict(db.items()) == {k: b"v" + k for k in keys(1000)}
        assert sorted(keys_of(walk(db, KeyRange(5, 5), 64))) == keys(1000)

def test_a_file_of_the_exact_position_index_loses_that_index(tmp_path):
    # An earlier version indexed each key's exact position (column p, index kv_p).
    path = tmp_path / "p.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL, p BLOB)")
    conn.execute("CREATE INDEX kv_p ON kv (p, k)")
    conn.executemany("INSERT INTO kv VALUES (?, ?, ?)", [(k, b"v", b"x") for k in keys(300)])
    conn.commit()
    conn.close()
    with sqlitedbm.open(path, "w") as db:
        indexes = {r[0] for r in db._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "kv_p" not in indexes and "kv_b" not in indexes
        assert sorted(keys_of(walk(db, KeyRange(0, HALF), 64))) == \
            [k for k in keys(300) if position(k) in KeyRange(0, HALF)]


# -- keys that share a home ----------------------------------------------------------------------

small_keys = st.binary(min_size=0, max_size=3)
operations = st.lists(st.one_of(
    st.tuples(st.just("put"), small_keys, st.binary(max_size=4)),
    st.tuples(st.just("delete"), small_keys),
    st.tuples(st.just("batch"), st.lists(st.tuples(small_keys, st.binary(max_size=4)),
                                         max_size=6), st.lists(small_keys, max_size=4)),
    st.tuples(st.just("ops"), st.lists(st.tuples(st.booleans(), small_keys,
                                                 st.binary(max_size=4)), max_size=6)),
    st.tuples(st.just("group"), st.lists(st.tuples(st.booleans(), small_keys,
                                                   st.binary(max_size=4)), max_size=4),
              st.booleans()),
    st.tuples(st.just("move"), ranges, st.integers(1, 7)),
    st.tuples(st.just("drop"), ranges, st.integers(1, 7)),
    st.tuples(st.just("reopen"),),
), max_size=30)


@settings(max_examples=150, deadline=None)
@given(operations, st.integers(1, 3))
def test_keys_sharing_a_home_behave_as_a_mapping(tmp_path_factory, ops, bits):
    """Every way of writing, moving and dropping, with homes so coarse that most keys share
    theirs: the two files always hold what two dicts do, in ring order by home."""
    where = tmp_path_factory.mktemp("spill")
    with coarse_homes(bits):
        dbs = [sqlitedbm.open(where / "a.sqlite"), sqlitedbm.open(where / "b.sqlite")]
        models: list[dict[bytes, bytes]] = [{}, {}]
        serial = 0
        try:
            for i, op in enumerate(ops):
                which = i % 2
                db, model = dbs[which], models[which]
                if op[0] == "put":
                    db[op[1]] = op[2]
                    model[op[1]] = op[2]
                elif op[0] == "delete":
                    if op[1] in model:
                        del db[op[1]]
                        del model[op[1]]
                    else:
                        with pytest.raises(KeyError):
                            del db[op[1]]
                elif op[0] == "batch":
                    db.update_many(op[1], op[2])
                    model.update(op[1])
                    for key in op[2]:
                        model.pop(key, None)
                elif op[0] in ("ops", "group"):
                    serial += 1
                    expected = dict(model)
                    if op[0] == "ops":
                        db.apply_ops(op[1], serial)
                    for delete, key, value in op[1]:
                        if op[0] == "group":
                            assert db.apply_one(delete, key, value, serial) == (key in expected)
                        if delete:
                            expected.pop(key, None)
                        else:
                            expected[key] = value
                    if op[0] == "ops" or op[2]:
                        db.commit()
                        models[which] = model = expected
                    else:
                        db.abandon()
                elif op[0] == "move":
                    rng, limit = op[1], op[2]
                    source = dbs[1 - which]
                    cursor = None
                    while True:
                        _, cursor = db.move_page(source, rng.start, rng.end, cursor, limit)
                        if cursor is None:
                            break
                    model.update({k: v for k, v in models[1 - which].items()
                                  if position(k) in rng})
                elif op[0] == "drop":
                    rng, limit = op[1], op[2]
                    cursor = None
                    while True:
                        _, cursor = db.drop_page(rng.start, rng.end, cursor, limit)
                        if cursor is None:
                            break
                    for key in [k for k in model if position(k) in rng]:
                        del model[key]
                else:
                    for j in (0, 1):
                        dbs[j].close()
                    dbs = [sqlitedbm.open(where / "a.sqlite"), sqlitedbm.open(where / "b.sqlite")]
                for db, model in zip(dbs, models):
                    assert dict(db.items()) == model
                    assert len(db) == len(model)
                    assert all(db.get(k) == v and k in db for k, v in model.items())
                    order = [sqlitedbm.home(k) for k in db]
                    assert order == sorted(order)
                    whole = keys_of(walk(db, KeyRange(3, 3), 4))
                    assert sorted(whole) == sorted(model)
        finally:
            for db in dbs:
                db.close()


def test_pages_of_a_range_that_wraps_past_zero_drop_and_move_all_of_it(tmp_path):
    # The range's rows are two runs of the table (the top of the ring, then its bottom): a
    # page ends where the first run does, so that each page is one run.
    source = sqlitedbm.open(tmp_path / "source.sqlite")
    target = sqlitedbm.open(tmp_path / "target.sqlite")
    try:
        all_keys = keys(600)
        source.update_many([(k, b"v") for k in all_keys])
        target.update_many([(k, b"old") for k in all_keys])
        rng = KeyRange(TOP - (1 << 126), 1 << 126)
        inside = {k for k in all_keys if position(k) in rng}
        moved = dropped = 0
        cursor = None
        while True:
            copied, cursor = target.move_page(source, rng.start, rng.end, cursor, 100)
            moved += copied
            if cursor is None:
                break
        assert moved == len(inside)
        assert {k for k, v in target.items() if v == b"v"} == inside
        while True:
            deleted, cursor = source.drop_page(rng.start, rng.end, cursor, 100)
            dropped += deleted
            if cursor is None:
                break
        assert dropped == len(inside) and set(source) == set(all_keys) - inside
    finally:
        source.close()
        target.close()


def test_an_upgrade_keeps_every_pair_when_keys_share_homes(tmp_path):
    path = tmp_path / "old.sqlite"
    pairs = [(k, b"v" + k) for k in keys(300)]
    old_file(path, "CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL, b INTEGER)", pairs)
    with coarse_homes(2), sqlitedbm.open(path, "w") as db:
        assert db._conn.execute("SELECT COUNT(*) FROM kv_spill").fetchone()[0] == 300 - 4
        assert dict(db.items()) == dict(pairs) and len(db) == 300
        assert all(db.get(k) == v and k in db for k, v in pairs)
        del db[pairs[0][0]]
        db[b"later"] = b"1"
        assert len(db) == 300 and db.get(b"later") == b"1"


# -- a copy's batches as database images -------------------------------------------------------


def image_of(rows: list[tuple[int, Any, Any]], schema: str = sqlitedbm.IMAGE_TABLE,
             *more: str) -> bytes:
    """A database image of C{schema}'s table kv holding C{rows} (home, key, value), made the
    way a hostile or broken peer might: any rows, any extra schema."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.execute(schema)
        for sql in more:
            conn.execute(sql)
        if rows:
            conn.executemany("INSERT INTO kv (p, k, v) VALUES (?, ?, ?)", rows)
        return conn.serialize()
    finally:
        conn.close()


def good_rows(pairs: list[tuple[bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
    return [(sqlitedbm.home(k), k, v) for k, v in dict(pairs).items()]


@settings(max_examples=40, deadline=None)
@given(key_sets, ranges, st.integers(1, 30), st.sampled_from([None, 1, 40, 400]), st.booleans())
def test_a_page_exported_and_imported_is_the_page_read_on_both_backends(
        tmp_path_factory, present, rng, limit, max_bytes, coarse):
    with homes(coarse):
        a_page_exported_is_the_page_read(tmp_path_factory, present, rng, limit, max_bytes)


def a_page_exported_is_the_page_read(tmp_path_factory, present, rng, limit, max_bytes):
    where = tmp_path_factory.mktemp("images")
    for source, target, copied in source_and_target(where, present):
        sent, cursor, exported = [], None, 0
        while True:
            page, after = source.range_page(rng.start, rng.end, cursor, limit, True, max_bytes)
            found = source.export_page(rng.start, rng.end, cursor, limit, max_bytes)
            if found is None:
                # (read as pairs, as migration.batches does)
                target.update_many(page)
                cursor = after
            else:
                image, count, size, cursor = found
                if count < len(page):
                    # a run of fewer rows, under the byte bound: the start of the page
                    assert max_bytes is not None and 0 < size < max_bytes
                    page = page[:count]
                else:
                    # page for page what range_page reads (and the same cursor)
                    assert cursor == after and count == len(page)
                assert size == sum(len(k) + len(v) for k, v in page)
                assert (image is None) == (count == 0)
                if image is not None:
                    assert sorted(sqlitedbm.image_pairs(image)) == sorted(page)
                    assert target.import_image(image) == count
                    exported += 1
            sent.extend(k for k, _ in page)
            if cursor is None:
                break
        assert sorted(sent) == sorted(k for k in present if position(k) in rng)
        copied(rng)
        if isinstance(source, DumbDBM):
            assert exported == 0


def test_a_page_is_exported_and_imported_inside_sqlite_and_leaves_nothing_attached(tmp_path):
    source = sqlitedbm.open(tmp_path / "source.sqlite")
    target = sqlitedbm.open(tmp_path / "target.sqlite")
    try:
        source.update_many([(k, b"v" * 50) for k in keys(600)])
        # An uncommitted write of the group transaction is committed before the page is
        # read: nothing uncommitted leaves the server.
        source.apply_one(False, b"late", b"w", 1)
        statements: list[str] = []
        source._conn.set_trace_callback(statements.append)
        image, count, size, cursor = source.export_page(0, 0, None, 256)
        assert count == 256 and cursor is not None and not source.uncommitted
        assert source.chain_state()[1] == 1
        inserts = [sql for sql in statements if sql.startswith("INSERT INTO outbox")]
        assert len(inserts) == 1 and inserts[0].startswith("INSERT INTO outbox.kv SELECT p, k, v")
        assert not [sql for sql in statements if sql.startswith("SELECT p, k, v ")]
        statements.clear()
        target._conn.set_trace_callback(statements.append)
        assert target.import_image(image) == 256
        inserts = {sql for sql in statements if sql.startswith("INSERT")}
        assert len(inserts) == 1 and "FROM incoming.kv" in inserts.pop()
        assert not [sql for sql in statements if "SELECT p, k, v" in sql and "INSERT" not in sql]
        for db in (source, target):
            assert [r[1] for r in db._conn.execute("PRAGMA database_list")] == ["main"]
        assert dict(target.items()) == dict(source.range_page(0, 0, None, 256)[0])
        assert len(target) == 256
    finally:
        source.close()
        target.close()


def export_all(path: Any, values: dict[bytes, bytes], limit: int,
               max_bytes: int) -> list[tuple[int, int]]:
    """Export every page of a store holding C{values}, the whole ring, checking each image
    holds its pairs, their bytes and no more than C{max_bytes} of them, and that the pages
    hold every pair once; (image bytes, pairs) of each."""
    db = sqlitedbm.open(path)
    try:
        db.update_many(list(values.items()))
        cursor, seen, made = None, [], []
        while True:
            image, count, size, cursor = db.export_page(0, 0, cursor, limit, max_bytes)
            pairs = sqlitedbm.image_pairs(image)
            assert len(pairs) == count and 0 < size < max_bytes
            assert size == sum(len(k) + len(v) for k, v in pairs)
            seen.extend(pairs)
            made.append((len(image), count))
            if cursor is None:
                break
        assert dict(seen) == values and len(seen) == len(values)
        return made
    finally:
        db.close()


def test_a_page_of_big_values_is_exported_as_a_shorter_run(tmp_path):
    values = {k: bytes([i % 251]) * (100 + 37 * (i % 50)) for i, k in enumerate(keys(300))}
    counts = [count for _, count in export_all(tmp_path / "s.sqlite", values, 64, 20_000)]
    assert max(counts) < 64 and len(counts) > 300 // 64


def test_an_image_past_its_byte_bound_is_made_again_of_half_the_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlitedbm, "IMAGE_BYTES", 40_000)
    values = {k: bytes([i % 251]) * 900 for i, k in enumerate(keys(300))}
    # (64 rows of 900 bytes are under the bound of keys and values, not of the image)
    made = export_all(tmp_path / "s.sqlite", values, 64, 80_000)
    assert all(size <= 40_000 for size, _ in made)
    assert max(count for _, count in made) < 64


def test_a_page_with_spilled_rows_or_an_end_home_is_not_exported(tmp_path):
    with coarse_homes(bits=6):
        db = sqlitedbm.open(tmp_path / "s.sqlite")
        try:
            db.update_many([(k, b"v") for k in keys(40)])
            assert db._spill  # 40 keys in 64 homes: some share theirs
            assert db.export_page(0, 0, None, 10) is None
        finally:
            db.close()
    db = sqlitedbm.open(tmp_path / "t.sqlite")
    try:
        db.update_many([(k, b"v") for k in keys(40)])
        rng = KeyRange(1 << 126, 1 << 127)
        # the range's first page holds its first home, where exact positions decide
        assert db.export_page(rng.start, rng.end, None, 10) is None
        # a single row holds the byte bound (a batch of rows is cut after it)
        assert db.export_page(0, 0, None, 10, max_bytes=5) is None
    finally:
        db.close()


def test_an_image_meeting_keys_at_their_homes_goes_pair_by_pair(tmp_path):
    # A key here already sits at the home of a key in the image (positions sharing their top
    # bits): the image cannot go in one statement, and every pair still lands.
    with coarse_homes(bits=4):
        db = sqlitedbm.open(tmp_path / "s.sqlite")
        try:
            ks = keys(60)
            by_home: dict[int, list[bytes]] = {}
            for k in ks:
                by_home.setdefault(sqlitedbm.home(k), []).append(k)
            mine, theirs = zip(*[pair[:2] for pair in by_home.values() if len(pair) >= 2])
            db.update_many([(k, b"here") for k in mine])
            assert not db._spill
            assert db.import_image(image_of(good_rows([(k, b"copied") for k in theirs]))) \
                == len(theirs)
            assert db._spill
            assert all(db.get(k) == b"here" for k in mine)
            assert all(db.get(k) == b"copied" for k in theirs)
            assert len(db) == len(mine) + len(theirs)
        finally:
            db.close()


HOSTILE_IMAGES = {
    "empty": lambda: b"",
    "short": lambda: b"SQLite format 3\x00" + b"\x00" * 100,
    "not a database": lambda: b"x" * 4096,
    "cut short": lambda: image_of(good_rows([(k, b"v" * 900) for k in keys(40)]))[:5000],
    "no table kv": lambda: image_of([], "CREATE TABLE other (p INTEGER PRIMARY KEY, k, v)"),
    "another schema of kv": lambda: image_of([], "CREATE TABLE kv (p INTEGER PRIMARY KEY, k, v)"),
    "a trigger beside": lambda: image_of(
        good_rows([(b"a", b"1")]), sqlitedbm.IMAGE_TABLE,
        "CREATE TRIGGER t AFTER INSERT ON kv BEGIN DELETE FROM kv; END"),
    "a view beside": lambda: image_of([], sqlitedbm.IMAGE_TABLE, "CREATE VIEW w AS SELECT 1"),
    "a key away from its home": lambda: image_of(
        [(sqlitedbm.home(b"a") + 1, b"a", b"1")]),
    "a key that is text": lambda: image_of([(sqlitedbm.home(b"a"), "a", b"1")]),
    "a value that is a number": lambda: image_of([(sqlitedbm.home(b"a"), b"a", 7)]),
    "a damaged page": lambda: damaged(image_of(good_rows([(k, b"v") for k in keys(300)]))),
}


def damaged(image: bytes) -> bytes:
    """The image with its second page's b-tree header overwritten."""
    page = int.from_bytes(image[16:18], "big")
    return image[:page] + b"\x0d\xff\xff\xff\xff\xff\xff\xff" + image[page + 8:]


@pytest.mark.parametrize("what", sorted(HOSTILE_IMAGES))
def test_an_image_that_is_not_a_copy_batch_is_refused_and_the_store_serves_on(stores, what):
    store = stores["replica1"]
    store.write_batch([(b"there", b"before")])
    with pytest.raises(ValueError, match="image|database"):
        store.import_image(HOSTILE_IMAGES[what]())
    # nothing written, and a peer's bad batch is no failure of this store
    assert store.failure is None
    assert dict(store.items()) == {b"there": b"before"}
    assert [r[1] for r in store.db._conn.execute("PRAGMA database_list")] == ["main"]
    store.write_batch([(b"after", b"1")])
    assert store.import_image(image_of(good_rows([(b"copied", b"2")]))) == 1
    assert dict(store.items()) == {b"there": b"before", b"after": b"1", b"copied": b"2"}
