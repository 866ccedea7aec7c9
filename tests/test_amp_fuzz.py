"""Hypothesis sends hostile AMP boxes to every command a KVServer or the ECS answers.

Three receivers, each a real protocol object on a real node over a StringTransport, with a Clock:

- L{KVServerProtocol} (a server's AMP port): the client commands of L{chainstore.protocol} and
  the server-to-server commands C{ReceiveRange}, C{Relay}, C{RenewLease};
- L{ServerControlProtocol} (a server's link to the ECS): every ECS -> server command;
- L{ECSProtocol} (the ECS's port): C{Register}, C{CopyProgress} and the admin commands.

A box may miss arguments, carry values that do not parse (non-integers for an Integer, invalid
UTF-8 for a Unicode, anything for a Boolean), huge or negative numbers, empty or oversized keys,
random bytes where packed data (batches, AmpLists) belongs, extra keys and random command names;
it arrives in random pieces. Properties, per box:

- nothing escapes C{dataReceived} and no failure is logged except AMP's or the server's own
  report of a box that does not parse;
- a box with C{_ask} gets exactly one answer or error box, with an error code the command
  declares (AMP's C{UNHANDLED} for a command nobody answers, the declared C{ServerError} for a
  box that does not parse: the link stays open, see L{PARSE_FAILURE_CLOSES});
- a box that does not parse, or whose packed data does not unpack, changes nothing: not the
  stores, the ring, the server's state, its locks and trackers, the ECS's membership.

The framing itself is fuzzed too (lying length prefixes, boxes with no command, answers to
questions never asked), and a long run of malformed requests must leave no per-request state
behind. Everything is derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

import gc
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure

from chainstore import control, protocol
from chainstore.amp_server import KVServerProtocol
from chainstore.cache import make_cache
from chainstore.ecs_link import ServerControlProtocol
from chainstore.errors import ServerError
from chainstore.node import RUNNING, KVNode
from chainstore.ring import Ring
from chainstore.storage import StoreSet, sqlitedbm
from ecs import protocol as admin
from ecs.server import ECSProtocol
from test_amp import ME, OTHER
from test_ecs_coordinator import Cluster
from test_store_ranges import image_of

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

KV_COMMANDS: list[type[amp.Command]] = [
    protocol.Put, protocol.Get, protocol.Delete, protocol.KeyRange, protocol.KeyRangeRead,
    protocol.GetMetadata, protocol.Stats, control.ReceiveRange, control.Relay,
    control.RenewLease,
]
CONTROL_COMMANDS: list[type[amp.Command]] = [
    control.Heartbeat, control.SetMetadata, control.SetState, control.LockRanges,
    control.UnlockRanges, control.TrackWrites, control.StopTracking, control.DrainWrites,
    control.CopyRange, control.MoveLocal, control.DropRange, control.ClearStores,
    control.Shutdown,
]
ECS_COMMANDS: list[type[amp.Command]] = [
    control.Register, control.CopyProgress, admin.Start, admin.Stop, admin.ShutDown,
    admin.AddNodes, admin.RemoveNode, admin.Status,
]

#: Whether AMP's own answer to a responder that raised something undeclared (argument parsing
#: included), an UNKNOWN error box after which AMP closes the connection, can be seen. None of
#: the three: RoleGuard turns such failures into the declared ServerError on all of them.
PARSE_FAILURE_CLOSES = {KVServerProtocol: False, ServerControlProtocol: False, ECSProtocol: False}

RESERVED = {amp.COMMAND, amp.ASK, amp.ANSWER, amp.ERROR, amp.ERROR_CODE, amp.ERROR_DESCRIPTION}


# -- the wire ------------------------------------------------------------------------------------


def boxes_in(data: bytes) -> list[dict[bytes, bytes]]:
    """The complete AMP boxes in C{data} (what a peer would parse), in order."""
    boxes, box, key, offset = [], {}, None, 0
    while offset + 2 <= len(data):
        (length,) = struct.unpack_from("!H", data, offset)
        chunk = data[offset + 2:offset + 2 + length]
        offset += 2 + length
        if key is not None:
            box[key], key = chunk, None
        elif chunk:
            key = chunk
        else:
            boxes.append(box)
            box = {}
    return boxes


def replies(data: bytes) -> list[dict[bytes, bytes]]:
    """The answer and error boxes in C{data} (not the commands the receiver sends itself)."""
    return [b for b in boxes_in(data) if amp.ANSWER in b or amp.ERROR in b]


def serialize(box: dict[bytes, bytes]) -> bytes:
    return amp.AmpBox(box).serialize()


class LoggedFailures:
    """Every event that carries a failure, whoever logged it (AMP, Twisted, chainstore)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            self.events.append(event)

    def take(self) -> list[tuple[str, BaseException]]:
        found = [(e.get("log_namespace", ""), e["log_failure"].value) for e in self.events]
        self.events.clear()
        return found


