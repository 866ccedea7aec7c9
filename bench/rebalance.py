"""``python -m bench.rebalance``: what a join costs. An ECS and three servers (replication 1) hold
N keys (100,000 by default, 100-byte values); a fourth server joins, and this measures:

- the join: how long the C{AddNodes} command took (client side: sent to answered, which
  includes launching the server), and the ECS's own time for the reconfiguration (from its log:
  copy, lock, switch, commit, drop);
- what moved: keys and bytes (the ECS's count), and keys/s and MB/s over the reconfiguration;
- how long writes to the moved range were locked: from the ECS (its log: from the lock to the
  commit) and from a client that keeps writing keys of the moved range during the
  join, one at a time over raw AMP, following the ring: the first and last ``server_write_lock``
  answers it got, and how long it found no server accepting its writes at all (last write
  accepted by the old owner to the first accepted by the new one).

The driver is this process: it starts ``twistd ecs`` (which launches the servers), loads the
keys with pipelined AMP puts, runs the join under the reactor, then stops every process by PID,
also when it fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater, react
from twisted.protocols import amp

from chainstore import protocol
from chainstore.errors import NotResponsible, ServerStopped, WriteLocked
from chainstore.ring import RING_BITS, NodeInfo, Ring
from chainstore.testing.processes import ECSProcess, ProcessFailed, write_ecs_config
from ecs import protocol as admin

CONNECT_TIMEOUT = 10.0
# Status is polled this often during the join, for the progress lines.
STATUS_EVERY = 0.05
# A writer that was refused waits this long before it tries again: the resolution of the
# client-observed windows, and little enough load on the servers that move the data.
RETRY_PAUSE = 0.001


INTERRUPTED = 130


class MeasurementFailed(RuntimeError):
    """The measurement could not finish; the reason was logged."""


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the cluster ----------------------------------------------------------------------------------


def share(nodes: list[NodeInfo], node: NodeInfo) -> float:
    """The fraction of the ring C{node} heads among C{nodes}."""
    ring = Ring(tuple(nodes), replication=1)
    rng = ring.range_of(ring.index_of(node.name))
    return ((rng.end - rng.start) % (1 << RING_BITS) or 1 << RING_BITS) / (1 << RING_BITS)


def pool_config(workdir: Path, target_share: tuple[float, float], attempts: int = 2000) -> Path:
    """An ECS config (4 slots) whose joining fourth server takes a share of the ring within
    C{target_share}, so that runs move comparable amounts of data; ports are drawn afresh
    for each attempt (ring positions hash the console addresses)."""
    low, high = target_share
    for _ in range(attempts):
        path = write_ecs_config(workdir, slots=4, initial_nodes=3, replication=1,
                                heartbeat_interval=1.0, failure_timeout=5.0, cache_size=1000)
        pool = [NodeInfo(str(s["name"]), str(s["host"]), int(s["console-port"]),
                         int(s["amp-port"])) for s in yaml.safe_load(path.read_text())["nodes"]]
        if low <= share(pool, pool[3]) <= high and \
                min(share(pool[:3], n) for n in pool[:3]) >= 0.2:
            return path
    raise MeasurementFailed(f"no pool of free ports gave the fourth slot a share in {target_share}")


def wait_started(ecs: ECSProcess, ring_size: int, timeout: float = 60.0) -> dict[str, Any]:
    status = ecs.wait_ready(ring_size=ring_size, timeout=timeout)
    deadline = time.monotonic() + timeout
    while not status["serving"]:
        if time.monotonic() > deadline:
            raise MeasurementFailed(f"the ring did not start serving: {status}")
        time.sleep(0.05)
        status = ecs.status()
    return status


def ring_from_status(ecs: ECSProcess, status: dict[str, Any]) -> Ring:
    slots = {s["name"]: s for s in ecs.slots}
    return Ring(tuple(NodeInfo(n, str(slots[n]["host"]), int(slots[n]["console-port"]),
                               int(slots[n]["amp-port"])) for n in status["ring"]),
                epoch=status["epoch"], replication=status["replication"])


async def connect(reactor: Any, node: NodeInfo) -> amp.AMP:
    endpoint = TCP4ClientEndpoint(reactor, node.host, node.amp_port, timeout=CONNECT_TIMEOUT)
    return await connectProtocol(endpoint, amp.AMP())


def key_of(i: int) -> bytes:
    return b"key%012d" % i


def value_of(key: bytes, size: int, version: int = 0) -> bytes:
    head = b"%s/%d/" % (key, version)
    return (head * (size // len(head) + 1))[:size]


# -- loading --------------------------------------------------------------------------------------


async def load(reactor: Any, ring: Ring, count: int, value_size: int, inflight: int,
               limit: float) -> float:
    """Put C{count} keys, C{inflight} at a time, each to its head; the seconds it took."""
    conns = {n.name: await connect(reactor, n) for n in ring.nodes}
    next_key = iter(range(count))
    started = reactor.seconds()
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in next_key:
            if reactor.seconds() - started > limit:
                raise RuntimeError(f"loading took more than {limit}s ({done} keys so far)")
            key = key_of(i)
            await conns[ring.head(key).name].callRemote(
                protocol.Put, key=key, value=value_of(key, value_size))
            done += 1
            if done % 20_000 == 0:
                _log(f"  loaded {done:,} keys")

    try:
        await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(inflight)],
                            consumeErrors=True)
    finally:
        for conn in conns.values():
            conn.transport.loseConnection()
    return reactor.seconds() - started


# -- the join -------------------------------------------------------------------------------------


@dataclass
class WriterLog:
    """What the range writer saw, in seconds since the AddNodes command was sent."""

    accepted_old: list[float] = field(default_factory=list)
    accepted_new: list[float] = field(default_factory=list)
    locked: list[float] = field(default_factory=list)
    stopped: list[float] = field(default_factory=list)
    not_responsible: list[float] = field(default_factory=list)


class RangeWriter:
    """Writes keys of the moving range one at a time, to the head its ring names; on
    C{NotResponsible} it asks that server for the ring, on a lock or a stop it retries."""

    def __init__(self, reactor: Any, ring: Ring, keys: list[bytes], old: str, new: str,
                 value_size: int) -> None:
        self.reactor = reactor
        self.ring = ring
        self.keys = keys
        self.old, self.new = old, new
        self.value_size = value_size
        self.conns: dict[str, amp.AMP] = {}
        self.log = WriterLog()
        self.zero = 0.0
        self.done = False
        self.writes = 0

    async def run(self, deadline: float) -> None:
        version = 0
        while self.reactor.seconds() < deadline:
            for key in self.keys:
                version += 1
                await self._write(key, value_of(key, self.value_size, version))
                if self.done and self.log.accepted_new:
                    return
                if self.reactor.seconds() > deadline:
                    raise RuntimeError("the writer never saw the new owner accept a write")

    async def _write(self, key: bytes, value: bytes) -> None:
        for _ in range(100_000):  # bounded, like the caller's deadline
            head = self.ring.head(key)
            if head.name not in self.conns:
                self.conns[head.name] = await connect(self.reactor, head)
            sent = self.reactor.seconds() - self.zero
            try:
                await self.conns[head.name].callRemote(protocol.Put, key=key, value=value)
            except WriteLocked:
                self.log.locked.append(sent)
            except ServerStopped:
                self.log.stopped.append(sent)
            except NotResponsible:
                self.log.not_responsible.append(sent)
                answer = await self.conns[head.name].callRemote(protocol.GetMetadata)
                self.ring = Ring(tuple(NodeInfo(n["name"], n["host"], n["console_port"],
                                                n["amp_port"]) for n in answer["nodes"]),
                                 epoch=answer["epoch"], replication=answer["replication"])
                continue
            else:
                self.writes += 1
                if head.name == self.old:
                    self.log.accepted_old.append(sent)
                elif head.name == self.new:
                    self.log.accepted_new.append(sent)
                return
            await deferLater(self.reactor, RETRY_PAUSE)
        raise RuntimeError(f"{key!r} was refused 100,000 times")

    def close(self) -> None:
        for conn in self.conns.values():
            conn.transport.loseConnection()


async def ask_ecs(reactor: Any, ecs: ECSProcess, command: type[amp.Command],
                  **arguments: Any) -> dict[str, Any]:
    endpoint = TCP4ClientEndpoint(reactor, ecs.host, ecs.port, timeout=CONNECT_TIMEOUT)
    proto = await connectProtocol(endpoint, amp.AMP())
    try:
        return await proto.callRemote(command, **arguments)
    finally:
        proto.transport.loseConnection()


async def watch(reactor: Any, ecs: ECSProcess, zero: float, stop: Callable[[], bool],
                steps: list[tuple[float, str]]) -> None:
    """Poll C{Status} and note each step of the operation when it first shows."""
    shown = None
    while not stop():
        status = json.loads((await ask_ecs(reactor, ecs, admin.Status))["status"])
        op = status["operation"]
        if op is not None and op["step"] != shown:
            shown = op["step"]
            steps.append((reactor.seconds() - zero, shown))
            _log(f"  +{reactor.seconds() - zero:6.3f}s  {shown}: {op['keys_moved']:,} keys, "
                 f"{op['bytes_moved']:,} bytes moved so far")
        await deferLater(reactor, STATUS_EVERY)


# The coordinator's summary line (ecs/coordinator.py) and its write-lock figure.
_DONE = re.compile(r"epoch (?P<epoch>\d+): adding (?P<names>[^\n]*?) done in (?P<seconds>[\d.]+)s,"
                   r" moved (?P<keys>\d+) keys \((?P<bytes>\d+) bytes\)"
                   r"(?:; writes [^;\n]*? for (?P<locked>[\d.]+)s)?")


@dataclass
class Result:
    keys: int
    joined: str
    value_size: int
    load_seconds: float
    moving_keys: int
    join_seconds: float
    ecs_seconds: float
    ecs_locked_seconds: float | None
    moved_keys: int
    moved_bytes: int
    first_lock: float | None
    last_lock: float | None
    lock_answers: int
    last_old_accept: float
    first_new_accept: float
    stopped_answers: int
    not_responsible_answers: int
    writer_writes: int
    steps: list[tuple[float, str]]
    counts: dict[str, int]


async def measure(reactor: Any, ecs: ECSProcess, args: argparse.Namespace) -> Result:
    ring = ring_from_status(ecs, ecs.status())
    _log(f"loading {args.keys:,} keys of {args.value_size} bytes, {args.inflight} in flight")
    load_seconds = await load(reactor, ring, args.keys, args.value_size, args.inflight,
                              args.load_seconds)
    _log(f"  loaded in {load_seconds:.2f}s ({args.keys / load_seconds:,.0f} puts/s)")

    # The ECS takes the pool's free slots in order: the fourth joins.
    slot = next(s for s in ecs.slots if s["name"] not in {n.name for n in ring.nodes})
    joining = NodeInfo(str(slot["name"]), str(slot["host"]), int(slot["console-port"]),
                       int(slot["amp-port"]))
    after = Ring(ring.nodes + (joining,), replication=1)
    moving = [key_of(i) for i in range(args.keys) if after.head(key_of(i)) == joining]
    old_heads = {ring.head(k).name for k in moving}
    assert len(old_heads) == 1, "a joining server takes keys from one server only"
    writer = RangeWriter(reactor, ring, moving[:1000], old_heads.pop(), joining.name,
                         args.value_size)
    steps: list[tuple[float, str]] = []
    _log(f"{joining.name} joins; {len(moving):,} keys ({len(moving) / args.keys:.1%}) will move "
         f"from {writer.old}")

    zero = writer.zero = reactor.seconds()
    deadline = zero + args.join_seconds
    writing = Deferred.fromCoroutine(writer.run(deadline))
    watching = Deferred.fromCoroutine(watch(reactor, ecs, zero, lambda: writer.done, steps))
    try:
        answer = await ask_ecs(reactor, ecs, admin.AddNodes, count=1, cache_strategy="LRU",
                               cache_size=1000)
        join_seconds = reactor.seconds() - zero
        _log(f"  +{join_seconds:6.3f}s  {answer['message']}")
        writer.done = True
        await gatherResults([writing, watching], consumeErrors=True)
    finally:
        writer.done = True
        writer.close()

    match = None
    for match in _DONE.finditer(ecs.log_path.read_text(errors="replace")):
        pass
    if match is None or joining.name not in match["names"]:
        raise RuntimeError("the ECS log has no summary of the join")
    status = ecs.status()
    counts = {}
    for node in ring_from_status(ecs, status).nodes:
        conn = await connect(reactor, node)
        try:
            stats = json.loads((await conn.callRemote(protocol.Stats))["stats"])
        finally:
            conn.transport.loseConnection()
        counts[node.name] = stats["coordinator_keys"]
    log = writer.log
    return Result(
        keys=args.keys, joined=joining.name, value_size=args.value_size,
        load_seconds=load_seconds,
        moving_keys=len(moving), join_seconds=join_seconds,
        ecs_seconds=float(match["seconds"]),
        ecs_locked_seconds=float(match["locked"]) if match["locked"] else None,
        moved_keys=int(match["keys"]), moved_bytes=int(match["bytes"]),
        first_lock=min(log.locked, default=None), last_lock=max(log.locked, default=None),
        lock_answers=len(log.locked), last_old_accept=max(log.accepted_old, default=0.0),
        first_new_accept=min(log.accepted_new), stopped_answers=len(log.stopped),
        not_responsible_answers=len(log.not_responsible),
        writer_writes=writer.writes, steps=steps, counts=counts)


# -- the report -----------------------------------------------------------------------------------


def check(result: Result) -> list[str]:
    """What is wrong with the figures' basis: data lost or misplaced makes them meaningless."""
    problems = []
    if sum(result.counts.values()) != result.keys:
        problems.append(f"the servers hold {sum(result.counts.values()):,} keys, not "
                        f"{result.keys:,}: {result.counts}")
    if result.moved_keys < result.moving_keys:
        problems.append(f"the ECS moved {result.moved_keys:,} keys; the ring says "
                        f"{result.moving_keys:,} should move")
    if result.counts.get(result.joined) != result.moving_keys:
        problems.append(f"{result.joined} holds {result.counts.get(result.joined)} keys; the "
                        f"ring gives it {result.moving_keys:,}")
    return problems


