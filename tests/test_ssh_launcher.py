"""The ECS's ssh launcher end to end: an ECS in this network namespace launches three servers
through real ssh into three network namespaces, each running Debian's OpenSSH server (key-only,
listening only in its namespace); they register, a client puts and gets through the chains, and
stopping the ECS ends the servers through ssh. Needs root, iproute2 and openssh-server (CI
installs them); skipped otherwise, with the reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.processes import ECSProcess, free_ports, pid_alive
from harness.sshd import SshHosts, missing, namespace_pids
from torture.cluster import Namespaces

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(missing() is not None, reason=str(missing()))]

NAMES = ["server1", "server2", "server3"]


def kvclient() -> str:
    return os.path.join(os.path.dirname(sys.executable), "kvclient")


def write_config(workdir: Path, net: Namespaces, ssh_command: str) -> Path:
    # The ECS listens on this end of server1's link: every namespace routes to it.
    ecs_host = net.proxy_host(NAMES[0])
    (port,) = free_ports(1, ecs_host)
    config: dict[str, Any] = {
        "listen": f"tcp:{port}:interface={ecs_host}",
        "advertise": f"tcp:{ecs_host}:{port}",
        "state-file": "ecs/state.json", "log-dir": "logs", "pki-dir": "pki",
        "heartbeat-interval": 0.5, "failure-timeout": 3.0, "register-timeout": 20.0,
        "initial-nodes": 3, "replication": 3,
        "launcher": "ssh", "ssh-command": ssh_command,
        # Relative paths: the remote command runs in the ECS's working directory.
        "nodes": [{"name": name, "host": net.server_host(name), "console-port": 50001,
                   "amp-port": 51001, "data-dir": f"data/{name}"} for name in NAMES],
    }
    path = workdir / "ecs.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_servers_launched_over_ssh_into_namespaces_serve_and_stop(tmp_path: Path) -> None:
    net = Namespaces(f"ssh-{os.getpid()}-{tmp_path.name}")
    hosts = SshHosts(tmp_path / "ssh")
    ecs: ECSProcess | None = None
    try:
        net.set_up(NAMES)
        namespaces = {name: net.namespace(name) for name in NAMES}
        hosts.start({namespaces[name]: net.server_host(name) for name in NAMES})
        workdir = tmp_path / "ecs"
        workdir.mkdir()
        ecs = ECSProcess(workdir, write_config(workdir, net, hosts.ssh_command())).start()
        status = ecs.wait_ready(ring_size=3, timeout=40.0)
        assert {m["name"]: m["amp"] for m in status["members"]} == {
            name: f"{net.server_host(name)}:51001" for name in NAMES}

        # Each server runs in its namespace, started by that namespace's sshd, and the ECS
        # recorded the PID the remote command reported.
        launches = {launch["name"]: launch for launch in ecs.launches()}
        assert sorted(launches) == NAMES
        for name, launch in launches.items():
            pid = launch["server_pid"]
            assert pid is not None and pid_alive(pid), launch
            assert netns_of(pid) == os.stat(f"/run/netns/{namespaces[name]}").st_ino
            assert pid in namespace_pids(namespaces[name])
            assert b"kvserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert launch["pid"] != pid and pid_alive(launch["pid"])  # the ssh client, here

        # A client (the kvclient script, mutual TLS) puts and reads back through the chains.
        keys = [f"k{i}" for i in range(12)]
        script = "".join(f"put {k} value-of-{k}\n" for k in keys)
        script += "".join(f"get {k}\n" for k in keys)
        done = subprocess.run(
            [kvclient(), "--connect", status["members"][0]["amp"], "--pki-dir",
             str(workdir / "pki"), "--cert-name", "client", "--deadline", "20"],
            input=script, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == (
            [f"put_success {k}" for k in keys] + [f"get_success {k} value-of-{k}" for k in keys])
        # The slots' relative data directories meant the ECS's working directory remotely.
        for name in NAMES:
            assert (workdir / "data" / name / "coordinator.sqlite").exists()

        # Stopping the ECS stops its servers through ssh: each exits cleanly, and nothing but
        # sshd is left in the namespaces.
        ecs.proc.terminate()  # type: ignore[union-attr]
        # twistd ends itself with the signal it stopped on, once it has stopped cleanly
        assert ecs.wait_exit(30) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        server_pids = [launch["server_pid"] for launch in launches.values()]
        while any(pid_alive(pid) for pid in server_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(pid) for pid in server_pids)
        for name in NAMES:
            log = (workdir / "logs" / f"{name}.log").read_text()
            # (with the ECS's side of the stop: when each order went, and how each ssh ended)
            assert "Main loop terminated" in log, (
                log[-2000:] + "\n--- ECS log ---\n" + "".join(
                    line for line in (workdir / "ecs.log").read_text().splitlines(True)
                    if "stopping" in line or "ended" in line or "SIGTERM" in line))
        for name, launch in launches.items():
            assert not pid_alive(launch["pid"])
            left = set(namespace_pids(namespaces[name])) - {hosts.daemons[namespaces[name]].pid}
            assert not left, f"{name}'s namespace still runs {left}"
    finally:
        if ecs is not None:
            ecs.stop()
            for launch in ecs.launches():
                if pid_alive(launch["pid"]):
                    os.kill(launch["pid"], signal.SIGKILL)
        hosts.stop()
        net.tear_down()