@pytest.fixture(scope="module")
def logged() -> Iterator[LoggedFailures]:
    observer = LoggedFailures()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


# -- hostile values ------------------------------------------------------------------------------

INTS = [0, 1, 2, 3, -1, -(1 << 200), 7001, 50002, 65536, 1 << 63, 1 << 127, (1 << 128) - 1,
        1 << 128, 10 ** 80]
NOT_INTS = [b"", b" ", b"1.5", b"0x1f", b"1e3", b"--1", b"\xff", b"\x00", b"9" * 5000, b"+"]
NAMES = ["s1", "s2", "s3", "coordinator", "replica1", "replica2", "running", "stopped", "LRU",
         "", " ", "\x00", "s1\n"]
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"ok\x80", b"\xf8\x88\x80\x80\x80"]
KEYS = [b"", b"k", b"a", b"x" * 20, b"x" * 21, b"a b", b"\xff", b"k\x00", b"\n", b"x" * 65535]


def packed_items() -> st.SearchStrategy[bytes]:
    pairs = st.lists(st.tuples(st.sampled_from(KEYS[:9]), st.binary(max_size=20)), max_size=4)
    whole = pairs.map(control.pack_items)
    cut = st.tuples(whole, st.integers(0, 60)).map(lambda p: p[0][:p[1]])
    return st.one_of(whole, cut, st.binary(max_size=40))


def packed_ops() -> st.SearchStrategy[bytes]:
    op = st.tuples(st.sampled_from([0, 1, 2, 5, 1 << 40, (1 << 64) - 1]),
                   st.integers(0, 255), st.sampled_from(KEYS[:9]), st.binary(max_size=12),
                   st.binary(max_size=6))
    whole = st.lists(op, max_size=4).map(control.pack_ops)
    cut = st.tuples(whole, st.integers(0, 80)).map(lambda p: p[0][:p[1]])
    return st.one_of(whole, cut, st.binary(max_size=40))


def packed_sections() -> st.SearchStrategy[bytes]:
    """A Relay's data: sections of batches (of packed_ops, whole or not) and acks."""
    section = st.tuples(st.sampled_from([control.BATCH, control.ACK, 2, 255]),
                        st.sampled_from(NAMES[:3]), st.sampled_from([0, 1, 5, 1 << 40]),
                        packed_ops(), st.integers(0, 7)).map(
        lambda s: b"".join(control.pack_section(*s)))
    whole = st.lists(section, max_size=3).map(b"".join)
    cut = st.tuples(whole, st.integers(0, 120)).map(lambda p: p[0][:p[1]])
    return st.one_of(whole, cut, st.binary(max_size=40))


