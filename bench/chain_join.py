"""``python -m bench.chain_join``: how long writes are refused while a server joins a chain.

An ECS (replication 3) runs three servers, so every server holds every key; this process loads
N keys (100-byte values, pipelined puts to each key's head), then starts a writer that keeps
writing keys all over the ring at a bounded rate (500 puts/s by default, at most 32
outstanding), each to the head its ring names, and sends C{AddNodes 1}: a fourth server joins
and the chains of the ranges it enters are rebuilt. It reports, per N:

- the join: C{AddNodes} sent to answered (which includes launching the server), and the ECS's
  own time for the reconfiguration (its log line "... done in X s, moved K keys (B bytes);
  writes to the moved ranges were refused for L s"), with the keys and bytes moved (that line,
  and the highest figures C{Status} showed while the join ran);
- the write-refused window as the client saw it: the first and last ``server_write_lock``
  answer (answer times), how many there were, and the ECS's measured lock time;
- what else the writer saw: writes accepted during the join and their latency,
  ``server_not_responsible`` answers (the writer then asks that server for the new ring),
  ``server_stopped`` answers, and other failures;
- a check that the figures' basis is sound: after the join every acknowledged write is read
  back from its key's tail (the value's version is at least the last one acknowledged), and
  the servers' stores hold every key three times.

``--keys 20000,100000`` (the default) measures both sizes one after the other, each on a fresh
cluster, and prints whether the refused window grew with the data. Every process started is
stopped by PID, also when the run fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import LoopingCall, deferLater
from twisted.protocols import amp

from bench.__main__ import run_reactor
from bench.systems import ChainRouter, amp_connection
from chainstore import protocol
from chainstore.errors import KeyNotFound, NotResponsible, ServerStopped, WriteLocked
from chainstore.ring import RING_BITS, NodeInfo, Ring
from chainstore.testing.processes import ECSProcess, ProcessFailed, write_ecs_config
from ecs import protocol as admin

INTERRUPTED = 130
REPLICATION = 3
STATUS_EVERY = 0.1
# The writer runs this long before the join (to show writes flow) and after it.
WRITER_LEAD = 0.5
WRITER_TAIL = 0.5


class MeasurementFailed(RuntimeError):
    """The measurement could not finish; the reason is in the message and the logs."""


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def key_of(i: int) -> bytes:
    return b"key%012d" % i


def value_of(key: bytes, size: int, version: int) -> bytes:
    """C{size} bytes that start with C{key/version/}, so a read tells which write it sees."""
    head = b"%s/%d/" % (key, version)
    return (head * (size // len(head) + 1))[:size]


def version_of(value: bytes) -> int:
    return int(value.split(b"/", 2)[1])


# -- the cluster ----------------------------------------------------------------------------------


def share(nodes: list[NodeInfo], node: NodeInfo) -> float:
    """The fraction of the ring C{node} heads among C{nodes}."""
    ring = Ring(tuple(nodes), replication=1)
    rng = ring.range_of(ring.index_of(node.name))
    return ((rng.end - rng.start) % (1 << RING_BITS) or 1 << RING_BITS) / (1 << RING_BITS)


def pool_config(workdir: Path, target_share: tuple[float, float], attempts: int = 2000) -> Path:
    """An ECS config (replication 3, three initial servers, four slots) whose fourth slot heads
    a share of the ring within C{target_share} once it joins, so that runs at different sizes
    move comparable fractions of the data (ring positions hash the ports, drawn afresh)."""
    low, high = target_share
    for _ in range(attempts):
        path = write_ecs_config(workdir, slots=4, initial_nodes=3, replication=REPLICATION,
                                heartbeat_interval=1.0, failure_timeout=3.0, cache_size=1000)
        pool = [NodeInfo(str(s["name"]), str(s["host"]), int(s["console-port"]),
                         int(s["amp-port"])) for s in yaml.safe_load(path.read_text())["nodes"]]
        if low <= share(pool, pool[3]) <= high and min(share(pool[:3], n) for n in pool[:3]) >= 0.2:
            return path
    raise MeasurementFailed(f"no pool of free ports gave the fourth slot a share in {target_share}")


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


async def wait_serving(reactor: Any, ecs: ECSProcess, servers: int = 3,
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


def slot_node(slot: dict[str, Any]) -> NodeInfo:
    return NodeInfo(str(slot["name"]), str(slot["host"]), int(slot["console-port"]),
                    int(slot["amp-port"]))


# -- loading --------------------------------------------------------------------------------------


async def load(reactor: Any, router: ChainRouter, count: int, value_size: int, inflight: int,
               limit: float) -> float:
    """Put C{count} keys (version 0), C{inflight} at a time, each to its head; the seconds."""
    next_key = iter(range(count))
    started = reactor.seconds()
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in next_key:
            if reactor.seconds() - started > limit:
                raise MeasurementFailed(f"loading took more than {limit}s ({done} keys so far)")
            key = key_of(i)
            await router.head(key).callRemote(protocol.Put, key=key,
                                              value=value_of(key, value_size, 0))
            done += 1
            if done % 20_000 == 0:
                _log(f"  loaded {done:,} keys")

    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(inflight)],
                        consumeErrors=True)
    return reactor.seconds() - started


# -- the writer -----------------------------------------------------------------------------------


@dataclass
class WriterLog:
    """What the writer saw; times in seconds since C{AddNodes} was sent (answer times)."""

    accepted: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    not_responsible: list[float] = field(default_factory=list)
    stopped: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: int = 0


class Writer:
    """Writes keys of the whole ring in a shuffled order at C{rate} puts/s, at most
    C{max_outstanding} at once (a tick that finds that many outstanding skips its writes and
    counts them), each to its head by the current ring; refused writes are not retried.

    On C{NotResponsible} it fetches the ring from the server that answered and routes by it
    from then on (connecting to servers it did not know).
    """

    def __init__(self, reactor: Any, router: ChainRouter, keys: int, value_size: int,
                 rate: float, max_outstanding: int, seed: int = 1) -> None:
        self.reactor = reactor
        self.router = router
        self.order = list(range(keys))
        random.Random(seed).shuffle(self.order)
        self.value_size = value_size
        self.rate = rate
        self.max_outstanding = max_outstanding
        self.log = WriterLog()
        self.zero = reactor.seconds()
        self.version = 0
        self.outstanding = 0
        #: key index -> (highest version acknowledged, the server that took it, answer time)
        self.acked: dict[int, tuple[int, str, float]] = {}
        self._refreshing: Deferred[None] | None = None
        self._loop = LoopingCall.withCount(self._tick)
        self._loop.clock = reactor
        self._done: Deferred[None] | None = None

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
        version = self.version
        index = self.order[version % len(self.order)]
        key = key_of(index)
        conn = self.router.head(key)
        head = self.router.ring.chain(key)[0].name
        sent = self.reactor.seconds()
        self.outstanding += 1
        d = conn.callRemote(protocol.Put, key=key, value=value_of(key, self.value_size, version))
        d.addCallbacks(self._accepted, self._refused, callbackArgs=(index, version, sent, head),
                       errbackArgs=(conn,))
        d.addBoth(self._answered)

    def _answered(self, _: object) -> None:
        self.outstanding -= 1

    def _accepted(self, _: object, index: int, version: int, sent: float, head: str) -> None:
        self.log.accepted.append(self.now())
        self.log.latencies.append(self.reactor.seconds() - sent)
        if version > self.acked.get(index, (-1, "", 0.0))[0]:
            self.acked[index] = (version, head, self.now())

    def _refused(self, failure: Any, conn: Any) -> None:
        t = self.now()
        if failure.check(WriteLocked):
            self.log.refused.append(t)
        elif failure.check(ServerStopped):
            self.log.stopped.append(t)
        elif failure.check(NotResponsible):
            self.log.not_responsible.append(t)
            if self._refreshing is None:
                self._refreshing = Deferred.fromCoroutine(self._refresh(conn))
        else:
            self.log.errors.append(f"+{t:.3f}s {failure.type.__name__}: {failure.value}")

    async def _refresh(self, conn: Any) -> None:
        try:
            ring = protocol.ring_from_wire(await conn.callRemote(protocol.GetMetadata))
            if ring.epoch > self.router.ring.epoch:
                conns = dict(self.router.conns)
                for node in ring.nodes:
                    if node.name not in conns:
                        conns[node.name] = await amp_connection(self.reactor,
                                                                (node.host, node.amp_port))
                self.router = ChainRouter(ring, conns)
        except Exception as e:
            self.log.errors.append(f"+{self.now():.3f}s ring refresh: {e}")
        finally:
            self._refreshing = None


# -- the join -------------------------------------------------------------------------------------


# The coordinator's summary line (ecs/coordinator.py).
_DONE = re.compile(r"epoch (?P<epoch>\d+): (?P<what>adding [^\n]*?) done in (?P<seconds>[\d.]+)s,"
                   r" moved (?P<keys>\d+) keys \((?P<bytes>\d+) bytes\)"
                   r"; writes to the moved ranges were refused for (?P<locked>[\d.]+)s")


@dataclass
class Result:
    keys: int
    value_size: int
    joined: str
    load_seconds: float
    join_seconds: float
    ecs_seconds: float
    ecs_locked_seconds: float
    moved_keys: int
    moved_bytes: int
    status_keys_moved: int
    status_bytes_moved: int
    refused_first: float | None
    refused_last: float | None
    refused_answers: int
    accepted_during_join: int
    writes: int
    write_p50_ms: float
    write_p99_ms: float
    write_max_ms: float
    not_responsible_answers: int
    stopped_answers: int
    skipped_writes: int
    errors: list[str]
    steps: list[tuple[float, str]]
    store_keys: dict[str, dict[str, int]]
    verified_keys: int
    problems: list[str]
    epoch_before: int
    epoch_after: int

    @property
    def refused_window(self) -> float | None:
        if self.refused_first is None or self.refused_last is None:
            return None
        return self.refused_last - self.refused_first


async def measure(reactor: Any, ecs: ECSProcess, args: argparse.Namespace, keys: int) -> Result:
    status = await status_of(reactor, ecs)
    slots = {str(s["name"]): slot_node(s) for s in ecs.slots}
    ring = await fetch_ring(reactor, slots[status["ring"][0]])
    conns = {n.name: await amp_connection(reactor, (n.host, n.amp_port)) for n in ring.nodes}
    router = ChainRouter(ring, conns)
    writer: Writer | None = None
    try:
        _log(f"loading {keys:,} keys of {args.value_size} bytes, {args.inflight} in flight")
        load_seconds = await load(reactor, router, keys, args.value_size, args.inflight,
                                  args.load_seconds)
        _log(f"  loaded in {load_seconds:.2f}s ({keys / load_seconds:,.0f} puts/s)")

        joining = next(slots[s] for s in slots if s not in status["ring"])
        writer = Writer(reactor, router, keys, args.value_size, args.rate, args.writer_inflight)
        writer.start()
        await deferLater(reactor, WRITER_LEAD)
        _log(f"{joining.name} joins; the writer puts {args.rate:g} keys/s all over the ring")
        steps: list[tuple[float, str]] = []
        moved = {"keys": 0, "bytes": 0}
        joined = [False]
        writer.zero = zero = reactor.seconds()
        watching = Deferred.fromCoroutine(watch(reactor, ecs, zero, joined, steps, moved))
        try:
            answer = await Deferred.fromCoroutine(ask_ecs(
                reactor, ecs, admin.AddNodes, count=1, cache_strategy="LRU",
                cache_size=1000)).addTimeout(args.join_seconds, reactor)
        except admin.AdminError as e:
            raise MeasurementFailed(f"AddNodes failed: {e}") from None
        finally:
            joined[0] = True
        join_seconds = reactor.seconds() - zero
        _log(f"  +{join_seconds:6.3f}s  {answer['message']}")
        await watching
        await deferLater(reactor, WRITER_TAIL)
        await writer.stop()
        log = writer.log
        new_ring = writer.router.ring
        if new_ring.epoch == ring.epoch:
            # The writer learns the ring only from refusals; it may have seen none.
            new_ring = await fetch_ring(reactor, joining)
            for node in new_ring.nodes:
                if node.name not in writer.router.conns:
                    writer.router.conns[node.name] = await amp_connection(
                        reactor, (node.host, node.amp_port))
            writer.router = ChainRouter(new_ring, writer.router.conns)

        match = None
        for match in _DONE.finditer(ecs.log_path.read_text(errors="replace")):
            pass
        if match is None or joining.name not in match["what"]:
            raise MeasurementFailed("the ECS log has no summary of the join")

        problems: list[str] = []
        verified = await verify(writer, problems)
        store_keys = await count_keys(reactor, writer.router, problems, keys)
        if len(new_ring.live_nodes) != 4:
            problems.append(f"the ring after the join has {len(new_ring.live_nodes)} live servers")
        latencies = sorted(log.latencies) or [0.0]
        return Result(
            keys=keys, value_size=args.value_size, joined=joining.name,
            load_seconds=load_seconds, join_seconds=join_seconds,
            ecs_seconds=float(match["seconds"]), ecs_locked_seconds=float(match["locked"]),
            moved_keys=int(match["keys"]), moved_bytes=int(match["bytes"]),
            status_keys_moved=moved["keys"], status_bytes_moved=moved["bytes"],
            refused_first=min(log.refused, default=None),
            refused_last=max(log.refused, default=None), refused_answers=len(log.refused),
            accepted_during_join=sum(1 for t in log.accepted if 0 <= t <= join_seconds),
            writes=writer.version,
            write_p50_ms=statistics.median(latencies) * 1e3,
            write_p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
            write_max_ms=latencies[-1] * 1e3,
            not_responsible_answers=len(log.not_responsible), stopped_answers=len(log.stopped),
            skipped_writes=log.skipped, errors=log.errors[:20], steps=steps,
            store_keys=store_keys, verified_keys=verified, problems=problems,
            epoch_before=ring.epoch, epoch_after=new_ring.epoch)
    finally:
        for conn in {**conns, **(writer.router.conns if writer else {})}.values():
            conn.transport.loseConnection()


async def watch(reactor: Any, ecs: ECSProcess, zero: float, done: list[bool],
                steps: list[tuple[float, str]], moved: dict[str, int]) -> None:
    """Poll C{Status} until the join is answered; note each step and the highest keys and
    bytes moved it showed."""
    shown = None
    while not done[0]:
        status = await status_of(reactor, ecs)
        op = status["operation"]
        if op is not None:
            moved["keys"] = max(moved["keys"], op["keys_moved"])
            moved["bytes"] = max(moved["bytes"], op["bytes_moved"])
            if op["step"] != shown:
                shown = op["step"]
                steps.append((reactor.seconds() - zero, shown))
                _log(f"  +{reactor.seconds() - zero:6.3f}s  {shown}: {op['keys_moved']:,} keys,"
                     f" {op['bytes_moved']:,} bytes moved so far")
        await deferLater(reactor, STATUS_EVERY)


async def verify(writer: Writer, problems: list[str], inflight: int = 32) -> int:
    """Read every key with an acknowledged write from its tail; note any that lost it."""
    items = iter(sorted(writer.acked.items()))
    lost: list[str] = []

    async def reader() -> None:
        for index, (version, head, answered) in items:
            key = key_of(index)
            where = (f"(acknowledged by {head} at +{answered:.3f} s; read from "
                     f"{writer.router.ring.tail(key).name})")
            try:
                answer = await writer.router.tail(key).callRemote(protocol.Get, key=key)
            except KeyNotFound:
                lost.append(f"{key.decode()} is missing {where}")
                continue
            if version_of(answer["value"]) < version:
                lost.append(f"{key.decode()} holds version {version_of(answer['value'])}, "
                            f"{version} was acknowledged {where}")

    results = await DeferredList([Deferred.fromCoroutine(reader()) for _ in range(inflight)],
                                 consumeErrors=True)
    for ok, failure in results:
        if not ok:
            problems.append(f"reading back failed: {failure.value!r}")
    if lost:
        problems.append(f"{len(lost)} acknowledged writes lost: " + "; ".join(lost[:5]))
    return len(writer.acked)


async def count_keys(reactor: Any, router: ChainRouter, problems: list[str],
                     keys: int) -> dict[str, dict[str, int]]:
    """Every server's store sizes; each store position must hold every key once in all."""
    counts: dict[str, dict[str, int]] = {}
    for node in router.ring.live_nodes:
        stats = json.loads((await router.conns[node.name].callRemote(protocol.Stats))["stats"])
        counts[node.name] = {store: stats.get(f"{store}_keys", 0)
                             for store in ("coordinator", "replica1", "replica2")}
    for store in ("coordinator", "replica1", "replica2"):
        total = sum(c[store] for c in counts.values())
        if total != keys:
            problems.append(f"the servers' {store} stores hold {total:,} keys, not {keys:,}")
    return counts


