"""bench.reconfig: the judging, formatting and memory parsing without processes (a Clock and fake
connections), and one small real run of a join and a leave that must stop everything it
started."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock

from bench import cluster, reconfig
from bench.cluster import MeasurementFailed, pick_leaving, share
from bench.cpu_watch import CPUWatch
from bench.dataset import key_of, keys_to_verify, load, value_of, verify, version_of
from bench.memory import MemorySampler, parse_memory, read_memory
from bench.reconfig import copy_step, ecs_summary, parse_ops, parse_sizes
from bench.reconfig_report import (OpResult, SizeResult, compare, format_report, format_table,
                                   latency_by_step)
from bench.systems import ChainRouter
from bench.writer import Writer
from chainstore import protocol
from chainstore.errors import KeyNotFound, NotResponsible, ServerStopped, WriteLocked
from chainstore.ring import NodeInfo, Ring
from harness.processes import pid_alive
from benchrun import start_module, stop

# The benchmark's "ECS pid 1234 on ..."; the servers' PIDs are in each ECS's launched.json.
_ECS_PID = re.compile(r"^ECS pid (\d+)", re.M)

STATUS = """Name:\tpython3
State:\tS (sleeping)
VmPeak:\t  310000 kB
VmSize:\t  300000 kB
VmHWM:\t   81234 kB
VmRSS:\t   61234 kB
RssAnon:\t   40000 kB
Threads:\t1
"""


# -- memory ---------------------------------------------------------------------------------------


def test_parse_memory_reads_vmrss_and_vmhwm_in_kib() -> None:
    assert parse_memory(STATUS) == (61234, 81234)
    # A zombie's status has no Vm lines.
    assert parse_memory("Name:\tpython3\nState:\tZ (zombie)\n") is None
    with pytest.raises(ValueError):
        parse_memory("VmRSS:\t 12 MB\nVmHWM:\t 12 kB\n")


def test_read_memory_reads_a_live_process_and_none_for_a_gone_one() -> None:
    rss, hwm = read_memory(os.getpid()) or (0, 0)
    assert 0 < rss <= hwm
    # Grow this process by 64 MiB: both figures must see it.
    ballast = bytearray(64 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    rss_after, hwm_after = read_memory(os.getpid()) or (0, 0)
    assert rss_after >= rss + 60 * 1024 and hwm_after >= rss_after
    del ballast
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert read_memory(pid_max + 1) is None


def test_memory_sampler_keeps_each_processes_peak_per_phase() -> None:
    clock = Clock()
    pids = {"server1": 11}
    memory: dict[int, tuple[int, int] | None] = {11: (1000, 1500)}
    sampler = MemorySampler(clock, lambda: dict(pids), lambda pid: memory[pid], interval=0.2)
    sampler.start("load")
    memory[11] = (3000, 3000)
    clock.advance(0.2)
    memory[11] = (2000, 3000)
    clock.advance(0.2)
    memory[11] = (3100, 3100)
    sampler.set_phase("join")  # samples the end of "load" and the start of "join" (3100)
    memory[11] = (2500, 3200)
    # A server launched during the join is picked up at the next tick.
    pids["server4"] = 44
    memory[44] = (500, 600)
    memory[11] = (2500, 3200)
    clock.advance(0.2)
    # The leaving server is gone: it keeps what was seen of it.
    memory[44] = None
    clock.advance(0.2)
    sampler.set_phase("after join")
    memory[11] = (1800, 3200)
    sampler.stop()
    assert sampler.rss == {"server1": {"load": 3100, "join": 3100, "after join": 2500},
                           "server4": {"join": 500}}
    assert sampler.hwm == {"server1": 3200, "server4": 600}
    assert sampler.peaks() == {"server1": 3200, "server4": 600}
    assert sampler.phases == ["load", "join", "after join"]
    assert not clock.getDelayedCalls()


def test_memory_sampler_survives_a_failing_read() -> None:
    clock = Clock()

    def read(pid: int) -> tuple[int, int]:
        if pid == 1:
            raise PermissionError("no")
        return (10, 20)

    sampler = MemorySampler(clock, lambda: {"a": 1, "b": 2}, read, interval=0.2)
    sampler.start("load")
    clock.advance(0.2)
    assert sampler.rss == {"b": {"load": 10}} and sampler.samples == 2
    sampler.stop()


# -- figures and judging --------------------------------------------------------------------------


def _op(op: str = "join", client: float | None = 0.05, ecs_locked: float = 0.06,
        moved_bytes: int = 10_000_000, ecs_seconds: float = 2.0) -> OpResult:
    return OpResult(
        op=op, server="server4", seconds=3.0, ecs_seconds=ecs_seconds,
        ecs_locked_seconds=ecs_locked, moved_keys=80_000, moved_bytes=moved_bytes,
        copy_seconds=1.25, copy_bytes=5_000_000,
        refused_first=None if client is None else 1.0,
        refused_last=None if client is None else 1.0 + client, refused_answers=7,
        writes=1500, accepted_during=1400, write_p50_ms=1.5, write_p99_ms=9.0,
        write_max_ms=20.0, not_responsible_answers=2, stopped_answers=0, lost_answers=1,
        skipped_writes=0, errors=[], steps=[(0.1, "copying"), (1.4, "catching up")],
        store_keys={"server1": {"coordinator": 5, "replica1": 6, "replica2": 7}},
        epoch_before=1, epoch_after=2, ring_after=["server1", "server4"],
        stalls={"server1": (23.4, 21.0), "server4": (0.0, 0.0)},
        by_step=[("copying", 900, 3, 61.5), ("switching", 40, 12, 230.0)],
        cpu_seconds={"server1": 1.25, "server4": 0.75})


def _size(keys: int, ops: list[OpResult], peak_mib: float) -> SizeResult:
    peak = int(peak_mib * 1024)
    return SizeResult(
        keys=keys, replication=3, value_bytes=100, load_seconds=10.0, ops=ops,
        verified_keys=keys, verified="all", problems=[],
        rss_kib={"server1": {"load": peak - 100, "join": peak}},
        peak_kib={"server1": peak, "server2": peak // 2}, rss_samples=50,
        data_bytes={"server1": 30 * 2**20}, pids={})


def test_an_operation_reports_mb_per_s_and_the_client_window() -> None:
    o = _op(client=0.25, moved_bytes=10_000_000, ecs_seconds=2.0)
    assert o.mb_per_s == pytest.approx(5.0)
    assert o.copy_mb_per_s == pytest.approx(4.0)
    assert o.refused_window == pytest.approx(0.25)
    assert _op(client=None).refused_window is None
    assert _op(ecs_seconds=0.0).mb_per_s == 0.0


def test_compare_judges_the_windows_per_operation_and_the_memory() -> None:
    ok = compare([_size(100_000, [_op("join", 0.05, 0.06), _op("leave", 0.04, 0.05)], 60),
                  _size(1_000_000, [_op("join", 0.07, 0.08), _op("leave", 0.05, 0.06)], 66)])
    assert ok is not None and ok.count("PASS") == 5 and "FAIL" not in ok
    assert "66 MiB at 1,000,000 keys" in ok and "10x the data" in ok
    grew = compare([_size(100_000, [_op("join", 0.05, 0.06)], 60),
                    _size(1_000_000, [_op("join", 0.9, 0.95)], 200)]) or ""
    assert [line.split(":")[0] for line in grew.splitlines()] == ["FAIL", "FAIL", "FAIL"]
    # Over a second fails even if it did not grow; the order of the sizes does not matter.
    slow = compare([_size(1_000_000, [_op("leave", 1.3, 0.2)], 60),
                    _size(100_000, [_op("leave", 1.2, 0.2)], 60)]) or ""
    assert [line.split(":")[0] for line in slow.splitlines()] == ["FAIL", "PASS", "PASS"]
    assert "leave client-observed" in slow.splitlines()[0]
    missing = compare([_size(300, [_op("join", None)], 50), _size(600, [_op("join")], 50)]) or ""
    assert "join: client-observed write-refused time not measured" in missing
    assert compare([_size(100_000, [_op()], 60)]) is None


def test_reports_show_every_figure() -> None:
    r = _size(100_000, [_op("join", 0.25), _op("leave", None)], 60)
    text = format_report(r)
    assert "100,000 keys x 100 B in 10.0 s (10,000 puts/s" in text
    assert "5.00 MB/s overall, 4.00 MB/s in the copy step" in text
    assert "0.250 s: first server_write_lock at +1.000 s, last at +1.250 s, 7 refusals" in text
    assert "no server_write_lock answer" in text
    assert "server1 5/6/7" in text
    assert "RSS server1 (MiB)" in text and "load 60, join 60; peak 60 (VmHWM)" in text
    assert "data on disk 30 MiB" in text
    assert "copying 900/3/62, switching 40/12/230" in text
    assert "2.00 s (25 us per key moved): server1 1.25, server4 0.75" in text
    table = format_table([r]).splitlines()
    assert len(table) == 3
    assert "reactor stalls" in text and "server1 23 ms (21), server4 < 10 ms" in text
    assert table[1].split() == ["100,000", "join", "3.00", "2.00", "80,000", "10.0", "5.00",
                                "4.00", "0.250", "0.060", "9/20", "23", "2.0", "60"]
    assert table[2].split()[8] == "-"


def test_cpu_watch_counts_each_server_from_its_first_reading_to_its_last() -> None:
    clock = Clock()
    cpu = {101: 5.0, 102: 7.0}
    pids = {"server1": 101, "server2": 102}
    watch = CPUWatch(clock, lambda: dict(pids), lambda pid: cpu.get(pid), interval=0.2)
    watch.start()
    cpu[101] += 0.5
    pids["server4"], cpu[104] = 104, 1.0  # joins: counted from its first reading
    clock.advance(0.2)
    cpu[104] += 0.25
    del cpu[102]  # leaves: counted until its last reading
    clock.advance(0.2)
    cpu[101] += 0.5
    watch.stop()
    assert watch.spent() == {"server1": 1.0, "server2": 0.0, "server4": 0.25}


def test_writes_are_grouped_by_the_step_shown_when_they_were_sent() -> None:
    steps = [(0.5, "copying"), (2.0, "locking writes"), (2.2, "switching")]
    # (answered at, latency): sent at 0.1, 0.45, 1.0, 2.1, 2.21 and 2.3
    answers = [(0.11, 0.01), (0.52, 0.07), (1.002, 0.002), (2.3, 0.2), (2.26, 0.05), (2.4, 0.1)]
    accepted, latencies = [a for a, _ in answers], [lat for _, lat in answers]
    assert latency_by_step(accepted, latencies, steps) == [
        ("before", 2, 1, pytest.approx(70.0)), ("copying", 1, 0, pytest.approx(2.0)),
        ("locking writes", 1, 1, pytest.approx(200.0)), ("switching", 2, 1, pytest.approx(100.0))]
    assert latency_by_step([], [], steps) == []


def test_ecs_summary_takes_the_operations_own_line() -> None:
    log = "\n".join([
        "2026-01-01 [ecs.coordinator#info] epoch 1: adding server1, server2, server3 done in "
        "0.05s, moved 0 keys (0 bytes); writes to the moved ranges were refused for 0.000s",
        "2026-01-01 [ecs.coordinator#info] epoch 2: adding server4 done in 2.50s, moved 85771 "
        "keys (10292520 bytes); writes to the moved ranges were refused for 0.034s",
        "2026-01-01 [ecs.coordinator#info] epoch 3: removing server3 done in 1.75s, moved 100 "
        "keys (12000 bytes); writes to the moved ranges were refused for 0.020s",
    ])
    assert ecs_summary(log, "adding server4") == {
        "epoch": 2, "seconds": 2.5, "keys": 85771, "bytes": 10292520, "locked": 0.034}
    assert ecs_summary(log, "removing server3") == {
        "epoch": 3, "seconds": 1.75, "keys": 100, "bytes": 12000, "locked": 0.02}
    assert ecs_summary(log, "removing server1") is None
    assert ecs_summary(log, "adding server") is None


def test_the_copy_step_runs_from_copying_to_the_next_step() -> None:
    progress = [(0.1, "planning", 0), (0.2, "copying", 0), (0.3, "copying", 1000),
                (1.2, "copying", 9000), (1.3, "catching up", 10_000), (1.4, "dropping", 11_000)]
    seconds, nbytes = copy_step(progress)
    assert seconds == pytest.approx(1.1) and nbytes == 10_000
    assert copy_step([(0.1, "copying", 0)]) == (None, 0)
    assert copy_step([(0.4, "catching up", 10)]) == (None, 0)


def test_keys_to_verify_are_all_up_to_the_sample_and_always_the_overwritten() -> None:
    every, which = keys_to_verify(500, {3: 7, 9: 2}, 500)
    assert every == list(range(500)) and "all 500 keys" in which
    acked = {999_999: 4, 12: 3}
    sampled, which = keys_to_verify(1_000_000, acked, 1000)
    assert 1000 <= len(sampled) <= 1002 and set(acked) <= set(sampled)
    assert sampled == sorted(set(sampled)) and "uniform sample of 1,000" in which
    assert keys_to_verify(1_000_000, acked, 1000)[0] == sampled  # seeded
    assert max(sampled) == 999_999 and min(sampled) < 10_000  # spread over the whole range


def test_values_carry_their_key_and_version() -> None:
    value = value_of(b"key000000000042", 100, 417)
    assert len(value) == 100 and value.startswith(b"key000000000042/417/")
    assert version_of(value) == 417
    assert key_of(42) == b"key000000000042"


def test_options_are_checked() -> None:
    assert parse_sizes("100000,1000000") == [100_000, 1_000_000]
    assert parse_ops("join,leave") == ["join", "leave"] and parse_ops("join") == ["join"]
    for bad in ("leave", "leave,join", "join,join", "split", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_ops(bad)
    for bad in ("0", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sizes(bad)
    args = reconfig.parse_args([])
    assert (args.keys, args.replication, args.ops, args.value_bytes) == (
        [100_000, 1_000_000], 3, ["join", "leave"], 100)
    with pytest.raises(SystemExit):
        reconfig.parse_args(["--replication", "2"])


def _node(name: str, port: int) -> NodeInfo:
    return NodeInfo(name, "127.0.0.1", port, port + 1)


def test_the_leaving_server_heads_the_share_asked_for() -> None:
    pool = [_node(f"server{i}", 40_000 + 10 * i) for i in range(1, 5)]
    shares = {n.name: share(pool, n) for n in pool}
    assert sum(shares.values()) == pytest.approx(1.0)
    leaving = pick_leaving(pool, (0.0, 1.0))
    assert leaving is not None and leaving.name != "server4"
    # The one nearest the middle of the interval.
    assert leaving == min(pool[:3], key=lambda n: abs(shares[n.name] - 0.5))
    low = min(shares[n.name] for n in pool[:3])
    only = pick_leaving(pool, (low, low))
    assert only is not None and shares[only.name] == low
    assert pick_leaving(pool, (0.999, 0.9999)) is None


# -- the writer and the read-back -----------------------------------------------------------------


class FakeServer:
    """An AMP connection's stand-in: answers each command by the function given, and records."""

    def __init__(self, name: str, answer: Any) -> None:
        self.name = name
        self.answer = answer
        self.sent: list[tuple[type, dict[str, Any]]] = []

    def callRemote(self, command: type, **kwargs: Any) -> Deferred[Any]:
        self.sent.append((command, kwargs))
        try:
            return succeed(self.answer(command, kwargs))
        except Exception as e:
            return fail(e)


