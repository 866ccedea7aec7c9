"""A real ``twistd kvserver`` process on loopback: the README's done-when check, both protocols,
misbehaving clients, a clean SIGTERM, and a second server on a port already taken."""

from __future__ import annotations

import json
import signal
import socket
import subprocess

import pytest
import pytest_twisted
from twisted.internet.endpoints import connectProtocol
from twisted.protocols import amp

from chainstore import protocol, tls
from chainstore.errors import InvalidKey, KeyNotFound
from chainstore.limits import MAX_VALUE_BYTES
from harness.processes import KVServerProcess

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
CLEAN_SIGTERM_EXIT = -signal.SIGTERM


class LineClient:
    """A blocking console client with a timeout on every read, so no test can hang."""

    def __init__(self, server: KVServerProcess, read_greeting: bool = True) -> None:
        self.sock = socket.create_connection(server.console_address, timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line() if read_greeting else None

    def line(self) -> bytes:
        data = self.file.readline()
        assert data.endswith(b"\r\n"), data
        return data[:-2]

    def ask(self, request: bytes) -> bytes:
        self.sock.sendall(request + b"\r\n")
        return self.line()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def server(processes):
    return processes.server("s1", extra_args=["--cache-size", "10"]).start()


def test_the_readme_check_console_greets_puts_and_gets(server):
    client = LineClient(server)
    try:
        assert client.greeting == (
            b"chainstore KVServer s1 at 127.0.0.1:%d ready; type help" % server.console_port)
        assert client.ask(b"put k v") == b"put_success k"
        assert client.ask(b"get k") == b"get_success k v"
        assert client.ask(b"keyrange").startswith(b"keyrange_success ")
        assert client.ask(b"ping").startswith(b"error ")
        stats = json.loads(client.ask(b"stats")[len(b"stats "):])
        assert (stats["name"], stats["cache_capacity"], stats["coordinator_keys"]) == ("s1", 10, 1)
    finally:
        client.close()
    # The README's own pipeline: both requests in one write, replies in order.
    with socket.create_connection(server.console_address, timeout=TIMEOUT) as s:
        s.sendall(b"put k v\nget k\n")
        lines = []
        f = s.makefile("rb")
        for _ in range(3):
            lines.append(f.readline())
        assert lines[1:] == [b"put_update k\r\n", b"get_success k v\r\n"]


@pytest_twisted.ensureDeferred
async def test_amp_put_get_of_a_120000_byte_value(server, reactor):
    endpoint = tls.client_endpoint(reactor, tls.load(server.tls("client")), "127.0.0.1",
                                   server.amp_port, TIMEOUT)
    client = await connectProtocol(endpoint, amp.AMP()).addTimeout(TIMEOUT, reactor)
    try:
        # Printable bytes only, so that the console can show the same value afterwards.
        value = bytes(range(33, 127)) * (MAX_VALUE_BYTES // 94) + b"!" * (MAX_VALUE_BYTES % 94)
        assert len(value) == MAX_VALUE_BYTES

        async def call(command, **kwargs):
            return await client.callRemote(command, **kwargs).addTimeout(TIMEOUT, reactor)

        assert await call(protocol.Put, key=b"big", value=value) == {"updated": False}
        assert await call(protocol.Get, key=b"big") == {"value": value}
        with pytest.raises(KeyNotFound):
            await call(protocol.Get, key=b"missing")
        with pytest.raises(InvalidKey):
            await call(protocol.Put, key=b"a b", value=b"v")
        # The same connection goes on after the errors, and the console sees the AMP write.
        assert await call(protocol.Put, key=b"small", value=b"s") == {"updated": False}
    finally:
        client.transport.loseConnection()
    console = LineClient(server)
    try:
        assert console.ask(b"get small") == b"get_success small s"
        assert console.ask(b"get big") == b"get_success big " + value
    finally:
        console.close()


def test_idle_and_half_line_clients_do_not_disturb_others(server):
    silent = socket.create_connection(server.console_address, timeout=TIMEOUT)  # never reads
    idle = LineClient(server)
    half = LineClient(server)
    half.sock.sendall(b"put torn a value that never ")
    half.close()  # gone mid-line
    other = LineClient(server)
    try:
        assert other.ask(b"put k v") == b"put_success k"
        assert other.ask(b"get torn") == b"get_error torn"
        # An over-long line from one more client does not stop the server either.
        flood = LineClient(server)
        flood.sock.sendall(b"put f " + b"x" * (200 * 1024) + b"\r\n")
        assert flood.line().startswith(b"error message too long")
        flood.close()
        assert other.ask(b"get k") == b"get_success k v"
        # The idle client is still served when it finally speaks.
        assert idle.ask(b"get k") == b"get_success k v"
    finally:
        for c in (idle, other):
            c.close()
        silent.close()
    assert server.running


def test_sigterm_stops_cleanly(server):
    client = LineClient(server)
    assert client.ask(b"put durable yes") == b"put_success durable"
    client.close()
    server.signal(signal.SIGTERM)
    # twistd shuts down cleanly, then ends itself with the signal it received (so the parent
    # sees "terminated by SIGTERM", exit status 143 in a shell) rather than with exit(0).
    assert server.proc.wait(TIMEOUT) == CLEAN_SIGTERM_EXIT
    log = server.log_path.read_text()
    assert "closed stores" in log, log[-2000:]
    assert "Received SIGTERM, shutting down." in log
    assert "Main loop terminated." in log
    assert "Traceback" not in log and "Unhandled" not in log, log[-4000:]


def test_data_survives_a_restart(processes, tmp_path):
    first = processes.server("s1").start()
    client = LineClient(first)
    assert client.ask(b"put kept value") == b"put_success kept"
    client.close()
    assert first.stop() == CLEAN_SIGTERM_EXIT
    again = processes.server("s1", console_port=first.console_port,
                             amp_port=first.amp_port).start()
    client = LineClient(again)
    try:
        assert client.ask(b"get kept") == b"get_success kept value"
    finally:
        client.close()


def test_a_second_server_on_a_taken_port_fails_clearly(processes, server):
    second = processes.server("s2", console_port=server.console_port)
    # Not second.start(): its readiness probe would be answered by the first server.
    second.workdir.mkdir(parents=True, exist_ok=True)
    second.proc = subprocess.Popen(second.argv(), cwd=second.workdir, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    code = second.proc.wait(20)
    assert code != 0
    stderr = second.proc.stderr.read().decode(errors="replace")
    log = second.log_path.read_text(errors="replace") if second.log_path.exists() else ""
    text = stderr + log
    assert "Address already in use" in text or "Couldn't listen" in text, text[-3000:]
    assert str(server.console_port) in text, text[-3000:]
    # The first server did not notice.
    client = LineClient(server)
    try:
        assert client.ask(b"put still here") == b"put_success still"
    finally:
        client.close()
