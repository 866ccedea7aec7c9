"""The memory of running processes, from /proc: parsing a status file, reading one process's
VmRSS and VmHWM, and L{MemorySampler}, which keeps each process's peak per phase of a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall

from bench.driver import log

#: Seconds between two samples.
RSS_EVERY = 0.2


def parse_memory(status_text: str) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB from the text of /proc/PID/status; None if either is absent (a
    zombie, or a kernel thread)."""
    found: dict[str, int] = {}
    for line in status_text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            amount, _, unit = rest.strip().partition(" ")
            if unit.strip() != "kB":
                raise ValueError(f"unexpected unit in {line!r}")
            found[name] = int(amount)
    if len(found) != 2:
        return None
    return found["VmRSS"], found["VmHWM"]


def read_memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB of process C{pid}, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            return parse_memory(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


class MemorySampler:
    """Samples the memory of named processes every C{interval} seconds on C{clock}.

    C{pids()} names the processes to watch (asked every tick, so servers launched later are
    picked up); C{read(pid)} gives (VmRSS, VmHWM) in KiB or None for a gone process. For each
    process it keeps the highest VmRSS seen in each phase (L{set_phase}) and the last VmHWM
    (the kernel's own peak, which catches spikes between samples).
    """

    def __init__(self, clock: Any, pids: Callable[[], dict[str, int]],
                 read: Callable[[int], tuple[int, int] | None] = read_memory,
                 interval: float = RSS_EVERY) -> None:
        self.pids = pids
        self.read = read
        self.phase = "start"
        self.phases: list[str] = []
        #: name -> phase -> highest VmRSS seen (KiB)
        self.rss: dict[str, dict[str, int]] = {}
        #: name -> last VmHWM seen (KiB)
        self.hwm: dict[str, int] = {}
        self.samples = 0
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock
        self.interval = interval

    def start(self, phase: str) -> None:
        self.set_phase(phase)
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self.sample()
            self._loop.stop()

    def set_phase(self, phase: str) -> None:
        """From now on samples count for C{phase}; one is taken at once, so even a phase
        shorter than the interval has a figure."""
        if self.phase in self.phases and self._loop.running:
            self.sample()
        self.phase = phase
        if phase not in self.phases:
            self.phases.append(phase)
        if self._loop.running:
            self.sample()

    def sample(self) -> None:
        # A LoopingCall stops for good if its function raises: a bad read is skipped.
        try:
            pids = self.pids()
        except Exception as e:
            log(f"  memory sampler: cannot list the servers: {e}")
            return
        self.samples += 1
        for name, pid in pids.items():
            try:
                memory = self.read(pid)
            except Exception as e:
                log(f"  memory sampler: cannot read {name} (pid {pid}): {e}")
                continue
            if memory is None:
                continue
            rss, hwm = memory
            phases = self.rss.setdefault(name, {})
            phases[self.phase] = max(phases.get(self.phase, 0), rss)
            self.hwm[name] = max(self.hwm.get(name, 0), hwm)

    def peaks(self) -> dict[str, int]:
        """Each process's peak (KiB): the highest of its VmHWM and every VmRSS sampled."""
        return {name: max([self.hwm.get(name, 0), *phases.values()])
                for name, phases in self.rss.items()}
