"""The read caches: exact eviction order per strategy, bounds, counters, and O(1) operations.

The eviction tests spell out the order each strategy promises; the Hypothesis tests run random
operation sequences against a deliberately naive reference model of each strategy; the O(1)
tests show, without timing anything, that a cache ten times larger does no more work per
operation.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainstore.cache import STRATEGIES, Cache, FIFOCache, LFUCache, LRUCache, make_cache

ALL = [FIFOCache, LRUCache, LFUCache]


def fill(cache: Cache, *keys: bytes) -> None:
    for key in keys:
        cache.put(key, b"v-" + key)


def contents(cache: Cache) -> set[bytes]:
    """The keys held. A get would count as a use and change the order under test, so this peeks
    at the mapping each strategy keeps its values in (checked against len() to stay honest)."""
    values = getattr(cache, "_data", None)
    if values is None:
        values = cache._values  # type: ignore[attr-defined]
    held = set(values)
    assert len(held) == len(cache)
    return held


# -- exact eviction order -----------------------------------------------------------------------


def test_fifo_evicts_in_insertion_order_and_ignores_hits_and_updates():
    cache = FIFOCache(3)
    fill(cache, b"a", b"b", b"c")
    assert cache.get(b"a") == b"v-a"  # a hit does not save a from eviction
    cache.put(b"b", b"new")  # nor does an update move b
    cache.put(b"d", b"v-d")
    assert contents(cache) == {b"b", b"c", b"d"}
    cache.put(b"e", b"v-e")
    assert contents(cache) == {b"c", b"d", b"e"}
    assert cache.get(b"b") is None
    cache.put(b"f", b"v-f")
    assert contents(cache) == {b"d", b"e", b"f"}


def test_fifo_update_keeps_the_new_value_in_the_old_place():
    cache = FIFOCache(2)
    fill(cache, b"a", b"b")
    cache.put(b"a", b"A2")
    assert cache.get(b"a") == b"A2"
    cache.put(b"c", b"v-c")
    assert cache.get(b"a") is None
    assert cache.get(b"b") == b"v-b"


def test_lru_reorders_on_hit():
    cache = LRUCache(3)
    fill(cache, b"a", b"b", b"c")
    assert cache.get(b"a") == b"v-a"  # order now b, c, a
    cache.put(b"d", b"v-d")
    assert contents(cache) == {b"a", b"c", b"d"}
    assert cache.get(b"c") == b"v-c"  # order now a, d, c
    cache.put(b"e", b"v-e")
    assert contents(cache) == {b"c", b"d", b"e"}


def test_lru_reorders_on_update():
    cache = LRUCache(3)
    fill(cache, b"a", b"b", b"c")
    cache.put(b"a", b"A2")  # order now b, c, a
    cache.put(b"d", b"v-d")
    assert contents(cache) == {b"a", b"c", b"d"}
    assert cache.get(b"a") == b"A2"


def test_lru_miss_does_not_reorder():
    cache = LRUCache(2)
    fill(cache, b"a", b"b")
    assert cache.get(b"z") is None
    cache.put(b"c", b"v-c")
    assert contents(cache) == {b"b", b"c"}


def test_lfu_evicts_the_least_frequent():
    cache = LFUCache(3)
    fill(cache, b"a", b"b", b"c")
    for _ in range(3):
        cache.get(b"a")
    cache.get(b"b")
    cache.get(b"c")
    cache.get(b"c")
    # frequencies: a 4, b 2, c 3
    cache.put(b"d", b"v-d")
    assert contents(cache) == {b"a", b"c", b"d"}
    # d has frequency 1, the lowest: it goes next, even though it is the newest
    cache.put(b"e", b"v-e")
    assert contents(cache) == {b"a", b"c", b"e"}


def test_lfu_evicts_the_oldest_among_equals():
    cache = LFUCache(3)
    fill(cache, b"a", b"b", b"c")
    cache.put(b"d", b"v-d")  # all at frequency 1: a is the oldest
    assert contents(cache) == {b"b", b"c", b"d"}
    # All at 2 now, reached in the order c, b, d: c is the oldest at the lowest frequency.
    cache.get(b"c")
    cache.get(b"b")
    cache.get(b"d")
    cache.put(b"e", b"v-e")
    assert contents(cache) == {b"b", b"d", b"e"}
    # e is alone at frequency 1, so it goes before b and d, although it is the newest.
    cache.put(b"f", b"v-f")
    assert contents(cache) == {b"b", b"d", b"f"}


def test_lfu_update_counts_as_a_use():
    cache = LFUCache(2)
    fill(cache, b"a", b"b")
    cache.put(b"a", b"A2")  # a: 2, b: 1
    cache.put(b"c", b"v-c")
    assert contents(cache) == {b"a", b"c"}
    assert cache.get(b"a") == b"A2"


def test_lfu_frequency_is_forgotten_after_discard():
    cache = LFUCache(2)
    fill(cache, b"a", b"b")
    for _ in range(5):
        cache.get(b"a")
    cache.discard(b"a")
    cache.put(b"a", b"again")  # a starts again at 1, after b
    cache.get(b"b")  # b: 2
    cache.put(b"c", b"v-c")
    assert contents(cache) == {b"b", b"c"}


# -- bounds, capacity 0, discard, clear, counters -----------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_capacity_is_never_exceeded(cls):
    cache = cls(5)
    for i in range(50):
        cache.put(b"k%d" % i, b"v")
        if i % 3 == 0:
            cache.get(b"k%d" % (i // 2))
        assert len(cache) == min(i + 1, 5)
    assert cache.stats()["cache_entries"] == 5


@pytest.mark.parametrize("cls", ALL)
def test_capacity_zero_stores_nothing_and_counts_misses(cls):
    cache = cls(0)
    cache.put(b"a", b"1")
    assert len(cache) == 0
    assert cache.get(b"a") is None
    cache.discard(b"a")
    cache.clear()
    assert (cache.hits, cache.misses) == (0, 1)


@pytest.mark.parametrize("cls", ALL)
def test_negative_capacity_is_refused(cls):
    with pytest.raises(ValueError, match=">= 0"):
        cls(-1)


@pytest.mark.parametrize("cls", ALL)
def test_discard_removes_one_key_and_frees_its_slot(cls):
    cache = cls(2)
    fill(cache, b"a", b"b")
    cache.discard(b"a")
    cache.discard(b"nope")  # absent: no error
    assert len(cache) == 1
    assert cache.get(b"a") is None
    cache.put(b"c", b"v-c")  # the freed slot is used, b stays
    assert cache.get(b"b") == b"v-b"
    assert cache.get(b"c") == b"v-c"


@pytest.mark.parametrize("cls", ALL)
def test_clear_empties_and_the_cache_works_afterwards(cls):
    cache = cls(3)
    fill(cache, b"a", b"b", b"c")
    cache.get(b"a")
    cache.clear()
    assert len(cache) == 0
    assert cache.get(b"a") is None
    fill(cache, b"x", b"y", b"z", b"w")
    assert len(cache) == 3
    assert cache.get(b"w") == b"v-w"


@pytest.mark.parametrize("cls", ALL)
def test_counters_and_stats(cls):
    cache = cls(2)
    fill(cache, b"a")
    cache.get(b"a")
    cache.get(b"a")
    cache.get(b"b")
    cache.put(b"b", b"")  # an empty value is a value: a later get is a hit
    assert cache.get(b"b") == b""
    assert cache.stats() == {
        "cache_strategy": cls.strategy,
        "cache_capacity": 2,
        "cache_entries": 2,
        "cache_hits": 3,
        "cache_misses": 1,
    }


def test_make_cache_is_case_insensitive_and_refuses_unknown_names():
    assert isinstance(make_cache("lfu", 3), LFUCache)
    assert isinstance(make_cache("Fifo", 3), FIFOCache)
    assert make_cache("LRU", 7).capacity == 7
    assert set(STRATEGIES) == {"FIFO", "LRU", "LFU"}
    with pytest.raises(ValueError, match="FIFO, LRU, LFU"):
        make_cache("MRU", 3)


# -- random operations against a reference model -----------------------------------------------


class ModelCache:
    """A slow, obviously correct cache: a list of [key, value, frequency, last_use] rows."""

    def __init__(self, strategy: str, capacity: int) -> None:
        self.strategy = strategy
        self.capacity = capacity
        self.rows: list[list] = []  # in insertion order
        self.tick = 0
        self.hits = self.misses = 0

    def _find(self, key):
        for row in self.rows:
            if row[0] == key:
                return row
        return None

    def _use(self, row) -> None:
        self.tick += 1
        row[2] += 1
        row[3] = self.tick
        if self.strategy == "LRU":
            self.rows.remove(row)
            self.rows.append(row)

    def get(self, key):
        row = self._find(key)
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        self._use(row)
        return row[1]

    def put(self, key, value) -> None:
        if self.capacity == 0:
            return
        row = self._find(key)
        if row is not None:
            row[1] = value
            self._use(row)
            return
        if len(self.rows) >= self.capacity:
            if self.strategy == "LFU":
                victim = min(self.rows, key=lambda r: (r[2], r[3]))
            else:
                victim = self.rows[0]
            self.rows.remove(victim)
        self.tick += 1
        self.rows.append([key, value, 1, self.tick])

    def discard(self, key) -> None:
        row = self._find(key)
        if row is not None:
            self.rows.remove(row)

    def clear(self) -> None:
        self.rows.clear()

    def as_dict(self) -> dict:
        return {r[0]: r[1] for r in self.rows}


keys = st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("put"), keys, st.binary(max_size=3)),
        st.tuples(st.just("discard"), keys),
        st.tuples(st.just("clear")),
    ),
    max_size=80,
)


# The strategy is drawn rather than parametrized: pytest-twisted wraps a Hypothesis test's inner
# function once per pytest item, and parametrizing would wrap the same function twice.
@settings(max_examples=400, deadline=None)
@given(strategy=st.sampled_from(["FIFO", "LRU", "LFU"]), capacity=st.integers(0, 5),
       ops=operations)
def test_cache_matches_the_reference_model(strategy, capacity, ops):
    cache, model = make_cache(strategy, capacity), ModelCache(strategy, capacity)
    for op in ops:
        if op[0] == "get":
            assert cache.get(op[1]) == model.get(op[1]), op
        elif op[0] == "put":
            cache.put(op[1], op[2])
            model.put(op[1], op[2])
        elif op[0] == "discard":
            cache.discard(op[1])
            model.discard(op[1])
        else:
            cache.clear()
            model.clear()
        assert len(cache) == len(model.rows)
        assert len(cache) <= capacity
    # Every key the model holds the cache holds, with its value (reading it as a get on both
    # sides keeps them in step).
    for key, value in model.as_dict().items():
        assert cache.get(key) == value
        model.get(key)
    assert (cache.hits, cache.misses) == (model.hits, model.misses)


# -- O(1) per operation, shown by counting work rather than timing it ---------------------------


class Work:
    """Counts the work done on the key objects: every hash, equality and ordering test."""

    hashes = 0
    compares = 0

    @classmethod
    def reset(cls) -> None:
        cls.hashes = cls.compares = 0


class CountingKey(bytes):
    """A key that reports every time a container hashes or compares it.

    A cache that scans its entries (a list, a sort, a min over keys, a lookup per entry) hashes
    or compares keys in proportion to its size; an O(1) cache does a constant number per call.
    """

    def __hash__(self) -> int:
        Work.hashes += 1
        return bytes.__hash__(self)

    def __eq__(self, other: object) -> bool:
        Work.compares += 1
        return bytes.__eq__(self, other)

    def __lt__(self, other: bytes) -> bool:
        Work.compares += 1
        return bytes.__lt__(self, other)

    __ne__ = lambda self, other: not self.__eq__(other)  # noqa: E731
    __le__ = __lt__
    __gt__ = __lt__
    __ge__ = __lt__


def _workload(cache: Cache, capacity: int) -> list[Callable[[], object]]:
    """The same 400 operations for any capacity: hits, misses, updates, inserts that evict,
    discards. Keys are built before measuring, so measuring counts only the cache's own work."""
    old = [CountingKey(b"k%d" % i) for i in range(capacity)]
    new = [CountingKey(b"n%d" % i) for i in range(100)]
    for key in old:
        cache.put(key, b"v")
    # Give LFU some spread of frequencies, equally for both sizes.
    for key in old[-50:]:
        cache.get(key)
    ops: list[Callable[[], object]] = []
    for i in range(100):
        hot = old[-1 - (i % 50)]
        ops.append(lambda k=hot: cache.get(k))  # a hit
        ops.append(lambda k=new[i]: cache.get(k))  # a miss
        ops.append(lambda k=new[i]: cache.put(k, b"x"))  # an insert that evicts
        ops.append(lambda k=hot: cache.put(k, b"y"))  # an update
    ops.append(lambda: cache.discard(new[-1]))
    return ops


