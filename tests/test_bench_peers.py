"""The benchmark's peers: the RESP and HTTP/1.1 clients, the YCSB key choice and mixes, the
Redis and etcd request shapes, the native tool's output, the installer, and one real run of
``python -m bench`` against Redis and etcd.

The protocol tests feed responses through StringTransport cut at every byte, since TCP may
deliver them so.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from bench.http11 import ConnectionPool, HTTP11Client, HTTPProtocolError, Response
from bench.peers import (EtcdSystem, NativeResult, PeerFailed, RedisPool, RedisSystem,
                         ensure_installed, etcd_answer, parse_redis_benchmark_csv,
                         redis_benchmark_argv, redis_get, redis_put)
from bench.report import format_native, summarize
from bench.resp import ProtocolError, RedisClient, RedisError, ReplyParser, encode_command
from bench.runner import NATIVE_REDIS, Case, Measurement
from bench.loadgen import RunResult
from bench.ycsb import WORKLOADS, ZipfianGenerator, draw, record_values, zeta
from benchrun import start_module, stop
from harness.processes import pid_alive



def outcome(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def splits(data: bytes) -> list[list[bytes]]:
    """C{data} cut in two at every byte, and one byte at a time."""
    return [[data[:i], data[i:]] for i in range(1, len(data))] + [
        [data[i:i + 1] for i in range(len(data))]]


# -- RESP ---------------------------------------------------------------------------------------

def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode_command(b"SET", b"k", b"a\r\nb") == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n")
    assert encode_command("WAIT", 2, 0) == b"*3\r\n$4\r\nWAIT\r\n$1\r\n2\r\n$1\r\n0\r\n"


REPLIES = (b"+OK\r\n-ERR wrong type\r\n:42\r\n$5\r\nhe\r\no\r\n$-1\r\n$0\r\n\r\n"
           b"*3\r\n:1\r\n*1\r\n$1\r\nx\r\n+PONG\r\n*-1\r\n*0\r\n:-7\r\n")


def _expected_replies(got: list[Any]) -> None:
    assert got[0] == "OK"
    assert isinstance(got[1], RedisError) and str(got[1]) == "ERR wrong type"
    assert got[2:] == [42, b"he\r\no", None, b"", [1, [b"x"], "PONG"], None, [], -7]


@pytest.mark.parametrize("pieces", splits(REPLIES))
def test_every_reply_type_decodes_however_the_stream_is_cut(pieces: list[bytes]) -> None:
    parser = ReplyParser()
    got: list[Any] = []
    for piece in pieces:
        got += parser.feed(piece)
    _expected_replies(got)


@pytest.mark.parametrize("junk", [b"?what\r\n", b":12x\r\n", b"$3\r\nabcde\r\n", b"\r\n"])
def test_bytes_that_are_not_resp_are_a_protocol_error(junk: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(junk)


def _redis() -> tuple[RedisClient, StringTransport]:
    client, transport = RedisClient(), StringTransport()
    client.makeConnection(transport)
    return client, transport


def test_pipelined_commands_get_their_own_replies_in_order() -> None:
    client, transport = _redis()
    first, second, third = client.pipeline((b"GET", b"a"), (b"INCR", b"b"), (b"GET", b"c"))
    assert transport.value() == (encode_command(b"GET", b"a") + encode_command(b"INCR", b"b")
                                 + encode_command(b"GET", b"c"))
    results = [outcome(d) for d in (first, second, third)]
    client.dataReceived(b"$1\r\n1\r\n-WRONGTYPE no\r")
    assert results[0] == [b"1"] and results[1] == [] and results[2] == []
    client.dataReceived(b"\n$-1\r\n")
    [error] = results[1]
    assert isinstance(error, Failure) and error.check(RedisError)
    assert results[2] == [None]


def test_a_reply_nobody_waits_for_aborts_the_connection() -> None:
    client, transport = _redis()
    waiting = outcome(client.command(b"PING"))
    client.dataReceived(b"+PONG\r\n+EXTRA\r\n")
    assert waiting == ["PONG"] and transport.disconnecting
    with pytest.raises(ProtocolError):
        client.command(b"PING")


def test_a_lost_connection_fails_every_waiting_command() -> None:
    client, _ = _redis()
    waiting = [outcome(d) for d in client.pipeline((b"GET", b"a"), (b"GET", b"b"))]
    client.connectionLost(Failure(ConnectionLost("gone")))
    assert all(isinstance(w[0], Failure) and w[0].check(ConnectionLost) for w in waiting)


def _pool(n: int) -> tuple[RedisPool, list[StringTransport]]:
    clients = [_redis() for _ in range(n)]
    return RedisPool([c for c, _ in clients]), [t for _, t in clients]


def test_a_redis_put_is_set_then_wait_and_succeeds_only_when_both_replicas_have_it() -> None:
    pool, [transport] = _pool(1)
    done = outcome(redis_put(pool, b"key", b"value", replicas=2))
    assert transport.value() == (encode_command(b"SET", b"key", b"value")
                                 + encode_command(b"WAIT", 2, 0))
    pool.clients[0].dataReceived(b"+OK\r\n")
    assert done == []                                  # not until WAIT answers
    pool.clients[0].dataReceived(b":2\r\n")
    assert done == [None]

    short = outcome(redis_put(pool, b"key", b"value", replicas=2))
    pool.clients[0].dataReceived(b"+OK\r\n:1\r\n")
    assert isinstance(short[0], Failure) and short[0].check(PeerFailed)
    refused = outcome(redis_put(pool, b"key", b"value", replicas=2))
    pool.clients[0].dataReceived(b"-OOM command not allowed\r\n:2\r\n")
    assert isinstance(refused[0], Failure) and refused[0].check(RedisError)


def test_a_redis_get_answers_the_value_or_none() -> None:
    pool, [transport] = _pool(1)
    found, absent, odd = (outcome(redis_get(pool, k)) for k in (b"a", b"b", b"c"))
    assert transport.value() == b"".join(encode_command(b"GET", k) for k in (b"a", b"b", b"c"))
    pool.clients[0].dataReceived(b"$3\r\nabc\r\n$-1\r\n:5\r\n")
    assert found == [b"abc"] and absent == [None]
    assert isinstance(odd[0], Failure) and odd[0].check(PeerFailed)


def test_the_redis_pool_gives_each_request_an_idle_connection_first() -> None:
    pool, transports = _pool(2)
    first = outcome(redis_get(pool, b"a"))
    redis_get(pool, b"b")
    assert [t.value() for t in transports] == [encode_command(b"GET", b"a"),
                                               encode_command(b"GET", b"b")]
    # None idle: the third is pipelined on the first connection, which Redis answers in order.
    third = outcome(redis_get(pool, b"c"))
    assert transports[0].value().endswith(encode_command(b"GET", b"c"))
    pool.clients[0].dataReceived(b"$1\r\nA\r\n$1\r\nC\r\n")
    assert first == [b"A"] and third == [b"C"]
    # Answered, the first is idle again and takes the next request.
    transports[0].clear()
    redis_get(pool, b"d")
    assert transports[0].value() == encode_command(b"GET", b"d")


# -- HTTP/1.1 -----------------------------------------------------------------------------------

def _http() -> tuple[HTTP11Client, StringTransport]:
    client, transport = HTTP11Client("127.0.0.1:2379"), StringTransport()
    client.makeConnection(transport)
    return client, transport


def test_a_request_is_http_1_1_with_host_and_length() -> None:
    client, transport = _http()
    client.request("POST", "/v3/kv/put", b'{"a":1}', [("Content-Type", "application/json")])
    assert transport.value() == (b"POST /v3/kv/put HTTP/1.1\r\nHost: 127.0.0.1:2379\r\n"
                                 b"Content-Length: 7\r\nContent-Type: application/json\r\n\r\n"
                                 b'{"a":1}')
    with pytest.raises(HTTPProtocolError):
        client.request("POST", "/again")     # one at a time on a connection


LENGTH = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
          b'{"ok":true}')
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nGrpc-Metadata-X: y\r\n\r\n"
           b"5;ext=1\r\n{\"ok\"\r\n6\r\n:true}\r\n0\r\nTrailer: z\r\n\r\n")


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_responses_parse_however_the_stream_is_cut_and_the_connection_is_reused(
        framing: str) -> None:
    raw = LENGTH if framing == "length" else CHUNKED
    for pieces in splits(raw):
        client, transport = _http()
        for _ in range(2):               # the second request proves the connection reusable
            transport.clear()
            got = outcome(client.request("POST", "/v3/kv/range", b"{}"))
            for piece in pieces[:-1]:
                client.dataReceived(piece)
                assert got == []
            client.dataReceived(pieces[-1])
            [response] = got
            assert isinstance(response, Response), response
            assert response.status == 200 and response.body == b'{"ok":true}'
            assert client.usable and not client.busy and not transport.disconnecting


def test_an_empty_body_and_an_error_status_are_responses_too() -> None:
    client, _ = _http()
    got = outcome(client.request("GET", "/health"))
    client.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert got[0].status == 404 and got[0].body == b""
    assert client.usable


@pytest.mark.parametrize("raw", [
    b"SPDY/3 200 OK\r\nContent-Length: 0\r\n\r\n",                 # not HTTP/1.x
    b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",               # status not a number
    b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",   # no framing
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",       # bad chunk size
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n",  # chunk overruns
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabEXTRA",         # bytes beyond the response
])
def test_a_malformed_response_fails_the_request_and_the_connection(raw: bytes) -> None:
    client, transport = _http()
    got = outcome(client.request("GET", "/"))
    client.dataReceived(raw)
    if got and isinstance(got[0], Response):
        # The response itself was whole; what followed it poisons the stream.
        assert raw.endswith(b"EXTRA")
    else:
        [failure] = got
        assert isinstance(failure, Failure) and failure.check(HTTPProtocolError)
    assert not client.usable and transport.disconnecting
    with pytest.raises(HTTPProtocolError):
        client.request("GET", "/")


def test_connection_close_and_a_lost_connection_end_the_connection() -> None:
    client, transport = _http()
    got = outcome(client.request("GET", "/"))
    client.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert got[0].body == b"ok" and not client.usable and transport.disconnecting

    client, _ = _http()
    got = outcome(client.request("GET", "/"))
    client.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    client.connectionLost(Failure(ConnectionLost("reset")))
    assert isinstance(got[0], Failure) and got[0].check(ConnectionLost)

    client, transport = _http()
    client.dataReceived(b"HTTP/1.1 200 OK\r\n")     # nothing was asked
    assert not client.usable and transport.disconnecting


def test_the_pool_keeps_one_request_per_connection_and_queues_the_rest() -> None:
    pairs = [_http() for _ in range(2)]
    pool = ConnectionPool([c for c, _ in pairs])
    answers = [outcome(pool.request("POST", f"/{i}")) for i in range(3)]
    sent = [t.value().split(b" ")[1] for _, t in pairs]
    assert sent == [b"/0", b"/1"]
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"
    pairs[1][1].clear()
    pairs[1][0].dataReceived(ok + b"b")
    assert answers[1][0].body == b"b"
    # The freed connection takes the queued request at once.
    assert pairs[1][1].value().startswith(b"POST /2 HTTP/1.1")
    pairs[1][0].dataReceived(ok + b"c")
    pairs[0][0].dataReceived(ok + b"a")
    assert [a[0].body for a in answers] == [b"a", b"b", b"c"]


def test_a_pool_whose_connections_all_closed_fails_its_queue() -> None:
    pairs = [_http()]
    pool = ConnectionPool([pairs[0][0]])
    first = outcome(pool.request("GET", "/1"))
    queued = outcome(pool.request("GET", "/2"))
    pairs[0][0].connectionLost(Failure(ConnectionLost("gone")))
    assert first[0].check(ConnectionLost)
    assert isinstance(queued[0], Failure) and queued[0].check(HTTPProtocolError)
    with pytest.raises(HTTPProtocolError):
        pool.request("GET", "/3")


# -- etcd requests ------------------------------------------------------------------------------

def _etcd_answer(body: dict[str, Any], status: int = 200) -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(data), data)


def test_etcd_puts_and_linearizable_gets_go_through_the_json_gateway(tmp_path: Path) -> None:
    system = EtcdSystem(tmp_path)           # chooses ports and argv, starts nothing
    client, transport = _http()
    pool = ConnectionPool([client])
    put = outcome(system.request("put", pool, b"k\x00", b"\xffvalue"))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v3/kv/put HTTP/1.1")
    assert json.loads(body) == {"key": base64.b64encode(b"k\x00").decode(),
                                "value": base64.b64encode(b"\xffvalue").decode()}
    client.dataReceived(_etcd_answer({"header": {"revision": "2"}}))
    assert put == [None]

    transport.clear()
    get = outcome(system.request("get", pool, b"k\x00", b""))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v3/kv/range HTTP/1.1")
    # No "serializable": etcd's default, a linearizable read.
    assert json.loads(body) == {"key": base64.b64encode(b"k\x00").decode()}
    client.dataReceived(_etcd_answer({"header": {}, "kvs": [
        {"key": "aw==", "value": base64.b64encode(b"\xffvalue").decode()}], "count": "1"}))
    assert get == [b"\xffvalue"]

    missing = outcome(system.request("get", pool, b"nope", b""))
    client.dataReceived(_etcd_answer({"header": {}}))
    assert missing == [None]

    refused = outcome(system.request("put", pool, b"k", b"v"))
    client.dataReceived(_etcd_answer({"error": "etcdserver: no leader", "code": 14}, 503))
    assert isinstance(refused[0], Failure) and refused[0].check(PeerFailed)
    assert "503" in str(refused[0].value)
    with pytest.raises(PeerFailed):
        etcd_answer(Response(200, {}, b"<html>"))


def test_the_peers_listen_on_loopback_on_distinct_ports_in_the_run_directory(
        tmp_path: Path) -> None:
    etcd, redis = EtcdSystem(tmp_path), RedisSystem(tmp_path)
    ports = etcd.client_ports + etcd.peer_ports + redis.ports
    assert len(set(ports)) == len(ports) == 9
    for argv in [p.argv for p in etcd.processes]:
        urls = [a for a in argv if a.startswith("http://")]
        assert urls and all(u.startswith("http://127.0.0.1:") for u in urls)
        assert argv[argv.index("--data-dir") + 1].startswith(str(tmp_path))
    primary, *replicas = [p.argv for p in redis.processes]
    assert all(a[a.index("--bind") + 1] == "127.0.0.1" for a in (primary, *replicas))
    assert "--replicaof" not in primary and len(replicas) == 2
    assert all(a[a.index("--replicaof") + 1:a.index("--replicaof") + 3]
               == ["127.0.0.1", str(redis.ports[0])] for a in replicas)
    assert all(a[a.index("--dir") + 1].startswith(str(tmp_path)) for a in (primary, *replicas))


# -- redis-benchmark ----------------------------------------------------------------------------

REDIS_BENCHMARK_CSV = (
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
    '"p99_latency_ms","max_latency_ms"\n'
    '"SET","41322.31","0.700","0.136","0.663","1.031","1.359","3.063"\n'
    '"GET","52083.33","0.552","0.088","0.527","0.815","1.047","2.495"\n')


def test_redis_benchmark_runs_n_clients_without_pipelining_and_its_csv_is_read() -> None:
    argv = redis_benchmark_argv(6400, 32, 10_000, 100, 5000)
    assert argv[argv.index("-c") + 1] == "32" and argv[argv.index("-P") + 1] == "1"
    assert argv[argv.index("-d") + 1] == "100" and argv[argv.index("-r") + 1] == "5000"
    assert argv[argv.index("-h") + 1] == "127.0.0.1" and "--csv" in argv
    results = parse_redis_benchmark_csv(REDIS_BENCHMARK_CSV, 32, 10_000)
    assert results["SET"].ops_per_second == pytest.approx(41322.31)
    assert results["GET"].p99_ms == pytest.approx(1.047)
    assert results["GET"].p50_ms == pytest.approx(0.527) and results["GET"].inflight == 32
    old = parse_redis_benchmark_csv('"SET","1000.00"\n', 1, 100)
    assert old["SET"].ops_per_second == 1000.0 and old["SET"].p99_ms is None
    with pytest.raises(PeerFailed):
        parse_redis_benchmark_csv('"test","rps"\n"SET","fast"\n', 1, 1)
    with pytest.raises(PeerFailed):
        parse_redis_benchmark_csv("", 1, 1)


def test_the_native_table_sets_redis_benchmark_beside_the_load_generator() -> None:
    def ours(workload: str, rate: float) -> Measurement:
        result = RunResult(inflight=8, completed=100, elapsed=100 / rate,
                           latencies=[0.001] * 100)
        return Measurement("redis", Case(workload, "uniform", 100, 8), 1, result)

    native = [Measurement(NATIVE_REDIS, Case(test, "uniform", 100, 8), 1,
                          NativeResult(8, 100, rate, 0.2, 0.5))
              for test, rate in (("SET", 40_000.0), ("GET", 50_000.0))]
    text = format_native(summarize([ours("W", 10_000), ours("C", 25_000), *native]))
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["SET", "100", "8", "40,000"]
    assert "W uniform SET+WAIT" in lines[1] and lines[1].endswith("25%")
    assert "C uniform GET" in lines[2] and lines[2].endswith("50%")
    assert format_native(summarize([ours("W", 1.0)])) == ""


# -- YCSB key choice and mixes ------------------------------------------------------------------

def test_zipfian_follows_zipfs_law_with_constant_0_99() -> None:
    import random
    items, draws = 1000, 200_000
    zipf = ZipfianGenerator(items)
    rng = random.Random("zipf-test")
    counts = Counter(zipf.next(rng) for _ in range(draws))
    assert min(counts) >= 0 and max(counts) < items
    assert zipf.zetan == pytest.approx(zeta(items, 0.99))
    # The most popular record: 1/zeta(1000, 0.99) = 1/7.729, about 12.9% of all draws.
    assert zipf.probability(0) == pytest.approx(0.1294, abs=0.0005)
    # Gray's method is exact for the two most popular ranks and approximates the rest (YCSB's
    # generator, rank 2 included, draws the third record about 16% more often than Zipf).
    for rank in (0, 1):
        assert counts[rank] / draws == pytest.approx(zipf.probability(rank), rel=0.03), rank
    for rank in (2, 3, 9, 10, 100):
        assert counts[rank] / draws == pytest.approx(zipf.probability(rank), rel=0.2), rank
    top10 = sum(counts[r] for r in range(10)) / draws
    assert top10 == pytest.approx(sum(zipf.probability(r) for r in range(10)), rel=0.05)
    # The tail is reached: at least half the records are drawn at least once.
    assert len(counts) > items // 2
    with pytest.raises(ValueError):
        ZipfianGenerator(0)


def test_uniform_and_zipfian_draws_are_reproducible_and_differ_as_they_should() -> None:
    a = draw(WORKLOADS["C"], "zipfian", 10_000, 50_000, "seed")
    assert a == draw(WORKLOADS["C"], "zipfian", 10_000, 50_000, "seed")
    assert a != draw(WORKLOADS["C"], "zipfian", 10_000, 50_000, "other")
    u = draw(WORKLOADS["C"], "uniform", 10_000, 50_000, "seed")
    zipf_top = Counter(a.records).most_common(1)[0][1] / 50_000
    uniform_top = Counter(u.records).most_common(1)[0][1] / 50_000
    assert zipf_top > 0.08 and uniform_top < 0.001
    assert all(0 <= r < 10_000 for r in a.records + u.records)
    with pytest.raises(ValueError):
        draw(WORKLOADS["C"], "latest", 10, 10, "seed")


@pytest.mark.parametrize("name, reads", [("A", 0.50), ("B", 0.95), ("C", 1.0), ("W", 0.0)])
def test_each_workload_mixes_reads_and_updates_in_its_proportions(name: str,
                                                                   reads: float) -> None:
    ops = draw(WORKLOADS[name], "uniform", 1000, 20_000, f"mix-{name}")
    share = sum(ops.reads) / len(ops)
    assert share == pytest.approx(reads, abs=0.01)
    assert len(ops) == 20_000
    assert WORKLOADS[name].operations == {0.5: ("get", "put"), 0.95: ("get", "put"),
                                          1.0: ("get",), 0.0: ("put",)}[reads]


def test_record_values_are_two_distinct_values_of_the_size() -> None:
    for size in (1, 100, 10_000):
        loaded, updated = record_values(size)
        assert len(loaded) == len(updated) == size and loaded != updated
        assert record_values(size) == (loaded, updated)


# -- installing ---------------------------------------------------------------------------------

def test_missing_programs_are_installed_with_apt_get_or_reported(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    present = {"redis-server"}
    ran: list[list[str]] = []

    def which(name: str) -> str | None:
        return f"/usr/bin/{name}" if name in present or name == "apt-get" else None

    def run(argv: list[str], **kwargs: Any) -> Any:
        ran.append(argv)
        assert kwargs["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        if argv[1] == "install":
            present.update({"redis-benchmark", "etcd", "etcdctl"})
        return SimpleNamespace(returncode=0, stderr=b"")

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert ensure_installed(["chain", "redis", "etcd"], which=which, run=run) == {}
    assert ran == [["apt-get", "update", "-qq"],
                   ["apt-get", "install", "-y", "-qq", "etcd-client", "etcd-server",
                    "redis-tools"]]

    # A failing apt-get, or no root: the system is reported missing, with the reason.
    present.clear()

    def failing(argv: list[str], **kwargs: Any) -> Any:
        return SimpleNamespace(returncode=100, stderr=b"E: Unable to locate package")

    missing = ensure_installed(["redis"], which=which, run=failing)
    assert list(missing) == ["redis"]
    assert "redis-server, redis-benchmark missing" in missing["redis"]
    assert "exited with 100" in missing["redis"] and "Unable to locate" in missing["redis"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in ensure_installed(["etcd"], which=which, run=failing)["etcd"]
    assert "--no-install" in ensure_installed(["etcd"], install=False, which=which)["etcd"]
    assert ensure_installed(["chain", "single"], which=which, run=failing) == {}


# -- python -m bench against Redis and etcd, for real -------------------------------------------

@pytest.mark.integration
def test_python_m_bench_measures_redis_and_etcd_beside_the_chain(tmp_path: Path) -> None:
    # Not skipped without Redis or etcd: the benchmark installs them (as root), and a system
    # still missing makes it exit 3, which fails this test.
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    stderr_path = tmp_path / "bench.stderr"
    proc = start_module(
        "bench", ["--systems", "chain,redis,etcd", "--workloads", "W,C", "--values", "100",
                  "--records", "100", "--ops", "100", "--repeat", "1", "--inflight", "1,32",
                  "--warmup", "10", "--seconds", "20", "--json", str(out), "--plots", str(plots)],
        stderr_path)
    try:
        stdout, _ = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, stderr_path.read_text()[-3000:]
    report = json.loads(out.read_text())
    assert report["missing"] == {}
    runs = {(r["system"], r["workload"], r["inflight"]) for r in report["runs"]}
    for system in ("chain", "redis", "etcd"):
        assert {(system, w, n) for w in ("W", "C") for n in (1, 32)} | {
            (system, "load", 32)} <= runs
    # redis-benchmark ran beside the load generator at both counts.
    assert {("redis-benchmark", t, n) for t in ("SET", "GET") for n in (1, 32)} <= runs
    mine = [r for r in report["runs"] if r["system"] != "redis-benchmark"]
    assert all(r["completed"] == 100 and r["ops_per_s"] > 0 for r in mine)
    by = {(r["system"], r["workload"], r["inflight"]): r for r in report["summary"]}
    assert by[("etcd", "W", 32)]["chain_ratio"] == pytest.approx(
        by[("chain", "W", 32)]["ops_per_s"] / by[("etcd", "W", 32)]["ops_per_s"])
    # The targets against etcd and Redis are judged; the single server was not measured.
    verdicts = report["targets"]
    assert [v.split(":")[0] for v in verdicts][:2] != ["NOT MEASURED", "NOT MEASURED"]
    assert any(v.startswith(("PASS: stretch", "FAIL: stretch")) for v in verdicts)
    assert any(v.startswith("NOT MEASURED: chain put >= 50% of single") for v in verdicts)
    machine = report["machine"]
    assert machine["versions"]["redis-server"].startswith("Redis server v=")
    assert "etcd Version" in machine["versions"]["etcd"]
    assert len(machine["load_average_before"]) == 3 and machine["cpu_model"]
    text = stdout.decode()
    assert "targets (100-byte values, 32 in flight)" in text and "redis-benchmark" in text
    if machine["versions"]["matplotlib"]:
        assert sorted(p.name for p in plots.iterdir()) == ["zipfian-100B.png"]
        assert (plots / "zipfian-100B.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "no plots: matplotlib is not installed" in text
    # Every server, stopped by PID: the chain's ECS and three servers, three of each peer.
    pids = {s["name"]: s["pids"] for s in report["systems"]}
    assert len(pids["redis"]) == 3 and len(pids["etcd"]) == 3 and len(pids["chain"]) == 4
    assert not any(pid_alive(pid) for group in pids.values() for pid in group)


def test_successive_free_port_calls_never_hand_out_a_port_twice() -> None:
    from harness.processes import free_ports

    seen = [port for _ in range(200) for port in free_ports(5)]
    assert len(set(seen)) == len(seen)
