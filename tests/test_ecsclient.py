"""``ecsclient``: command parsing, rendering, the AMP calls without sockets, and a real cluster.

The unit tests use no reactor: the shell's AMP logic (L{AdminLink}, L{call_with_progress}) runs
over iosim pairs against a fake ECS responder or the real L{ECSProtocol} on a real coordinator,
with a C{Clock} for the progress polls and timeouts. The integration test runs the console script
against a real ``twistd ecs`` that launches real servers.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim

from chainstore.ring import KeyRange
from harness.processes import ECSProcess, free_port, pid_alive
from ecs import protocol
from ecs.config import ECSConfig
from ecs.coordinator import ECS
from ecs.launcher import NoLauncher
from ecs.server import ECSProtocol
from ecs.shell import AdminLink, Quit, Shell, ShellError, call_with_progress
from ecs.shell_commands import HELP, Command, UsageError, parse_address, parse_command
from ecs.shell_format import ProgressPrinter, format_progress, format_range, format_status
from ecs.state import StateFile

# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    ("start", Command("start")),
    ("STOP", Command("stop")),
    ("shutdown", Command("shutDown")),
    ("shutDown", Command("shutDown")),
    ("addNode LRU 100", Command("addNodes", {"count": 1, "cache_strategy": "LRU",
                                             "cache_size": 100})),
    ("addnode lfu 0", Command("addNodes", {"count": 1, "cache_strategy": "LFU",
                                           "cache_size": 0})),
    ("addNodes 3 fifo 10", Command("addNodes", {"count": 3, "cache_strategy": "FIFO",
                                                "cache_size": 10})),
    ("removeNode server2", Command("removeNode", {"name": "server2", "force": False})),
    ("removenode server2 --force", Command("removeNode", {"name": "server2", "force": True})),
    ("removeNode --force server2", Command("removeNode", {"name": "server2", "force": True})),
    ("status", Command("status")),
    ("Status --json", Command("status", json=True)),
    ("help", Command("help")),
    ("quit", Command("quit")),
    ("exit", Command("quit")),
])
def test_parse_command_gives_canonical_name_and_amp_arguments(line: str,
                                                              expected: Command) -> None:
    assert parse_command(line.split()) == expected


def test_parse_command_of_an_empty_line_is_none() -> None:
    assert parse_command([]) is None


@pytest.mark.parametrize("line, message", [
    ("frobnicate", "unknown command 'frobnicate'; type help"),
    ("addNode LRU", "usage: addNode <strategy> <size>"),
    ("addNode LRU 10 11", "usage: addNode <strategy> <size>"),
    ("addNode LRU ten", "cache size must be a whole number"),
    ("addNode LRU -1", "cache size must be a whole number"),
    ("addNode MRU 10", "unknown cache strategy 'MRU'; choose one of FIFO, LRU, LFU"),
    ("addNodes 2 LRU", "usage: addNodes <count> <strategy> <size>"),
    ("addNodes 0 LRU 10", "count must be a whole number of 1 or more, not '0'"),
    ("addNodes two LRU 10", "count must be a whole number of 1 or more"),
    ("removeNode", "usage: removeNode <name> [--force]"),
    ("removeNode a b", "usage: removeNode <name> [--force]"),
    ("removeNode --forse", "usage: removeNode <name> [--force]"),
    ("status --yaml", "usage: status [--json]"),
    ("start now", "start takes no arguments"),
    ("quit please", "quit takes no arguments"),
])
def test_parse_command_rejects_bad_lines_with_the_right_form(line: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_command(line.split())
    assert message in str(caught.value)


@given(st.sampled_from(["start", "stop", "shutDown", "addNodes", "removeNode", "status",
                        "help", "quit"]), st.randoms(use_true_random=False))
def test_command_names_are_case_insensitive(name: str, rnd: Any) -> None:
    mixed = "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in name)
    args = {"addNodes": ["1", "LRU", "5"], "removeNode": ["server1"]}.get(name, [])
    assert parse_command([mixed, *args]).name == name  # type: ignore[union-attr]


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:49999") == ("127.0.0.1", 49999)
    assert parse_address("[::1]:5000") == ("::1", 5000)
    for bad in ("127.0.0.1", "127.0.0.1:", ":80", "host:0", "host:65536", "host:http"):
        with pytest.raises(ValueError):
            parse_address(bad)


# -- rendering -------------------------------------------------------------------------------------

STATUS: dict[str, Any] = {
    "epoch": 7, "serving": True, "replication": 1, "degraded": False,
    "ring": ["server2", "server1"],
    "members": [
        {"name": "server1", "status": "active", "origin": "pool", "console": "127.0.0.1:50001",
         "amp": "127.0.0.1:51001", "connected": True, "last_heartbeat_s": 0.25,
         "range": ["0DB9946892395C43DA1AE5C141AF48C0", "8263A01E94324A29231481CD897163C1"]},
        {"name": "server2", "status": "active", "origin": "pool", "console": "127.0.0.1:50002",
         "amp": "127.0.0.1:51002", "connected": True, "last_heartbeat_s": 1.04,
         "range": ["8263A01E94324A29231481CD897163C1", "0DB9946892395C43DA1AE5C141AF48C0"]},
        {"name": "server3", "status": "removed", "origin": "pool", "console": "127.0.0.1:50003",
         "amp": "127.0.0.1:51003", "connected": False},
    ],
    "operation": None,
}


def test_format_status_renders_summary_ring_and_an_aligned_member_table() -> None:
    lines = format_status(STATUS).splitlines()
    assert lines[0] == "epoch 7, serving, replication 1"
    assert lines[1] == "ring: server2 server1"
    header, *rows = lines[2:]
    assert header.split() == ["NAME", "STATUS", "CONSOLE", "RANGE", "(FROM..TO]", "SHARE",
                              "HEARTBEAT", "CONNECTED"]
    assert rows[0].split() == ["server1", "active", "127.0.0.1:50001", "0DB99468..8263A01E",
                               "45.6%", "0.2s", "ago", "yes"]
    assert rows[1].split() == ["server2", "active", "127.0.0.1:50002", "8263A01E..0DB99468",
                               "54.4%", "1.0s", "ago", "yes"]
    assert rows[2].split() == ["server3", "removed", "127.0.0.1:50003", "-", "-", "-", "no"]
    # Columns line up: every row starts its console address where the header's column starts.
    column = header.index("CONSOLE")
    assert all(row[column:].startswith("127.0.0.1:5000") for row in rows)
    assert len(lines) == 6


def test_format_status_shows_stopped_degraded_empty_and_the_running_operation() -> None:
    status = dict(STATUS, serving=False, degraded=True, replication=3, ring=["server1"],
                  members=STATUS["members"][:1],
                  operation={"description": "removing server2", "step": "copying",
                             "keys_moved": 1200, "bytes_moved": 45000, "seconds": 2.25})
    lines = format_status(status).splitlines()
    assert lines[0] == ("epoch 7, stopped, replication 3, DEGRADED: 1 server(s) in the ring, "
                        "fewer than the replication factor")
    assert lines[-1] == "operation: removing server2: copying 1200 keys, 45000 bytes, 2.2s"
    empty = format_status(dict(STATUS, ring=[], members=[])).splitlines()
    assert empty[1:] == ["ring: (empty)", "no servers"]


def test_format_range_of_a_lone_server_is_the_whole_ring() -> None:
    whole = {"range": ["0DB9946892395C43DA1AE5C141AF48C0"] * 2}
    assert format_range(whole) == "whole ring"
    assert format_range({}) == "-"


def test_format_progress() -> None:
    operation = {"description": "adding server4", "step": "copying", "keys_moved": 2000,
                 "bytes_moved": 123456, "seconds": 3.14159}
    assert format_progress(operation) == "moving: copying 2000 keys, 123456 bytes, 3.1s"


def _op(step: str, keys: int, nbytes: int, seconds: float) -> dict[str, Any]:
    return {"description": "adding server3", "step": step, "keys_moved": keys,
            "bytes_moved": nbytes, "seconds": seconds}


def test_progress_on_a_pipe_prints_a_line_per_change_of_step_keys_or_bytes() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=False)
    printer.update(None)
    printer.update(_op("locking writes", 0, 0, 0.5))
    printer.update(_op("locking writes", 0, 0, 1.0))  # only the time moved: no new line
    printer.update(_op("copying", 0, 0, 1.5))
    printer.update(_op("copying", 500, 9000, 2.0))
    printer.finish()
    assert out.getvalue().splitlines() == [
        "moving: locking writes 0 keys, 0 bytes, 0.5s",
        "moving: copying 0 keys, 0 bytes, 1.5s",
        "moving: copying 500 keys, 9000 bytes, 2.0s",
    ]


def test_progress_on_a_terminal_rewrites_one_line_and_ends_it() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=True)
    printer.update(_op("copying", 0, 0, 0.5))
    printer.update(_op("copying", 0, 0, 1.0))
    printer.finish()
    assert out.getvalue() == ("\rmoving: copying 0 keys, 0 bytes, 0.5s\x1b[K"
                              "\rmoving: copying 0 keys, 0 bytes, 1.0s\x1b[K\n")
    silent = io.StringIO()
    quiet = ProgressPrinter(silent, tty=True)
    quiet.update(None)
    quiet.finish()
    assert silent.getvalue() == ""


# -- the shell over a fake admin -------------------------------------------------------------------


class FakeAdmin:
    """Records commands; answers from C{answers} (a dict or a ShellError to raise); plays the
    C{progress} operations to the progress callback before answering."""

    def __init__(self, answers: dict[str, Any], progress: Sequence[Any] = ()) -> None:
        self.answers = answers
        self.progress = list(progress)
        self.calls: list[tuple[Command, bool]] = []

    def run(self, command: Command, on_progress: Any = None) -> dict[str, Any]:
        self.calls.append((command, on_progress is not None))
        for operation in self.progress:
            on_progress(operation)
        answer = self.answers[command.name]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _shell(admin: FakeAdmin, tty: bool = False) -> tuple[Shell, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Shell(admin, out, err, tty), out, err


def test_shell_runs_add_node_with_progress_then_prints_the_answer() -> None:
    admin = FakeAdmin({"addNodes": {"names": ["server3"], "message": "added server3"}},
                      progress=[None, _op("copying", 10, 100, 0.5), _op("copying", 30, 300, 1)])
    shell, out, err = _shell(admin)
    assert shell.handle(["addnode", "lru", "100"]) is True
    assert admin.calls == [(Command("addNodes", {"count": 1, "cache_strategy": "LRU",
                                                 "cache_size": 100}), True)]
    assert out.getvalue().splitlines() == ["moving: copying 10 keys, 100 bytes, 0.5s",
                                           "moving: copying 30 keys, 300 bytes, 1.0s",
                                           "added server3"]
    assert err.getvalue() == ""


def test_shell_ends_the_progress_line_on_a_terminal_even_when_the_command_fails() -> None:
    admin = FakeAdmin({"removeNode": ShellError("removing server1 failed while copying")},
                      progress=[_op("copying", 10, 100, 0.5)])
    shell, out, err = _shell(admin, tty=True)
    assert shell.handle(["removeNode", "server1"]) is False
    assert out.getvalue().endswith("0.5s\x1b[K\n")
    assert err.getvalue() == "error: removing server1 failed while copying\n"


def test_shell_status_prints_the_table_or_the_raw_json() -> None:
    raw = json.dumps(STATUS, sort_keys=True)
    admin = FakeAdmin({"status": {"status": raw}})
    shell, out, _ = _shell(admin)
    assert shell.handle(["status"])
    assert out.getvalue() == format_status(STATUS) + "\n"
    shell, out, _ = _shell(admin)
    assert shell.handle(["status", "--json"])
    assert out.getvalue() == raw + "\n"
    assert [call[1] for call in admin.calls] == [False, False]  # status polls nothing


def test_shell_prints_ecs_errors_and_usage_errors_and_goes_on() -> None:
    admin = FakeAdmin({"removeNode": ShellError("unknown server 'x'; known servers: server1"),
                       "start": {"message": "2 servers started"}})
    shell, out, err = _shell(admin)
    assert shell.handle(["removeNode", "x"]) is False
    assert shell.handle(["addNode", "LRU"]) is False
    assert shell.handle([]) is True
    assert shell.handle(["start"]) is True
    assert err.getvalue().splitlines() == [
        "error: unknown server 'x'; known servers: server1",
        "error: usage: addNode <strategy> <size>",
    ]
    assert out.getvalue() == "2 servers started\n"
    # The malformed line never reached the ECS.
    assert [c[0].name for c in admin.calls] == ["removeNode", "start"]


def test_shell_help_and_quit_need_no_ecs() -> None:
    admin = FakeAdmin({})
    shell, out, _ = _shell(admin)
    assert shell.handle(["HELP"])
    assert out.getvalue() == HELP + "\n"
    with pytest.raises(Quit):
        shell.handle(["quit"])
    assert admin.calls == []


# -- AMP over iosim --------------------------------------------------------------------------------


class FakeECS(amp.AMP):
    """Answers Status with C{operation}; AddNodes and RemoveNode with Deferreds the test fires."""

    def __init__(self) -> None:
        super().__init__()
        self.operation: dict[str, Any] | None = None
        self.status_calls = 0
        self.pending: list[Deferred[dict[str, Any]]] = []
        self.answer_status = True

    @protocol.Status.responder
    def status(self) -> Any:
        self.status_calls += 1
        if not self.answer_status:
            return Deferred()
        return {"status": json.dumps(dict(STATUS, operation=self.operation))}

    @protocol.AddNodes.responder
    def add_nodes(self, count: int, cache_strategy: str, cache_size: int) -> Deferred[Any]:
        d: Deferred[dict[str, Any]] = Deferred()
        self.pending.append(d)
        return d

    @protocol.RemoveNode.responder
    def remove_node(self, name: str, force: bool) -> Deferred[Any]:
        return self.add_nodes(0, "", 0)


class Network:
    """Makes an iosim pair to a fresh server (from C{make_server}) per connection attempt."""

    def __init__(self, make_server: Any) -> None:
        self.clock = Clock()
        self.make_server = make_server
        self.servers: list[amp.AMP] = []
        self.pumps: list[iosim.IOPump] = []

    def connect(self, client: amp.AMP) -> Deferred[amp.AMP]:
        server = self.make_server()
        pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                             iosim.makeFakeClient(client), greet=False, clock=self.clock)
        self.servers.append(server)
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()


def _link(net: Network, timeout: float = 5.0) -> AdminLink:
    return AdminLink(net.clock, "127.0.0.1", 49999, timeout=timeout, connect=net.connect)


def _run(link: AdminLink, command: Command, on_progress: Any = None) -> list[Any]:
    """Start C{command}; the list receives its result or failure when it ends."""
    outcome: list[Any] = []
    Deferred.fromCoroutine(link.run(command, on_progress)).addBoth(outcome.append)
    return outcome


def test_add_node_polls_status_every_half_second_until_answered() -> None:
    net = Network(FakeECS)
    link = _link(net)
    seen: list[Any] = []
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=False)

    def progress(operation: Any) -> None:
        seen.append(operation)
        printer.update(operation)

    command = parse_command(["addNode", "LRU", "100"])
    assert command is not None
    outcome = _run(link, command, progress)
    net.flush()
    ecs: FakeECS = net.servers[0]  # type: ignore[assignment]
    assert len(ecs.pending) == 1 and ecs.status_calls == 0
    net.advance(0.49)
    assert ecs.status_calls == 0
    net.advance(0.01)
    assert seen == [None]
    ecs.operation = _op("copying", 100, 2000, 0.5)
    net.advance(0.5)
    ecs.operation = _op("copying", 100, 2000, 1.0)
    net.advance(0.5)
    ecs.operation = _op("dropping moved data", 250, 5000, 1.5)
    net.advance(0.5)
    assert ecs.status_calls == 4 and len(seen) == 4
    assert outcome == []
    ecs.pending[0].callback({"names": ["server3"], "message": "added server3"})
    net.flush()
    assert outcome == [{"names": ["server3"], "message": "added server3"}]
    net.advance(5.0)
    assert ecs.status_calls == 4, "polling must stop once the command is answered"
    assert out.getvalue().splitlines() == ["moving: copying 100 keys, 2000 bytes, 0.5s",
                                           "moving: dropping moved data 250 keys, 5000 bytes, 1.5s"]
    assert len(net.pumps) == 1, "polls share the command's connection"


def test_a_slow_status_poll_does_not_pile_up_polls() -> None:
    net = Network(FakeECS)
    link = _link(net)
    _run(link, Command("removeNode", {"name": "server1", "force": False}), lambda op: None)
    net.flush()
    ecs: FakeECS = net.servers[0]  # type: ignore[assignment]
    ecs.answer_status = False
    net.advance(0.5)
    for _ in range(10):
        net.advance(0.5)
    assert ecs.status_calls == 1


def test_long_commands_wait_past_the_timeout_and_short_ones_do_not() -> None:
    net = Network(FakeECS)
    link = _link(net, timeout=5.0)
    long = _run(link, Command("removeNode", {"name": "server1", "force": False}),
                lambda op: None)
    quiet = _run(link, Command("removeNode", {"name": "server2", "force": False}))
    net.flush()
    net.advance(30.0)
    assert long == [] and quiet == []
    ecs: FakeECS = net.servers[0]  # type: ignore[assignment]
    ecs.answer_status = False
    short = _run(link, Command("status"))
    net.flush()
    net.advance(4.9)
    assert short == []
    net.advance(0.1)
    assert len(short) == 1
    short[0].trap(ShellError)
    assert str(short[0].value) == "the ECS at 127.0.0.1:49999 did not answer within 5s"
    ecs.pending[0].callback({"message": "server1 removed; 1 servers in the ring"})
    net.flush()
    assert long == [{"message": "server1 removed; 1 servers in the ring"}]
    ecs.pending[1].callback({"message": "server2 removed; 1 servers in the ring"})
    net.flush()
    assert quiet == [{"message": "server2 removed; 1 servers in the ring"}]


def test_a_lost_connection_fails_the_command_and_the_next_one_reconnects() -> None:
    net = Network(FakeECS)
    link = _link(net)
    outcome = _run(link, Command("addNodes", {"count": 1, "cache_strategy": "LRU",
                                             "cache_size": 1}), lambda op: None)
    net.flush()
    net.servers[0].transport.loseConnection()
    net.flush()
    assert len(outcome) == 1
    outcome[0].trap(ShellError)
    assert "lost the connection to the ECS at 127.0.0.1:49999 during addNodes" \
        in str(outcome[0].value)
    net.advance(2.0)
    assert net.servers[0].status_calls == 0  # type: ignore[attr-defined]
    again = _run(link, Command("status"))
    net.flush()
    assert len(net.pumps) == 2
    assert json.loads(again[0]["status"])["epoch"] == 7


def test_an_unreachable_ecs_gives_a_clear_message() -> None:
    from twisted.internet.defer import fail
    from twisted.internet.error import ConnectionRefusedError

    clock = Clock()
    link = AdminLink(clock, "127.0.0.1", 49999,
                     connect=lambda proto: fail(ConnectionRefusedError("Connection refused")))
    outcome = _run(link, Command("status"))
    outcome[0].trap(ShellError)
    assert str(outcome[0].value).startswith(
        "cannot reach the ECS at 127.0.0.1:49999: Connection was refused")

    hung = AdminLink(clock, "127.0.0.1", 49999, timeout=3.0, connect=lambda proto: Deferred())
    outcome = _run(hung, Command("status"))
    clock.advance(3.0)
    outcome[0].trap(ShellError)
    assert str(outcome[0].value) == "cannot reach the ECS at 127.0.0.1:49999: no answer in time"


def test_call_with_progress_returns_the_commands_error() -> None:
    net = Network(FakeECS)
    client = amp.AMP()
    net.connect(client)
    ecs: FakeECS = net.servers[0]  # type: ignore[assignment]
    outcome: list[Any] = []
    call_with_progress(client, net.clock, protocol.AddNodes,
                       {"count": 1, "cache_strategy": "LRU", "cache_size": 1},
                       lambda op: None).addBoth(outcome.append)
    net.flush()
    net.advance(0.5)
    ecs.pending[0].errback(protocol.AdminError("busy: adding server4 is in progress"))
    net.flush()
    outcome[0].trap(protocol.AdminError)
    net.advance(2.0)
    assert ecs.status_calls == 1


def test_the_real_ecs_protocol_answers_through_the_link(tmp_path: Path) -> None:
    """AdminLink against the real ECSProtocol on a real coordinator (no servers, no sockets)."""
    config = ECSConfig(initial_nodes=0, launcher="none",
                       state_file=str(tmp_path / "state.json")).validated()
    coordinator = ECS(config, Clock(), NoLauncher(), StateFile(config.state_file))
    net = Network(lambda: ECSProtocol(coordinator))
    link = _link(net)

    status = _run(link, Command("status"))
    net.flush()
    decoded = json.loads(status[0]["status"])
    assert decoded["ring"] == [] and decoded["serving"] is False
    assert format_status(decoded).splitlines()[1:] == ["ring: (empty)", "no servers"]

    for command, message in [
        (Command("removeNode", {"name": "nosuchnode", "force": False}),
         "unknown server 'nosuchnode'; known servers: none"),
        (Command("start"), "there are no servers in the ring; add some with addNode"),
        (parse_command(["addNodes", "1", "LRU", "10"]), "could not launch server1: this ECS "
                                                        "launches no servers"),
    ]:
        outcome = _run(link, command, lambda op: None)  # type: ignore[arg-type]
        net.flush()
        assert len(outcome) == 1, command
        outcome[0].trap(ShellError)
        assert str(outcome[0].value).startswith(message)
    assert len(net.pumps) == 1, "ECS errors keep the connection"


# -- real processes --------------------------------------------------------------------------------

ECSCLIENT = [sys.executable, "-c", "import sys; from ecs.shell import main; sys.exit(main())"]


def ecsclient(ecs: str, *words: str, stdin: str | None = None, timeout: float = 60.0,
              tls: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ECSCLIENT, "--ecs", ecs, "--timeout", "10", *tls, *words],
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def console_reply(address: str, line: str) -> str:
    """One request on a server's text console (after its greeting), with a bounded wait."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(line.encode() + b"\r\n")
        return f.readline().decode().strip()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_ecsclient_says_clearly_when_the_ecs_is_unreachable(pki_dir: Path) -> None:
    port = free_port()
    result = ecsclient(f"127.0.0.1:{port}", "status", tls=["--pki-dir", str(pki_dir)])
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: cannot reach the ECS at 127.0.0.1:{port}: ")
    assert "refused" in result.stderr


