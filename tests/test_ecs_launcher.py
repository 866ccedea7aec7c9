"""The ECS's launchers without real servers: the record of launched processes
(``launched.json``), the ssh launcher's command line and orders, and its remote script run by a
real ``sh`` (with ``sleep`` standing in for twistd). tests/test_ssh_launcher.py runs real servers
through real ssh."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ecs.config import build_config
from ecs.launcher import REMOTE_SCRIPT, SSH_GRACE, LocalLauncher, SshLauncher
from harness.processes import pid_alive

SLOT = {"name": "s1", "host": "10.1.2.3", "console-port": 6001, "amp-port": 7001,
        "data-dir": "/srv/data dir/s1"}


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[Any] = []
        self.written = b""

    def signalProcess(self, signum: Any) -> None:
        self.signals.append(signum)

    def write(self, data: bytes) -> None:
        self.written += data


class FakeReactor(Clock):
    """A Clock whose spawnProcess hands out fake transports, pid 1000 upwards."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], FakeTransport]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str],
                     env: Any = None) -> FakeTransport:
        transport = FakeTransport(1000 + len(self.spawned))
        self.spawned.append((protocol, args, transport))
        return transport


def config(tmp_path: Path, **options: Any) -> Any:
    return build_config({"nodes": [SLOT], "state-file": str(tmp_path / "ecs" / "state.json"),
                         "log-dir": str(tmp_path / "logs"), "tls": "off", **options},
                        {"initial-nodes": 1})


def recorded(tmp_path: Path) -> list[dict[str, Any]]:
    return json.loads((tmp_path / "ecs" / "launched.json").read_text())["launched"]


def test_a_local_launch_is_recorded_with_its_pid_and_ports_and_when_it_ends(tmp_path):
    reactor = FakeReactor()
    launcher = LocalLauncher(reactor, config(tmp_path))
    launcher.launch(launcher.config.nodes[0], "LRU", 10)
    assert recorded(tmp_path) == [{
        "name": "s1", "pid": 1000, "server_pid": 1000, "host": "10.1.2.3",
        "console_port": 6001, "amp_port": 7001, "log": str(tmp_path / "logs" / "s1.log"),
        "running": True}]
    protocol, _, transport = reactor.spawned[0]
    ended = launcher.stop("s1")
    assert transport.signals == [signal.SIGTERM]
    protocol.processEnded(Failure(ProcessTerminated(signal=signal.SIGTERM)))
    assert ended.called and recorded(tmp_path)[0]["running"] is False
    # A later ECS (a restart) keeps the history and appends to it; what an earlier ECS
    # launched is not known to run.
    again = LocalLauncher(reactor, config(tmp_path))
    again.launch(again.config.nodes[0], "LRU", 10)
    assert [(e["pid"], e["running"]) for e in recorded(tmp_path)] == [(1000, False), (1001, True)]
    assert not list((tmp_path / "ecs").glob("*.tmp"))


def test_the_ssh_launcher_runs_the_template_without_a_shell_and_records_the_remote_pid(tmp_path):
    reactor = FakeReactor()
    launcher = SshLauncher(reactor, config(tmp_path))
    launcher.launch(launcher.config.nodes[0], "LRU", 10)
    protocol, argv, transport = reactor.spawned[0]
    assert argv[:4] == ["ssh", "-o", "BatchMode=yes", "10.1.2.3"] and len(argv) == 5
    # The remote shell gets one command: sh -c SCRIPT, every argument quoted once more.
    remote = shlex.split(argv[4])
    assert remote[:2] == ["sh", "-c"] and len(remote) == 3
    server_line = next(line for line in remote[2].splitlines() if "kvserver" in line)
    words = shlex.split(server_line)
    assert words[words.index("--data-dir") + 1] == "/srv/data dir/s1"
    assert words[words.index("--listen") + 1] == "tcp:7001:interface=10.1.2.3"
    assert words[words.index("--tls") + 1] == "off"
    assert remote[2].startswith(f"cd {shlex.quote(os.getcwd())} ")
    assert recorded(tmp_path)[0]["pid"] == 1000 and recorded(tmp_path)[0]["server_pid"] is None
    # The remote command reports its server's PID on its first line, maybe in pieces.
    protocol.outReceived(b"chainstore-server")
    protocol.outReceived(b"-pid 4242\n")
    assert recorded(tmp_path)[0]["server_pid"] == 4242
    # A stop is an order on ssh's input, not a signal (sshd would not pass it on).
    ended = launcher.stop("s1")
    assert transport.written == b"stop\n" and transport.signals == []
    protocol.processEnded(Failure(ProcessDone(0)))
    assert ended.called and recorded(tmp_path)[0]["running"] is False


def test_ssh_stragglers_are_told_to_die_and_their_ssh_killed_after_a_grace(tmp_path):
    reactor = FakeReactor()
    launcher = SshLauncher(reactor, config(tmp_path))
    launcher.launch(launcher.config.nodes[0], "LRU", 10)
    _, _, transport = reactor.spawned[0]
    done = launcher.stop_all(timeout=10.0)
    reactor.advance(10.0)
    assert transport.written == b"stop\nkill\n" and transport.signals == []
    reactor.advance(SSH_GRACE)
    assert transport.signals == [signal.SIGKILL] and not done.called


def test_a_bad_ssh_template_is_a_launch_error_naming_the_fields(tmp_path):
    launcher = SshLauncher(FakeReactor(), config(tmp_path, **{"ssh-command": "ssh {hots}"}))
    with pytest.raises(Exception, match="fields are .*'command'"):
        launcher.launch(launcher.config.nodes[0], "LRU", 10)


def remote_script(tmp_path: Path) -> subprocess.Popen[bytes]:
    """The remote script run by a real sh, with C{sleep 30} as its server."""
    script = REMOTE_SCRIPT.format(workdir=shlex.quote(str(tmp_path)), log_dir="logs",
                                  twistd="sleep", args="30")
    return subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def server_pid(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(b"chainstore-server-pid "), line
    return int(line.split()[1])


@pytest.mark.parametrize("order,status", [(b"stop\n", 128 + signal.SIGTERM),
                                          (b"kill\n", 128 + signal.SIGKILL)])
def test_the_remote_script_ends_its_server_on_an_order(tmp_path, order, status):
    proc = remote_script(tmp_path)
    try:
        pid = server_pid(proc)
        assert pid_alive(pid)
        assert proc.stdin is not None
        proc.stdin.write(order)
        proc.stdin.flush()
        assert proc.wait(10) == status
        assert not pid_alive(pid)
    finally:
        proc.kill()
        proc.wait()


def test_the_remote_script_leaves_its_server_running_when_its_input_just_ends(tmp_path):
    # The ECS died or the connection dropped: the server runs on and registers again later.
    proc = remote_script(tmp_path)
    pid = None
    try:
        pid = server_pid(proc)
        assert proc.stdin is not None
        proc.stdin.close()
        time.sleep(0.3)
        assert pid_alive(pid) and proc.poll() is None
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(10) == 128 + signal.SIGKILL
