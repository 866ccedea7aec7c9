"""Which chain member a get goes to (client/readers.py): by key, hot keys in turn."""

from __future__ import annotations

import random
from collections import Counter

from client.readers import HOT_MIN, WINDOW, ReaderChoice


def test_a_key_read_now_and_then_always_goes_to_the_member_its_position_names() -> None:
    choice = ReaderChoice()
    rng = random.Random(5)
    keys = [(b"k%d" % i, rng.getrandbits(128)) for i in range(3000)]
    picks: dict[bytes, set[int]] = {}
    for _ in range(3):
        for key, pos in keys:
            picks.setdefault(key, set()).add(choice.member(key, pos, 3))
    assert all(picks[key] == {pos % 3} for key, pos in keys)
    # So the keys, and each member's cache, are shared evenly by the members.
    per_member = Counter(pos % 3 for _, pos in keys)
    assert min(per_member.values()) > 900
    # A chain shortened by a failure: the same rule over its live members.
    assert choice.member(b"k0", keys[0][1], 2) == keys[0][1] % 2


def test_a_hot_key_goes_to_every_member_in_turn_and_cold_keys_stay_pinned() -> None:
    choice = ReaderChoice()
    rng = random.Random(7)
    hot, hot_pos = b"hot", 3 * 12345  # pinned, it would always go to member 0
    pinned = Counter()
    spread = Counter()
    for i in range(20 * WINDOW):
        if i % 4 == 0:  # a quarter of the gets
            member = choice.member(hot, hot_pos, 3)
            (pinned if i < 4 * (HOT_MIN - 1) else spread)[member] += 1
        else:
            pos = rng.getrandbits(128)
            assert choice.member(b"c%d" % rng.randrange(10**9), pos, 3) == pos % 3
    assert pinned == {0: HOT_MIN - 1}  # its first few gets, before it counts as hot
    assert set(spread) == {0, 1, 2}
    assert max(spread.values()) - min(spread.values()) <= 1
    # Counts of keys read once are forgotten each window: memory is bounded by the window.
    assert len(choice._counts) <= WINDOW


def test_a_key_that_cools_down_goes_back_to_its_own_member() -> None:
    choice = ReaderChoice()
    for _ in range(100):
        choice.member(b"was-hot", 2, 3)
    rng = random.Random(3)
    for _ in range(4 * WINDOW):
        choice.member(b"c%d" % rng.randrange(10**9), 0, 3)
    # Read once in a while now: a tiny share of the recent gets.
    assert [choice.member(b"was-hot", 2, 3) for _ in range(3)] == [2, 2, 2]
