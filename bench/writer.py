"""The background writer of L{bench.reconfig}: puts at a steady rate to keys all over the ring
while a server joins or leaves, noting when each was accepted or refused (L{WriterLog}), and
following the ring as it changes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import LoopingCall, deferLater

from bench.cluster import MeasurementFailed, router_for
from bench.dataset import key_of, value_of
from bench.systems import ChainRouter
from chainstore import protocol
from chainstore.errors import NotResponsible, ServerStopped, WriteLocked


@dataclass
class WriterLog:
    """What the writer saw; times in seconds since its zero (the operation's command sent)."""

    accepted: list[float] = field(default_factory=list)
    #: each accepted write's latency, in the order of L{accepted}
    latencies: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    not_responsible: list[float] = field(default_factory=list)
    stopped: list[float] = field(default_factory=list)
    lost: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: int = 0


class Writer:
    """Writes random keys of C{keys} at C{rate} puts/s, at most C{max_outstanding} at once (a
    tick that finds that many outstanding skips its writes and counts them), each to its head
    by the current ring; refused writes are not retried.

    C{acked} maps a key index to the highest version acknowledged (shared between writers, so
    versions only grow). On C{NotResponsible}, C{ServerStopped} or a closed connection it asks
    the servers for the ring (the one that answered first, then the others) and routes by the
    newest one from then on.
    """

    def __init__(self, reactor: Any, router: ChainRouter, keys: int, value_size: int,
                 rate: float, max_outstanding: int, acked: dict[int, int],
                 first_version: int, seed: int = 1) -> None:
        self.reactor = reactor
        self.router = router
        self.keys = keys
        self.random = random.Random(seed)
        self.value_size = value_size
        self.rate = rate
        self.max_outstanding = max_outstanding
        self.acked = acked
        self.log = WriterLog()
        self.zero = reactor.seconds()
        self.version = first_version
        self.writes = 0
        self.outstanding = 0
        self._refreshing: Deferred[None] | None = None
        self._loop = LoopingCall.withCount(self._tick)
        self._loop.clock = reactor

    def now(self) -> float:
        return self.reactor.seconds() - self.zero

    def start(self) -> None:
        # Short ticks, several writes per tick if the reactor was late: the rate holds.
        self._loop.start(max(0.002, 1.0 / self.rate), now=True)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop writing and wait (bounded) for every outstanding write's answer."""
        self._loop.stop()
        deadline = self.reactor.seconds() + timeout
        while self.outstanding and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.01)
        if self.outstanding:
            raise MeasurementFailed(f"{self.outstanding} writes unanswered after {timeout}s")
        if self._refreshing is not None:
            await self._refreshing

    def _tick(self, count: int) -> None:
        per_tick = self.rate * self._loop.interval  # type: ignore[operator]
        for _ in range(max(1, round(count * per_tick))):
            if self.outstanding >= self.max_outstanding:
                self.log.skipped += 1
                continue
            self._write()

    def _write(self) -> None:
        self.version += 1
        self.writes += 1
        version = self.version
        index = self.random.randrange(self.keys)
        key = key_of(index)
        conn = self.router.head(key)
        sent = self.reactor.seconds()
        self.outstanding += 1
        d = conn.callRemote(protocol.Put, key=key, value=value_of(key, self.value_size, version))
        d.addCallbacks(self._accepted, self._refused, callbackArgs=(index, version, sent),
                       errbackArgs=(conn,))
        d.addBoth(self._answered)

    def _answered(self, _: object) -> None:
        self.outstanding -= 1

    def _accepted(self, _: object, index: int, version: int, sent: float) -> None:
        self.log.accepted.append(self.now())
        self.log.latencies.append(self.reactor.seconds() - sent)
        if version > self.acked.get(index, -1):
            self.acked[index] = version

    def _refused(self, failure: Any, conn: Any) -> None:
        t = self.now()
        if failure.check(WriteLocked):
            self.log.refused.append(t)
            return
        if failure.check(ServerStopped):
            self.log.stopped.append(t)
        elif failure.check(NotResponsible):
            self.log.not_responsible.append(t)
        elif failure.check(ConnectionClosed):
            # A server that left closes its connections: its ranges moved elsewhere.
            self.log.lost.append(t)
        else:
            self.log.errors.append(f"+{t:.3f}s {failure.type.__name__}: {failure.value}")
            return
        if self._refreshing is None:
            self._refreshing = Deferred.fromCoroutine(self._refresh(conn))

    async def _refresh(self, first: Any) -> None:
        """Ask C{first}, then every other server, for the ring; route by the newest found."""
        try:
            newest = self.router.ring
            for conn in [first, *(c for c in self.router.conns.values() if c is not first)]:
                try:
                    ring = protocol.ring_from_wire(await conn.callRemote(protocol.GetMetadata))
                except Exception:
                    continue  # gone; another server knows the ring
                if ring.epoch > newest.epoch:
                    newest = ring
                    break
            if newest.epoch > self.router.ring.epoch:
                self.router = await router_for(self.reactor, newest, self.router.conns,
                                               self.router.credentials)
        except Exception as e:
            self.log.errors.append(f"+{self.now():.3f}s ring refresh: {e}")
        finally:
            self._refreshing = None
