"""``python -m bench.roles``: the CPU a chain put costs each role (head, middle, tail).

In the ordinary benchmark every server is head, middle and tail of one range each, so its CPU
time mixes the three roles. Here a chain of three (``ChainSystem``, mutual TLS, as
``python -m bench`` runs it) receives puts to the keys of one range only: one server is their
head, the next their middle, the last their tail, and each process's CPU time (``/proc``) per
put is that role's cost, with the kernel's share of it and the process's wake-ups (voluntary
context switches) and preemptions per put. A single server (``SingleSystem``) takes the same
puts for comparison.
With ``--py-spy DIR`` every server process, the single server's too, is also sampled by py-spy
(``pip install py-spy``; not a dependency of the project) while the puts run. Only samples of a
process holding the GIL count (``--gil``): the Python it runs, not a process blocked or
preempted inside a system call (on two CPUs a sender is often preempted in ``send()`` by the
receiver its send woke, which plain sampling counted as time spent sending). py-spy stops a
process for each sample, which slows the run a little; sampled without stopping, its test of
the GIL missed about half of the Python (36% of a chain server's CPU, where ``perf`` finds 72%
in the interpreter). Each sample stands for 1/rate s of Python, so the report gives each role's
microseconds of Python per put, split by the layer whose code was running (L{LAYERS}: the
reactor, TLS, AMP's framing and dispatch, Deferreds, the chain, the node, storage), beside the
single server's, and the functions with the most samples of each role (raw collapsed stacks
are kept in DIR).
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


async def writes_per_batch(router: Any) -> dict[str, tuple[int, int, int, int]]:
    """Per server: (batches sent, writes they carried, Relay boxes sent, sections they
    carried), from its C{Stats}."""
    sent = {}
    for name, conn in router.conns.items():
        stats = json.loads((await conn.callRemote(protocol.Stats))["stats"])
        chains = [v for k, v in stats.items() if k.endswith("_chain")]
        sent[name] = (sum(c["batches_sent"] for c in chains),
                      sum(c["writes_sent"] for c in chains),
                      stats.get("relay", {}).get("boxes_sent", 0),
                      stats.get("relay", {}).get("sections_sent", 0))
    return sent


async def put_loop(reactor: Any, system: Any, conn: Any, keys: list[bytes], value: bytes,
                   inflight: int, seconds: float) -> int:
    """Puts of C{value} round the C{keys} for C{seconds}; how many were answered."""
    result = await ClosedLoop(lambda i: system.request("put", conn, keys[i % len(keys)], value),
                              10**9, inflight, seconds).run()
    return result.completed


def sample(pids: dict[str, int], seconds: float, out: Path, tag: str,
           rate: int) -> list[subprocess.Popen[bytes]]:
    """Start py-spy on each process for C{seconds} (raw collapsed stacks, one file per role),
    counting only the samples that hold the GIL (the process stopped for each: see above)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                              "--rate", str(rate), "--format", "raw", "--gil",
                              "-o", str(out / f"{tag}-{role}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for role, pid in pids.items()]


# Where the Python of a put runs, by the file of the innermost frame of a sample (first match).
LAYERS = (
    ("TLS", ("twisted/protocols/tls.py", "OpenSSL/")),
    ("AMP", ("twisted/protocols/amp.py", "twisted/protocols/basic.py",
             "twisted/protocols/policies.py", "chainstore/bounds.py", "chainstore/roles.py",
             "chainstore/control.py")),
    ("Deferreds", ("twisted/internet/defer.py",)),
    ("reactor", ("twisted/internet/", "twisted/python/")),
    ("chain", ("chainstore/chain.py", "chainstore/craq.py", "chainstore/peers.py")),
    ("node", ("chainstore/node.py", "chainstore/amp_server.py", "chainstore/metrics.py",
              "chainstore/cache.py")),
    ("storage", ("chainstore/storage/",)),
)


def layer_of(frame: str) -> str:
    """The layer (L{LAYERS}, else "other") of a py-spy frame, C{function (path:line)}."""
    where = frame.rpartition("(")[2]
    for layer, places in LAYERS:
        if any(place in where for place in places):
            return layer
    return "other"


def samples_of(path: Path) -> list[tuple[list[str], int]]:
    """The stacks (outermost frame first) and their sample counts in a raw py-spy file."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            stacks.append((stack.split(";"), int(n)))
    return stacks


def python_per_put(path: Path, rate: int, puts: int) -> dict[str, float]:
    """Microseconds of Python per put in each layer (and C{"all"}) from a py-spy file of
    C{rate} samples a second taken while C{puts} puts ran."""
    per_sample = 1e6 / rate / max(puts, 1)
    spent: Counter[str] = Counter()
    for frames, n in samples_of(path):
        spent[layer_of(frames[-1])] += n
    result = {layer: spent[layer] * per_sample for layer, _ in LAYERS}
    result["other"] = spent["other"] * per_sample
    result["all"] = sum(spent.values()) * per_sample
    return result


def top_functions(path: Path, count: int) -> list[tuple[float, str]]:
    """The functions with the most samples at the top of the stack (share of all samples)."""
    own: Counter[str] = Counter()
    total = 0
    for frames, n in samples_of(path):
        own[frames[-1]] += n
        total += n
    return [(n / total, frame) for frame, n in own.most_common(count)] if total else []


def python_table(out: Path, size: int, rate: int, puts: int, single_puts: int) -> list[str]:
    """The report's lines of Python per put by layer, each role and the single server."""
    missing = [role for role in (*ROLES, "single") if not (out / f"{size}-{role}.txt").exists()]
    if missing:
        # (py-spy could not attach: it needs ptrace rights over the servers)
        return [f"  py-spy, {size} B: no samples of {', '.join(missing)}"]
    columns = {role: python_per_put(out / f"{size}-{role}.txt", rate, puts) for role in ROLES}
    columns["chain"] = {layer: sum(c[layer] for c in columns.values())
                        for layer in columns["head"]}
    columns["single"] = python_per_put(out / f"{size}-single.txt", rate, single_puts)
    lines = [f"  py-spy, {size} B: us of Python per put (samples holding the GIL), by layer",
             "    layer      " + "".join(f"{name:>9}" for name in columns)]
    for layer in columns["head"]:
        lines.append(f"    {layer:<10} " + "".join(f"{c[layer]:>9.1f}" for c in columns.values()))
    return lines


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
            s_spies = (sample({"single": single.pids[0]}, args.seconds, args.py_spy,
                              f"{size}", args.rate) if args.py_spy else [])
            s_before = activity(single.pids[0])
            s_start = time.monotonic()
            s_done = await put_loop(reactor, single, single_conn, keys, value, args.inflight,
                                    args.seconds)
            s_elapsed = time.monotonic() - s_start
            s_spent = activity(single.pids[0]) - s_before
            for spy in s_spies:
                spy.wait()
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
            sections = sum(sent_after[n][3] - sent_before[n][3] for n in sent_after)
            lines.append(f"         {boxes / max(done, 1):.2f} server boxes per put, "
                         f"{sections / max(boxes, 1):.2f} sections per box")
            lines.append(f"         {writes / max(batches, 1):.1f} writes per batch "
                         f"({batches} batches)")
            if args.py_spy:
                lines.extend(python_table(args.py_spy, size, args.rate, done, s_done))
                for role in ROLES:
                    if not (args.py_spy / f"{size}-{role}.txt").exists():
                        continue
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
                        help="sample every server (the single one too) with py-spy, keep its "
                             "stacks in DIR")
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
