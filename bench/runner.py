"""One benchmark session: connect to every system, load the record set, then run each case.

For each value size, every system is first loaded with the record set (every record inserted,
32 in flight, not time-capped but bounded by C{load_seconds}); then the runs. Repetitions are
interleaved (repetition 1 of every case and system, then repetition 2, ...) so that a machine
that slows down during the session slows every system alike instead of biasing the ratios
between them; and the order of the systems rotates from one repetition to the next, so that
none always runs right after another's load (a server's leftover work, a full page cache) or
always first. Every system of a case runs exactly the same operations on the same keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet.defer import Deferred

from bench.loadgen import ClosedLoop, RunResult
from bench.systems import SystemUnderTest, WrongAnswer
from bench.ycsb import WORKLOADS, Operations, draw, record_keys, record_values

#: The workload name of the load phase's measurement.
LOAD = "load"
#: The native tool's measurements: the system name they are reported under.
NATIVE_REDIS = "redis-benchmark"


@dataclass(frozen=True)
class Settings:
    """How much to measure: C{ops} per run unless C{seconds} run out first."""

    ops: int = 10_000
    seconds: float = 1.0
    repeat: int = 3
    inflight: tuple[int, ...] = (1, 8, 32)
    connections: int = 1
    warmup: int = 500
    records: int = 10_000
    workloads: tuple[str, ...] = ("A", "B", "C", "W")
    distributions: tuple[str, ...] = ("zipfian",)
    value_sizes: tuple[int, ...] = (100, 10_000)
    key_size: int = 16
    load_seconds: float = 300.0
    native: bool = True

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Case:
    """What one run measures, the same for every system."""

    workload: str
    distribution: str
    value_size: int
    inflight: int


@dataclass(frozen=True)
class Measurement:
    """One run, with the CPU seconds the servers and the load generator spent during it.

    The CPU figures tell who limited the throughput: with one load generator process, a
    system whose server is cheap per operation is bounded by the client's cost instead.
    C{result} is a L{RunResult} of the load generator or a native tool's
    L{bench.peers.NativeResult}.
    """

    system: str
    case: Case
    repetition: int
    result: Any
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None
    #: gets sent to each server during the run, by name (systems of several servers)
    reads_by_server: dict[str, int] | None = None

    @property
    def server_cpu_us_per_op(self) -> float | None:
        if self.server_cpu_s is None or not self.result.completed:
            return None
        return self.server_cpu_s / self.result.completed * 1e6

    @property
    def client_cpu_us_per_op(self) -> float | None:
        if self.client_cpu_s is None or not self.result.completed:
            return None
        return self.client_cpu_s / self.result.completed * 1e6

    def to_json(self) -> dict[str, Any]:
        return {"system": self.system, **asdict(self.case), "repetition": self.repetition,
                **self.result.summary(),
                "server_cpu_s": self.server_cpu_s, "client_cpu_s": self.client_cpu_s,
                "server_cpu_us_per_op": self.server_cpu_us_per_op,
                "client_cpu_us_per_op": self.client_cpu_us_per_op,
                "reads_by_server": self.reads_by_server}


def rotated(systems: Sequence[Any], repetition: int) -> list[Any]:
    """The order in which repetition C{repetition} (from 1) runs the systems."""
    shift = (repetition - 1) % len(systems) if systems else 0
    return [*systems[shift:], *systems[:shift]]


class LoadIncomplete(Exception):
    """The load phase did not insert every record within its time bound."""


def run_operations(system: SystemUnderTest, conns: Sequence[Any], ops: Operations,
                   keys: Sequence[bytes], values: tuple[bytes, bytes], inflight: int,
                   seconds: float, now: Callable[[], float] = time.perf_counter,
                   write: bytes | None = None) -> Deferred[RunResult]:
    """One closed-loop run of C{ops} over the records C{keys}: reads check that the answer is
    one of the record's two C{values}; updates write C{write} (the second value by default).
    Requests go round-robin over the client handles C{conns} (the system routes each further,
    e.g. to its key's head)."""
    reads, records = ops.reads, ops.records
    loaded, updated = values
    new = updated if write is None else write
    count = len(conns)
    check = system.reads_values

    def verify(answer: Any, key: bytes) -> None:
        if answer != loaded and answer != updated:
            size = "nothing" if answer is None else f"{len(answer)} bytes"
            raise WrongAnswer(f"{system.name}: get {key!r} answered {size} that were not put")

    def request(i: int) -> Deferred[Any]:
        key = keys[records[i]]
        if reads[i]:
            d = system.request("get", conns[i % count], key, b"")
            return d.addCallback(verify, key) if check else d
        return system.request("put", conns[i % count], key, new)

    return ClosedLoop(request, len(ops), inflight, seconds, now).run()


async def measure(system: SystemUnderTest, conns: Sequence[Any], case: Case, repetition: int,
                  ops: Operations, keys: Sequence[bytes], values: tuple[bytes, bytes],
                  seconds: float, write: bytes | None = None) -> Measurement:
    reads_before = system.read_counts(conns)
    server_before, client_before = system.cpu_seconds(), time.process_time()
    result = await run_operations(system, conns, ops, keys, values, case.inflight, seconds,
                                  write=write)
    server_after, client_after = system.cpu_seconds(), time.process_time()
    server_cpu = (None if server_before is None or server_after is None
                  else server_after - server_before)
    reads_after = system.read_counts(conns)
    reads = None if reads_before is None or reads_after is None else {
        name: n - reads_before.get(name, 0) for name, n in sorted(reads_after.items())}
    return Measurement(system.name, case, repetition, result, server_cpu,
                       client_after - client_before, reads)


def load_operations(records: int) -> Operations:
    """Every record once, in order: the load phase's inserts."""
    return Operations([False] * records, list(range(records)))


async def run_session(reactor: Any, systems: Sequence[SystemUnderTest], settings: Settings,
                      progress: Callable[[Measurement], None] = lambda m: None,
                      native: Callable[..., Any] | None = None) -> list[Measurement]:
    """Measure every case of C{settings} on every system, C{repeat} times, each value size
    after its load phase. C{native(reactor, system, inflight, ops, value_size, records)},
    if given, runs a native tool against each system it applies to (it returns measurements
    by name, or None for a system it does not apply to) after each repetition."""
    keys = record_keys(settings.records, settings.key_size)
    top = max(settings.inflight)
    conns: dict[str, list[Any]] = {}
    measurements: list[Measurement] = []

    def record(m: Measurement) -> None:
        measurements.append(m)
        progress(m)

    try:
        for system in systems:
            conns[system.name] = await system.connect(reactor, settings.connections, top)
        for size_index, value_size in enumerate(settings.value_sizes):
            values = record_values(value_size)
            for system in rotated(systems, size_index + 1):
                m = await measure(system, conns[system.name], Case(LOAD, "-", value_size, top),
                                  0, load_operations(settings.records), keys, values,
                                  settings.load_seconds, write=values[0])
                if m.result.completed != settings.records:
                    raise LoadIncomplete(
                        f"{system.name} loaded {m.result.completed} of {settings.records} "
                        f"records in {settings.load_seconds}s")
                record(m)
            # Unmeasured: the first requests of a run's kind pay for buffers and code paths
            # warming (and, for a fresh value size, for the allocator's new sizes).
            if settings.warmup:
                warm = draw(WORKLOADS["A"], "uniform", settings.records, settings.warmup,
                            f"warmup-{value_size}")
                for system in systems:
                    await run_operations(system, conns[system.name], warm, keys, values, top,
                                         settings.seconds)
            for repetition in range(1, settings.repeat + 1):
                for workload in settings.workloads:
                    for distribution in settings.distributions:
                        for inflight in settings.inflight:
                            case = Case(workload, distribution, value_size, inflight)
                            ops = draw(WORKLOADS[workload], distribution, settings.records,
                                       settings.ops,
                                       f"{workload}-{distribution}-{value_size}-{inflight}-"
                                       f"{repetition}")
                            for system in rotated(systems, repetition):
                                record(await measure(system, conns[system.name], case,
                                                     repetition, ops, keys, values,
                                                     settings.seconds))
                if native is not None:
                    for inflight in settings.inflight:
                        for system in systems:
                            found = await native(reactor, system, inflight, settings.ops,
                                                 value_size, settings.records)
                            for m in found or ():
                                record(Measurement(m[0], m[1], repetition, m[2]))
        for system in systems:
            await system.check_after(conns[system.name])
        return measurements
    finally:
        for system in systems:
            system.disconnect(conns.get(system.name, []))
