"""The systems under test: how to start one, stop it, connect to it, and send it each operation.

Each system runs in processes of its own, started and stopped by PID from the (blocking)
driver; the load generator reaches it over loopback AMP. A system names the operations it
serves in the order a key set must see them (writes before the reads of the same keys), and
the system its figures are divided by in the table (L{SystemUnderTest.compare_to}).

Here chainstore's systems: L{EchoSystem} (a bare AMP server over plaintext: what AMP and
Twisted cost), L{SingleSystem} (one unreplicated ``twistd kvserver``) and L{ChainSystem} (an
ECS and three servers replicating every range three ways; the client sends each put to its
key's head and each get to its tail, or with L{chain_any} to any member of its chain, in turn). Both run with mutual TLS, as chainstore does by default,
the client presenting the C{client} certificate of the PKI the processes made; their
C{-plain} variants (L{single_plain}, L{chain_plain}) run the same processes with ``tls off``,
so one session shows what TLS costs. The peers, Redis and etcd, are in L{bench.peers}.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.protocols import amp

from bench.echo_server import Echo
from chainstore import protocol
from chainstore.ring import Ring, position
from chainstore.tls import Credentials, client_endpoint, load
from client.readers import ReaderChoice
from harness.processes import ECSProcess, KVServerProcess, ProcessFailed, free_port

HOST = "127.0.0.1"
CONNECT_TIMEOUT = 10.0
# bench is not an installed package: child processes import it from the checkout.
_CHECKOUT = Path(__file__).resolve().parent.parent


class WrongAnswer(Exception):
    """A system answered a request with something other than what was stored."""


class RingChanged(Exception):
    """The chain's ring changed during the session: its figures mix two configurations."""


async def amp_connection(reactor: Any, address: tuple[str, int],
                         credentials: Credentials | None = None) -> amp.AMP:
    """One raw AMP connection to C{address}: mutual TLS with C{credentials} (the server's
    certificate must name the host dialled), plaintext if None."""
    host, port = address
    return await connectProtocol(
        client_endpoint(reactor, credentials, host, port, CONNECT_TIMEOUT), amp.AMP())


class SystemUnderTest(ABC):
    """One system the benchmark measures; C{start} and C{stop} block, C{request} does not."""

    #: Short name in tables and JSON.
    name: str
    #: Operations in the order a key set must run them.
    operations: tuple[str, ...]
    #: The system whose throughput this one's is divided by in the table (same operation, or
    #: that system's only one), if it is measured in the same session.
    compare_to: str | None = None
    #: Whether a get answers with the value stored (the runner checks it): false for echo.
    reads_values: bool = True

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
    def request(self, op: str, conn: Any, key: bytes, value: bytes) -> Deferred[Any]:
        """Send one C{op} for C{key} on C{conn}, one of the handles L{connect} returned: a
        "put" of C{value}, or a "get" whose Deferred fires with the value stored (None if
        none is); fail if the system refuses it."""

    def credentials(self) -> Credentials | None:
        """What its clients present over TLS, read once it has started (None: plaintext)."""
        return None

    async def connect(self, reactor: Any, count: int, inflight: int = 1) -> list[Any]:
        """C{count} client handles for L{request}: here, AMP connections to L{address}, on
        which AMP multiplexes any number of requests. (Systems whose protocol cannot, such
        as HTTP/1.1, open C{inflight} connections behind one handle instead.)"""
        credentials = self.credentials()
        return [await amp_connection(reactor, self.address, credentials) for _ in range(count)]

    def disconnect(self, handles: Sequence[Any]) -> None:
        """Close what L{connect} opened."""
        for proto in handles:
            proto.transport.loseConnection()

    async def check_after(self, handles: Sequence[Any]) -> None:
        """Raise if the figures just measured are not those of the system as started."""

    @property
    def serving_pids(self) -> list[int]:
        """The processes that serve requests, whose CPU time the table reports."""
        return self.pids

    def cpu_seconds(self) -> float | None:
        """CPU time its serving processes have used so far, or None where /proc cannot tell."""
        total = 0.0
        for pid in self.serving_pids:
            used = process_cpu_seconds(pid)
            if used is None:
                return None
            total += used
        return total

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "operations": list(self.operations),
                "address": "%s:%d" % self.address, "pids": self.pids}

    def read_counts(self, handles: Sequence[Any]) -> dict[str, int] | None:
        """Gets sent so far to each of the system's servers, by name; None if it has one."""
        return None


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


