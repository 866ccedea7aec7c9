"""python -m bench.range_ops at a small size: every step is measured and the copy is exact."""

from __future__ import annotations

from bench.range_ops import QUARTER, measure
from chainstore.ring import position


def test_range_ops_reports_every_step(tmp_path):
    lines = measure(4000, 100, str(tmp_path))
    quarter = sum(1 for i in range(4000) if position(b"key%09d" % i) in QUARTER)
    assert lines[0].startswith(f"4,000 keys of 100 bytes; a copy of a quarter of the ring "
                               f"({quarter:,} keys)")
    for step in ("copy: export a page", "copy: write an image", "copy as pairs: read a page",
                 "copy as pairs: pack, write", "move: a page", "drop: a chunk", "count the keys",
                 "request ids", f"clear a store ({4000 - quarter:,} keys)"):
        assert sum(step in line and "CPU ms p50" in line for line in lines) == 1, step
