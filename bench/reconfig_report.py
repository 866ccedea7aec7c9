"""What L{bench.reconfig} measured and how it is shown: the figures of one join or leave
(L{OpResult}) and of one data size (L{SizeResult}), the report of a size, the table of every
size, and L{compare}'s verdict on whether the write-refused window or the servers' memory grew
with the data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.cluster import STORES


@dataclass
class OpResult:
    """One join or leave: times in seconds since its command was sent (client clock)."""

    op: str
    server: str
    seconds: float
    ecs_seconds: float
    ecs_locked_seconds: float
    moved_keys: int
    moved_bytes: int
    copy_seconds: float | None
    copy_bytes: int
    refused_first: float | None
    refused_last: float | None
    refused_answers: int
    writes: int
    accepted_during: int
    write_p50_ms: float
    write_p99_ms: float
    write_max_ms: float
    not_responsible_answers: int
    stopped_answers: int
    lost_answers: int
    skipped_writes: int
    errors: list[str]
    steps: list[tuple[float, str]]
    store_keys: dict[str, dict[str, int]]
    epoch_before: int
    epoch_after: int
    ring_after: list[str]
    #: server -> its largest reactor stall from the command sent to its answer (ms, and the
    #: server's CPU ms meanwhile; bench/stalls.py); 0 if none reached 10 ms
    stalls: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: per step (L{latency_by_step}): (step, writes sent in it, of them over SLOW_MS, max ms)
    by_step: list[tuple[str, int, int, float]] = field(default_factory=list)
    #: server -> its CPU seconds from the command sent to its answer (bench/cpu_watch.py)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def max_stall_ms(self) -> float | None:
        return max((ms for ms, _ in self.stalls.values()), default=None)

    @property
    def refused_window(self) -> float | None:
        if self.refused_first is None or self.refused_last is None:
            return None
        return self.refused_last - self.refused_first

    @property
    def mb_per_s(self) -> float:
        """Bytes moved over the ECS's whole reconfiguration time, in MB/s."""
        return self.moved_bytes / 1e6 / self.ecs_seconds if self.ecs_seconds > 0 else 0.0

    @property
    def copy_mb_per_s(self) -> float | None:
        """Bytes moved over the copy step alone (seen by polling C{Status}), in MB/s."""
        if not self.copy_seconds:
            return None
        return self.copy_bytes / 1e6 / self.copy_seconds


@dataclass
class SizeResult:
    """One data size on a fresh cluster: its load, its operations, the read-back and the
    servers' memory."""

    keys: int
    replication: int
    value_bytes: int
    load_seconds: float
    ops: list[OpResult]
    verified_keys: int
    verified: str
    problems: list[str]
    #: server -> phase -> highest VmRSS sampled (KiB)
    rss_kib: dict[str, dict[str, int]]
    #: server -> peak (KiB): the highest of its VmHWM and its sampled VmRSS
    peak_kib: dict[str, int]
    rss_samples: int
    #: server -> bytes of its data directory at the end (the removed server's too)
    data_bytes: dict[str, int]
    pids: dict[str, Any]

    @property
    def max_peak_kib(self) -> int:
        return max(self.peak_kib.values(), default=0)


#: A write slower than this (the issue's p99 target) is counted per step by L{latency_by_step}.
SLOW_MS = 50.0


