"""The planner, checked against a model of every server's three stores.

Hypothesis draws an old ring of 1-8 servers, changes it (servers join, leave cleanly or fail) and
a set of key positions, including positions exactly on and next to server positions, where
off-by-one range errors live. The model puts every key in the store of every old chain member's
role, loses what dead servers held, then carries out the plan in the coordinator's order (local
moves, then copies, each after a drop of its target, then the drops) and checks that every store
holds exactly what the new ring says, and that locks and sources are only at live servers.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chainstore.ring import KeyRange, NodeInfo, Ring
from chainstore.storage import STORE_NAMES
from ecs import planner

POOL = [NodeInfo(f"n{i}", "127.0.0.1", 6000 + i, 7000 + i) for i in range(12)]
TOP = (1 << 128) - 1

Stores = dict[str, dict[str, set[int]]]


def chain_of(ring: Ring, pos: int) -> tuple[str, ...]:
    if not ring.nodes:
        return ()
    return tuple(n.name for n in ring.chain_for_index(ring.owner_index(pos)))


def in_range(rng: KeyRange, positions: set[int]) -> set[int]:
    return {p for p in positions if p in rng}


@st.composite
def scenarios(draw):
    replication = draw(st.sampled_from([1, 2, 3]))
    old_names = draw(st.lists(st.sampled_from(range(len(POOL))), min_size=1, max_size=8,
                              unique=True))
    old_nodes = [POOL[i] for i in old_names]
    fate = {n.name: draw(st.sampled_from(["stay", "stay", "leave", "fail"])) for n in old_nodes}
    newcomers = draw(st.lists(
        st.sampled_from([n for n in POOL if n.name not in fate]), max_size=3, unique=True)) \
        if len(fate) < len(POOL) else []
    new_nodes = [n for n in old_nodes if fate[n.name] == "stay"] + newcomers
    assume(new_nodes)
    dead = {name for name, f in fate.items() if f == "fail"}
    old = Ring(tuple(old_nodes), epoch=1, replication=replication)
    new = Ring(tuple(new_nodes), epoch=2, replication=replication)
    # Key positions: random ones, and each server's position and its neighbours.
    special = [n.position + d for n in old_nodes + newcomers for d in (-1, 0, 1)]
    positions = set(draw(st.lists(st.integers(0, TOP), max_size=40)))
    positions |= set(draw(st.lists(st.sampled_from(special), max_size=30)))
    positions |= {0, TOP}
    positions = {p % (1 << 128) for p in positions}
    return old, new, dead, positions


def initial_stores(old: Ring, new: Ring, dead: set[str], positions: set[int]) -> Stores:
    stores: Stores = {n.name: {s: set() for s in STORE_NAMES} for n in old.nodes + new.nodes}
    for pos in positions:
        for role, name in enumerate(chain_of(old, pos)):
            stores[name][STORE_NAMES[role]].add(pos)
    for name in dead:
        # what a dead server held is out of reach; poison it so any read from it shows
        stores[name] = {s: {-1} for s in STORE_NAMES}
    return stores


def execute(plan: planner.Plan, stores: Stores, dead: set[str]) -> None:
    """The coordinator's order: moves, copies (each after a drop of its target), then drops."""
    for move in plan.moves:
        assert move.server not in dead
        server = stores[move.server]
        server[move.target_store] -= in_range(move.range, server[move.target_store])
        server[move.target_store] |= in_range(move.range, server[move.source_store])
    for copy in plan.copies:
        assert copy.source not in dead, "a dead server cannot be a copy source"
        assert copy.target not in dead
        target = stores[copy.target][copy.target_store]
        target -= in_range(copy.range, target)
        source = stores[copy.source][copy.source_store]
        assert -1 not in source
        target |= in_range(copy.range, source)
    for drop in plan.drops:
        assert drop.server not in dead, "nothing is dropped on a dead server"
        store = stores[drop.server][drop.store]
        store -= in_range(drop.range, store)


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_the_plan_leaves_every_store_holding_exactly_its_new_roles(scenario):
    old, new, dead, positions = scenario
    plan = planner.plan(old, new, dead)
    stores = initial_stores(old, new, dead, positions)
    execute(plan, stores, dead)

    lost = {p for p in positions if all(name in dead for name in chain_of(old, p))}
    expected: Stores = {name: {s: set() for s in STORE_NAMES} for name in stores}
    for pos in positions - lost:
        for role, name in enumerate(chain_of(new, pos)):
            expected[name][STORE_NAMES[role]].add(pos)
    for name in stores:
        if name in dead:
            continue
        for store in STORE_NAMES:
            assert stores[name][store] == expected[name][store], (name, store)

    # Lost ranges are exactly where every old replica died.
    for pos in positions:
        in_lost = any(pos in rng for rng in plan.lost)
        assert in_lost == (pos in lost and chain_of(old, pos) != chain_of(new, pos)), pos


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_locks_are_at_live_old_heads_and_members_and_only_on_changing_ranges(scenario):
    old, new, dead, positions = scenario
    plan = planner.plan(old, new, dead)
    for pos in positions:
        before, after = chain_of(old, pos), chain_of(new, pos)
        alive = [n for n in before if n not in dead]
        write_holders = {s for s, rs in plan.write_locks.items() if any(pos in r for r in rs)}
        read_holders = {s for s, rs in plan.read_locks.items() if any(pos in r for r in rs)}
        if before == after or not alive:
            # keys that do not move keep accepting writes and reads
            assert write_holders == read_holders == set(), pos
        else:
            assert write_holders == {alive[0]}, pos
            # every live old member answers reads, so every one stops for the switch
            assert read_holders == set(alive), pos
    for holder in set(plan.write_locks) | set(plan.read_locks):
        assert holder not in dead


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_the_same_ring_needs_no_plan(scenario):
    old, _new, _dead, _positions = scenario
    again = Ring(old.nodes, epoch=old.epoch + 1, replication=old.replication)
    assert planner.plan(old, again).empty


