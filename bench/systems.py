"""The systems under test: how to start one, stop it, and send it each kind of operation.

Each system runs in processes of its own, started and stopped by PID from the (blocking)
driver; the load generator reaches it over loopback AMP. A system names the operations it
serves in the order a key set must see them (writes before the reads of the same keys).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.protocols import amp

from bench.echo_server import Echo
from chainstore import protocol
from chainstore.testing.processes import KVServerProcess, ProcessFailed, free_port

HOST = "127.0.0.1"
# bench is not an installed package: child processes import it from the checkout.
_CHECKOUT = Path(__file__).resolve().parent.parent


class WrongAnswer(Exception):
    """A system answered a request with something other than what was stored."""


class SystemUnderTest(ABC):
    """One system the benchmark measures; C{start} and C{stop} block, C{request} does not."""

    #: Short name in tables and JSON.
    name: str
    #: Operations in the order a key set must run them.
    operations: tuple[str, ...]
    #: The baseline that other systems' figures are divided by.
    baseline = False

    @property
    @abstractmethod
    def address(self) -> tuple[str, int]:
        """Where its AMP server listens."""

    @property
    @abstractmethod
    def pids(self) -> list[int]:
        """The processes it runs (empty before start)."""

    @abstractmethod
    def start(self) -> None:
        """Start its processes and return once they serve; raise if they cannot."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every process it started (safe to call twice, or without a start)."""

    @abstractmethod
    def request(self, op: str, conn: amp.AMP, key: bytes, value: bytes) -> Deferred[Any]:
        """Send one C{op} for C{key} (and C{value}) on C{conn}; fail if the answer is wrong."""

    def cpu_seconds(self) -> float | None:
        """CPU time its processes have used so far, or None where /proc cannot tell."""
        total = 0.0
        for pid in self.pids:
            used = process_cpu_seconds(pid)
            if used is None:
                return None
            total += used
        return total

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "operations": list(self.operations),
                "address": "%s:%d" % self.address, "pids": self.pids}


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of process C{pid} (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class KVServerSystem(SystemUnderTest):
    """One real ``twistd kvserver`` with its default settings, in its own data directory."""

    name = "chainstore"
    operations = ("put", "get")

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.server = KVServerProcess(workdir, name="bench-kvserver", host=HOST)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.amp_address

    @property
    def pids(self) -> list[int]:
        return [self.server.pid] if self.server.proc is not None else []

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def request(self, op: str, conn: amp.AMP, key: bytes, value: bytes) -> Deferred[Any]:
        if op == "put":
            return conn.callRemote(protocol.Put, key=key, value=value)
        if op == "get":
            return conn.callRemote(protocol.Get, key=key).addCallback(_check_value, key, value)
        raise ValueError(f"{self.name} has no operation {op!r}")

    def describe(self) -> dict[str, Any]:
        # The server runs with the defaults of chainstore.config (sqlite, durability crash,
        # LRU cache of 1000): the argv says so, and which flags a later run changed.
        return {**super().describe(), "argv": self.server.argv()[3:]}


def _check_value(answer: dict[str, Any], key: bytes, expected: bytes) -> None:
    if answer["value"] != expected:
        raise WrongAnswer(f"get {key!r} answered {len(answer['value'])} bytes that were not put")


class EchoSystem(SystemUnderTest):
    """The bare AMP echo server of L{bench.echo_server}: the cost of AMP itself."""

    name = "echo"
    operations = ("echo",)
    baseline = True

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir)
        self.port = free_port(HOST)
        self.log_path = self.workdir / "echo_server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.echo_server", "--host", HOST, "--port", str(self.port)]

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=_CHECKOUT, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProcessFailed(f"echo server exited with {self.proc.returncode}:\n"
                                    f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection(self.address, timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise ProcessFailed(f"echo server not listening on port {self.port} after {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def request(self, op: str, conn: amp.AMP, key: bytes, value: bytes) -> Deferred[Any]:
        if op != "echo":
            raise ValueError(f"{self.name} has no operation {op!r}")
        return conn.callRemote(Echo, key=key, value=value)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "argv": self.argv()[1:]}