# -- the report -----------------------------------------------------------------------------------


def format_report(r: Result) -> str:
    mb = r.moved_bytes / 1e6
    window = r.refused_window
    rows = [
        ("load", f"{r.keys:,} keys x {r.value_size} B in {r.load_seconds:.2f} s "
         f"({r.keys / r.load_seconds:,.0f} puts/s through the chains)"),
        ("join (AddNodes)", f"{r.join_seconds:.3f} s sent to answered (launch, register, "
         f"copy, lock, switch, drop); epoch {r.epoch_before} -> {r.epoch_after}"),
        ("reconfiguration (ECS)", f"{r.ecs_seconds:.3f} s, moved {r.moved_keys:,} keys "
         f"({r.moved_bytes:,} bytes, {mb / r.ecs_seconds:.2f} MB/s); Status showed up to "
         f"{r.status_keys_moved:,} keys, {r.status_bytes_moved:,} bytes"),
        ("writes refused (ECS)", f"{r.ecs_locked_seconds:.3f} s, lock to commit"),
        ("writes refused (client)",
         "no server_write_lock answer" if window is None else
         f"{window:.3f} s: first server_write_lock at +{r.refused_first:.3f} s, last at "
         f"+{r.refused_last:.3f} s, {r.refused_answers:,} refusals"),
        ("writer", f"{r.writes:,} puts, {r.accepted_during_join:,} accepted during the join; "
         f"latency p50 {r.write_p50_ms:.1f} ms, p99 {r.write_p99_ms:.1f} ms, max "
         f"{r.write_max_ms:.1f} ms; {r.not_responsible_answers} server_not_responsible, "
         f"{r.stopped_answers} server_stopped, {r.skipped_writes} skipped (too many "
         f"outstanding), {len(r.errors)} other failures"),
        ("after the join", f"{r.verified_keys:,} acknowledged keys read back from their tails; "
         "stores: " + ", ".join(f"{name} {c['coordinator']:,}/{c['replica1']:,}/"
                                f"{c['replica2']:,}" for name, c in sorted(r.store_keys.items()))
         + " (coordinator/replica1/replica2 keys)"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {what}" for name, what in rows]
    lines.append("  steps seen in Status: " + ", ".join(f"+{t:.2f} s {step}"
                                                       for t, step in r.steps))
    lines.extend(f"  failure: {e}" for e in r.errors)
    lines.extend(f"  WRONG: {p}" for p in r.problems)
    return "\n".join(lines)


def compare(results: list[Result], tolerance: float = 0.5) -> str | None:
    """Whether the refused window grew with the data: the largest run's window against the
    smallest's (both measured by the client; the ECS's figure beside it)."""
    if len(results) < 2:
        return None
    small, large = min(results, key=lambda r: r.keys), max(results, key=lambda r: r.keys)
    lines = []
    for what, a, b in (("client-observed", small.refused_window, large.refused_window),
                       ("ECS lock", small.ecs_locked_seconds, large.ecs_locked_seconds)):
        if a is None or b is None:
            lines.append(f"{what}: not measured at both sizes")
            continue
        grew = b > a + tolerance
        lines.append(f"{'FAIL' if grew or b >= 1.0 else 'PASS'}: {what} write-refused time "
                     f"{a:.3f} s at {small.keys:,} keys, {b:.3f} s at {large.keys:,} keys "
                     f"({large.keys / small.keys:.0f}x the data; goal: under 1 s and not "
                     f"growing, i.e. not more than {tolerance} s longer)")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give key counts separated by commas") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more counts >= 1")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chain_join",
        description=(
            "Measure a join into chains of three: an ECS (replication 3) with three servers "
            "holding --keys keys; a writer keeps putting keys all over the ring while a fourth "
            "server joins. Prints the join time, keys and bytes moved, and how long writes were "
            "refused (server_write_lock), as the client and as the ECS measured it."))
    parser.add_argument("--keys", type=_sizes, default=[20_000, 100_000],
                        help="keys loaded before the join; several sizes, comma-separated, run "
                             "one after the other on fresh clusters [default: 20000,100000]")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value [100]")
    parser.add_argument("--inflight", type=int, default=64,
                        help="puts in flight while loading [default: 64]")
    parser.add_argument("--rate", type=float, default=500.0,
                        help="the writer's puts per second during the join [default: 500]")
    parser.add_argument("--writer-inflight", type=int, default=32,
                        help="at most this many of the writer's puts outstanding [default: 32]")
    parser.add_argument("--load-seconds", type=float, default=600.0,
                        help="give up if loading takes longer [default: 600]")
    parser.add_argument("--join-seconds", type=float, default=600.0,
                        help="give up if the join takes longer [default: 600]")
    parser.add_argument("--share", type=float, nargs=2, default=(0.2, 0.3), metavar=("LOW", "HIGH"),
                        help="the joining server's own range is this share of the ring "
                             "[default: 0.2 0.3]")
    parser.add_argument("--workdir", type=Path,
                        help="keep the ECS's and servers' files and logs here "
                             "[default: a temporary directory, removed afterwards]")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.value_size < 32 or args.inflight < 1 or args.writer_inflight < 1 or args.rate <= 0:
        parser.error("--value-size must be >= 32 (it holds the key and version), --inflight, "
                     "--writer-inflight and --rate > 0")
    if not 0 < args.share[0] <= args.share[1] < 1:
        parser.error("--share takes LOW HIGH with 0 < LOW <= HIGH < 1")
    return args