def images() -> st.SearchStrategy[bytes]:
    """A copy batch's database image: whole (of any pairs, some keys away from their homes),
    cut, with a byte changed anywhere, or none at all."""
    pairs = st.dictionaries(st.sampled_from(KEYS[:9]),
                            st.tuples(st.binary(max_size=20), st.sampled_from([0, 0, 0, 1])),
                            max_size=4)
    whole = pairs.map(lambda ps: image_of([(sqlitedbm.home(k) + off, k, v)
                                           for k, (v, off) in ps.items()]))
    cut = st.tuples(whole, st.integers(0, 9000)).map(lambda p: p[0][:p[1]])
    changed = st.tuples(whole, st.integers(0, 8191), st.integers(0, 255)).map(
        lambda p: p[0][:p[1] % len(p[0])] + bytes([p[2]]) + p[0][p[1] % len(p[0]) + 1:])
    return st.one_of(whole, cut, changed, st.binary(max_size=600))


def values_for(name: bytes, arg: amp.Argument, command: type[amp.Command]) -> Any:
    """A strategy for the wire value of one argument: mostly plausible, often hostile."""
    if isinstance(arg, amp.Integer):
        return st.one_of(st.sampled_from(INTS).map(lambda i: b"%d" % i),
                         st.integers().map(lambda i: b"%d" % i),
                         st.sampled_from(NOT_INTS), st.binary(max_size=6))
    if isinstance(arg, amp.Float):
        return st.one_of(st.sampled_from([b"0.5", b"nan", b"inf", b"-1e308", b"1e999"]),
                         st.sampled_from(NOT_INTS), st.binary(max_size=6))
    if isinstance(arg, amp.Boolean):
        return st.one_of(st.sampled_from([b"True", b"False"]),
                         st.sampled_from([b"true", b"1", b"", b"TRUE", b"\xff"]))
    if isinstance(arg, amp.Unicode):
        return st.one_of(st.sampled_from(NAMES).map(str.encode),
                         st.text(max_size=12).map(str.encode), st.sampled_from(BAD_UTF8))
    if isinstance(arg, amp.AmpList):
        rows = st.lists(box_arguments(arg.subargs, command), max_size=3)
        return st.one_of(rows.map(lambda rs: b"".join(serialize(r) for r in rs)),
                         st.binary(max_size=30))
    if isinstance(arg, amp.ListOf):
        good = st.lists(st.sampled_from(NAMES), max_size=3).map(
            lambda names: arg.toString(names))
        return st.one_of(good, st.binary(max_size=20), st.sampled_from(BAD_UTF8))
    if isinstance(arg, protocol.BigBytes):
        if command is control.Relay:
            return packed_sections()
        if command is control.ReceiveRange:
            return images() if name == b"image" else packed_items()
        return st.one_of(st.sampled_from(KEYS), st.binary(max_size=40))
    # amp.String: keys, request ids
    return st.one_of(st.sampled_from(KEYS), st.binary(max_size=30))


@st.composite
def box_arguments(draw: Any, arguments: list[tuple[bytes, amp.Argument]],
                  command: type[amp.Command]) -> dict[bytes, bytes]:
    box: dict[bytes, bytes] = {}
    for name, arg in arguments:
        # about one argument in eight is missing, optional or not
        if draw(st.integers(0, 7)) == 0:
            continue
        box[name] = draw(values_for(name, arg, command))
    return box


extra_keys = st.dictionaries(
    st.one_of(st.sampled_from([b"value.1", b"items.1", b"ops.1", b"value.2", b"x", b"\x00",
                               b"k" * 255]),
              st.binary(min_size=1, max_size=12)).filter(lambda k: k not in RESERVED),
    st.binary(max_size=20), max_size=3)


