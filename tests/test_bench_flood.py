"""``python -m bench.flood``: its parts without sockets, and one short real run (small numbers,
no timed assertions) that must finish, report every figure and stop its servers."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp

from bench.flood import (KEY, Flooder, ProbeResult, amp_flood, console_flood, parse_args, probe,
                         verdicts)
from chainstore import protocol
from harness.processes import pid_alive
from benchrun import start_module, stop


def test_the_amp_flood_is_one_get_box_per_request_each_asking_an_answer() -> None:
    boxes = amp.parseString(amp_flood(3))
    assert [box[b"_command"] for box in boxes] == [protocol.Get.commandName] * 3
    assert len({box[b"_ask"] for box in boxes}) == 3
    assert [protocol.Get.parseArguments(box, None)["key"] for box in boxes] == [KEY] * 3
    assert console_flood(2) == b"get flood-key\r\nget flood-key\r\n"


def test_the_flooder_writes_everything_then_stops_reading() -> None:
    plain = Flooder(b"payload", tls=False)
    transport = StringTransport()
    plain.makeConnection(transport)
    assert transport.value() == b"payload" and transport.producerState == "paused"
    assert plain.flooded.called
    # Over TLS nothing is written (nor reading stopped) before the handshake is done.
    tls = Flooder(b"payload", tls=True)
    transport = StringTransport()
    tls.makeConnection(transport)
    assert transport.value() == b"" and transport.producerState == "producing"
    tls.handshakeCompleted()
    assert transport.value() == b"payload" and transport.producerState == "paused"


def _run(clock: Clock, coroutine: Any, seconds: float) -> None:
    d = Deferred.fromCoroutine(coroutine)
    for _ in range(int(seconds * 100) + 10):
        clock.advance(0.01)
    assert d.called


def test_the_probe_keeps_its_pace_and_counts_a_request_left_unanswered() -> None:
    clock = Clock()
    served = ProbeResult()
    _run(clock, probe(clock, lambda: succeed(b"v"), lambda a: a == b"v", 1.0, 0.1, served), 1.0)
    assert len(served.latencies) == 10 and max(served.latencies) == 0
    assert not served.unanswered and not served.errors
    # The server stops answering: the request waits until the window ends, and its age is
    # the worst latency.
    clock = Clock()
    answers = iter([succeed(b"v"), Deferred()])
    stuck = ProbeResult()
    _run(clock, probe(clock, lambda: next(answers), lambda a: a == b"v", 1.0, 0.1, stuck), 1.0)
    assert stuck.unanswered == 1 and stuck.latencies[0] == 0
    assert stuck.latencies[1] == pytest.approx(0.9, abs=0.02)
    assert stuck.summary()["worst_ms"] == pytest.approx(900, abs=20)
    # A wrong answer ends the probe with an error.
    clock, wrong = Clock(), ProbeResult()
    _run(clock, probe(clock, lambda: succeed(b"x"), lambda a: a == b"v", 1.0, 0.1, wrong), 0.0)
    assert wrong.errors and "b'x'" in wrong.errors[0]


def _result(growth: float, worst: float, unanswered: int = 0) -> dict[str, Any]:
    return {"scenario": "amp", "tls": True, "gets": 5000, "rss_before_mib": 50.0,
            "rss_peak_mib": 50.0 + growth, "rss_growth_mib": growth,
            "other_during": {"requests": 90, "unanswered": unanswered, "errors": [],
                             "p50_ms": 1.0, "worst_ms": worst}}


def test_the_verdicts_judge_the_growth_and_the_worst_latency() -> None:
    assert verdicts([_result(12.5, 40.0)]) == [
        "PASS: amp flood (5,000 gets never read, TLS): server RSS grows at most 64 MiB: grew "
        "12.5 MiB (50.0 -> 62.5 MiB)",
        "PASS: amp flood (5,000 gets never read, TLS): the other client served within 1 s: "
        "worst 40.0 ms over 90 gets"]
    grew, slow = verdicts([_result(64.1, 1000.5)])
    assert grew.startswith("FAIL") and "grew 64.1 MiB" in grew
    assert slow.startswith("FAIL") and "worst 1000.5 ms" in slow
    _, stuck = verdicts([_result(1.0, 300.0, unanswered=1)])
    assert stuck.startswith("FAIL") and "unanswered" in stuck


def test_the_options_are_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--gets", "0"], ["--gets", "100001"], ["--seconds", "1000"],
                ["--scenarios", "console,http"], ["--scenarios", "amp,amp"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert parse_args(["--scenarios", "amp"]).scenarios == ("amp",)


@pytest.mark.integration
def test_python_m_bench_flood_floods_the_console_and_amp_and_stops_its_servers(
        tmp_path: Path) -> None:
    out, stderr_path = tmp_path / "flood.json", tmp_path / "flood.stderr"
    proc = start_module("bench.flood", ["--gets", "300", "--seconds", "2", "--baseline", "0.5",
                                        "--settle", "0.2", "--json", str(out)], stderr_path)
    try:
        stdout, _ = proc.communicate(timeout=90)
    finally:
        stop(proc)
        for match in re.finditer(r"started \S+ pid (\d+)", stderr_path.read_text()):
            if pid_alive(int(match[1])):
                os.kill(int(match[1]), signal.SIGKILL)
    assert proc.returncode == 0, stderr_path.read_text()
    report = json.loads(out.read_text())
    by = {r["scenario"]: r for r in report["scenarios"]}
    assert set(by) == {"console", "amp"}
    assert by["console"]["tls"] is False and by["amp"]["tls"] is True
    for r in by.values():
        assert r["gets"] == 300 and r["value_bytes"] == 120_000 and r["rss_samples"] >= 3
        assert 0 < r["rss_before_mib"] <= r["rss_peak_mib"]
        assert r["rss_growth_mib"] == pytest.approx(r["rss_peak_mib"] - r["rss_before_mib"],
                                                    abs=0.11)
        # The server did answer, and the flooder read none of it.
        assert r["unread_reply_bytes"] > 0
        before, during = r["other_before"], r["other_during"]
        assert before["requests"] >= 1 and during["requests"] >= 1 and not during["errors"]
        assert 0 < during["p50_ms"] <= during["worst_ms"]
        assert not pid_alive(r["server_pid"])
    assert len(report["targets"]) == 4
    assert all(re.match(r"(PASS|FAIL): (console|amp) flood \(300 gets", t)
               for t in report["targets"])
    assert "growth MiB" in stdout.decode() and report["targets"][0] in stdout.decode()