def run(args: argparse.Namespace, workdir: Path) -> tuple[bool, list[Result]]:
    """Measure each size on a fresh cluster; (finished, results). Every ECS (and its servers)
    is stopped by PID before this returns, whatever happened."""
    clusters: list[ECSProcess] = []
    results: list[Result] = []

    async def main(reactor: Any) -> None:
        for keys in args.keys:
            where = workdir / f"keys-{keys}"
            ecs = ECSProcess(where, config_path=pool_config(where, tuple(args.share)))
            clusters.append(ecs)
            ecs.start()
            _log(f"ECS pid {ecs.pid} on {ecs.address}; waiting for its three servers")
            try:
                await wait_serving(reactor, ecs)
                results.append(await measure(reactor, ecs, args, keys))
            finally:
                # Blocking (bounded): nothing else runs on the reactor now.
                ecs.stop()
            print(f"chain join: {keys:,} keys of {args.value_size} bytes on 3 servers, "
                  f"replication {REPLICATION}; a 4th joins", flush=True)
            print(format_report(results[-1]), flush=True)

    try:
        done, _ = run_reactor(main)
    finally:
        for ecs in clusters:
            ecs.stop()
    return done, results


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            done, results = run(args, args.workdir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="chainstore-chain-join-") as workdir:
                done, results = run(args, Path(workdir))
    except KeyboardInterrupt:
        _log("interrupted: every process was stopped")
        return INTERRUPTED
    except (MeasurementFailed, ProcessFailed) as e:
        _log(f"failed: {e}")
        return 1
    if not done:
        _log("interrupted: every process was stopped")
        return INTERRUPTED
    verdict = compare(results)
    if verdict:
        print(verdict)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"argv": sys.argv[1:] if argv is None else argv,
             "results": [{**asdict(r), "refused_window": r.refused_window} for r in results],
             "verdict": verdict}, indent=2) + "\n")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
