"""The bulk steps of a reconfiguration in lanes (ecs/reconfiguration.py, Reconfigurer._bulk_lanes):
one step at a time, or with copies-beside-moves the copies beside the local moves, unless a
copy touches keys of a store a move writes or reads."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainstore.ring import KeyRange
from ecs import planner, reconfiguration
from ecs.reconfiguration import _meet, _overlap

STEP = 1 << 120  # a ring of 256 cells, so that every overlap can be counted


def cells(rng: KeyRange) -> set[int]:
    return {k for k in range(256) if k * STEP in rng}


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
def test_two_ranges_overlap_when_they_share_a_position(a, b, c, d):
    first, second = KeyRange(a * STEP, b * STEP), KeyRange(c * STEP, d * STEP)
    assert _overlap(first, second) == bool(cells(first) & cells(second))
    assert _overlap(first, second) == _overlap(second, first)


LOW, HIGH = KeyRange(0, 100 * STEP), KeyRange(100 * STEP, 200 * STEP)


def test_a_copy_meets_a_move_only_over_the_same_keys_of_a_store_one_of_them_writes():
    move = planner.LocalMove(LOW, "s2", "replica1", "replica2")
    # the copy's target is the store the move reads or writes, over its keys
    assert _meet(planner.Copy(LOW, "s1", "coordinator", "s2", "replica1"), move)
    assert _meet(planner.Copy(LOW, "s1", "coordinator", "s2", "replica2"), move)
    # the copy reads what the move writes
    assert _meet(planner.Copy(LOW, "s2", "replica2", "s4", "replica1"), move)
    # both read the same store: no write meets
    assert not _meet(planner.Copy(LOW, "s2", "replica1", "s4", "replica2"), move)
    # another range of the same store, another store, another server
    assert not _meet(planner.Copy(HIGH, "s1", "coordinator", "s2", "replica1"), move)
    assert not _meet(planner.Copy(LOW, "s1", "coordinator", "s2", "coordinator"), move)
    assert not _meet(planner.Copy(LOW, "s1", "coordinator", "s3", "replica1"), move)


class Recorder(reconfiguration.Reconfigurer):
    """Runs no step, records the order they are taken in."""

    def __init__(self, copies_beside_moves: bool) -> None:
        self.copies_beside_moves = copies_beside_moves
        self.ran: list[Any] = []

    async def _move(self, epoch: int, move: Any, trackers: Any) -> None:
        self.ran.append(move)

    async def _bulk_copy(self, op: Any, epoch: int, copy: Any, trackers: Any) -> None:
        self.ran.append(copy)


@pytest.mark.parametrize("beside", [False, True])
def test_copies_go_after_the_moves_or_beside_them_unless_they_meet_one(beside):
    move = planner.LocalMove(LOW, "s2", "replica1", "replica2")
    free = planner.Copy(LOW, "s1", "coordinator", "s4", "replica1")
    meets = planner.Copy(LOW, "s1", "coordinator", "s2", "replica2")
    plan = planner.Plan(copies=[free, meets], moves=[move])
    recorder = Recorder(beside)
    lanes = recorder._bulk_lanes(None, 2, plan, [])  # type: ignore[arg-type]
    expected = ({"moves": [move, meets], "copies": [free]} if beside else
                {"moves": [move, free, meets], "copies": []})
    for name, steps in expected.items():
        recorder.ran.clear()
        for step in lanes[name]:
            coroutine = step()
            with pytest.raises(StopIteration):
                coroutine.send(None)
        assert recorder.ran == steps, name
