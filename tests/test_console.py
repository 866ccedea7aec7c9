"""The text console against a real KVNode (SQLite stores in tmp_path, a Clock), over a
StringTransport: the classic protocol byte for byte, framing, limits, reply order, backpressure
and the state replies."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from chainstore.cache import make_cache
from chainstore.console import MAX_PENDING, ConsoleFactory, ConsoleProtocol, parse_line
from chainstore.errors import KeyNotFound
from chainstore.limits import MAX_LINE_BYTES, MAX_VALUE_BYTES
from chainstore.node import STOPPED, KVNode
from simnet import SimNet
from chainstore.ring import KeyRange, NodeInfo, Ring, position, render_position
from chainstore.storage import StoreSet
from harness import faults

ME = NodeInfo("s1", "127.0.0.1", 50001, 51001)
OTHER = NodeInfo("s2", "127.0.0.1", 50002, 51002)
GREETING = b"chainstore KVServer s1 at 127.0.0.1:50001 ready; type help\r\n"


def open_node(tmp_path, node_class=KVNode, ring=None, cache_size=100) -> KVNode:
    node = node_class(ME, make_cache("LRU", cache_size), Clock(), ring=ring)
    node.stores = StoreSet.open(str(tmp_path / "data"))
    return node


@pytest.fixture
def node(tmp_path):
    node = open_node(tmp_path)
    yield node
    if node.stores is not None:
        node.stores.close()


class Connection:
    """A console protocol on a StringTransport; C{send} returns the reply lines it caused."""

    def __init__(self, node: KVNode) -> None:
        self.node = node
        self.transport = StringTransport()
        self.proto = ConsoleFactory(node).buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        self.end_turn()
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

    def end_turn(self) -> None:
        """Let the reactor turn end: writes are committed and answered then."""
        clock = getattr(self.node, "clock", None)
        if isinstance(clock, Clock):
            clock.advance(0)

    def ask(self, line: bytes) -> bytes:
        """One request, the one reply line it gets (without its line end)."""
        out = self.send(line + b"\r\n")
        assert out.endswith(b"\r\n") and out.count(b"\r\n") == 1, out
        return out[:-2]

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionError("gone")))


@pytest.fixture
def conn(node):
    return Connection(node)


def stored(node: KVNode) -> dict[bytes, bytes]:
    return dict(node.stores.coordinator.items())


# -- the greeting and every command of the spec ------------------------------------------------


def test_the_greeting_is_one_line_and_comes_first(node):
    c = Connection(node)
    assert c.greeting == GREETING


def test_put_get_delete_replies_exactly(conn):
    assert conn.send(b"put k v\r\n") == b"put_success k\r\n"
    assert conn.send(b"put k w\r\n") == b"put_update k\r\n"
    assert conn.send(b"get k\r\n") == b"get_success k w\r\n"
    assert conn.send(b"delete k\r\n") == b"delete_success k\r\n"
    assert conn.send(b"delete k\r\n") == b"delete_error k\r\n"
    assert conn.send(b"get k\r\n") == b"get_error k\r\n"
    assert stored(conn.node) == {}


def test_a_failed_store_answers_error_with_the_reason_never_not_found(conn):
    # A storage failure is not "not found": get_error and delete_error would tell a classic
    # client the key is absent. Every request gets error <reason>, and stats shows it.
    assert conn.ask(b"put k v") == b"put_success k"
    conn.node.cache.clear()
    faults.inject(conn.node.stores.coordinator).arm(faults.CORRUPT, faults.reads)
    reply = conn.ask(b"get k")
    assert reply.startswith(b"error storage failed: store coordinator") and b"malformed" in reply
    for line in (b"get k", b"delete k", b"put k w"):
        assert conn.ask(line).startswith(b"error storage failed: "), line
    assert conn.ask(b"help").startswith(b"help ")
    stats = json.loads(conn.ask(b"stats")[len(b"stats "):])
    assert stats["state"] == "failed" and "malformed" in stats["failure"]


def test_an_unexpected_failure_answers_error_not_get_error(conn):
    # Not a storage error (the store was closed under the node: a bug): still never "not
    # found", and the connection goes on.
    conn.node.stores.coordinator.db.close()
    assert conn.ask(b"put k some value").startswith(b"error ")
    assert conn.ask(b"get k").startswith(b"error ")
    assert conn.ask(b"delete k").startswith(b"error ")
    assert conn.ask(b"help").startswith(b"help ")


def test_keyrange_and_keyrange_read_of_a_single_server(conn):
    pos = render_position(ME.position).encode()
    triple = pos + b"," + pos + b",127.0.0.1:50001;"
    assert conn.send(b"keyrange\r\n") == b"keyrange_success " + triple + b"\r\n"
    assert conn.send(b"keyrange_read\r\n") == b"keyrange_read_success " + triple + b"\r\n"


def test_help_and_stats(conn):
    help_line = conn.ask(b"help")
    for word in (b"put", b"get", b"delete", b"keyrange", b"keyrange_read", b"stats"):
        assert word in help_line
    conn.ask(b"put a 1")
    conn.ask(b"get a")
    conn.ask(b"get missing")
    stats_line = conn.ask(b"stats")
    assert stats_line.startswith(b"stats {")
    stats = json.loads(stats_line[len(b"stats "):])
    assert stats["name"] == "s1"
    assert stats["puts"] == 1
    assert stats["gets"] == 2
    assert stats["cache_hits"] == 1  # the put filled the cache
    assert stats["cache_misses"] == 1
    assert stats["coordinator_keys"] == 1


@pytest.mark.parametrize("line", [b"closing_client", b"ping", b"connected", b"quit", b"",
                                  b"   ", b"put", b"put k", b"put k ", b"get", b"delete",
                                  b"keyrange now", b"help me", b"get a b"])
def test_anything_else_gets_error_and_the_connection_goes_on(conn, line):
    reply = conn.ask(line)
    assert reply.startswith(b"error "), reply
    assert len(reply) > len(b"error ")  # a description, not a bare word
    assert conn.ask(b"put k v") in (b"put_success k", b"put_update k")
    assert conn.ask(b"get k") == b"get_success k v"


# -- framing: line ends, case, whitespace, values ----------------------------------------------


def test_crlf_and_bare_lf_both_end_a_line_and_replies_end_in_crlf(conn):
    out = conn.send(b"put a 1\nput b 2\r\nget a\nget b\r\n")
    assert out == b"put_success a\r\nput_success b\r\nget_success a 1\r\nget_success b 2\r\n"
    assert stored(conn.node) == {b"a": b"1", b"b": b"2"}  # no stray \r in a value


def test_commands_in_any_case_keys_keep_theirs(conn):
    assert conn.ask(b"PUT Key V") == b"put_success Key"
    assert conn.ask(b"Get Key") == b"get_success Key V"
    assert conn.ask(b"get key") == b"get_error key"
    assert conn.ask(b"KeyRange").startswith(b"keyrange_success ")
    assert conn.ask(b"KEYRANGE_READ").startswith(b"keyrange_read_success ")
    assert conn.ask(b"DELETE Key") == b"delete_success Key"


def test_trailing_and_leading_whitespace_is_ignored(conn):
    assert conn.ask(b"keyrange ").startswith(b"keyrange_success ")
    assert conn.ask(b"keyrange_read \t").startswith(b"keyrange_read_success ")
    assert conn.ask(b"put k v") == b"put_success k"
    assert conn.ask(b"get k   ") == b"get_success k v"
    assert conn.ask(b"  get k") == b"get_success k v"
    assert conn.ask(b"delete k \t ") == b"delete_success k"


def test_the_value_is_the_rest_of_the_line_with_inner_spaces_kept(conn):
    assert conn.ask(b"put k a  b   c d") == b"put_success k"
    assert conn.ask(b"get k") == b"get_success k a  b   c d"
    assert stored(conn.node)[b"k"] == b"a  b   c d"


def test_latin1_values_round_trip(conn):
    value = "caf\u00e9 \u00fcber".encode("latin-1")
    assert conn.ask(b"put k " + value) == b"put_success k"
    assert conn.ask(b"get k") == b"get_success k " + value


def test_values_with_line_breaks_never_break_a_reply(conn):
    # A \r inside a value could not come back in one reply line (Java's readLine ends a line
    # at a bare \r): refused on the console.
    assert conn.ask(b"put k a\rb").startswith(b"error ")
    assert conn.send(b"put k v\r\r\n").startswith(b"error ")
    assert stored(conn.node) == {}
    # Values written over AMP may hold any byte: a get of one answers error, not a torn line.
    for value in (b"two\nlines", b"cr\rinside", b"ends\r"):
        conn.node.stores.coordinator.put(b"k", value)
        conn.node.cache.clear()
        out = conn.send(b"get k\r\n")
        assert out.startswith(b"error ") and out.count(b"\n") == 1 and b"\r" not in out[:-2]
        assert conn.ask(b"help").startswith(b"help ")


def test_key_limits(conn):
    twenty = b"k" * 20
    assert conn.ask(b"put " + twenty + b" v") == b"put_success " + twenty
    reply = conn.ask(b"put " + twenty + b"x v")
    assert reply.startswith(b"error ") and b"20" in reply
    assert conn.ask(b"get " + twenty + b"x").startswith(b"error ")
    assert stored(conn.node) == {twenty: b"v"}


def test_a_120000_byte_value_is_accepted_and_120001_is_not(conn):
    value = bytes(range(33, 127)) * (MAX_VALUE_BYTES // 94) + b"z" * (MAX_VALUE_BYTES % 94)
    assert len(value) == MAX_VALUE_BYTES
    assert conn.ask(b"put big " + value) == b"put_success big"
    assert conn.ask(b"get big") == b"get_success big " + value
    reply = conn.ask(b"put big " + value + b"!")
    assert reply.startswith(b"error ") and b"120000" in reply
    # Nothing stored was touched by the refused put.
    assert stored(conn.node) == {b"big": value}


def test_an_over_long_line_gets_one_error_and_the_next_line_is_served(conn):
    conn.ask(b"put k old")
    line = b"put k " + b"x" * (200 * 1024)
    out = conn.send(line + b"\r\nget k\r\n")
    assert out == (b"error message too long: the limit is %d bytes per line\r\n"
                   b"get_success k old\r\n" % MAX_LINE_BYTES)
    assert stored(conn.node) == {b"k": b"old"}


def test_an_over_long_line_in_chunks_gets_one_error_as_soon_as_it_is_too_long(conn):
    conn.ask(b"put k old")
    chunk = b"y" * 4096
    replies = b""
    sent = 0
    conn.send(b"put k ")
    while sent <= MAX_LINE_BYTES:
        replies += conn.send(chunk)
        sent += len(chunk)
    # Refused before the line ends, so the server need not buffer an endless line.
    assert replies.startswith(b"error message too long")
    for _ in range(20):  # more of the same line: dropped silently
        replies += conn.send(chunk)
    replies += conn.send(b"y\r\nget k\r\n")
    assert replies.count(b"\r\n") == 2
    assert replies.endswith(b"\r\nget_success k old\r\n")
    assert len(conn.proto._buffer) == 0


def test_a_long_line_split_across_many_reads(conn):
    value = b"0123456789" * 11_000  # 110,000 bytes
    line = b"put long " + value + b"\r\n"
    out = b""
    # Chunks of every size from 1 to 997 bytes, so that the line end, the key and the
    # separator all fall across chunk boundaries somewhere.
    i, size = 0, 1
    while i < len(line):
        out += conn.send(line[i:i + size])
        i += size
        size = size % 997 + 1
    assert out == b"put_success long\r\n"
    assert stored(conn.node)[b"long"] == value
    # And byte by byte for a short one, including the \r and \n on their own.
    for b in b"get long\r\n":
        out = conn.send(bytes([b]))
    assert out == b"get_success long " + value + b"\r\n"


def test_a_line_trickled_a_byte_at_a_time_is_linear_work(conn):
    # 100,000 single-byte reads: with a framing that re-copies or re-scans the buffer on every
    # read this would move ~5 GB; with the bytearray and the scan mark it is instant. Counted
    # deterministically: the scan never goes back over bytes already searched.
    line = b"put t " + b"q" * 100_000
    for b in line:
        conn.proto.dataReceived(bytes([b]))
        assert conn.proto._scanned == len(conn.proto._buffer)
    assert conn.send(b"\n") == b"put_success t\r\n"


@pytest.mark.parametrize("line", [b"p\xfct k v", b"g\xe9t k", b"get k\xe9", b"put k\xff v",
                                  b"\xff\xfe", b"get \x00", b"put k\x01 v", b"get\tk"])
def test_non_ascii_or_control_bytes_in_a_command_or_key_are_refused(conn, line):
    conn.ask(b"put k v")
    reply = conn.ask(line)
    assert reply.startswith(b"error "), reply
    assert reply.isascii()
    assert conn.ask(b"get k") == b"get_success k v"
    assert stored(conn.node) == {b"k": b"v"}


def test_parse_line_directly():
    assert parse_line(b"put k v w\r").value == b"v w"
    assert parse_line(b"GET k").command == "get"
    request = parse_line(b"keyrange_read")
    assert (request.command, request.key, request.value) == ("keyrange_read", b"", b"")


# -- reply order and backpressure, with writes that complete later ------------------------------


class SlowNode(KVNode):
    """A node whose puts complete only when the test fires them, as a replicated put would."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: list[Deferred] = []

    def put(self, key: bytes, value: bytes, request_id: bytes = b"") -> Deferred[bool]:
        d: Deferred[None] = Deferred()
        d.addCallback(lambda _: KVNode.put(self, key, value, request_id))
        self.waiting.append(d)
        return d

    def complete(self, count: int | None = None) -> None:
        for d in self.waiting[:count]:
            d.callback(None)
        del self.waiting[:count]
        self.clock.advance(0)  # the turn ends: the writes commit and answer


