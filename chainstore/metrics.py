"""A KVServer's Prometheus metrics (``prometheus_client``), served by L{chainstore.web}.

Two kinds, chosen for the cost on the write path:

- per request, a latency histogram by command and role in plain Python (a bisect and a list
  increment; a success is counted there only, a failure in a dictionary), where
  prometheus_client's locked Histogram.observe alone costs about 2 us; they are turned into
  Prometheus families only when scraped. A put through KVNode costs about 1.8 us more with
  the hooks than without (15 us of the node's own work, docs/DESIGN.md);
- everything else (replication lag and window per chain, batches, cache, keys and bytes per
  store, leases, backlog) is read from the node only when Prometheus scrapes, by
  L{_NodeCollector}, so it costs nothing between scrapes.

The same counters appear in C{stats} (console and kvclient) through L{RequestMetrics.stats}.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter as CountDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from twisted.python.failure import Failure

from chainstore.errors import (
    InvalidKey,
    InvalidRequestId,
    KeyNotFound,
    NotResponsible,
    ServerStopped,
    StorageFailed,
    ValueTooLarge,
    WriteLocked,
)

COMMANDS = ("put", "get", "delete")
ROLES = ("head", "middle", "tail")
#: what a request's outcome is called, by the exception that ended it (anything else: error)
RESULTS: dict[type[BaseException], str] = {
    KeyNotFound: "not_found",
    ServerStopped: "stopped",
    StorageFailed: "error",
    WriteLocked: "write_lock",
    NotResponsible: "not_responsible",
    InvalidKey: "invalid",
    ValueTooLarge: "invalid",
    InvalidRequestId: "invalid",
}
#: results that are refusals (the client should go elsewhere or later), and "overloaded":
#: connections closed at once because the listener was at its connection limit
REFUSALS = ("stopped", "write_lock", "not_responsible", "overloaded")
# From 0.1 ms (a cached get) to 10 s (the replication timeout).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """Counts of observations per bucket (upper bounds C{LATENCY_BUCKETS}, then +Inf) and
    their sum: what a Prometheus histogram holds, without its lock (only the reactor thread
    observes and scrapes)."""

    __slots__ = ("counts", "sum", "clock")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.clock = clock

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bucket whose bound is >= seconds (Prometheus's "le")
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def passed(self, result: Any, started: float) -> Any:
        """A callback: the request that began at C{started} (by C{clock}) succeeded now.
        Passes C{result} on. The one call a successful request costs."""
        seconds = self.clock() - started
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        return result

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative counts by upper bound, as HistogramMetricFamily takes them."""
        out, total = [], 0
        for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out


class _Untimed(LatencyHistogram):
    """Times nothing: metrics off."""

    __slots__ = ()

    def passed(self, result: Any, started: float) -> Any:
        return result


class RequestMetrics:
    """The per-request counters and histograms of one server, and its registry (a process
    may hold several servers in tests; the default registry would mix them)."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.clock = monotonic
        self.registry = CollectorRegistry(auto_describe=True)
        #: (command, result) -> requests
        self.results: CountDict[tuple[str, str]] = CountDict()
        #: reason -> requests refused (connections refused at the limit are read from the
        #: listeners at scrape time)
        self.refusals: CountDict[str] = CountDict()
        #: where this server's /metrics is served (set by the service), for the ECS's status
        self.url: Callable[[], str | None] = lambda: None
        self.copies = 0
        self.copied_keys = 0
        self.copied_bytes = 0
        #: (command, role) -> latency histogram; a client request's success is counted only
        #: there (requests with result ok: see L{ok_counts}), to cost one call
        self.latency = {(c, r): LatencyHistogram(monotonic) for c in COMMANDS for r in ROLES}
        #: the histograms a node's requests go to (batches applied: put at middle and tail)
        self.put_timer = self.latency["put", "head"]
        self.delete_timer = self.latency["delete", "head"]
        self.get_timers = {r: self.latency["get", r] for r in ROLES}

    def ok_counts(self) -> dict[str, int]:
        """Client requests answered successfully, by command: puts and deletes at the head,
        gets at any member (the middle's and tail's put histograms time batches applied)."""
        return {"put": self.put_timer.count, "delete": self.delete_timer.count,
                "get": sum(t.count for t in self.get_timers.values())}

    def request_failed(self, failure: Failure, command: str) -> Failure:
        """An errback: count the request's outcome by its error, pass the failure on."""
        self.failed(command, failure.value)
        return failure

    def failed(self, command: str, error: BaseException) -> None:
        result = RESULTS.get(type(error), "error")
        self.results[command, result] += 1
        if result in REFUSALS:
            self.refusals[result] += 1

    def batch_applied(self, role: str, started: float) -> None:
        """A batch of writes received as middle or tail was applied (since C{started})."""
        self.latency["put", role].observe(self.clock() - started)

    def all_results(self) -> dict[tuple[str, str], int]:
        """(command, result) -> requests, ok included."""
        results = dict(self.results)
        for command, n in self.ok_counts().items():
            if n:
                results[command, "ok"] = n
        return results

    def copy_started(self) -> None:
        self.copies += 1

    def copy_ended(self, keys: int, nbytes: int) -> None:
        self.copies -= 1
        self.copied_keys += keys
        self.copied_bytes += nbytes

    def stats(self) -> dict[str, Any]:
        """The counters as C{stats} shows them: requests by command and result, refusals by
        reason, and per command and role the count and mean latency in milliseconds."""
        out: dict[str, Any] = {
            "requests": {f"{c}_{r}": n for (c, r), n in sorted(self.all_results().items())},
            "refused": dict(sorted(self.refusals.items())),
            "copies_in_progress": self.copies,
            "copied_keys": self.copied_keys,
            "copied_bytes": self.copied_bytes,
        }
        latency = {}
        for (command, role), histogram in self.latency.items():
            count = histogram.count
            if count:
                latency[f"{command}_{role}"] = {
                    "count": count, "mean": round(histogram.sum / count * 1000, 3)}
        out["latency_ms"] = latency
        return out


