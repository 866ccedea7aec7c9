"""kvclient: the wording of every reply (on the fake), then the real program in a pipe and a TTY."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel

from chainstore import logs
from chainstore.errors import NotResponsible, ServerStopped, WriteLocked
from client.errors import RequestTimedOut, WrongProtocol
from client.shell import PROMPT, Shell, main
from client.testing import FakeBlockingKVStore, FakeKVStore

KVCLIENT = [sys.executable, "-m", "client.shell"]


class Session:
    """A Shell on a fake store; C{run} feeds lines and returns the reply lines."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.fake = FakeKVStore()
        self.connected_to: list[Any] = []
        self.shell = Shell(self.out, self._factory)
        self.quit = False

    def _factory(self, address: Any) -> FakeBlockingKVStore:
        self.connected_to.append(address)
        self.fake.closed = False
        return FakeBlockingKVStore(self.fake)

    def run(self, *lines: bytes) -> list[bytes]:
        start = self.out.tell()
        for line in lines:
            if not self.shell.handle(line + b"\n"):
                self.quit = True
                break
        return self.out.getvalue()[start:].splitlines()


@pytest.fixture
def session() -> Session:
    s = Session()
    s.run(b"connect 127.0.0.1 51000")
    return s


def test_connect_and_disconnect() -> None:
    s = Session()
    assert s.run(b"get a") == [
        b"error not connected; use connect <host> <port> (a server's AMP port)"]
    assert s.run(b"connect 127.0.0.1 51000") == [
        b"connected to 127.0.0.1:51000: ring epoch 0, 1 server(s)"]
    assert s.connected_to == [("127.0.0.1", 51000)]
    assert s.run(b"disconnect") == [b"disconnected from 127.0.0.1:51000"]
    assert s.fake.closed
    assert s.run(b"disconnect", b"put a 1") == [
        b"error not connected",
        b"error not connected; use connect <host> <port> (a server's AMP port)"]


def test_connect_needs_a_host_and_a_port() -> None:
    s = Session()
    for line in (b"connect", b"connect 127.0.0.1", b"connect 127.0.0.1 http", b"connect h 0"):
        assert s.run(line) == [b"error connect needs <host> <port>, the AMP port of any server"]
    assert s.connected_to == []


def test_connect_to_a_console_port_says_so() -> None:
    s = Session()
    s.fake.fail_next(WrongProtocol("127.0.0.1:50000 is the text console of a chainstore "
                                   "server, not its AMP port"), method="refresh_metadata")
    assert s.run(b"connect 127.0.0.1 50000") == [
        b"error 127.0.0.1:50000 is the text console of a chainstore server, not its AMP port"]
    assert s.shell.store is None


def test_put_get_delete_replies(session: Session) -> None:
    assert session.run(
        b"put a 1", b"put a 2", b"get a", b"put b hello  world ", b"get b", b"delete a",
        b"delete a", b"get a", b"PUT c 3", b"get c",
    ) == [
        b"put_success a", b"put_update a", b"get_success a 2", b"put_success b",
        b"get_success b hello  world ", b"delete_success a", b"delete_error a", b"get_error a",
        b"put_success c", b"get_success c 3",
    ]
    assert session.fake.data == {b"b": b"hello  world ", b"c": b"3"}


def test_values_are_bytes_exact(session: Session) -> None:
    value = "größe €".encode() + b"\xff"
    assert session.run(b"put u " + value, b"get u") == [b"put_success u",
                                                        b"get_success u " + value]
    assert session.fake.data[b"u"] == value


def test_a_value_with_a_line_break_stays_on_one_line(session: Session) -> None:
    session.fake.data[b"nl"] = b"two\nlines\r"
    assert session.run(b"get nl") == [b"get_success nl two\\nlines\\r"]


def test_state_replies_after_the_library_gave_up(session: Session) -> None:
    session.fake.fail_next(ServerStopped("stopped"))
    session.fake.fail_next(WriteLocked("moving"))
    session.fake.fail_next(NotResponsible("lost"))
    session.fake.fail_next(RequestTimedOut("127.0.0.1:51000 did not answer Put within 10.0s"))
    assert session.run(b"get a", b"put a 1", b"delete a", b"put a 1") == [
        b"server_stopped", b"server_write_lock", b"server_not_responsible",
        b"error 127.0.0.1:51000 did not answer Put within 10.0s"]


def test_bad_input_gets_an_error_and_the_shell_goes_on(session: Session) -> None:
    assert session.run(
        b"frobnicate", b"put", b"put a", b"put a ", b"get", b"delete",
        b"get " + b"k" * 21, b"put a\tb 1", b"keyrange now", b"", b"   ", b"get a",
    ) == [
        b"error unknown command 'frobnicate'; try help",
        b"error put needs a key and a value: put <key> <value>",
        b"error put needs a key and a value: put <key> <value>",
        b"error put needs a key and a value: put <key> <value>",
        b"error get needs a key: get <key>",
        b"error delete needs a key: delete <key>",
        b"error key is 21 bytes, the limit is 20",
        b"error key may only hold printable ASCII characters without spaces",
        b"error keyrange takes no arguments",
        b"get_error a",
    ]
    assert session.fake.requests == [("refresh_metadata", None), ("get", b"a")]


def test_keyrange_and_keyrange_read(session: Session) -> None:
    ring = session.fake.ring
    assert session.run(b"keyrange", b"keyrange_read") == [
        b"keyrange_success " + ring.keyrange_text().encode(),
        b"keyrange_read_success " + ring.keyrange_read_text().encode()]


