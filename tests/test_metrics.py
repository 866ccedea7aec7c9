"""Metrics, deterministically: real KVNodes over a simulated network and a Clock, scraped
through the real /metrics resource and parsed with prometheus_client's own parser; the ECS's
status JSON and metrics from the in-memory cluster of test_ecs_coordinator."""

from __future__ import annotations

import json
import warnings
import ssl
import threading
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, eventsFromJSONLogFile
from twisted.web.test.requesthelper import DummyRequest

from chainstore import tls
from chainstore.config import ConfigError, ServerConfig, build_config
from chainstore.control import NotLeader
from chainstore.errors import NotResponsible, ServerStopped
from chainstore.logs import JSONLog
from chainstore.metrics import heartbeat_report, server_registry
from chainstore.node import STOPPED
from chainstore.web import MetricsResource, WebListener, metrics_root
from ecs.chains import ChainReports
from ecs.server import ECSProtocol
from ecs.shell_format import format_status
from ecs.leadership import Fixed
from ecs.web import LeaderMetrics, StatusJSON
from simnet import SimNet
from test_chain import keys_headed_by, put
from test_ecs_coordinator import Cluster


@pytest.fixture
def net(tmp_path):
    net = SimNet(tmp_path)
    yield net
    net.close()


def scrape(node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of C{node}'s /metrics, as rendered for Prometheus and parsed back."""
    registry = node.metrics.registry
    if not getattr(node, "_collected", False):
        server_registry(node, lambda: [])
        node._collected = True
    request = DummyRequest([b"metrics"])
    body = MetricsResource(registry).render_GET(request)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode("utf-8"))
            for s in family.samples}


