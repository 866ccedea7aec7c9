"""Turn measurements into figures: medians over repetitions, ratios chainstore / peer, targets.

Throughput is the median of the repetitions' ops/s with their min and max; p50, p99 and p99.9
are the medians of the repetitions' own percentiles. Every peer's throughput (the single
server's too) is compared with the chain's for the same case (workload, key distribution, value
size, in-flight count): the ratio column is chain / that system, so above 100% the chain is
faster.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bench.runner import LOAD, NATIVE_REDIS, Case, Measurement

#: The system every other one is compared with.
CHAIN = "chain"
#: The issue's targets are measured with 100-byte values and 32 requests in flight.
TARGET_VALUE_SIZE = 100
TARGET_INFLIGHT = 32


@dataclass(frozen=True)
class Row:
    system: str
    case: Case
    runs: int
    ops_per_s: float
    ops_per_s_min: float
    ops_per_s_max: float
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    #: Median CPU microseconds per operation of the servers and of the load generator (None
    #: where the platform cannot tell): who limited the throughput.
    server_cpu_us_per_op: float | None
    client_cpu_us_per_op: float | None
    #: The chain's ops/s divided by this system's, same case (None: nothing to divide).
    chain_ratio: float | None = None


def summarize(measurements: Sequence[Measurement]) -> list[Row]:
    """One row per system and case: cases in the order first measured, and within a case the
    systems in the order they were first measured."""
    groups: dict[tuple[str, Case], list[Measurement]] = defaultdict(list)
    case_order: dict[Case, int] = {}
    system_order: dict[str, int] = {}
    for m in measurements:  # dicts keep insertion order
        groups[(m.system, m.case)].append(m)
        case_order.setdefault(m.case, len(case_order))
        system_order.setdefault(m.system, len(system_order))
    rows = []
    for (system, case), ms in groups.items():
        rates = [m.result.ops_per_second for m in ms]
        summaries = [m.result.summary() for m in ms]
        rows.append(Row(
            system=system, case=case, runs=len(ms),
            ops_per_s=statistics.median(rates), ops_per_s_min=min(rates),
            ops_per_s_max=max(rates),
            p50_ms=_median_or_none([s["p50_ms"] for s in summaries]),
            p99_ms=_median_or_none([s["p99_ms"] for s in summaries]),
            p999_ms=_median_or_none([s["p999_ms"] for s in summaries]),
            server_cpu_us_per_op=_median_or_none([m.server_cpu_us_per_op for m in ms]),
            client_cpu_us_per_op=_median_or_none([m.client_cpu_us_per_op for m in ms])))
    chain = {r.case: r.ops_per_s for r in rows if r.system == CHAIN}
    rows = [_with_ratio(r, chain.get(r.case)) for r in rows]
    return sorted(rows, key=lambda r: (case_order[r.case], system_order[r.system]))


def _with_ratio(row: Row, chain_ops: float | None) -> Row:
    if row.system == CHAIN or chain_ops is None or row.ops_per_s <= 0:
        return row
    return replace(row, chain_ratio=chain_ops / row.ops_per_s)


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _us(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def format_table(rows: Sequence[Row]) -> str:
    """The load generator's rows (not the native tool's), one line per system and case."""
    header = ("workload", "keys", "value B", "in-flight", "system", "ops/s median [min-max]",
              "p50 ms", "p99 ms", "p99.9 ms", "chain / this", "server CPU us/op",
              "client CPU us/op")
    lines = [header]
    for r in rows:
        if r.system == NATIVE_REDIS:
            continue
        c = r.case
        lines.append((
            c.workload, c.distribution, str(c.value_size), str(c.inflight), r.system,
            f"{r.ops_per_s:,.0f} [{r.ops_per_s_min:,.0f}-{r.ops_per_s_max:,.0f}]",
            _ms(r.p50_ms), _ms(r.p99_ms), _ms(r.p999_ms),
            "-" if r.chain_ratio is None else f"{r.chain_ratio:.0%}",
            _us(r.server_cpu_us_per_op), _us(r.client_cpu_us_per_op)))
    return _align(lines, left={0, 1, 4})


def _align(lines: Sequence[Sequence[str]], left: set[int]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
        for line in lines)


def format_native(rows: Sequence[Row]) -> str:
    """redis-benchmark beside the load generator's Redis figures at the same value size and
    in-flight count: GET beside workload C (reads only), SET beside workload W (our SET is
    followed by WAIT 2 0, redis-benchmark's is not). Empty if the native tool did not run."""
    native = [r for r in rows if r.system == NATIVE_REDIS]
    if not native:
        return ""
    ours = {(r.case.workload, r.case.value_size, r.case.inflight): r
            for r in rows if r.system == "redis" and r.case.distribution == "uniform"}
    ours_any = {(r.case.workload, r.case.value_size, r.case.inflight): r
                for r in rows if r.system == "redis" and r.case.workload in ("C", "W")}
    header = ("redis-benchmark", "value B", "in-flight", "ops/s median [min-max]", "p50 ms",
              "p99 ms", "load generator (same case)", "ops/s", "p50 ms", "p99 ms",
              "load generator / native")
    lines = [header]
    for r in native:
        c = r.case
        workload = "C" if c.workload == "GET" else "W"
        mine = ours.get((workload, c.value_size, c.inflight)) or ours_any.get(
            (workload, c.value_size, c.inflight))
        what = "-" if mine is None else (
            f"{workload} {mine.case.distribution}" + (" SET+WAIT" if workload == "W" else " GET"))
        lines.append((
            c.workload, str(c.value_size), str(c.inflight),
            f"{r.ops_per_s:,.0f} [{r.ops_per_s_min:,.0f}-{r.ops_per_s_max:,.0f}]",
            _ms(r.p50_ms), _ms(r.p99_ms), what,
            "-" if mine is None else f"{mine.ops_per_s:,.0f}",
            _ms(None if mine is None else mine.p50_ms), _ms(None if mine is None else mine.p99_ms),
            "-" if mine is None else f"{mine.ops_per_s / r.ops_per_s:.0%}"))
    return _align(lines, left={0, 6})


@dataclass(frozen=True)
class Target:
    """C{system}'s throughput (the chain's by default) in C{workload} must reach C{ratio} of
    C{versus}'s."""

    label: str
    workload: str
    versus: str
    ratio: float
    stretch: bool = False
    system: str = CHAIN


#: The issues' targets (workloads W, C and B, 100-byte values, 32 in flight).
TARGETS = (
    Target("chain put >= etcd put", "W", "etcd", 1.0),
    Target("chain get >= etcd linearizable get", "C", "etcd", 1.0),
    Target("chain put >= 50% of single put", "W", "single", 0.5),
    Target("chain put >= 50% of redis (SET + WAIT 2 0) put", "W", "redis", 0.5, stretch=True),
    # chain runs with mutual TLS (the default), chain-plain is the same cluster with tls off
    Target("TLS costs at most 20% of chain put throughput (chain >= 80% of chain-plain put)",
           "W", "chain-plain", 0.8),
    # reads from any chain member (CRAQ) lose nothing to their version queries
    Target("reads from any member: chain-any >= chain (tail reads), workload C", "C", "chain",
           1.0, system="chain-any"),
    Target("reads from any member: chain-any >= chain (tail reads), workload B", "B", "chain",
           1.0, system="chain-any"),
    # chain-nometrics is the same cluster with metrics off on every server
    Target("metrics cost at most 5% of chain put throughput (chain >= 95% of chain-nometrics "
           "put)", "W", "chain-nometrics", 0.95),
)
#: Under workload C with reads from any member, no server handles more than this share.
MAX_READ_SHARE = 0.45


def target_verdicts(rows: Sequence[Row], missing: dict[str, str] | None = None,
                    distributions: Sequence[str] = ("uniform", "zipfian"),
                    targets: Sequence[Target] = TARGETS) -> list[str]:
    """One line per target and key distribution: measured figures and PASS or FAIL, or why it
    was not measured."""
    by = {(r.system, r.case): r for r in rows}
    lines = []
    for t in targets:
        tag = "stretch " if t.stretch else ""
        measured_any = False
        for distribution in distributions:
            case = Case(t.workload, distribution, TARGET_VALUE_SIZE, TARGET_INFLIGHT)
            chain, other = by.get((t.system, case)), by.get((t.versus, case))
            if chain is None and other is None:
                continue
            measured_any = True
            where = (f"({t.workload}, {distribution}, {TARGET_VALUE_SIZE} B, "
                     f"{TARGET_INFLIGHT} in flight)")
            if chain is None or other is None:
                absent = t.system if chain is None else t.versus
                lines.append(f"NOT MEASURED: {tag}{t.label} {where}: {absent} not measured")
                continue
            ratio = chain.ops_per_s / other.ops_per_s if other.ops_per_s > 0 else float("inf")
            verdict = "PASS" if ratio >= t.ratio else "FAIL"
            lines.append(f"{verdict}: {tag}{t.label} {where}: {t.system} "
                         f"{chain.ops_per_s:,.0f} ops/s, {t.versus} {other.ops_per_s:,.0f} "
                         f"ops/s, ratio {ratio:.0%} (target >= {t.ratio:.0%})")
        if not measured_any:
            why = (missing or {}).get(t.versus)
            lines.append(f"NOT MEASURED: {tag}{t.label} ({t.workload}, {TARGET_VALUE_SIZE} B, "
                         f"{TARGET_INFLIGHT} in flight): "
                         + (f"{t.versus} missing: {why}" if why else
                            "the run did not include this case and both systems"))
    return lines


def read_shares(measurements: Sequence[Measurement]) -> dict[tuple[str, Case], dict[str, float]]:
    """Per system and case (load excluded), each server's share of the gets sent, over every
    repetition together."""
    totals: dict[tuple[str, Case], dict[str, int]] = defaultdict(dict)
    for m in measurements:
        if m.reads_by_server is None or m.case.workload == LOAD:
            continue
        counts = totals[(m.system, m.case)]
        for name, n in m.reads_by_server.items():
            counts[name] = counts.get(name, 0) + n
    shares = {}
    for group, counts in totals.items():
        total = sum(counts.values())
        if total:
            shares[group] = {name: n / total for name, n in sorted(counts.items())}
    return shares


def format_read_shares(measurements: Sequence[Measurement]) -> list[str]:
    """One line per system and case of the target size (100 B, 32 in flight) with each
    server's share of the gets, then the verdict of the read-spread target (workload C,
    C{chain-any}: the busiest server takes at most MAX_READ_SHARE of the gets)."""
    shares = read_shares(measurements)
    lines = []
    for (system, case), by_server in shares.items():
        if (case.value_size, case.inflight) != (TARGET_VALUE_SIZE, TARGET_INFLIGHT):
            continue
        spread = ", ".join(f"{name} {share:.0%}" for name, share in by_server.items())
        lines.append(f"{system} {case.workload} {case.distribution}: {spread}")
    for distribution in sorted({c.distribution for _, c in shares}):
        case = Case("C", distribution, TARGET_VALUE_SIZE, TARGET_INFLIGHT)
        by_server = shares.get(("chain-any", case))
        label = (f"under workload C the busiest server handles at most {MAX_READ_SHARE:.0%} of "
                 f"the reads (chain-any, {distribution}, {TARGET_VALUE_SIZE} B, "
                 f"{TARGET_INFLIGHT} in flight)")
        if by_server is None:
            lines.append(f"NOT MEASURED: {label}")
            continue
        name, top = max(by_server.items(), key=lambda item: item[1])
        verdict = "PASS" if top <= MAX_READ_SHARE else "FAIL"
        lines.append(f"{verdict}: {label}: busiest {name} {top:.0%}")
    return lines


def load_rows(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.case.workload == LOAD]