@pytest.fixture
def slow(tmp_path):
    node = open_node(tmp_path, SlowNode)
    yield node
    node.stores.close()


def test_replies_stay_in_request_order_when_a_put_completes_later(slow):
    conn = Connection(slow)
    conn.ask(b"help")
    slow.stores.coordinator.put(b"b", b"2")
    out = conn.send(b"put a 1\r\nget b\r\nbogus\r\nkeyrange\r\nput c 3\r\nget b\r\n")
    assert out == b""  # everything waits for the first put
    assert len(slow.waiting) == 2
    slow.waiting[1].callback(None)  # the second put completes first: still nothing to send
    assert conn.take() == b""
    slow.waiting[0].callback(None)
    lines = conn.take().split(b"\r\n")
    assert lines[0] == b"put_success a"
    assert lines[1] == b"get_success b 2"
    assert lines[2].startswith(b"error ")
    assert lines[3].startswith(b"keyrange_success ")
    assert lines[4:] == [b"put_success c", b"get_success b 2", b""]


def test_a_failed_late_put_still_replies_in_its_place(slow):
    conn = Connection(slow)
    out = conn.send(b"put a 1\r\nget a\r\n")
    assert out == b""
    slow.waiting.pop().errback(Failure(KeyNotFound("x")))
    assert conn.take() == b"put_error a 1\r\nget_error a\r\n"


