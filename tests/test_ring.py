"""The consistent-hashing ring: positions, ownership with wrap-around, chains, and the classic
``keyrange`` text that third-party clients parse."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainstore.ring import (
    KeyRange,
    NodeInfo,
    Ring,
    parse_keyrange,
    parse_position,
    position,
    render_position,
)

TOP = (1 << 128) - 1


def node(i: int, host: str = "127.0.0.1") -> NodeInfo:
    return NodeInfo(f"s{i}", host, 50000 + i, 51000 + i)


def ring_of(count: int, replication: int = 3) -> Ring:
    return Ring(tuple(node(i) for i in range(count)), epoch=1, replication=replication)


def test_the_md5_vector_of_the_classic_protocol():
    me = NodeInfo("x", "127.0.0.2", 6870, 6871)
    assert render_position(me.position) == "411900A46428D02426F4951156382B7D"
    assert me.console_address == "127.0.0.2:6870"
    assert position(b"127.0.0.2:6870") == 0x411900A46428D02426F4951156382B7D


def test_render_and_parse_positions():
    assert render_position(0) == "0" * 32
    assert render_position(TOP) == "F" * 32
    assert render_position(0xAB) == "000000000000000000000000000000AB"
    assert parse_position("ab") == 0xAB
    assert parse_position("411900a46428d02426f4951156382b7d") == 0x411900A46428D02426F4951156382B7D
    with pytest.raises(ValueError):
        parse_position("1" + "0" * 32)  # 129 bits
    with pytest.raises(ValueError):
        parse_position("xyz")


@pytest.mark.parametrize(
    ("start", "end", "inside", "outside"),
    [
        (10, 20, [11, 15, 20], [10, 9, 21, 0, TOP]),
        # wrapping past zero: (TOP-5, 5]
        (TOP - 5, 5, [TOP - 4, TOP, 0, 1, 5], [TOP - 5, 6, 100]),
        # start == end: the whole ring
        (42, 42, [0, 41, 42, 43, TOP], []),
    ],
)
def test_key_range_is_half_open_and_wraps(start, end, inside, outside):
    r = KeyRange(start, end)
    for pos in inside:
        assert pos in r, pos
    for pos in outside:
        assert pos not in r, pos


def test_owner_is_the_first_server_at_or_after_the_key_and_wraps():
    ring = ring_of(4)
    positions = [n.position for n in ring.nodes]
    assert positions == sorted(positions)
    # Exactly at a server's position: that server; one past: the next one.
    for i, pos in enumerate(positions):
        assert ring.owner_index(pos) == i
        assert ring.owner_index(pos - 1) == i
        assert ring.owner_index(pos + 1) == (i + 1) % 4
    # Past the last server, and below the first: wraps to the first.
    assert ring.owner_index(TOP) == 0
    assert ring.owner_index(0) == 0
    assert ring.owner_index(positions[-1] + 1) == 0


def test_owner_by_key_agrees_with_the_md5_of_the_key():
    ring = ring_of(5, replication=1)
    for i in range(200):
        key = b"key%d" % i
        pos = int(hashlib.md5(key).hexdigest(), 16)
        owner = ring.head(key)
        start = ring.range_of(ring.index_of(owner.name)).start
        assert pos in KeyRange(start, owner.position)


def test_ring_orders_nodes_and_refuses_duplicates():
    nodes = tuple(node(i) for i in range(6))
    ring = Ring(tuple(reversed(nodes)))
    assert sorted(ring.nodes, key=lambda n: n.position) == list(ring.nodes)
    assert len(ring) == 6
    assert ring.node("s3") == node(3)
    with pytest.raises(ValueError, match="position"):
        Ring((node(1), NodeInfo("other", "127.0.0.1", 50001, 1)))
    with pytest.raises(ValueError, match="name"):
        Ring((node(1), NodeInfo("s1", "127.0.0.1", 59999, 1)))
    with pytest.raises(KeyError):
        ring.node("nope")
    with pytest.raises(LookupError):
        Ring(()).owner_index(0)


@pytest.mark.parametrize(("count", "replication"), [(1, 3), (2, 3), (3, 3), (5, 3), (5, 1), (4, 2)])
def test_chains_have_length_min_replication_n_and_follow_the_ring(count, replication):
    ring = ring_of(count, replication)
    assert ring.chain_length == min(replication, count)
    for i in range(count):
        chain = ring.chain_for_index(i)
        assert len(chain) == min(replication, count)
        assert len(set(chain)) == len(chain)  # no server twice in one chain
        assert [ring.index_of(n.name) for n in chain] == [
            (i + k) % count for k in range(len(chain))
        ]
    key = b"some-key"
    assert ring.head(key) == ring.chain(key)[0] == ring.nodes[ring.owner_index(position(key))]
    assert ring.tail(key) == ring.chain(key)[-1]


TRIPLE = re.compile(r"([0-9A-F]{32}),([0-9A-F]{32}),([0-9.]+):(\d+);")


def _triples(text: str) -> list[tuple[str, str, str, int]]:
    """Split a keyrange payload, insisting that it is nothing but well-formed triples."""
    found = TRIPLE.findall(text)
    assert "".join(f"{a},{b},{h}:{p};" for a, b, h, p in found) == text, text
    return [(a, b, h, int(p)) for a, b, h, p in found]


def test_keyrange_text_with_one_server_is_from_equal_to():
    me = NodeInfo("x", "127.0.0.2", 6870, 6871)
    ring = Ring((me,), replication=1)
    expected = "411900A46428D02426F4951156382B7D,411900A46428D02426F4951156382B7D,127.0.0.2:6870;"
    assert ring.keyrange_text() == expected
    assert ring.keyrange_read_text() == expected


def test_keyrange_text_lists_every_range_with_its_head():
    ring = ring_of(4, replication=3)
    heads = _triples(ring.keyrange_text())
    assert len(heads) == 4
    for i, (start, end, host, port) in enumerate(heads):
        prev = ring.nodes[(i - 1) % 4]
        assert start == render_position(prev.position)
        assert end == render_position(ring.nodes[i].position)
        assert (host, port) == (ring.nodes[i].host, ring.nodes[i].console_port)
        # The console port, not the AMP port: classic clients connect to the console.
        assert port != ring.nodes[i].amp_port


def test_keyrange_read_lists_each_server_with_its_own_and_two_predecessors_ranges():
    ring = ring_of(5, replication=3)
    reads = _triples(ring.keyrange_read_text())
    assert len(reads) == 5
    for i, (start, end, host, port) in enumerate(reads):
        assert start == render_position(ring.nodes[(i - 3) % 5].position)
        assert end == render_position(ring.nodes[i].position)
        assert (host, port) == (ring.nodes[i].host, ring.nodes[i].console_port)
    # Every key is readable at exactly the members of its chain.
    for k in range(200):
        key = b"key%d" % k
        readers = [(h, p) for r, h, p in parse_keyrange(ring.keyrange_read_text())
                   if r.contains_key(key)]
        assert sorted(readers) == sorted((n.host, n.console_port) for n in ring.chain(key))


def test_keyrange_read_with_three_servers_gives_each_the_whole_ring_and_skips_the_dead():
    ring = ring_of(3, replication=3)
    reads = _triples(ring.keyrange_read_text())
    assert [(a == b) for a, b, _, _ in reads] == [True, True, True]
    dead = Ring(ring.nodes, replication=3, dead={ring.nodes[1].name})
    assert [p for _, _, _, p in _triples(dead.keyrange_read_text())] == [
        ring.nodes[0].console_port, ring.nodes[2].console_port]


def test_keyrange_uses_uppercase_hex():
    ring = ring_of(8)
    text = ring.keyrange_text() + ring.keyrange_read_text()
    hex_digits = "".join(re.findall(r"[0-9A-Fa-f]{32}", text))
    assert hex_digits == hex_digits.upper()
    assert any(c in "ABCDEF" for c in hex_digits)  # the check above had letters to look at


def test_parse_keyrange_round_trip_and_tolerance():
    ring = ring_of(5)
    parsed = parse_keyrange(ring.keyrange_text())
    assert [(r, h, p) for r, h, p in parsed] == [
        (ring.range_of(i), n.host, n.console_port) for i, n in enumerate(ring.nodes)
    ]
    # Lowercase hex, spaces around triples, and a last triple without ';' still parse.
    text = ring.keyrange_text().lower().replace(";", " ; ").rstrip(" ;")
    assert parse_keyrange(text) == parsed
    assert parse_keyrange("") == []


def test_parse_keyrange_refuses_garbage():
    with pytest.raises(ValueError):
        parse_keyrange("00,11;")
    with pytest.raises(ValueError):
        parse_keyrange(f"{'0' * 32},{'G' * 32},127.0.0.1:5000;")


@settings(max_examples=200, deadline=None)
@given(
    ports=st.sets(st.integers(1, 65535), min_size=1, max_size=12),
    keys=st.lists(st.binary(min_size=1, max_size=20), max_size=30),
    replication=st.integers(1, 4),
)
def test_every_key_has_exactly_one_owner_and_the_ranges_partition_the_ring(
        ports, keys, replication):
    ring = Ring(tuple(NodeInfo(f"n{p}", "127.0.0.1", p, p) for p in ports),
                replication=replication)
    ranges = [ring.range_of(i) for i in range(len(ring))]
    # The ranges partition the ring: consecutive, end to start, covering it once.
    for i, r in enumerate(ranges):
        assert r.start == ranges[i - 1].end
    probes = [position(k) for k in keys] + [0, TOP] + [n.position for n in ring.nodes] + [
        (n.position + 1) & TOP for n in ring.nodes]
    for pos in probes:
        owners = [i for i, r in enumerate(ranges) if pos in r]
        assert owners == [ring.owner_index(pos)], (pos, owners)
    # The text form says the same.
    parsed = parse_keyrange(ring.keyrange_text())
    for key in keys:
        holders = [(h, p) for r, h, p in parsed if r.contains_key(key)]
        head = ring.head(key)
        assert holders == [(head.host, head.console_port)]
