"""``python -m bench.roles``: the CPU a chain put costs each role (head, middle, tail).

In the ordinary benchmark every server is head, middle and tail of one range each, so its CPU
time mixes the three roles. Here a chain of three (``ChainSystem``, mutual TLS, as
``python -m bench`` runs it) receives puts to the keys of one range only: one server is their
head, the next their middle, the last their tail, and each process's CPU time (``/proc``) per
put is that role's cost, with the kernel's share of it and the process's wake-ups (voluntary
context switches) and preemptions per put. A single server (``SingleSystem``) takes the same
puts for comparison.
With ``--py-spy DIR`` every server process is also sampled by py-spy (``pip install py-spy``;
not a dependency of the project) while the puts run, and the functions with the most samples
of each role are listed (raw collapsed stacks are kept in DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from bench.driver import log, print_report
from bench.loadgen import ClosedLoop
from bench.systems import ChainSystem, SingleSystem
from bench.ycsb import record_keys, record_values
from chainstore import protocol
from chainstore.ring import position

ROLES = ("head", "middle", "tail")


class Activity(NamedTuple):
    """What a process has done so far, from /proc. A voluntary context switch is the process
    going to sleep with nothing to do (the reactor waiting in epoll), so their count per put
    is the wake-ups a put costs; an involuntary one is the process preempted while it had
    work (another process took the CPU)."""

    cpu: float  # seconds, user and system
    kernel: float  # of which system
    wakeups: int  # voluntary context switches
    preempted: int  # involuntary ones

    def __sub__(self, other: Any) -> Activity:  # type: ignore[override]
        return Activity(*(a - b for a, b in zip(self, other)))


def parse_activity(stat: str, status: str) -> Activity:
    """The L{Activity} of a process given the text of its /proc/PID/stat and
    /proc/PID/status."""
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = stat.rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    user, system = int(fields[11]) / tick, int(fields[12]) / tick
    switches = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            switches[name] = int(value)
    return Activity(user + system, system, switches["voluntary_ctxt_switches"],
                    switches["nonvoluntary_ctxt_switches"])


def activity(pid: int) -> Activity:
    """The L{Activity} of process C{pid} (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat, \
            open(f"/proc/{pid}/status", encoding="ascii") as status:
        return parse_activity(stat.read(), status.read())


def per_put(spent: Activity, puts: int) -> str:
    """CPU µs per put, the kernel's share of it, wake-ups and preemptions per put."""
    return (f"{spent.cpu / puts * 1e6:>10.0f}  {spent.kernel / max(spent.cpu, 1e-9):>6.0%}  "
            f"{spent.wakeups / puts:>8.3f}  {spent.preempted / puts:>9.3f}")


def range_keys(ring: Any, index: int | None, count: int) -> list[bytes]:
    """C{count} record keys whose range is the one owned by ring node C{index} (None: keys
    of every range, as the ordinary benchmark writes)."""
    keys = [k for k in record_keys(count * len(ring) * 3)
            if index is None or ring.owner_index(position(k)) == index]
    return keys[:count]


async def writes_per_batch(router: Any) -> dict[str, tuple[int, int, int]]:
    """Per server: (batches sent, writes they carried, Relay boxes sent), from its C{Stats}."""
    sent = {}
    for name, conn in router.conns.items():
        stats = json.loads((await conn.callRemote(protocol.Stats))["stats"])
        chains = [v for k, v in stats.items() if k.endswith("_chain")]
        sent[name] = (sum(c["batches_sent"] for c in chains),
                      sum(c["writes_sent"] for c in chains),
                      stats.get("relay", {}).get("boxes_sent", 0))
    return sent


async def put_loop(reactor: Any, system: Any, conn: Any, keys: list[bytes], value: bytes,
                   inflight: int, seconds: float) -> int:
    """Puts of C{value} round the C{keys} for C{seconds}; how many were answered."""
    result = await ClosedLoop(lambda i: system.request("put", conn, keys[i % len(keys)], value),
                              10**9, inflight, seconds).run()
    return result.completed


def sample(pids: dict[str, int], seconds: float, out: Path, tag: str,
           rate: int) -> list[subprocess.Popen[bytes]]:
    """Start py-spy on each process for C{seconds} (raw collapsed stacks, one file per role)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                              "--rate", str(rate), "--format", "raw", "--nonblocking",
                              "-o", str(out / f"{tag}-{role}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for role, pid in pids.items()]


def top_functions(path: Path, count: int) -> list[tuple[float, str]]:
    """The functions with the most samples at the top of the stack (share of all samples)."""
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frame = stack.rsplit(";", 1)[-1]
        own[frame] += int(n)
        total += int(n)
    return [(n / total, frame) for frame, n in own.most_common(count)] if total else []


async def measure(reactor: Any, args: argparse.Namespace, workdir: Path) -> list[str]:
    lines = []
    chain, single = ChainSystem(workdir / "chain"), SingleSystem(workdir / "single")
    try:
        chain.start()
        single.start()
        router = (await chain.connect(reactor, 1))[0]
        ring = router.ring
        members = ring.chain_for_index(0)
        by_name = {name: pids[-1] for name, pids in chain.ecs.server_pids().items()}
        pids = {role: by_name[node.name] for role, node in zip(ROLES, members)}
        keys = range_keys(ring, None if args.all_ranges else 0, args.records)
        single_conn = (await single.connect(reactor, 1))[0]
        if args.all_ranges:
            lines.append(f"chain of {len(ring)}, {len(keys)} keys of every range: each "
                         f"server heads, follows and ends a range (roles named for "
                         f"{members[0].name}'s range)")
        else:
            lines.append(f"chain {' -> '.join(n.name for n in members)}, {len(keys)} keys "
                         f"of {members[0].name}'s range")
        lines.append(f"{args.inflight} in flight, {args.seconds:.0f} s per size")
        lines.append("value B  role    puts/s  CPU us/put  kernel  wake-ups  preempted  (per put)")
        for size in args.values:
            value = record_values(size)[1]
            # Warm up (and insert) the keys first: the measured puts are updates.
            await put_loop(reactor, chain, router, keys, value, args.inflight, 1.0)
            await put_loop(reactor, single, single_conn, keys, value, args.inflight, 1.0)
            spies = (sample(pids, args.seconds, args.py_spy, f"{size}", args.rate)
                     if args.py_spy else [])
            sent_before = await writes_per_batch(router)
            before = {role: activity(pid) for role, pid in pids.items()}
            start = time.monotonic()
            done = await put_loop(reactor, chain, router, keys, value, args.inflight,
                                  args.seconds)
            elapsed = time.monotonic() - start
            spent = {role: activity(pid) - before[role] for role, pid in pids.items()}
            sent_after = await writes_per_batch(router)
            for spy in spies:
                spy.wait()
            s_before = activity(single.pids[0])
            s_start = time.monotonic()
            s_done = await put_loop(reactor, single, single_conn, keys, value, args.inflight,
                                    args.seconds)
            s_elapsed = time.monotonic() - s_start
            s_spent = activity(single.pids[0]) - s_before
            for role in ROLES:
                lines.append(f"{size:>7}  {role:<6} {done / elapsed:>7,.0f}  "
                             f"{per_put(spent[role], done)}")
            total = Activity(*map(sum, zip(*spent.values())))
            lines.append(f"{size:>7}  all    {done / elapsed:>7,.0f}  {per_put(total, done)}")
            lines.append(f"{size:>7}  single {s_done / s_elapsed:>7,.0f}  "
                         f"{per_put(s_spent, s_done)}")
            lines.append(f"         chain / single CPU per put "
                         f"{(total.cpu / done) / (s_spent.cpu / s_done):.1f}x")
            batches = sum(sent_after[n][0] - sent_before[n][0] for n in sent_after)
            writes = sum(sent_after[n][1] - sent_before[n][1] for n in sent_after)
            boxes = sum(sent_after[n][2] - sent_before[n][2] for n in sent_after)
            lines.append(f"         {boxes / max(done, 1):.2f} server boxes per put")
            lines.append(f"         {writes / max(batches, 1):.1f} writes per batch "
                         f"({batches} batches)")
            if args.py_spy:
                for role in ROLES:
                    lines.append(f"  py-spy, {role}, {size} B: most samples on top of the stack")
                    for share, frame in top_functions(args.py_spy / f"{size}-{role}.txt",
                                                      args.top):
                        lines.append(f"    {share:6.1%}  {frame}")
        chain.disconnect([router])
        single.disconnect([single_conn])
        return lines
    finally:
        chain.stop()
        single.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roles", description=__doc__)
    parser.add_argument("--values", type=lambda t: [int(v) for v in t.split(",")],
                        default=[100, 10_000], help="value sizes in bytes [100,10000]")
    parser.add_argument("--inflight", type=int, default=32, help="puts in flight [32]")
    parser.add_argument("--seconds", type=float, default=5.0, help="per value size [5]")
    parser.add_argument("--records", type=int, default=2_000, help="keys of the range [2000]")
    parser.add_argument("--all-ranges", action="store_true",
                        help="put to keys of every range (each server in every role at once)")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="sample every server with py-spy, keep its stacks in DIR")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15, help="functions listed per role")
    args = parser.parse_args(argv)
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    # After parse_args: --help and a bad option start nothing, and say nothing of starting.
    log("python -m bench.roles: starting a chain of three and a single server")
    return print_report(lambda reactor, workdir: measure(reactor, args, workdir),
                        "bench-roles-")


if __name__ == "__main__":
    sys.exit(main())
