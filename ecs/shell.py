"""``ecsclient``: the admin shell of a chainstore cluster, speaking AMP to its ECS.

Interactive (prompt ``ECSClient> `` on a terminal), fed from a pipe, or one command per run::

    $ ecsclient --ecs 127.0.0.1:49999 addNode LRU 100
    added server4
    $ printf 'status\\nremoveNode server1\\n' | ecsclient
    $ ecsclient status --json | jq .ring

A one-shot command exits 0 when it succeeded and 1 with ``error: <message>`` on stderr when the
ECS refused it or could not be reached (2 for a malformed command line). Fed from a pipe, the
shell runs every line and exits 1 if any command failed. ``addNode(s)`` and ``removeNode`` answer
only when the data has moved; meanwhile the shell polls ``Status`` on the same connection and
shows the keys and bytes moved so far.

The reactor runs in a daemon thread (L{client.blocking.ensure_reactor_running}); the main thread
reads commands and waits for each answer with C{blockingCallFromThread}. The Deferred-based
L{AdminLink} and L{call_with_progress} hold all the AMP logic and are tested with iosim.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    PredicateResult,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols import amp
from twisted.python.failure import Failure

from chainstore import tls
from chainstore.control import NotLeader
from chainstore.errors import PermissionDenied, ServerError
from chainstore.roles import ECS, RoleGuard
from ecs import protocol
from ecs.protocol import AdminError
from ecs.shell_commands import HELP, Command, UsageError, parse_address, parse_command
from ecs.shell_format import ProgressPrinter, format_status

PROMPT = "ECSClient> "
# make run's ECS, and make run-ha's three (one leads; the others name it)
DEFAULT_ECS = "127.0.0.1:49999,127.0.0.1:49998,127.0.0.1:49997"
DEFAULT_TIMEOUT = 30.0
#: seconds between two C{Status} polls while a long command runs
POLL_INTERVAL = 0.5


class ShellError(Exception):
    """A command failed: the ECS refused it, or could not be reached; the message says which."""


# -- AMP -------------------------------------------------------------------------------------------


def call_with_progress(proto: amp.AMP, clock: Any, command: type[amp.Command],
                       arguments: dict[str, Any], on_progress: Callable[[Any], None],
                       interval: float = POLL_INTERVAL) -> Deferred[dict[str, Any]]:
    """Send C{command} and, until it is answered, poll C{Status} every C{interval} seconds on
    the same connection, passing its C{operation} (a dict, or None) to C{on_progress}.

    The result is C{command}'s answer; cancelling it stops the polling (the ECS goes on).
    """
    def poll() -> Deferred[None] | None:
        try:
            d = proto.callRemote(protocol.Status)
        except Exception:
            return None
        d.addCallback(lambda answer: on_progress(json.loads(answer["status"]).get("operation")))
        # A failed poll only loses one progress line; the command's own answer still counts.
        d.addErrback(lambda failure: None)
        return d

    loop = LoopingCall(poll)
    loop.clock = clock
    answer = proto.callRemote(command, **arguments)

    def done(result: Any) -> Any:
        if loop.running:
            loop.stop()
        return result

    answer.addBoth(done)
    # poll() never raises; were the loop to stop anyway, only progress lines would be lost.
    loop.start(interval, now=False).addErrback(lambda failure: None)
    return answer


class _AdminProtocol(RoleGuard):
    # Over TLS the host we dialled must answer with the ECS's certificate.
    peer_roles = frozenset({ECS})

    def __init__(self, lost: Callable[[_AdminProtocol], None]) -> None:
        super().__init__()
        self._lost = lost

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self._lost(self)


# Commands that answer only when the data has moved: no timeout, progress instead.
_LONG = {"addNodes", "removeNode"}
_AMP_COMMANDS: dict[str, type[amp.Command]] = {
    "start": protocol.Start, "stop": protocol.Stop, "shutDown": protocol.ShutDown,
    "addNodes": protocol.AddNodes, "removeNode": protocol.RemoveNode, "status": protocol.Status,
}


class AdminLink:
    """The shell's AMP connection to the ECS: made on first use, made again after it was lost.

    With several ECS (C{others}: one leads, the others are standbys), it dials them in turn
    until one answers, and a standby's L{NotLeader} answer ("the leader is HOST:PORT") makes it
    hang up and send the command to that leader.

    C{connect} makes the protocol (a TCP connection to C{host}:C{port} by default; tests pass
    an iosim one).
    """

    def __init__(self, reactor: Any, host: str, port: int, timeout: float = DEFAULT_TIMEOUT,
                 connect: Callable[[amp.AMP], Deferred[amp.AMP]] | None = None,
                 credentials: tls.Credentials | None = None,
                 others: Sequence[tuple[str, int]] = ()) -> None:
        self.reactor = reactor
        self.addresses = [(host, port), *others]
        self._current = 0
        self.timeout = timeout
        self.credentials = credentials
        self._connect = connect or self._connect_tcp
        self._proto: amp.AMP | None = None

    @property
    def host(self) -> str:
        return self.addresses[self._current][0]

    @property
    def port(self) -> int:
        return self.addresses[self._current][1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def follow(self, address: str) -> None:
        """Talk to the ECS at C{address} (HOST:PORT) from now on."""
        self.close()
        where = parse_address(address)
        if where not in self.addresses:
            self.addresses.append(where)
        self._current = self.addresses.index(where)

    def _connect_tcp(self, proto: amp.AMP) -> Deferred[amp.AMP]:
        endpoint = tls.client_endpoint(self.reactor, self.credentials, self.host, self.port,
                                       self.timeout)
        return connectProtocol(endpoint, proto)

    def _lost(self, proto: amp.AMP) -> None:
        if self._proto is proto:
            self._proto = None

    async def _connected(self) -> amp.AMP:
        failures = []
        while self._proto is None:
            try:
                if self.credentials is not None:
                    self.credentials.check()
                d = self._connect(_AdminProtocol(self._lost))
                d.addTimeout(self.timeout, self.reactor)
                self._proto = await d
            except Exception as e:
                reason = "no answer in time" if isinstance(e, TimeoutError) else _reason(e)
                failures.append(f"{self.address}: {reason}")
                if len(failures) == len(self.addresses):
                    if len(failures) == 1:
                        raise ShellError(f"cannot reach the ECS at {failures[0]}") from None
                    raise ShellError(f"cannot reach any ECS ({'; '.join(failures)})") from None
                self._current = (self._current + 1) % len(self.addresses)
        return self._proto

    async def run(self, command: Command,
                  on_progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
        """Send C{command}'s AMP command and return the answer; raise L{ShellError} if it fails.

        Long commands wait as long as the ECS works on them (polling C{Status} for
        C{on_progress}); the others wait at most C{timeout} seconds. A standby's answer sends
        the command on to the leader it names (at most three hops).
        """
        # A standby names the leader; a second hop only when leadership moved meanwhile.
        for _ in range(3):
            try:
                return await self._run(command, on_progress)
            except NotLeader as e:
                leader = re.search(r"the leader is (\S+)$", str(e))
                if leader is None:
                    raise ShellError(f"the ECS at {self.address} is {e}") from None
                self.follow(leader.group(1))
        raise ShellError(f"no ECS of {', '.join(f'{h}:{p}' for h, p in self.addresses)} "
                         "leads; try again in a few seconds")

    async def _run(self, command: Command,
                   on_progress: Callable[[Any], None] | None) -> dict[str, Any]:
        proto = await self._connected()
        amp_command = _AMP_COMMANDS[command.name]
        try:
            if command.name in _LONG and on_progress is not None:
                d = call_with_progress(proto, self.reactor, amp_command, command.arguments,
                                       on_progress)
            else:
                d = proto.callRemote(amp_command, **command.arguments)
                if command.name not in _LONG:
                    d.addTimeout(self.timeout, self.reactor)
            return await d
        except AdminError as e:
            raise ShellError(str(e)) from None
        except NotLeader:
            raise
        except TimeoutError:
            raise ShellError(f"the ECS at {self.address} did not answer within "
                             f"{self.timeout:g}s") from None
        except CancelledError:
            raise
        except ConnectionClosed:
            raise ShellError(f"lost the connection to the ECS at {self.address} during "
                             f"{command.name}; see status") from None
        except PermissionDenied as e:
            raise ShellError(f"the ECS refused {command.name}: {e}") from None
        except ServerError as e:
            raise ShellError(f"the ECS failed: {e}") from None
        except amp.RemoteAmpError as e:
            raise ShellError(f"the ECS failed: {e}") from None
        except Exception as e:
            why = tls.describe_failure(e)
            if why is None:
                raise
            raise ShellError(f"cannot talk to the ECS at {self.address}: {why}") from None

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.loseConnection()
        self._proto = None


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text or type(error).__name__


class BlockingAdmin:
    """L{AdminLink} for the main thread: each call waits for the reactor thread's answer."""

    def __init__(self, reactor: Any, host: str, port: int, timeout: float,
                 credentials: tls.Credentials | None = None,
                 others: Sequence[tuple[str, int]] = ()) -> None:
        from client.blocking import ensure_reactor_running

        self.reactor = reactor
        ensure_reactor_running(reactor)
        self.link = AdminLink(reactor, host, port, timeout, credentials=credentials,
                              others=others)
        self._running: Deferred[Any] | None = None

    def run(self, command: Command,
            on_progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
        from twisted.internet.threads import blockingCallFromThread

        def start() -> Deferred[Any]:
            self._running = Deferred.fromCoroutine(self.link.run(command, on_progress))
            return self._running

        try:
            return blockingCallFromThread(self.reactor, start)
        except KeyboardInterrupt:
            # Stop waiting (and polling); the ECS finishes the operation regardless.
            running = self._running
            if running is not None:
                self.reactor.callFromThread(running.cancel)
            raise

    def close(self) -> None:
        from twisted.internet.threads import blockingCallFromThread

        blockingCallFromThread(self.reactor, self.link.close)


# -- the shell -------------------------------------------------------------------------------------


class Quit(Exception):
    """The user asked to leave."""


class Shell:
    """Runs parsed commands against C{admin} (an object with L{BlockingAdmin.run}).

    Answers go to C{out}, C{error: ...} lines to C{err}; C{tty} says whether C{out} is a
    terminal (progress is then rewritten in place).
    """

    def __init__(self, admin: Any, out: TextIO, err: TextIO, tty: bool = False) -> None:
        self.admin = admin
        self.out = out
        self.err = err
        self.tty = tty

    def handle(self, words: list[str]) -> bool:
        """Run one command; True if it succeeded (or was empty). Raises L{Quit} on quit."""
        try:
            command = parse_command(words)
            if command is None:
                return True
            self.execute(command)
        except (UsageError, ShellError) as e:
            self.error(str(e))
            return False
        return True

    def execute(self, command: Command) -> None:
        if command.name == "quit":
            raise Quit()
        if command.name == "help":
            self.say(HELP)
            return
        if command.name == "status":
            status = self.admin.run(command)["status"]
            self.say(status if command.json else format_status(json.loads(status)))
            return
        if command.name in _LONG:
            progress = ProgressPrinter(self.out, self.tty)
            try:
                answer = self.admin.run(command, progress.update)
            finally:
                progress.finish()
        else:
            answer = self.admin.run(command)
        self.say(answer["message"])

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, message: str) -> None:
        self.out.flush()
        self.err.write(f"error: {message}\n")
        self.err.flush()


