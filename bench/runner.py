"""One benchmark session: connect to every system, then run each measurement in turn.

Repetitions are interleaved (repetition 1 of every system at every in-flight count, then
repetition 2, ...) so that a machine that slows down during the session slows every system
alike, instead of biasing the ratio between them; and the order of the systems rotates from one
repetition to the next, so that none always runs right after another's load (a server's
leftover work, a full page cache) or always first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from bench.loadgen import ClosedLoop, RunResult
from bench.systems import SystemUnderTest
from bench.workload import KeyValueWorkload


@dataclass(frozen=True)
class Settings:
    """How much to measure: C{ops} per run unless C{seconds} run out first."""

    ops: int = 10_000
    seconds: float = 3.0
    repeat: int = 3
    inflight: tuple[int, ...] = (1, 8, 32)
    connections: int = 1
    warmup: int = 500


@dataclass(frozen=True)
class Measurement:
    """One run, with the CPU seconds the servers and the load generator spent during it.

    The CPU figures tell who limited the throughput: with one load generator process, a
    system whose server is cheap per operation is bounded by the client's cost instead.
    """

    system: str
    op: str
    repetition: int
    result: RunResult
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None

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
        return {"system": self.system, "op": self.op, "repetition": self.repetition,
                **self.result.summary(),
                "server_cpu_s": self.server_cpu_s, "client_cpu_s": self.client_cpu_s,
                "server_cpu_us_per_op": self.server_cpu_us_per_op,
                "client_cpu_us_per_op": self.client_cpu_us_per_op}


def rotated(systems: Sequence[SystemUnderTest], repetition: int) -> list[SystemUnderTest]:
    """The order in which repetition C{repetition} (from 1) runs the systems."""
    shift = (repetition - 1) % len(systems) if systems else 0
    return [*systems[shift:], *systems[:shift]]


def run_once(system: SystemUnderTest, op: str, conns: Sequence[Any], keys: list[bytes],
             value: bytes, inflight: int, seconds: float,
             now: Callable[[], float] = time.perf_counter) -> Deferred[RunResult]:
    """One closed-loop run of C{op} over C{keys}, spreading requests over the client handles
    C{conns} (the system routes each request further, e.g. to its key's head)."""
    def request(i: int) -> Deferred[Any]:
        return system.request(op, conns[i % len(conns)], keys[i], value)

    return ClosedLoop(request, len(keys), inflight, seconds, now).run()


async def run_session(reactor: Any, systems: Sequence[SystemUnderTest],
                      workload: KeyValueWorkload, settings: Settings,
                      progress: Callable[[Measurement], None] = lambda m: None,
                      ) -> list[Measurement]:
    """Measure every operation of every system at every in-flight count, C{repeat} times."""
    value = workload.value()
    conns: dict[str, list[Any]] = {}
    try:
        for system in systems:
            conns[system.name] = await system.connect(reactor, settings.connections)
        # Unmeasured: the first requests of a connection pay for buffers and code paths warming.
        if settings.warmup:
            for system in systems:
                await run_operations(system, conns[system.name],
                                     workload.keys("warmup", settings.warmup), value,
                                     max(settings.inflight), settings.seconds)
        measurements = []
        for repetition in range(1, settings.repeat + 1):
            for inflight in settings.inflight:
                keys = workload.keys(f"r{repetition}n{inflight}", settings.ops)
                for system in rotated(systems, repetition):
                    for measurement in await run_operations(
                            system, conns[system.name], keys, value, inflight, settings.seconds,
                            repetition):
                        measurements.append(measurement)
                        progress(measurement)
        for system in systems:
            await system.check_after(conns[system.name])
        return measurements
    finally:
        for system in systems:
            system.disconnect(conns.get(system.name, []))


async def run_operations(system: SystemUnderTest, conns: Sequence[Any], keys: list[bytes],
                         value: bytes, inflight: int, seconds: float, repetition: int = 0,
                         now: Callable[[], float] = time.perf_counter) -> list[Measurement]:
    """Run each operation of C{system} over the same key set, in the system's order."""
    results = []
    for op in system.operations:
        server_before, client_before = system.cpu_seconds(), time.process_time()
        result = await run_once(system, op, conns, keys, value, inflight, seconds, now)
        server_after, client_after = system.cpu_seconds(), time.process_time()
        server_cpu = (None if server_before is None or server_after is None
                      else server_after - server_before)
        results.append(Measurement(system.name, op, repetition, result,
                                   server_cpu, client_after - client_before))
        # If time ran out before every key was written, later operations (the gets) use only
        # the keys that were: the loop sends keys in order and waits for every answer.
        keys = keys[:result.completed]
    return results