def test_adding_a_server_to_one_copies_exactly_its_range_from_the_old_owner():
    a, b = POOL[0], POOL[1]
    old = Ring((a,), epoch=1, replication=1)
    new = Ring((a, b), epoch=2, replication=1)
    plan = planner.plan(old, new)
    b_range = new.range_of(new.index_of(b.name))
    assert plan.copies == [planner.Copy(b_range, a.name, "coordinator", b.name, "coordinator")]
    assert plan.drops == [planner.Drop(b_range, a.name, "coordinator")]
    assert plan.write_locks == {a.name: [b_range]}
    assert plan.read_locks == {a.name: [b_range]}
    assert plan.moves == [] and plan.lost == []


def test_a_failed_server_without_replicas_loses_its_range():
    a, b = POOL[0], POOL[1]
    old = Ring((a, b), epoch=1, replication=1)
    new = Ring((a,), epoch=2, replication=1)
    plan = planner.plan(old, new, dead={b.name})
    assert plan.lost == [old.range_of(old.index_of(b.name))]
    assert plan.copies == [] and plan.write_locks == {} and plan.drops == []


def test_a_first_ring_moves_nothing():
    new = Ring(tuple(POOL[:3]), epoch=1, replication=3)
    plan = planner.plan(Ring((), epoch=0, replication=3), new)
    assert plan.copies == [] and plan.moves == [] and plan.drops == [] and plan.lost == []
    assert plan.write_locks == {} and plan.read_locks == {}


def test_a_chain_keeps_its_formation_epoch_while_its_members_stay_the_same() -> None:
    chain_epochs = planner.chain_epochs
    infos = [NodeInfo(f"s{i}", "127.0.0.1", 6000 + i, 7000 + i) for i in range(1, 6)]
    first = Ring(tuple(infos[:4]), epoch=1, replication=3)
    formed = chain_epochs(Ring((), epoch=0, replication=3), first)
    assert set(formed.values()) == {1}
    first = Ring(tuple(replace(n, chain_epoch=formed[n.name]) for n in first.nodes), epoch=1,
                 replication=3)
    # A fifth server joins: exactly the chains it enters are new (formed at epoch 2).
    second = Ring(first.nodes + (infos[4],), epoch=2, replication=3)
    formed = chain_epochs(first, second)
    for i, node in enumerate(second.nodes):
        members = [n.name for n in second.ring_chain(i)]
        assert formed[node.name] == (2 if "s5" in members else 1), (node.name, members)
    assert sorted(formed.values()).count(2) == 3
    # Marking a member dead changes no chain's members (dead ones keep their places).
    second = Ring(tuple(replace(n, chain_epoch=formed[n.name]) for n in second.nodes),
                  epoch=2, replication=3)
    dead = Ring(second.nodes, epoch=3, replication=3, dead=frozenset({"s2"}))
    assert chain_epochs(second, dead) == formed


def test_a_range_whose_replicas_all_died_is_copied_only_from_the_last_to_leave():
    # Five servers, a chain of three all dead, marked in epochs 2, 3, 4: its tail left last.
    old = Ring(tuple(POOL[:5]), epoch=4, replication=3)
    first, second, last = (n.name for n in old.ring_chain(0))
    left = {first: 2, second: 3, last: 4}
    dead = set(left)
    new = Ring(tuple(n for n in old.nodes if n.name not in dead), epoch=5, replication=3)

    def sources(returned: set[str]) -> set[str]:
        """The dead members the plan copies from (only ever for the orphaned range)."""
        return {c.source for c in planner.plan(old, new, dead, returned, left).copies} & dead

    # Those that left earlier lack what the chain acknowledged after they left.
    assert sources({first, second}) == set()
    assert sources({first, second, last}) == {last}
    # Without the order in which they left, none of them is a safe source.
    assert planner.plan(old, new, dead, {first, second, last}).lost
