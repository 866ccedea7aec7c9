"""The ECS's C{Status} answer: a JSON-ready picture of the cluster, built from its state alone."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ecs.chains import ChainReports
from ecs.reconfiguration import Operation
from ecs.state import ClusterState


def status_report(state: ClusterState, connected: Collection[str],
                  last_seen: Mapping[str, float], operation: Operation | None, serving: bool,
                  now: float, reports: ChainReports | None = None) -> dict[str, Any]:
    """The epoch, whether the service is C{serving}, the ring (and its dead members), every
    member (address, whether it is C{connected}, seconds since C{last_seen}, its range and
    position on the ring) and the reconfiguration C{operation} in progress, if any, as of C{now};
    with the servers' heartbeat C{reports}, each member's metrics URL and each range's chain
    with its lag and window (L{ecs.chains}).
    """
    reports = reports or ChainReports()
    ring = state.ring()
    ranges = {n.name: ring.range_of(i) for i, n in enumerate(ring.nodes)}
    members = []
    for m in sorted(state.members.values(), key=lambda m: m.name):
        entry: dict[str, Any] = {
            "name": m.name, "status": m.status, "origin": m.origin,
            "console": f"{m.host}:{m.console_port}", "amp": f"{m.host}:{m.amp_port}",
            "connected": m.name in connected,
        }
        if m.name in last_seen:
            entry["last_heartbeat_s"] = round(now - last_seen[m.name], 2)
        if m.name in ranges:
            entry["range"] = [f"{ranges[m.name].start:032X}", f"{ranges[m.name].end:032X}"]
            entry["position"] = f"{ranges[m.name].end:032X}"
        if reports.metrics_url(m.name):
            entry["metrics"] = reports.metrics_url(m.name)
        members.append(entry)
    return {
        "epoch": state.epoch,
        "serving": serving,
        "replication": state.replication,
        "degraded": bool(state.ring_members) and len(state.live_members) < state.replication,
        "ring": [n.name for n in ring.nodes],
        "dead": sorted(ring.dead),
        "members": members,
        "chains": reports.chains(ring),
        "operation": None if operation is None else {
            "description": operation.description, "step": operation.step,
            "keys_moved": operation.keys + sum(k for k, _ in operation.copies.values()),
            "bytes_moved": operation.bytes + sum(b for _, b in operation.copies.values()),
            "seconds": round(now - operation.started, 2),
        },
    }
