"""``python -m bench.range_ops``: the CPU each range operation takes per reactor turn.

A server runs one range operation step at a time between other work (chainstore/migration.py):
a page of a copy exported as a database image, that image written at the copy's target, a page
of a local move, a chunk of a drop, a chunk of the request ids a copy carries; and ``stats``
counts keys, ``ClearStores`` empties stores. Whatever one step costs is how long the server
answers nobody. This loads ``--keys`` keys (``--value-bytes``) into a store in a temporary
directory, then runs a copy of a quarter of the ring into a second store, the same copy with
its pairs read into Python and packed (as a page that cannot be exported goes, and as every page
went before) beside it, a local move of the quarter into a third store, a drop of that quarter,
a count and a clear, calling each step as the server does, and prints the process CPU time (not
wall time: the figure a loaded machine does not change much) of each kind of step: p50, p99 and
max, and per key where it is a copy's or a move's.
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
from chainstore.control import pack_items
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
        # A copy of the quarter as the server makes it: a batch's page exported as a database
        # image and written at the target (migration.batches, receive_range); then the same
        # copy with its pairs read into Python, packed, unpacked and written, as every page
        # went before (and as a page still goes when it cannot be exported), into another
        # store: the two side by side.
        exports: list[float] = []
        imports: list[float] = []
        fallbacks = 0
        cursor: Any = None
        began = time.perf_counter()
        while True:
            exported = timed(exports, lambda: source.export_page(
                QUARTER, cursor, migration.BATCH_KEYS, migration.BATCH_BYTES))
            if exported is None:
                # (a page at an end of the range: read as pairs, as the server does)
                page, cursor = timed(exports, lambda: source.range_page(
                    QUARTER, cursor, migration.PAGE_ROWS, True, migration.BATCH_BYTES))
                items = timed(exports, lambda: pack_items(page))
                timed(imports, lambda: migration.receive_range(target, items))
                fallbacks += 1
            else:
                image, _, _, cursor = exported
                if image is not None:
                    timed(imports, lambda: migration.receive_range(target, b"", None, image))
            if cursor is None:
                break
        copied = len(target)
        wall = time.perf_counter() - began
        reads: list[float] = []
        writes: list[float] = []
        rows_target = target_set["replica2"]
        cursor = None
        while True:
            page, cursor = timed(reads, lambda: source.range_page(
                QUARTER, cursor, migration.PAGE_ROWS, True, migration.BATCH_BYTES))
            for start in range(0, len(page), migration.BATCH_KEYS):
                batch = page[start:start + migration.BATCH_KEYS]
                timed(writes, lambda: migration.receive_range(rows_target, pack_items(batch)))
            if cursor is None:
                break
        assert len(rows_target) == copied
        rows_target.clear()
        lines = [f"{keys:,} keys of {value_bytes} bytes; a copy of a quarter of the ring "
                 f"({copied:,} keys) in {wall:.1f} s wall; {fallbacks} of its pages read as "
                 "pairs"]
        lines.append(summary(f"copy: export a page ({migration.BATCH_KEYS} rows)", exports)
                     + f", {sum(exports) / copied * 1e6:.2f} us per key")
        lines.append(summary(f"copy: write an image ({migration.BATCH_KEYS} keys)", imports)
                     + f", {sum(imports) / copied * 1e6:.2f} us per key")
        lines.append(summary(f"copy as pairs: read a page ({migration.PAGE_ROWS} rows)", reads)
                     + f", {sum(reads) / copied * 1e6:.2f} us per key")
        lines.append(summary(f"copy as pairs: pack, write ({migration.BATCH_KEYS} keys)",
                             writes) + f", {sum(writes) / copied * 1e6:.2f} us per key")
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
