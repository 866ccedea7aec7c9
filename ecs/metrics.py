"""The ECS's Prometheus metrics, served at ``/metrics`` of its status page (L{ecs.web}).

Events (heartbeat round trips, failures detected, reconfigurations and their duration) are
recorded by the coordinator's hooks; everything else (members by state, epoch, the operation
in progress, each chain's lag and window from the servers' reports) is read from the ECS only
when Prometheus scrapes.
"""

from __future__ import annotations

from collections import Counter as CountDict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from chainstore.metrics import counts_family
from ecs.state import ACTIVE, FAILED, IDLE, LAUNCHING, REMOVED

STATES = (LAUNCHING, IDLE, ACTIVE, FAILED, REMOVED)
# A reconfiguration takes from a fraction of a second (an empty ring) to minutes (millions of
# keys moved).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def kind_of(description: str) -> str:
    """A reconfiguration's kind, from the description the coordinator gives it."""
    if description.startswith("repair"):
        return "repair"
    if description.startswith("adding"):
        return "join"
    if description.startswith("removing"):
        return "leave"
    return "other"


class ECSMetrics:
    """The ECS's event counters and its registry; L{collector} adds the state read at scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.durations = Histogram("chainstore_ecs_reconfiguration_seconds",
                                   "Duration of completed reconfigurations, by kind (join, "
                                   "leave, repair)", ["kind"], buckets=DURATION_BUCKETS,
                                   registry=self.registry)
        #: server -> the round trip of its last answered heartbeat, seconds
        self.rtt: dict[str, float] = {}
        self.failures_detected = 0
        #: (kind, result) -> reconfigurations that ended so
        self.reconfigurations: CountDict[tuple[str, str]] = CountDict()

    def heartbeat_answered(self, name: str, sent: float, now: float) -> None:
        self.rtt[name] = now - sent

    def failure_detected(self) -> None:
        self.failures_detected += 1

    def reconfigured(self, description: str, seconds: float, ok: bool) -> None:
        kind = kind_of(description)
        self.reconfigurations[kind, "ok" if ok else "failed"] += 1
        if ok:
            self.durations.labels(kind).observe(seconds)

    def collector(self, ecs: Any) -> None:
        """Serve C{ecs}'s state too (once, when the ECS is made)."""
        self.registry.register(_ECSCollector(ecs, self))


class _ECSCollector(Collector):
    def __init__(self, ecs: Any, metrics: ECSMetrics) -> None:
        self.ecs = ecs
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        ecs, m = self.ecs, self.metrics
        state = ecs.state
        members = GaugeMetricFamily("chainstore_ecs_members", "Members by state",
                                    labels=["state"])
        counts = CountDict(member.status for member in state.members.values())
        for status in STATES:
            members.add_metric([status], counts[status])
        yield members
        yield GaugeMetricFamily("chainstore_ecs_ring_members", "Servers in the ring",
                                value=len(state.ring_members))
        yield GaugeMetricFamily("chainstore_ecs_dead_members",
                                "Ring members marked dead and not yet repaired away",
                                value=len(state.dead & set(state.ring_members)))
        yield GaugeMetricFamily("chainstore_ecs_epoch", "The committed ring epoch",
                                value=state.epoch)
        yield GaugeMetricFamily("chainstore_ecs_serving", "1 while the service is started",
                                value=1 if state.serving else 0)
        now = ecs.clock.seconds()
        rtt = GaugeMetricFamily("chainstore_ecs_heartbeat_rtt_seconds",
                                "Round trip of the last answered heartbeat, per server",
                                labels=["server"])
        for name, seconds in sorted(m.rtt.items()):
            if name in ecs.links:
                rtt.add_metric([name], seconds)
        yield rtt
        age = GaugeMetricFamily("chainstore_ecs_heartbeat_age_seconds",
                                "Seconds since each ring member last answered a heartbeat",
                                labels=["server"])
        for name in state.ring_members:
            if name in ecs.last_seen:
                age.add_metric([name], now - ecs.last_seen[name])
        yield age
        yield CounterMetricFamily("chainstore_ecs_failures_detected",
                                  "Servers declared failed after missing heartbeats",
                                  value=m.failures_detected)
        yield counts_family("chainstore_ecs_reconfigurations",
                            "Reconfigurations ended, by kind and result", ["kind", "result"],
                            m.reconfigurations)
        yield from self._operation(now)
        yield from self._chains()

    def _operation(self, now: float) -> Iterator[Any]:
        op = self.ecs.operation
        yield GaugeMetricFamily("chainstore_ecs_reconfiguration_in_progress",
                                "1 while a reconfiguration runs", value=0 if op is None else 1)
        keys = nbytes = seconds = 0.0
        if op is not None:
            keys = op.keys + sum(k for k, _ in op.copies.values())
            nbytes = op.bytes + sum(b for _, b in op.copies.values())
            seconds = now - op.started
        yield GaugeMetricFamily("chainstore_ecs_reconfiguration_keys_moved",
                                "Keys moved so far by the running reconfiguration", value=keys)
        yield GaugeMetricFamily("chainstore_ecs_reconfiguration_bytes_moved",
                                "Bytes moved so far by the running reconfiguration",
                                value=nbytes)
        yield GaugeMetricFamily("chainstore_ecs_reconfiguration_running_seconds",
                                "How long the running reconfiguration has run", value=seconds)

    def _chains(self) -> Iterator[Any]:
        lag = GaugeMetricFamily("chainstore_ecs_chain_lag_writes",
                                "Per range, as its head last reported: writes applied at the "
                                "head and not yet acknowledged by the tail", labels=["owner"])
        window = GaugeMetricFamily("chainstore_ecs_chain_window_batches",
                                   "Per range, batches its head has in flight", labels=["owner"])
        for chain in self.ecs.reports.chains(self.ecs.state.ring()):
            if chain["lag"] is not None:
                lag.add_metric([chain["owner"]], chain["lag"])
            if chain["window"] is not None:
                window.add_metric([chain["owner"]], chain["window"])
        yield lag
        yield window
