"""Questions the ECS asks of a ring with dead members, answered from the ring and the order in
which its dead members left (the epoch the ECS marked each dead in): which ranges lost every
replica, which member can bring such a range back, and whether a dead member may rejoin its
chains as it is.

Of a chain whose members are all dead, only the one that left last holds every write the chain
acknowledged: while it was alive the chain's writes reached it (every acknowledged write is at
every member of the chain of its epoch, and it was in every such chain), and once it was marked
dead the chain had no member left to take any. One that left earlier lacks the writes the chain
acknowledged after it left. See "When every replica of a range is down" in docs/DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from chainstore.ring import KeyRange, Ring


def last_to_leave(chain: Iterable[str], left: Mapping[str, int]) -> str | None:
    """The member of C{chain} (every one of them dead, marked in epoch C{left[name]}) that
    left last, or None if that is not known (no epoch recorded, or two with the same one: only
    a state saved before the epochs were kept)."""
    epochs = sorted(((left.get(name, 0), name) for name in chain), reverse=True)
    if not epochs or epochs[0][0] <= 0 or (len(epochs) > 1 and epochs[1][0] == epochs[0][0]):
        return None
    return epochs[0][1]


def orphaned_ranges(ring: Ring, returned: set[str] = frozenset(),
                    left: Mapping[str, int] | None = None) -> list[KeyRange]:
    """Ranges of C{ring} whose every replica is dead and whose last replica to leave (see
    L{last_to_leave}) is not back (in C{returned}): a range a repair would lose or bring back
    stale. (With replication 1 any failure is handled like a removal: its data is gone.)"""
    left = left or {}
    return [ring.range_of(i) for i in range(len(ring.nodes))
            if not ring.chain_for_index(i)
            and last_to_leave((n.name for n in ring.ring_chain(i)), left) not in returned]


def missing_members(ring: Ring, returned: set[str] = frozenset(),
                    left: Mapping[str, int] | None = None) -> list[str]:
    """The dead members whose return the orphaned ranges of C{ring} wait for (the last to leave
    of each; none where that is not known)."""
    left = left or {}
    names = {last_to_leave((n.name for n in ring.ring_chain(i)), left)
             for i in range(len(ring.nodes)) if not ring.chain_for_index(i)}
    return sorted(n for n in names if n is not None and n not in returned)


def may_revive(ring: Ring, name: str, left: Mapping[str, int] | None = None) -> bool:
    """Whether dead member C{name} can rejoin its chains as it is: only if every chain it is
    in has no live member (nothing was written there since it left) and it is the one that
    left each of them last (it holds every write they acknowledged)."""
    left = left or {}
    names = [n.name for n in ring.nodes]
    if name not in names:
        return False
    me = names.index(name)
    for position in range(ring.chain_length):
        owner = (me - position) % len(names)
        if ring.chain_for_index(owner):
            return False
        if last_to_leave((n.name for n in ring.ring_chain(owner)), left) != name:
            return False
    return True