def test_ecsclient_shows_the_prompt_only_on_a_terminal() -> None:
    # No ECS is needed for help and quit; stdin is a pseudo-terminal here, then a pipe.
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"help\nbogus\nquit\n")
        proc = subprocess.run([*ECSCLIENT, "--ecs", f"127.0.0.1:{free_port()}"],
                              stdin=terminal, capture_output=True, text=True, timeout=30)
    finally:
        os.close(controller)
        os.close(terminal)
    # At a terminal a failed line was seen by the user: the session still ends with 0.
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ECSClient> ") == 3
    assert proc.stderr == "error: unknown command 'bogus'; type help for the commands\n"
    assert "addNodes <count> <strategy> <size>" in proc.stdout
    piped = subprocess.run([*ECSCLIENT], input="help\nquit\n", capture_output=True, text=True,
                           timeout=30)
    assert piped.returncode == 0, piped.stderr
    assert "ECSClient>" not in piped.stdout
    assert piped.stdout == HELP + "\n"


@pytest.mark.integration
def test_ecsclient_administers_a_real_cluster(tmp_path: Path) -> None:
    # replication 1: this test is about the admin shell; chains have their own tests.
    ecs = ECSProcess(tmp_path, slots=4, initial_nodes=2, replication=1, heartbeat_interval=0.3,
                     failure_timeout=1.5, cache_size=10)
    try:
        ecs.start()
        address = ecs.address

        def admin(*words: str, **options: Any) -> subprocess.CompletedProcess[str]:
            return ecsclient(address, *words, tls=ecs.tls_args("admin"), **options)

        deadline = time.monotonic() + 30
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert ecs.running, ecs.diagnostics()
            result = admin("status", "--json")
            if result.returncode == 0:
                status = json.loads(result.stdout)
                connected = {m["name"] for m in status["members"] if m["connected"]}
                # The ring commits a moment before the first start sets serving.
                if len(status["ring"]) == 2 and set(status["ring"]) <= connected \
                        and status["serving"]:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no serving ring of 2 within 30s: {status}\n"
                                 f"{ecs.diagnostics()}")
        first = sorted(status["ring"])

        # A client's certificate is not an admin's: the ECS refuses, and says what is missing.
        result = ecsclient(address, "stop", tls=ecs.tls_args("client"))
        assert result.returncode == 1
        assert result.stderr == ("error: the ECS refused stop: Stop needs the role admin; this "
                                 "certificate's role is client\n")
        assert admin("status", "--json").returncode == 0
        assert json.loads(admin("status", "--json").stdout)["serving"]

        result = admin("addNode", "LRU", "100")
        assert result.returncode == 0, result.stderr
        added = result.stdout.splitlines()[-1]
        assert added.startswith("added ")
        new = added.removeprefix("added ")
        assert new not in first
        assert pid_alive(ecs.server_pids()[new][-1])

        result = admin("status")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("epoch ") and ", serving, " in lines[0]
        assert sorted(lines[1].removeprefix("ring: ").split()) == sorted(first + [new])
        chains_at = next(i for i, line in enumerate(lines) if line.startswith("CHAIN"))
        assert lines[chains_at].split()[-2:] == ["LAG", "WINDOW"]
        chains = [line.split() for line in lines[chains_at + 1:]]
        # one chain per range, each with its head, lag and window (or - before its report)
        assert sorted(c[0] for c in chains) == sorted(first + [new])
        assert all(re.fullmatch(r"\d+|-", c[-1]) and re.fullmatch(r"\d+|-", c[-2])
                   for c in chains)
        table = {line.split()[0]: line.split() for line in lines[3:chains_at]}
        assert set(table) == set(first + [new])
        assert all(row[1] == "active" and row[-1] == "yes" for row in table.values())
        ranges = [row[3] for row in table.values()]
        assert all(".." in r for r in ranges) and len(set(ranges)) == 3

        victim = first[0]
        victim_pid = ecs.server_pids()[victim][-1]
        result = admin("removeNode", victim)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == f"{victim} removed; 2 servers in the ring"
        wait_for(lambda: not pid_alive(victim_pid), 15, f"{victim} (pid {victim_pid}) exits")
        status = ecs.status()
        assert victim not in status["ring"] and len(status["ring"]) == 2

        result = admin("removeNode", "nosuchnode")
        assert result.returncode == 1
        assert result.stderr.startswith("error: unknown server 'nosuchnode'; known servers: ")
        result = admin("addNodes", "9", "LRU", "10")
        assert result.returncode == 1
        assert result.stderr.startswith("error: cannot add 9: ")
        assert "free node slot(s) in the pool" in result.stderr
        assert len(ecs.status()["ring"]) == 2

        # The console of the server that owns "somekey" (another would answer
        # server_not_responsible).
        console = next(m["console"] for m in ecs.status()["members"] if "range" in m and
                       KeyRange(*(int(end, 16) for end in m["range"])).contains_key(b"somekey"))
        result = admin("stop")
        assert (result.returncode, result.stdout) == (0, "2 servers stopped\n"), result.stderr
        assert console_reply(console, "get somekey") == "server_stopped"
        assert ecs.status()["serving"] is False
        result = admin("START")
        assert (result.returncode, result.stdout) == (0, "2 servers started\n"), result.stderr
        assert console_reply(console, "get somekey") == "get_error somekey"

        # A pipe: every line runs, errors go to stderr, the exit status says one failed.
        result = admin(stdin="status --json\nremoveNode nosuchnode\nhelp\n")
        assert result.returncode == 1
        assert json.loads(result.stdout.splitlines()[0])["ring"] == status["ring"]
        assert result.stderr.startswith("error: unknown server 'nosuchnode'")
        assert HELP in result.stdout

        pids = [pid for name_pids in ecs.server_pids().values() for pid in name_pids]
        assert len(pids) == 3
        result = admin("shutDown")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "shut down 2 servers and the ECS\n"
        assert ecs.wait_exit(20) == 0
        wait_for(lambda: not any(pid_alive(pid) for pid in pids), 15,
                 f"every server process exits: {pids}")
    finally:
        ecs.stop()
    assert ecs.live_server_pids() == []