def test_the_writer_holds_its_rate_counts_refusals_and_follows_the_new_ring() -> None:
    clock = Clock()
    old = Ring((_node("a", 1000), _node("b", 2000), _node("c", 3000)), epoch=1, replication=1)
    new = Ring((_node("a", 1000), _node("c", 3000)), epoch=2, replication=1)
    phase = {"b": "locked"}

    def b_answer(command: type, kwargs: dict[str, Any]) -> dict[str, Any]:
        if command is protocol.GetMetadata:
            raise ConnectionDone("b left")
        if phase["b"] == "locked":
            raise WriteLocked("moving")
        raise ConnectionDone("b left")

    def live_answer(command: type, kwargs: dict[str, Any]) -> dict[str, Any]:
        if command is protocol.GetMetadata:
            return protocol.ring_to_wire(new if phase["b"] == "gone" else old)
        return {"updated": True}

    conns = {"a": FakeServer("a", live_answer), "b": FakeServer("b", b_answer),
             "c": FakeServer("c", live_answer)}
    acked: dict[int, int] = {}
    writer = Writer(clock, ChainRouter(old, conns), keys=200, value_size=64, rate=100.0,
                    max_outstanding=8, acked=acked, first_version=1000)
    writer.start()
    clock.pump([0.01] * 100)  # one second
    assert 99 <= writer.writes <= 102
    locked = len(writer.log.refused)
    assert locked > 10 and writer.log.lost == [] and writer.router.ring.epoch == 1
    phase["b"] = "gone"
    clock.pump([0.01] * 100)
    # b closed its connection: the writer asked the others and routes by epoch 2 from then on.
    assert writer.router.ring.epoch == 2 and len(writer.log.lost) >= 1
    sent_to_b = len(conns["b"].sent)
    clock.pump([0.01] * 100)
    assert len(conns["b"].sent) == sent_to_b and len(writer.log.refused) == locked
    d = Deferred.fromCoroutine(writer.stop())
    assert d.called and writer.outstanding == 0 and writer.log.errors == []
    accepted = writer.writes - len(writer.log.refused) - len(writer.log.lost)
    assert len(writer.log.accepted) == accepted and len(writer.log.latencies) == accepted
    # Every acknowledged key at the highest version it was acknowledged with; none of b's.
    assert acked and all(1000 < v <= writer.version for v in acked.values())
    assert all(old.head(key_of(i)).name != "b" or new.head(key_of(i)).name != "b"
               for i in acked)
    assert writer.version == 1000 + writer.writes


