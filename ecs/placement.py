"""Where the ECS puts servers on the ring: a pure choice of ring positions (tokens).

With placement ``balanced`` (the default) the first servers are spread evenly and each later one
goes to the middle of the largest range; with ``hash`` a server sits where the MD5 of its console
address falls (token None). A member of the current ring keeps its position either way, so a
change moves only the ranges next to the servers that join or leave.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from chainstore.logs import get_logger
from chainstore.ring import RING_BITS
from ecs.state import Member

# The ECS's log lines keep the namespace they always had, whichever module now holds the code:
# operators and bench.reconfig read the ECS log as one voice.
log = get_logger("ecs.coordinator")


def place(members: Mapping[str, Member], ring_members: Sequence[str],
          new_members: Sequence[str], policy: str) -> dict[str, int | None]:
    """The ring positions of C{new_members}: members of the current ring (C{ring_members}) keep
    theirs; with C{policy} "balanced", the first servers are spread evenly and each later one
    goes to the middle of the largest range (with "hash", None: the MD5 of the console address).

    C{members} holds every member named in C{new_members}, with its token and address.
    """
    current = set(ring_members)
    tokens: dict[str, int | None] = {n: members[n].token for n in new_members if n in current}
    joining = [n for n in new_members if n not in current]
    if policy != "balanced" or not joining:
        return {**tokens, **{n: None for n in joining}}
    taken = [members[n].info.position for n in tokens]
    if not taken:
        # Evenly from where the first one's address hashes to.
        start, step = members[joining[0]].info.position, (1 << RING_BITS) // len(joining)
        return {n: (start + i * step) % (1 << RING_BITS) for i, n in enumerate(joining)}
    for name in joining:
        ordered = sorted(taken)
        gaps = [((ordered[(i + 1) % len(ordered)] - p) % (1 << RING_BITS) or 1 << RING_BITS, p)
                for i, p in enumerate(ordered)]
        size, after = max(gaps)
        token = (after + size // 2) % (1 << RING_BITS)
        log.info("placing {name} at {token:032X}, the middle of the largest range "
                 "({share:.1%} of the ring)", name=name, token=token,
                 share=size / (1 << RING_BITS))
        tokens[name] = token
        taken.append(token)
    return tokens
