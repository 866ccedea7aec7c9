"""What the servers last reported with their heartbeat answers, and the per-chain view built
from it for C{status}: each range's head, middles and tail, its replication lag and window.

A server answers each heartbeat with a report (L{chainstore.metrics.heartbeat_report}): its
metrics URL and, for every chain it is in, its role, serial, lag (writes applied there and
not yet acknowledged by the tail) and window. A chain's lag and window are its head's: the head
holds every write the chain has not yet acknowledged. A report is at most a heartbeat interval
old; a server that stopped answering keeps its last one until it is marked dead.
"""

from __future__ import annotations

import json
from typing import Any

from chainstore.logs import get_logger
from chainstore.ring import Ring

log = get_logger("ecs.chains")


class ChainReports:
    """The latest report of each server, by name."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}

    def heard(self, name: str, raw: str | None) -> None:
        """A heartbeat answer from C{name} carried C{raw} (None from an older server)."""
        if raw is None:
            return
        try:
            report = json.loads(raw)
        except ValueError:
            log.warn("{name} sent a heartbeat report that is not JSON", name=name)
            return
        if isinstance(report, dict):
            self.reports[name] = report

    def forget(self, name: str) -> None:
        self.reports.pop(name, None)

    def metrics_url(self, name: str) -> str | None:
        url = self.reports.get(name, {}).get("metrics")
        return url if isinstance(url, str) else None

    def _entry(self, server: str, owner: str) -> dict[str, Any] | None:
        for entry in self.reports.get(server, {}).get("chains", ()):
            if isinstance(entry, dict) and entry.get("owner") == owner:
                return entry
        return None

    def chains(self, ring: Ring) -> list[dict[str, Any]]:
        """One entry per range of C{ring}, in ring order: its bounds, owner, live chain (head,
        middles, tail), and the head's lag, window (batches), queued writes and bytes (None
        when the head has not reported that chain yet)."""
        out = []
        for index, node in enumerate(ring.nodes):
            chain = [n.name for n in ring.chain_for_index(index)]
            rng = ring.range_of(index)
            entry: dict[str, Any] = {
                "owner": node.name,
                "range": [f"{rng.start:032X}", f"{rng.end:032X}"],
                "head": chain[0] if chain else None,
                "middle": chain[1:-1],
                "tail": chain[-1] if chain else None,
                "lag": None, "window": None, "queued": None, "queued_bytes": None,
            }
            head = self._entry(chain[0], node.name) if chain else None
            if head is not None:
                for key in ("lag", "window", "queued", "queued_bytes"):
                    value = head.get(key)
                    entry[key] = value if isinstance(value, int) else None
            out.append(entry)
        return out
