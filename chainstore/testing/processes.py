"""Run real ``twistd kvserver`` processes on loopback, for integration tests and benchmarks.

Blocking on purpose: test fixtures and the benchmark driver call these from plain code. Every
process started here is tracked by PID and stopped by L{ProcessGroup.stop_all}, also when a
test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ProcessFailed(RuntimeError):
    pass


class KVServerProcess:
    """One KVServer process with its own ports, data directory and log file."""

    def __init__(self, workdir: str | os.PathLike[str], name: str = "kvserver",
                 host: str = "127.0.0.1", console_port: int | None = None,
                 amp_port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.host = host
        self.console_port = console_port or free_port(host)
        self.amp_port = amp_port or free_port(host)
        self.data_dir = self.workdir / name
        self.log_path = self.workdir / f"{name}.log"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def console_address(self) -> tuple[str, int]:
        return (self.host, self.console_port)

    @property
    def amp_address(self) -> tuple[str, int]:
        return (self.host, self.amp_port)

    def argv(self) -> list[str]:
        return TWISTD + [
            "--pidfile=", "-n", "--logfile", str(self.log_path),
            "kvserver", "--name", self.name,
            "--listen", f"tcp:{self.amp_port}:interface={self.host}",
            "--console", f"tcp:{self.console_port}:interface={self.host}",
            "--data-dir", str(self.data_dir),
            *self.extra_args,
        ]

    def start(self, timeout: float = 20.0) -> KVServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Run from the work directory so no etc/kvserver.yaml of the caller's cwd is picked up.
        self.proc = subprocess.Popen(self.argv(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Return once the console greets a client; raise if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ProcessFailed(f"{self.name} exited before serving:\n{self.diagnostics()}")
            try:
                with socket.create_connection(self.console_address, timeout=1) as s:
                    if s.makefile("rb").readline().startswith(b"chainstore"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise ProcessFailed(f"{self.name} not ready after {timeout}s:\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        err = b""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stderr:
            err = self.proc.stderr.read() or b""
        log = self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
        return f"stderr: {err.decode(errors='replace')[-2000:]}\nlog tail:\n{log}"

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a clean shutdown), SIGKILL if it has not exited within C{timeout}."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stderr:
            self.proc.stderr.close()
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ProcessGroup:
    """Every process a test or benchmark started, to stop them all in one place."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir)
        self.servers: list[KVServerProcess] = []

    def server(self, name: str = "kvserver", **kwargs: object) -> KVServerProcess:
        server = KVServerProcess(self.workdir, name, **kwargs)  # type: ignore[arg-type]
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()
