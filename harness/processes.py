"""Run real ``twistd kvserver`` and ``twistd ecs`` processes on loopback, for integration tests
and benchmarks.

Blocking on purpose: test fixtures and the benchmark driver call these from plain code. Every
process started here is tracked by PID and stopped by L{ProcessGroup.stop_all}, also when a
test fails.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure

from chainstore.tls import TLSFiles

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# The ports this process handed out lately: the kernel may give a port that was bound and
# closed again to the next bind, so two free_ports calls (etcd's, then Redis's) could overlap.
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=4096)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """C{count} distinct free TCP ports: all bound at once, so the kernel cannot hand out one
    port twice (as separate L{free_port} calls may), and none handed out by an earlier call of
    this process."""
    sockets = []
    ports: list[int] = []
    try:
        for _ in range(count + len(_HANDED_OUT) + 64):  # bound: each bind is a new port
            if len(ports) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                ports.append(port)
        if len(ports) < count:
            raise OSError(f"no {count} free ports on {host}")
        _HANDED_OUT.extend(ports)
        return ports
    finally:
        for s in sockets:
            s.close()


def connect(host: str, port: int, tls: TLSFiles | None, timeout: float = 10.0) -> socket.socket:
    """A blocking connection to an AMP port: mutual TLS with C{tls} (the peer's certificate
    must name C{host}), or plaintext if C{tls} is None."""
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls is None:
        return sock
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
        context.load_cert_chain(tls.cert, tls.key)
        return context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def stdout_path(log_path: Path) -> Path:
    """Where a twistd process's standard output goes: usage errors are printed there."""
    return log_path.with_name(log_path.name + ".stdout")


def spawn(argv: list[str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(stdout_path(log_path), "wb") as out:
        return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.PIPE)


def diagnostics(proc: subprocess.Popen[bytes] | None, log_path: Path) -> str:
    """The end of a process's stderr (once it has exited), its standard output and its log
    file, for errors."""
    err = b""
    if proc is not None and proc.poll() is not None and proc.stderr and not proc.stderr.closed:
        err = proc.stderr.read() or b""
    out_path = stdout_path(log_path)
    out = out_path.read_text(errors="replace")[-2000:] if out_path.exists() else ""
    log = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
    return (f"stderr: {err.decode(errors='replace')[-2000:]}\nstdout: {out}\n"
            f"log tail:\n{log}")


class ProcessFailed(RuntimeError):
    pass


class KVServerProcess:
    """One KVServer process with its own ports, data directory and log file."""

    def __init__(self, workdir: str | os.PathLike[str], name: str = "kvserver",
                 host: str = "127.0.0.1", console_port: int | None = None,
                 amp_port: int | None = None, extra_args: Sequence[str] = (),
                 tls: bool = True) -> None:
        self.workdir = Path(workdir)
        self.name = name
        #: the PKI the server makes on its first start (every server of one work directory
        #: shares it), or None with tls off
        self.pki_dir: Path | None = self.workdir.resolve() / "data" / "pki" if tls else None
        self.host = host
        # Only for ports not given: C{host} may be an address of another network namespace
        # (the harness's --netns), which cannot be bound from this one.
        allocate = console_port is None or amp_port is None
        spare = iter(free_ports(3, host) if allocate else ())
        self.console_port = console_port or next(spare)
        self.amp_port = amp_port or next(spare)
        # Its own free port for /metrics: the default (console port + 2000) may be a port
        # another test was handed. With ports chosen by the caller, none (unless given).
        self.metrics_port: int | None = next(spare) if allocate else None
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
            *(["--pki-dir", str(self.pki_dir)] if self.pki_dir else ["--tls", "off"]),
            *([] if "--metrics" in self.extra_args else
              ["--metrics", f"tcp:{self.metrics_port}:interface={self.host}"
               if self.metrics_port else "off"]),
            *self.extra_args,
        ]

    def tls(self, holder: str = "client") -> TLSFiles | None:
        """The TLS files of C{holder} (client, admin, or a server's name) in this server's
        PKI, for a test's own connections; None with tls off."""
        return None if self.pki_dir is None else TLSFiles.in_dir(str(self.pki_dir), holder)

    def start(self, timeout: float = 20.0) -> KVServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Run from the work directory so no etc/kvserver.yaml of the caller's cwd is picked up.
        self.proc = spawn(self.argv(), self.workdir, self.log_path)
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
        return diagnostics(self.proc, self.log_path)

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


