"""The benchmark's parts, and one tiny real run, so that ``python -m bench`` cannot rot.

Unit tests drive the load generator with hand-fired Deferreds and a fake clock, and the echo
server over iosim. The integration tests run ``python -m bench`` itself for a handful of
operations against real processes, and check that it stops them by PID: after a normal run,
on Ctrl-C, and when a server dies under it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from bench.echo_server import Echo, EchoProtocol
from bench.loadgen import ClosedLoop, RequestFailed, RunResult, percentile
from bench.report import (TARGETS, format_read_shares, format_table, read_shares, summarize,
                          target_verdicts)
from bench.runner import (Case, LoadIncomplete, Measurement, rotated, run_operations,
                          run_session, Settings)
from bench.systems import (ChainRouter, ChainSystem, EchoSystem, SingleSystem, SystemUnderTest,
                           chain_plain, single_plain, stop_process)
from bench.ycsb import Operations, record_keys, record_values
from chainstore import protocol
from chainstore.limits import check_key
from chainstore.ring import NodeInfo, Ring
from benchrun import start_module, stop
from harness.processes import pid_alive



class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Requests:
    """Records each request and its Deferred, for the test to answer when it likes."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.pending: dict[int, Deferred[None]] = {}
        self.most_outstanding = 0

    def __call__(self, i: int) -> Deferred[None]:
        self.sent.append(i)
        d: Deferred[None] = Deferred()
        self.pending[i] = d
        self.most_outstanding = max(self.most_outstanding, len(self.pending))
        return d

    def answer(self, i: int) -> None:
        self.pending.pop(i).callback(None)

    def fail(self, i: int) -> None:
        self.pending.pop(i).errback(RuntimeError("boom"))


def results_of(d: Deferred[RunResult]) -> list[object]:
    out: list[object] = []
    d.addBoth(out.append)
    return out


# -- the load generator -----------------------------------------------------------------------

def test_closed_loop_keeps_exactly_n_in_flight_and_sends_every_op_once() -> None:
    clock, requests = FakeClock(), Requests()
    out = results_of(ClosedLoop(requests, ops=20, inflight=4, seconds=60, now=clock).run())
    assert requests.sent == [0, 1, 2, 3]
    answered = 0
    while requests.pending:
        clock.t += 0.001
        # Answer the newest first: the loop must refill regardless of answer order.
        requests.answer(max(requests.pending))
        answered += 1
        assert len(requests.pending) == min(4, 20 - answered)
    assert requests.sent == list(range(20))
    assert requests.most_outstanding == 4
    [result] = out
    assert isinstance(result, RunResult)
    assert result.completed == 20 and not result.stopped_by_time
    assert result.inflight == 4


def test_closed_loop_measures_latency_and_throughput_on_its_clock() -> None:
    clock, requests = FakeClock(), Requests()
    out = results_of(ClosedLoop(requests, ops=4, inflight=1, seconds=60, now=clock).run())
    for latency in (0.001, 0.002, 0.003, 0.010):
        clock.t += latency
        requests.answer(requests.sent[-1])
    [result] = out
    assert isinstance(result, RunResult)
    assert result.latencies == pytest.approx([0.001, 0.002, 0.003, 0.010])
    assert result.elapsed == pytest.approx(0.016)
    assert result.ops_per_second == pytest.approx(4 / 0.016)
    summary = result.summary()
    assert summary["p50_ms"] == pytest.approx(2.0)
    assert summary["p99_ms"] == pytest.approx(10.0)


def test_closed_loop_starts_nothing_after_the_time_cap_but_awaits_what_it_sent() -> None:
    clock, requests = FakeClock(), Requests()
    out = results_of(ClosedLoop(requests, ops=1000, inflight=2, seconds=1.0, now=clock).run())
    clock.t += 0.5
    requests.answer(0)                       # before the cap: request 2 replaces it
    assert requests.sent == [0, 1, 2]
    clock.t += 0.6                           # past the cap
    requests.answer(1)
    assert requests.sent == [0, 1, 2] and out == []
    requests.answer(2)
    [result] = out
    assert isinstance(result, RunResult)
    assert result.completed == 3 and result.stopped_by_time


def test_closed_loop_survives_many_synchronous_answers_without_recursing() -> None:
    calls: list[int] = []

    def request(i: int) -> Deferred[None]:
        calls.append(i)
        return succeed(None)

    # Far more than the recursion limit: a loop that recursed per answer would blow the stack.
    ops = sys.getrecursionlimit() * 5
    out = results_of(ClosedLoop(request, ops=ops, inflight=8, seconds=60).run())
    [result] = out
    assert isinstance(result, RunResult)
    assert result.completed == ops and calls == list(range(ops))