@st.composite
def hostile_boxes(draw: Any, commands: list[type[amp.Command]]) -> tuple[Any, dict]:
    """(the command or None for an unknown name, the box as it goes on the wire)."""
    if draw(st.integers(0, 9)) == 0:
        # Non-ASCII names too: AMP's CommandLocator raises UnicodeDecodeError on them, which
        # RoleGuard turns into "no such command".
        name = draw(st.one_of(st.text(st.characters(max_codepoint=127), min_size=1,
                                      max_size=20).map(str.encode),
                              st.binary(min_size=1, max_size=20),
                              st.sampled_from([b"put", b"PUT", b"Put ", b"Shutdown\x00",
                                               b"\x80"])))
        command = next((c for c in commands if c.commandName == name), None)
        args: dict[bytes, bytes] = {}
    else:
        command = draw(st.sampled_from(commands))
        name = command.commandName
        args = draw(box_arguments(command.arguments, command))
    box = {**draw(extra_keys), **args, amp.COMMAND: name,
           amp.ASK: draw(st.binary(min_size=1, max_size=8))}
    return command, box


def splits(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in zip(bounds, bounds[1:]):
        yield data[start:end]


# -- oracles: does the box parse, does its packed data unpack ------------------------------------


def malformed(command: type[amp.Command] | None, box: dict[bytes, bytes],
              proto: amp.AMP) -> bool:
    """True if the receiver cannot even read the request: a box that does not parse, or a
    batch that does not unpack."""
    if command is None:
        return False
    try:
        kw = command.parseArguments(amp.AmpBox(box), proto)
    except Exception:
        return True
    try:
        if command is control.Relay:
            for kind, _, _, _, payload in control.unpack_sections(kw["data"]):
                if kind == control.BATCH:
                    control.unpack_ops(payload)
        if command is control.ReceiveRange:
            for field in ("items", "deletes", "requests"):
                list(control.unpack_items(kw.get(field) or b""))
            if kw.get("image") is not None:
                if kw["items"] or kw.get("deletes"):
                    return True  # an image and pairs: one or the other
                sqlitedbm.image_pairs(kw["image"])
    except Exception:
        return True
    return False


# -- the receivers -------------------------------------------------------------------------------


def refuse(*_: Any) -> Any:
    return fail(ConnectionRefusedError("fuzz"))


def open_node(path: Any, ring: Ring | None = None) -> KVNode:
    node = KVNode(ME, make_cache("LRU", 8), Clock(), ring=ring, state=RUNNING, connect=refuse)
    node.stores = StoreSet.open(str(path))
    return node


def node_state(node: KVNode) -> Any:
    stores = node.stores
    return (
        None if stores is None else {
            name: (sorted(store.items()), repr(store.trackers), store.chain_state())
            for name, store in stores.stores.items()
        },
        node.ring, node.state, list(node.write_locks), list(node.read_locks),
        list(node.chain.recent.items()),
    )


def ecs_state(cluster: Cluster) -> Any:
    state = cluster.ecs.state
    return (repr(state.members), list(state.ring_members), state.epoch, state.last_epoch,
            sorted(state.dead), state.serving, sorted(cluster.ecs.links))


class Receiver:
    """One kind of receiving protocol on its node (or ECS), and how to judge its answers."""

    def __init__(self, make: Callable[[], amp.AMP], clock: Clock, snapshot: Callable[[], Any],
                 kind: type[amp.AMP], settle: Callable[[], None] | None = None) -> None:
        self.make, self.clock, self.snapshot, self.kind = make, clock, snapshot, kind
        self._settle = settle

    def connect(self) -> tuple[amp.AMP, StringTransport]:
        proto = self.make()
        transport = StringTransport()
        proto.makeConnection(transport)
        self.settle()
        transport.clear()  # what the receiver sends on its own (a Register, ...)
        return proto, transport

    def settle(self) -> None:
        if self._settle is not None:
            self._settle()
        for _ in range(4):
            self.clock.advance(0)

    def disconnect(self, proto: amp.AMP) -> None:
        proto.connectionLost(Failure(ConnectionDone("fuzz over")))
        self.settle()


@pytest.fixture(scope="module")
def kv(tmp_path_factory) -> Iterator[Receiver]:
    """A server alone in its ring (every client command is answered at once)."""
    node = open_node(tmp_path_factory.mktemp("kv"))
    yield Receiver(lambda: KVServerProtocol(node), node.clock, lambda: node_state(node),
                   KVServerProtocol)
    node.stores.close()


@pytest.fixture(scope="module")
def kv_tail(tmp_path_factory) -> Iterator[Receiver]:
    """A server that is the tail of s2's chain at epoch 1: Relay and RenewLease get past
    their epoch and owner checks and reach the batch itself."""
    ring = Ring((OTHER, ME), epoch=1, replication=2)
    node = open_node(tmp_path_factory.mktemp("kv_tail"), ring)

    def settle() -> None:
        node.clock.advance(1.0)  # past any lease wait: a tail answers once it may

    yield Receiver(lambda: KVServerProtocol(node), node.clock, lambda: node_state(node),
                   KVServerProtocol, settle)
    node.chain.stop()
    node.stores.close()


@pytest.fixture(scope="module")
def control_link(tmp_path_factory) -> Iterator[Receiver]:
    node = open_node(tmp_path_factory.mktemp("control"))
    shutdowns: list[None] = []
    yield Receiver(
        lambda: ServerControlProtocol(node, node.clock, lambda: shutdowns.append(None),
                                      connect_peer=refuse),
        node.clock, lambda: node_state(node), ServerControlProtocol,
        lambda: node.clock.advance(0.2))  # a Shutdown's delayed call, a move's batches
    node.stores.close()


@pytest.fixture(scope="module")
def ecs_port(tmp_path_factory) -> Iterator[Receiver]:
    """An ECS with a pool of slots and no servers; a launch starts nothing, so an AddNodes
    fails once the register timeout has passed (the fuzz never waits on a real change)."""
    cluster = Cluster(tmp_path_factory.mktemp("ecs"), initial=0, slots=3)
    cluster.launcher.auto_start = False

    def settle() -> None:
        for _ in range(12):
            cluster.clock.advance(1.0)  # register timeouts, control-call timeouts

    yield Receiver(lambda: ECSProtocol(cluster.ecs), cluster.clock,
                   lambda: ecs_state(cluster), ECSProtocol, settle)
    cluster.close()


# -- the property --------------------------------------------------------------------------------


def declared(command: type[amp.Command] | None) -> set[bytes]:
    if command is None:
        return {amp.UNHANDLED_ERROR_CODE}
    return set(command.errors.values())


def check_box(receiver: Receiver, logged: LoggedFailures, command: Any,
              box: dict[bytes, bytes], cuts: list[int]) -> None:
    proto, transport = receiver.connect()
    bad = malformed(command, box, proto)
    before = receiver.snapshot()
    for piece in splits(serialize(box), cuts):
        proto.dataReceived(piece)  # must never raise
    receiver.settle()

    answers = [r for r in replies(transport.value())
               if r.get(amp.ANSWER) == box[amp.ASK] or r.get(amp.ERROR) == box[amp.ASK]]
    assert len(answers) == 1, (box, transport.value())
    answer = answers[0]
    closes = PARSE_FAILURE_CLOSES[receiver.kind] and bad
    failures = logged.take()
    if amp.ERROR in answer:
        code = answer[amp.ERROR_CODE]
        if closes and code == amp.UNKNOWN_ERROR_CODE:
            # AMP's default for an undeclared failure: it logs it and closes the link.
            assert all(ns == "twisted.protocols.amp" for ns, _ in failures), failures
            assert transport.disconnecting
        else:
            assert code in declared(command), (box, answer)
            assert not transport.disconnecting, (box, answer)
            if code == ServerError.code and bad:
                # The server logs the request it could not read (see the report of bugs).
                assert all(ns == "chainstore.roles" for ns, _ in failures), failures
            else:
                assert not failures, (box, answer, failures)
    else:
        assert not bad, ("a malformed box was answered as a success", box, answer)
        assert not failures, (box, answer, failures)
        assert not transport.disconnecting
    if bad:
        assert amp.ERROR in answer
        assert receiver.snapshot() == before, box
    receiver.disconnect(proto)
    logged.take()


cuts = st.lists(st.integers(0, 1 << 17), max_size=4)


@FUZZ
@given(case=hostile_boxes(KV_COMMANDS), cuts=cuts)
def test_kvserver_answers_every_box_with_a_declared_error(kv, logged, case, cuts):
    check_box(kv, logged, *case, cuts)


@settings(FUZZ, max_examples=100)
@given(case=hostile_boxes([control.Relay, control.RenewLease, control.ReceiveRange,
                           protocol.Get]), cuts=cuts)
def test_a_chain_member_answers_every_replication_box(kv_tail, logged, case, cuts):
    check_box(kv_tail, logged, *case, cuts)


@FUZZ
@given(case=hostile_boxes(CONTROL_COMMANDS), cuts=cuts)
def test_the_ecs_link_answers_every_box(control_link, logged, case, cuts):
    check_box(control_link, logged, *case, cuts)


@settings(FUZZ, max_examples=100)
@given(case=hostile_boxes(ECS_COMMANDS), cuts=cuts)
def test_the_ecs_answers_every_box(ecs_port, logged, case, cuts):
    check_box(ecs_port, logged, *case, cuts)


# -- bugs the fuzz found, as named scenarios ----------------------------------------------------


def ask(receiver: Receiver, box: dict[bytes, bytes]) -> dict[bytes, bytes]:
    proto, transport = receiver.connect()
    proto.dataReceived(serialize({**box, amp.ASK: b"1"}))
    receiver.settle()
    [answer] = replies(transport.value())
    assert not transport.disconnecting
    receiver.disconnect(proto)
    return answer


def test_a_copy_into_an_unknown_store_is_refused_with_a_declared_error(kv, logged):
    """It was an undeclared ValueError: answered ServerError, with a traceback logged."""
    answer = ask(kv, {amp.COMMAND: b"ReceiveRange", b"epoch": b"99", b"store": b"s1",
                      b"items": control.pack_items([(b"k", b"v")])})
    assert answer[amp.ERROR_CODE] == b"CONTROL_FAILED"
    assert b"unknown store 's1'" in answer[amp.ERROR_DESCRIPTION]
    assert logged.take() == []


def test_a_copy_whose_request_ids_do_not_unpack_writes_nothing(kv, logged):
    """The batch was written before the request ids failed to unpack: refused, yet applied."""
    before = kv.snapshot()
    answer = ask(kv, {amp.COMMAND: b"ReceiveRange", b"epoch": b"99", b"store": b"coordinator",
                      b"items": control.pack_items([(b"copied", b"v")]),
                      b"requests": control.pack_items([(b"rid", b"copied")])[:-2]})
    assert answer[amp.ERROR_CODE] == ServerError.code
    assert kv.snapshot() == before
    logged.take()


# -- the framing itself ----------------------------------------------------------------------


#: What AMP raises out of dataReceived for a box that is no command: a reactor logs it and
#: closes that connection (AMP's own handling of a broken peer; nothing of ours runs).
BOX_LAYER_ERRORS = (amp.NoEmptyBoxes, KeyError)

frame_pieces = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"\x00\x00", b"\x01\x00", b"\xff\xff", b"\x01\x00" + b"k" * 256,
                     b"\x00\x05_comm", b"\x00\x01", b"\x00"]),
    # a box that is no command: an answer or an error to a question never asked, or no key
    st.dictionaries(st.sampled_from([amp.ANSWER, amp.ERROR, amp.ERROR_CODE, b"x", b"key"]),
                    st.binary(max_size=8), max_size=3).map(serialize),
    # a length prefix that lies: longer or shorter than what follows
    st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=16)).map(
        lambda p: struct.pack("!H", p[0]) + p[1]),
)


