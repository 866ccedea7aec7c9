"""The stores users would pick instead, measured through the same load generator.

L{RedisSystem}: one ``redis-server`` primary and two replicas (``replicaof``); each put is
``SET`` followed, in the same write, by ``WAIT 2 0``, and counts as done when ``WAIT`` answers
that both replicas have it; gets read the primary. Redis is not strongly consistent even so
(a failover may lose acknowledged writes, and ``WAIT`` does not make the write durable).

L{EtcdSystem}: three ``etcd`` members forming one Raft cluster; puts are ``POST /v3/kv/put``
and gets linearizable ``POST /v3/kv/range`` (the default, serializable=false) on the v3 JSON
gateway, over keep-alive HTTP/1.1 connections spread over the three members.

Both come from Debian's packages (L{ensure_installed} installs missing ones with apt-get when
it runs as root). Every server listens on 127.0.0.1 on free ports, keeps its data in the run's
temporary directory, and is stopped by PID.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from bench.http11 import ConnectionPool, HTTP11Client, Response
from bench.resp import RedisClient, Reply, blocking_command
from bench.systems import HOST, CONNECT_TIMEOUT, SystemUnderTest, stop_process
from harness.processes import ProcessFailed, free_ports

#: The Debian package that brings each program the peers need.
PACKAGES = {"redis-server": "redis-server", "redis-benchmark": "redis-tools",
            "etcd": "etcd-server", "etcdctl": "etcd-client"}
#: The programs each peer system needs.
PROGRAMS = {"redis": ("redis-server", "redis-benchmark"), "etcd": ("etcd", "etcdctl")}
APT_TIMEOUT = 900.0


class PeerFailed(Exception):
    """A peer answered something other than success."""


# -- installing ---------------------------------------------------------------------------------

def ensure_installed(systems: Sequence[str], install: bool = True,
                     log: Callable[[str], None] = lambda text: None,
                     which: Callable[[str], str | None] = shutil.which,
                     run: Callable[..., Any] = subprocess.run) -> dict[str, str]:
    """Install what the peer C{systems} need and is missing, if C{install} and we are root;
    return, for each system that still misses a program, why (an empty dict: all present)."""
    wanted = [name for name in systems if name in PROGRAMS]
    absent = {name: [p for p in PROGRAMS[name] if which(p) is None] for name in wanted}
    packages = sorted({PACKAGES[p] for programs in absent.values() for p in programs})
    attempt = ""
    if packages and install:
        if os.geteuid() != 0 or which("apt-get") is None:
            attempt = "not installed: installing needs root and apt-get"
        else:
            log(f"installing {' '.join(packages)} with apt-get")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            try:
                for argv in (["apt-get", "update", "-qq"],
                             ["apt-get", "install", "-y", "-qq", *packages]):
                    done = run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=APT_TIMEOUT)
                    if done.returncode != 0:
                        attempt = (f"{' '.join(argv)} exited with {done.returncode}: "
                                   f"{done.stderr.decode(errors='replace').strip()[-300:]}")
                        break
            except (OSError, subprocess.TimeoutExpired) as e:
                attempt = f"apt-get failed: {e}"
    elif packages:
        attempt = "not installed (--no-install)"
    missing = {}
    for name in wanted:
        still = [p for p in PROGRAMS[name] if which(p) is None]
        if still:
            missing[name] = (f"{', '.join(still)} missing (Debian package "
                             f"{', '.join(sorted({PACKAGES[p] for p in still}))})"
                             + (f"; {attempt}" if attempt else ""))
    return missing


def program_version(argv: Sequence[str]) -> str | None:
    """The first line a program prints for its version option, or None if it cannot run."""
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else None


# -- processes ----------------------------------------------------------------------------------

class ServerProcess:
    """One server program run directly (not as a daemon), its output in a log file."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         cwd=self.log_path.parent)

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessFailed(f"{self.argv[0]} exited with {self.proc.returncode}:\n"
                                f"{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)


def wait_until(ready: Callable[[], bool], processes: Sequence[ServerProcess], timeout: float,
               what: str) -> None:
    """Poll C{ready} until it is true; fail at once if a process died, or after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        for p in processes:
            p.check_running()
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log_path}\n{p.log_tail()}" for p in processes)
            raise ProcessFailed(f"{what} not ready after {timeout}s\n{logs}")
        time.sleep(0.05)


class ManyProcesses(SystemUnderTest):
    """A system of several server processes, all of them serving."""

    processes: list[ServerProcess]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.proc is not None]

    def stop(self) -> None:
        # Replicas and followers first: a primary stopped first makes them log reconnects.
        for p in reversed(self.processes):
            p.stop()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "argv": [p.argv for p in self.processes]}


# -- Redis --------------------------------------------------------------------------------------

class RedisPool:
    """Redis connections behind one handle: each request goes to an idle connection (as
    redis-benchmark's clients do, one request in flight each); with none idle, it is pipelined
    on the first (Redis answers a connection's commands in order)."""

    def __init__(self, clients: Sequence[RedisClient]) -> None:
        self.clients = list(clients)
        self._idle: deque[RedisClient] = deque(self.clients)

    def pipeline(self, *commands: tuple[bytes | str | int, ...]) -> list[Deferred[Reply]]:
        client = self._idle.popleft() if self._idle else self.clients[0]
        ds = client.pipeline(*commands)
        ds[-1].addBoth(self._released, client)
        return ds

    def _released(self, result: Any, client: RedisClient) -> Any:
        if client not in self._idle and not client._waiting:
            self._idle.append(client)
        return result

    def close(self) -> None:
        for client in self.clients:
            if client.transport is not None:
                client.transport.loseConnection()


def redis_put(pool: RedisPool, key: bytes, value: bytes, replicas: int) -> Deferred[None]:
    """C{SET key value} then C{WAIT replicas 0}, written together; done when WAIT answers that
    C{replicas} replicas have the write."""
    set_d, wait_d = pool.pipeline((b"SET", key, value), (b"WAIT", replicas, 0))
    # The SET's outcome (a Failure too: keeping it consumes it) is judged with the WAIT's.
    set_result: list[Any] = []
    set_d.addBoth(set_result.append)

    def check(acked: Reply) -> None:
        if set_result and isinstance(set_result[0], Failure):
            set_result[0].raiseException()   # the SET failed: report that, not the WAIT
        if set_result != ["OK"]:
            raise PeerFailed(f"SET answered {set_result!r}")
        if not isinstance(acked, int) or acked < replicas:
            raise PeerFailed(f"WAIT {replicas} 0 answered {acked!r}")

    return wait_d.addCallback(check)


def redis_get(pool: RedisPool, key: bytes) -> Deferred[bytes | None]:
    def check(reply: Reply) -> bytes | None:
        if reply is not None and not isinstance(reply, bytes):
            raise PeerFailed(f"GET answered {reply!r}")
        return reply

    return pool.pipeline((b"GET", key))[0].addCallback(check)


class RedisSystem(ManyProcesses):
    """A primary and C{replicas} replicas (``replicaof``), AOF on without fsync
    (``appendfsync no``: a write survives the process's crash, not the machine's, like
    chainstore's default ``crash`` durability), no RDB snapshots."""

    name = "redis"
    operations = ("put", "get")

    def __init__(self, workdir: str | os.PathLike[str], replicas: int = 2) -> None:
        self.workdir = Path(workdir) / "redis"
        self.replicas = replicas
        self.ports = free_ports(replicas + 1, HOST)
        self.processes = [ServerProcess(self._argv(i), self.workdir / f"r{i}" / "redis.log")
                          for i in range(replicas + 1)]

    def _argv(self, index: int) -> list[str]:
        argv = ["redis-server", "--bind", HOST, "--port", str(self.ports[index]),
                "--dir", str(self.workdir / f"r{index}"), "--daemonize", "no",
                "--save", "", "--appendonly", "yes", "--appendfsync", "no",
                "--protected-mode", "yes", "--logfile", ""]
        if index:
            argv += ["--replicaof", HOST, str(self.ports[0])]
        return argv

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.ports[0])

    def start(self, timeout: float = 30.0) -> None:
        try:
            for p in self.processes:
                p.start()
            wait_until(lambda: blocking_command(self.address, "PING") == "PONG",
                       self.processes, timeout, "redis primary")
            wait_until(self._replicas_online, self.processes, timeout, "redis replicas")
        except BaseException:
            self.stop()
            raise

    def _replicas_online(self) -> bool:
        info = blocking_command(self.address, "INFO", "replication")
        if not isinstance(info, bytes):
            return False
        online = [line for line in info.decode().splitlines()
                  if line.startswith("slave") and "state=online" in line]
        return len(online) == self.replicas

    async def connect(self, reactor: Any, count: int, inflight: int = 1) -> list[RedisPool]:
        clients = []
        for _ in range(max(count, inflight)):
            clients.append(await connectProtocol(
                TCP4ClientEndpoint(reactor, HOST, self.ports[0], timeout=CONNECT_TIMEOUT),
                RedisClient()))
        return [RedisPool(clients)]

    def disconnect(self, handles: Sequence[RedisPool]) -> None:
        for pool in handles:
            pool.close()

    def request(self, op: str, conn: RedisPool, key: bytes, value: bytes) -> Deferred[Any]:
        if op == "put":
            return redis_put(conn, key, value, self.replicas)
        if op == "get":
            return redis_get(conn, key)
        raise ValueError(f"{self.name} has no operation {op!r}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "replicas": self.replicas,
                "ports": self.ports, "put": f"SET + WAIT {self.replicas} 0", "get": "GET (primary)"}


@dataclass(frozen=True)
class NativeResult:
    """What a native tool reported for one test: its own throughput and percentiles."""

    inflight: int
    completed: int
    ops_per_second: float
    p50_ms: float | None
    p99_ms: float | None
    stopped_by_time: bool = False

    @property
    def elapsed(self) -> float:
        return self.completed / self.ops_per_second if self.ops_per_second else 0.0

    def summary(self) -> dict[str, Any]:
        return {"inflight": self.inflight, "completed": self.completed,
                "elapsed_s": self.elapsed, "ops_per_s": self.ops_per_second,
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "p999_ms": None, "max_ms": None,
                "stopped_by_time": self.stopped_by_time}


def redis_benchmark_argv(port: int, inflight: int, ops: int, value_size: int,
                         records: int) -> list[str]:
    """redis-benchmark for SET then GET: C{inflight} clients with one request in flight each
    (``-c N -P 1``), C{ops} requests per test, values of C{value_size} bytes, keys drawn
    uniformly among C{records} (``-r``), CSV output."""
    return ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", "set,get", "-n", str(ops),
            "-c", str(inflight), "-P", "1", "-d", str(value_size), "-r", str(records), "--csv"]


def parse_redis_benchmark_csv(text: str, inflight: int, ops: int) -> dict[str, NativeResult]:
    """redis-benchmark's --csv output: test name to result (percentiles where it gives them)."""
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if not rows:
        raise PeerFailed("redis-benchmark printed no CSV")
    header = [h.strip().lower() for h in rows[0]]
    if header and header[0] == "test":
        body = rows[1:]
    else:  # older versions print no header: "test","rps"
        header, body = ["test", "rps"], rows
    results = {}
    for row in body:
        fields = dict(zip(header, row))
        try:
            rps = float(fields["rps"])
        except (KeyError, ValueError):
            raise PeerFailed(f"unreadable redis-benchmark line {row!r}") from None
        results[fields["test"].upper()] = NativeResult(
            inflight=inflight, completed=ops, ops_per_second=rps,
            p50_ms=_float_or_none(fields.get("p50_latency_ms")),
            p99_ms=_float_or_none(fields.get("p99_latency_ms")))
    return results


def _float_or_none(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


async def run_redis_benchmark(reactor: Any, system: RedisSystem, inflight: int, ops: int,
                              value_size: int, records: int) -> dict[str, NativeResult]:
    argv = redis_benchmark_argv(system.ports[0], inflight, ops, value_size, records)
    executable = shutil.which(argv[0]) or argv[0]
    out, err, code = await getProcessOutputAndValue(executable, argv[1:], env=dict(os.environ),
                                                    reactor=reactor)
    if code != 0:
        raise PeerFailed(f"{' '.join(argv)} exited with {code}: {err.decode(errors='replace')}")
    return parse_redis_benchmark_csv(out.decode(errors="replace"), inflight, ops)


# -- etcd ---------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def etcd_put_body(key: bytes, value: bytes) -> bytes:
    return json.dumps({"key": _b64(key), "value": _b64(value)}).encode()


def etcd_range_body(key: bytes) -> bytes:
    # serializable is left out: false, a linearizable read (ReadIndex through the leader).
    return json.dumps({"key": _b64(key)}).encode()


def etcd_answer(response: Response) -> dict[str, Any]:
    """The JSON of a successful gateway response; raises L{PeerFailed} otherwise."""
    if response.status != 200:
        raise PeerFailed(f"etcd answered HTTP {response.status}: {response.body[:300]!r}")
    try:
        answer = json.loads(response.body)
    except ValueError:
        raise PeerFailed(f"etcd answered non-JSON: {response.body[:300]!r}") from None
    if not isinstance(answer, dict) or "header" not in answer:
        raise PeerFailed(f"etcd answered {response.body[:300]!r}")
    return answer


def etcd_value(answer: dict[str, Any]) -> bytes | None:
    kvs = answer.get("kvs") or []
    return base64.b64decode(kvs[0].get("value", "")) if kvs else None


_JSON = (("Content-Type", "application/json"),)


class EtcdSystem(ManyProcesses):
    """C{members} etcd members in one cluster (``--initial-cluster-state new``), each with
    its client and peer URLs on 127.0.0.1; defaults otherwise (every Raft log entry fsynced
    before it is acknowledged), but a backend quota of 8 GiB, since nothing compacts the
    revisions a run writes."""

    name = "etcd"
    operations = ("put", "get")

    def __init__(self, workdir: str | os.PathLike[str], members: int = 3,
                 tls: bool = False) -> None:
        self.workdir = Path(workdir) / "etcd"
        ports = free_ports(2 * members, HOST)
        self.client_ports, self.peer_ports = ports[:members], ports[members:]
        self.names = [f"m{i + 1}" for i in range(members)]
        #: with tls: an etcd CA of its own (self.pki_dir), each member's certificate for its
        #: client and peer URLs, both with --client-cert-auth, and a client certificate
        #: ("ecs") for the ECS: as an operator runs etcd for the ECS beyond loopback
        self.pki_dir: Path | None = None
        self.scheme = "https" if tls else "http"
        if tls:
            from chainstore import pki
            self.pki_dir = self.workdir / "pki"
            pki.ensure(str(self.pki_dir), [("server", n, [HOST]) for n in self.names]
                       + [("ecs", "ecs", [])])
        url = f"{self.scheme}://{HOST}"
        cluster = ",".join(f"{n}={url}:{p}" for n, p in zip(self.names, self.peer_ports))
        # A token of this run: members of another run can never join this cluster.
        token = f"chainstore-bench-{os.getpid()}-{self.client_ports[0]}"
        self.processes = [
            ServerProcess([
                "etcd", "--name", name, "--data-dir", str(self.workdir / name / "data"),
                "--listen-client-urls", f"{url}:{client}",
                "--advertise-client-urls", f"{url}:{client}",
                "--listen-peer-urls", f"{url}:{peer}",
                "--initial-advertise-peer-urls", f"{url}:{peer}",
                "--initial-cluster", cluster, "--initial-cluster-token", token,
                "--initial-cluster-state", "new", "--quota-backend-bytes", str(8 << 30),
                *self._tls_flags(name),
                "--logger", "zap", "--log-level", "warn"],
                self.workdir / name / "etcd.log")
            for name, client, peer in zip(self.names, self.client_ports, self.peer_ports)]

    def _tls_flags(self, name: str) -> list[str]:
        if self.pki_dir is None:
            return []
        files = self.tls_files(name)
        return ["--cert-file", files.cert, "--key-file", files.key,
                "--trusted-ca-file", files.ca, "--client-cert-auth",
                "--peer-cert-file", files.cert, "--peer-key-file", files.key,
                "--peer-trusted-ca-file", files.ca, "--peer-client-cert-auth"]

    def tls_files(self, holder: str = "ecs") -> Any:
        """The etcd CA's files of C{holder} (a member's name, or "ecs": the client's)."""
        from chainstore.tls import TLSFiles
        assert self.pki_dir is not None, "this etcd runs without TLS"
        return TLSFiles.in_dir(str(self.pki_dir), holder)

    @property
    def endpoints(self) -> list[str]:
        """The members' client URLs."""
        return [f"{self.scheme}://{HOST}:{port}" for port in self.client_ports]

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.client_ports[0])

    def start(self, timeout: float = 60.0) -> None:
        try:
            for p in self.processes:
                p.start()
            wait_until(self._healthy, self.processes, timeout, "etcd cluster")
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        # /health is true on a member once the cluster has a leader and it can serve.
        context = None
        if self.pki_dir is not None:
            files = self.tls_files()
            context = ssl.create_default_context(cafile=files.ca)
            context.load_cert_chain(files.cert, files.key)
        for url in self.endpoints:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2, context=context) as r:
                    if json.loads(r.read()).get("health") != "true":
                        return False
            except (urllib.error.URLError, ValueError, OSError):
                return False
        return True

    async def connect(self, reactor: Any, count: int, inflight: int = 1) -> list[ConnectionPool]:
        # One request in flight per connection, connections spread over the members, as a
        # client configured with every member's endpoint would.
        if self.pki_dir is not None:
            raise ValueError("the benchmark's load speaks plain HTTP: start etcd without tls")
        clients = []
        for i in range(max(count, inflight)):
            port = self.client_ports[i % len(self.client_ports)]
            clients.append(await connectProtocol(
                TCP4ClientEndpoint(reactor, HOST, port, timeout=CONNECT_TIMEOUT),
                HTTP11Client(f"{HOST}:{port}")))
        return [ConnectionPool(clients)]

    def disconnect(self, handles: Sequence[ConnectionPool]) -> None:
        for pool in handles:
            pool.close()

    def request(self, op: str, conn: ConnectionPool, key: bytes, value: bytes) -> Deferred[Any]:
        if op == "put":
            return conn.request("POST", "/v3/kv/put", etcd_put_body(key, value),
                                _JSON).addCallback(etcd_answer).addCallback(lambda _: None)
        if op == "get":
            return conn.request("POST", "/v3/kv/range", etcd_range_body(key),
                                _JSON).addCallback(etcd_answer).addCallback(etcd_value)
        raise ValueError(f"{self.name} has no operation {op!r}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "members": len(self.names),
                "client_ports": self.client_ports, "put": "POST /v3/kv/put",
                "get": "POST /v3/kv/range (linearizable)"}
