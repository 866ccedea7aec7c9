"""The consistent-hashing ring: who is responsible for which key, in which epoch.

A server's position is the MD5 of its console address ``"host:port"``; a key's position is the
MD5 of the key. Positions are 128-bit integers. Server i owns the range (predecessor, i] and, with
chain replication, is the head of that range's chain; the next servers clockwise are its middle
and tail. With one server, predecessor == self and it owns the whole ring.

Server, ECS and client library all use this one module, so all three agree on ownership.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field

RING_BITS = 128


def position(data: bytes) -> int:
    """The ring position of C{data}: its MD5 as a 128-bit integer."""
    return int.from_bytes(hashlib.md5(data).digest(), "big")


def render_position(pos: int) -> str:
    """A position as the classic protocol writes it: 32 uppercase hex digits."""
    return f"{pos:032X}"


def parse_position(text: str) -> int:
    """Parse a position written in hex (any case)."""
    value = int(text, 16)
    if not 0 <= value < 1 << RING_BITS:
        raise ValueError(f"{text!r} is not a 128-bit ring position")
    return value


@dataclass(frozen=True, order=True)
class NodeInfo:
    """Where one server is reached.

    C{host} and C{console_port} are the address of the text console, which fixes the ring
    position (classic clients connect there). C{amp_port} is where the AMP protocol listens, on
    the same host.
    """

    name: str
    host: str
    console_port: int
    amp_port: int
    #: a ring position chosen by the ECS (see ``placement`` in docs/DESIGN.md); None: the MD5 of
    #: the console address. Not part of a server's identity (a server knows its address, and
    #: learns its position from the ring).
    token: int | None = field(default=None, compare=False)
    #: the epoch at which the chain of the range this server heads got its members (the ECS
    #: keeps it while they stay the same); part of the chain's identity, so a server that
    #: missed a ring in between cannot take a re-formed chain of the same names for its old one
    chain_epoch: int = field(default=0, compare=False)

    @property
    def console_address(self) -> str:
        return f"{self.host}:{self.console_port}"

    @property
    def position(self) -> int:
        if self.token is not None:
            return self.token
        return position(self.console_address.encode("ascii"))


@dataclass(frozen=True)
class KeyRange:
    """The range (start, end] of the ring, wrapping past zero; start == end is the whole ring."""

    start: int
    end: int

    def __contains__(self, pos: int) -> bool:
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start < pos <= self.end
        return pos > self.start or pos <= self.end

    def contains_key(self, key: bytes) -> bool:
        return position(key) in self


@dataclass(frozen=True)
class Ring:
    """An immutable view of the membership in one epoch.

    C{replication} is the configured chain length; chains are shorter when fewer servers exist.
    C{dead} names members that failed and have not been taken out yet: they keep their ring
    positions (so every survivor keeps the store of its position) but are skipped in chains.
    """

    nodes: tuple[NodeInfo, ...]
    epoch: int = 0
    replication: int = 3
    dead: frozenset[str] = frozenset()
    _positions: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _live_chains: dict[int, tuple[NodeInfo, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.nodes, key=lambda n: (n.position, n.name)))
        positions = tuple(n.position for n in ordered)
        if len(set(positions)) != len(positions):
            raise ValueError("two servers share one ring position (same console address?)")
        if len({n.name for n in ordered}) != len(ordered):
            raise ValueError("two servers share one name")
        unknown = set(self.dead) - {n.name for n in ordered}
        if unknown:
            raise ValueError(f"dead members {sorted(unknown)} are not in the ring")
        object.__setattr__(self, "nodes", ordered)
        object.__setattr__(self, "dead", frozenset(self.dead))
        object.__setattr__(self, "_positions", positions)
        # index -> live chain, filled on first use (a ring never changes; every request asks)
        object.__setattr__(self, "_live_chains", {})

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def chain_length(self) -> int:
        return min(self.replication, len(self.nodes))

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def index_of(self, name: str) -> int:
        for i, n in enumerate(self.nodes):
            if n.name == name:
                return i
        raise KeyError(name)

    def owner_index(self, pos: int) -> int:
        """Index of the server whose range holds C{pos}: the first at or after it, wrapping."""
        if not self.nodes:
            raise LookupError("the ring is empty")
        i = bisect.bisect_left(self._positions, pos)
        return i % len(self.nodes)

    def range_of(self, index: int) -> KeyRange:
        """The range (predecessor, node] that server C{index} is the head of."""
        n = len(self.nodes)
        return KeyRange(self._positions[(index - 1) % n], self._positions[index])

    def ring_chain(self, index: int) -> tuple[NodeInfo, ...]:
        """The ring positions of the chain of range C{index}, dead members included.

        A member's place in this tuple fixes the store it keeps the range in.
        """
        n = len(self.nodes)
        return tuple(self.nodes[(index + k) % n] for k in range(self.chain_length))

    def chain_for_index(self, index: int) -> tuple[NodeInfo, ...]:
        """Head, middle, ..., tail of the live chain of the range owned by server C{index}."""
        chain = self._live_chains.get(index)
        if chain is None:
            chain = tuple(n for n in self.ring_chain(index) if n.name not in self.dead)
            self._live_chains[index] = chain
        return chain

    def chain(self, key: bytes) -> tuple[NodeInfo, ...]:
        return self.chain_for_index(self.owner_index(position(key)))

    @property
    def live_nodes(self) -> tuple[NodeInfo, ...]:
        return tuple(n for n in self.nodes if n.name not in self.dead)

    def head(self, key: bytes) -> NodeInfo:
        return self.chain(key)[0]

    def tail(self, key: bytes) -> NodeInfo:
        return self.chain(key)[-1]

    def keyrange_text(self) -> str:
        """The payload of C{keyrange_success}: every range with its head."""
        return "".join(
            f"{render_position(r.start)},{render_position(r.end)},{node.console_address};"
            for r, node in self._ranges_with(0)
        )

    def keyrange_read_text(self) -> str:
        """The payload of C{keyrange_read_success}: every live server with the range it can
        read, its own and its predecessors' in the chain (two with replication 3), as classic
        clients of the replication milestone expect. Any member of a chain answers reads
        (L{chainstore.craq}), so each key is listed once per live member of its chain."""
        return "".join(
            f"{render_position(r.start)},{render_position(r.end)},{node.console_address};"
            for r, node in self.read_ranges()
        )

    def read_ranges(self) -> list[tuple[KeyRange, NodeInfo]]:
        """Each live server with (its chain_length-th predecessor, itself]: the ranges whose
        chain it belongs to (the whole ring, start == end, when every server is in every
        chain)."""
        n, back = len(self.nodes), self.chain_length
        return [(KeyRange(self._positions[(i - back) % n], self._positions[i]), node)
                for i, node in enumerate(self.nodes) if node.name not in self.dead]

    def _ranges_with(self, end: int) -> list[tuple[KeyRange, NodeInfo]]:
        """Every range with the live member at C{end} of its chain (0 head, -1 tail)."""
        result = []
        for i in range(len(self.nodes)):
            chain = self.chain_for_index(i)
            if chain:  # a range whose every replica is dead has nobody to list
                result.append((self.range_of(i), chain[end]))
        return result


def parse_keyrange(text: str) -> list[tuple[KeyRange, str, int]]:
    """Parse a classic C{keyrange} payload into (range, host, port) triples."""
    result = []
    for triple in text.split(";"):
        triple = triple.strip()
        if not triple:
            continue
        start, end, address = triple.split(",")
        host, _, port = address.rpartition(":")
        result.append((KeyRange(parse_position(start), parse_position(end)), host, int(port)))
    return result
