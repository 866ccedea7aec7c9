"""bench.read_roles' choice of the ranges one server heads, follows and ends."""

import pytest

from bench.read_roles import role_ranges
from chainstore.ring import NodeInfo, Ring


def ring_of(count: int, dead: frozenset[str] = frozenset()) -> Ring:
    nodes = tuple(NodeInfo(f"s{i}", "127.0.0.1", 5000 + i, 6000 + i) for i in range(count))
    return Ring(nodes, epoch=1, replication=3, dead=dead)


@pytest.mark.parametrize("count", [3, 4, 5])
def test_the_ranges_are_those_whose_chain_has_the_server_at_each_place(count: int) -> None:
    ring = ring_of(count)
    for index, node in enumerate(ring.nodes):
        ranges = role_ranges(ring, index)
        assert [ring.chain_for_index(ranges[role]).index(node)
                for role in ("head", "middle", "tail")] == [0, 1, 2]
        assert len(set(ranges.values())) == 3


def test_a_ring_with_a_dead_member_is_refused() -> None:
    ring = ring_of(4, dead=frozenset({"s3"}))
    alive = next(i for i, n in enumerate(ring.nodes) if n.name != "s3")
    with pytest.raises(ValueError, match="is not the"):
        role_ranges(ring, alive)