class SingleSystem(SystemUnderTest):
    """One real ``twistd kvserver`` with its default settings, in its own data directory:
    no ECS, a chain of one (no replication). With C{tls} (the default, as chainstore's) it
    makes its PKI on its first start and the client presents its C{client} certificate;
    without, it is started with ``--tls off`` and named C{single-plain}."""

    name = "single"
    operations = ("put", "get")
    compare_to = "echo"

    def __init__(self, workdir: str | os.PathLike[str], tls: bool = True) -> None:
        if not tls:
            self.name = "single-plain"
            self.compare_to = "single"
        self.server = KVServerProcess(workdir, name="bench-kvserver" if tls else "bench-kvserver-plain",
                                      host=HOST, tls=tls)
        self._credentials: Credentials | None = None

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

    def credentials(self) -> Credentials | None:
        if self._credentials is None:
            self._credentials = load(self.server.tls("client"))
        return self._credentials

    def request(self, op: str, conn: amp.AMP, key: bytes, value: bytes) -> Deferred[Any]:
        return kv_request(self.name, op, conn, key, value)

    def describe(self) -> dict[str, Any]:
        # The server runs with the defaults of chainstore.config (sqlite, durability crash,
        # LRU cache of 1000): the argv says so, and which flags a later run changed.
        return {**super().describe(), "tls": self.server.pki_dir is not None,
                "argv": self.server.argv()[3:]}


def kv_request(system: str, op: str, conn: amp.AMP, key: bytes, value: bytes) -> Deferred[Any]:
    """A put, or a get answering the value: the same raw AMP for every kvserver system."""
    if op == "put":
        return conn.callRemote(protocol.Put, key=key, value=value)
    if op == "get":
        return conn.callRemote(protocol.Get, key=key).addCallback(_value_of)
    raise ValueError(f"{system} has no operation {op!r}")


