"""The torture cluster with several ECS over etcd (``python -m torture --ha``).

Three ECS (``ecs1``-``ecs3``, C{state: etcd}, one leads) over a three-member etcd
(``etcd1``-``etcd3``, L{bench.peers.EtcdSystem}), and the servers of L{torture.cluster.Cluster}.
Every link is proxied as there, plus: each server reaches each ECS through a proxy of its own
(its ``--ecs`` lists the three), and each ECS reaches each etcd member through one (its
``etcd-endpoints``), so the nemesis can cut the leader from etcd (L{Nemesis.cut_etcd}) or a
server from the leader alone. The nemesis names the leader C{leader} (or C{ecs}), a standby
C{standby} and an etcd member C{etcd}; it can SIGKILL, SIGSTOP and restart each of them.

Admin commands go to the leader: to the last ECS that answered as leader, else to each running
ECS in turn (a standby answers "not the leader"). The first ECS starts alone, so that it alone
creates the PKI; they all hold the same C{ecs} certificate, naming 127.0.0.1, where every proxy
listens. Loopback only (no C{--netns}).
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import amp

from bench.peers import EtcdSystem
from chainstore.control import NotLeader
from chainstore.logs import get_logger
from ecs import protocol as admin
from harness.processes import ECSProcess
from torture.cluster import HOST, Cluster, ClusterError, Loopback, _Signals, listen_port

log = get_logger("torture.ha")

#: The leader's lease: the default of etc/ecs-ha.yaml and of the ECS.
LEASE_TTL = 2
#: Seconds an admin command waits for some ECS to lead: a takeover takes a lease and a tick.
FAILOVER_BOUND = 15.0


class HACluster(Cluster):
    ha = True

    def __init__(self, reactor: Any, workdir: str | Path, *, ecs_count: int = 3,
                 etcd_members: int = 3, **options: Any) -> None:
        super().__init__(reactor, workdir, **options)
        if not isinstance(self.network, Loopback):
            raise ClusterError("--ha runs on loopback only (not with --netns)")
        self.ecs_names = [f"ecs{i}" for i in range(1, ecs_count + 1)]
        self.etcd_names = [f"etcd{i}" for i in range(1, etcd_members + 1)]
        # with TLS on, etcd too: https with client certificates of its own CA
        self.etcd = EtcdSystem(self.workdir, members=etcd_members, tls=self.tls)
        self.ecs_procs: dict[str, ECSProcess] = {}
        self.ecs_ports: dict[str, int] = {}
        #: the ECS that last answered an admin command as the leader
        self.leader_hint: str | None = None

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await deferToThread(self.etcd.start, timeout)
        for name in self.ecs_names:
            self.ecs_ports[name] = listen_port()
        for name in self.names:
            self.ports[name] = (listen_port(), listen_port())
        for name in self.names:
            amp_port = self.ports[name][0]
            self.fabric.add("client", name, HOST, amp_port)
            for other in self.names:
                if other != name:
                    self.fabric.add(other, name, HOST, amp_port)
            for ecs in self.ecs_names:
                self.fabric.add(name, ecs, HOST, self.ecs_ports[ecs])
        for ecs in self.ecs_names:
            for member, port in zip(self.etcd_names, self.etcd.client_ports):
                self.fabric.add(ecs, member, HOST, port)
        for name in self.names:
            self.fabric.write_routes(name, self.routes_path(name), targets=self.names)
        for ecs in self.ecs_names:
            self._write_config(ecs)
        first, *others = self.ecs_names
        await self._start_ecs(first, timeout)
        for ecs in others:
            await self._start_ecs(ecs, timeout)
        for name in self.names:
            self.servers[name] = self._server_process(name)
        await self.form_ring(timeout)

    def _config_path(self, ecs: str) -> Path:
        return self.workdir / ecs / "ecs.yaml"

    def _write_config(self, ecs: str) -> None:
        port = self.ecs_ports[ecs]
        config = dict(self.ecs_config(), **{
            "name": ecs, "listen": f"tcp:{port}:interface={HOST}",
            "advertise": f"tcp:{HOST}:{port}",
            "state-file": str(self.workdir / ecs / "state.json"),
            "state": "etcd", "etcd-prefix": "/torture", "lease-ttl": LEASE_TTL,
            "etcd-endpoints": [f"{self.etcd.scheme}://{HOST}:{self.fabric.proxy(ecs, m).port}"
                               for m in self.etcd_names]})
        if self.tls:
            files = self.etcd.tls_files("ecs")
            config.update({"etcd-tls-ca": files.ca, "etcd-tls-cert": files.cert,
                           "etcd-tls-key": files.key})
        path = self._config_path(ecs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def ecs_endpoint(self, name: str) -> str:
        """Every ECS, each through the server's own proxy to it."""
        return ",".join(self.fabric.endpoint(name, ecs) for ecs in self.ecs_names)

    async def _start_ecs(self, ecs: str, timeout: float = 30.0) -> None:
        old = self.ecs_procs.get(ecs)
        if old is not None and old.proc is not None and old.proc.stderr:
            old.proc.stderr.close()
        proc = self.ecs_procs[ecs] = ECSProcess(self.workdir / ecs, self._config_path(ecs))
        proc.start()
        deadline = self.reactor.seconds() + timeout
        while self.reactor.seconds() < deadline:
            if not proc.running:
                raise ClusterError(f"{ecs} exited:\n{proc.diagnostics()}")
            try:
                await self._admin_at(ecs, admin.Status, 2.0)
                return
            except NotLeader:
                return
            except Exception:
                await deferLater(self.reactor, 0.1, lambda: None)
        raise ClusterError(f"{ecs} did not answer within {timeout}s")

    async def stop(self) -> None:
        await super().stop()  # the servers (self.ecs is None here) and the proxies
        for ecs, proc in self.ecs_procs.items():
            try:
                await deferToThread(proc.stop, 10.0)
            except Exception as e:
                log.warn("stopping {ecs}: {error}", ecs=ecs, error=e)
        await deferToThread(self.etcd.stop)

    def log_files(self) -> list[Path]:
        files = [self.workdir / ecs / "ecs.log" for ecs in self.ecs_names]
        files += [self.workdir / f"{n}.log" for n in self.names]
        files += [p.log_path for p in self.etcd.processes]
        return [f for f in files if f.exists()]

    # -- processes -------------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        if name in self.ecs_procs:
            self.ecs_procs[name].kill()
            self.paused.discard(name)
        elif name in self.etcd_names:
            self._process(name).signal(signal.SIGKILL)
            proc = self._etcd(name).proc
            if proc is not None:
                proc.wait(10)
            self.paused.discard(name)
        else:
            super().kill(name)

    def _etcd(self, name: str) -> Any:
        return self.etcd.processes[self.etcd_names.index(name)]

    def _process(self, name: str) -> Any:
        if name in self.ecs_procs:
            return _Signals(self.ecs_procs[name].proc)
        if name in self.etcd_names:
            return _Signals(self._etcd(name).proc)
        return super()._process(name)

    async def restart(self, name: str) -> None:
        if name in self.ecs_names:
            if self.ecs_procs[name].running:
                await deferToThread(self.ecs_procs[name].kill)
            await self._start_ecs(name)
            return
        if name in self.etcd_names:
            member = self._etcd(name)
            if member.proc is not None and member.proc.poll() is None:
                member.proc.kill()
                member.proc.wait(10)
            # same data directory and ports: it rejoins its cluster
            await deferToThread(member.start)
            return
        await super().restart(name)

    async def resolve_ha(self, role: str, rng: random.Random) -> str:
        """The ECS or etcd member a role of L{torture.nemesis.HA_ROLES} (or C{ecs}) names."""
        if role == "etcd":
            return rng.choice(self.etcd_names)
        leader = (await self.status()).get("leader", {}).get("name")
        if leader not in self.ecs_names:
            raise ClusterError(f"no ECS leads (status names {leader!r})")
        if role in ("leader", "ecs"):
            return str(leader)
        standbys = [e for e in self.ecs_names if e != leader and self.ecs_procs[e].running
                    and e not in self.paused]
        if not standbys:
            raise ClusterError("no standby is running")
        return rng.choice(standbys)

    # -- the leader ------------------------------------------------------------------------------

    async def _admin_at(self, ecs: str, command: type[amp.Command], timeout: float,
                        **arguments: Any) -> dict[str, Any]:
        return await self.admin_at(self.ecs_ports[ecs], command, timeout, **arguments)

    async def admin(self, command: type[amp.Command], timeout: float = 30.0,
                    **arguments: Any) -> dict[str, Any]:
        """Send one admin command to the leading ECS (never through a proxy); while none
        leads (a takeover under way), ask again every 0.2 s for up to L{FAILOVER_BOUND} s."""
        deadline = self.reactor.seconds() + FAILOVER_BOUND
        while True:
            order = sorted(self.ecs_names, key=lambda e: e != self.leader_hint)
            errors = []
            for ecs in order:
                if not self.ecs_procs[ecs].running or ecs in self.paused:
                    continue
                try:
                    answer = await self._admin_at(ecs, command, timeout, **arguments)
                except NotLeader as e:
                    errors.append(f"{ecs}: {e}")
                    continue
                except (ConnectionError, OSError) as e:
                    errors.append(f"{ecs}: {e}")
                    continue
                self.leader_hint = ecs
                return answer
            if self.reactor.seconds() > deadline:
                raise ClusterError("no ECS answered as the leader: " + "; ".join(errors))
            await deferLater(self.reactor, 0.2, lambda: None)

    async def shut_down(self, timeout: float = 30.0) -> None:
        """The leader's C{ShutDown}: every server exits, then that ECS; the standbys are then
        stopped (one would lead an empty cluster)."""
        await self.admin(admin.ShutDown, timeout=timeout)
        deadline = self.reactor.seconds() + timeout
        while any(p.running for p in self.servers.values()):
            if self.reactor.seconds() > deadline:
                alive = [n for n, p in self.servers.items() if p.running]
                raise ClusterError(f"still running {timeout}s after ShutDown: {alive}")
            await deferLater(self.reactor, 0.1, lambda: None)
        for proc in self.ecs_procs.values():
            await deferToThread(proc.stop, 10.0)

    async def wait_healthy(self, timeout: float = 60.0) -> dict[str, Any]:
        """As L{Cluster.wait_healthy}, every ECS and etcd member running first."""
        for name in list(self.paused):
            self.resume(name)
        for name in self.etcd_names:
            proc = self._etcd(name).proc
            if proc is None or proc.poll() is not None:
                await self.restart(name)
        for name in self.ecs_names:
            if not self.ecs_procs[name].running:
                await self.restart(name)
        return await super().wait_healthy(timeout)


__all__ = ["HACluster", "LEASE_TTL"]
