"""Which member of a key's chain a get goes to when every member answers reads (C{"any"}).

Every get of a key goes to the same member, chosen by the key: its ring position modulo the
length of its live chain. So each server reads, and caches, a third of the keys of each of its
three ranges: as many keys as a tail alone reads of its one range. Spread at random, each
server's cache would cover three times the keys it covers at the tail and miss more (measured:
hit rate 0.82 by key against 0.66 at random, and the misses are store reads; docs/DESIGN.md,
"Where reads go").

Pinned by key, a hot key's reads would all land on one member again, as on a tail. So the few
keys that take a large share of this client's recent gets go to each member in turn instead:
under a zipfian workload that is about the five hottest keys, a fifth of the gets, and a cache
holds them at every member at the cost of a few entries.
"""

from __future__ import annotations

# A key is hot while it has taken at least 1/HOT_SHARE of the recent gets, and HOT_MIN of them.
HOT_SHARE = 32
HOT_MIN = 4
# Every count is halved each time this many gets have been counted since the last halving, so
# "recent" is about the last WINDOW gets and the counts hold at most WINDOW keys.
WINDOW = 1024


class ReaderChoice:
    """Picks, for each get, the index of the member of the key's live chain it goes to."""

    def __init__(self) -> None:
        self._counts: dict[bytes, int] = {}
        self._seen = 0
        self._turn = 0

    def member(self, key: bytes, pos: int, length: int) -> int:
        """The index, in C{key}'s live chain of C{length} members, of the member a get of
        C{key} (at ring position C{pos}) goes to."""
        counts = self._counts
        count = counts.get(key, 0) + 1
        counts[key] = count
        seen = self._seen + 1
        hot = count >= HOT_MIN and count * HOT_SHARE >= seen
        if seen >= WINDOW:
            # Keys read once in the window are forgotten: the counts stay bounded.
            self._counts = {k: c >> 1 for k, c in counts.items() if c > 1}
            seen >>= 1
        self._seen = seen
        if hot:
            self._turn += 1
            return self._turn % length
        return pos % length


__all__ = ["HOT_MIN", "HOT_SHARE", "ReaderChoice", "WINDOW"]
