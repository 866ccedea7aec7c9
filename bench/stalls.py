"""The servers' reactor stalls during a join or a leave, from their own probes.

Each server times its reactor (chainstore/reactor_lag.py) and lists in its C{Stats} its last
stalls of 10 ms or more, with when each ended. L{StallWatch} asks every server for them once a
second while an operation runs (the list is bounded, and a leaving server is gone at the end),
and keeps them; L{StallWatch.largest} is the largest stall of each server between two moments.
Servers and driver share one machine, so the servers' clocks are the driver's.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from bench.systems import amp_connection
from chainstore import protocol
from chainstore.ring import NodeInfo
from chainstore.tls import Credentials

#: Seconds between two rounds of C{Stats}.
POLL_EVERY = 1.0


class StallWatch:
    """Collects the stalls of the servers in C{nodes} (name -> where) until L{stop}."""

    def __init__(self, reactor: Any, nodes: dict[str, NodeInfo],
                 credentials: Credentials | None) -> None:
        self.reactor = reactor
        self.nodes = dict(nodes)
        self.credentials = credentials
        #: server -> {ended at: (ms, CPU ms)}
        self.stalls: dict[str, dict[float, tuple[float, float]]] = {n: {} for n in nodes}
        self._conns: dict[str, Any] = {}
        self._running = False
        self._done: Deferred[None] | None = None

    def start(self) -> None:
        self._running = True
        self._done = Deferred.fromCoroutine(self._poll())

    async def stop(self) -> None:
        self._running = False
        if self._done is not None:
            await self._done
        await self.collect()
        for conn in self._conns.values():
            if conn.transport is not None:
                conn.transport.loseConnection()

    async def _poll(self) -> None:
        while self._running:
            await self.collect()
            await deferLater(self.reactor, POLL_EVERY)

    async def collect(self) -> None:
        """One round: every server's stalls (one that cannot be reached yet, such as a joining
        server not started, or any more, such as a server that left, is skipped)."""
        for name, node in self.nodes.items():
            try:
                conn = self._conns.get(name)
                if conn is None:
                    conn = self._conns[name] = await amp_connection(
                        self.reactor, (node.host, node.amp_port), self.credentials)
                stats = json.loads((await conn.callRemote(protocol.Stats))["stats"])
            except Exception:
                self._conns.pop(name, None)
                continue
            seen = self.stalls.setdefault(name, {})
            for ended, ms, cpu_ms in stats.get("reactor_stalls", []):
                seen[ended] = (ms, cpu_ms)

    def largest(self, start: float, end: float) -> dict[str, tuple[float, float]]:
        """Server -> its largest stall (ms, CPU ms meanwhile) that ended between C{start} and
        C{end} (driver clock); (0, 0) for a server with none of 10 ms or more."""
        return {name: max((v for t, v in seen.items() if start <= t <= end), default=(0.0, 0.0))
                for name, seen in sorted(self.stalls.items())}
