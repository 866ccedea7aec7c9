"""The CPU time the servers spend during one join or leave, from /proc.

L{CPUWatch} reads every server's CPU time (user and system, L{bench.roles.activity}) a few
times a second while an operation runs, and keeps each process's first and last reading: a
server that joins is counted from its first reading, one that leaves until its last. CPU time
is the figure that a machine shared with other work changes least (unlike the operation's wall
time), so it is what compares two versions of the code run one after the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall

from bench.roles import activity

#: Seconds between two readings.
CPU_EVERY = 0.2


def _cpu_of(pid: int) -> float | None:
    try:
        return activity(pid).cpu
    except (OSError, KeyError, IndexError, ValueError):
        return None  # gone (or going)


class CPUWatch:
    """Reads the CPU seconds of the processes C{pids()} names (name -> pid, asked at every
    reading) every C{interval} seconds on C{clock}, from L{start} to L{stop}."""

    def __init__(self, clock: Any, pids: Callable[[], dict[str, int]],
                 read: Callable[[int], float | None] = _cpu_of,
                 interval: float = CPU_EVERY) -> None:
        self.pids = pids
        self.read = read
        self.interval = interval
        #: (name, pid) -> (first, last) CPU seconds read
        self.readings: dict[tuple[str, int], tuple[float, float]] = {}
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self.sample()

    def sample(self) -> None:
        for name, pid in self.pids().items():
            cpu = self.read(pid)
            if cpu is None:
                continue
            first, _ = self.readings.get((name, pid), (cpu, cpu))
            self.readings[(name, pid)] = (first, cpu)

    def spent(self) -> dict[str, float]:
        """Server -> CPU seconds between its first and last reading (a restarted server's
        processes added up)."""
        spent: dict[str, float] = {}
        for (name, _), (first, last) in sorted(self.readings.items()):
            spent[name] = spent.get(name, 0.0) + last - first
        return spent
