"""The AMP protocol over an in-memory connection (twisted.test.iosim) that serialises every box
through the real wire format: every command, every declared error arriving as its class, and
values larger than AMP's 64 KiB limit per value."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient

from chainstore import protocol
from chainstore.amp_server import KVServerFactory, KVServerProtocol
from chainstore.cache import make_cache
from chainstore.errors import (
    ALL_ERRORS,
    InvalidKey,
    KeyNotFound,
    NotResponsible,
    ServerError,
    ServerStopped,
    ValueTooLarge,
    WriteLocked,
)
from chainstore.limits import MAX_VALUE_BYTES
from chainstore.node import STOPPED, KVNode
from chainstore.ring import KeyRange, NodeInfo, Ring, position
from chainstore.storage import StoreSet

ME = NodeInfo("s1", "127.0.0.1", 50001, 51001)
OTHER = NodeInfo("s2", "127.0.0.1", 50002, 51002)


class Wire:
    """A client amp.AMP connected to a KVServerProtocol, every byte going through the pump."""

    def __init__(self, node: KVNode) -> None:
        self.node = node
        # The node's own clock: a write is committed and answered at the end of its reactor
        # turn, which the pump's clock.advance(0) runs.
        self.clock = node.clock
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: KVServerFactory(node).buildProtocol(None), amp.AMP, clock=self.clock)
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self._spy(self.client.transport, self.to_server)
        self._spy(self.server.transport, self.to_client)

    @staticmethod
    def _spy(transport: Any, into: list[bytes]) -> None:
        write = transport.write

        def recording_write(data: bytes) -> None:
            into.append(bytes(data))
            write(data)

        transport.write = recording_write

    def call(self, command: type[amp.Command], **kwargs: Any) -> Any:
        """Send one command, pump until answered; return the response or the Failure."""
        results: list[Any] = []
        d: Deferred[Any] = self.client.callRemote(command, **kwargs)
        d.addBoth(results.append)  # an errback at call time: AMP must not drop the connection
        for _ in range(100):
            if results:
                break
            self.pump.pump()
        assert results, f"{command.__name__} got no answer"
        return results[0]

    def fails(self, error: type[Exception], command: type[amp.Command], **kwargs: Any) -> str:
        result = self.call(command, **kwargs)
        assert not isinstance(result, dict), f"expected {error.__name__}, got {result!r}"
        assert result.check(error), result
        assert type(result.value) is error  # the declared class itself, not a generic one
        return str(result.value)

    @property
    def connected(self) -> bool:
        return not (self.client.transport.disconnecting or self.server.transport.disconnecting)


def open_node(tmp_path, ring: Ring | None = None) -> KVNode:
    node = KVNode(ME, make_cache("FIFO", 10), Clock(), ring=ring)
    node.stores = StoreSet.open(str(tmp_path / "data"))
    return node


@pytest.fixture
def node(tmp_path):
    node = open_node(tmp_path)
    yield node
    if node.stores is not None:
        node.stores.close()


@pytest.fixture
def wire(node):
    return Wire(node)


def test_the_factory_builds_the_server_protocol(node):
    proto = KVServerFactory(node).buildProtocol(None)
    assert isinstance(proto, KVServerProtocol) and proto.node is node


def test_put_get_delete(wire):
    assert wire.call(protocol.Put, key=b"k", value=b"v") == {"updated": False}
    assert wire.call(protocol.Put, key=b"k", value=b"w") == {"updated": True}
    assert wire.call(protocol.Get, key=b"k") == {"value": b"w"}
    assert wire.call(protocol.Delete, key=b"k") == {}
    assert "k" in wire.fails(KeyNotFound, protocol.Get, key=b"k")
    wire.fails(KeyNotFound, protocol.Delete, key=b"k")
    assert dict(wire.node.stores.coordinator.items()) == {}
    assert wire.connected


def test_binary_and_empty_values(wire):
    value = bytes(range(256)) * 3
    wire.call(protocol.Put, key=b"bin", value=value)
    assert wire.call(protocol.Get, key=b"bin") == {"value": value}
    wire.call(protocol.Put, key=b"empty", value=b"")
    assert wire.call(protocol.Get, key=b"empty") == {"value": b""}


def test_keyrange_keyrange_read_metadata_and_stats(wire):
    ring = wire.node.ring
    assert wire.call(protocol.KeyRange) == {"ranges": ring.keyrange_text()}
    assert wire.call(protocol.KeyRangeRead) == {"ranges": ring.keyrange_read_text()}
    meta = wire.call(protocol.GetMetadata)
    assert meta["epoch"] == 0 and meta["replication"] == 1
    assert meta["nodes"] == [{"name": "s1", "host": "127.0.0.1", "console_port": 50001,
                              "amp_port": 51001, "position": None, "chain_epoch": None}]
    wire.call(protocol.Put, key=b"a", value=b"1")
    wire.call(protocol.Get, key=b"a")
    stats = json.loads(wire.call(protocol.Stats)["stats"])
    assert (stats["name"], stats["puts"], stats["gets"]) == ("s1", 1, 1)
    assert stats["cache_strategy"] == "FIFO" and stats["coordinator_keys"] == 1


@pytest.mark.parametrize("size", [MAX_VALUE_BYTES, amp.MAX_VALUE_LENGTH,
                                  amp.MAX_VALUE_LENGTH + 1, 1])
def test_values_larger_than_one_amp_value_round_trip(wire, size):
    value = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    assert wire.call(protocol.Put, key=b"big", value=value) == {"updated": False}
    assert wire.node.stores.coordinator.get(b"big") == value
    wire.node.cache.clear()  # the answer comes from the store, not the cache
    assert wire.call(protocol.Get, key=b"big") == {"value": value}
    # It really went over the wire in chunks of at most 64 KiB, under value, value.1, ...
    sent = b"".join(wire.to_server)
    assert (b"\x00\x07value.1" in sent) == (size > amp.MAX_VALUE_LENGTH)
    assert (b"\x00\x07value.1" in b"".join(wire.to_client)) == (size > amp.MAX_VALUE_LENGTH)


def test_plain_amp_cannot_carry_a_120000_byte_value():
    # Why BigBytes exists: AMP refuses one value over 64 KiB.
    box = amp.AmpBox(value=b"x" * MAX_VALUE_BYTES)
    with pytest.raises(amp.TooLong):
        box.serialize()


def test_bigbytes_to_box_and_back():
    arg = protocol.BigBytes()
    strings: dict[bytes, bytes] = {}
    value = b"z" * (2 * amp.MAX_VALUE_LENGTH + 5)
    arg.toBox(b"value", strings, {"value": value}, None)
    assert sorted(strings) == [b"value", b"value.1", b"value.2"]
    assert all(len(v) <= amp.MAX_VALUE_LENGTH for v in strings.values())
    objects: dict[str, Any] = {}
    arg.fromBox(b"value", dict(strings), objects, None)
    assert objects == {"value": value}
    with pytest.raises(TypeError):
        arg.toBox(b"value", {}, {"value": "text"}, None)


def test_every_error_is_declared_on_every_command():
    for command in (protocol.Put, protocol.Get, protocol.Delete, protocol.KeyRange,
                    protocol.KeyRangeRead, protocol.GetMetadata, protocol.Stats):
        for error, code in ALL_ERRORS.items():
            assert command.errors[error] == code
    assert len(set(ALL_ERRORS.values())) == len(ALL_ERRORS)  # codes are distinct


@pytest.mark.parametrize("key", [b"", b"a b", b"k" * 21, b"k\xe9", b"tab\t", b"nl\n"])
def test_invalid_keys(wire, key):
    wire.fails(InvalidKey, protocol.Put, key=key, value=b"v")
    wire.fails(InvalidKey, protocol.Get, key=key)
    wire.fails(InvalidKey, protocol.Delete, key=key)
    assert wire.call(protocol.Put, key=b"ok", value=b"v") == {"updated": False}
    assert dict(wire.node.stores.coordinator.items()) == {b"ok": b"v"}


def test_value_too_large(wire):
    wire.call(protocol.Put, key=b"k", value=b"old")
    message = wire.fails(ValueTooLarge, protocol.Put, key=b"k", value=b"x" * (MAX_VALUE_BYTES + 1))
    assert "120000" in message
    assert wire.call(protocol.Get, key=b"k") == {"value": b"old"}


def test_server_stopped(wire):
    wire.call(protocol.Put, key=b"k", value=b"v")
    wire.node.state = STOPPED
    wire.fails(ServerStopped, protocol.Put, key=b"k", value=b"w")
    wire.fails(ServerStopped, protocol.Get, key=b"k")  # cached, and still refused
    wire.fails(ServerStopped, protocol.Delete, key=b"k")
    assert wire.connected


def test_write_locked(wire):
    wire.call(protocol.Put, key=b"k", value=b"v")
    wire.node.write_locks.append(KeyRange(0, 0))
    wire.fails(WriteLocked, protocol.Put, key=b"k", value=b"w")
    wire.fails(WriteLocked, protocol.Delete, key=b"k")
    assert wire.call(protocol.Get, key=b"k") == {"value": b"v"}
    wire.node.write_locks.clear()
    assert wire.call(protocol.Put, key=b"k", value=b"w") == {"updated": True}


def test_not_responsible(tmp_path):
    ring = Ring((ME, OTHER), epoch=3, replication=1)
    node = open_node(tmp_path, ring)
    try:
        wire = Wire(node)
        theirs = next(k for k in (b"key%d" % i for i in range(1000))
                      if ring.nodes[ring.owner_index(position(k))] == OTHER)
        wire.fails(NotResponsible, protocol.Put, key=theirs, value=b"v")
        wire.fails(NotResponsible, protocol.Get, key=theirs)
        wire.fails(NotResponsible, protocol.Delete, key=theirs)
        meta = wire.call(protocol.GetMetadata)
        assert meta["epoch"] == 3
        assert [n["name"] for n in meta["nodes"]] == [n.name for n in ring.nodes]
        assert wire.connected
    finally:
        node.stores.close()


def test_the_connection_survives_a_run_of_errors(wire):
    for i in range(20):
        wire.fails(KeyNotFound, protocol.Get, key=b"none%d" % i)
        wire.fails(InvalidKey, protocol.Put, key=b"", value=b"v")
    assert wire.connected
    assert wire.call(protocol.Put, key=b"k", value=b"v") == {"updated": False}


def test_an_unexpected_failure_is_a_declared_server_error_and_the_connection_lives(node, wire):
    wire.call(protocol.Put, key=b"k", value=b"v")
    node.cache.clear()
    broken = node.stores.coordinator.db
    real_get = broken.get
    broken.get = lambda *a: (_ for _ in ()).throw(RuntimeError("a bug"))
    message = wire.fails(ServerError, protocol.Get, key=b"k")
    assert "a bug" in message
    broken.get = real_get
    assert wire.connected
    assert wire.call(protocol.Get, key=b"k") == {"value": b"v"}


def test_a_storage_error_is_a_server_error_and_the_server_stops_serving(node, wire):
    # Fail-stop (docs/DESIGN.md, "When storage fails"): the error answers the request, and
    # every later one, with the reason; the connection lives.
    wire.call(protocol.Put, key=b"k", value=b"v")
    node.cache.clear()
    node.stores.coordinator.db.get = lambda *a: (_ for _ in ()).throw(OSError("disk on fire"))
    assert "disk on fire" in wire.fails(ServerError, protocol.Get, key=b"k")
    assert wire.connected
    assert "storage failed" in wire.fails(ServerError, protocol.Put, key=b"k2", value=b"v")
    assert json.loads(wire.call(protocol.Stats)["stats"])["state"] == "failed"


def test_the_ring_on_the_wire_carries_the_positions_the_ecs_chose() -> None:
    from chainstore.ring import NodeInfo, Ring

    placed = NodeInfo("a", "127.0.0.1", 50001, 51001, token=5)
    hashed = NodeInfo("b", "127.0.0.1", 50002, 51002)
    ring = Ring((placed, hashed), epoch=3, replication=2)
    box = amp.AmpBox()
    wire = protocol.ring_to_wire(ring)
    for name, argument in protocol.RING_FIELDS:
        argument.toBox(name, box, dict(wire), None)
    back = protocol.ring_from_wire(
        {name.decode(): argument.fromStringProto(box[name], None)
         for name, argument in protocol.RING_FIELDS if name in box})
    assert [(n.name, n.token, n.position) for n in back.nodes] == \
        [(n.name, n.token, n.position) for n in ring.nodes]
    assert back.node("a").position == 5
    assert back.node("b").position == hashed.position != 5
