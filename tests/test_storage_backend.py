"""The L{Backend} protocol: both backends implement it, and behave alike through it and
through the L{Store} above it (which never asks which backend it has)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainstore.storage import BACKENDS, Store
from chainstore.storage.backend import Backend, DumbDBM, ring_order
from chainstore.storage.sqlitedbm import SQLiteDBM


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    db = BACKENDS[request.param](str(tmp_path / "store"), "crash")
    yield db
    db.close()


def test_both_backends_implement_the_protocol(backend: Backend) -> None:
    assert isinstance(backend, Backend)
    assert type(backend) in (SQLiteDBM, DumbDBM)
    # Every operation of the protocol, with the same parameters.
    for name, member in inspect.getmembers(Backend):
        if name.startswith("__") and name not in ("__setitem__", "__delitem__",
                                                   "__contains__", "__len__", "__iter__"):
            continue
        if callable(member):
            expected = list(inspect.signature(member).parameters)
            assert list(inspect.signature(getattr(type(backend), name)).parameters)[
                :len(expected)] == expected, name


def test_the_store_module_asks_no_backend_its_type() -> None:
    import chainstore.storage.store as store_module
    assert "isinstance" not in inspect.getsource(store_module)


def test_mapping_operations_and_ring_order(backend: Backend) -> None:
    for key in (b"b", b"\xff", b"a", b"ab"):
        backend[key] = key + b"!"
    backend[b"a"] = b"new"
    assert backend.get(b"a") == b"new" and backend.get(b"zz") is None
    assert b"ab" in backend and b"zz" not in backend and len(backend) == 4
    in_order = sorted([b"a", b"ab", b"b", b"\xff"], key=ring_order)
    assert list(backend) == in_order
    assert list(backend.items(after=in_order[1])) == \
        [(k, b"new" if k == b"a" else k + b"!") for k in in_order[2:]]
    del backend[b"ab"]
    with pytest.raises(KeyError):
        del backend[b"ab"]
    backend.update_many([(b"c", b"3")], [b"a", b"missing"])
    assert dict(backend.items()) == {b"b": b"b!", b"c": b"3", b"\xff": b"\xff!"}
    # Deleting keys already passed while iterating is safe.
    for key in backend:
        del backend[key]
    assert len(backend) == 0


def test_chain_state_and_replicated_writes(backend: Backend) -> None:
    assert backend.chain_state() == ("", 0)
    backend.set_chain_state("chain-1", 5)
    assert backend.apply_one(False, b"k", b"v", 6) is False
    assert backend.apply_one(False, b"k", b"w", 7) is True
    backend.commit()
    assert not backend.uncommitted
    assert backend.chain_state() == ("chain-1", 7) and backend.get(b"k") == b"w"
    backend.apply_ops([(False, b"x", b"1"), (True, b"k", b""), (True, b"none", b"")], 9)
    assert dict(backend.items()) == {b"x": b"1"} and backend.chain_state() == ("chain-1", 9)
    backend.clear()
    assert len(backend) == 0 and backend.chain_state() == ("chain-1", 9)
    backend.abandon()  # nothing open: does nothing
    backend.sync()


def test_a_store_behaves_alike_on_both(backend: Backend) -> None:
    store = Store("coordinator", backend)
    first: list[str] = []
    store.held_data = False
    store.on_first_data = lambda s: first.append(s.name)
    assert store.apply_one(0, b"k", b"v", 1) is False
    store.commit()
    assert first == ["coordinator"] and not store.uncommitted
    assert store.put(b"a", b"1") is False and store.put(b"a", b"2") is True
    assert store.delete(b"k") is True and store.delete(b"k") is False
    store.write_batch([(b"b", b"3")], [b"a"])
    store.apply_ops([(2, 0, b"c", b"4", b"r")], 2)
    in_order = sorted([b"b", b"c"], key=ring_order)
    assert list(store.items()) == [(k, {b"b": b"3", b"c": b"4"}[k]) for k in in_order]
    assert list(store.keys()) == in_order and len(store) == 2
    assert store.chain_state() == ("", 2)
