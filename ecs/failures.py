"""Questions the ECS asks of a ring with dead members, answered from the ring alone: which
ranges lost every replica, and whether a dead member may rejoin its chains as it is."""

from __future__ import annotations

from chainstore.ring import KeyRange, Ring


def orphaned_ranges(ring: Ring, returned: set[str] = frozenset()) -> list[KeyRange]:
    """Ranges of C{ring} whose every replica is dead and none of them is back (in C{returned}).
    (With replication 1 any failure is handled like a removal: its data is gone.)"""
    return [ring.range_of(i) for i in range(len(ring.nodes))
            if not ring.chain_for_index(i)
            and not {n.name for n in ring.ring_chain(i)} & returned]


def may_revive(ring: Ring, name: str) -> bool:
    """Whether dead member C{name} can rejoin its chains as it is: only if every chain it is
    in has no live member, so nothing was written there while it was away."""
    names = [n.name for n in ring.nodes]
    if name not in names:
        return False
    me = names.index(name)
    for position in range(ring.chain_length):
        owner = (me - position) % len(names)
        if ring.chain_for_index(owner):
            return False
    return True