def test_closed_loop_stops_at_the_first_failure_and_reports_it() -> None:
    clock, requests = FakeClock(), Requests()
    out = results_of(ClosedLoop(requests, ops=100, inflight=3, seconds=60, now=clock).run())
    requests.fail(1)
    assert requests.sent == [0, 1, 2]        # no replacement for a failed request
    assert out == []                         # still waiting for 0 and 2
    requests.answer(0)
    requests.answer(2)
    assert requests.sent == [0, 1, 2]
    [failure] = out
    assert failure.check(RequestFailed)      # type: ignore[union-attr]
    assert "boom" in str(failure.value)      # type: ignore[union-attr]


def test_closed_loop_counts_a_request_that_raises_as_a_failure() -> None:
    def request(i: int) -> Deferred[None]:
        raise ValueError("cannot send")

    [failure] = results_of(ClosedLoop(request, ops=5, inflight=2, seconds=60).run())
    assert failure.check(RequestFailed)      # type: ignore[union-attr]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


# -- the echo server, the workload, the report ------------------------------------------------

def test_echo_takes_puts_arguments_and_answers_like_put_over_real_amp_framing() -> None:
    assert Echo.arguments == protocol.Put.arguments
    assert Echo.response == protocol.Put.response
    client, server, pump = iosim.connectedServerAndClient(
        ServerClass=EchoProtocol, ClientClass=amp.AMP, clock=Clock())
    answers: list[object] = []
    # Larger than one AMP value: it must travel as BigBytes chunks and still be accepted.
    client.callRemote(Echo, key=b"k" * 16, value=b"v" * 100_000).addBoth(answers.append)
    pump.flush()
    assert answers == [{"updated": False}]


def test_record_keys_are_valid_distinct_and_stable() -> None:
    keys = record_keys(500)
    assert len(set(keys)) == 500
    assert all(len(k) == 16 and check_key(k) for k in keys)
    assert record_keys(500) == keys and record_keys(10) == keys[:10]
    assert len(record_keys(3, key_size=20)[0]) == 20


def test_each_repetition_rotates_the_order_of_the_systems() -> None:
    systems = ["echo", "single", "chain"]
    assert [rotated(systems, r) for r in (1, 2, 3, 4)] == [  # type: ignore[arg-type]
        ["echo", "single", "chain"], ["single", "chain", "echo"],
        ["chain", "echo", "single"], ["echo", "single", "chain"]]


def _node(name: str, port: int) -> NodeInfo:
    return NodeInfo(name, "127.0.0.1", port, port + 1)


def test_chain_router_sends_puts_to_the_head_and_gets_to_the_tail(tmp_path: Path) -> None:
    ring = Ring((_node("a", 5000), _node("b", 5100), _node("c", 5200), _node("d", 5300)),
                epoch=4, replication=3)
    conns = {n.name: FakeConnection({"updated": False}) for n in ring.nodes}
    router = ChainRouter(ring, conns)  # type: ignore[arg-type]
    system = ChainSystem(tmp_path)  # writes the ECS's config, starts nothing
    keys = record_keys(200)
    for key in keys:
        chain = ring.chain(key)
        assert router.head(key) is conns[chain[0].name]
        assert router.tail(key) is conns[chain[-1].name]
        system.request("put", router, key, b"v")
    # Every put went to its key's head and only there; all four servers head some keys.
    sent = {name: [kw["key"] for _, kw in conn.sent] for name, conn in conns.items()}
    assert all(sent.values())
    assert all(ring.head(k).name == name for name, ks in sent.items() for k in ks)
    assert sum(len(ks) for ks in sent.values()) == 200
    # With a dead member the live chain skips it: no request goes to a dead server.
    dead = Ring(ring.nodes, epoch=5, replication=3, dead=frozenset({"b"}))
    skipping = ChainRouter(dead, conns)  # type: ignore[arg-type]
    assert all(skipping.head(k) is not conns["b"] and skipping.tail(k) is not conns["b"]
               for k in keys)


