"""What has to move when the ring changes: a pure function of the old and the new ring.

The ring positions of both rings cut the circle into elementary intervals; inside one, every key
has the same chain in the old ring and the same chain in the new one. For each interval whose
chain changes, every server of the new chain must hold the interval in the store of its new role
(head -> coordinator, middle -> replica1, tail -> replica2, by position in the chain):

- a server that held it in another store copies it locally (C{LocalMove});
- a server that did not hold it receives it from a surviving member of the old chain
  (C{Copy}, source preferring the head: it has seen every write the others have);
- after the switch, every store that holds an interval it no longer should drops it (C{Drop}).

Writes to a changing interval are locked at its old head while the data moves; reads stop at its
old tail only for the switch itself (see L{ecs.reconfiguration}).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from chainstore.ring import KeyRange, Ring
from chainstore.storage import STORE_NAMES
from ecs.failures import last_to_leave


@dataclass(frozen=True)
class Copy:
    range: KeyRange
    source: str
    source_store: str
    target: str
    target_store: str


@dataclass(frozen=True)
class LocalMove:
    range: KeyRange
    server: str
    source_store: str
    target_store: str


@dataclass(frozen=True)
class Drop:
    range: KeyRange
    server: str
    store: str


@dataclass
class Plan:
    #: server name -> ranges whose writes it must refuse while data moves (old heads)
    write_locks: dict[str, list[KeyRange]] = field(default_factory=dict)
    #: server name -> ranges whose reads it must refuse during the switch (old tails)
    read_locks: dict[str, list[KeyRange]] = field(default_factory=dict)
    copies: list[Copy] = field(default_factory=list)
    moves: list[LocalMove] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    #: ranges that had no surviving replica: their data is gone (only without replication)
    lost: list[KeyRange] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.copies or self.moves or self.drops or self.write_locks)


def intervals(old: Ring, new: Ring) -> list[tuple[KeyRange, tuple[str, ...], tuple[str, ...]]]:
    """Elementary intervals with their old and new chains (server names, head first)."""
    cuts = sorted({n.position for n in old.nodes} | {n.position for n in new.nodes})
    if not cuts:
        return []
    result = []
    for i, end in enumerate(cuts):
        start = cuts[i - 1]  # i == 0 wraps to the last cut
        rng = KeyRange(start, end)
        result.append((rng, _chain(old, end), _chain(new, end)))
    return result


def _chain(ring: Ring, pos: int) -> tuple[str, ...]:
    """The ring chain, dead members included: a member's place fixes the store it uses."""
    if not ring.nodes:
        return ()
    return tuple(n.name for n in ring.ring_chain(ring.owner_index(pos)))


def chain_epochs(old: Ring, new: Ring) -> dict[str, int]:
    """For each server of C{new}, the epoch at which the chain of the range it heads was formed:
    the old one if that chain has the same members in the same order as in C{old}, else
    C{new}'s epoch (a new chain, whose serials start again)."""
    formed = {}
    old_names = {n.name for n in old.nodes}
    for index, node in enumerate(new.nodes):
        members = [n.name for n in new.ring_chain(index)]
        if node.name in old_names:
            before = old.index_of(node.name)
            if [n.name for n in old.ring_chain(before)] == members:
                formed[node.name] = old.nodes[before].chain_epoch
                continue
        formed[node.name] = new.epoch
    return formed


def plan(old: Ring, new: Ring, dead: Collection[str] = (),
         returned: Collection[str] = (), left: Mapping[str, int] | None = None) -> Plan:
    """The data movement that takes the cluster from C{old} to C{new}.

    C{dead} names servers of the old ring that cannot take part (failed): they are neither
    sources nor lock holders, and nothing is dropped on them. Members the old ring itself
    marks dead count as dead too. C{returned} names dead members that are reachable again:
    one serves as the copy source of an interval that has no live member left if it is the
    member of the interval's old chain that left last (C{left}: the epoch each dead member was
    marked dead in; see L{ecs.failures.last_to_leave}): it holds every write the chain
    acknowledged, and nothing was written since. Returned members take no other part.
    """
    dead = set(dead) | set(old.dead)
    result = Plan()
    for rng, before, after in _merged(intervals(old, new)):
        if before == after:
            continue
        alive = [name for name in before if name not in dead]
        last = None if alive else last_to_leave(before, left or {})
        sources = alive or [name for name in before if name == last and name in returned]
        if alive:
            # Writes enter at the head; if it died, the surviving first member is the one a
            # stale client could still reach with the old ring.
            result.write_locks.setdefault(alive[0], []).append(rng)
            # Every member answers reads (chainstore/craq.py): none may answer for the old
            # chain once the new one can commit writes.
            for name in alive:
                result.read_locks.setdefault(name, []).append(rng)
        elif before and not sources:
            result.lost.append(rng)
        for role, server in enumerate(after):
            store = STORE_NAMES[role]
            if server in before and server not in dead:
                old_role = before.index(server)
                if old_role != role:
                    result.moves.append(LocalMove(rng, server, STORE_NAMES[old_role], store))
            elif sources:
                source = sources[0]
                result.copies.append(
                    Copy(rng, source, STORE_NAMES[before.index(source)], server, store))
        for old_role, server in enumerate(before):
            if server in dead:
                continue
            if server not in after or after.index(server) != old_role:
                result.drops.append(Drop(rng, server, STORE_NAMES[old_role]))
    return result


def _merged(
    items: list[tuple[KeyRange, tuple[str, ...], tuple[str, ...]]],
) -> list[tuple[KeyRange, tuple[str, ...], tuple[str, ...]]]:
    """Join neighbouring intervals with the same chains, so each move is one range."""
    merged: list[tuple[KeyRange, tuple[str, ...], tuple[str, ...]]] = []
    for rng, before, after in items:
        if merged and merged[-1][1:] == (before, after) and merged[-1][0].end == rng.start:
            prev = merged[-1][0]
            merged[-1] = (KeyRange(prev.start, rng.end), before, after)
        else:
            merged.append((rng, before, after))
    if len(merged) > 1 and merged[0][1:] == merged[-1][1:] and merged[-1][0].end == merged[0][0].start:
        last = merged.pop()
        merged[0] = (KeyRange(last[0].start, merged[0][0].end), merged[0][1], merged[0][2])
    return merged
