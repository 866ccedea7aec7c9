"""``python -m bench.reconfig``: what a join and a leave cost, at several data sizes.

For each key count N (``--keys 100000,1000000``), on a fresh cluster (an ECS and the servers it
launches, real ``twistd`` processes on 127.0.0.1 with ephemeral ports, replication 3 or 1), this:

1. loads N keys (``--value-bytes`` values, version 0) with many puts in flight, each to its
   key's head, and says how long that took;
2. for each of ``--ops join,leave`` in turn, starts a background writer (``--rate`` puts/s to
   keys all over the ring, each to the head its ring names; refusals are counted, not retried)
   and sends C{AddNodes 1} (a fourth server joins) or C{RemoveNode} (one of the first three
   servers leaves), then reports: the time from command sent to answered, the ECS's own time
   and its keys and bytes moved (its log's summary line), MB/s over the reconfiguration and over
   its copy step, and the write-refused window as the writer saw it (first to last
   ``server_write_lock`` answer) and as the ECS measured it (lock to commit);
3. after each operation checks that every store position of the ring holds exactly N keys (the
   servers' C{Stats}), and after the last one reads back from the tails every key the writer
   got acknowledged (its value must be that version or a later one) and the loaded keys: all of
   them if N is at most ``--verify-sample``, else a seeded uniform sample of that many;
4. samples every server's memory (VmRSS and VmHWM of /proc/PID/status) every
   C{RSS_EVERY} seconds from the load to the end, and reports each server's peak per phase.

The goal is that neither the write-refused window nor the servers' memory grows with N: the
locked pass carries what was written during the previous pass (a function of the write rate),
and a server's memory should be bounded by its cache, its chain windows, SQLite's page cache and
the migration batches, not by its data. L{compare} judges both across the sizes measured.

Every process started is stopped by PID, also when the run fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import LoopingCall, deferLater
from twisted.protocols import amp

from bench.driver import INTERRUPTED, interrupt_on_sigterm, log, run_reactor
from bench.systems import ChainRouter, amp_connection
from chainstore import protocol
from chainstore.errors import KeyNotFound, NotResponsible, ServerStopped, WriteLocked
from chainstore.ring import RING_BITS, NodeInfo, Ring
from chainstore.testing.processes import ECSProcess, ProcessFailed, write_ecs_config
from ecs import protocol as admin

INITIAL_SERVERS = 3
CACHE_SIZE = 1000
STATUS_EVERY = 0.1
RSS_EVERY = 0.2
# The writer runs this long before an operation (to show writes flow) and after its answer.
WRITER_LEAD = 0.5
WRITER_TAIL = 0.5
STORES = ("coordinator", "replica1", "replica2")


class MeasurementFailed(RuntimeError):
    """The measurement could not finish; the reason is in the message and the logs."""


def key_of(i: int) -> bytes:
    return b"key%012d" % i


def value_of(key: bytes, size: int, version: int) -> bytes:
    """C{size} bytes that start with C{key/version/}, so a read tells which write it sees."""
    head = b"%s/%d/" % (key, version)
    return (head * (size // len(head) + 1))[:size]


def version_of(value: bytes) -> int:
    return int(value.split(b"/", 2)[1])


# -- memory ---------------------------------------------------------------------------------------


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


# -- the cluster ----------------------------------------------------------------------------------


def share(nodes: Iterable[NodeInfo], node: NodeInfo) -> float:
    """The fraction of the ring C{node} heads among C{nodes}."""
    ring = Ring(tuple(nodes), replication=1)
    rng = ring.range_of(ring.index_of(node.name))
    return ((rng.end - rng.start) % (1 << RING_BITS) or 1 << RING_BITS) / (1 << RING_BITS)


def slot_node(slot: dict[str, Any]) -> NodeInfo:
    return NodeInfo(str(slot["name"]), str(slot["host"]), int(slot["console-port"]),
                    int(slot["amp-port"]))


def pick_leaving(pool: list[NodeInfo], target_share: tuple[float, float]) -> NodeInfo | None:
    """The server of the first three to remove once the fourth has joined: one whose share of
    the four-server ring is within C{target_share} (the one nearest its middle), or None."""
    low, high = target_share
    ring = pool[:INITIAL_SERVERS + 1]
    fits = [n for n in pool[:INITIAL_SERVERS] if low <= share(ring, n) <= high]
    middle = (low + high) / 2
    return min(fits, key=lambda n: abs(share(ring, n) - middle), default=None)


def pool_config(workdir: Path, replication: int, target_share: tuple[float, float],
                failure_timeout: float, attempts: int = 2000) -> tuple[Path, str]:
    """An ECS config (three initial servers, four slots) whose fourth slot heads a share of
    the ring within C{target_share} once it joins, and the name of one of the first three with
    such a share then (the one to remove), so that runs at different sizes move comparable
    fractions of the data (ring positions hash the ports, drawn afresh for each attempt)."""
    low, high = target_share
    for _ in range(attempts):
        path = write_ecs_config(workdir, slots=INITIAL_SERVERS + 1, initial_nodes=INITIAL_SERVERS,
                                replication=replication, heartbeat_interval=1.0,
                                failure_timeout=failure_timeout, cache_size=CACHE_SIZE)
        pool = [slot_node(s) for s in yaml.safe_load(path.read_text())["nodes"]]
        leaving = pick_leaving(pool, target_share)
        if leaving is not None and low <= share(pool, pool[INITIAL_SERVERS]) <= high and \
                min(share(pool[:INITIAL_SERVERS], n) for n in pool[:INITIAL_SERVERS]) >= 0.2:
            return path, leaving.name
    raise MeasurementFailed(f"no pool of free ports gave a joining and a leaving server a share "
                            f"in {target_share}")


async def ask_ecs(reactor: Any, ecs: ECSProcess, command: type[amp.Command],
                  **arguments: Any) -> dict[str, Any]:
    """One admin command over a fresh AMP connection (not the blocking L{ECSProcess.call}: a
    thread blocked in a long C{AddNodes} would hold up the reactor's shutdown on Ctrl-C)."""
    proto = await amp_connection(reactor, (ecs.host, ecs.port))
    try:
        return await proto.callRemote(command, **arguments)
    finally:
        proto.transport.loseConnection()


async def status_of(reactor: Any, ecs: ECSProcess) -> dict[str, Any]:
    return json.loads((await ask_ecs(reactor, ecs, admin.Status))["status"])


async def wait_serving(reactor: Any, ecs: ECSProcess, servers: int,
                       timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the ECS serves a ring of C{servers}, every one connected; its Status."""
    deadline = reactor.seconds() + timeout
    last: object = "no answer"
    while reactor.seconds() < deadline:
        if not ecs.running:
            raise ProcessFailed(f"the ECS exited:\n{ecs.diagnostics()}")
        try:
            status = await status_of(reactor, ecs)
        except Exception as e:  # not listening yet
            last = e
        else:
            last = status
            connected = {m["name"] for m in status["members"] if m["connected"]}
            if status["serving"] and len(status["ring"]) == servers \
                    and set(status["ring"]) <= connected:
                return status
        await deferLater(reactor, 0.1)
    raise MeasurementFailed(f"the ring did not start serving in {timeout}s (last: {last})")


async def fetch_ring(reactor: Any, node: NodeInfo) -> Ring:
    conn = await amp_connection(reactor, (node.host, node.amp_port))
    try:
        return protocol.ring_from_wire(await conn.callRemote(protocol.GetMetadata))
    finally:
        conn.transport.loseConnection()


async def router_for(reactor: Any, ring: Ring, conns: dict[str, Any]) -> ChainRouter:
    """A router for C{ring}, reusing C{conns} and dialing the servers it lacks (into C{conns})."""
    for node in ring.live_nodes:
        if node.name not in conns:
            conns[node.name] = await amp_connection(reactor, (node.host, node.amp_port))
    return ChainRouter(ring, conns)


# -- loading --------------------------------------------------------------------------------------


async def load(reactor: Any, router: ChainRouter, count: int, value_size: int, inflight: int,
               limit: float) -> float:
    """Put C{count} keys (version 0), C{inflight} at a time, each to its head; the seconds.

    Fails once loading has taken more than C{limit} seconds."""
    next_key = iter(range(count))
    started = reactor.seconds()
    done = 0
    step = max(10_000, count // 10)

    async def worker() -> None:
        nonlocal done
        for i in next_key:
            if reactor.seconds() - started > limit:
                raise MeasurementFailed(f"loading took more than {limit}s ({done:,} keys so far)")
            key = key_of(i)
            await router.head(key).callRemote(protocol.Put, key=key,
                                              value=value_of(key, value_size, 0))
            done += 1
            if done % step == 0:
                elapsed = reactor.seconds() - started
                log(f"  loaded {done:,} keys in {elapsed:.1f} s ({done / elapsed:,.0f} puts/s)")

    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(inflight)],
                        consumeErrors=True)
    return reactor.seconds() - started


# -- the writer -----------------------------------------------------------------------------------


@dataclass
class WriterLog:
    """What the writer saw; times in seconds since its zero (the operation's command sent)."""

    accepted: list[float] = field(default_factory=list)
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
                self.router = await router_for(self.reactor, newest, self.router.conns)
        except Exception as e:
            self.log.errors.append(f"+{self.now():.3f}s ring refresh: {e}")
        finally:
            self._refreshing = None


# -- one operation --------------------------------------------------------------------------------


# The coordinator's summary line (ecs/coordinator.py, _reconfigure).
_DONE = re.compile(r"epoch (?P<epoch>\d+): (?P<what>(?:adding|removing) [^\n]*?) done in "
                   r"(?P<seconds>[\d.]+)s, moved (?P<keys>\d+) keys \((?P<bytes>\d+) bytes\)"
                   r"; writes to the moved ranges were refused for (?P<locked>[\d.]+)s")


def ecs_summary(log_text: str, what: str) -> dict[str, Any] | None:
    """The last summary line of the ECS log for the operation C{what} ("adding server4",
    "removing server1"): epoch, seconds, keys, bytes, locked seconds; None if there is none."""
    found = None
    for match in _DONE.finditer(log_text):
        if match["what"] == what:
            found = match
    if found is None:
        return None
    return {"epoch": int(found["epoch"]), "seconds": float(found["seconds"]),
            "keys": int(found["keys"]), "bytes": int(found["bytes"]),
            "locked": float(found["locked"])}


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


def copy_step(progress: list[tuple[float, str, int]]) -> tuple[float | None, int]:
    """(seconds, bytes) of the copy step from C{Status} polls (time, step, bytes moved): from
    the first poll that showed "copying" to the first that showed a later step, and the bytes
    that one showed. (None, 0) if the copy step was not seen to begin and end."""
    start = end = None
    moved = 0
    for t, step, nbytes in progress:
        if step == "copying" and start is None:
            start = t
        elif start is not None and step != "copying":
            end, moved = t, nbytes
            break
    if start is None or end is None:
        return None, 0
    return end - start, moved


async def watch(reactor: Any, ecs: ECSProcess, zero: float, done: list[bool],
                steps: list[tuple[float, str]],
                progress: list[tuple[float, str, int]]) -> None:
    """Poll C{Status} until the operation is answered; note each step when it first shows and
    every poll's (time, step, bytes moved)."""
    shown = None
    while not done[0]:
        status = await status_of(reactor, ecs)
        op = status["operation"]
        t = reactor.seconds() - zero
        if op is not None:
            progress.append((t, op["step"], op["bytes_moved"]))
            if op["step"] != shown:
                shown = op["step"]
                steps.append((t, shown))
                log(f"  +{t:7.3f}s  {shown}: {op['keys_moved']:,} keys, "
                    f"{op['bytes_moved']:,} bytes moved so far")
        await deferLater(reactor, STATUS_EVERY)


async def count_keys(router: ChainRouter, replication: int, keys: int,
                     problems: list[str]) -> dict[str, dict[str, int]]:
    """Every live server's store sizes; each store position (one with replication 1) must hold
    every key exactly once over all servers, the others none."""
    counts: dict[str, dict[str, int]] = {}
    for node in router.ring.live_nodes:
        stats = json.loads((await router.conns[node.name].callRemote(protocol.Stats))["stats"])
        counts[node.name] = {store: stats.get(f"{store}_keys", 0) for store in STORES}
    for position, store in enumerate(STORES):
        total = sum(c[store] for c in counts.values())
        expected = keys if position < replication else 0
        if total != expected:
            problems.append(f"after epoch {router.ring.epoch} the servers' {store} stores hold "
                            f"{total:,} keys, not {expected:,}")
    return counts


async def run_op(reactor: Any, ecs: ECSProcess, settings: argparse.Namespace, op: str,
                 server: str, router: ChainRouter, keys: int, acked: dict[int, int],
                 first_version: int, problems: list[str]) -> tuple[OpResult, ChainRouter, int]:
    """Run one join (C{server} is the slot expected to join) or leave (C{server} leaves) under
    the writer; (its result, a router for the new ring, the writer's last version)."""
    ring = router.ring
    writer = Writer(reactor, router, keys, settings.value_bytes, settings.rate,
                    settings.writer_inflight, acked, first_version, seed=first_version)
    writer.start()
    try:
        await deferLater(reactor, WRITER_LEAD)
        log(f"{op}: {server}; the writer puts {settings.rate:g} keys/s all over the ring")
        steps: list[tuple[float, str]] = []
        progress: list[tuple[float, str, int]] = []
        answered = [False]
        writer.zero = zero = reactor.seconds()
        watching = Deferred.fromCoroutine(watch(reactor, ecs, zero, answered, steps, progress))
        if op == "join":
            command: Deferred[dict[str, Any]] = Deferred.fromCoroutine(ask_ecs(
                reactor, ecs, admin.AddNodes, count=1, cache_strategy="LRU",
                cache_size=CACHE_SIZE))
        else:
            command = Deferred.fromCoroutine(ask_ecs(reactor, ecs, admin.RemoveNode,
                                                     name=server, force=False))
        try:
            answer = await command.addTimeout(settings.op_seconds, reactor)
        except admin.AdminError as e:
            raise MeasurementFailed(f"{op} of {server} failed: {e}") from None
        finally:
            answered[0] = True
        seconds = reactor.seconds() - zero
        log(f"  +{seconds:7.3f}s  {answer['message']}")
        if op == "join" and answer["names"] != [server]:
            raise MeasurementFailed(f"AddNodes added {answer['names']}, not {server}")
        await watching
        await deferLater(reactor, WRITER_TAIL)
    finally:
        await writer.stop()
    # The writer learns the ring only from refusals; it may have seen none.
    conns = writer.router.conns
    survivor = next(n for n in ring.live_nodes if n.name != server) if op == "leave" else \
        NodeInfo(server, *_address(ecs, server))
    new_ring = await fetch_ring(reactor, survivor)
    if new_ring.epoch <= ring.epoch:
        raise MeasurementFailed(f"the ring is still at epoch {new_ring.epoch} after the {op}")
    gone = conns.pop(server, None) if op == "leave" else None
    if gone is not None and gone.transport is not None:
        gone.transport.loseConnection()
    router = await router_for(reactor, new_ring, conns)

    what = f"{'adding' if op == 'join' else 'removing'} {server}"
    summary = ecs_summary(ecs.log_path.read_text(errors="replace"), what)
    if summary is None or summary["epoch"] != new_ring.epoch:
        raise MeasurementFailed(f"the ECS log has no summary of {what} at epoch {new_ring.epoch}")
    store_keys = await count_keys(router, new_ring.replication, keys, problems)
    expected = len(ring.live_nodes) + (1 if op == "join" else -1)
    if len(new_ring.live_nodes) != expected:
        problems.append(f"the ring after the {op} has {len(new_ring.live_nodes)} live servers, "
                        f"not {expected}")
    seen = writer.log
    latencies = sorted(seen.latencies) or [0.0]
    copy_seconds, copy_bytes = copy_step(progress)
    result = OpResult(
        op=op, server=server, seconds=seconds, ecs_seconds=summary["seconds"],
        ecs_locked_seconds=summary["locked"], moved_keys=summary["keys"],
        moved_bytes=summary["bytes"], copy_seconds=copy_seconds, copy_bytes=copy_bytes,
        refused_first=min(seen.refused, default=None), refused_last=max(seen.refused, default=None),
        refused_answers=len(seen.refused), writes=writer.writes,
        accepted_during=sum(1 for t in seen.accepted if 0 <= t <= seconds),
        write_p50_ms=statistics.median(latencies) * 1e3,
        write_p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
        write_max_ms=latencies[-1] * 1e3,
        not_responsible_answers=len(seen.not_responsible), stopped_answers=len(seen.stopped),
        lost_answers=len(seen.lost), skipped_writes=seen.skipped, errors=seen.errors[:20],
        steps=steps, store_keys=store_keys, epoch_before=ring.epoch, epoch_after=new_ring.epoch,
        ring_after=[n.name for n in new_ring.nodes])
    return result, router, writer.version


def _address(ecs: ECSProcess, name: str) -> tuple[str, int, int]:
    slot = slot_node(next(s for s in ecs.slots if s["name"] == name))
    return slot.host, slot.console_port, slot.amp_port


# -- verification ---------------------------------------------------------------------------------


def keys_to_verify(keys: int, acked: dict[int, int], sample: int,
                   seed: int = 7) -> tuple[list[int], str]:
    """The key indexes to read back and a sentence saying which: every key the writer got
    acknowledged, and every loaded key if there are at most C{sample}, else a seeded uniform
    sample of C{sample} of them."""
    if keys <= sample:
        return list(range(keys)), f"all {keys:,} keys (the {len(acked):,} the writer overwrote " \
                                  "at their last acknowledged version)"
    chosen = set(random.Random(seed).sample(range(keys), sample)) | set(acked)
    return sorted(chosen), (f"{len(chosen):,} keys: the {len(acked):,} the writer overwrote "
                            f"(their last acknowledged version) and a uniform sample of "
                            f"{sample:,} of the {keys:,} loaded (seed {seed})")


async def verify(router: ChainRouter, indexes: list[int], acked: dict[int, int], value_size: int,
                 problems: list[str], inflight: int = 64) -> int:
    """Read each key from its tail: its value must be whole and of the acknowledged version or
    a later one (version 0, the load, for keys the writer never got acknowledged)."""
    todo = iter(indexes)
    lost: list[str] = []

    async def reader() -> None:
        for index in todo:
            key = key_of(index)
            version = acked.get(index, 0)
            try:
                answer = await router.tail(key).callRemote(protocol.Get, key=key)
            except KeyNotFound:
                lost.append(f"{key.decode()} is missing")
                continue
            value = answer["value"]
            seen = version_of(value)
            if value != value_of(key, value_size, seen):
                lost.append(f"{key.decode()} holds a garbled value {value[:40]!r}")
            elif seen < version:
                lost.append(f"{key.decode()} holds version {seen}, {version} was acknowledged")

    results = await DeferredList([Deferred.fromCoroutine(reader()) for _ in range(inflight)],
                                 consumeErrors=True)
    for ok, failure in results:
        if not ok:
            problems.append(f"reading back failed: {failure.value!r}")
    if lost:
        problems.append(f"{len(lost):,} acknowledged writes lost: " + "; ".join(lost[:5]))
    return len(indexes)


# -- one size -------------------------------------------------------------------------------------


@dataclass
class SizeResult:
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


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


async def measure(reactor: Any, ecs: ECSProcess, settings: argparse.Namespace, keys: int,
                  leaving: str) -> SizeResult:
    status = await wait_serving(reactor, ecs, INITIAL_SERVERS)
    slots = {str(s["name"]): slot_node(s) for s in ecs.slots}
    joining = next(name for name in slots if name not in status["ring"])
    ring = await fetch_ring(reactor, slots[status["ring"][0]])
    conns: dict[str, Any] = {}
    router = await router_for(reactor, ring, conns)

    def pids() -> dict[str, int]:
        return {name: found[-1] for name, found in ecs.server_pids().items() if found}

    sampler = MemorySampler(reactor, pids)
    problems: list[str] = []
    acked: dict[int, int] = {}
    ops: list[OpResult] = []
    try:
        sampler.start("load")
        log(f"loading {keys:,} keys of {settings.value_bytes} bytes, {settings.inflight} in "
            f"flight (replication {ring.replication})")
        load_seconds = await load(reactor, router, keys, settings.value_bytes,
                                  settings.inflight, settings.load_seconds)
        log(f"  loaded in {load_seconds:.1f} s ({keys / load_seconds:,.0f} puts/s)")
        sampler.set_phase("loaded")
        count_keys_problems: list[str] = []
        await count_keys(router, ring.replication, keys, count_keys_problems)
        problems.extend(f"after loading: {p}" for p in count_keys_problems)
        version = 0
        for op in settings.ops:
            server = joining if op == "join" else leaving
            sampler.set_phase(op)
            result, router, version = await run_op(reactor, ecs, settings, op, server, router,
                                                   keys, acked, version, problems)
            ops.append(result)
            sampler.set_phase(f"after {op}")
        indexes, which = keys_to_verify(keys, acked, settings.verify_sample)
        log(f"reading back {which}")
        verified = await verify(router, indexes, acked, settings.value_bytes, problems)
    finally:
        sampler.stop()
        for conn in conns.values():
            if conn.transport is not None:
                conn.transport.loseConnection()
    return SizeResult(
        keys=keys, replication=ring.replication, value_bytes=settings.value_bytes,
        load_seconds=load_seconds, ops=ops, verified_keys=verified, verified=which,
        problems=problems, rss_kib=sampler.rss, peak_kib=sampler.peaks(),
        rss_samples=sampler.samples,
        data_bytes={name: dir_bytes(ecs.workdir / name) for name in slots},
        pids={"ecs": ecs.pid, "servers": {n: list(p) for n, p in ecs.server_pids().items()}})


# -- the report -----------------------------------------------------------------------------------


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
        ("  stores after", ", ".join(
            f"{name} {'/'.join(f'{c[s]:,}' for s in STORES)}"
            for name, c in sorted(o.store_keys.items())) + " (coordinator/replica1/replica2)"),
        ("  steps (Status)", ", ".join(f"+{t:.2f} s {step}" for t, step in o.steps)),
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
              "refused client s", "refused ECS s", "peak RSS MiB")
    rows = [header]
    for r in results:
        for o in r.ops:
            window = o.refused_window
            copy = o.copy_mb_per_s
            rows.append((f"{r.keys:,}", o.op, f"{o.seconds:.2f}", f"{o.ecs_seconds:.2f}",
                         f"{o.moved_keys:,}", f"{o.moved_bytes / 1e6:.1f}", f"{o.mb_per_s:.2f}",
                         "-" if copy is None else f"{copy:.2f}",
                         "-" if window is None else f"{window:.3f}",
                         f"{o.ecs_locked_seconds:.3f}", _mib(r.max_peak_kib)))
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


# -- main -----------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give key counts separated by commas") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more counts >= 1")
    return sizes


def parse_ops(text: str) -> list[str]:
    ops = [part.strip() for part in text.split(",") if part.strip()]
    if not ops or any(op not in ("join", "leave") for op in ops) or len(set(ops)) != len(ops):
        raise argparse.ArgumentTypeError(f"{text!r}: give join, leave or join,leave")
    if ops[0] != "join":
        raise argparse.ArgumentTypeError(f"{text!r}: the leave takes out one of the first three "
                                         "servers after the fourth joined; use join,leave")
    return ops


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reconfig",
        description=(
            "Measure a join and a leave at several data sizes: an ECS with three servers holding "
            "--keys keys; a writer keeps putting keys all over the ring while a fourth server "
            "joins, then while one of the first three leaves. Prints each operation's time, "
            "keys and bytes moved, MB/s, how long writes were refused (server_write_lock) as "
            "the client and as the ECS measured it, and every server's memory (RSS)."))
    parser.add_argument("--keys", type=parse_sizes, default=[100_000, 1_000_000],
                        help="keys loaded first; several sizes, comma-separated, run one after "
                             "the other on fresh clusters [default: 100000,1000000]")
    parser.add_argument("--replication", type=int, choices=(1, 3), default=3,
                        help="chain length [default: 3]")
    parser.add_argument("--ops", type=parse_ops, default=["join", "leave"],
                        help="operations, in order: join or join,leave [default: join,leave]")
    parser.add_argument("--value-bytes", type=int, default=100, help="bytes per value [100]")
    parser.add_argument("--rate", type=float, default=500.0,
                        help="the background writer's puts per second [default: 500]")
    parser.add_argument("--writer-inflight", type=int, default=32,
                        help="at most this many of the writer's puts outstanding [default: 32]")
    parser.add_argument("--inflight", type=int, default=256,
                        help="puts in flight while loading [default: 256]")
    parser.add_argument("--load-seconds", type=float, default=1200.0,
                        help="give up if loading one size takes longer [default: 1200]")
    parser.add_argument("--op-seconds", type=float, default=600.0,
                        help="give up if a join or leave takes longer [default: 600]")
    parser.add_argument("--verify-sample", type=int, default=100_000,
                        help="read back every loaded key if there are at most this many, else a "
                             "uniform sample of this many (and always every key the writer "
                             "overwrote) [default: 100000]")
    parser.add_argument("--share", type=float, nargs=2, default=(0.2, 0.3), metavar=("LOW", "HIGH"),
                        help="the joining and the leaving server each head this share of the "
                             "four-server ring [default: 0.2 0.3]")
    parser.add_argument("--failure-timeout", type=float, default=10.0,
                        help="the ECS's failure timeout: long, so that a server busy loading "
                             "is not declared dead [default: 10]")
    parser.add_argument("--workdir", type=Path,
                        help="keep the ECS's and servers' files and logs here "
                             "[default: a temporary directory, removed afterwards]")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.value_bytes < 32 or args.inflight < 1 or args.writer_inflight < 1 or args.rate <= 0:
        parser.error("--value-bytes must be >= 32 (it holds the key and version), --inflight, "
                     "--writer-inflight and --rate > 0")
    if args.verify_sample < 1:
        parser.error("--verify-sample must be at least 1")
    if not 0 < args.share[0] <= args.share[1] < 1:
        parser.error("--share takes LOW HIGH with 0 < LOW <= HIGH < 1")
    if args.failure_timeout <= 1.0:
        parser.error("--failure-timeout must be more than the heartbeat interval (1 s)")
    return args


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def run(args: argparse.Namespace, workdir: Path) -> tuple[bool, list[SizeResult]]:
    """Measure each size on a fresh cluster; (finished, results). Every ECS (and its servers)
    is stopped by PID before this returns, whatever happened."""
    clusters: list[ECSProcess] = []
    results: list[SizeResult] = []

    async def main(reactor: Any) -> None:
        for keys in args.keys:
            where = workdir / f"keys-{keys}"
            config, leaving = pool_config(where, args.replication, tuple(args.share),
                                          args.failure_timeout)
            ecs = ECSProcess(where, config_path=config)
            clusters.append(ecs)
            ecs.start()
            log(f"ECS pid {ecs.pid} on {ecs.address}; waiting for its three servers")
            try:
                results.append(await measure(reactor, ecs, args, keys, leaving))
            finally:
                # Blocking (bounded): nothing else runs on the reactor now.
                ecs.stop()
                log(f"stopped the ECS (pid {ecs.pid}) and its servers "
                    f"{sorted(p for ps in ecs.server_pids().values() for p in ps)}")
            print(f"reconfiguration: {keys:,} keys of {args.value_bytes} bytes on three "
                  f"servers, replication {args.replication}; {' then '.join(args.ops)}",
                  flush=True)
            print(format_report(results[-1]), flush=True)

    try:
        done, _ = run_reactor(main)
    finally:
        for ecs in clusters:
            ecs.stop()
    return done, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()
    load_before = _load_average()
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            done, results = run(args, args.workdir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="chainstore-reconfig-") as workdir:
                done, results = run(args, Path(workdir))
    except KeyboardInterrupt:
        log("interrupted: every process was stopped")
        return INTERRUPTED
    except (MeasurementFailed, ProcessFailed) as e:
        log(f"failed: {e}")
        return 1
    if not done:
        log("interrupted: every process was stopped")
        return INTERRUPTED
    load_after = _load_average()
    print(f"summary ({os.cpu_count()} CPUs shared by the driver and every server; load average "
          f"{load_before} before, {load_after} after; server cache {CACHE_SIZE} entries):")
    print(format_table(results))
    verdict = compare(results)
    if verdict:
        print(verdict)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"argv": sys.argv[1:] if argv is None else argv, "cpus": os.cpu_count(),
             "load_average": [load_before, load_after],
             "results": [{**asdict(r), "max_peak_kib": r.max_peak_kib,
                          "ops": [{**asdict(o), "refused_window": o.refused_window,
                                   "mb_per_s": o.mb_per_s, "copy_mb_per_s": o.copy_mb_per_s}
                                  for o in r.ops]} for r in results],
             "verdict": verdict}, indent=2) + "\n")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