def check_framing(receiver: Receiver, logged: LoggedFailures, pieces: list[bytes],
                  cuts: list[int]) -> None:
    proto, transport = receiver.connect()
    before = receiver.snapshot()
    for piece in splits(b"".join(pieces), cuts):
        try:
            proto.dataReceived(piece)
        except BOX_LAYER_ERRORS:
            break  # the reactor would log it and close the connection here
        if transport.disconnecting:
            break  # AMP hung up (a key longer than 255 bytes)
    receiver.settle()
    assert replies(transport.value()) == []  # nothing was asked
    assert receiver.snapshot() == before
    assert logged.take() == []
    receiver.disconnect(proto)
    logged.take()
    # The process lives on: a new connection is served.
    probe = {KVServerProtocol: protocol.Stats, ServerControlProtocol: control.DrainWrites,
             ECSProtocol: admin.Status}[receiver.kind]
    assert amp.ANSWER in ask(receiver, {amp.COMMAND: probe.commandName})


@settings(FUZZ, max_examples=60)
@given(pieces=st.lists(frame_pieces, min_size=1, max_size=8), cuts=cuts)
def test_broken_framing_never_reaches_a_kvserver(kv, logged, pieces, cuts):
    check_framing(kv, logged, pieces, cuts)


@settings(FUZZ, max_examples=60)
@given(pieces=st.lists(frame_pieces, min_size=1, max_size=8), cuts=cuts)
def test_broken_framing_never_reaches_the_ecs_link(control_link, logged, pieces, cuts):
    check_framing(control_link, logged, pieces, cuts)