def format_report(r: Result) -> str:
    mb = r.moved_bytes / 1e6
    rows = [
        ("load", f"{r.keys:,} keys x {r.value_size} B in {r.load_seconds:.2f} s",
         f"{r.keys / r.load_seconds:,.0f} puts/s"),
        ("join (AddNodes)", f"{r.join_seconds:.3f} s, sent to answered (launch, register, "
         "reconfigure)", ""),
        ("reconfiguration (ECS)", f"{r.ecs_seconds:.3f} s: copy, lock, switch, commit, drop",
         f"{r.moved_keys / r.ecs_seconds:,.0f} keys/s, {mb / r.ecs_seconds:.2f} MB/s"),
        ("moved", f"{r.moved_keys:,} keys, {r.moved_bytes:,} bytes "
         f"({r.moved_keys / r.keys:.1%} of the keys)", ""),
    ]
    if r.ecs_locked_seconds is not None:
        rows.append(("writes locked (ECS)", f"{r.ecs_locked_seconds:.3f} s, lock to commit",
                     ""))
    if r.first_lock is not None and r.last_lock is not None:
        rows.append(("writes locked (client)",
                     f"{r.last_lock - r.first_lock:.3f} s: first server_write_lock at "
                     f"+{r.first_lock:.3f} s, last at +{r.last_lock:.3f} s",
                     f"{r.lock_answers:,} refusals"))
    else:
        rows.append(("writes locked (client)", "no server_write_lock seen", ""))
    rows.append(("no write accepted (client)",
                 f"{r.first_new_accept - r.last_old_accept:.3f} s: last accepted by the old "
                 f"owner at +{r.last_old_accept:.3f} s, first by the new at "
                 f"+{r.first_new_accept:.3f} s",
                 f"{r.stopped_answers:,} server_stopped, {r.not_responsible_answers:,} "
                 "server_not_responsible"))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {what}" + (f"  [{rate}]" if rate else "")
             for name, what, rate in rows]
    lines.append("  steps seen in Status (client time): " +
                 ", ".join(f"+{t:.3f} s {step}" for t, step in r.steps))
    lines.append("  keys per server after the join: " +
                 ", ".join(f"{name} {count:,}" for name, count in sorted(r.counts.items())))
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rebalance",
        description=(
            "Measure a join: an ECS with three chainstore servers (replication 1) holding "
            "--keys keys; a fourth server joins. Prints the join time, keys and bytes moved "
            "(keys/s, MB/s) and how long writes to the moved range were locked, as the ECS "
            "and as a client writing that range saw it."))
    parser.add_argument("--keys", type=int, default=100_000,
                        help="keys loaded before the join [default: 100000]")
    parser.add_argument("--value-size", type=int, default=100,
                        help="bytes per value [default: 100]")
    parser.add_argument("--inflight", type=int, default=64,
                        help="puts in flight while loading [default: 64]")
    parser.add_argument("--load-seconds", type=float, default=600.0,
                        help="give up if loading takes longer [default: 600]")
    parser.add_argument("--join-seconds", type=float, default=600.0,
                        help="give up if the join takes longer [default: 600]")
    parser.add_argument("--share", type=float, nargs=2, default=(0.2, 0.3), metavar=("LOW", "HIGH"),
                        help="the joining server's share of the ring is drawn in this interval, "
                             "so that runs move comparable amounts [default: 0.2 0.3]")
    parser.add_argument("--workdir", type=Path,
                        help="keep the ECS's and servers' files and logs here "
                             "[default: a temporary directory, removed afterwards]")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.keys < 1 or args.value_size < 1 or args.inflight < 1:
        parser.error("--keys, --value-size and --inflight must be at least 1")
    if not 0 < args.share[0] <= args.share[1] < 1:
        parser.error("--share takes LOW HIGH with 0 < LOW <= HIGH < 1")
    return args


