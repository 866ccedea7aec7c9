"""The benchmark's parts, and one tiny real run, so that ``python -m bench`` cannot rot.

Unit tests drive the load generator with hand-fired Deferreds and a fake clock, and the echo
server over iosim. The integration tests run ``python -m bench`` itself for a handful of
operations against real processes, and check that it stops them by PID: after a normal run,
on Ctrl-C, and when a server dies under it.
"""

from __future__ import annotations

import json
import os
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
from bench.report import GOAL_INFLIGHT, goal_verdict, summarize
from bench.runner import Measurement, run_operations
from bench.systems import KVServerSystem, SystemUnderTest, WrongAnswer
from bench.workload import KeyValueWorkload
from chainstore import protocol
from chainstore.limits import check_key

CHECKOUT = Path(__file__).resolve().parent.parent


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


def test_workload_keys_are_valid_distinct_stable_and_fresh_per_tag() -> None:
    w = KeyValueWorkload(key_size=16, value_size=100)
    keys = w.keys("r1n8", 500)
    assert len(set(keys)) == 500
    assert all(len(k) == 16 and check_key(k) for k in keys)
    assert w.keys("r1n8", 500) == keys
    assert not set(w.keys("r2n8", 500)) & set(keys)
    assert len(w.value()) == 100 and w.value() == w.value()
    assert len(KeyValueWorkload(key_size=20, value_size=0).keys("t", 3)[0]) == 20
    with pytest.raises(ValueError):
        KeyValueWorkload(key_size=21)
    with pytest.raises(ValueError):
        KeyValueWorkload(value_size=120_001)


def _measurement(system: str, op: str, inflight: int, rep: int, ops_per_s: float,
                 server_cpu_s: float = 0.5) -> Measurement:
    latencies = [0.001] * 98 + [0.002, 0.005]
    result = RunResult(inflight=inflight, completed=100, elapsed=100 / ops_per_s,
                       latencies=latencies)
    return Measurement(system, op, rep, result, server_cpu_s=server_cpu_s, client_cpu_s=0.25)


def test_summary_takes_medians_over_repetitions_and_divides_by_the_baseline() -> None:
    ms = [
        _measurement("echo", "echo", GOAL_INFLIGHT, 1, 10_000),
        _measurement("echo", "echo", GOAL_INFLIGHT, 2, 12_000),
        _measurement("echo", "echo", GOAL_INFLIGHT, 3, 8_000),
        _measurement("chainstore", "put", GOAL_INFLIGHT, 1, 4_000),
        _measurement("chainstore", "put", GOAL_INFLIGHT, 2, 6_000),
        _measurement("chainstore", "put", GOAL_INFLIGHT, 3, 5_500, server_cpu_s=0.7),
    ]
    rows = summarize(ms, baseline="echo")
    echo, put = rows
    assert (echo.system, echo.ratio) == ("echo", None)
    assert echo.ops_per_s == 10_000 and (echo.ops_per_s_min, echo.ops_per_s_max) == (8_000, 12_000)
    assert put.ops_per_s == 5_500
    assert put.ratio == pytest.approx(0.55)
    assert put.p50_ms == pytest.approx(1.0) and put.p99_ms == pytest.approx(2.0)
    assert put.server_cpu_us_per_op == pytest.approx(5000.0)
    verdict = goal_verdict(rows)
    assert verdict is not None and "55%" in verdict and "NOT" not in verdict

    slow = [m for m in ms if m.system == "echo"] + [
        _measurement("chainstore", "put", GOAL_INFLIGHT, r, 4_000) for r in (1, 2, 3)]
    verdict = goal_verdict(summarize(slow, baseline="echo"))
    assert verdict is not None and "40%" in verdict and "NOT met" in verdict


# -- python -m bench, for real ----------------------------------------------------------------

def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    stderr_path = tmp_path / "bench.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=CHECKOUT,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    return proc, stderr_path


def _started_pids(stderr_path: Path) -> dict[str, int]:
    pids = {}
    for line in stderr_path.read_text().splitlines():
        if line.startswith("started "):
            _, name, _, pid, *_ = line.split()
            pids[name] = int(pid)
    return pids


