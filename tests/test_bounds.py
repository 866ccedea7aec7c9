"""Bounds per connection (chainstore/bounds.py and its users): what a stranger sends, or refuses
to read, cannot grow a process's memory. Sockets are StringTransports and iosim pairs; time is
a Clock."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from chainstore import control, migration, protocol
from chainstore.amp_server import SERVER_BOX_BYTES, KVServerFactory, KVServerProtocol
from chainstore.bounds import CONTROL_BOX_BYTES, READ_AHEAD_BYTES, BoundedAMP
from chainstore.chain import BATCH_OPS, _next_batch
from chainstore.console import MAX_QUEUED_REPLY_BYTES, ConsoleFactory
from chainstore.errors import InvalidRequestId
from chainstore.limits import MAX_REQUEST_ID_BYTES, MAX_VALUE_BYTES
from chainstore.storage import sqlitedbm
from ecs.config import ECSConfig
from ecs.coordinator import ECS, MAX_EPOCH, MAX_MEMBERS
from ecs.protocol import Status
from ecs.server import ECSProtocol
from ecs.state import StateFile
from test_amp import Wire
from test_console import open_node


@pytest.fixture
def node(tmp_path):
    node = open_node(tmp_path)
    yield node
    if node.stores is not None:
        node.stores.close()


class TCPLikeTransport(StringTransport):
    """A StringTransport that, like a socket's, pauses its producer once more than 64 KiB wait
    unsent, and resumes it when the test drains what was written."""

    limit = 64 * 1024

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.io.getvalue()) > self.limit \
                and not getattr(self, "_producer_paused", False):
            self._producer_paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if getattr(self, "_producer_paused", False):
            self._producer_paused = False
            self.producer.resumeProducing()
        return data


# -- the console -----------------------------------------------------------------------------------


def console(node: Any, transport: StringTransport | None = None) -> Any:
    transport = transport or TCPLikeTransport()
    proto = ConsoleFactory(node).buildProtocol(None)
    proto.makeConnection(transport)
    transport.clear()
    return proto


def test_a_console_client_that_never_reads_big_replies_is_no_longer_read(node):
    big = b"x" * MAX_VALUE_BYTES
    node.put(b"big", big)
    node.clock.advance(0)
    proto = console(node)
    transport = proto.transport
    request = b"get big\n"
    proto.dataReceived(request * 10_000)
    # The first reply filled the transport's buffer: nothing more is handled, and (with far more
    # than the read-ahead waiting) the socket is no longer read.
    assert transport.value().count(b"\r\n") == 1
    assert transport.producerState == "paused"
    assert len(proto._buffer) <= len(request) * 10_000
    # It resumes as the client reads, one buffer's worth at a time.
    replies = transport.drain().count(b"\r\n")
    for _ in range(10):
        replies += transport.drain().count(b"\r\n")
    assert replies == 11
    assert len(transport.value()) <= TCPLikeTransport.limit + MAX_VALUE_BYTES + 100


def test_a_console_paused_by_its_transport_reads_on_only_up_to_the_read_ahead(node):
    proto = console(node)
    transport = proto.transport
    proto.pauseProducing()  # the transport's buffer is full
    proto.dataReceived(b"put a 1\n")
    assert transport.value() == b"" and transport.producerState == "producing"
    proto.dataReceived(b"x" * READ_AHEAD_BYTES)
    assert transport.producerState == "paused"
    proto.resumeProducing()
    node.clock.advance(0)
    assert transport.value().startswith(b"put_success a\r\n")
    assert transport.producerState == "producing"


def test_replies_queued_behind_a_slow_one_are_bounded_in_bytes(node):
    node.put(b"big", b"y" * 100_000)
    node.clock.advance(0)
    proto = console(node, StringTransport())
    transport = proto.transport
    # A put answers at the end of the reactor turn: the gets' replies queue behind it.
    proto.dataReceived(b"put a 1\n" + b"get big\n" * 50)
    assert transport.producerState == "paused"
    assert proto._queued <= MAX_QUEUED_REPLY_BYTES + 100_100
    assert len(proto._pending) < 10
    node.clock.advance(0)
    assert transport.producerState == "producing"
    lines = transport.value().split(b"\r\n")[:-1]
    assert lines[0] == b"put_success a" and len(lines) == 51


def test_a_half_closed_console_connection_gets_every_reply_then_closes(node):
    proto = console(node, StringTransport())
    assert IHalfCloseableProtocol.providedBy(proto)
    # The last line has no line end: cut off, it is not carried out.
    proto.dataReceived(b"put a 1\nget a\ndelete a\nget a\nput b torn")
    proto.readConnectionLost()
    assert not proto.transport.disconnecting  # the put is not at its tail yet
    node.clock.advance(0)
    assert proto.transport.value() == (b"put_success a\r\nget_success a 1\r\n"
                                       b"delete_success a\r\nget_error a\r\n")
    assert proto.transport.disconnecting
    assert node.stores.coordinator.get(b"b") is None


def test_a_half_closed_console_connection_while_paused_answers_after_resuming(node):
    proto = console(node, StringTransport())
    proto.pauseProducing()
    proto.dataReceived(b"put a 1\nget a\n")
    proto.readConnectionLost()
    assert proto.transport.value() == b"" and not proto.transport.disconnecting
    proto.resumeProducing()
    node.clock.advance(0)
    assert proto.transport.value() == b"put_success a\r\nget_success a 1\r\n"
    assert proto.transport.disconnecting


# -- AMP boxes -------------------------------------------------------------------------------------


def oversize_box(total: int) -> bytes:
    box = amp.AmpBox()
    box[b"_command"] = b"Put"
    box[b"_ask"] = b"1"
    box[b"key"] = b"k"
    chunk = b"v" * 65_535
    for i in range(total // 65_535 + 1):
        box[b"value.%d" % i] = chunk
    return box.serialize()


@pytest.mark.parametrize("make, cap", [
    (lambda node: KVServerProtocol(node), SERVER_BOX_BYTES),
    (lambda node: ECSProtocol(SimpleNamespace(clock=None)), CONTROL_BOX_BYTES),
])
def test_an_oversize_box_closes_the_connection_before_it_is_all_read(node, make, cap):
    proto = make(node)
    transport = StringTransport()
    proto.makeConnection(transport)
    data = oversize_box(4 * cap)
    sent = 0
    while not transport.disconnecting and sent < len(data):
        proto.dataReceived(data[sent:sent + 4096])
        sent += 4096
    assert transport.disconnecting and transport.disconnected  # aborted
    assert sent <= cap + 70_000
    assert proto._currentBox is None
    proto.dataReceived(data[sent:sent + 100_000])  # the rest is ignored
    assert dict(node.stores.coordinator.items()) == {}


def test_the_largest_legitimate_server_boxes_fit_the_servers_cap():
    def size(command: type[amp.Command], **arguments: Any) -> int:
        box = command.makeArguments(arguments, None)
        box[b"_command"] = command.commandName
        box[b"_ask"] = b"99999"
        return len(box.serialize())

    def op(i: int) -> tuple[int, int, bytes, bytes, bytes]:
        return (i, control.PUT, b"k" * 20, b"v" * MAX_VALUE_BYTES, b"r" * MAX_REQUEST_ID_BYTES)

    biggest = 0
    for ops in ([op(i) for i in range(BATCH_OPS)], [op(0)],
                [(i, control.PUT, b"k" * 20, b"v" * 1000, b"r" * 64) for i in range(BATCH_OPS)]):
        batch, batch_bytes = _next_batch(list(ops))
        packed = control.pack_ops(batch)
        assert len(packed) == batch_bytes
        # A Relay box holds one such batch section, or sections of at most BATCH_BYTES.
        data = b"".join(control.pack_section(control.BATCH, "n" * 64, 2 ** 40, packed,
                                             control.RESUMED | control.RESENT)
                        + control.pack_section(control.ACK, "n" * 64, 2 ** 40))
        biggest = max(biggest, size(control.Relay, epoch=2 ** 40, data=data))
        # The box the chain sends (control.relay_box) is the same.
        box = control.relay_box(2 ** 40, data)
        box[b"_command"], box[b"_ask"] = control.Relay.commandName, b"99999"
        assert len(box.serialize()) == size(control.Relay, epoch=2 ** 40, data=data)
    # A ReceiveRange batch ends once it reaches migration.BATCH_BYTES, on a full-size value.
    pairs = [(b"k%019d" % i, b"v" * MAX_VALUE_BYTES) for i in range(5)]
    assert sum(len(k) + len(v) for k, v in pairs[:4]) < migration.BATCH_BYTES
    small = [(b"s%019d" % i, b"") for i in range(995)]
    items = control.pack_items(small + pairs)
    biggest = max(biggest, size(control.ReceiveRange, epoch=2 ** 40, store="replica2",
                                items=items, deletes=control.pack_items([]),
                                requests=control.pack_items(
                                    [(b"r" * 64, b"k" * 20)] * migration.REQUEST_BATCH)))
    # An image is made again of half its rows past sqlitedbm.IMAGE_BYTES.
    biggest = max(biggest, size(control.ReceiveRange, epoch=2 ** 40, store="replica2",
                                items=b"", image=b"i" * sqlitedbm.IMAGE_BYTES))
    assert biggest < 0.7 * SERVER_BOX_BYTES


# -- AMP arguments ---------------------------------------------------------------------------------


def test_a_request_id_over_64_bytes_is_refused_and_nothing_applied(node):
    wire = Wire(node)
    long_id = b"i" * (MAX_REQUEST_ID_BYTES + 1)
    assert "65 bytes" in wire.fails(InvalidRequestId, protocol.Put, key=b"k", value=b"v",
                                    request_id=long_id)
    assert dict(node.stores.coordinator.items()) == {}
    assert long_id not in node.chain.recent
    wire.fails(InvalidRequestId, protocol.Delete, key=b"k", request_id=long_id)
    assert wire.call(protocol.Put, key=b"k", value=b"v",
                     request_id=b"i" * MAX_REQUEST_ID_BYTES) == {"updated": False}
    assert wire.connected


# -- AMP flow control ------------------------------------------------------------------------------


class Hang(amp.Command):
    arguments = [(b"n", amp.Integer())]
    response: list[tuple[bytes, amp.Argument]] = []


class Hanging(BoundedAMP):
    max_unanswered = 8

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Deferred[dict[str, Any]]] = []

    @Hang.responder
    def hang(self, n: int) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        self.waiting.append(d)
        return d


def hang_boxes(count: int) -> bytes:
    out = b""
    for i in range(count):
        box = Hang.makeArguments({"n": i}, None)
        box[b"_command"] = b"Hang"
        box[b"_ask"] = b"%d" % (i + 1)
        out += box.serialize()
    return out


def test_an_amp_connection_with_too_many_unanswered_requests_is_not_read_until_they_drain():
    proto, transport = Hanging(), StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(hang_boxes(20))
    assert len(proto.waiting) == 8 and transport.producerState == "paused"
    for d in proto.waiting[:3]:
        d.callback({})
    assert len(proto.waiting) == 8 and transport.producerState == "paused"
    proto.waiting[3].callback({})  # half are answered: read on
    assert len(proto.waiting) == 12
    for d in proto.waiting[4:12]:
        d.callback({})
    assert len(proto.waiting) == 20 and transport.producerState == "paused"
    for d in proto.waiting[12:16]:
        d.callback({})
    assert transport.producerState == "producing"
    for d in proto.waiting[16:]:
        d.callback({})
    assert transport.value().count(b"_answer") == 20


def test_an_amp_connection_whose_transport_is_full_handles_nothing_until_it_drains():
    proto, transport = Hanging(), StringTransport()
    proto.makeConnection(transport)
    assert transport.producer is proto
    proto.pauseProducing()
    proto.dataReceived(hang_boxes(3))
    assert proto.waiting == [] and transport.producerState == "producing"
    more = hang_boxes(3000)
    assert len(more) > READ_AHEAD_BYTES
    proto.dataReceived(more)  # ... and stops reading past the read-ahead
    assert proto.waiting == [] and transport.producerState == "paused"
    proto.resumeProducing()
    assert len(proto.waiting) == Hanging.max_unanswered


# -- connections per listener ----------------------------------------------------------------------


def test_a_listener_serves_at_most_its_cap_of_connections(node):
    factory = KVServerFactory(node, max_connections=2)
    protos = [factory.buildProtocol(None) for _ in range(2)]
    for p in protos:
        p.makeConnection(StringTransport())
    refused = factory.buildProtocol(None)
    assert not isinstance(refused, KVServerProtocol)
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.disconnecting
    protos[0].connectionLost(Failure(ConnectionDone()))
    assert isinstance(factory.buildProtocol(None), KVServerProtocol)
    consoles = ConsoleFactory(node, max_connections=1)
    consoles.buildProtocol(None).makeConnection(StringTransport())
    assert not hasattr(consoles.buildProtocol(None), "node")


# -- the ECS's registrations -----------------------------------------------------------------------


class SilentLink:
    def callRemote(self, command: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred()


class NoLaunch:
    def stop_all(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


def make_ecs(tmp_path: Any) -> ECS:
    config = ECSConfig(initial_nodes=0).validated()
    return ECS(config, Clock(), NoLaunch(), StateFile(str(tmp_path / "state.json")))


def test_a_register_with_an_epoch_beyond_the_ecs_is_refused_and_nothing_applied(tmp_path):
    first = make_ecs(tmp_path)
    first.register(SilentLink(), "a", "127.0.0.1", 6001, 7001, epoch=0)
    first.state.epoch = first.state.allocate_epoch()
    first._save()
    ecs = make_ecs(tmp_path)  # resumed from its state file
    saved = (tmp_path / "state.json").read_text()
    for epoch in (2 ** 62, ecs.state.last_epoch + 1):
        with pytest.raises(control.RegistrationRefused, match="beyond|not one"):
            ecs.register(SilentLink(), "b", "127.0.0.1", 6002, 7002, epoch=epoch)
    assert "b" not in ecs.state.members and ecs.state.last_epoch == 1
    assert (tmp_path / "state.json").read_text() == saved
    # A server that restarts with the epoch it last saw registers as ever.
    ecs.register(SilentLink(), "a", "127.0.0.1", 6001, 7001, epoch=ecs.state.last_epoch)
    assert "a" in ecs.links


def test_even_an_ecs_without_state_refuses_an_absurd_epoch(tmp_path):
    ecs = make_ecs(tmp_path)
    with pytest.raises(control.RegistrationRefused):
        ecs.register(SilentLink(), "x", "127.0.0.1", 6001, 7001, epoch=MAX_EPOCH + 1)
    assert ecs.state.last_epoch == 0 and ecs.state.members == {}


@pytest.mark.parametrize("name, host, port", [
    ("n" * 65, "127.0.0.1", 6001), ("", "127.0.0.1", 6001), ("a", "h" * 256, 6001),
    ("a", "127.0.0.1", 0), ("a", "127.0.0.1", 10 ** 4000),
])
def test_a_register_with_oversize_fields_is_refused(tmp_path, name, host, port):
    ecs = make_ecs(tmp_path)
    with pytest.raises(control.RegistrationRefused):
        ecs.register(SilentLink(), name, host, port, 7001, epoch=0)
    assert ecs.state.members == {}


def test_the_member_table_is_bounded_and_status_still_fits_amp(tmp_path):
    ecs = make_ecs(tmp_path)
    links = {}
    for i in range(MAX_MEMBERS):
        name = f"{i:03d}" + "n" * 61
        links[name] = SilentLink()
        ecs.register(links[name], name, f"{i:03d}" + "h" * 252, 6000, 7000, epoch=0)
    with pytest.raises(control.RegistrationRefused, match="at most"):
        ecs.register(SilentLink(), "late", "127.0.0.1", 6001, 7001, epoch=0)
    assert len(ecs.state.members) == MAX_MEMBERS
    # Status crosses AMP whatever the table holds.
    client, server, pump = iosim.connectedServerAndClient(lambda: ECSProtocol(ecs), amp.AMP)
    answers: list[Any] = []
    client.callRemote(Status).addBoth(answers.append)
    pump.flush()
    assert len(json.loads(answers[0]["status"])["members"]) == MAX_MEMBERS
    # A member that is gone (not connected, not in the ring) makes room for a new one.
    gone = next(iter(links))
    ecs.link_lost(links[gone])
    ecs.register(SilentLink(), "late", "127.0.0.1", 6001, 7001, epoch=0)
    assert gone not in ecs.state.members and "late" in ecs.state.members
    assert len(StateFile(str(tmp_path / "state.json")).load().members) == MAX_MEMBERS
