"""How the ECS brings servers from its node pool to life.

``local`` spawns ``twistd -n kvserver ...`` child processes on this machine; ``ssh`` runs a
configurable command template (by default through ssh on the slot's host); ``none`` launches
nothing (every server is started by an operator with ``--ecs`` and registers itself). A launched
server registers with the ECS like any other; the launcher only starts processes and, when the ECS
stops, ends the ones it started.

Every launch is recorded in ``launched.json`` beside the ECS's state file (the local process's
PID, the server's own PID, its host and ports, its log, whether it still runs), rewritten
atomically on every change, so tools find the processes without reading log text.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from chainstore.logs import get_logger
from ecs.config import ECSConfig, NodeSlot

log = get_logger("ecs.launcher")

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

#: the line the ssh launcher's remote command prints first: the server's PID on its host
SERVER_PID = b"chainstore-server-pid "


class LaunchError(Exception):
    pass


@dataclass
class Launch:
    """One process the launcher started, as ``launched.json`` lists it."""

    name: str
    #: the process the ECS spawned (twistd itself, or the ssh client)
    pid: int
    #: the server's own PID on C{host} (for ssh reported by the remote command; None until then)
    server_pid: int | None
    host: str
    console_port: int
    amp_port: int
    log: str
    running: bool = True


class LaunchRecord:
    """``launched.json``: every launch of this ECS and of the ECS runs before it (same state
    directory), oldest first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.launches: list[Launch] = []
        try:
            with open(path, encoding="utf-8") as f:
                self.launches = [Launch(**entry) for entry in json.load(f)["launched"]]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warn("ignoring unreadable {path}: {error}", path=path, error=e)
        # A process of an earlier ECS run is not known to be running: this ECS did not start it.
        for launch in self.launches:
            launch.running = False

    def add(self, launch: Launch) -> None:
        self.launches.append(launch)
        self.save()

    def save(self) -> None:
        # Written whole and renamed, so a reader never sees half a file.
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        temporary = self.path + ".tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump({"launched": [asdict(launch) for launch in self.launches]}, f,
                          indent=1)
            os.replace(temporary, self.path)
        except OSError as e:
            log.warn("could not write {path}: {error}", path=self.path, error=e)


class _Child(ProcessProtocol):
    def __init__(self, name: str, launch: Launch | None = None,
                 record: LaunchRecord | None = None) -> None:
        self.name = name
        self.launch = launch
        self.record = record
        self.ended: Deferred[None] = Deferred()
        self.running = True
        # set when the ECS itself asked it to end: its signal is then no sign of trouble
        self.stopping = False
        self._out = b""

    def outReceived(self, data: bytes) -> None:
        # Only the ssh launcher's remote command writes here (its server's PID); the first
        # lines are enough, so the buffer stays small.
        if self.launch is None or self.launch.server_pid is not None or len(self._out) > 4096:
            return
        self._out += data
        for line in self._out.splitlines():
            if line.startswith(SERVER_PID) and line[len(SERVER_PID):].strip().isdigit():
                self.launch.server_pid = int(line[len(SERVER_PID):])
                log.info("{name} runs as pid {pid} on {host}", name=self.name,
                         pid=self.launch.server_pid, host=self.launch.host)
                if self.record is not None:
                    self.record.save()

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
        if self.launch is not None and self.record is not None:
            self.launch.running = False
            self.record.save()
        self.ended.callback(None)


def server_args(config: ECSConfig, slot: NodeSlot, cache_strategy: str,
                cache_size: int) -> list[str]:
    """The twistd arguments, from C{--pidfile=} on, that run C{slot}'s server."""
    return [
        "--pidfile=", "-n", "--logfile", log_path(config, slot),
        "kvserver", "--name", slot.name,
        "--listen", f"tcp:{slot.amp_port}:interface={slot.host}",
        "--console", f"tcp:{slot.console_port}:interface={slot.host}",
        "--data-dir", slot.data_dir,
        "--cache-strategy", cache_strategy, "--cache-size", str(cache_size),
        "--ecs", slot.ecs or config.advertise, "--log-level", config.log_level,
        *(["--peer-routes", slot.peer_routes] if slot.peer_routes else []),
        *(["--metrics", slot.metrics] if slot.metrics else []),
        *tls_options(config, slot),
    ]


