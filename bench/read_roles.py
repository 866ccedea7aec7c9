"""``python -m bench.read_roles``: the CPU a get costs one server as head, middle and tail.

With reads at any member (chainstore/craq.py) a head or a middle answers a get of a clean key
from its own store, after checking its read lease and that the key has no write in flight; a
tail checks its lease only. Here a chain of three (``ChainSystem``, mutual TLS, as ``python -m
bench`` runs it) is loaded with keys of the three ranges one server is in, few enough that its
cache holds them all, and that server alone receives gets: of the keys it heads, follows and
ends, in turn, in short rounds (so a machine that slows down slows every role alike), at each
number of gets in flight asked for. Its CPU time per get (``/proc``) in each role is the cost
of the role's read path with everything around it (AMP, TLS, the reactor); the numbers in
flight show how much of a get's cost is shared by the gets that arrive together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.driver import log, print_report
from bench.loadgen import ClosedLoop
from bench.roles import ROLES, range_keys
from bench.systems import ChainSystem, kv_request, process_cpu_seconds
from chainstore import protocol


def role_ranges(ring: Any, index: int) -> dict[str, int]:
    """The ranges (by owner index) whose head, middle and tail ring node C{index} is."""
    n = len(ring)
    ranges = {role: (index - place) % n for place, role in enumerate(ROLES)}
    for place, role in enumerate(ROLES):
        if ring.chain_for_index(ranges[role])[place:place + 1] != (ring.nodes[index],):
            raise ValueError(f"{ring.nodes[index].name} is not the {role} of range "
                             f"{ranges[role]} (dead members, or fewer than three servers)")
    return ranges


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


async def measure(reactor: Any, args: argparse.Namespace, workdir: Path) -> list[str]:
    chain = ChainSystem(workdir)
    try:
        chain.start()
        router = (await chain.connect(reactor, 1))[0]
        ring = router.ring
        server = ring.nodes[0]
        pid = chain.ecs.server_pids()[server.name][-1]
        conn = router.conns[server.name]
        keys = {role: range_keys(ring, index, args.records)
                for role, index in role_ranges(ring, 0).items()}
        value = b"v" * args.value
        for role_keys in keys.values():
            await ClosedLoop(lambda i, ks=role_keys: chain.request("put", router, ks[i], value),
                             len(role_keys), 32, 60.0).run()
        cpu: dict[tuple[str, int], list[float]] = {}
        for round_ in range(args.rounds + 1):
            for inflight in args.inflight:
                for role in ROLES:
                    ks = keys[role]
                    before = process_cpu_seconds(pid) or 0.0
                    result = await ClosedLoop(
                        lambda i, ks=ks: kv_request("chain", "get", conn, ks[i % len(ks)], b""),
                        args.gets, inflight, 60.0).run()
                    used = (process_cpu_seconds(pid) or 0.0) - before
                    if round_:  # the first round warms the cache and the code paths
                        cpu.setdefault((role, inflight), []).append(
                            used / result.completed * 1e6)
        stats = json.loads((await conn.callRemote(protocol.Stats))["stats"])
        chain.disconnect([router])
    finally:
        chain.stop()
    lines = [f"{server.name}: {args.records} keys per role, {args.gets} gets per round, "
             f"{args.rounds} rounds; cache hits {stats['cache_hits']}, misses "
             f"{stats['cache_misses']}; gets answered locally as head or middle "
             f"{stats['gets_local']}, resolved with the tail {stats['gets_resolved']}",
             "in flight  role    CPU us/get median [min-max]"]
    for inflight in args.inflight:
        for role in ROLES:
            us = cpu[(role, inflight)]
            lines.append(f"{inflight:>9}  {role:<6}  {median(us):>6.1f} "
                         f"[{min(us):.1f}-{max(us):.1f}]")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.read_roles", description=__doc__)
    parser.add_argument("--inflight", type=lambda t: [int(v) for v in t.split(",")],
                        default=[8, 32], help="gets in flight, each in its own rounds [8,32]")
    parser.add_argument("--gets", type=int, default=20_000, help="gets per role and round [20000]")
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds [6]")
    parser.add_argument("--records", type=int, default=300,
                        help="keys per role; the three roles' must fit the cache [300]")
    parser.add_argument("--value", type=int, default=100, help="value size in bytes [100]")
    args = parser.parse_args(argv)
    # After parse_args: --help and a bad option start nothing, and say nothing of starting.
    log("python -m bench.read_roles: starting a chain of three")
    return print_report(lambda reactor, workdir: measure(reactor, args, workdir),
                        "bench-read-roles-")


if __name__ == "__main__":
    sys.exit(main())
