"""The cluster under test: one ``twistd ecs`` and several ``twistd kvserver`` processes on
loopback, every link between them through a L{torture.proxy.FaultProxy}.

The harness starts every server itself (the ECS runs with ``launcher: none``), so it knows each
PID and can SIGKILL, SIGSTOP and restart any of them on the same ports and data directory. The
links, all proxied (see L{torture.proxy.ProxyFabric}):

 - server -> server: each server's ``--peer-routes`` file names the proxy in front of every peer;
 - server -> ECS: each server's ``--ecs`` is its own proxy to the ECS, so one server can be cut
   from the ECS alone;
 - client -> server: the workload's clients dial through the proxies of the node ``client``
   (L{endpoint_factory}).

The admin commands go straight to the ECS: the harness itself is never partitioned.

Every link is mutual TLS (unless the cluster is made with C{tls=False}) with the PKI in
C{WORKDIR/data/pki}, which the ECS completes on its start: a CA and the certificates of the ECS,
every slot, C{admin} (the harness's admin link) and C{client} (the workload). The proxies pass
TLS through untouched, so a dialling side checks its peer's certificate against the proxy's
address (a server's peer routes and ECS link) or, for the clients, the server's own host; in
loopback both are 127.0.0.1, which every certificate the ECS issues names. In namespaces a
server or the ECS is also dialled at proxies on 10.N.i.1: the harness issues those
certificates itself, with every such address, before the ECS starts (L{Cluster.dialled_hosts}).

Everything here runs in the harness's reactor thread. The process helpers of
L{harness.processes} block while a process starts; they run in a worker thread
(C{deferToThread}) so the proxies keep moving bytes meanwhile.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import amp

from chainstore import pki, roles
from chainstore.logs import get_logger
from chainstore.ring import Ring
from chainstore.storage import STORE_NAMES
from harness.processes import ECSProcess, KVServerProcess, free_port
from chainstore.tls import Credentials, TLSFiles, client_endpoint, load
from client.kvstore import KVStore
from ecs import protocol as admin
from torture.proxy import FaultProxy, ProxyFabric

log = get_logger("torture.cluster")

ECS = "ecs"
CLIENT = "client"
HOST = "127.0.0.1"


class ClusterError(RuntimeError):
    """The cluster did not reach the state the harness waited for, within its bound."""


class Cluster:
    """An ECS and C{servers} servers (all of them in the ring once L{start} returns).

    @param workdir: the ECS's config, state and log, and each server's data directory and log.
    @param heartbeat: the ECS's heartbeat interval; @param failure_timeout: its failure timeout.
    @param tls: mutual TLS on every link (the default), or plaintext (C{tls: off}) everywhere.
    @param copies_beside_moves: the ECS's C{copies-beside-moves}.
    """

    def __init__(self, reactor: Any, workdir: str | Path, *, servers: int = 5,
                 replication: int = 3, heartbeat: float = 0.3,
                 failure_timeout: float = 1.5, network: Any = None, tls: bool = True,
                 copies_beside_moves: bool = False) -> None:
        self.reactor = reactor
        #: where each server lives: L{Loopback} (default) or L{Namespaces}
        self.network = network or Loopback()
        self.workdir = Path(workdir).resolve()
        self.names = [f"server{i}" for i in range(1, servers + 1)]
        self.replication = replication
        self.heartbeat = heartbeat
        self.failure_timeout = failure_timeout
        self.tls = tls
        self.copies_beside_moves = copies_beside_moves
        #: the cluster's PKI (the ECS's pki-dir, and where KVServerProcess points servers), or
        #: None with TLS off
        self.pki_dir: Path | None = self.workdir / "data" / "pki" if tls else None
        self._credentials: dict[str, Credentials | None] = {}
        self.fabric = ProxyFabric(reactor)
        self.servers: dict[str, KVServerProcess] = {}
        self.ports: dict[str, tuple[int, int]] = {}  # name -> (amp, console)
        self.ecs: ECSProcess | None = None
        self.ecs_port = 0
        self.config_path = self.workdir / "ecs.yaml"
        #: processes stopped with SIGSTOP and not yet continued
        self.paused: set[str] = set()
        #: servers restarted by the harness, per name (restarts after a kill, leave or repair)
        self.restarts: dict[str, int] = {}

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def amp_addresses(self) -> list[tuple[str, int]]:
        """The real AMP addresses of every server (clients map them to their proxies)."""
        return [(self.network.server_host(name), self.ports[name][0]) for name in self.names]

    def credentials(self, holder: str) -> Credentials | None:
        """The loaded TLS files of C{holder} (C{admin}, C{client}) in the cluster's PKI, or
        None with TLS off; the ECS must have started (it issues them)."""
        if self.pki_dir is None:
            return None
        if holder not in self._credentials:
            self._credentials[holder] = load(TLSFiles.in_dir(str(self.pki_dir), holder))
        return self._credentials[holder]

    def endpoint_factory(self, timeout: float) -> Any:
        """A client library C{endpoint_factory} that dials every server through its proxy,
        with the C{client} certificate."""
        return self.fabric.endpoint_factory(CLIENT, timeout=timeout,
                                            credentials=self.credentials(CLIENT))

    async def start(self, timeout: float = 60.0) -> None:
        """Start the proxies, the ECS and every server; return once all are in the ring and
        the service is started."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.network.set_up(self.names)
        self.ecs_port = listen_port()
        for name in self.names:
            # Free on loopback is free in a fresh namespace too.
            self.ports[name] = (listen_port(), listen_port())
        for name in self.names:
            host, amp_port = self.network.server_host(name), self.ports[name][0]
            self._proxy(CLIENT, name, host, amp_port)
            for other in self.names:
                if other != name:
                    self._proxy(other, name, host, amp_port)
            self._proxy(name, ECS, HOST, self.ecs_port)
        for name in self.names:
            self.fabric.write_routes(name, self.routes_path(name), targets=self.names)
        if self.pki_dir is not None:
            self._issue_certificates(self.pki_dir)
        self._write_ecs_config()
        self.ecs = ECSProcess(self.workdir, self.config_path).start()
        for name in self.names:
            self.servers[name] = self._server_process(name)
        await self.form_ring(timeout)

    async def form_ring(self, timeout: float) -> None:
        """Start every server, wait until all registered, add them all and start serving."""
        await _gather([deferToThread(p.start) for p in self.servers.values()])
        await self.wait_status(lambda s: _registered(s) >= set(self.names),
                               "every server registered", timeout)
        await self.admin(admin.AddNodes, count=len(self.names), cache_strategy="LRU",
                         cache_size=1000, timeout=timeout)
        await self.admin(admin.Start, timeout=timeout)
        await self.wait_healthy(timeout)

    def _proxy(self, source: str, target: str, host: str, port: int) -> None:
        """The proxy of the link source -> target, listening where C{source} can reach it."""
        if self.network.proxy_host(source) == self.fabric.host:
            self.fabric.add(source, target, host, port)
            return
        proxy = FaultProxy(self.reactor, 0, host, port,
                           interface=self.network.proxy_host(source))
        proxy.start()
        self.fabric.proxies[(source, target)] = proxy

    def routes_path(self, name: str) -> Path:
        return self.workdir / f"{name}.routes.yaml"

    def dialled_hosts(self) -> dict[str, list[str]]:
        """Node name (the ECS, each server) -> every host it is dialled at: its own, and the
        address of every proxy in front of it."""
        hosts = {ECS: [HOST], **{name: [self.network.server_host(name)] for name in self.names}}
        for (_, target), proxy in sorted(self.fabric.proxies.items()):
            if target in hosts and proxy.interface not in hosts[target]:
                hosts[target].append(proxy.interface)
        return hosts

    def _issue_certificates(self, pki_dir: Path) -> None:
        # The ECS issues what is missing on its start, for its advertised host and each slot's
        # host (and this machine); a node dialled at any other address (a proxy in a
        # namespace's link) gets its certificate here first, naming them all.
        holders = [("ecs" if name == ECS else "server", name, hosts)
                   for name, hosts in self.dialled_hosts().items()
                   if set(hosts[1:]) - set(pki.LOCAL_HOSTS)]
        if holders:
            pki.ensure(str(pki_dir), holders)

    def _write_ecs_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.ecs_config(), sort_keys=False),
                                    encoding="utf-8")

    def ecs_config(self) -> dict[str, Any]:
        """The ECS's YAML options: the harness starts the servers, proxied (see the module
        docstring)."""
        return {
            "listen": f"tcp:{self.ecs_port}:interface={HOST}",
            "advertise": f"tcp:{HOST}:{self.ecs_port}",
            "state-file": str(self.workdir / "ecs" / "state.json"),
            "log-dir": str(self.workdir / "logs"),
            "heartbeat-interval": self.heartbeat,
            "failure-timeout": self.failure_timeout,
            "replication": self.replication,
            # The harness starts (and restarts) every server; they register and wait idle.
            "initial-nodes": 0,
            "launcher": "none",
            "register-timeout": 10.0,
            "tls": "on" if self.tls else "off",
            "copies-beside-moves": "on" if self.copies_beside_moves else "off",
            "pki-dir": str(self.workdir / "data" / "pki"),
            # No status page: parallel runs would contend for its fixed port.
            "web": "off",
            "nodes": [{"name": name, "host": self.network.server_host(name),
                       "console-port": self.ports[name][1],
                       "amp-port": self.ports[name][0], "data-dir": str(self.workdir / name),
                       "ecs": self.ecs_endpoint(name),
                       "peer-routes": str(self.routes_path(name))}
                      for name in self.names],
        }

    def ecs_endpoint(self, name: str) -> str:
        """What server C{name} is given as ``--ecs``: its proxy to the ECS."""
        return self.fabric.endpoint(name, ECS)

    def _server_process(self, name: str) -> KVServerProcess:
        amp_port, console_port = self.ports[name]
        return _ServerProcess(self.network.argv_prefix(name), self.workdir, name,
                              self.network.server_host(name), console_port=console_port,
                              amp_port=amp_port, tls=self.tls,
                              extra_args=["--ecs", self.ecs_endpoint(name),
                                          "--peer-routes", str(self.routes_path(name))])

    async def stop(self) -> None:
        """Stop everything this cluster started, whatever state it is in; never raises."""
        for name in list(self.paused):
            self.resume(name)
        for proc in self.servers.values():
            try:
                await deferToThread(proc.stop, 10.0)
            except Exception as e:
                log.warn("stopping {name}: {error}", name=proc.name, error=e)
        if self.ecs is not None:
            try:
                await deferToThread(self.ecs.stop, 10.0)
            except Exception as e:
                log.warn("stopping the ECS: {error}", error=e)
        await self.fabric.close()
        self.network.tear_down()

    def log_files(self) -> list[Path]:
        """The ECS's and every server's log file."""
        files = [self.workdir / "ecs.log"] + [self.workdir / f"{n}.log" for n in self.names]
        return [f for f in files if f.exists()]

    # -- processes -------------------------------------------------------------------------------

    def server_running(self, name: str) -> bool:
        return self.servers[name].running

    def kill(self, name: str) -> None:
        """SIGKILL a server (or the ECS, C{name} "ecs")."""
        if name == ECS:
            assert self.ecs is not None
            self.ecs.kill()
        else:
            self.servers[name].kill()
        self.paused.discard(name)

    def pause(self, name: str) -> None:
        """SIGSTOP a server or the ECS."""
        self._process(name).signal(signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        """SIGCONT a server or the ECS."""
        self._process(name).signal(signal.SIGCONT)
        self.paused.discard(name)

    def _process(self, name: str) -> Any:
        if name == ECS:
            assert self.ecs is not None
            return _Signals(self.ecs.proc)
        return self.servers[name]

    async def restart(self, name: str) -> None:
        """Start a stopped (killed, shut down) server again on its ports and data directory,
        or the ECS on its state file; a process still running is stopped cleanly first."""
        if name == ECS:
            assert self.ecs is not None
            if self.ecs.running:
                await deferToThread(self.ecs.kill)
            if self.ecs.proc is not None and self.ecs.proc.stderr:
                self.ecs.proc.stderr.close()
            self.ecs = ECSProcess(self.workdir, self.config_path).start()
            await self.wait_status(lambda s: True, "the restarted ECS answers", 20.0)
            return
        old = self.servers[name]
        if old.running:
            self.resume(name)
            await deferToThread(old.stop, 10.0)
        elif old.proc is not None and old.proc.stderr:
            old.proc.stderr.close()
        proc = self.servers[name] = self._server_process(name)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        await deferToThread(proc.start)

    # -- the ECS ---------------------------------------------------------------------------------

    async def admin(self, command: type[amp.Command], timeout: float = 30.0,
                    **arguments: Any) -> dict[str, Any]:
        """Send one admin command straight to the ECS (never through a proxy), with the
        C{admin} certificate."""
        return await self.admin_at(self.ecs_port, command, timeout, **arguments)

    async def admin_at(self, port: int, command: type[amp.Command], timeout: float,
                       **arguments: Any) -> dict[str, Any]:
        """One admin command to the ECS listening on C{port}, on a fresh connection."""
        endpoint = client_endpoint(self.reactor, self.credentials("admin"), HOST, port,
                                   timeout=5)
        proto = await connectProtocol(endpoint, roles.DialledAMP((roles.ECS,)))
        try:
            d = proto.callRemote(command, **arguments)
            d.addTimeout(timeout, self.reactor)
            return await d
        finally:
            proto.transport.loseConnection()

    async def status(self) -> dict[str, Any]:
        """The ECS's C{Status}."""
        answer = await self.admin(admin.Status, timeout=5.0)
        return json.loads(answer["status"])

    async def wait_status(self, predicate: Any, what: str, timeout: float) -> dict[str, Any]:
        """Poll C{Status} until C{predicate(status)} holds; raise L{ClusterError} after
        C{timeout} seconds."""
        deadline = self.reactor.seconds() + timeout
        last: object = "no answer"
        while self.reactor.seconds() < deadline:
            try:
                status = await self.status()
            except Exception as e:
                last = e
            else:
                last = status
                if predicate(status):
                    return status
            await deferLater(self.reactor, 0.1, lambda: None)
        raise ClusterError(f"not {what} within {timeout}s; last status: {last}")

    def healthy(self, status: dict[str, Any]) -> bool:
        """Every server in the ring and connected, none dead, serving, no operation running."""
        connected = {m["name"] for m in status["members"] if m["connected"]}
        return (sorted(status["ring"]) == sorted(self.names) and not status["dead"]
                and not status["degraded"] and status["serving"]
                and status["operation"] is None and set(self.names) <= connected)

    async def wait_healthy(self, timeout: float = 60.0) -> dict[str, Any]:
        """Bring the cluster back to its full ring and wait until it is L{healthy}.

        Whatever the faults left: the ECS is restarted if it is down, processes continued,
        servers that are not running started again; servers that registered but are not in the
        ring are added back (C{AddNodes}); the service is started if it is stopped. A server
        that stays connected as "failed" outside the ring after every repair is restarted, so
        that it registers afresh as idle. Raises L{ClusterError} after C{timeout} seconds.
        """
        deadline = self.reactor.seconds() + timeout
        for name in list(self.paused):
            self.resume(name)
        if self.ecs is not None and not self.ecs.running:
            await self.restart(ECS)
        for name in self.names:
            if not self.servers[name].running:
                await self.restart(name)
        last: object = "no answer"
        stuck: dict[str, float] = {}
        while self.reactor.seconds() < deadline:
            try:
                status = await self.status()
            except Exception as e:
                last = e
                await deferLater(self.reactor, 0.2, lambda: None)
                continue
            last = status
            if self.healthy(status):
                return status
            await self._nudge(status, stuck)
            await deferLater(self.reactor, 0.2, lambda: None)
        raise ClusterError(f"the cluster did not recover within {timeout}s; last status: {last}")

    async def _nudge(self, status: dict[str, Any], stuck: dict[str, float]) -> None:
        if status["operation"] is not None or status["dead"]:
            return  # a reconfiguration or a repair is under way: let it finish
        members = {m["name"]: m for m in status["members"]}
        now = self.reactor.seconds()
        for name in self.names:
            if not self.servers[name].running:
                await self.restart(name)
        idle = [n for n in self.names if n not in status["ring"]
                and members.get(n, {}).get("connected") and members[n]["status"] == "idle"]
        try:
            if idle:
                await self.admin(admin.AddNodes, count=len(idle), cache_strategy="LRU",
                                 cache_size=1000, timeout=60.0)
                return
            if not status["serving"] and sorted(status["ring"]) == sorted(self.names):
                await self.admin(admin.Start, timeout=30.0)
                return
        except Exception as e:
            log.info("recovery: {error}", error=e)
            return
        for name in self.names:
            member = members.get(name)
            outside = name not in status["ring"] and member is not None \
                and member["status"] not in ("idle",)
            if not outside:
                stuck.pop(name, None)
                continue
            first = stuck.setdefault(name, now)
            if now - first > 3.0:
                # Registered (or not) but neither in the ring nor idle after every repair:
                # a fresh registration makes it idle (see the report on ECS member states).
                log.warn("recovery: {name} is {state} outside the ring; restarting it",
                         name=name, state=member["status"])
                stuck.pop(name, None)
                await self.restart(name)

    async def ring(self) -> Ring:
        """The current ring, as a server hands it to clients (dead members marked)."""
        store = KVStore(self.reactor, self.amp_addresses, timeout=2.0, deadline=10.0,
                        tls=self.credentials(CLIENT))
        try:
            return await store.refresh_metadata()
        finally:
            await store.close()

    async def reads_by_role(self) -> dict[str, int]:
        """Gets answered so far by the live servers: C{"tail"} at tails, C{"local"} by heads and
        middles from their own store, C{"resolved"} by heads and middles after asking the tail,
        and of those two C{"waited"}: reads of a dirty key that first waited for its write's
        acknowledgement (counted since each server's last start, from its C{Stats}; the few
        waiting reads refused because their member left the chain count as C{"tail"})."""
        totals = {"tail": 0, "local": 0, "resolved": 0, "waited": 0}
        for address in self.amp_addresses:
            store = KVStore(self.reactor, [address], timeout=2.0, deadline=2.0,
                            tls=self.credentials(CLIENT))
            try:
                stats = await store.stats()
            except Exception as e:
                log.info("no stats from {address}: {error}", address=address, error=e)
                continue
            finally:
                await store.close()
            local, resolved = stats.get("gets_local", 0), stats.get("gets_resolved", 0)
            totals["local"] += local
            totals["resolved"] += resolved
            totals["waited"] += stats.get("gets_waited", 0)
            totals["tail"] += stats.get("gets", 0) - local - resolved
        return totals

    async def shut_down(self, timeout: float = 30.0) -> None:
        """The ECS's C{ShutDown}: every server closes its stores and exits, then the ECS."""
        assert self.ecs is not None
        await self.admin(admin.ShutDown, timeout=timeout)
        deadline = self.reactor.seconds() + timeout
        while self.ecs.running or any(p.running for p in self.servers.values()):
            if self.reactor.seconds() > deadline:
                alive = [n for n, p in self.servers.items() if p.running]
                raise ClusterError(f"still running {timeout}s after ShutDown: "
                                   f"{alive + ([ECS] if self.ecs.running else [])}")
            await deferLater(self.reactor, 0.1, lambda: None)

    def dumps(self, names: Sequence[str] | None = None
              ) -> dict[tuple[str, str], dict[bytes, bytes]]:
        """Every store of the given servers (all by default), read-only from its SQLite file;
        call it once they have exited."""
        dumps = {}
        for name in names or self.names:
            for store in STORE_NAMES:
                path = self.workdir / name / f"{store}.sqlite"
                if not path.exists():
                    continue
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                try:
                    dumps[(name, store)] = {bytes(k): bytes(v)
                                            for k, v in db.execute(
                                                "SELECT k, v FROM kv UNION ALL "
                                                "SELECT k, v FROM kv_spill")}
                finally:
                    db.close()
        return dumps


class _ServerProcess(KVServerProcess):
    """A server process whose command runs after C{prefix} (C{ip netns exec NS})."""

    def __init__(self, prefix: Sequence[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = list(prefix)

    def argv(self) -> list[str]:
        return self.prefix + super().argv()


class Loopback:
    """Every process on 127.0.0.1 in this network namespace."""

    def set_up(self, names: Sequence[str]) -> None:
        pass

    def tear_down(self) -> None:
        pass

    def server_host(self, name: str) -> str:
        return HOST

    def proxy_host(self, source: str) -> str:
        return HOST

    def argv_prefix(self, name: str) -> list[str]:
        return []


class Namespaces:
    """Each server in its own network namespace, linked to this one by a veth pair: server i
    is 10.N.i.2, this end of its link 10.N.i.1, where the proxies of its outgoing links
    listen. The ECS, the clients' proxies and the harness stay in this namespace.

    Needs root and C{ip} (iproute2). Servers reach each other only through the proxies (their
    peer routes), except the copies of a reconfiguration, which dial the target directly: IPv4
    forwarding is switched on while the namespaces exist and restored afterwards. Every
    namespace is named after C{run_id}; L{tear_down} deletes them all (the veth pairs go with
    them), and is safe to call twice.
    """

    def __init__(self, run_id: str) -> None:
        digest = hashlib.sha256(run_id.encode("utf-8")).digest()
        self.tag = digest[:3].hex()
        self.net = 200 + digest[3] % 50
        self.created: list[str] = []
        self.index: dict[str, int] = {}
        self._forwarding: str | None = None

    @staticmethod
    def available() -> str | None:
        """Why this mode cannot run here, or None if it can."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "network namespaces need the ip command (Debian package iproute2)"
        return None

    def namespace(self, name: str) -> str:
        return f"cs{self.tag}-{self.index[name]}"

    def server_host(self, name: str) -> str:
        return f"10.{self.net}.{self.index[name]}.2"

    def proxy_host(self, source: str) -> str:
        if source in self.index:
            return f"10.{self.net}.{self.index[source]}.1"
        return HOST

    def argv_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(name)]

    def set_up(self, names: Sequence[str]) -> None:
        why = self.available()
        if why is not None:
            raise ClusterError(why)
        self.index = {name: i for i, name in enumerate(names, 1)}
        forwarding = Path("/proc/sys/net/ipv4/ip_forward")
        try:
            for name, i in self.index.items():
                ns, outer, inner = self.namespace(name), f"v{self.tag}{i}h", f"v{self.tag}{i}n"
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("addr", "add", f"{self.proxy_host(name)}/30", "dev", outer)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{self.server_host(name)}/30", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "route", "add", "default", "via", self.proxy_host(name))
            self._forwarding = forwarding.read_text().strip()
            forwarding.write_text("1\n")
        except Exception:
            self.tear_down()
            raise

    def tear_down(self) -> None:
        while self.created:
            ns = self.created.pop()
            try:
                _ip("netns", "del", ns)
            except ClusterError as e:
                log.warn("could not delete namespace {ns}: {error}", ns=ns, error=e)
        for i in self.index.values():
            # A veth pair dies with its namespace end; one left by a half-done set-up not.
            subprocess.run(["ip", "link", "del", f"v{self.tag}{i}h"], capture_output=True)
        if self._forwarding is not None:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self._forwarding + "\n")
            self._forwarding = None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def listen_port(host: str = HOST, tries: int = 200) -> int:
    """A free port below the kernel's ephemeral range, for a process to listen on.

    Ports from the ephemeral range (such as L{free_port}'s) can be taken meanwhile by the
    proxies (which listen on port 0) or by any outgoing connection, and a server restarted on
    its port would then fail to listen; ports below the range are only ever taken on purpose.
    """
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(tries):
        port = rng.randrange(max(1024, low - 12000), low)
        # A port handed out before may not be listened on yet (a cluster picks all its ports
        # before it starts a server): binding it here would succeed and two servers share it.
        if port in _LISTEN_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _LISTEN_PORTS.append(port)
        return port
    return free_port(host)


#: the ports L{listen_port} handed out lately in this process
_LISTEN_PORTS: collections.deque[int] = collections.deque(maxlen=4096)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


class _Signals:
    """Signal sending for a bare Popen (the ECS), like L{KVServerProcess.signal}."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)


def _registered(status: dict[str, Any]) -> set[str]:
    return {m["name"] for m in status["members"] if m["connected"]}


async def _gather(ds: list[Deferred[Any]]) -> list[Any]:
    return await gatherResults(ds, consumeErrors=True)


__all__ = ["CLIENT", "ECS", "Cluster", "ClusterError", "Loopback", "Namespaces", "listen_port"]