def log_path(config: ECSConfig, slot: NodeSlot) -> str:
    return os.path.join(config.log_dir, f"{slot.name}.log")


class ProcessLauncher:
    """Spawns one child process per launched server and ends them when the ECS stops."""

    def __init__(self, reactor: Any, config: ECSConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.children: dict[str, tuple[_Child, Any]] = {}
        self.record = LaunchRecord(
            os.path.join(os.path.dirname(config.state_file) or ".", "launched.json"))

    def argv(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> list[str]:
        raise NotImplementedError

    def launch(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> None:
        current = self.children.get(slot.name)
        if current is not None and current[0].running:
            raise LaunchError(f"{slot.name} is already running (pid {current[1].pid})")
        argv = self.argv(slot, cache_strategy, cache_size)
        os.makedirs(self.config.log_dir, exist_ok=True)
        child = _Child(slot.name)
        transport = self.reactor.spawnProcess(child, argv[0], argv, env=os.environ.copy())
        child.launch = Launch(slot.name, transport.pid, self.server_pid(transport), slot.host,
                              slot.console_port, slot.amp_port, log_path(self.config, slot))
        child.record = self.record
        self.children[slot.name] = (child, transport)
        self.record.add(child.launch)
        log.info("launched {name} (pid {pid}): {command}", name=slot.name, pid=transport.pid,
                 command=" ".join(shlex.quote(a) for a in argv))

    def server_pid(self, transport: Any) -> int | None:
        """The server's PID, if the spawned process is the server itself."""
        return transport.pid

    def stop(self, name: str, signum: int = signal.SIGTERM) -> Deferred[None]:
        entry = self.children.get(name)
        if entry is None or not entry[0].running:
            return succeed(None)
        child, transport = entry
        child.stopping = True
        log.info("stopping {name} ({how})", name=name, how=signal.Signals(signum).name)
        self.end(child, transport, signum)
        return child.ended

    def end(self, child: _Child, transport: Any, signum: int) -> None:
        """Ask C{child}'s server to end (C{signum}: how)."""
        signal_process(transport, signum)

    def stop_all(self, timeout: float = 10.0) -> Deferred[Any]:
        """End every child still running: SIGTERM (a clean shutdown), SIGKILL after C{timeout}."""
        waits = [self.stop(name) for name, (child, _) in self.children.items() if child.running]

        def kill_stragglers() -> None:
            for name, (child, transport) in self.children.items():
                if child.running:
                    log.warn("{name} ignored SIGTERM; killing it", name=name)
                    self.end(child, transport, signal.SIGKILL)

        timer = self.reactor.callLater(timeout, kill_stragglers)
        d = DeferredList(waits)
        d.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return d


def signal_process(transport: Any, signum: int) -> None:
    try:
        transport.signalProcess(signum)
    except Exception:
        pass  # it has just ended: processEnded follows


def tls_options(config: ECSConfig, slot: NodeSlot) -> list[str]:
    """The kvserver options that give a launched server its TLS files (or switch TLS off)."""
    files = config.slot_tls(slot)
    if files is None:
        return ["--tls", "off"]
    return ["--tls-ca", files.ca, "--tls-cert", files.cert, "--tls-key", files.key]


class LocalLauncher(ProcessLauncher):
    def argv(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> list[str]:
        return TWISTD + server_args(self.config, slot, cache_strategy, cache_size)


def local_twistd() -> str:
    """The twistd of this installation (beside the ECS's own Python, as in a virtualenv)."""
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    return beside if os.path.exists(beside) else "twistd"


# The remote side of an ssh launch, in POSIX sh. It starts the server in the background, prints
# its PID (the ECS records it) and waits for it, exiting with its status. The ECS gives orders
# on ssh's standard input, a line each: "stop" ends the server with SIGTERM (a clean shutdown),
# "kill" with SIGKILL; sshd sends no signal to a command without a terminal, so signalling ssh
# would leave the server running unseen. When that input ends without an order (the ECS died,
# the connection dropped) the server runs on, as a local child outlives its ECS, and registers
# again with the next one.
REMOTE_SCRIPT = """\
cd {workdir} || exit 126
mkdir -p {log_dir} || exit 126
exec 3<&0 </dev/null
{twistd} {args} 3<&- &
pid=$!
echo "chainstore-server-pid $pid"
(while read -r order <&3; do
  case "$order" in stop) kill -TERM "$pid";; kill) kill -KILL "$pid";; esac
done) >/dev/null 2>&1 &
watch=$!
exec 3<&-
wait "$pid"
status=$?
kill "$watch" 2>/dev/null
exit "$status"
"""

#: seconds an ssh client has to end after its server was told to die, before it is killed
SSH_GRACE = 5.0


class SshLauncher(ProcessLauncher):
    """Runs C{ssh-command}, a template split like a shell command line (not run by a shell),
    per launch; by default C{ssh -o BatchMode=yes {host} {command}}, where C{{command}} is
    the remote command (L{REMOTE_SCRIPT} run by C{sh -c}) that starts the server in the ECS's
    working directory with the twistd of the ECS's installation, so each host needs this
    installation at the same path and the slot's TLS files there. Stopping is an order on
    ssh's standard input: the remote command then ends its server and exits with it."""

    def fields(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> dict[str, str]:
        args = server_args(self.config, slot, cache_strategy, cache_size)
        script = REMOTE_SCRIPT.format(
            workdir=shlex.quote(os.getcwd()),
            log_dir=shlex.quote(os.path.dirname(log_path(self.config, slot)) or "."),
            twistd=shlex.quote(local_twistd()),
            args=" ".join(shlex.quote(a) for a in args))
        raw = {
            "name": slot.name, "host": slot.host, "console_port": slot.console_port,
            "amp_port": slot.amp_port, "data_dir": slot.data_dir,
            "cache_strategy": cache_strategy, "cache_size": cache_size,
            "ecs": slot.ecs or self.config.advertise, "log": log_path(self.config, slot),
            "twistd": local_twistd(), "workdir": os.getcwd(),
            # one word on the remote shell's command line, whatever that shell is
            "command": "sh -c " + shlex.quote(script),
        }
        fields = {key: shlex.quote(str(value)) for key, value in raw.items()}
        fields["tls_options"] = " ".join(shlex.quote(a) for a in tls_options(self.config, slot))
        fields["server_args"] = " ".join(shlex.quote(a) for a in args)
        return fields

    def argv(self, slot: NodeSlot, cache_strategy: str, cache_size: int) -> list[str]:
        fields = self.fields(slot, cache_strategy, cache_size)
        try:
            argv = shlex.split(self.config.ssh_command.format(**fields))
        except (KeyError, IndexError, ValueError) as e:
            raise LaunchError(f"ssh-command template: {e!r}; fields are {sorted(fields)}") from None
        if not argv:
            raise LaunchError("ssh-command is empty")
        return argv

    def server_pid(self, transport: Any) -> int | None:
        return None  # the remote command reports it

    def end(self, child: _Child, transport: Any, signum: int) -> None:
        # An order to the remote command (REMOTE_SCRIPT); ssh exits once the server has.
        transport.write(b"stop\n" if signum == signal.SIGTERM else b"kill\n")
        if signum != signal.SIGTERM:
            # ssh itself too, in case its connection hangs.
            self.reactor.callLater(SSH_GRACE, lambda: child.running and signal_process(
                transport, signal.SIGKILL))


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