def test_backpressure_pauses_reading_and_resumes_as_replies_drain(slow):
    conn = Connection(slow)
    assert conn.transport.producerState == "producing"
    count = MAX_PENDING + 100
    conn.send(b"".join(b"put k%d %d\r\n" % (i, i) for i in range(count)))
    assert conn.transport.producerState == "paused"
    # Only MAX_PENDING requests run; the rest of what was received waits unparsed.
    assert len(slow.waiting) == MAX_PENDING
    slow.complete(MAX_PENDING // 2)
    # Half drained is not yet enough: resume below half, so we do not flap at the mark.
    assert conn.transport.producerState == "paused"
    slow.complete(1)
    assert conn.transport.producerState in ("producing", "paused")
    # Drain everything, reading on as the window opens.
    for _ in range(10):
        if not slow.waiting:
            break
        slow.complete()
    assert conn.transport.producerState == "producing"
    replies = conn.take().split(b"\r\n")[:-1]
    assert replies == [b"put_success k%d" % i for i in range(count)]
    assert len(stored(slow)) == count


def test_backpressure_counts_fast_replies_queued_behind_a_slow_one(slow):
    conn = Connection(slow)
    slow.stores.coordinator.put(b"g", b"1")
    conn.send(b"put a 1\r\n" + b"get g\r\n" * (MAX_PENDING + 10))
    assert conn.transport.producerState == "paused"
    slow.complete()
    assert conn.transport.producerState == "producing"
    lines = conn.take().split(b"\r\n")[:-1]
    assert lines == [b"put_success a"] + [b"get_success g 1"] * (MAX_PENDING + 10)


def test_disconnect_mid_line_does_not_raise_or_store(node):
    conn = Connection(node)
    conn.send(b"put k partial val")
    conn.lose()
    conn.proto.dataReceived(b"ue\r\n")  # late bytes after the loss are ignored
    assert conn.take() == b""
    assert stored(node) == {}
    other = Connection(node)
    assert other.ask(b"get k") == b"get_error k"


def test_disconnect_with_replies_pending_does_not_raise(slow):
    conn = Connection(slow)
    conn.send(b"put a 1\r\nput b 2\r\nget a\r\n")
    conn.lose()
    slow.waiting[0].callback(None)
    slow.waiting[1].errback(Failure(RuntimeError("replica gone")))
    assert conn.take() == b""
    assert stored(slow) == {b"a": b"1"}


def test_disconnect_while_paused_does_not_resume(slow):
    conn = Connection(slow)
    conn.send(b"put k v\r\n" * (MAX_PENDING + 5))
    assert conn.transport.producerState == "paused"
    conn.lose()
    slow.complete()
    assert conn.transport.producerState == "paused"
    assert conn.take() == b""


# -- state replies -------------------------------------------------------------------------------


def test_server_stopped(conn):
    conn.ask(b"put k v")
    conn.node.state = STOPPED
    assert conn.ask(b"put k w") == b"server_stopped"
    assert conn.ask(b"get k") == b"server_stopped"  # even though k is in the cache
    assert conn.ask(b"delete k") == b"server_stopped"
    conn.node.stores = None  # not opened yet is the same
    assert conn.ask(b"get k") == b"server_stopped"


def test_server_write_lock_refuses_writes_and_serves_reads(conn):
    conn.ask(b"put k v")
    everything = KeyRange(ME.position, ME.position)
    conn.node.write_locks.append(everything)
    assert conn.ask(b"put k w") == b"server_write_lock"
    assert conn.ask(b"put new w") == b"server_write_lock"
    assert conn.ask(b"delete k") == b"server_write_lock"
    assert conn.ask(b"get k") == b"get_success k v"
    conn.node.write_locks.remove(everything)
    assert conn.ask(b"put k w") == b"put_update k"
    assert stored(conn.node) == {b"k": b"w"}


def _key_owned_by(ring: Ring, owner: NodeInfo) -> bytes:
    for i in range(10_000):
        key = b"key%d" % i
        if ring.nodes[ring.owner_index(position(key))] == owner:
            return key
    raise AssertionError("no key found")


def test_server_not_responsible_with_two_servers(tmp_path):
    ring = Ring((ME, OTHER), epoch=1, replication=1)
    node = open_node(tmp_path, ring=ring)
    try:
        conn = Connection(node)
        mine, theirs = _key_owned_by(ring, ME), _key_owned_by(ring, OTHER)
        assert conn.ask(b"put " + theirs + b" v") == b"server_not_responsible"
        assert conn.ask(b"get " + theirs) == b"server_not_responsible"
        assert conn.ask(b"delete " + theirs) == b"server_not_responsible"
        assert conn.ask(b"put " + mine + b" v") == b"put_success " + mine
        assert conn.ask(b"get " + mine) == b"get_success " + mine + b" v"
        assert stored(node) == {mine: b"v"}
        # keyrange lists both servers, each with its own console address.
        text = conn.ask(b"keyrange")
        assert text.count(b";") == 2
        assert b"127.0.0.1:50001;" in text and b"127.0.0.1:50002;" in text
    finally:
        node.stores.close()


def test_reads_go_to_either_member_of_a_chain_of_two(tmp_path):
    net = SimNet(tmp_path)
    ring = Ring((ME, OTHER), epoch=1, replication=2)
    node = net.add(ME, ring)
    net.add(OTHER, ring)
    try:
        conn = Connection(node)
        other = Connection(net.nodes[OTHER.name])
        mine, theirs = _key_owned_by(ring, ME), _key_owned_by(ring, OTHER)
        # I head my range, the other server is its tail: the put is mine, and answered once
        # the chain has carried it to the tail; both of us answer gets (CRAQ).
        conn.proto.dataReceived(b"put " + mine + b" v\r\n")
        net.run(1.0)
        assert conn.take() == b"put_success " + mine + b"\r\n"
        assert conn.ask(b"get " + mine) == b"get_success " + mine + b" v"
        assert other.ask(b"get " + mine) == b"get_success " + mine + b" v"
        # I am the tail of the other's range: reads of it are mine, writes are not.
        assert conn.ask(b"put " + theirs + b" v") == b"server_not_responsible"
        other.proto.dataReceived(b"put " + theirs + b" replicated\r\n")
        net.run(1.0)
        assert other.take() == b"put_success " + theirs + b"\r\n"
        assert conn.ask(b"get " + theirs) == b"get_success " + theirs + b" replicated"
    finally:
        net.close()


def test_a_console_protocol_is_built_per_connection(node):
    factory = ConsoleFactory(node)
    a, b = factory.buildProtocol(None), factory.buildProtocol(None)
    assert isinstance(a, ConsoleProtocol) and a is not b
    ta, tb = StringTransport(), StringTransport()
    a.makeConnection(ta)
    b.makeConnection(tb)
    a.dataReceived(b"put k ")
    b.dataReceived(b"get k\r\n")  # a's half line does not leak into b
    assert tb.value() == GREETING + b"get_error k\r\n"