def latency_by_step(accepted: list[float], latencies: list[float],
                    steps: list[tuple[float, str]]) -> list[tuple[str, int, int, float]]:
    """The writer's accepted writes grouped by the step that was showing when each was sent
    (C{accepted} and C{latencies} in seconds, parallel; C{steps} (time, step) as first shown by
    C{Status}; "before" until the first): per step (step, writes, writes over L{SLOW_MS}, max
    ms), in the steps' order. Where the slow writes fall says what held them."""
    names = ["before"] + [step for _, step in steps]
    starts = [t for t, _ in steps]
    groups: dict[str, list[float]] = {name: [] for name in names}
    for done, latency in zip(accepted, latencies):
        sent = done - latency
        place = sum(1 for start in starts if start <= sent)
        groups[names[place]].append(latency * 1e3)
    return [(name, len(ms), sum(1 for m in ms if m > SLOW_MS), max(ms, default=0.0))
            for name, ms in groups.items() if ms]


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def format_op(o: OpResult) -> list[tuple[str, str]]:
    window = o.refused_window
    copy = o.copy_mb_per_s
    return [
        (f"{o.op} ({o.server})", f"{o.seconds:.3f} s sent to answered"
         + (" (launch, register, copy, lock, switch, drop)" if o.op == "join"
            else " (copy, lock, switch, drop, shut down)")
         + f"; epoch {o.epoch_before} -> {o.epoch_after}, ring {', '.join(o.ring_after)}"),
        ("  reconfiguration (ECS)", f"{o.ecs_seconds:.2f} s, moved {o.moved_keys:,} keys "
         f"({o.moved_bytes:,} bytes): {o.mb_per_s:.2f} MB/s overall"
         + ("" if copy is None else f", {copy:.2f} MB/s in the copy step "
            f"({o.copy_bytes:,} bytes in {o.copy_seconds:.2f} s, from Status)")),
        ("  writes refused (ECS)", f"{o.ecs_locked_seconds:.3f} s, lock to commit"),
        ("  writes refused (client)",
         "no server_write_lock answer" if window is None else
         f"{window:.3f} s: first server_write_lock at +{o.refused_first:.3f} s, last at "
         f"+{o.refused_last:.3f} s, {o.refused_answers:,} refusals"),
        ("  writer", f"{o.writes:,} puts, {o.accepted_during:,} accepted during the {o.op}; "
         f"latency p50 {o.write_p50_ms:.1f} ms, p99 {o.write_p99_ms:.1f} ms, max "
         f"{o.write_max_ms:.1f} ms; {o.not_responsible_answers} server_not_responsible, "
         f"{o.stopped_answers} server_stopped, {o.lost_answers} connection closed, "
         f"{o.skipped_writes} skipped (too many outstanding), {len(o.errors)} other failures"),
        ("  reactor stalls", "largest per server, from its own probe (CPU meanwhile): "
         + ", ".join(f"{name} {ms:.0f} ms ({cpu:.0f})" if ms else f"{name} < 10 ms"
                     for name, (ms, cpu) in o.stalls.items())),
        ("  stores after", ", ".join(
            f"{name} {'/'.join(f'{c[s]:,}' for s in STORES)}"
            for name, c in sorted(o.store_keys.items())) + " (coordinator/replica1/replica2)"),
        ("  steps (Status)", ", ".join(f"+{t:.2f} s {step}" for t, step in o.steps)),
        ("  servers' CPU", f"{sum(o.cpu_seconds.values()):.2f} s "
         f"({sum(o.cpu_seconds.values()) / max(o.moved_keys, 1) * 1e6:.0f} us per key moved): "
         + ", ".join(f"{name} {s:.2f}" for name, s in o.cpu_seconds.items())),
        ("  writes by step", f"sent during (puts, over {SLOW_MS:.0f} ms, max ms): " + ", ".join(
            f"{step} {n:,}/{slow:,}/{top:.0f}" for step, n, slow, top in o.by_step)),
    ]


def format_report(r: SizeResult) -> str:
    rows: list[tuple[str, str]] = [
        ("load", f"{r.keys:,} keys x {r.value_bytes} B in {r.load_seconds:.1f} s "
         f"({r.keys / r.load_seconds:,.0f} puts/s through the chains)")]
    for o in r.ops:
        rows.extend(format_op(o))
    rows.append(("read back", f"{r.verified_keys:,} keys from their tails: {r.verified}"))
    phases = list(dict.fromkeys(p for per in r.rss_kib.values() for p in per))
    for name in sorted(r.rss_kib):
        per = r.rss_kib[name]
        rows.append((f"RSS {name} (MiB)", ", ".join(
            f"{phase} {_mib(per[phase])}" for phase in phases if phase in per)
            + f"; peak {_mib(r.peak_kib[name])} (VmHWM); data on disk "
              f"{r.data_bytes.get(name, 0) / 2**20:.0f} MiB"))
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {what}" for name, what in rows]
    lines.extend(f"  failure: {e}" for o in r.ops for e in o.errors)
    lines.extend(f"  WRONG: {p}" for p in r.problems)
    return "\n".join(lines)