@settings(FUZZ, max_examples=60)
@given(pieces=st.lists(frame_pieces, min_size=1, max_size=8), cuts=cuts)
def test_broken_framing_never_reaches_the_ecs(ecs_port, logged, pieces, cuts):
    check_framing(ecs_port, logged, pieces, cuts)


@pytest.fixture(params=["kv", "control_link", "ecs_port"])
def receiver(request) -> Receiver:
    return request.getfixturevalue(request.param)


# -- no state per request ----------------------------------------------------------------------


def refused_requests(kind: type[amp.AMP]) -> list[dict[bytes, bytes]]:
    """Requests each refused with a declared error (none of them logs a failure)."""
    if kind is KVServerProtocol:
        return [
            {amp.COMMAND: b"Get", b"key": b"x" * 21},
            {amp.COMMAND: b"Get", b"key": b"missing"},
            {amp.COMMAND: b"Put", b"key": b"", b"value": b"v", b"request_id": b"r"},
            {amp.COMMAND: b"Delete", b"key": b"missing", b"request_id": b"rid"},
            {amp.COMMAND: b"NoSuchCommand"},
            {amp.COMMAND: b"ReceiveRange", b"epoch": b"0", b"store": b"coordinator",
             b"items": b""},
            {amp.COMMAND: b"ReceiveRange", b"epoch": b"7", b"store": b"nowhere", b"items": b""},
            {amp.COMMAND: b"Relay", b"epoch": b"-1", b"data": b"".join(control.pack_section(
                control.BATCH, "s9", 0, control.pack_ops([(1, 0, b"k", b"v", b"")])))},
            {amp.COMMAND: b"RenewLease", b"epoch": b"0", b"owner": b"s9"},
        ]
    if kind is ServerControlProtocol:
        return [
            {amp.COMMAND: b"SetState", b"state": b"dancing"},
            {amp.COMMAND: b"StopTracking", b"tracker": b"123456"},
            {amp.COMMAND: b"UnlockRanges", b"ranges": b"", b"reads": b"True"},
            {amp.COMMAND: b"DropRange", b"store": b"nowhere", b"start": b"0", b"end": b"1"},
            {amp.COMMAND: b"MoveLocal", b"source": b"coordinator", b"target": b"coordinator",
             b"start": b"0", b"end": b"1", b"tracker": b"99999"},
            {amp.COMMAND: b"NoSuchCommand"},
        ]
    return [
        {amp.COMMAND: b"RemoveNode", b"name": b"nobody", b"force": b"False"},
        {amp.COMMAND: b"Start"},
        {amp.COMMAND: b"AddNodes", b"count": b"0", b"cache_strategy": b"LRU",
         b"cache_size": b"1"},
        {amp.COMMAND: b"AddNodes", b"count": b"1", b"cache_strategy": b"NOPE",
         b"cache_size": b"1"},
        {amp.COMMAND: b"CopyProgress", b"operation": b"77", b"keys": b"1", b"bytes": b"1"},
        {amp.COMMAND: b"NoSuchCommand"},
    ]