def sample(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_put_moves_the_put_counter_and_histogram(net):
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n0", 1)[0]
    head = net.nodes["n0"]
    before = scrape(head)
    assert sample(before, "chainstore_requests_total", command="put", result="ok") == 0
    assert sample(before, "chainstore_request_seconds_count", command="put", role="head") == 0
    started = net.clock.seconds()
    answered: list[float] = []
    # The middle is away for half a second, so the write takes at least that long.
    middle_name = ring.chain(key)[1].name
    net.down.add(middle_name)
    d = put(net, ring, key, b"v")
    d.addCallback(lambda updated: answered.append(net.clock.seconds()) or updated)
    net.run(0.5)
    net.down.discard(middle_name)
    assert net.settle(d) is False
    took = answered[0] - started
    after = scrape(head)
    assert sample(after, "chainstore_requests_total", command="put", result="ok") == 1
    assert sample(after, "chainstore_request_seconds_count", command="put", role="head") == 1
    # The head's latency runs until the tail has the write: the simulated time it took.
    assert sample(after, "chainstore_request_seconds_sum", command="put", role="head") == \
        pytest.approx(took)
    assert took >= 0.5
    assert sample(after, "chainstore_request_seconds_bucket", command="put", role="head",
                  le="0.25") == 0
    assert sample(after, "chainstore_request_seconds_bucket", command="put", role="head",
                  le="+Inf") == 1
    # The middle and the tail each timed the batch that carried it.
    middle, tail = (net.nodes[n.name] for n in ring.chain(key)[1:])
    assert sample(scrape(middle), "chainstore_request_seconds_count", command="put",
                  role="middle") == 1
    assert sample(scrape(tail), "chainstore_request_seconds_count", command="put",
                  role="tail") == 1
    # stats (console, kvclient) shows the same counters
    assert head.stats()["requests"] == {"put_ok": 1}
    assert head.stats()["latency_ms"]["put_head"]["count"] == 1


def test_refusals_are_counted_by_reason_and_shown_by_stats(net):
    ring = net.cluster(3)
    key = keys_headed_by(ring, "n0", 1)[0]
    not_head = net.nodes[ring.chain(key)[1].name]
    with pytest.raises(NotResponsible):
        not_head.put(key, b"v")
    stopped = net.nodes["n0"]
    stopped.state = STOPPED
    with pytest.raises(ServerStopped):
        stopped.get(key)
    samples = scrape(not_head)
    assert sample(samples, "chainstore_requests_total", command="put",
                  result="not_responsible") == 1
    assert sample(samples, "chainstore_refused_total", reason="not_responsible") == 1
    assert sample(samples, "chainstore_refused_total", reason="stopped") == 0
    assert sample(scrape(stopped), "chainstore_refused_total", reason="stopped") == 1
    assert stopped.stats()["refused"] == {"stopped": 1}
    assert stopped.stats()["requests"] == {"get_stopped": 1}


def test_lag_rises_while_a_successor_is_paused_and_falls_back(net):
    ring = net.cluster(3)
    keys = keys_headed_by(ring, "n0", 5)
    head = net.nodes["n0"]
    middle = ring.chain(keys[0])[1].name
    for key in keys[:2]:
        net.settle(put(net, ring, key, b"before"))

    def lag() -> tuple[float, float]:
        samples = scrape(head)
        labels = {"owner": "n0", "store": "coordinator", "role": "head"}
        return (sample(samples, "chainstore_chain_lag_writes", **labels),
                sample(samples, "chainstore_chain_window_batches", **labels))

    assert lag() == (0, 0)
    net.down.add(middle)  # paused: it neither reads nor answers
    waiting = [put(net, ring, key, b"during") for key in keys]
    net.run(0.5)
    assert not any(d.called for d in waiting)
    assert lag() == (5, 1)
    # What the head tells the ECS with its heartbeat answer, and the ECS's view of the chain.
    report = heartbeat_report(head)
    assert {"owner": "n0", "role": "head", "lag": 5, "window": 1}.items() <= \
        next(c for c in report["chains"] if c["owner"] == "n0").items()
    reports = ChainReports()
    reports.heard("n0", json.dumps(report))
    chain = next(c for c in reports.chains(ring) if c["owner"] == "n0")
    names = [n.name for n in ring.chain(keys[0])]
    assert (chain["head"], chain["middle"], chain["tail"]) == (names[0], names[1:2], names[2])
    assert (chain["lag"], chain["window"]) == (5, 1)

    net.down.discard(middle)
    net.run(2.0)
    assert all(d.called for d in waiting)
    assert lag() == (0, 0)


def test_a_metrics_url_is_reported_and_a_bad_report_is_ignored():
    reports = ChainReports()
    reports.heard("s1", json.dumps({"metrics": "http://127.0.0.1:52001/metrics",
                                    "chains": []}))
    reports.heard("s2", "not json")
    reports.heard("s3", None)
    assert reports.metrics_url("s1") == "http://127.0.0.1:52001/metrics"
    assert reports.metrics_url("s2") is None and reports.metrics_url("s3") is None


# -- the ECS -------------------------------------------------------------------------------------

@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, replication=3)
    c.start()
    yield c
    c.close()


def test_the_pages_json_is_status_json_with_chains_lag_and_window(cluster):
    keys = [b"key%03d" % i for i in range(30)]
    cluster.put_all(keys)
    cluster.pass_time(1.0)  # heartbeats carry the servers' reports
    request = DummyRequest([b"status.json"])
    page = StatusJSON(Fixed(cluster.ecs)).render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    # the same bytes as ecsclient status --json gets from the Status command
    assert page.decode("utf-8") == ECSProtocol(cluster.ecs).status()["status"]
    status = json.loads(page)
    ring = cluster.ring()
    assert [c["owner"] for c in status["chains"]] == [n.name for n in ring.nodes]
    for chain, node in zip(status["chains"], ring.nodes):
        live = [n.name for n in ring.chain_for_index(ring.nodes.index(node))]
        assert [chain["head"], *chain["middle"], chain["tail"]] == live
        assert chain["lag"] == 0 and chain["window"] == 0
    assert len({m["name"] for m in status["members"] if m["status"] == "active"}) == 3
    # ecsclient status shows the chains with their lag and window
    text = format_status(status)
    assert "CHAIN (RANGE OF)  HEAD" in text and text.splitlines()[-4].endswith("LAG  WINDOW")


