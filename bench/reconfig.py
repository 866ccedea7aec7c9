"""``python -m bench.reconfig``: what a join and a leave cost, at several data sizes.

For each key count N (``--keys 100000,1000000``), on a fresh cluster (an ECS and the servers it
launches, real ``twistd`` processes on 127.0.0.1 with ephemeral ports, replication 3 or 1), this:

1. waits until the ECS says its ring of three serves, then loads N keys (``--value-bytes``
   values, version 0) with many puts in flight, each to its key's head (a put refused because
   its server does not serve yet is retried, with a back-off, for a bounded time), and says
   how long that took;
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
   L{bench.memory.RSS_EVERY} seconds from the load to the end, and reports each server's peak per phase.

The goal is that neither the write-refused window nor the servers' memory grows with N: the
locked pass carries what was written during the previous pass (a function of the write rate),
and a server's memory should be bounded by its cache, its chain windows, SQLite's page cache and
the migration batches, not by its data. L{bench.reconfig_report.compare} judges both across
the sizes measured.

Every process started is stopped by PID, also when the run fails or is interrupted.

This module runs one operation and one size and holds the command line; the rest is in
L{bench.cluster} (the ECS config, its admin commands, the ring), L{bench.dataset} (the keys,
the load, the read-back), L{bench.writer} (the background writer), L{bench.memory} (the servers'
RSS) and L{bench.reconfig_report} (the results, the report, the table, the verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from bench.cluster import (CACHE_SIZE, INITIAL_SERVERS, STORES, MeasurementFailed, ask_ecs,
                           credentials_of, fetch_ring, pool_config, router_for, slot_node,
                           status_of, wait_serving)
from bench.cpu_watch import CPUWatch
from bench.dataset import keys_to_verify, load, verify
from bench.driver import INTERRUPTED, interrupt_on_sigterm, log, run_reactor
from bench.memory import MemorySampler
from bench.stalls import StallWatch
from bench.reconfig_report import (OpResult, SizeResult, compare, format_report, format_table,
                                   latency_by_step)
from bench.systems import ChainRouter
from bench.writer import Writer
from chainstore import protocol
from chainstore.ring import NodeInfo
from harness.processes import ECSProcess, ProcessFailed
from ecs import protocol as admin

STATUS_EVERY = 0.1
# The writer runs this long before an operation (to show writes flow) and after its answer.
WRITER_LEAD = 0.5
WRITER_TAIL = 0.5


# -- one operation --------------------------------------------------------------------------------


# The coordinator's summary line (ecs/reconfiguration.py, Reconfigurer.run).
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
    probed = {n.name: n for n in ring.live_nodes}
    if op == "join":
        probed[server] = NodeInfo(server, *_address(ecs, server))
    stalls = StallWatch(reactor, probed, router.credentials)
    stalls.start()
    cpu = CPUWatch(reactor, lambda: {name: found[-1] for name, found in ecs.server_pids().items()
                                     if found})
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
        cpu.start()
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
            cpu.stop()
        seconds = reactor.seconds() - zero
        log(f"  +{seconds:7.3f}s  {answer['message']}")
        if op == "join" and answer["names"] != [server]:
            raise MeasurementFailed(f"AddNodes added {answer['names']}, not {server}")
        await watching
        await deferLater(reactor, WRITER_TAIL)
    finally:
        await writer.stop()
        await stalls.stop()
    # The writer learns the ring only from refusals; it may have seen none.
    conns = writer.router.conns
    survivor = next(n for n in ring.live_nodes if n.name != server) if op == "leave" else \
        NodeInfo(server, *_address(ecs, server))
    new_ring = await fetch_ring(reactor, survivor, writer.router.credentials)
    if new_ring.epoch <= ring.epoch:
        raise MeasurementFailed(f"the ring is still at epoch {new_ring.epoch} after the {op}")
    gone = conns.pop(server, None) if op == "leave" else None
    if gone is not None and gone.transport is not None:
        gone.transport.loseConnection()
    router = await router_for(reactor, new_ring, conns, writer.router.credentials)

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
        ring_after=[n.name for n in new_ring.nodes],
        stalls=stalls.largest(zero, zero + seconds),
        by_step=latency_by_step(seen.accepted, seen.latencies, steps),
        cpu_seconds=cpu.spent())
    return result, router, writer.version


def _address(ecs: ECSProcess, name: str) -> tuple[str, int, int]:
    slot = slot_node(next(s for s in ecs.slots if s["name"] == name))
    return slot.host, slot.console_port, slot.amp_port


# -- one size -------------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


async def measure(reactor: Any, ecs: ECSProcess, settings: argparse.Namespace, keys: int,
                  leaving: str) -> SizeResult:
    status = await wait_serving(reactor, ecs, INITIAL_SERVERS)
    slots = {str(s["name"]): slot_node(s) for s in ecs.slots}
    joining = next(name for name in slots if name not in status["ring"])
    credentials = credentials_of(ecs, "client")
    ring = await fetch_ring(reactor, slots[status["ring"][0]], credentials)
    conns: dict[str, Any] = {}
    router = await router_for(reactor, ring, conns, credentials)

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
    parser.add_argument("--copies-beside-moves", choices=("on", "off"), default="on",
                        help="the ECS's copies-beside-moves: a join's or a leave's copies run "
                             "beside its local moves [on, as the ECS's default]")
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
                                          args.failure_timeout,
                                          copies_beside_moves=args.copies_beside_moves)
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
          f"{load_before} before, {load_after} after; server cache {CACHE_SIZE} entries; "
          f"copies beside moves {args.copies_beside_moves}):")
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
