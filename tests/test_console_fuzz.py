"""Hypothesis throws random bytes, in random chunks, at a console connection.

Whatever arrives: the protocol never raises, every complete line gets exactly one reply line,
and the store afterwards holds exactly what the accepted puts and deletes imply. Lines that are
well-formed requests get exactly the reply a reference model predicts; for any other line the
reply must at least be consistent with the line and the model (an ``error`` changes nothing).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from chainstore.cache import make_cache
from chainstore.console import ConsoleProtocol
from chainstore.limits import MAX_LINE_BYTES
from chainstore.node import KVNode
from chainstore.ring import NodeInfo
from chainstore.storage import StoreSet

ME = NodeInfo("fuzz", "127.0.0.1", 50009, 51009)
KEY_CHARS = bytes(range(0x21, 0x7F))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = KVNode(ME, make_cache("LFU", 4), Clock())
    node.stores = StoreSet.open(str(tmp_path_factory.mktemp("fuzz")))
    yield node
    node.stores.close()


def reset(node: KVNode) -> None:
    store = node.stores.coordinator
    for key, _ in list(store.items()):
        store.delete(key)
    node.cache.clear()


# -- inputs --------------------------------------------------------------------------------------

keys = st.sampled_from([b"a", b"B", b"k1", b"x" * 20, b"~!", b"x" * 21, b"", b"k\xe9", b"a b"])
values = st.one_of(
    st.sampled_from([b"v", b"two  spaces", b" lead", b"trail ", b"caf\xe9", b"a\rb", b"\t"]),
    st.binary(max_size=12).filter(lambda v: b"\n" not in v),
)
commands = st.sampled_from([b"put", b"get", b"delete", b"PUT", b"Get", b"keyrange", b"help",
                            b"keyrange_read", b"stats", b"ping", b"closing_client", b"pUt"])
line_ends = st.sampled_from([b"\n", b"\r\n"])


@st.composite
def request_lines(draw) -> bytes:
    command = draw(commands)
    parts = [command]
    if command.lower() in (b"put", b"get", b"delete"):
        parts.append(draw(keys))
        if command.lower() == b"put":
            parts.append(draw(values))
    return b" ".join(parts) + draw(line_ends)


pieces = st.one_of(
    request_lines(),
    st.binary(max_size=30),  # anything at all, newlines included
    st.sampled_from([b"\n", b"\r\n", b"\r", b" ", b"\x00", b"\xff"]),
)


# -- the reference model -------------------------------------------------------------------------


def valid_key(key: bytes) -> bool:
    return 1 <= len(key) <= 20 and all(b in KEY_CHARS for b in key)


STRICT = re.compile(rb"(?i:(put|get|delete)) ([\x21-\x7e]{1,20})(?: (.*))?", re.S)


def strict_request(line: bytes):
    """(command, key, value) if the line is an unmistakably well-formed put/get/delete: one
    space between the words, a valid key, and for a put a value with something visible in it."""
    m = STRICT.fullmatch(line)
    if m is None:
        return None
    command, key, value = m.group(1).lower(), m.group(2), m.group(3)
    if command == b"put":
        if value is None or not value.strip():
            return None
        if b"\r" in value:
            return b"refused", key, value  # a value the console could not send back
        return command, key, value
    if value is not None:
        return None
    return command, key, None


def expected_reply(model: dict[bytes, bytes], request) -> bytes | None:
    """The exact reply, or None where only an ``error`` line will do."""
    command, key, value = request
    if command == b"refused":
        return None
    if command == b"put":
        reply = (b"put_update " if key in model else b"put_success ") + key
        model[key] = value
        return reply
    if command == b"get":
        return b"get_success %s %s" % (key, model[key]) if key in model else b"get_error " + key
    if key in model:
        del model[key]
        return b"delete_success " + key
    return b"delete_error " + key


def check_other_reply(model: dict[bytes, bytes], line: bytes, reply: bytes) -> None:
    """A line the strict grammar does not cover: its reply must still tell the truth."""
    word, _, rest = reply.partition(b" ")
    if word == b"error":
        assert rest, reply
        return
    if word in (b"keyrange_success", b"keyrange_read_success", b"stats", b"help"):
        return
    assert word in (b"put_success", b"put_update", b"get_success", b"get_error",
                    b"delete_success", b"delete_error"), (line, reply)
    key = rest.split(b" ", 1)[0]
    assert valid_key(key), (line, reply)
    assert key in line, (line, reply)
    if word in (b"put_success", b"put_update"):
        assert (word == b"put_update") == (key in model), (line, reply)
        # The value is the rest of the line after the key and one space.
        value = line[line.index(key + b" ") + len(key) + 1:]
        assert value.strip() and b"\r" not in value, (line, reply)
        model[key] = value
    elif word == b"get_success":
        assert reply == b"get_success %s %s" % (key, model[key]), (line, reply)
    elif word == b"get_error":
        assert key not in model, (line, reply)
    elif word == b"delete_success":
        del model[key]
    else:
        assert key not in model, (line, reply)


# -- the test ------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(pieces, max_size=25), cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_random_bytes_in_random_chunks(node, parts, cuts):
    reset(node)
    stream = b"".join(parts)
    transport = StringTransport()
    proto = ConsoleProtocol(node)
    proto.makeConnection(transport)
    greeting = transport.value()
    transport.clear()
    assert greeting.endswith(b"\r\n") and greeting.count(b"\n") == 1

    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for start, end in zip(bounds, bounds[1:]):
        proto.dataReceived(stream[start:end])  # must never raise
        node.clock.advance(0)  # each read is a reactor turn: writes commit and answer then

    *lines, unfinished = stream.split(b"\n")
    out = transport.value()
    replies = out.split(b"\r\n")
    assert replies.pop() == b"", (stream, out)  # nothing but whole reply lines
    assert len(replies) == len(lines), (stream, out)
    # End the unfinished line, if any, then ask for one key: the connection still serves.
    transport.clear()
    proto.dataReceived(b"\nget a\r\n")
    node.clock.advance(0)
    lines.append(unfinished)
    replies += transport.value().split(b"\r\n")[:-1]
    lines.append(b"get a")
    assert len(replies) == len(lines), (stream, transport.value())

    model: dict[bytes, bytes] = {}
    for raw, reply in zip(lines, replies):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        request = strict_request(line.lstrip(b" \t"))
        if request is not None:
            expected = expected_reply(model, request)
            if expected is None:
                assert reply.startswith(b"error "), (line, reply)
            else:
                assert reply == expected, (line, reply)
        else:
            check_other_reply(model, line, reply)

    assert dict(node.stores.coordinator.items()) == model
    proto.connectionLost(None)


# -- whole connections: over-long lines, deep pipelines, random reactor turns ----------------------

CLASSIC = {b"put_success", b"put_update", b"put_error", b"get_success", b"get_error",
           b"delete_success", b"delete_error", b"server_stopped", b"server_write_lock",
           b"server_not_responsible", b"keyrange_success", b"keyrange_read_success", b"stats",
           b"help", b"error"}

TOO_LONG_LINE = st.integers(MAX_LINE_BYTES + 1, MAX_LINE_BYTES + 64).map(lambda n: b"x" * n)

connection_lines = st.one_of(
    request_lines().map(lambda line: line.rstrip(b"\r\n")),
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")),
    TOO_LONG_LINE,
    st.integers(0, 40).map(lambda i: b"put p%d v%d" % (i, i)),  # writes that wait for a turn
)


class FailureLog:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_failure") is not None:
            self.events.append(event)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(lines=st.lists(connection_lines, max_size=40), burst=st.integers(0, 600),
       at=st.integers(0, 40), cuts=st.lists(st.integers(0, 1 << 19), max_size=10),
       turns=st.lists(st.booleans(), max_size=10))
def test_a_whole_connection_gets_one_classic_reply_per_line_in_order(node, lines, burst, at,
                                                                     cuts, turns):
    """A burst of pipelined writes (more than the console lets wait before it stops reading)
    lands somewhere among the other lines."""
    reset(node)
    lines = lines[:at] + [b"put b%d v" % (i % 50) for i in range(burst)] + lines[at:]
    failures = FailureLog()
    globalLogPublisher.addObserver(failures)
    try:
        transport = StringTransport()
        proto = ConsoleProtocol(node)
        proto.makeConnection(transport)
        transport.clear()
        stream = b"".join(line + b"\r\n" for line in lines)
        bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
        for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
            proto.dataReceived(stream[start:end])  # must never raise
            if i < len(turns) and turns[i]:
                node.clock.advance(0)  # sometimes a reactor turn between reads, sometimes not
        for _ in range(len(lines) // 100 + 3):
            node.clock.advance(0)  # the writes commit; paused reading resumes and drains
        replies = transport.value().split(b"\r\n")
        assert replies.pop() == b""
        assert len(replies) == len(lines)
        for line, reply in zip(lines, replies):
            word, _, rest = reply.partition(b" ")
            assert word in CLASSIC, (line[:60], reply[:80])
            if len(line) > MAX_LINE_BYTES:
                assert reply.startswith(b"error message too long"), reply[:80]
            elif word not in (b"error", b"keyrange_success", b"keyrange_read_success",
                              b"stats", b"help") and word[:6] != b"server":
                assert rest.split(b" ", 1)[0] in line, (line[:60], reply[:80])  # its own key
        assert not transport.disconnecting  # malformed input never closes the connection
        assert transport.producerState == "producing"  # reading was resumed, if paused
        proto.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(failures)
    assert failures.events == []  # no request failed in a way the console did not expect