def test_the_ecs_metrics(cluster):
    cluster.pass_time(1.0)
    body = MetricsResource(cluster.ecs.metrics.registry).render_GET(DummyRequest([b""]))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert sample(samples, "chainstore_ecs_members", state="active") == 3
    assert sample(samples, "chainstore_ecs_epoch") == cluster.ecs.state.epoch
    assert sample(samples, "chainstore_ecs_reconfigurations_total", kind="join",
                  result="ok") == 1
    assert sample(samples, "chainstore_ecs_reconfiguration_seconds_count", kind="join") == 1
    assert {labels for name, labels in samples
            if name == "chainstore_ecs_heartbeat_rtt_seconds"} == \
        {(("server", s),) for s in cluster.ecs.state.ring_members}
    assert {dict(labels)["owner"] for name, labels in samples
            if name == "chainstore_ecs_chain_lag_writes"} == set(cluster.ecs.state.ring_members)
    cluster.hung.add("s1")
    cluster.pass_time(5.0)  # past the failure timeout (3 s)
    body = MetricsResource(cluster.ecs.metrics.registry).render_GET(DummyRequest([b""]))
    failures = [s.value for f in text_string_to_metric_families(body.decode())
                for s in f.samples if s.name == "chainstore_ecs_failures_detected_total"]
    assert failures == [1]


# -- configuration, access, logs -----------------------------------------------------------------

def test_the_metrics_port_is_the_console_port_plus_2000_on_loopback_by_default():
    config = ServerConfig(console="tcp:50003:interface=127.0.0.1", tls="off").validated()
    assert config.metrics_endpoint == "tcp:52003:interface=127.0.0.1"
    given = build_config({"metrics": "tcp:9100:interface=127.0.0.1"}, {"tls": "off"})
    assert given.metrics_endpoint == "tcp:9100:interface=127.0.0.1"
    with pytest.raises(ConfigError, match="not on loopback.*needs tls on"):
        build_config({"metrics": "tcp:9100:interface=0.0.0.0"}, {"tls": "off"})
    with pytest.raises(ConfigError, match="give a tcp: endpoint"):
        build_config({"metrics": "unix:/tmp/m"}, {"tls": "off"})