def test_the_writer_bounds_its_outstanding_writes_and_keeps_the_highest_acked_version() -> None:
    clock = Clock()
    ring = Ring((_node("a", 1000),), epoch=1, replication=1)
    pending: list[Deferred[Any]] = []

    class Slow:
        def callRemote(self, command: type, **kwargs: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

    acked: dict[int, int] = {}
    writer = Writer(clock, ChainRouter(ring, {"a": Slow()}), keys=1, value_size=64, rate=100.0,
                    max_outstanding=4, acked=acked, first_version=0)
    writer.start()
    clock.pump([0.01] * 50)
    assert writer.outstanding == 4 and len(pending) == 4 and writer.log.skipped >= 45
    # The answers come back newest first: the key keeps the highest version acknowledged.
    for d in reversed(pending):
        d.callback({"updated": True})
    stopping = Deferred.fromCoroutine(writer.stop())
    clock.advance(0.01)
    assert stopping.called and writer.outstanding == 0
    assert acked == {0: 4} and writer.version == 4


def test_the_writer_asks_for_the_ring_when_a_server_is_not_responsible() -> None:
    clock = Clock()
    old = Ring((_node("a", 1000), _node("b", 2000)), epoch=4, replication=1)
    new = Ring((_node("a", 1000), _node("b", 2000), _node("c", 3000)), epoch=5, replication=1)
    moved = {key_of(i) for i in range(50) if new.head(key_of(i)).name == "c"}
    assert moved

    def answer(command: type, kwargs: dict[str, Any]) -> dict[str, Any]:
        if command is protocol.GetMetadata:
            return protocol.ring_to_wire(new)
        if kwargs["key"] in moved:
            raise NotResponsible("ask c")
        return {"updated": True}

    conns = {n: FakeServer(n, answer) for n in "abc"}
    writer = Writer(clock, ChainRouter(old, {"a": conns["a"], "b": conns["b"]}), keys=50,
                    value_size=64, rate=200.0, max_outstanding=8, acked={}, first_version=0)
    # The router dials no one: c's connection is already known to it.
    writer.router.conns["c"] = conns["c"]
    writer.start()
    clock.pump([0.01] * 200)
    Deferred.fromCoroutine(writer.stop())
    assert writer.router.ring.epoch == 5 and writer.log.not_responsible
    assert any(kw.get("key") in moved for _, kw in conns["c"].sent)


def test_verify_finds_lost_old_and_garbled_values() -> None:
    ring = Ring((_node("a", 1000),), epoch=1, replication=1)
    stored = {key_of(i): value_of(key_of(i), 64, 0) for i in range(10)}
    stored[key_of(3)] = value_of(key_of(3), 64, 9)
    stored[key_of(4)] = value_of(key_of(4), 64, 5)  # 7 was acknowledged
    del stored[key_of(5)]
    stored[key_of(6)] = value_of(key_of(6), 64, 0)[:-1] + b"!"

    def answer(command: type, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs["key"] not in stored:
            raise KeyNotFound("no")
        return {"value": stored[kwargs["key"]]}

    router = ChainRouter(ring, {"a": FakeServer("a", answer)})
    problems: list[str] = []
    d = Deferred.fromCoroutine(verify(router, list(range(10)), {3: 8, 4: 7}, 64, problems))
    assert d.called and d.result == 10
    [problem] = problems
    assert problem.startswith("3 acknowledged writes lost")
    assert "key000000000004 holds version 5, 7 was acknowledged" in problem
    assert "key000000000005 is missing" in problem and "key000000000006 holds a garbled" in problem
    clean: list[str] = []
    Deferred.fromCoroutine(verify(router, [0, 1, 3], {3: 9}, 64, clean))
    assert clean == []


# -- starting: waiting for the ring, loading -------------------------------------------------------


def test_wait_serving_waits_for_a_whole_idle_serving_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    members = [{"name": n, "connected": True} for n in ("server1", "server2", "server3")]
    ready = {"serving": True, "operation": None, "ring": ["server1", "server2", "server3"],
             "members": members}
    answers: list[Any] = [
        ConnectionDone("not listening yet"),
        {**ready, "serving": False},
        {**ready, "operation": {"step": "copying"}},
        {**ready, "ring": ["server1", "server2"]},
        {**ready, "members": members[:2] + [{"name": "server3", "connected": False}]},
        ready,
    ]
    asked: list[float] = []

    async def status_of(reactor: Any, ecs: Any) -> dict[str, Any]:
        asked.append(clock.seconds())
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(cluster, "status_of", status_of)
    ecs = SimpleNamespace(running=True)
    d = Deferred.fromCoroutine(cluster.wait_serving(clock, ecs, 3, timeout=5.0))
    clock.pump([0.1] * 4)
    assert not d.called and len(asked) == 5
    clock.advance(0.1)
    assert d.called and d.result is ready and answers == []
    # Never serving: it gives up after its timeout, saying what it saw last.
    answers.extend([{**ready, "serving": False}] * 100)
    late = Deferred.fromCoroutine(cluster.wait_serving(clock, ecs, 3, timeout=2.0))
    failed: list[Any] = []
    late.addErrback(failed.append)
    clock.pump([0.1] * 25)
    assert failed and failed[0].check(MeasurementFailed)
    assert "'serving': False" in str(failed[0].value)
    assert not clock.getDelayedCalls()


def _two_servers(a_answer: Any, b_answer: Any) -> ChainRouter:
    ring = Ring((_node("a", 1000), _node("b", 2000)), epoch=1, replication=1)
    return ChainRouter(ring, {"a": FakeServer("a", a_answer), "b": FakeServer("b", b_answer)})


def test_the_load_retries_puts_refused_while_the_servers_start() -> None:
    # The flake this guards against: the ECS said serving before every server had taken its
    # SetState running, and the load's first puts were refused (ServerStopped).
    clock = Clock()
    stored: dict[bytes, bytes] = {}
    refused = {"stopped": 0, "not responsible": 0}

    def a_answer(command: type, kwargs: dict[str, Any]) -> dict[str, Any]:
        if refused["not responsible"] < 3:
            refused["not responsible"] += 1
            raise NotResponsible("no ring yet")
        stored[kwargs["key"]] = kwargs["value"]
        return {"updated": False}

    def b_answer(command: type, kwargs: dict[str, Any]) -> dict[str, Any]:
        if clock.seconds() < 0.3:
            refused["stopped"] += 1
            raise ServerStopped("the server is not serving requests")
        stored[kwargs["key"]] = kwargs["value"]
        return {"updated": False}

    router = _two_servers(a_answer, b_answer)
    assert {router.head(key_of(i)) for i in range(40)} == set(router.conns.values())
    d = Deferred.fromCoroutine(load(clock, router, 40, 64, inflight=8, limit=60.0))
    assert not d.called
    clock.pump([0.01] * 100)
    assert d.called
    assert 0.3 <= d.result <= 1.0
    assert refused["stopped"] >= 1 and refused["not responsible"] == 3
    assert stored == {key_of(i): value_of(key_of(i), 64, 0) for i in range(40)}
    assert not clock.getDelayedCalls()


def test_the_load_gives_up_on_a_server_that_never_serves_and_retries_nothing_else() -> None:
    clock = Clock()

    def stopped(command: type, kwargs: dict[str, Any]) -> dict[str, Any]:
        raise ServerStopped("the server is not serving requests")

    def accept(command: type, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"updated": False}

    d = Deferred.fromCoroutine(load(clock, _two_servers(accept, stopped), 40, 64, inflight=4,
                                    limit=60.0, retry_for=2.0))
    failed: list[Any] = []
    d.addErrback(failed.append)
    clock.pump([0.01] * 150)
    assert not failed
    clock.pump([0.01] * 100)
    # The worker's own error, not gatherResults' FirstError wrapper: main() reports it.
    assert failed and failed[0].check(MeasurementFailed)
    assert "still refused" in str(failed[0].value) and "ServerStopped" in str(failed[0].value)
    assert not clock.getDelayedCalls()  # every worker gave up: nothing retries forever

    def broken(command: type, kwargs: dict[str, Any]) -> dict[str, Any]:
        raise KeyNotFound("not a refusal to retry")

    other = Deferred.fromCoroutine(load(clock, _two_servers(broken, broken), 4, 64, inflight=2,
                                        limit=60.0))
    failed = []
    other.addErrback(failed.append)
    assert failed and failed[0].check(KeyNotFound) and not clock.getDelayedCalls()


# -- a real run -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_reconfig_measures_a_join_and_a_leave_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "reconfig.json"
    stderr_path = tmp_path / "reconfig.stderr"
    proc = start_module(
        "bench.reconfig", ["--keys", "300,600", "--rate", "200", "--replication", "3",
                           "--ops", "join,leave", "--workdir", str(tmp_path / "work"),
                           "--json", str(out)],
        stderr_path)
    try:
        stdout, _ = proc.communicate(timeout=60)
    finally:
        stop(proc)
        # Whatever the benchmark did, nothing it started outlives the test.
        started = [int(pid) for pid in _ECS_PID.findall(stderr_path.read_text())]
        for record in (tmp_path / "work").glob("keys-*/ecs/launched.json"):
            started += [launch["server_pid"]
                        for launch in json.loads(record.read_text())["launched"]]
        left = [pid for pid in started if pid_alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr_path.read_text()
    assert len(started) == 2 * (1 + 4) and left == []
    report = json.loads(out.read_text())
    assert [r["keys"] for r in report["results"]] == [300, 600]
    for r in report["results"]:
        assert r["problems"] == [] and r["replication"] == 3
        assert r["verified_keys"] == r["keys"]
        join, leave = r["ops"]
        assert (join["op"], join["server"], join["epoch_before"], join["epoch_after"]) == (
            "join", "server4", 1, 2)
        assert (leave["op"], leave["epoch_before"], leave["epoch_after"]) == ("leave", 2, 3)
        assert leave["server"] in ("server1", "server2", "server3")
        assert len(join["ring_after"]) == 4 and leave["server"] not in leave["ring_after"]
        for o in (join, leave):
            assert 0 < o["moved_keys"] <= 3 * r["keys"] and o["moved_bytes"] > 0
            # The ECS's own time is inside the client's (its log rounds to 10 ms).
            assert 0 <= o["ecs_locked_seconds"] <= o["ecs_seconds"] + 0.01
            assert 0 <= o["ecs_seconds"] <= o["seconds"] + 0.01 < 20
            assert o["mb_per_s"] == (pytest.approx(o["moved_bytes"] / 1e6 / o["ecs_seconds"])
                                     if o["ecs_seconds"] else 0.0)
            if o["refused_window"] is not None:
                assert 0 <= o["refused_first"] <= o["refused_last"] <= o["seconds"] + 1
                assert o["refused_answers"] >= 1
            assert o["writes"] > 0 and o["errors"] == []
            # Every key on exactly one server per chain position.
            for store in ("coordinator", "replica1", "replica2"):
                assert sum(c[store] for c in o["store_keys"].values()) == r["keys"]
            assert set(o["store_keys"]) == set(o["ring_after"])
        # Memory: every server was sampled, with sane figures, in the phases it lived through.
        assert set(r["peak_kib"]) == {"server1", "server2", "server3", "server4"}
        assert all(10 * 1024 < kib < 1024 * 1024 for kib in r["peak_kib"].values())
        assert r["max_peak_kib"] == max(r["peak_kib"].values())
        assert {"load", "loaded", "join"} <= set(r["rss_kib"]["server1"])
        assert "load" not in r["rss_kib"]["server4"] and "join" in r["rss_kib"]["server4"]
        # The ECS and every server it launched (four) were stopped by the benchmark itself.
        launched = [pid for pids in r["pids"]["servers"].values() for pid in pids]
        assert len(launched) == 4
        assert not pid_alive(r["pids"]["ecs"]) and not any(pid_alive(p) for p in launched)
    text = stdout.decode()
    assert "writes refused (client)" in text and "peak RSS MiB" in text
    # Per operation, the client's window (unless a size saw no refusal) and the ECS's; memory.
    verdict = report["verdict"].splitlines()
    assert len(verdict) == 5
    for line, op, what in zip(verdict, ("join", "join", "leave", "leave"),
                              ("client-observed", "ECS lock") * 2):
        assert re.match(rf"(PASS|FAIL): {op} {what} write-refused time [\d.]+ s at 300 keys, "
                        rf"[\d.]+ s at 600 keys", line) or \
            line == f"{op}: {what} write-refused time not measured at both sizes", line
    assert re.match(r"(PASS|FAIL): peak server RSS \d+ MiB at 300 keys", verdict[4])


def test_stall_watch_keeps_each_servers_largest_stall_inside_the_window() -> None:
    from bench.stalls import StallWatch
    watch = StallWatch(None, {}, None)
    watch.stalls = {"server1": {10.0: (80.0, 70.0), 20.0: (30.0, 2.0), 31.0: (15.0, 1.0)},
                    "server2": {5.0: (500.0, 1.0)}}
    assert watch.largest(15.0, 32.0) == {"server1": (30.0, 2.0), "server2": (0.0, 0.0)}
    assert watch.largest(0.0, 40.0) == {"server1": (80.0, 70.0), "server2": (500.0, 1.0)}