def test_chain_router_with_reads_from_any_member_routes_gets_as_the_client_library_does(
        tmp_path: Path) -> None:
    ring = Ring((_node("a", 5000), _node("b", 5100), _node("c", 5200), _node("d", 5300)),
                epoch=4, replication=3)
    conns = {n.name: FakeConnection({"value": b"v"}) for n in ring.nodes}
    router = ChainRouter(ring, conns, reads="any")  # type: ignore[arg-type]
    system = ChainSystem(tmp_path, reads="any")
    assert (system.name, system.compare_to) == ("chain-any", "chain")
    # Keys read now and then: each key's gets go to one member of its chain, by key, and
    # every server reads some keys of every range it is in.
    keys = record_keys(400)
    for _ in range(2):
        for key in keys:
            system.request("get", router, key, b"")
    readers: dict[bytes, set[str]] = {}
    for name, conn in conns.items():
        for _, kw in conn.sent:
            readers.setdefault(kw["key"], set()).add(name)
    assert all(len(names) == 1 for names in readers.values()) and len(readers) == 400
    assert all(names <= {n.name for n in ring.chain(key)} for key, names in readers.items())
    places = {ring.chain(key).index(ring.node(next(iter(names))))
              for key, names in readers.items()}
    assert places == {0, 1, 2}
    # A hot key (all of the recent gets): after a few gets, to every member in turn.
    router = ChainRouter(ring, conns, reads="any")  # type: ignore[arg-type]
    key = record_keys(401)[400]
    for _ in range(30):
        system.request("get", router, key, b"")
    members = {n.name for n in ring.chain(key)}
    assert set(router.gets) == members and sum(router.gets.values()) == 30
    assert min(router.gets.values()) >= 9
    assert system.read_counts([router, router]) == {n: 2 * c for n, c in router.gets.items()}
    tail_only = ChainRouter(ring, conns)  # type: ignore[arg-type]
    for _ in range(5):
        assert tail_only.reader(key) is conns[ring.tail(key).name]
    assert tail_only.gets == {ring.tail(key).name: 5}


def test_read_shares_and_the_targets_of_reads_from_any_member() -> None:
    def m(system: str, rate: float, reads: dict[str, int], workload: str = "C",
          rep: int = 1) -> Measurement:
        result = RunResult(inflight=32, completed=1000, elapsed=1000 / rate,
                           latencies=[0.001] * 1000)
        return Measurement(system, Case(workload, "zipfian", 100, 32), rep, result, None, None,
                           reads)

    runs = [m("chain", 9000, {"s1": 1000}), m("chain-any", 9500, {"s1": 300, "s2": 350,
                                                                  "s3": 350}),
            m("chain", 8000, {"s1": 1000}, "B"), m("chain-any", 7000, {"s1": 500, "s2": 500},
                                                   "B")]
    assert read_shares(runs)[("chain-any", Case("C", "zipfian", 100, 32))] == {
        "s1": 0.3, "s2": 0.35, "s3": 0.35}
    lines = format_read_shares(runs)
    assert "chain C zipfian: s1 100%" in lines
    assert "chain-any C zipfian: s1 30%, s2 35%, s3 35%" in lines
    assert lines[-1] == ("PASS: under workload C the busiest server handles at most 45% of the "
                         "reads (chain-any, zipfian, 100 B, 32 in flight): busiest s2 35%")
    hot = format_read_shares([m("chain-any", 9500, {"s1": 600, "s2": 400})])
    assert hot[-1].startswith("FAIL: under workload C") and hot[-1].endswith("busiest s1 60%")
    craq = [t for t in TARGETS if t.system == "chain-any"]
    verdicts = target_verdicts(summarize(runs), {}, ("zipfian",), craq)
    assert verdicts[0].startswith("PASS: reads from any member: chain-any >= chain (tail "
                                  "reads), workload C") and "ratio 106%" in verdicts[0]
    assert verdicts[1].startswith("FAIL: reads from any member") and "ratio 88%" in verdicts[1]


def test_stop_process_terminates_then_kills_a_child_that_ignores_sigterm() -> None:
    # Each child says it is ready (its SIGTERM disposition set) before it is stopped.
    ignoring = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    polite = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        for proc in (ignoring, polite):
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        started = time.monotonic()
        stop_process(polite, timeout=10.0)
        assert polite.returncode == -signal.SIGTERM and time.monotonic() - started < 5.0
        stop_process(ignoring, timeout=0.5)
        assert ignoring.returncode == -signal.SIGKILL
        stop_process(ignoring)  # already gone: nothing to do
        stop_process(None)  # never started
    finally:
        for proc in (ignoring, polite):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if proc.stdout:
                proc.stdout.close()


