"""Turn measurements into figures: medians over repetitions, ratios between systems, a table.

Throughput is the median of the repetitions' ops/s with their min and max; p50 and p99 are the
medians of the repetitions' own percentiles. Each system's throughput is divided by that of the
system it is compared to (L{bench.systems.SystemUnderTest.compare_to}) at the same in-flight
count: the chain's by the single server's for the same operation, the single server's by the
echo server's (whose only operation is echo).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from bench.runner import Measurement

#: The issue's bars: at this many in flight, a system's put throughput as a share of another's.
GOAL_INFLIGHT = 32
GOAL_RATIO = 0.5


@dataclass(frozen=True)
class Goal:
    """C{system}'s C{op} throughput at C{inflight} must reach C{ratio} of C{versus}'s."""

    system: str
    op: str
    versus: str
    inflight: int = GOAL_INFLIGHT
    ratio: float = GOAL_RATIO


#: The issue's criteria: the chain against the single server, the single server against AMP.
GOALS = (Goal("chain", "put", "single"), Goal("single", "put", "echo"))


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
    #: ops/s divided by C{ratio_to}'s at the same in-flight count (None: nothing to divide by).
    ratio: float | None = None
    ratio_to: str | None = None


def summarize(measurements: Sequence[Measurement],
              compare_to: Mapping[str, str] | None = None) -> list[Row]:
    """One row per system, operation and in-flight count, in order of in-flight count and then
    of the systems' first measurement; C{compare_to} maps a system to the one it is divided by.
    """
    groups: dict[tuple[str, str, int], list[Measurement]] = defaultdict(list)
    order: dict[str, int] = {}
    for m in measurements:  # dicts keep insertion order
        groups[(m.system, m.op, m.result.inflight)].append(m)
        order.setdefault(m.system, len(order))
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
            client_cpu_us_per_op=_median_or_none([m.client_cpu_us_per_op for m in ms])))
    rows = [_with_ratio(r, rows, (compare_to or {}).get(r.system)) for r in rows]
    return sorted(rows, key=lambda r: (r.inflight, order[r.system]))


def _with_ratio(row: Row, rows: Sequence[Row], versus: str | None) -> Row:
    if versus is None:
        return row
    same_count = [r for r in rows if r.system == versus and r.inflight == row.inflight]
    # The same operation, or the other system's only one (echo has nothing but echo).
    base = ([r for r in same_count if r.op == row.op]
            or (same_count if len({r.op for r in same_count}) == 1 else []))
    if not base or base[0].ops_per_s <= 0:
        return row
    return Row(**{**asdict(row), "ratio": row.ops_per_s / base[0].ops_per_s,
                  "ratio_to": versus})


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def format_table(rows: Sequence[Row]) -> str:
    header = ("system", "op", "in-flight", "ops/s median [min-max]", "p50 ms", "p99 ms",
              "throughput ratio", "server CPU us/op", "client CPU us/op")
    lines = [header]
    for r in rows:
        lines.append((
            r.system, r.op, str(r.inflight),
            f"{r.ops_per_s:,.0f} [{r.ops_per_s_min:,.0f}-{r.ops_per_s_max:,.0f}]",
            f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}",
            "-" if r.ratio is None else f"{r.ratio:.0%} of {r.ratio_to}",
            _us(r.server_cpu_us_per_op), _us(r.client_cpu_us_per_op),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    # Names align left, figures right.
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )


def format_ratios(rows: Sequence[Row]) -> str:
    """The ratios alone, one line per compared pair and operation, across in-flight counts:
    C{chain/single put: 1: 40%  8: 45%  32: 52%}."""
    pairs: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for r in rows:
        if r.ratio is not None and r.ratio_to is not None:
            pairs[(r.system, r.ratio_to, r.op)].append(r)
    return "\n".join(
        f"{system}/{versus} {op:<4} " + "  ".join(
            f"{r.inflight:>3} in flight: {r.ratio:>4.0%}"
            for r in sorted(group, key=lambda r: r.inflight))
        for (system, versus, op), group in pairs.items())


def _us(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def goal_verdicts(rows: Sequence[Row], goals: Sequence[Goal] = GOALS) -> list[str]:
    """One pass/fail sentence per goal this run measured (both systems at the goal's count)."""
    lines = []
    for goal in goals:
        for r in rows:
            if (r.system, r.op, r.inflight, r.ratio_to) == (goal.system, goal.op, goal.inflight,
                                                           goal.versus) and r.ratio is not None:
                met = "PASS" if r.ratio >= goal.ratio else "FAIL"
                lines.append(f"{met}: {goal.system} {goal.op} at {goal.inflight} in flight is "
                             f"{r.ratio:.0%} of {goal.versus}'s throughput "
                             f"(goal >= {goal.ratio:.0%})")
    return lines