def unreadable_requests(kind: type[amp.AMP]) -> list[dict[bytes, bytes]]:
    """Requests that do not parse (on a KVServer: answered ServerError, logged)."""
    if kind is KVServerProtocol:
        return [{amp.COMMAND: b"Put", b"key": b"k"},
                {amp.COMMAND: b"Relay", b"epoch": b"x", b"data": b""},
                {amp.COMMAND: b"ReceiveRange", b"epoch": b"9", b"store": b"coordinator",
                 b"items": b"\x01\x00\x00"}]
    return []


def run_requests(receiver: Receiver, proto: amp.AMP, transport: StringTransport,
                 requests: list[dict[bytes, bytes]], rounds: int) -> None:
    for i in range(rounds):
        for box in requests:
            proto.dataReceived(serialize({**box, amp.ASK: b"%x" % i}))
        receiver.settle()
        assert not transport.disconnecting
        assert len(replies(transport.value())) == len(requests)
        transport.clear()


def sizes(receiver: Receiver, proto: amp.AMP) -> Any:
    """How much state the connection and the node hold: counts, not contents."""
    state = receiver.snapshot()
    return (len(proto._outstandingRequests), len(vars(proto)),
            [len(part) if hasattr(part, "__len__") else part for part in state[:2]]
            if receiver.kind is ECSProtocol else
            [len(state[0]["coordinator"][0]), len(state[3]), len(state[4]), len(state[5])])