# -- python -m bench, for real ----------------------------------------------------------------

def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    stderr_path = tmp_path / "bench.stderr"
    return start_module("bench", args, stderr_path), stderr_path


def _started_pids(stderr_path: Path) -> dict[str, list[int]]:
    """From "started NAME pid 1,2,3 on ...": each system's processes (the chain's ECS first)."""
    pids = {}
    for line in stderr_path.read_text().splitlines():
        if line.startswith("started "):
            _, name, _, listed, *_ = line.split()
            pids[name] = [int(pid) for pid in listed.split(",")]
    return pids


def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _cleanup(proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
    """Whatever happened, leave no process of ours behind."""
    stop(proc)
    for pids in _started_pids(stderr_path).values():
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


_TINY = ("--values", "100", "--no-plots", "--no-install", "--no-native")


@pytest.mark.integration
def test_python_m_bench_measures_real_servers_and_stops_them(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc, stderr_path = _bench(tmp_path, "--systems", "echo,single", "--workloads", "W,C",
                               "--records", "40", "--ops", "40", "--repeat", "2", "--inflight",
                               "1,4", "--warmup", "8", "--seconds", "20", "--json", str(out),
                               *_TINY)
    try:
        stdout, _ = proc.communicate(timeout=60)
    finally:
        _cleanup(proc, stderr_path)
    assert proc.returncode == 0, stderr_path.read_text()
    report = json.loads(out.read_text())
    runs = {(r["system"], r["workload"], r["inflight"], r["repetition"]): r
            for r in report["runs"]}
    # A load phase per system (every record, as many in flight as the most of any run), then
    # each workload at each count in each repetition.
    assert set(runs) == {(s, "load", 4, 0) for s in ("echo", "single")} | {
        (s, w, n, rep) for s in ("echo", "single") for w in ("W", "C") for n in (1, 4)
        for rep in (1, 2)}
    # Every get found a value that was put (the bench checks each), none was cut short.
    assert all(r["completed"] == 40 and r["ops_per_s"] > 0 and not r["stopped_by_time"]
               and 0 < r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] for r in runs.values())
    assert report["settings"]["records"] == 40 and report["machine"]["cpus"] == os.cpu_count()
    table = stdout.decode()
    assert re.search(r"^C\s+zipfian\s+100\s+4\s+single\s", table, re.M)
    # No chain: nothing to divide, and the targets say why they were not judged.
    assert all(r["chain_ratio"] is None for r in report["summary"])
    assert all(t.startswith("NOT MEASURED") for t in report["targets"])
    pids = [pid for s in report["systems"] for pid in s["pids"]]
    assert len(pids) == 2 and [[p] for p in pids] == list(_started_pids(stderr_path).values())
    assert not any(pid_alive(pid) for pid in pids)


@pytest.mark.integration
def test_ctrl_c_stops_every_server(tmp_path: Path) -> None:
    # Many short runs: the first progress line proves measuring is under way, and the whole
    # session would last minutes if the interrupt were ignored.
    proc, stderr_path = _bench(tmp_path, "--systems", "echo,single,chain", "--records", "50",
                               "--ops", "50", "--repeat", "10000", "--warmup", "0", *_TINY)
    try:
        _wait_for(lambda: "rep 1" in stderr_path.read_text(), 60, "the first measured run")
        pids = _started_pids(stderr_path)
        # echo, single, and the chain's ECS and three servers
        assert set(pids) == {"echo", "single", "chain"} and len(pids["chain"]) == 4
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    finally:
        _cleanup(proc, stderr_path)
    assert proc.returncode == 130, stderr_path.read_text()
    assert not any(pid_alive(pid) for group in pids.values() for pid in group)


@pytest.mark.integration
def test_a_server_dying_mid_run_fails_the_bench_and_stops_the_other(tmp_path: Path) -> None:
    proc, stderr_path = _bench(tmp_path, "--systems", "echo,single", "--records", "50", "--ops",
                               "50", "--repeat", "10000", "--warmup", "0", *_TINY)
    try:
        _wait_for(lambda: "rep 1" in stderr_path.read_text(), 30, "the first measured run")
        pids = _started_pids(stderr_path)
        os.kill(pids["single"][0], signal.SIGKILL)
        proc.wait(20)
    finally:
        _cleanup(proc, stderr_path)
    assert proc.returncode not in (0, 130)
    assert "RequestFailed" in stderr_path.read_text()
    assert not pid_alive(pids["echo"][0])


@pytest.mark.integration
def test_python_m_bench_measures_a_chain_of_three_routing_by_key(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc, stderr_path = _bench(tmp_path, "--systems", "single,chain", "--workloads", "W,C",
                               "--records", "60", "--ops", "60", "--repeat", "1", "--inflight",
                               "1,8", "--warmup", "10", "--seconds", "20", "--json", str(out),
                               *_TINY)
    try:
        stdout, _ = proc.communicate(timeout=90)
    finally:
        _cleanup(proc, stderr_path)
    assert proc.returncode == 0, stderr_path.read_text()
    report = json.loads(out.read_text())
    chain = next(s for s in report["systems"] if s["name"] == "chain")
    # The ECS and three servers, one ring of three replicating three ways.
    assert len(chain["pids"]) == 4 and chain["replication"] == 3 and len(chain["servers"]) == 3
    runs = [r for r in report["runs"] if r["system"] == "chain"]
    # A put to a server that is not the key's head, or a get to one that is not its tail, is
    # refused (server_not_responsible) and fails the run; every get checked its value.
    assert sorted((r["workload"], r["inflight"]) for r in runs) == [
        ("C", 1), ("C", 8), ("W", 1), ("W", 8), ("load", 8)]
    assert all(r["completed"] == 60 and not r["stopped_by_time"] for r in runs)
    ratios = {(r["workload"], r["inflight"]): r["chain_ratio"] for r in report["summary"]
              if r["system"] == "single"}
    assert set(ratios) == {("C", 1), ("C", 8), ("W", 1), ("W", 8), ("load", 8)}
    assert all(ratio > 0 for ratio in ratios.values())
    assert not any(pid_alive(pid) for pid in chain["pids"])


@pytest.mark.integration
def test_python_m_bench_measures_the_chain_with_and_without_tls_and_reads_at_any_member(
        tmp_path: Path) -> None:
    # One session, so that one run shows each figure beside the chain's (three clusters).
    out = tmp_path / "results.json"
    proc, stderr_path = _bench(tmp_path, "--systems", "chain,chain-plain,chain-any",
                               "--workloads", "W,C",
                               "--distributions", "uniform", "--records", "60", "--ops", "60",
                               "--repeat", "1", "--inflight", "32", "--warmup", "10",
                               "--seconds", "20", "--json", str(out), *_TINY)
    try:
        stdout, _ = proc.communicate(timeout=90)
    finally:
        _cleanup(proc, stderr_path)
    assert proc.returncode == 0, stderr_path.read_text()
    report = json.loads(out.read_text())
    systems = {s["name"]: s for s in report["systems"]}
    # A TLS client cannot talk to a plaintext server nor the reverse: every run completing
    # proves each system was dialled the way it was started.
    assert systems["chain"]["tls"] is True and systems["chain-plain"]["tls"] is False
    assert all(len(s["pids"]) == 4 and len(s["servers"]) == 3 for s in systems.values())
    runs = [r for r in report["runs"] if r["workload"] != "load"]
    assert sorted((r["system"], r["workload"]) for r in runs) == [
        ("chain", "C"), ("chain", "W"), ("chain-any", "C"), ("chain-any", "W"),
        ("chain-plain", "C"), ("chain-plain", "W")]
    # chain-any's gets went to every member of the chains (the runner checked each value).
    assert (systems["chain"]["reads"], systems["chain-any"]["reads"]) == ("tail", "any")
    [any_c] = [r for r in runs if (r["system"], r["workload"]) == ("chain-any", "C")]
    assert sum(any_c["reads_by_server"].values()) == 60
    assert len([n for n in any_c["reads_by_server"].values() if n]) == 3
    assert re.search(r"^chain-any C uniform: (server\d \d+%(, )?){3}$", stdout.decode(), re.M)
    assert re.search(r"^(PASS|FAIL): under workload C the busiest server handles at most 45% "
                     r"of the reads \(chain-any, uniform", stdout.decode(), re.M)
    assert all(r["completed"] == 60 for r in runs)
    summary = {(r["system"], r["workload"]): r for r in report["summary"]}
    for workload in ("W", "C"):
        chain, plain = summary[("chain", workload)], summary[("chain-plain", workload)]
        assert plain["chain_ratio"] == pytest.approx(chain["ops_per_s"] / plain["ops_per_s"])
    assert re.search(r"^W\s+uniform\s+100\s+32\s+chain-plain\s", stdout.decode(), re.M)
    [tls_target] = [t for t in report["targets"] if t.split(": ", 1)[1].startswith("TLS costs")]
    assert re.match(r"(PASS|FAIL): TLS costs at most 20% of chain put throughput .*\(W, uniform, "
                    r"100 B, 32 in flight\): chain [\d,]+ ops/s, chain-plain [\d,]+ ops/s, "
                    r"ratio \d+% \(target >= 80%\)$", tls_target), tls_target
    assert tls_target in stdout.decode()
    assert not any(pid_alive(pid) for s in systems.values() for pid in s["pids"])


def test_the_plain_systems_run_the_same_processes_with_tls_off(tmp_path: Path) -> None:
    # Nothing is started: the argv and the ECS's config say how they would be.
    single, plain = SingleSystem(tmp_path), single_plain(tmp_path)
    assert (single.name, plain.name) == ("single", "single-plain")
    assert "--pki-dir" in single.server.argv() and "--tls" not in single.server.argv()
    argv = plain.server.argv()
    assert argv[argv.index("--tls") + 1] == "off" and "--pki-dir" not in argv
    assert plain.server.data_dir != single.server.data_dir
    chain, chain_off = ChainSystem(tmp_path), chain_plain(tmp_path)
    assert (chain.name, chain_off.name) == ("chain", "chain-plain")
    assert chain.ecs.pki_dir is not None and chain_off.ecs.pki_dir is None
    assert chain_off.ecs.workdir != chain.ecs.workdir
    assert [s["amp-port"] for s in chain.ecs.slots] != [s["amp-port"] for s in chain_off.ecs.slots]
    # Before a start there is no PKI to read: the TLS systems cannot be dialled yet.
    with pytest.raises(ValueError, match="cannot read"):
        single.credentials()
    assert plain.credentials() is None and chain_off.credentials() is None


class FakeConnection:
    """Answers every command with a canned response and records what was sent."""

    def __init__(self, answer: dict[str, object]) -> None:
        self.answer = answer
        self.sent: list[tuple[type, dict[str, object]]] = []

    def callRemote(self, command: type, **kwargs: object) -> Deferred[dict[str, object]]:
        self.sent.append((command, kwargs))
        return succeed(self.answer)


def test_kvserver_system_sends_put_and_get_and_answers_the_value(tmp_path: Path) -> None:
    system = SingleSystem(tmp_path)
    conn = FakeConnection({"updated": False})
    results_of(system.request("put", conn, b"k" * 16, b"v" * 100))  # type: ignore[arg-type]
    assert conn.sent == [(protocol.Put, {"key": b"k" * 16, "value": b"v" * 100})]

    right = FakeConnection({"value": b"v" * 100})
    [value] = results_of(system.request("get", right, b"k" * 16, b""))  # type: ignore[arg-type]
    assert right.sent == [(protocol.Get, {"key": b"k" * 16})]
    assert value == b"v" * 100
    with pytest.raises(ValueError):
        system.request("echo", conn, b"k", b"v")  # type: ignore[arg-type]


class RecordingSystem(SystemUnderTest):
    """A system without processes: a dict, answering at once; records every request.

    Each put takes 100 ms of C{clock}; gets take no time at all.
    """

    operations = ("put", "get")
    address = ("127.0.0.1", 1)
    pids: list[int] = []

    def __init__(self, name: str = "recording", log: list[tuple[str, str, bytes]] | None = None,
                 corrupt: bool = False) -> None:
        self.name = name
        self.data: dict[bytes, bytes] = {}
        self.log = [] if log is None else log
        self.clock = FakeClock()
        self.corrupt = corrupt

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def connect(self, reactor: object, count: int, inflight: int = 1) -> list[object]:
        return [None] * count

    def disconnect(self, handles: object) -> None:
        pass

    def request(self, op: str, conn: object, key: bytes, value: bytes) -> Deferred[object]:
        self.log.append((self.name, op, key))
        if op == "put":
            self.clock.t += 0.1
            self.data[key] = value
            return succeed(None)
        stored = self.data.get(key)
        return succeed(stored[:-1] if self.corrupt and stored else stored)


def test_a_run_reads_and_updates_the_drawn_records_and_checks_every_answer() -> None:
    keys = record_keys(10)
    values = record_values(20)
    system = RecordingSystem()
    system.data = {k: values[0] for k in keys}
    ops = Operations(reads=[False, True, True, False, True], records=[3, 3, 7, 0, 0])
    [result] = results_of(run_operations(system, [None], ops, keys, values, inflight=2,
                                         seconds=60, now=system.clock))
    assert isinstance(result, RunResult) and result.completed == 5
    assert system.log == [("recording", "put", keys[3]), ("recording", "get", keys[3]),
                          ("recording", "get", keys[7]), ("recording", "put", keys[0]),
                          ("recording", "get", keys[0])]
    # Updates write the second value; a read may find either.
    assert system.data[keys[3]] == values[1] and system.data[keys[7]] == values[0]

    # A get answering bytes that were never put, or nothing, fails the run.
    corrupt = RecordingSystem(corrupt=True)
    corrupt.data = {k: values[0] for k in keys}
    [failure] = results_of(run_operations(corrupt, [None], Operations([True], [1]), keys,
                                          values, inflight=1, seconds=60))
    assert isinstance(failure, Failure) and failure.check(RequestFailed)
    assert "WrongAnswer" in str(failure.value) and "19 bytes" in str(failure.value)
    empty = RecordingSystem()
    [failure] = results_of(run_operations(empty, [None], Operations([True], [1]), keys,
                                          values, inflight=1, seconds=60))
    assert isinstance(failure, Failure) and "answered nothing" in str(failure.value)


def test_a_system_that_answers_no_values_is_not_checked(tmp_path: Path) -> None:
    echo = EchoSystem(tmp_path)
    conn = FakeConnection({"updated": False})
    keys = record_keys(3)
    [result] = results_of(run_operations(echo, [conn], Operations([True, False], [0, 1]), keys,
                                         record_values(10), inflight=1, seconds=60))
    assert isinstance(result, RunResult) and result.completed == 2
    # Each operation costs the AMP message it would cost a kvserver.
    assert [kw["value"] for _, kw in conn.sent] == [b"", record_values(10)[1]]


def test_a_session_loads_every_record_then_runs_each_case_on_every_system_alike() -> None:
    log: list[tuple[str, str, bytes]] = []
    systems = [RecordingSystem("one", log), RecordingSystem("two", log)]
    settings = Settings(ops=30, seconds=60, repeat=2, inflight=(1, 4), warmup=0, records=20,
                        workloads=("A", "W"), distributions=("uniform", "zipfian"),
                        value_sizes=(10, 30))
    [ms] = results_of(Deferred.fromCoroutine(run_session(None, systems, settings)))
    assert not isinstance(ms, Failure), ms
    measured = [(m.system, m.case, m.repetition) for m in ms]  # type: ignore[attr-defined]
    # Per value size: a load of both systems, then repetitions interleaved, the systems'
    # order rotating between repetitions.
    assert measured[:2] == [("one", Case("load", "-", 10, 4), 0),
                            ("two", Case("load", "-", 10, 4), 0)]
    first = Case("A", "uniform", 10, 1)
    assert measured[2:4] == [("one", first, 1), ("two", first, 1)]
    rep2 = measured.index(("two", first, 2))
    assert measured[rep2 + 1] == ("one", first, 2)
    assert len(ms) == 2 * (2 + 2 * 2 * 2 * 2 * 2)  # type: ignore[arg-type]
    assert measured[len(measured) // 2][1] == Case("load", "-", 30, 4)
    # Both systems ran exactly the same operations, and hold the same data at the end.
    assert [e[1:] for e in log if e[0] == "one"] == [e[1:] for e in log if e[0] == "two"]
    assert systems[0].data == systems[1].data
    assert set(systems[0].data) == set(record_keys(20))
    assert all(len(v) == 30 for v in systems[0].data.values())


def test_a_load_cut_short_by_its_time_bound_fails_the_session() -> None:
    system = RecordingSystem()
    settings = Settings(ops=10, seconds=60, repeat=1, inflight=(2,), warmup=0, records=50,
                        workloads=("C",), value_sizes=(10,), load_seconds=0.5)
    # Puts take 100 ms of the system's clock: half a second loads a handful of records.
    import bench.runner
    real = bench.runner.run_operations

    def on_the_system_clock(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real(*args, **{**kwargs, "now": system.clock})

    bench.runner.run_operations = on_the_system_clock  # type: ignore[assignment]
    try:
        [failure] = results_of(Deferred.fromCoroutine(run_session(None, [system], settings)))
    finally:
        bench.runner.run_operations = real  # type: ignore[assignment]
    assert isinstance(failure, Failure) and failure.check(LoadIncomplete)
    assert "of 50 records" in str(failure.value)


def test_the_report_takes_medians_and_divides_the_chain_by_each_system() -> None:
    def m(system: str, rep: int, rate: float, workload: str = "W") -> Measurement:
        latencies = [0.001] * 997 + [0.002, 0.004, 0.008]
        result = RunResult(inflight=32, completed=1000, elapsed=1000 / rate, latencies=latencies)
        return Measurement(system, Case(workload, "zipfian", 100, 32), rep, result, 0.5, 0.25)

    rows = summarize([m("chain", 1, 3000), m("chain", 2, 5000), m("chain", 3, 4000),
                      m("etcd", 1, 2000), m("etcd", 2, 2500), m("etcd", 3, 1000),
                      m("single", 1, 9000), m("redis", 1, 7000)])
    by = {r.system: r for r in rows}
    assert [r.system for r in rows] == ["chain", "etcd", "single", "redis"]
    assert (by["chain"].ops_per_s, by["chain"].ops_per_s_min, by["chain"].ops_per_s_max) == (
        4000, 3000, 5000)
    assert by["chain"].p50_ms == pytest.approx(1.0) and by["chain"].p99_ms == pytest.approx(1.0)
    assert by["chain"].p999_ms == pytest.approx(4.0)
    assert by["chain"].server_cpu_us_per_op == pytest.approx(500)
    assert by["chain"].chain_ratio is None
    assert by["etcd"].chain_ratio == pytest.approx(2.0)
    assert by["single"].chain_ratio == pytest.approx(4000 / 9000)
    table = format_table(rows).splitlines()
    assert table[0].split()[:5] == ["workload", "keys", "value", "B", "in-flight"]
    assert re.match(r"W\s+zipfian\s+100\s+32\s+etcd\s+2,000 \[1,000-2,500\]\s+1\.00\s+1\.00"
                    r"\s+4\.00\s+200%", table[2]), table[2]
    verdicts = target_verdicts(rows, {}, ("zipfian",))
    assert verdicts[0].startswith("PASS: chain put >= etcd put (W, zipfian, 100 B, 32 in flight)")
    assert "ratio 200%" in verdicts[0]
    assert verdicts[1].startswith("NOT MEASURED: chain get >= etcd linearizable get")
    assert verdicts[2].startswith("FAIL: chain put >= 50% of single put") and "44%" in verdicts[2]
    assert verdicts[3].startswith("PASS: stretch chain put >= 50% of redis") and "57%" in verdicts[3]
    assert verdicts[4].startswith("NOT MEASURED: TLS costs at most 20% of chain put")
    alone = [r for r in rows if r.system != "etcd"]
    assert target_verdicts(alone, {"etcd": "etcd missing (Debian package etcd-server)"},
                           ("zipfian",))[0] == (
        "NOT MEASURED: chain put >= etcd put (W, zipfian, 100 B, 32 in flight): etcd not measured")


def test_the_tls_target_divides_the_chain_by_the_chain_over_plaintext() -> None:
    def m(system: str, rate: float, workload: str = "W") -> Measurement:
        result = RunResult(inflight=32, completed=1000, elapsed=1000 / rate,
                           latencies=[0.001] * 1000)
        return Measurement(system, Case(workload, "uniform", 100, 32), 1, result, None, None)

    [tls] = [t for t in TARGETS if t.versus == "chain-plain"]
    cheap = summarize([m("chain", 8500), m("chain-plain", 10000)])
    assert next(r for r in cheap if r.system == "chain-plain").chain_ratio == pytest.approx(0.85)
    assert target_verdicts(cheap, {}, ("uniform",), [tls]) == [
        "PASS: TLS costs at most 20% of chain put throughput (chain >= 80% of chain-plain put) "
        "(W, uniform, 100 B, 32 in flight): chain 8,500 ops/s, chain-plain 10,000 ops/s, "
        "ratio 85% (target >= 80%)"]
    costly = summarize([m("chain", 7000), m("chain-plain", 10000)])
    [verdict] = target_verdicts(costly, {}, ("uniform",), [tls])
    assert verdict.startswith("FAIL: TLS costs") and "ratio 70%" in verdict
    # Gets do not count, and a run without chain-plain says so.
    reads = summarize([m("chain", 1000, "C"), m("chain-plain", 10000, "C"), m("chain", 9000)])
    [verdict] = target_verdicts(reads, {}, ("uniform",), [tls])
    assert verdict.startswith("NOT MEASURED: TLS costs") and "chain-plain not measured" in verdict
