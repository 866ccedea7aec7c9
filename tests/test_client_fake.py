"""FakeKVStore: the in-memory stand-in behaves like KVStore, and injected failures work."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.task import Clock

from chainstore.errors import (
    InvalidKey,
    KeyNotFound,
    ServerStopped,
    ValueTooLarge,
    WriteLocked,
)
from chainstore.limits import MAX_VALUE_BYTES
from chainstore.ring import parse_keyrange
from client.errors import ClientClosed, RequestTimedOut
from client.kvstore import KVStore
from client.testing import FakeBlockingKVStore, FakeKVStore
from test_client_kvstore import FakeNetwork, drive, node_info, result_of


def outcome(d: Any) -> Any:
    """The result of a fired Deferred, or the type of its error."""
    try:
        return result_of(d)
    except Exception as e:
        return type(e)


def test_put_get_delete_semantics() -> None:
    store = FakeKVStore()
    assert result_of(store.put("a", "1")) is False
    assert result_of(store.put(b"a", "é")) is True
    assert result_of(store.get("a")) == "é".encode()
    assert store.data == {b"a": "é".encode()}
    assert result_of(store.delete("a")) is None
    assert outcome(store.get("a")) is KeyNotFound
    assert outcome(store.delete("a")) is KeyNotFound
    assert store.requests == [("put", b"a"), ("put", b"a"), ("get", b"a"), ("delete", b"a"),
                              ("get", b"a"), ("delete", b"a")]


def test_every_deferred_has_already_fired() -> None:
    store = FakeKVStore()
    for d in (store.put("a", "1"), store.get("a"), store.get("zz"), store.keyrange(),
              store.stats(), store.delete("a"), store.put("", "x")):
        assert d.called


def test_the_same_validation_errors_as_kvstore_and_no_request_recorded() -> None:
    store = FakeKVStore()
    store.fail_next(ServerStopped("queued"))
    assert outcome(store.put("k" * 21, "v")) is InvalidKey
    assert outcome(store.get("a b")) is InvalidKey
    assert outcome(store.delete("ключ")) is InvalidKey
    assert outcome(store.put("k", b"x" * (MAX_VALUE_BYTES + 1))) is ValueTooLarge
    # Rejected requests never reached the "server": the queued failure is still there...
    assert store.requests == []
    assert store.pending_failures == 1
    # ...for the first valid one.
    assert outcome(store.put("k", b"x" * MAX_VALUE_BYTES)) is ServerStopped
    assert result_of(store.put("k", b"x" * MAX_VALUE_BYTES)) is False


def test_fail_next_fails_exactly_the_next_request() -> None:
    store = FakeKVStore()
    store.fail_next(ServerStopped("maintenance"))
    assert outcome(store.get("a")) is ServerStopped
    assert result_of(store.put("a", "1")) is False
    assert result_of(store.get("a")) == b"1"


def test_fail_next_for_one_method_and_several_times() -> None:
    store = FakeKVStore()
    store.fail_next(WriteLocked("moving"), method="put", times=2)
    assert outcome(store.put("a", "1")) is WriteLocked
    assert outcome(store.get("a")) is KeyNotFound  # gets are not affected
    assert outcome(store.put("a", "1")) is WriteLocked
    assert result_of(store.put("a", "1")) is False
    assert store.data == {b"a": b"1"}
    with pytest.raises(ValueError):
        store.fail_next(WriteLocked(), method="putt")


def test_a_failed_put_stores_nothing() -> None:
    store = FakeKVStore()
    store.fail_next(RequestTimedOut("no answer"), method="put")
    assert outcome(store.put("a", "1")) is RequestTimedOut
    assert store.data == {}


def test_users_can_test_their_retry_loop_with_it() -> None:
    """The kind of test the fake is for: user code that retries a stopped server once."""

    def save_with_one_retry(store: FakeKVStore, key: str, value: str) -> Any:
        return store.put(key, value).addErrback(
            lambda f: f.trap(ServerStopped) and store.put(key, value))

    store = FakeKVStore()
    store.fail_next(ServerStopped("down"), method="put")
    assert result_of(save_with_one_retry(store, "a", "1")) is False
    store.fail_next(ServerStopped("down"), method="put", times=2)
    assert outcome(save_with_one_retry(store, "b", "2")) is ServerStopped


def test_keyrange_and_stats_describe_one_server_owning_the_ring() -> None:
    store = FakeKVStore(host="10.0.0.1", console_port=5000, amp_port=5001)
    (key_range, host, port), = parse_keyrange(result_of(store.keyrange()))
    assert (host, port) == ("10.0.0.1", 5000)
    assert key_range.contains_key(b"anything")
    assert parse_keyrange(result_of(store.keyrange_read())) == [(key_range, host, port)]
    result_of(store.put("a", "1"))
    stats = result_of(store.stats())
    assert stats["puts"] == 1 and stats["coordinator_keys"] == 1
    assert result_of(store.refresh_metadata()).nodes[0].amp_port == 5001


def test_closed_store_refuses_requests() -> None:
    store = FakeKVStore()
    result_of(store.close())
    assert outcome(store.get("a")) is ClientClosed


def test_blocking_fake_returns_values_and_raises_errors() -> None:
    with FakeBlockingKVStore() as store:
        assert store.put("a", "1") is False
        assert store.get("a") == b"1"
        store.delete("a")
        with pytest.raises(KeyNotFound):
            store.get("a")
        store.fake.fail_next(ServerStopped("down"))
        with pytest.raises(ServerStopped):
            store.put("a", "1")
    assert store.fake.closed


def test_the_fake_answers_like_the_real_client(tmp_path: Any) -> None:
    """One random script of requests, run on FakeKVStore and on KVStore over AMP: same answers."""
    net = FakeNetwork(Clock(), tmp_path)
    info = node_info(0)
    net.add_node(info)
    real = KVStore(net.clock, [(info.host, info.amp_port)], endpoint_factory=net.endpoint)
    fake = FakeKVStore()
    rng = random.Random(11)
    keys = ["a", "b", b"c", "k" * 20, "k" * 21, "sp ace"]
    try:
        for _ in range(200):
            op, key = rng.choice(["put", "get", "delete"]), rng.choice(keys)
            args: tuple[Any, ...] = (key,)
            if op == "put":
                args += (rng.choice(["v", b"w" * rng.choice([1, 70_000, MAX_VALUE_BYTES + 1])]),)
            expected = outcome(getattr(fake, op)(*args))
            d = getattr(real, op)(*args)
            try:
                got = drive(net, d)
            except Exception as e:
                got = type(e)
            assert got == expected, (op, key)
    finally:
        net.close()