def format_table(results: list[SizeResult]) -> str:
    """One line per size and operation, the figures side by side."""
    header = ("keys", "op", "total s", "ECS s", "moved keys", "MB", "MB/s", "copy MB/s",
              "refused client s", "refused ECS s", "writer p99/max ms", "max stall ms",
              "server CPU s", "peak RSS MiB")
    rows = [header]
    for r in results:
        for o in r.ops:
            window = o.refused_window
            copy = o.copy_mb_per_s
            rows.append((f"{r.keys:,}", o.op, f"{o.seconds:.2f}", f"{o.ecs_seconds:.2f}",
                         f"{o.moved_keys:,}", f"{o.moved_bytes / 1e6:.1f}", f"{o.mb_per_s:.2f}",
                         "-" if copy is None else f"{copy:.2f}",
                         "-" if window is None else f"{window:.3f}",
                         f"{o.ecs_locked_seconds:.3f}",
                         f"{o.write_p99_ms:.0f}/{o.write_max_ms:.0f}",
                         "-" if o.max_stall_ms is None else f"{o.max_stall_ms:.0f}",
                         f"{sum(o.cpu_seconds.values()):.1f}", _mib(r.max_peak_kib)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths))
                     for row in rows)


def compare(results: list[SizeResult], tolerance: float = 0.5,
            rss_tolerance: float = 0.25) -> str | None:
    """Whether the write-refused window (per operation, client and ECS view) or the servers'
    peak memory grew with the data: the largest size's figures against the smallest's.

    A window passes if it is under 1 s and at most C{tolerance} s longer; memory passes if the
    largest server peak is at most C{rss_tolerance} more than at the smallest size."""
    if len(results) < 2:
        return None
    small, large = min(results, key=lambda r: r.keys), max(results, key=lambda r: r.keys)
    growth = f"{large.keys / small.keys:.0f}x the data"
    lines = []
    small_ops, large_ops = {o.op: o for o in small.ops}, {o.op: o for o in large.ops}
    for op in [op for op in small_ops if op in large_ops]:
        a_op, b_op = small_ops[op], large_ops[op]
        for what, a, b in (("client-observed", a_op.refused_window, b_op.refused_window),
                           ("ECS lock", a_op.ecs_locked_seconds, b_op.ecs_locked_seconds)):
            if a is None or b is None:
                lines.append(f"{op}: {what} write-refused time not measured at both sizes")
                continue
            grew = b > a + tolerance
            lines.append(f"{'FAIL' if grew or b >= 1.0 else 'PASS'}: {op} {what} write-refused "
                         f"time {a:.3f} s at {small.keys:,} keys, {b:.3f} s at "
                         f"{large.keys:,} keys ({growth}; goal: under 1 s and not more than "
                         f"{tolerance} s longer)")
    a_kib, b_kib = small.max_peak_kib, large.max_peak_kib
    if a_kib and b_kib:
        grew = b_kib > a_kib * (1 + rss_tolerance)
        lines.append(f"{'FAIL' if grew else 'PASS'}: peak server RSS {_mib(a_kib)} MiB at "
                     f"{small.keys:,} keys, {_mib(b_kib)} MiB at {large.keys:,} keys "
                     f"({b_kib / a_kib:.2f}x for {growth}; goal: bounded by the cache and "
                     f"window sizes, at most {rss_tolerance:.0%} more)")
    else:
        lines.append("peak server RSS: not measured at both sizes")
    return "\n".join(lines)