def _lines(interactive: bool) -> Iterator[str]:
    if not interactive:
        yield from sys.stdin
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input(PROMPT)
        except EOFError:
            sys.stdout.write("\n")
            return


def _log_errors_to_stderr() -> None:
    """Twisted's own log events reach stderr only from errors up (not AMP's chatter)."""

    def errors(event: dict[str, Any]) -> PredicateResult:
        if event.get("log_level", LogLevel.info) >= LogLevel.error:
            return PredicateResult.yes
        return PredicateResult.no

    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [errors])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecsclient",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The admin shell of a chainstore cluster: it talks to the ECS.\n"
                    "With a command it runs that command and exits; without, it reads\n"
                    "commands from stdin (a terminal or a pipe).",
        epilog=HELP + "\n\nexamples:\n  ecsclient --ecs 127.0.0.1:49999 status --json\n"
                      "  printf 'addNode LRU 100\\nstatus\\n' | ecsclient",
    )
    parser.add_argument("--ecs", action="append", metavar="HOST:PORT",
                        help="the ECS's admin address, its listen option; several ECS (one "
                             "leads): repeat it or separate them with commas; the first that "
                             f"answers is asked, and names the leader (default: {DEFAULT_ECS})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="how long to wait to connect and for the answer of a command that "
                             "moves no data (default: %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="one command to run (options of ecsclient go before it)")
    tls.add_arguments(parser, "admin")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command (exit 0 or 1) or a session (from a pipe: exit 1 if any command failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        addresses = [parse_address(part.strip()) for value in (args.ecs or [DEFAULT_ECS])
                     for part in value.split(",") if part.strip()]
    except ValueError as e:
        parser.error(f"--ecs: {e}")
    (host, port), others = addresses[0], addresses[1:]
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    one_shot = None
    if args.command:
        try:
            one_shot = parse_command(args.command)
        except UsageError as e:
            parser.error(str(e))
    credentials = tls.credentials_from(args)
    _log_errors_to_stderr()
    from twisted.internet import reactor

    admin = BlockingAdmin(reactor, host, port, args.timeout, credentials, others)
    tty = sys.stdout.isatty()
    shell = Shell(admin, sys.stdout, sys.stderr, tty)
    try:
        if args.command:
            if one_shot is not None and one_shot.name == "quit":
                return 0
            return 0 if shell.handle(args.command) else 1
        interactive = sys.stdin.isatty()
        if interactive:
            shell.say(f"ECS admin shell for {host}:{port}; type help")
        failed = False
        for line in _lines(interactive):
            try:
                ok = shell.handle(line.split())
            except Quit:
                break
            except KeyboardInterrupt:
                if not interactive:
                    raise
                shell.error("interrupted; the ECS goes on with the command (see status)")
                ok = False
            failed = failed or not ok
        # A script learns that a line failed; at a terminal the user has seen it.
        return 1 if failed and not interactive else 0
    except KeyboardInterrupt:
        return 130
    finally:
        admin.close()


if __name__ == "__main__":
    sys.exit(main())