def run(args: argparse.Namespace, workdir: Path) -> Result:
    config = pool_config(workdir, tuple(args.share))
    ecs = ECSProcess(workdir, config_path=config).start()
    try:
        _log(f"ECS pid {ecs.pid} on {ecs.address}; waiting for its three servers")
        wait_started(ecs, 3)
        outcome: list[Result] = []
        interrupted: list[bool] = []

        async def main(reactor: Any) -> None:
            # A signal stops the reactor under the measurement, whose failure is then its echo.
            reactor.addSystemEventTrigger(
                "before", "shutdown", lambda: None if outcome else interrupted.append(True))
            outcome.append(await measure(reactor, ecs, args))

        try:
            react(main)
        except SystemExit as e:
            if e.code not in (0, None) and not interrupted:
                raise MeasurementFailed(f"the measurement failed; see above and the logs in "
                                        f"{workdir}") from None
        if not outcome:
            # react stopped without a result: a signal stopped the reactor.
            raise KeyboardInterrupt("the reactor was stopped")
        return outcome[0]
    finally:
        ecs.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM while the servers start (before the reactor's own handler) must still stop them.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            result = run(args, args.workdir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="chainstore-rebalance-") as workdir:
                result = run(args, Path(workdir))
    except KeyboardInterrupt:
        _log("interrupted: every process was stopped")
        return INTERRUPTED
    except (MeasurementFailed, ProcessFailed) as e:
        _log(f"failed: {e}")
        return 1
    print(f"rebalance: {result.keys:,} keys of {result.value_size} bytes on 3 servers, "
          f"replication 1; a 4th joins and takes {result.moving_keys / result.keys:.1%}")
    print(format_report(result))
    problems = check(result)
    for problem in problems:
        print(f"WRONG: {problem}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                         **asdict(result), "problems": problems}, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
