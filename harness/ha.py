"""Several ECS over etcd (C{state: etcd}), as real processes: for integration tests, the torture
harness's HA mode and the failover benchmark.

L{HACluster} starts an etcd cluster on loopback (L{bench.peers.EtcdSystem}: members on free
ports, data under the work directory), then C{ecs_count} ``twistd ecs`` processes sharing one
node pool and one PKI (each with its own port, name and launcher record), each launched server
given the whole ECS list. The first ECS starts alone, so that it alone creates the PKI (every
ECS holds the same ``ecs`` certificate, naming the loopback host they are all dialled at); the
others start once it answers, and stand by. Everything is stopped by PID.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from bench.peers import EtcdSystem
from harness.processes import ECSError, ECSProcess, ProcessFailed, free_ports, write_ecs_config

HOST = "127.0.0.1"


class HACluster:
    def __init__(self, workdir: str | Path, *, ecs_count: int = 3, etcd_members: int = 1,
                 lease_ttl: int = 2, etcd_tls: bool = True, **options: Any) -> None:
        self.workdir = Path(workdir).resolve()
        # etcd over https with client certificates of its own CA, as beyond loopback
        self.etcd = EtcdSystem(self.workdir, members=etcd_members, tls=etcd_tls)
        ports = free_ports(ecs_count, HOST)
        self.ecs_list = ",".join(f"tcp:{HOST}:{port}" for port in ports)
        shared = yaml.safe_load(write_ecs_config(self.workdir / "pool", **options).read_text())
        for slot in shared["nodes"]:
            slot["ecs"] = self.ecs_list
        endpoints = self.etcd.endpoints
        etcd_files: dict[str, str] = {}
        if etcd_tls:
            files = self.etcd.tls_files("ecs")
            etcd_files = {"etcd-tls-ca": files.ca, "etcd-tls-cert": files.cert,
                          "etcd-tls-key": files.key}
        self.ecs: list[ECSProcess] = []
        for i, port in enumerate(ports, 1):
            workdir_i = self.workdir / f"ecs{i}"
            workdir_i.mkdir(parents=True, exist_ok=True)
            config = dict(shared, **{
                "name": f"ecs{i}", "listen": f"tcp:{port}:interface={HOST}",
                "advertise": f"tcp:{HOST}:{port}",
                "state-file": str(workdir_i / "state.json"), "state": "etcd",
                # one status page each would need a port each; none is needed here
                "web": "off",
                "etcd-endpoints": endpoints, "etcd-prefix": "/chainstore-test",
                "lease-ttl": lease_ttl, **etcd_files})
            path = workdir_i / "ecs.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            self.ecs.append(ECSProcess(workdir_i, path))

    def start(self, timeout: float = 60.0) -> HACluster:
        try:
            self.etcd.start(timeout)
            first, *others = self.ecs
            first.start()
            self._wait_answer(first, timeout)
            for ecs in others:
                ecs.start()
            for ecs in others:
                self._wait_answer(ecs, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _wait_answer(ecs: ECSProcess, timeout: float) -> None:
        """Until C{ecs} answers an admin command (its status, or "not the leader")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not ecs.running:
                raise ProcessFailed(f"an ECS exited:\n{ecs.diagnostics()}")
            try:
                ecs.status(timeout=2.0)
                return
            except ECSError:
                return
            except OSError:
                time.sleep(0.1)
        raise ProcessFailed(f"the ECS at {ecs.address} did not answer:\n{ecs.diagnostics()}")

    def leader(self, timeout: float = 2.0) -> tuple[ECSProcess, dict[str, Any]] | None:
        """The running ECS that answers C{Status} as the leader, with its status (None if no
        ECS leads now)."""
        for ecs in self.ecs:
            if not ecs.running:
                continue
            try:
                return ecs, ecs.status(timeout=timeout)
            except (ECSError, OSError):
                continue
        return None

    def wait_leader(self, timeout: float = 30.0, ring_size: int | None = None,
                    besides: ECSProcess | None = None) -> tuple[ECSProcess, dict[str, Any]]:
        """Wait until an ECS (other than C{besides}) leads and, if given, C{ring_size} servers
        are in its ring, all connected to it."""
        deadline = time.monotonic() + timeout
        last: Any = "no leader"
        while time.monotonic() < deadline:
            found = self.leader()
            if found is not None and found[0] is not besides:
                ecs, status = found
                connected = {m["name"] for m in status["members"] if m["connected"]}
                last = status
                if ring_size is None or (len(status["ring"]) == ring_size
                                         and set(status["ring"]) <= connected
                                         and status.get("operation") is None):
                    return ecs, status
            time.sleep(0.05)
        logs = "\n".join(e.diagnostics() for e in self.ecs)
        raise ProcessFailed(f"no leader ready after {timeout}s (last: "
                            f"{json.dumps(last)[:400]}):\n{logs}")

    def stop(self) -> None:
        for ecs in self.ecs:
            try:
                ecs.stop()
            except Exception:
                pass
        # a server a killed ECS had launched is in that ECS's record: stopped above by PID
        self.etcd.stop()
