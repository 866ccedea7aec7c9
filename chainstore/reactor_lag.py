"""How long the reactor goes without running timers: a server's own stall probe.

A server is one thread: while a handler runs (a store query, a batch written, a key range
hashed) nothing else is answered, not a client, not a peer, not the ECS's heartbeat. The
probe is a timer due every L{INTERVAL} seconds; each time it runs it notes how late it is
(the time since its last run, less the interval). That is a stall of this process, whatever
its cause, so beside it the probe notes the process's CPU time over the same span: a stall
with as much CPU was the server's own work holding the reactor, one with little CPU was the
process waiting for the machine (another process had the CPU, or the disk).

Why in the server and not a probe client timing requests: a client's figure would add the
network, TLS and the client's own stalls (on a shared 2-CPU machine, sometimes more than the
server's), and a high request rate against every server would load what it measures. The
timer costs one call every 10 ms.

The server's C{Stats} carries the largest stall since start and the last L{KEEP} stalls of at
least L{RECORD_MS} (when they ended, on the server's clock), so a benchmark picks those of the
moments it measured (python -m bench.reconfig).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from chainstore.logs import get_logger

log = get_logger("chainstore.reactor_lag")

#: Seconds between two runs of the probe's timer.
INTERVAL = 0.01
#: Stalls of at least this many milliseconds are kept, with when they ended.
RECORD_MS = 10.0
#: How many of them.
KEEP = 256


class ReactorLag(Service):
    """The probe, started and stopped with the server (a child service)."""

    def __init__(self, clock: IReactorTime,
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.clock = clock
        self.cpu = cpu
        #: the largest stall since start: (milliseconds, CPU milliseconds meanwhile)
        self.max_ms = 0.0
        self.max_cpu_ms = 0.0
        #: recent stalls of at least RECORD_MS: (ended at, ms, CPU ms)
        self.stalls: deque[tuple[float, float, float]] = deque(maxlen=KEEP)
        self._loop: LoopingCall | None = None
        self._last = self._last_cpu = 0.0

    def startService(self) -> None:
        super().startService()
        self._last, self._last_cpu = self.clock.seconds(), self.cpu()
        loop = self._loop = LoopingCall(self._tick)
        loop.clock = self.clock
        loop.start(INTERVAL, now=False).addErrback(
            lambda f: log.failure("the reactor lag probe stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now, cpu = self.clock.seconds(), self.cpu()
        late_ms = max(0.0, (now - self._last - INTERVAL) * 1000)
        cpu_ms = (cpu - self._last_cpu) * 1000
        self._last, self._last_cpu = now, cpu
        if late_ms > self.max_ms:
            self.max_ms, self.max_cpu_ms = late_ms, cpu_ms
        if late_ms >= RECORD_MS:
            self.stalls.append((now, late_ms, cpu_ms))

    def stats(self) -> dict[str, Any]:
        return {"reactor_lag_max_ms": round(self.max_ms, 1),
                "reactor_lag_max_cpu_ms": round(self.max_cpu_ms, 1),
                "reactor_stalls": [[round(t, 3), round(ms, 1), round(cpu, 1)]
                                   for t, ms, cpu in self.stalls]}