def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _cleanup(proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
    """Whatever happened, leave no process of ours behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout:
        proc.stdout.close()
    for pid in _started_pids(stderr_path).values():
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.integration
def test_python_m_bench_measures_real_servers_and_stops_them(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc, stderr_path = _bench(tmp_path, "--ops", "40", "--repeat", "2", "--inflight", "1,4",
                               "--warmup", "8", "--seconds", "20", "--json", str(out))
    try:
        stdout, _ = proc.communicate(timeout=60)
    finally:
        _cleanup(proc, stderr_path)
    assert proc.returncode == 0, stderr_path.read_text()
    report = json.loads(out.read_text())
    runs = {(r["system"], r["op"], r["inflight"], r["repetition"]): r for r in report["runs"]}
    assert set(runs) == {(s, op, n, rep) for s, op in
                         (("echo", "echo"), ("chainstore", "put"), ("chainstore", "get"))
                         for n in (1, 4) for rep in (1, 2)}
    # Every get found what its put wrote (the bench checks each value), none was cut short.
    assert all(r["completed"] == 40 and r["ops_per_s"] > 0 and not r["stopped_by_time"]
               and 0 < r["p50_ms"] <= r["p99_ms"] for r in runs.values())
    ratios = {(r["op"], r["inflight"]): r["ratio"] for r in report["summary"]
              if r["system"] == "chainstore"}
    assert set(ratios) == {("put", 1), ("get", 1), ("put", 4), ("get", 4)}
    assert all(ratio > 0 for ratio in ratios.values())
    table = stdout.decode()
    assert "vs echo" in table and "chainstore  put" in table
    pids = [pid for s in report["systems"] for pid in s["pids"]]
    assert len(pids) == 2 and pids == list(_started_pids(stderr_path).values())
    assert all(_gone(pid) for pid in pids)


@pytest.mark.integration
def test_ctrl_c_stops_every_server(tmp_path: Path) -> None:
    # Many short runs: the first progress line proves measuring is under way, and the whole
    # session would last minutes if the interrupt were ignored.
    proc, stderr_path = _bench(tmp_path, "--ops", "50", "--repeat", "10000", "--warmup", "0")
    try:
        _wait_for(lambda: "rep 1" in stderr_path.read_text(), 30, "the first measured run")
        pids = _started_pids(stderr_path)
        assert set(pids) == {"echo", "chainstore"}
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    finally:
        _cleanup(proc, stderr_path)
    assert proc.returncode == 130, stderr_path.read_text()
    assert all(_gone(pid) for pid in pids.values())


@pytest.mark.integration
def test_a_server_dying_mid_run_fails_the_bench_and_stops_the_other(tmp_path: Path) -> None:
    proc, stderr_path = _bench(tmp_path, "--ops", "50", "--repeat", "10000", "--warmup", "0")
    try:
        _wait_for(lambda: "rep 1" in stderr_path.read_text(), 30, "the first measured run")
        pids = _started_pids(stderr_path)
        os.kill(pids["chainstore"], signal.SIGKILL)
        proc.wait(20)
    finally:
        _cleanup(proc, stderr_path)
    assert proc.returncode not in (0, 130)
    assert "RequestFailed" in stderr_path.read_text()
    assert _gone(pids["echo"])


class FakeConnection:
    """Answers every command with a canned response and records what was sent."""

    def __init__(self, answer: dict[str, object]) -> None:
        self.answer = answer
        self.sent: list[tuple[type, dict[str, object]]] = []

    def callRemote(self, command: type, **kwargs: object) -> Deferred[dict[str, object]]:
        self.sent.append((command, kwargs))
        return succeed(self.answer)


def test_kvserver_system_sends_put_and_get_and_rejects_a_wrong_value(tmp_path: Path) -> None:
    system = KVServerSystem(tmp_path)
    conn = FakeConnection({"updated": False})
    results_of(system.request("put", conn, b"k" * 16, b"v" * 100))  # type: ignore[arg-type]
    assert conn.sent == [(protocol.Put, {"key": b"k" * 16, "value": b"v" * 100})]

    right = FakeConnection({"value": b"v" * 100})
    [ok] = results_of(system.request("get", right, b"k" * 16, b"v" * 100))  # type: ignore[arg-type]
    assert right.sent == [(protocol.Get, {"key": b"k" * 16})]
    assert not isinstance(ok, Failure)
    wrong = FakeConnection({"value": b"w" * 100})
    [bad] = results_of(
        system.request("get", wrong, b"k" * 16, b"v" * 100))  # type: ignore[arg-type]
    assert isinstance(bad, Failure) and bad.check(WrongAnswer)
    with pytest.raises(ValueError):
        system.request("echo", conn, b"k", b"v")  # type: ignore[arg-type]


class RecordingSystem(SystemUnderTest):
    """A system without processes: answers at once and records the keys of each operation.

    Each put takes 100 ms of C{clock}; gets take no time at all.
    """

    name = "recording"
    operations = ("put", "get")
    address = ("127.0.0.1", 1)
    pids: list[int] = []

    def __init__(self) -> None:
        self.keys: dict[str, list[bytes]] = {"put": [], "get": []}
        self.clock = FakeClock()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def request(self, op: str, conn: amp.AMP, key: bytes, value: bytes) -> Deferred[None]:
        self.keys[op].append(key)
        if op == "put":
            self.clock.t += 0.1
        return succeed(None)


def test_reads_after_a_time_capped_write_run_use_only_the_written_keys() -> None:
    system = RecordingSystem()
    keys = KeyValueWorkload().keys("t", 1000)
    [done] = results_of(Deferred.fromCoroutine(run_operations(
        system, [None], keys, b"v", inflight=2, seconds=0.5,  # type: ignore[list-item]
        repetition=1, now=system.clock)))
    assert not isinstance(done, Failure), done
    put, get = done  # type: ignore[misc]
    assert put.result.stopped_by_time and 0 < put.result.completed < 1000
    assert system.keys["put"] == keys[:put.result.completed]
    # The gets are not cut short by time: every written key is read, and only those.
    assert not get.result.stopped_by_time
    assert system.keys["get"] == system.keys["put"]
    assert (put.op, get.op, put.repetition) == ("put", "get", 1)
    assert put.server_cpu_s == 0.0 and put.client_cpu_s is not None  # it has no processes
