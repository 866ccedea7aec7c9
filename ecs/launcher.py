"""How the ECS brings servers from its node pool to life.

``local`` spawns ``twistd -n kvserver ...`` child processes on this machine; ``ssh`` runs a
configurable command template (by default through ssh on the slot's host); ``none`` launches
nothing (every server is started by an operator with ``--ecs`` and registers itself). A launched
server registers with the ECS like any other; the launcher only starts processes and, when the ECS
stops, ends the ones it started.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from chainstore.logs import get_logger
from ecs.config import ECSConfig, NodeSlot

log = get_logger("ecs.launcher")

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class LaunchError(Exception):
    pass


class _Child(ProcessProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.ended: Deferred[None] = Deferred()
        self.running = True
        # set when the ECS itself asked it to end: its signal is then no sign of trouble
        self.stopping = False

    def errReceived(self, data: bytes) -> None:
        for line in data.decode(errors="replace").splitlines():
            log.warn("{name} stderr: {line}", name=self.name, line=line)

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        if reason.check(ProcessDone) or self.stopping:
            log.info("server process {name} ended ({why})", name=self.name,
                     why="exit 0" if reason.check(ProcessDone) else reason.getErrorMessage())
        else:
            log.warn("server process {name} ended: {why}", name=self.name,
                     why=reason.getErrorMessage())
        self.ended.callback(None)


class ProcessLauncher:
    """Spawns one child process per launched server and ends them when the ECS stops."""

    def __init__(self, reactor: Any, config: ECSConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.children: dict[str, tuple[_Child, Any]] = {}

    def argv(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> list[str]:
        raise NotImplementedError

    def launch(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> None:
        current = self.children.get(slot.name)
        if current is not None and current[0].running:
            raise LaunchError(f"{slot.name} is already running (pid {current[1].pid})")
        argv = self.argv(slot, cache_strategy, cache_size)
        child = _Child(slot.name)
        os.makedirs(self.config.log_dir, exist_ok=True)
        transport = self.reactor.spawnProcess(child, argv[0], argv, env=os.environ.copy())
        self.children[slot.name] = (child, transport)
        log.info("launched {name} (pid {pid}): {command}", name=slot.name, pid=transport.pid,
                 command=" ".join(shlex.quote(a) for a in argv))

    def stop(self, name: str, signum: int = signal.SIGTERM) -> Deferred[None]:
        entry = self.children.get(name)
        if entry is None or not entry[0].running:
            return succeed(None)
        child, transport = entry
        child.stopping = True
        try:
            transport.signalProcess(signum)
        except Exception:
            pass
        return child.ended

    def stop_all(self, timeout: float = 10.0) -> Deferred[Any]:
        """End every child still running: SIGTERM (a clean shutdown), SIGKILL after C{timeout}."""
        waits = [self.stop(name) for name, (child, _) in self.children.items() if child.running]

        def kill_stragglers() -> None:
            for name, (child, transport) in self.children.items():
                if child.running:
                    log.warn("{name} ignored SIGTERM; killing it", name=name)
                    transport.signalProcess("KILL")

        timer = self.reactor.callLater(timeout, kill_stragglers)
        d = DeferredList(waits)
        d.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return d


def tls_options(config: ECSConfig, slot: NodeSlot) -> list[str]:
    """The kvserver options that give a launched server its TLS files (or switch TLS off)."""
    files = config.slot_tls(slot)
    if files is None:
        return ["--tls", "off"]
    return ["--tls-ca", files.ca, "--tls-cert", files.cert, "--tls-key", files.key]


class LocalLauncher(ProcessLauncher):
    def argv(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> list[str]:
        log_file = os.path.join(self.config.log_dir, f"{slot.name}.log")
        return TWISTD + [
            "--pidfile=", "-n", "--logfile", log_file,
            "kvserver", "--name", slot.name,
            "--listen", f"tcp:{slot.amp_port}:interface={slot.host}",
            "--console", f"tcp:{slot.console_port}:interface={slot.host}",
            "--data-dir", slot.data_dir,
            "--cache-strategy", cache_strategy, "--cache-size", str(cache_size),
            "--ecs", slot.ecs or self.config.advertise, "--log-level", self.config.log_level,
            *(["--peer-routes", slot.peer_routes] if slot.peer_routes else []),
            *tls_options(self.config, slot),
        ]


class SshLauncher(ProcessLauncher):
    def argv(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> list[str]:
        fields = {
            "name": slot.name, "host": slot.host, "console_port": slot.console_port,
            "amp_port": slot.amp_port, "data_dir": slot.data_dir,
            "cache_strategy": cache_strategy, "cache_size": cache_size,
            "ecs": self.config.advertise,
            "log": os.path.join(self.config.log_dir, f"{slot.name}.log"),
            "tls_options": " ".join(shlex.quote(a) for a in tls_options(self.config, slot)),
        }
        try:
            command = self.config.ssh_command.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise LaunchError(f"ssh-command template: {e!r}; fields are {sorted(fields)}") from None
        return ["/bin/sh", "-c", command]


class NoLauncher:
    children: dict[str, Any] = {}

    def launch(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> None:
        raise LaunchError(
            "this ECS launches no servers (launcher: none): start one with "
            "'twistd kvserver --ecs ...' and it will register")

    def stop(self, name: str) -> Deferred[None]:
        return succeed(None)

    def stop_all(self, timeout: float = 10.0) -> Deferred[None]:
        return succeed(None)


def make_launcher(reactor: Any, config: ECSConfig) -> Any:
    if config.launcher == "local":
        return LocalLauncher(reactor, config)
    if config.launcher == "ssh":
        return SshLauncher(reactor, config)
    return NoLauncher()