def _measure(strategy: str, capacity: int) -> tuple[int, int, int]:


    """(key hashes + compares, Python line events, peak bytes allocated) for the workload."""
    cache = make_cache(strategy, capacity)
    ops = _workload(cache, capacity)
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    Work.reset()
    tracemalloc.start()
    tracemalloc.reset_peak()
    sys.settrace(tracer)
    try:
        for op in ops:
            op()
    finally:
        sys.settrace(None)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert len(cache) == capacity - 1  # full, less the one discarded at the end
    return Work.hashes + Work.compares, lines, peak


@pytest.mark.parametrize("strategy", ["FIFO", "LRU", "LFU"])
def test_a_ten_times_larger_cache_does_no_more_work_per_operation(strategy):
    small = _measure(strategy, 1_000)
    large = _measure(strategy, 10_000)
    key_work_small, lines_small, peak_small = small
    key_work_large, lines_large, peak_large = large
    # 401 operations: a constant handful of hashes and compares each, for both sizes. A scan of
    # the entries would touch ~1,000 or ~10,000 keys per operation.
    assert key_work_small < 401 * 10
    assert key_work_large <= key_work_small * 1.1 + 20, (small, large)
    # The same Python code runs per operation, whatever the size: a Python-level loop over the
    # entries would multiply the line events by ten.
    assert lines_large <= lines_small * 1.1 + 20, (small, large)
    # No operation copies the entries: the peak of new allocations does not grow with the size
    # (a list of 10,000 keys alone would add ~80 KB).
    assert peak_large <= peak_small + 16_384, (small, large)