class NoMetrics(RequestMetrics):
    """A server with metrics off (``--metrics off``): requests are neither counted nor timed
    (what remains on the hot path is one call that returns at once), and C{stats} shows no
    counters. It is what the benchmark's ``chain-nometrics`` measures the metrics against."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        super().__init__(monotonic)
        untimed = _Untimed(monotonic)
        self.put_timer = self.delete_timer = untimed
        self.get_timers = {r: untimed for r in ROLES}

    def failed(self, command: str, error: BaseException) -> None:
        pass

    def batch_applied(self, role: str, started: float) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


class _NodeCollector(Collector):
    """What a scrape reads from the node: chains, cache, stores, backlog, connections."""

    def __init__(self, node: Any, factories: Callable[[], list[Any]]) -> None:
        self.node = node
        self.factories = factories

    def collect(self) -> Iterator[Any]:
        node = self.node
        chain = node.chain
        labels = ["owner", "store", "role"]
        lag = GaugeMetricFamily(
            "chainstore_chain_lag_writes",
            "Writes applied here and not yet acknowledged by the chain's tail (at the head: "
            "the chain's replication lag)", labels=labels)
        window = GaugeMetricFamily("chainstore_chain_window_batches",
                                   "Batches sent to the successor and not yet acknowledged",
                                   labels=labels)
        queued = GaugeMetricFamily("chainstore_chain_queued_writes",
                                   "Writes pending or in the window, not yet acknowledged",
                                   labels=labels)
        queued_bytes = GaugeMetricFamily("chainstore_chain_queued_bytes",
                                         "Bytes of the queued writes", labels=labels)
        serial = GaugeMetricFamily("chainstore_chain_serial",
                                   "The serial of the last write applied here", labels=labels)
        batches = CounterMetricFamily("chainstore_chain_batches_sent",
                                      "Batches of writes sent to the successor", labels=labels)
        writes = CounterMetricFamily("chainstore_chain_writes_sent",
                                     "Writes sent to the successor (per batch: divide by "
                                     "batches)", labels=labels)
        lease = GaugeMetricFamily("chainstore_chain_lease_valid",
                                  "1 if this tail holds a read lease now (0 for other roles)",
                                  labels=labels)
        for r in list(chain.replicas.values()):
            role = "head" if r.is_head else "tail" if r.is_tail else "middle"
            values = [r.owner, r.store_name, role]
            lag.add_metric(values, max(r.last_serial - r.acked, 0) if not r.is_tail else 0)
            window.add_metric(values, len(r.window))
            queued.add_metric(values, r.queued_ops)
            queued_bytes.add_metric(values, r.queued_bytes)
            serial.add_metric(values, r.last_serial)
            batches.add_metric(values, r.batches_sent)
            writes.add_metric(values, r.ops_sent)
            lease.add_metric(values, 1 if r.is_tail and chain.can_read(r) else 0)
        yield from (lag, window, queued, queued_bytes, serial, batches, writes, lease)
        backlog_ops, backlog_bytes = chain.backlog()
        yield GaugeMetricFamily("chainstore_backlog_writes",
                                "Writes applied here and not yet acknowledged, all chains",
                                value=backlog_ops)
        yield GaugeMetricFamily("chainstore_backlog_bytes", "Bytes of the backlog",
                                value=backlog_bytes)
        yield GaugeMetricFamily("chainstore_backlogged",
                                "1 while client connections are paused by the backlog bound",
                                value=1 if chain.backlogged else 0)
        cache = node.cache
        yield CounterMetricFamily("chainstore_cache_hits", "Reads served by the cache",
                                  value=cache.hits)
        yield CounterMetricFamily("chainstore_cache_misses", "Reads the cache could not serve",
                                  value=cache.misses)
        yield GaugeMetricFamily("chainstore_cache_entries", "Entries in the cache",
                                value=len(cache))
        yield GaugeMetricFamily("chainstore_epoch", "The ring epoch this server has",
                                value=node.ring.epoch)
        yield GaugeMetricFamily("chainstore_serving",
                                "1 while the server serves requests (state running)",
                                value=1 if node.state == "running" else 0)
        m = node.metrics
        latency = HistogramMetricFamily(
            "chainstore_request_seconds",
            "Request latency: put and delete at the head until the tail has the write, get at "
            "the chain member that answered it, and at a middle or tail the time it took to "
            "apply a batch of writes it received (command put)",
            labels=["command", "role"])
        for (command, role), histogram in m.latency.items():
            if histogram.count:
                latency.add_metric([command, role], histogram.buckets(), histogram.sum)
        yield latency
        yield counts_family("chainstore_requests", "Client requests by command and result",
                            ["command", "result"], m.all_results())
        refused = CounterMetricFamily("chainstore_refused",
                                      "Requests refused, by reason; overloaded: connections "
                                      "closed at once at the listener's connection limit",
                                      labels=["reason"])
        overloaded = sum(f.refused_total for f in self.factories())
        for reason in REFUSALS:
            refused.add_metric([reason], overloaded if reason == "overloaded"
                               else m.refusals[reason])
        yield refused
        yield GaugeMetricFamily("chainstore_copies_in_progress",
                                "Range copies this server is streaming to another",
                                value=m.copies)
        yield CounterMetricFamily("chainstore_copied_keys",
                                  "Keys streamed to other servers by range copies",
                                  value=m.copied_keys)
        yield CounterMetricFamily("chainstore_copied_bytes",
                                  "Bytes streamed to other servers by range copies",
                                  value=m.copied_bytes)
        yield from self._stores()
        yield GaugeMetricFamily("chainstore_connections", "Open client and peer connections",
                                value=sum(f.connections for f in self.factories()))

    def _stores(self) -> Iterator[Any]:
        keys = GaugeMetricFamily("chainstore_store_keys", "Keys in each store",
                                 labels=["store"])
        size = GaugeMetricFamily("chainstore_store_bytes",
                                 "Bytes on disk of each store (its file and write-ahead log)",
                                 labels=["store"])
        stores = self.node.stores
        if stores is not None and self.node.failure is None:
            for name, store in stores.stores.items():
                keys.add_metric([name], len(store))
                size.add_metric([name], _file_bytes(store.path))
        yield keys
        yield size


def _file_bytes(path: str) -> int:
    total = 0
    for name in (path, path + "-wal"):
        try:
            total += os.stat(name).st_size
        except OSError:
            pass
    return total


def counts_family(name: str, documentation: str, labels: list[str],
                  counts: Mapping[tuple[str, ...], int]) -> CounterMetricFamily:
    """A counter family of C{counts}, keyed by its label values."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, n in sorted(counts.items()):
        family.add_metric(list(values), n)
    return family