def test_log_level_sets_the_client_library_level(session: Session) -> None:
    try:
        assert session.run(b"logLevel debug") == [b"logLevel set to debug"]
        assert logs._predicate.logLevelForNamespace("client.kvstore") is LogLevel.debug
        assert session.run(b"loglevel ERROR") == [b"logLevel set to error"]
        assert logs._predicate.logLevelForNamespace("client.kvstore") is LogLevel.error
        reply = session.run(b"logLevel loud")
        assert len(reply) == 1 and reply[0].startswith(b"error unknown log level 'loud'")
        assert session.run(b"logLevel") == [
            b"error logLevel needs a level: debug, info, warn, error, critical"]
    finally:
        logs.set_level("info")


def test_help_lists_every_command_and_names_the_amp_port(session: Session) -> None:
    text = b"\n".join(session.run(b"help"))
    for command in (b"connect <host> <port>", b"disconnect", b"put <key> <value>", b"get <key>",
                    b"delete <key>", b"keyrange", b"keyrange_read", b"stats", b"logLevel <level>",
                    b"help", b"quit"):
        assert command in text
    assert b"AMP port" in text


def test_stats_prints_the_servers_counters(session: Session) -> None:
    session.run(b"put a 1", b"get a")
    (line,) = session.run(b"stats")
    assert line.startswith(b"stats ")
    assert json.loads(line[len(b"stats "):])["puts"] == 1
    assert session.run(b"stats now") == [b"error stats takes no arguments"]


def test_quit_stops_reading(session: Session) -> None:
    assert session.run(b"put a 1", b"quit", b"put b 2") == [b"put_success a"]
    assert session.quit and b"b" not in session.fake.data


def test_kvclient_help_helps(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--connect HOST:PORT" in out and "AMP port" in out and "keyrange_read" in out


def test_a_bad_connect_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--connect", "localhost"])
    assert exit_.value.code == 2
    assert "is not host:port" in capsys.readouterr().err


# -- the real program -----------------------------------------------------------------------------

def kvclient(args: list[str], stdin: bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(KVCLIENT + args, input=stdin, capture_output=True, timeout=60, cwd=cwd)


@pytest.mark.integration
def test_kvclient_in_a_pipe_against_a_real_server(processes, tmp_path: Path) -> None:
    server = processes.server().start()
    amp = f"{server.host}:{server.amp_port}"
    run = kvclient(["--connect", amp], b"put a 1\nget a\nput a x y\nget a\ndelete a\nget a\n"
                                       b"get " + b"k" * 21 + b"\nstats\n", tmp_path)
    assert run.returncode == 0, run.stderr.decode()
    *replies, stats = run.stdout.splitlines()
    assert replies == [
        b"put_success a", b"get_success a 1", b"put_update a", b"get_success a x y",
        b"delete_success a", b"get_error a", b"error key is 21 bytes, the limit is 20"]
    # the server's counters, as its /metrics has them (the invalid key never reached it)
    assert stats.startswith(b"stats ")
    counters = json.loads(stats[len(b"stats "):])
    assert counters["requests"] == {"put_ok": 2, "get_ok": 2, "get_not_found": 1,
                                    "delete_ok": 1}
    assert counters["latency_ms"]["put_head"]["count"] == 2
    # No prompt when stdin is not a terminal, and nothing on stderr at the default log level.
    assert PROMPT.encode() not in run.stdout and run.stderr == b""

    # connect as a command, and a value of the largest size, through the same pipe.
    big = b"v" * 120_000
    run = kvclient([], b"connect %s %d\nput big %s\nget big\nquit\nget big\n"
                   % (server.host.encode(), server.amp_port, big), tmp_path)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.splitlines() == [
        b"connected to %s: ring epoch 0, 1 server(s)" % amp.encode(),
        b"put_success big", b"get_success big " + big]


@pytest.mark.integration
def test_kvclient_says_when_it_was_given_the_console_port(processes, tmp_path: Path) -> None:
    server = processes.server().start()
    console = f"{server.host}:{server.console_port}"
    # With TLS (the default) the console's plaintext greeting fails the handshake.
    run = kvclient(["--connect", console], b"get a\n", tmp_path)
    assert run.returncode == 1
    [line] = run.stdout.splitlines()
    assert line.startswith(b"error TLS handshake failed: ") and b"is this the AMP port" in line
    # Over plaintext the client recognises the console's greeting.
    plain = processes.server("plain", tls=False).start()
    console = f"{plain.host}:{plain.console_port}"
    run = kvclient(["--tls", "off", "--connect", console], b"get a\n", tmp_path)
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"error {console} is the text console of a chainstore server, "
        f"not its AMP port; connect to the address of the server's --listen option".encode()]


def test_kvclient_with_nothing_listening_fails_fast(tmp_path: Path, pki_dir: Path) -> None:
    from harness.processes import free_port

    run = kvclient(["--pki-dir", str(pki_dir), "--connect", f"127.0.0.1:{free_port()}"], b"",
                   tmp_path)
    assert run.returncode == 1
    assert run.stdout.startswith(b"error cannot reach the server: Connection was refused")


def test_kvclient_without_its_certificate_says_which_file_is_missing(tmp_path: Path) -> None:
    from harness.processes import free_port

    run = kvclient(["--connect", f"127.0.0.1:{free_port()}"], b"", tmp_path)
    assert run.returncode == 1
    assert run.stdout.startswith(b"error cannot read data/pki/ca.crt: No such file")
    assert b"chainstore-pki" in run.stdout and b"tls: off" in run.stdout


def test_kvclient_prompts_on_a_terminal(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(KVCLIENT, stdin=terminal, stdout=terminal, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    os.close(terminal)
    output = b""
    try:
        os.write(controller, b"get a\nquit\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    output += os.read(controller, 4096)
                except OSError:  # the terminal closed with the process
                    break
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
        proc.stderr.close()  # type: ignore[union-attr]
    assert output.count(PROMPT.encode()) == 2
    assert b"error not connected" in output