def _value_of(answer: dict[str, Any]) -> bytes:
    return answer["value"]  # type: ignore[no-any-return]


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """Stop a child this process started, by its PID: SIGTERM, then SIGKILL if it has not
    exited C{timeout} seconds later; nothing if it never started or has exited."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


class EchoSystem(SystemUnderTest):
    """The bare AMP echo server of L{bench.echo_server}: the cost of AMP itself."""

    name = "echo"
    operations = ("echo",)
    # A get is an echo of the key alone: it answers no value to check.
    reads_values = False

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
        stop_process(self.proc, timeout)

    def request(self, op: str, conn: amp.AMP, key: bytes, value: bytes) -> Deferred[Any]:
        # Each operation costs the AMP message it would cost a kvserver: a put carries the
        # value, a get only the key.
        if op in ("echo", "put"):
            return conn.callRemote(Echo, key=key, value=value)
        if op == "get":
            return conn.callRemote(Echo, key=key, value=b"")
        raise ValueError(f"{self.name} has no operation {op!r}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tls": False, "argv": self.argv()[1:]}


class ChainRouter:
    """One client handle of L{ChainSystem}: an AMP connection to every server of the ring, and
    for each range the connections to its chain's head and tail, and to the members that
    answer its gets: the tail (C{reads="tail"}) or every member (C{"any"}), picked per get as
    the client library picks it (L{client.readers.ReaderChoice}: by key, hot keys in turn).

    Routing a key costs one MD5 and one bisection (L{Ring.owner_index}), so a request costs the
    load generator about what a request to the single server does. C{credentials} are what its
    connections were dialled with (None: plaintext), for the servers it dials later. C{gets}
    counts the gets sent to each server (its read share).
    """

    def __init__(self, ring: Ring, conns: dict[str, amp.AMP],
                 credentials: Credentials | None = None, reads: str = "tail") -> None:
        self.ring = ring
        self.conns = conns
        self.credentials = credentials
        chains = [ring.chain_for_index(i) for i in range(len(ring))]
        self._heads = [conns[chain[0].name] for chain in chains]
        self._tails = [conns[chain[-1].name] for chain in chains]
        # per range, the (name, connection) of each member a get may go to
        self._readers = [[(n.name, conns[n.name]) for n in (chain if reads == "any"
                                                             else chain[-1:])]
                         for chain in chains]
        self._choice = ReaderChoice()
        self.gets: Counter[str] = Counter()

    def reader(self, key: bytes) -> amp.AMP:
        """The connection a get of C{key} goes to (counted in C{gets})."""
        pos = position(key)
        index = self.ring.owner_index(pos)
        readers = self._readers[index]
        if len(readers) == 1:
            name, conn = readers[0]
        else:
            name, conn = readers[self._choice.member(key, pos, len(readers))]
        self.gets[name] += 1
        return conn

    def head(self, key: bytes) -> amp.AMP:
        return self._heads[self.ring.owner_index(position(key))]

    def tail(self, key: bytes) -> amp.AMP:
        return self._tails[self.ring.owner_index(position(key))]


class ChainSystem(SystemUnderTest):
    """An ECS (replication 3, three initial servers, a pool of four slots) and the three
    ``twistd kvserver`` processes it launches, forming one ring in which every server heads one
    range and is middle and tail of the others.

    Each client handle fetches the ring with C{GetMetadata} and keeps one AMP connection per
    server; puts go to the key's head, gets to its tail. The ECS runs with its default
    heartbeat (1 s) and failure timeout (3 s), so a loaded but live server is not declared dead.
    """

    name = "chain"
    operations = ("put", "get")
    compare_to = "single"

    def __init__(self, workdir: str | os.PathLike[str], servers: int = 3, replication: int = 3,
                 slots: int = 4, tls: bool = True, reads: str = "tail",
                 metrics: bool = True) -> None:
        self.reads = reads
        if not tls:
            self.name = "chain-plain"
            self.compare_to = "chain"
        if reads == "any":
            self.name = "chain-any" if tls else "chain-any-plain"
            self.compare_to = "chain"
        if not metrics:
            self.name = "chain-nometrics"
            self.compare_to = "chain"
        self.servers = servers
        self.replication = replication
        # Where GetMetadata is asked once the ring serves (before: the pool's first slot).
        self._serving: tuple[str, int] | None = None
        # With TLS the ECS makes the cluster's PKI (a certificate per slot, and the client's)
        # in its pki-dir on its first start; tls off makes it and its servers plaintext.
        self.ecs = ECSProcess(Path(workdir) / self.name, slots=slots, initial_nodes=servers,
                              replication=replication, heartbeat_interval=1.0,
                              failure_timeout=3.0, host=HOST, metrics=metrics,
                              **({} if tls else {"tls": "off"}))
        self.ring: Ring | None = None
        self._credentials: Credentials | None = None

    def credentials(self) -> Credentials | None:
        if self._credentials is None:
            self._credentials = load(self.ecs.tls("client"))
        return self._credentials

    @property
    def address(self) -> tuple[str, int]:
        """A ring server's AMP address (any of them answers C{GetMetadata})."""
        if self._serving is not None:
            return self._serving
        first = self.ecs.slots[0]
        return (str(first["host"]), int(first["amp-port"]))  # type: ignore[call-overload]

    @property
    def pids(self) -> list[int]:
        if self.ecs.proc is None:
            return []
        return [self.ecs.pid, *self.serving_pids]

    @property
    def serving_pids(self) -> list[int]:
        # The launched servers, from the ECS's log (the ECS itself only heartbeats).
        return [pids[-1] for _, pids in sorted(self.ecs.server_pids().items())]

    def start(self, timeout: float = 60.0) -> None:
        self.ecs.start()
        try:
            self.ecs.wait_ready(ring_size=self.servers, timeout=timeout)
            deadline = time.monotonic() + timeout
            while not self.ecs.status()["serving"]:
                if time.monotonic() > deadline or not self.ecs.running:
                    raise ProcessFailed(f"the chain did not start serving:\n"
                                        f"{self.ecs.diagnostics()}")
                time.sleep(0.05)
            # The ring is served now; the slots it uses are the first ones in the pool.
            names = set(self.ecs.status()["ring"])
            first = next(s for s in self.ecs.slots if s["name"] in names)
            self._serving = (str(first["host"]), int(first["amp-port"]))  # type: ignore[call-overload]
        except BaseException:
            self.ecs.stop()
            raise

    def stop(self) -> None:
        if self.ecs.proc is not None:
            self.ecs.stop()

    async def connect(self, reactor: Any, count: int, inflight: int = 1) -> list[ChainRouter]:
        credentials = self.credentials()
        first = await amp_connection(reactor, self.address, credentials)
        try:
            ring = protocol.ring_from_wire(await first.callRemote(protocol.GetMetadata))
        finally:
            first.transport.loseConnection()
        if len(ring.live_nodes) != self.servers or ring.chain_length != min(self.replication, self.servers):
            raise RingChanged(f"the chain's ring is not the one started: {ring}")
        if self.ring is None:
            self.ring = ring
        routers = []
        for _ in range(count):
            conns = {node.name: await amp_connection(reactor, (node.host, node.amp_port),
                                                     credentials)
                     for node in ring.nodes}
            routers.append(ChainRouter(ring, conns, credentials, self.reads))
        return routers

    def read_counts(self, handles: Sequence[ChainRouter]) -> dict[str, int] | None:
        total: Counter[str] = Counter()
        for router in handles:
            total.update(router.gets)
        return dict(total)

    def disconnect(self, handles: Sequence[ChainRouter]) -> None:
        for router in handles:
            for proto in router.conns.values():
                proto.transport.loseConnection()

    async def check_after(self, handles: Sequence[ChainRouter]) -> None:
        """The ring after the session must be the one measured: a server declared dead (or a
        repair) in between would have shortened chains without failing any request."""
        if not handles:
            return
        ring = handles[0].ring
        for name, conn in handles[0].conns.items():
            now = protocol.ring_from_wire(await conn.callRemote(protocol.GetMetadata))
            if (now.epoch, now.dead, now.nodes) != (ring.epoch, ring.dead, ring.nodes):
                raise RingChanged(f"{name} serves epoch {now.epoch} (dead {sorted(now.dead)}); "
                                  f"the session started in epoch {ring.epoch}")

    def request(self, op: str, conn: ChainRouter, key: bytes, value: bytes) -> Deferred[Any]:
        return kv_request(self.name, op, conn.head(key) if op == "put" else conn.reader(key),
                          key, value)

    def describe(self) -> dict[str, Any]:
        ring = self.ring
        return {**super().describe(), "tls": self.ecs.pki_dir is not None, "reads": self.reads,
                "ecs_pid": self.ecs.pid if self.ecs.proc else None,
                "replication": None if ring is None else ring.replication,
                "epoch": None if ring is None else ring.epoch,
                "servers": [] if ring is None else [
                    {"name": n.name, "amp": f"{n.host}:{n.amp_port}",
                     "console": n.console_address} for n in ring.nodes]}


def single_plain(workdir: str | os.PathLike[str]) -> SingleSystem:
    """L{SingleSystem} started with ``--tls off``: the same server over plaintext AMP."""
    return SingleSystem(workdir, tls=False)


def chain_any(workdir: str | os.PathLike[str]) -> ChainSystem:
    """L{ChainSystem} whose gets go to the members of the key's chain as the client library
    sends them by default (CRAQ reads; L{client.readers}), beside C{chain}'s tail-only gets."""
    return ChainSystem(workdir, reads="any")


def chain_plain(workdir: str | os.PathLike[str]) -> ChainSystem:
    """L{ChainSystem} with ``tls: off`` in the ECS's config: the ECS and the servers it
    launches speak plaintext AMP, so its figures beside the chain's are what TLS costs."""
    return ChainSystem(workdir, tls=False)


def chain_nometrics(workdir: str | os.PathLike[str]) -> ChainSystem:
    """L{ChainSystem} with metrics off on every server (no /metrics, requests neither counted
    nor timed) and no status page: beside the chain's, what the metrics cost."""
    return ChainSystem(workdir, metrics=False)