def _get(url: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest_twisted.inlineCallbacks
def test_beyond_loopback_metrics_are_https_for_admin_certificates_only(reactor, pki_dir, net):
    net.cluster(1, replication=1)
    node = net.nodes["n0"]
    credentials = tls.load(tls.TLSFiles.in_dir(str(pki_dir), "server1"))
    listener = WebListener(reactor, "tcp:0:interface=0.0.0.0",
                           metrics_root(server_registry(node, lambda: [])), credentials)
    listener.startService()
    try:
        while listener.port is None:
            yield deferToThread(threading.Event().wait, 0.05)
        url = listener.url("127.0.0.1")
        assert url is not None and url.startswith("https://127.0.0.1:")

        def context(holder: str | None) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
            if holder is not None:
                ctx.load_cert_chain(str(pki_dir / f"{holder}.crt"), str(pki_dir / f"{holder}.key"))
            return ctx

        status, body = yield deferToThread(_get, url, context("admin"))
        assert status == 200 and b"chainstore_requests_total" in body
        status, body = yield deferToThread(_get, url, context("client"))
        assert status == 403 and b"needs an admin certificate" in body
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            yield deferToThread(_get, url, context(None))
        # plain HTTP gets no answer from the TLS port
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            yield deferToThread(_get, url.replace("https:", "http:"), context("admin"))
    finally:
        yield listener.stopService()


def test_json_log_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    service = JSONLog(str(path))
    service.startService()
    Logger(namespace="chainstore.test").info("put {key} took {ms} ms", key="k1", ms=3)
    service.stopService()
    Logger(namespace="chainstore.test").info("after the stop")
    with open(path, encoding="utf-8") as f:
        events = [e for e in eventsFromJSONLogFile(f)
                  if e.get("log_namespace") == "chainstore.test"]
    assert [(e["log_format"], e["key"], e["ms"]) for e in events] == \
        [("put {key} took {ms} ms", "k1", 3)]


def test_a_standby_ecs_answers_503_naming_the_leader():
    class Standby:
        def current(self):
            raise NotLeader("not the leader; the leader is 127.0.0.1:49999")

        def ha_status(self):
            return {}

    for resource in (StatusJSON(Standby()), LeaderMetrics(Standby())):
        request = DummyRequest([b""])
        body = resource.render_GET(request)
        assert request.responseCode == 503
        assert body == b"not the leader; the leader is 127.0.0.1:49999\n"


def _accept(factory, host, port):
    """A connection accepted by C{factory} from C{host:port}: (protocol, transport)."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    address = IPv4Address("TCP", host, port)
    proto = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport


def test_a_web_listener_holds_a_bounded_number_of_connections_and_drops_idle_ones():
    # Every port is reachable by strangers: idle connections to a metrics or status port must
    # not pile up in the process that serves the data (each is a file descriptor).
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone
    from chainstore import web
    clock = Clock()
    from prometheus_client.registry import CollectorRegistry
    listener = WebListener(clock, "tcp:0:interface=127.0.0.1",
                           metrics_root(CollectorRegistry()), None, "metrics")
    factory = listener.factory
    held = [_accept(factory, "10.0.0.1", 1000 + i) for i in range(web.MAX_WEB_PER_HOST)]
    assert not any(t.disconnecting for _, t in held)
    _, refused = _accept(factory, "10.0.0.1", 2000)
    assert refused.disconnecting  # one address cannot take more than its share
    others = [_accept(factory, f"10.0.1.{i}", 1000) for i in
              range(web.MAX_WEB_CONNECTIONS - web.MAX_WEB_PER_HOST)]
    assert not any(t.disconnecting for _, t in others)
    _, full = _accept(factory, "10.0.2.1", 1000)
    assert full.disconnecting  # nor everyone together more than the listener's
    # A closed connection gives its slot back.
    proto, transport = held[0]
    proto.connectionLost(Failure(ConnectionDone()))
    _, again = _accept(factory, "10.0.0.1", 3000)
    assert not again.disconnecting
    # Silent connections are closed after the idle timeout, giving every slot back.
    clock.advance(web.WEB_IDLE_SECONDS)
    assert all(t.disconnecting for _, t in held[1:] + others)


def test_the_page_serves_its_three_files_with_its_policy_and_nothing_else():
    from twisted.web.resource import getChildForRequest

    from ecs.web import CSP, status_root

    def get(*path: bytes) -> tuple[int, bytes, DummyRequest]:
        request = DummyRequest(list(path))
        resource = getChildForRequest(status_root(None), request)
        body = resource.render(request)
        return request.responseCode or 200, body, request

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (twisted.web.static's import warned, deprecated)
        for path, kind in (((b"",), b"text/html"), ((b"static", b"status.js"), b"text/javascript"),
                           ((b"static", b"status.css"), b"text/css")):
            code, body, request = get(*path)
            assert code == 200 and body
            headers = request.responseHeaders
            assert headers.getRawHeaders(b"content-type")[0].startswith(kind)
            assert headers.getRawHeaders(b"content-security-policy") == [CSP]
        for path in ((b"static", b""), (b"static", b"index.html"), (b"static", b".."),
                     (b"nothing",), (b"static", b"status.js", b"more")):
            assert get(*path)[0] == 404, path