def settle_memory() -> None:
    gc.collect()
    # CPython's method cache holds a reference to each attribute name string it looks up, one
    # per slot, keyed by the string's address: AMP builds a fresh "amp_<COMMAND>" name per
    # request, so up to 4,096 of them stay alive until other lookups overwrite their slots.
    # Bounded, but tens of kilobytes over a few hundred requests: not ours to count.
    sys._clear_type_cache()


def test_refused_requests_leave_no_state_behind(receiver, logged):
    proto, transport = receiver.connect()
    requests = refused_requests(receiver.kind)
    # Warm up first: interned names, SQLite's statement cache and the like fill up once.
    run_requests(receiver, proto, transport, requests, 60)
    counts = sizes(receiver, proto)
    settle_memory()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run_requests(receiver, proto, transport, requests, 200)
        settle_memory()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    # Even the smallest object kept per request (28 bytes or more) would pass this bound.
    assert grown < 16 * 200 * len(requests), grown
    assert sizes(receiver, proto) == counts
    assert logged.take() == []
    receiver.disconnect(proto)


def test_unreadable_requests_leave_no_state_behind(kv, logged):
    """Their logged failures are kept by whatever observes the log, so here only the
    connection's and the node's own state is counted."""
    proto, transport = kv.connect()
    requests = unreadable_requests(KVServerProtocol)
    run_requests(kv, proto, transport, requests, 5)
    counts = sizes(kv, proto)
    run_requests(kv, proto, transport, requests, 200)
    assert sizes(kv, proto) == counts
    logged.take()
    kv.disconnect(proto)
