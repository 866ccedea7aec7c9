"""How long the cluster is without a working ECS when the leader dies (several ECS over etcd).

Each run starts a fresh cluster on loopback (three etcd members, three ECS with the default
lease, heartbeat and failure timeout, four servers of replication 3; L{harness.ha.HACluster}),
then SIGKILLs the leader ECS and, right after it, a server of the ring, and measures from the
first SIGKILL:

- ``admin``: until an ECS answers C{Status} as the new leader (the first admin command served);
- ``dead``: until that leader has marked the killed server dead (its chains skip it from then on:
  the first step of the repair);
- ``repaired``: until the killed server is out of the ring and no reconfiguration runs (the
  chains are whole again).

Status is polled every 20 ms on every live ECS over a fresh TLS connection each time.

    .venv/bin/python -m bench.failover --runs 5
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from typing import Any

from harness.ha import HACluster
from harness.processes import ECSError

POLL = 0.02


def one_run(workdir: str, lease_ttl: int) -> dict[str, float]:
    cluster = HACluster(workdir, ecs_count=3, etcd_members=3, lease_ttl=lease_ttl, slots=6,
                        initial_nodes=4, replication=3, heartbeat_interval=1.0,
                        failure_timeout=3.0, register_timeout=20)
    try:
        cluster.start()
        leader, status = cluster.wait_leader(ring_size=4, timeout=90)
        victim = status["ring"][0]
        pid = cluster.ecs[cluster.ecs.index(leader)].server_pids()[victim][-1]
        start = time.monotonic()
        leader.kill()
        os.kill(pid, signal.SIGKILL)
        times: dict[str, float] = {}
        deadline = start + 120
        while "repaired" not in times and time.monotonic() < deadline:
            for ecs in cluster.ecs:
                if not ecs.running:
                    continue
                try:
                    now = ecs.status(timeout=1.0)
                except (ECSError, OSError):
                    continue
                at = time.monotonic() - start
                times.setdefault("admin", at)
                if victim in now["dead"] or victim not in now["ring"]:
                    times.setdefault("dead", at)
                if victim not in now["ring"] and now["operation"] is None:
                    times.setdefault("repaired", at)
                break
            time.sleep(POLL)
        if "repaired" not in times:
            raise RuntimeError(f"not repaired within 120 s: {times}")
        return times
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lease-ttl", type=int, default=2)
    args = parser.parse_args(argv)
    results: list[dict[str, float]] = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="chainstore-failover-") as workdir:
            times = one_run(workdir, args.lease_ttl)
        results.append(times)
        print(f"run {run + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()),
              flush=True)
    summary: dict[str, Any] = {}
    for key in ("admin", "dead", "repaired"):
        values = [r[key] for r in results]
        summary[key] = (min(values), statistics.median(values), max(values))
        print(f"{key:9} min {summary[key][0]:.2f}s  median {summary[key][1]:.2f}s  "
              f"max {summary[key][2]:.2f}s  ({len(values)} runs, lease {args.lease_ttl}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
