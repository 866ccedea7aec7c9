"""``make run-ha``: a three-member etcd on loopback, three ECS (one leads) and three servers, in
the foreground until Ctrl-C, which stops everything.

etcd members ``etcd1``-``etcd3`` listen for clients on 127.0.0.1:23791-23793 (peers on
23801-23803) with their data in ``data/etcd1``-``data/etcd3``, so a later run resumes the same
cluster and the same ECS state. The ECS processes (``etc/ecs-ha.yaml``) listen on 127.0.0.1:49999,
49998 and 49997 (status pages on 49990, 49991 and 49992: a standby's names the leader) and log
to ``data/ha/logs/ecsN.log``; the first one starts alone, so that it
alone creates the PKI when ``data/pki`` is missing. The leader launches the servers of the pool
(data in ``data/ha/``). On the way out every ECS is stopped, then every server any of them
launched (by the PIDs in their launch records), then etcd.

etcd comes from Debian's ``etcd-server``: when it is missing it is installed as the benchmark
does (as root, with apt-get), or the command says what to install.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.processes import TWISTD, pid_alive

HOST = "127.0.0.1"
ETCD = [("etcd1", 23791, 23801), ("etcd2", 23792, 23802), ("etcd3", 23793, 23803)]
#: name, AMP port (servers, ecsclient), status page port (ecs1's is make run's)
ECS = [("ecs1", 49999, 49990), ("ecs2", 49998, 49991), ("ecs3", 49997, 49992)]
CONFIG = "etc/ecs-ha.yaml"
DATA = Path("data")


def etcd_argv(name: str, client: int, peer: int) -> list[str]:
    cluster = ",".join(f"{n}=http://{HOST}:{p}" for n, _, p in ETCD)
    return ["etcd", "--name", name, "--data-dir", str(DATA / name),
            "--listen-client-urls", f"http://{HOST}:{client}",
            "--advertise-client-urls", f"http://{HOST}:{client}",
            "--listen-peer-urls", f"http://{HOST}:{peer}",
            "--initial-advertise-peer-urls", f"http://{HOST}:{peer}",
            "--initial-cluster", cluster, "--initial-cluster-token", "chainstore-run-ha",
            "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "warn"]


def ecs_argv(name: str, port: int, web: int) -> list[str]:
    return [*TWISTD, "--pidfile=", "-n", "--logfile", str(DATA / "ha" / "logs" / f"{name}.log"),
            "ecs", "--config", CONFIG, "--name", name,
            "--listen", f"tcp:{port}:interface={HOST}", "--advertise", f"tcp:{HOST}:{port}",
            "--web", f"tcp:{web}:interface={HOST}",
            "--state-file", str(DATA / "ha" / name / "state.json")]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as answer:
            return bool(json.loads(answer.read()).get("health") == "true")
    except (urllib.error.URLError, ValueError, OSError):
        return False


def listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def wait(what: str, ready: object, procs: list[subprocess.Popen[bytes]],
         timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"run-ha: {' '.join(p.args[:3])} exited with {p.returncode}; "
                                 f"see data/ha/logs/")
        if time.monotonic() > deadline:
            raise SystemExit(f"run-ha: {what} not ready after {timeout:.0f}s; see data/ha/logs/")
        time.sleep(0.1)


def launched_servers() -> list[int]:
    pids = []
    for name, _, _ in ECS:
        try:
            record = json.loads((DATA / "ha" / name / "launched.json").read_text())
        except (OSError, ValueError):
            continue
        pids += [launch["server_pid"] for launch in record.get("launched", [])
                 if launch.get("server_pid")]
    return pids


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def main() -> int:
    from bench.peers import ensure_installed

    missing = ensure_installed(["etcd"], log=lambda text: print(f"run-ha: {text}"))
    if missing:
        print(f"run-ha: {missing['etcd']}; install Debian's etcd-server "
              "(apt-get install etcd-server etcd-client), or run make run-ha as root once",
              file=sys.stderr)
        return 2
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C (even when started in the background, where SIGINT is ignored) and SIGTERM alike
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    (DATA / "ha" / "logs").mkdir(parents=True, exist_ok=True)
    etcds: list[subprocess.Popen[bytes]] = []
    ecss: list[subprocess.Popen[bytes]] = []
    try:
        for name, client, peer in ETCD:
            log = open(DATA / "ha" / "logs" / f"{name}.log", "ab")
            etcds.append(subprocess.Popen(etcd_argv(name, client, peer), stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        wait("etcd", lambda: all(healthy(c) for _, c, _ in ETCD), etcds)
        print(f"run-ha: etcd members on {', '.join(f'{HOST}:{c}' for _, c, _ in ETCD)}")
        for i, (name, port, web) in enumerate(ECS):
            ecss.append(subprocess.Popen(ecs_argv(name, port, web), stdin=subprocess.DEVNULL))
            if i == 0:
                # the first alone: it makes the PKI if missing, which the others then use
                wait(f"{name} on {HOST}:{port}", lambda: listening(port), ecss)
        for name, port, _ in ECS:
            wait(f"{name} on {HOST}:{port}", lambda port=port: listening(port), ecss)
        print(f"run-ha: ECS on {', '.join(f'{HOST}:{p}' for _, p, _ in ECS)} (one leads; "
              "ecsclient status shows which), status pages on "
              f"{', '.join(f'http://{HOST}:{w}/' for _, _, w in ECS)}; logs in data/ha/logs/; "
              "Ctrl-C stops everything")
        while all(p.poll() is None for p in etcds + ecss):
            time.sleep(0.5)
        print("run-ha: a process exited; stopping everything", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(ecss)
        for pid in launched_servers():
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        while any(pid_alive(p) for p in launched_servers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in launched_servers():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        stop(etcds)


if __name__ == "__main__":
    sys.exit(main())
