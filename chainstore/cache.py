"""Bounded read caches with FIFO, LRU and LFU eviction, each O(1) per operation.

The cache holds values the tail has read or written, so a hit never goes to the dbm file. It
stores misses as nothing: an absent key is always looked up in the store.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict


class Cache:
    """The common interface and hit/miss counters; subclasses choose what to evict."""

    strategy = ""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("cache size must be >= 0")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> bytes | None:
        value = self._lookup(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: bytes, value: bytes) -> None:
        if self.capacity:
            self._store(key, value)

    def _lookup(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def _store(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    def discard(self, key: bytes) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def stats(self) -> dict[str, int | str]:
        return {
            "cache_strategy": self.strategy,
            "cache_capacity": self.capacity,
            "cache_entries": len(self),
            "cache_hits": self.hits,
            "cache_misses": self.misses,
        }


class _OrderedCache(Cache):
    """FIFO and LRU: one ordered dict, oldest first; they differ only in whether a hit reorders."""

    _reorder_on_hit = False

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._data: OrderedDict[bytes, bytes] = OrderedDict()

    def _lookup(self, key: bytes) -> bytes | None:
        value = self._data.get(key)
        if value is not None and self._reorder_on_hit:
            self._data.move_to_end(key)
        return value

    def _store(self, key: bytes, value: bytes) -> None:
        data = self._data
        if key in data:
            data[key] = value
            if self._reorder_on_hit:
                data.move_to_end(key)
            return
        if len(data) >= self.capacity:
            data.popitem(last=False)
        data[key] = value

    def discard(self, key: bytes) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class FIFOCache(_OrderedCache):
    """Evicts the entry inserted first; hits and updates do not change the order."""

    strategy = "FIFO"


class LRUCache(_OrderedCache):
    """Evicts the entry used least recently (a hit or an update counts as a use)."""

    strategy = "LRU"
    _reorder_on_hit = True


class LFUCache(Cache):
    """Evicts the entry used least often, the oldest among equals (O(1) frequency buckets)."""

    strategy = "LFU"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._values: dict[bytes, bytes] = {}
        self._freq: dict[bytes, int] = {}
        # frequency -> keys with that frequency, least recently touched first
        self._buckets: defaultdict[int, OrderedDict[bytes, None]] = defaultdict(OrderedDict)
        self._min_freq = 0

    def _touch(self, key: bytes) -> None:
        f = self._freq[key]
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min_freq == f:
                self._min_freq = f + 1
        self._freq[key] = f + 1
        self._buckets[f + 1][key] = None

    def _lookup(self, key: bytes) -> bytes | None:
        value = self._values.get(key)
        if value is not None:
            self._touch(key)
        return value

    def _store(self, key: bytes, value: bytes) -> None:
        if key in self._values:
            self._values[key] = value
            self._touch(key)
            return
        if len(self._values) >= self.capacity:
            bucket = self._buckets[self._min_freq]
            victim, _ = bucket.popitem(last=False)
            if not bucket:
                del self._buckets[self._min_freq]
            del self._values[victim]
            del self._freq[victim]
        self._values[key] = value
        self._freq[key] = 1
        self._buckets[1][key] = None
        self._min_freq = 1

    def discard(self, key: bytes) -> None:
        if key not in self._values:
            return
        f = self._freq.pop(key)
        del self._values[key]
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
        # _min_freq may now name an empty frequency; that is harmless: the cache is below
        # capacity, so the next insert evicts nothing and resets it to 1.

    def clear(self) -> None:
        self._values.clear()
        self._freq.clear()
        self._buckets.clear()
        self._min_freq = 0

    def __len__(self) -> int:
        return len(self._values)


STRATEGIES: dict[str, type[Cache]] = {"FIFO": FIFOCache, "LRU": LRUCache, "LFU": LFUCache}


def make_cache(strategy: str, capacity: int) -> Cache:
    """A cache of the named strategy (case-insensitive)."""
    try:
        cls = STRATEGIES[strategy.upper()]
    except KeyError:
        raise ValueError(
            f"unknown cache strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        ) from None
    return cls(capacity)