# -- the ECS ---------------------------------------------------------------------------------------


def write_ecs_config(workdir: str | os.PathLike[str], *, slots: int = 4, initial_nodes: int = 2,
                     heartbeat_interval: float = 0.3, failure_timeout: float = 1.5,
                     host: str = "127.0.0.1", metrics: bool = True,
                     **options: object) -> Path:
    """Write C{workdir}/ecs.yaml: an ECS on a free port with a pool of C{slots} free-port slots.

    The state file (C{workdir}/ecs/state.json), the servers' logs (C{workdir}/logs) and their
    data directories (C{workdir}/<name>) all stay inside C{workdir}. Further YAML options may be
    given as keyword arguments with underscores (C{register_timeout=10}, C{replication=3}).
    With C{metrics} False the servers have metrics off and the ECS no status page.
    Returns the path of the file.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Each slot's console, AMP and metrics ports (the default metrics port, console + 2000,
    # may be a port another test was handed), and the ECS's AMP and status page ports.
    port, web_port, *slot_ports = free_ports(2 + 3 * slots, host)
    config: dict[str, object] = {
        "listen": f"tcp:{port}:interface={host}",
        "advertise": f"tcp:{host}:{port}",
        "state-file": str(workdir / "ecs" / "state.json"),
        "log-dir": str(workdir / "logs"),
        "heartbeat-interval": heartbeat_interval,
        "failure-timeout": failure_timeout,
        "initial-nodes": initial_nodes,
        "pki-dir": str(workdir / "data" / "pki"),
        "web": f"tcp:{web_port}:interface={host}" if metrics else "off",
        "nodes": [
            {"name": f"server{i}", "host": host, "console-port": slot_ports[3 * i - 3],
             "amp-port": slot_ports[3 * i - 2], "data-dir": str(workdir / f"server{i}"),
             "metrics": f"tcp:{slot_ports[3 * i - 1]}:interface={host}" if metrics else "off"}
            for i in range(1, slots + 1)
        ],
    }
    config.update({name.replace("_", "-"): value for name, value in options.items()})
    path = workdir / "ecs.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


class ECSError(RuntimeError):
    """The ECS answered an admin command with an error (the message is the ECS's)."""


class AMPError(RuntimeError):
    """An AMP error answer: its code and description."""

    def __init__(self, code: bytes, description: str) -> None:
        super().__init__(f"{code.decode(errors='replace')}: {description}")
        self.code, self.description = code, description


def amp_call(host: str, port: int, tls: TLSFiles | None, command: Any, timeout: float = 10.0,
             /, **arguments: Any) -> dict[str, Any]:
    """One AMP command on a fresh blocking connection (mutual TLS as C{tls}'s holder, or
    plaintext); its answer, or L{AMPError}. OSError (ssl.SSLError among them) or
    ConnectionError if the connection fails or closes first."""
    with connect(host, port, tls, timeout) as s:
        return sock_call(s, command, **arguments)


def sock_call(s: socket.socket, command: Any, /, **arguments: Any) -> dict[str, Any]:
    """One AMP command on the open blocking connection C{s} (see L{connect}); its answer, or
    L{AMPError}.

    Twisted's own AMP encodes the call and decodes the answer: an L{amp.AMP} writes to a
    L{StringTransport} that this function sends and is fed what the socket receives, so no
    reactor runs and the answer's Deferred fires during C{dataReceived}. The call goes through
    L{amp.AMP.callRemoteString}, which keeps the code of an error the command does not declare
    (C{callRemote} would make it UNKNOWN)."""
    wire = StringTransport()
    protocol = amp.AMP()
    protocol.makeConnection(wire)
    box = command.makeArguments(arguments, protocol)
    answers: list[Any] = []
    protocol.callRemoteString(command.commandName, True,
                              **{key.decode("ascii"): value for key, value in box.items()}
                              ).addBoth(answers.append)
    s.sendall(wire.value())
    while not answers:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("the peer closed the connection before answering")
        protocol.dataReceived(data)
    if isinstance(answers[0], Failure):
        error = answers[0].value
        if isinstance(error, amp.RemoteAmpError):
            raise AMPError(error.errorCode, error.description)
        answers[0].raiseException()
    return command.parseResponse(answers[0], protocol)


class ECSProcess:
    """One ``twistd -n ecs`` process and the servers it launches, tracked by PID.

    Run from C{workdir} (so no C{etc/ecs.yaml} of the caller's cwd is picked up) with the config
    at C{config_path} (written by L{write_ecs_config} with C{config_options} when not given); it
    logs to C{workdir}/ecs.log. L{status} and L{call} speak AMP to it over a plain blocking socket,
    so tests and benchmark drivers need no reactor. L{stop} ends the ECS and then, by PID, every
    server process it ever launched that is still alive (the PIDs come from the launcher's
    record, L{launches}), also when the ECS itself was killed.

        ecs = ECSProcess(tmp_path).start()
        try:
            ecs.wait_ready(ring_size=2)
            ...
        finally:
            ecs.stop()
    """

    def __init__(self, workdir: str | os.PathLike[str],
                 config_path: str | os.PathLike[str] | None = None,
                 **config_options: object) -> None:
        self.workdir = Path(workdir).resolve()
        if config_path is None:
            config_path = write_ecs_config(self.workdir, **config_options)  # type: ignore[arg-type]
        self.config_path = Path(config_path).resolve()
        self.config = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        listen = str(self.config["listen"])  # tcp:PORT:interface=HOST
        fields = listen.split(":")
        self.port = int(fields[1])
        self.host = "127.0.0.1"
        for field in fields[2:]:
            if field.startswith("interface="):
                self.host = field.split("=", 1)[1]
        self.log_path = self.workdir / "ecs.log"
        tls_on = str(self.config.get("tls", "on")).lower() not in ("off", "false", "no", "0")
        #: where the ECS keeps (and on its first start makes) the cluster's PKI; None: tls off
        self.pki_dir: Path | None = (
            (self.workdir / str(self.config.get("pki-dir", "data/pki"))).resolve()
            if tls_on else None)
        self.proc: subprocess.Popen[bytes] | None = None
        #: every server PID the ECS recorded launching (L{launches}): name -> pids
        self.launched: dict[str, list[int]] = {}

    @property
    def address(self) -> str:
        """C{HOST:PORT}, as C{ecsclient --ecs} takes it."""
        return f"{self.host}:{self.port}"

    def tls(self, holder: str = "admin") -> TLSFiles | None:
        """The TLS files of C{holder} (admin, client, ecs or a slot's server) in the ECS's
        PKI; None with tls off."""
        return None if self.pki_dir is None else TLSFiles.in_dir(str(self.pki_dir), holder)

    def tls_args(self, holder: str = "admin") -> list[str]:
        """The options that make ecsclient or kvclient use C{holder}'s certificate."""
        if self.pki_dir is None:
            return ["--tls", "off"]
        return ["--pki-dir", str(self.pki_dir), "--cert-name", holder]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def slots(self) -> list[dict[str, object]]:
        """The node pool of the config: dicts with name, host, console-port, amp-port."""
        return list(self.config.get("nodes", []))

    def argv(self) -> list[str]:
        return TWISTD + ["--pidfile=", "-n", "--logfile", str(self.log_path),
                         "ecs", "--config", str(self.config_path)]

    def start(self) -> ECSProcess:
        """Start the process and return at once (see L{wait_ready})."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(self.argv(), self.workdir, self.log_path)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, ring_size: int | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the ECS answers C{Status} and (if given) C{ring_size} servers are in its
        ring, every one of them connected; return that status. Raise if the ECS dies first."""
        deadline = time.monotonic() + timeout
        last: object = "no answer yet"
        while time.monotonic() < deadline:
            if not self.running:
                raise ProcessFailed(f"the ECS exited:\n{self.diagnostics()}")
            try:
                status = self.status(timeout=2.0)
            except (OSError, ECSError) as e:
                last = e
            else:
                last = status
                connected = {m["name"] for m in status["members"] if m["connected"]}
                if ring_size is None or (len(status["ring"]) == ring_size
                                         and set(status["ring"]) <= connected):
                    return status
            time.sleep(0.1)
        raise ProcessFailed(f"the ECS was not ready after {timeout}s (last: {last}):\n"
                            f"{self.diagnostics()}")

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The ECS's C{Status}, decoded from JSON."""
        from ecs.protocol import Status

        return json.loads(self.call(Status, timeout=timeout)["status"])

    def call(self, command: Any, timeout: float = 60.0, **arguments: Any) -> dict[str, Any]:
        """Send one admin AMP command on a fresh blocking connection and return its answer.

        Raises L{ECSError} with the ECS's message if it answers with an error, OSError if it
        cannot be reached or does not answer within C{timeout} seconds.
        """
        try:
            return amp_call(self.host, self.port, self.tls("admin"), command, timeout,
                            **arguments)
        except AMPError as e:
            raise ECSError(e.description) from None

    @property
    def launched_path(self) -> Path:
        """The ECS launcher's record of the processes it started (ecs/launcher.py), beside
        its state file."""
        state_file = self.workdir / str(self.config.get("state-file", "data/ecs/state.json"))
        return state_file.parent / "launched.json"

    def launches(self) -> list[dict[str, Any]]:
        """Every launch the ECS has recorded so far, oldest first: name, pid (the process it
        spawned), server_pid, host, console_port, amp_port, log, running."""
        try:
            return list(json.loads(self.launched_path.read_text(encoding="utf-8"))["launched"])
        except FileNotFoundError:
            return []

    def server_pids(self) -> dict[str, list[int]]:
        """Every server PID the ECS has launched so far: name -> pids (oldest first)."""
        for launch in self.launches():
            pids = self.launched.setdefault(launch["name"], [])
            if launch["server_pid"] is not None and launch["server_pid"] not in pids:
                pids.append(launch["server_pid"])
        return self.launched

    def live_server_pids(self) -> list[int]:
        """The launched server processes that are still alive."""
        return [pid for pids in self.server_pids().values() for pid in pids if pid_alive(pid)]

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the ECS to exit by itself (after C{ShutDown}); its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the ECS (its servers go on running; L{stop} ends them)."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """End the ECS (SIGTERM, SIGKILL after C{timeout}) and every server it launched."""
        self.server_pids()
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
            code = self.proc.returncode
            if self.proc.stderr:
                self.proc.stderr.close()
        self.kill_servers()
        return code

    def kill_servers(self, timeout: float = 10.0) -> None:
        """SIGKILL every launched server still alive and wait (bounded) until they are gone."""
        pids = self.live_server_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def diagnostics(self) -> str:
        return diagnostics(self.proc, self.log_path)


def stop_pids(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM these processes, SIGKILL what is left after C{timeout}; only these PIDs."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(pid_alive(p) for p in pids):
            return


def pid_alive(pid: int) -> bool:
    """Whether process C{pid} exists and is not a zombie (an exited child not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # The state follows the parenthesised command name, which may hold spaces.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
