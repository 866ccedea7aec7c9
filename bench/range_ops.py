"""``python -m bench.range_ops``: the CPU each range operation takes per reactor turn.

A server runs one range operation step at a time between other work (chainstore/migration.py):
a page read of a copy, a batch written at its target, a page of a local move, a chunk of a drop,
a chunk of the request ids a copy carries; and ``stats`` counts keys, ``ClearStores`` empties
stores. Whatever one step costs is how long the server answers nobody. This loads ``--keys``
keys (``--value-bytes``) into a store in a temporary directory, then runs a copy of a quarter of
the ring into a second store, a local move of it from there into a third, a drop of that
quarter, a count and a clear, calling each step as the server does, and prints the process CPU
time (not wall time: the figure a loaded machine does not change much) of each kind of step:
p50, p99 and max.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from chainstore import migration
from chainstore.chain import RECENT_REQUESTS
from chainstore.ring import KeyRange, position
from chainstore.storage import StoreSet

QUARTER = KeyRange(1 << 126, 1 << 127)


def timed(costs: list[float], step: Callable[[], Any]) -> Any:
    start = time.process_time()
    result = step()
    costs.append(time.process_time() - start)
    return result


def summary(name: str, costs: list[float]) -> str:
    xs = sorted(costs)
    return (f"  {name:<32} {len(xs):>6} steps, CPU ms p50 {xs[len(xs) // 2] * 1e3:7.2f}  "
            f"p99 {xs[int(len(xs) * 0.99)] * 1e3:7.2f}  max {xs[-1] * 1e3:7.2f}")


def measure(keys: int, value_bytes: int, directory: str) -> list[str]:
    source_set = StoreSet.open(os.path.join(directory, "source"))
    target_set = StoreSet.open(os.path.join(directory, "target"))
    try:
        source, target = source_set["coordinator"], target_set["replica1"]
        for start in range(0, keys, 10_000):
            source.write_batch([(b"key%09d" % i, b"v" * value_bytes)
                                for i in range(start, min(keys, start + 10_000))])
        reads: list[float] = []
        writes: list[float] = []
        batch: list[tuple[bytes, bytes]] = []
        cursor: Any = None
        began = time.perf_counter()
        while True:
            page, cursor = timed(reads, lambda: source.range_page(
                QUARTER, cursor, migration.PAGE_ROWS, True, migration.BATCH_BYTES))
            batch.extend((k, v) for k, v in page if v is not None)
            if len(batch) >= migration.BATCH_KEYS or (cursor is None and batch):
                timed(writes, lambda: target.write_batch(batch))
                batch = []
            if cursor is None:
                break
        copied = len(target)
        lines = [f"{keys:,} keys of {value_bytes} bytes; a copy of a quarter of the ring "
                 f"({copied:,} keys) in {time.perf_counter() - began:.1f} s wall"]
        lines.append(summary(f"copy: read a page ({migration.PAGE_ROWS} rows)", reads))
        lines.append(summary(f"copy: write a batch ({migration.BATCH_KEYS} keys)", writes))
        # A local move: the copied quarter from one of the target's stores into another.
        moves: list[float] = []
        moved = 0
        cursor = None
        began = time.perf_counter()
        while True:
            count, cursor = timed(moves, lambda: target_set["replica2"].move_page(
                target, QUARTER, cursor, migration.PAGE_ROWS, migration.BATCH_BYTES))
            moved += count
            if cursor is None:
                break
        assert moved == copied
        lines.append(summary(f"move: a page ({migration.PAGE_ROWS} rows)", moves)
                     + f", {sum(moves) / moved * 1e6:.2f} us per key")
        drops: list[float] = []
        cursor = None
        while True:
            def drop_chunk() -> Any:
                return source.drop_page(QUARTER, cursor, migration.DROP_KEYS)[1]
            cursor = timed(drops, drop_chunk)
            if cursor is None:
                break
        lines.append(summary(f"drop: a chunk ({migration.DROP_KEYS} keys)", drops))
        counts: list[float] = []
        for _ in range(100):
            timed(counts, lambda: len(source))
        lines.append(summary("stats: count the keys", counts))
        remembered = [(b"r%d" % i, (0, i, b"key%09d" % i, i + 1))
                      for i in range(RECENT_REQUESTS)]
        scans: list[float] = []
        for start in range(0, len(remembered), migration.SCAN_IDS):
            timed(scans, lambda: [(r, e[2]) for r, e in remembered[start:start + migration.SCAN_IDS]
                                  if position(e[2]) in QUARTER])
        lines.append(summary(f"copy: request ids ({migration.SCAN_IDS})", scans))
        clears: list[float] = []
        left = len(source)
        timed(clears, source.clear)
        assert len(source) == 0
        lines.append(summary(f"clear a store ({left:,} keys)", clears))
        return lines
    finally:
        source_set.close()
        target_set.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.range_ops", description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys loaded [1000000]")
    parser.add_argument("--value-bytes", type=int, default=100, help="bytes per value [100]")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chainstore-range-ops-") as directory:
        print("\n".join(measure(args.keys, args.value_bytes, directory)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
