"""Turn measurements into figures: medians over repetitions, ratios to the baseline, a table.

Throughput is the median of the repetitions' ops/s with their min and max; p50 and p99 are the
medians of the repetitions' own percentiles.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from bench.runner import Measurement

#: The issue's bar: chainstore's put throughput at this many in flight, as a share of echo's.
GOAL_INFLIGHT = 32
GOAL_RATIO = 0.5


@dataclass(frozen=True)
class Row:
    system: str
    op: str
    inflight: int
    runs: int
    ops_per_s: float
    ops_per_s_min: float
    ops_per_s_max: float
    p50_ms: float
    p99_ms: float
    #: Median CPU microseconds per operation of the servers and of the load generator (None
    #: where the platform cannot tell): who limited the throughput.
    server_cpu_us_per_op: float | None
    client_cpu_us_per_op: float | None
    #: ops/s divided by the baseline's at the same in-flight count; None for the baseline.
    ratio: float | None


def summarize(measurements: Sequence[Measurement], baseline: str) -> list[Row]:
    """One row per system, operation and in-flight count, in order of in-flight count."""
    groups: dict[tuple[str, str, int], list[Measurement]] = defaultdict(list)
    for m in measurements:  # dicts keep insertion order: systems stay in the order they ran
        groups[(m.system, m.op, m.result.inflight)].append(m)
    rows = []
    for (system, op, inflight), ms in groups.items():
        rates = [m.result.ops_per_second for m in ms]
        summaries = [m.result.summary() for m in ms]
        rows.append(Row(
            system=system, op=op, inflight=inflight, runs=len(ms),
            ops_per_s=statistics.median(rates), ops_per_s_min=min(rates),
            ops_per_s_max=max(rates),
            p50_ms=statistics.median(s["p50_ms"] for s in summaries),
            p99_ms=statistics.median(s["p99_ms"] for s in summaries),
            server_cpu_us_per_op=_median_or_none([m.server_cpu_us_per_op for m in ms]),
            client_cpu_us_per_op=_median_or_none([m.client_cpu_us_per_op for m in ms]),
            ratio=None))
    base = {r.inflight: r.ops_per_s for r in rows if r.system == baseline}
    rows = [
        r if r.system == baseline or r.inflight not in base
        else Row(**{**asdict(r), "ratio": r.ops_per_s / base[r.inflight]})
        for r in rows
    ]
    return sorted(rows, key=lambda r: (r.inflight, r.system != baseline))


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def format_table(rows: Sequence[Row], baseline: str) -> str:
    header = ("system", "op", "in-flight", "ops/s median [min-max]", "p50 ms", "p99 ms",
              f"vs {baseline}", "server CPU us/op", "client CPU us/op")
    lines = [header]
    for r in rows:
        lines.append((
            r.system, r.op, str(r.inflight),
            f"{r.ops_per_s:,.0f} [{r.ops_per_s_min:,.0f}-{r.ops_per_s_max:,.0f}]",
            f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}",
            "-" if r.ratio is None else f"{r.ratio:.0%}",
            _us(r.server_cpu_us_per_op), _us(r.client_cpu_us_per_op),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    # Names align left, figures right.
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )


def _us(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def goal_verdict(rows: Sequence[Row], system: str = "chainstore") -> str | None:
    """The issue's criterion as one sentence, or None if this run did not measure it."""
    for r in rows:
        if (r.system, r.op, r.inflight) == (system, "put", GOAL_INFLIGHT) and r.ratio is not None:
            met = "met" if r.ratio >= GOAL_RATIO else "NOT met"
            return (f"{system} put at {GOAL_INFLIGHT} in flight: {r.ratio:.0%} of the echo "
                    f"server's throughput (goal >= {GOAL_RATIO:.0%}: {met})")
    return None