def heartbeat_report(node: Any) -> dict[str, Any]:
    """What a server tells the ECS with each heartbeat answer, for its status page and
    C{ecsclient status}: its metrics URL and, per chain it is in, its role, serial, lag and
    window (see L{ecs.chains})."""
    chains = []
    for r in list(node.chain.replicas.values()):
        chains.append({
            "owner": r.owner, "store": r.store_name,
            "role": "head" if r.is_head else "tail" if r.is_tail else "middle",
            "serial": r.last_serial, "acked": r.acked,
            "lag": 0 if r.is_tail else max(r.last_serial - r.acked, 0),
            "window": len(r.window), "queued": r.queued_ops, "queued_bytes": r.queued_bytes,
        })
    # Locks of a dropped ECS link wait for the ring over this one (chainstore.ecs_link); if
    # the ECS's ring at registration did not get here, this tells it to send it again.
    return {"metrics": node.metrics.url(), "chains": chains,
            "orphaned_locks": len(node.orphaned_locks)}


def server_registry(node: Any, factories: Callable[[], list[Any]]) -> CollectorRegistry:
    """The registry a server's C{/metrics} serves: C{node.metrics} and what it reads from the
    node at scrape time."""
    registry: CollectorRegistry = node.metrics.registry
    registry.register(_NodeCollector(node, factories))
    return registry


__all__ = ["counts_family", "NoMetrics", "RequestMetrics", "heartbeat_report", "server_registry", "RESULTS", "REFUSALS"]
