"""``kvclient``: the interactive shell of a chainstore cluster (also reads commands from a pipe).

One command per line, one reply line per command, in the classic wording (``put_success k``,
``get_success k v``, ``get_error k``, ``server_stopped``, ``error <description>``...)::

    $ printf 'put a 1\\nget a\\n' | kvclient --connect 127.0.0.1:51000
    put_success a
    get_success a 1

The port is a server's AMP port (its ``--listen`` option); the shell says so when it is given
the text console's port instead. It talks to the cluster through L{BlockingKVStore}, so it
follows the ring, retries and backs off exactly like the library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    PredicateResult,
    globalLogBeginner,
    textFileLogObserver,
)

from chainstore import logs, tls
from chainstore.errors import (
    InvalidKey,
    KeyNotFound,
    KVError,
    NotResponsible,
    ServerStopped,
    ValueTooLarge,
    WriteLocked,
)
from client.errors import ClientError
from client.kvstore import Address, key_bytes, parse_address, value_bytes

PROMPT = "KVClient> "

HELP = """\
commands (<port> is a server's AMP port, its --listen option, not the text console's port):
  connect <host> <port>   connect to the cluster through any one of its servers
  disconnect              close the connections
  put <key> <value>       store <value> (the rest of the line) under <key>
  get <key>               print the value stored under <key>
  delete <key>            remove <key>
  keyrange                every key range with the console address of its head (writes)
  keyrange_read           every key range with the console address of its tail (reads)
  stats                   a server's counters (requests, latencies, chains, cache) as JSON
  logLevel <level>        what the client logs to stderr: debug, info, warn, error, critical
  help                    this text
  quit                    leave (so does the end of the input)
keys: 1-20 printable ASCII characters without spaces; values: at most 120000 bytes"""

# Replies to the server states that the library gave up retrying through.
_STATE_REPLIES: dict[type[KVError], bytes] = {
    ServerStopped: b"server_stopped",
    WriteLocked: b"server_write_lock",
    NotResponsible: b"server_not_responsible",
}

# Names that log4j-style clients use for levels, mapped to Twisted's.
_LEVEL_ALIASES = {"all": "debug", "warning": "warn", "fatal": "critical"}

StoreFactory = Callable[[Address], Any]


class Shell:
    """Runs the shell's commands against a store made by C{store_factory}, replying to C{out}.

    C{store_factory(address)} returns an object with the methods of L{BlockingKVStore}.
    """

    def __init__(self, out: BinaryIO, store_factory: StoreFactory) -> None:
        self.out = out
        self.store_factory = store_factory
        self.store: Any = None
        self.address: Address | None = None

    def handle(self, line: bytes) -> bool:
        """Run one command line; False once the user asked to quit."""
        line = line.rstrip(b"\r\n")
        word, _, rest = line.lstrip(b" \t").partition(b" ")
        command = word.strip().lower()
        if not command:
            return True
        if command == b"quit":
            return False
        handler = _COMMANDS.get(command)
        if handler is None:
            shown = word.decode("ascii", "backslashreplace")[:40]
            self.reply(f"error unknown command {shown!r}; try help".encode())
            return True
        try:
            handler(self, rest)
        except Exception as e:
            self.reply(b"error " + describe(e))
        return True

    def reply(self, line: bytes) -> None:
        # One line per command: a value with a line break in it must not end the line early.
        self.out.write(line.replace(b"\r", b"\\r").replace(b"\n", b"\\n") + b"\n")
        self.out.flush()

    # -- commands -------------------------------------------------------------------------------

    def do_connect(self, rest: bytes) -> None:
        args = rest.split()
        if len(args) != 2 or not args[1].isdigit() or not 0 < int(args[1]) < 65536:
            self.reply(b"error connect needs <host> <port>, the AMP port of any server")
            return
        self.connect((args[0].decode("ascii", "replace"), int(args[1])))

    def connect(self, address: Address, announce: bool = True) -> bool:
        """Connect to the cluster through C{address}; False (and an error line) if it fails.

        With C{announce} false a success prints nothing (``--connect``: a pipe's output then
        holds exactly one line per command it sent).
        """
        self.close()
        try:
            store = self.store_factory(address)
        except Exception as e:
            self.reply(b"error " + describe(e))
            return False
        try:
            ring = store.refresh_metadata()
        except Exception as e:
            store.close()
            self.reply(b"error " + describe(e))
            return False
        self.store, self.address = store, address
        if announce:
            self.reply(f"connected to {address[0]}:{address[1]}: ring epoch {ring.epoch}, "
                       f"{len(ring)} server(s)".encode())
        return True

    def do_disconnect(self, rest: bytes) -> None:
        if self.store is None:
            self.reply(b"error not connected")
            return
        host, port = self.address  # type: ignore[misc]
        self.close()
        self.reply(f"disconnected from {host}:{port}".encode())

    def do_put(self, rest: bytes) -> None:
        key, sep, value = rest.lstrip(b" ").partition(b" ")
        if not key or not sep or not value:
            self.reply(b"error put needs a key and a value: put <key> <value>")
            return
        key, value = key_bytes(key), value_bytes(value)
        try:
            updated = self._connected().put(key, value)
        except KVError as e:
            self.reply(_STATE_REPLIES.get(type(e)) or b"put_error %s %s" % (key, value))
            return
        self.reply((b"put_update %s" if updated else b"put_success %s") % key)

    def do_get(self, rest: bytes) -> None:
        key = self._key("get", rest)
        if key is None:
            return
        try:
            value = self._connected().get(key)
        except KVError as e:
            self.reply(_STATE_REPLIES.get(type(e)) or b"get_error %s" % key)
            return
        self.reply(b"get_success %s %s" % (key, value))

    def do_delete(self, rest: bytes) -> None:
        key = self._key("delete", rest)
        if key is None:
            return
        try:
            self._connected().delete(key)
        except KVError as e:
            self.reply(_STATE_REPLIES.get(type(e)) or b"delete_error %s" % key)
            return
        self.reply(b"delete_success %s" % key)

    def do_keyrange(self, rest: bytes) -> None:
        if self._no_args("keyrange", rest):
            self.reply(b"keyrange_success " + self._connected().keyrange().encode("ascii"))

    def do_keyrange_read(self, rest: bytes) -> None:
        if self._no_args("keyrange_read", rest):
            self.reply(
                b"keyrange_read_success " + self._connected().keyrange_read().encode("ascii"))

    def do_stats(self, rest: bytes) -> None:
        # The same JSON as the console's stats: the counters its /metrics exposes.
        if self._no_args("stats", rest):
            self.reply(b"stats " + json.dumps(self._connected().stats(),
                                              sort_keys=True).encode("ascii"))

    def do_loglevel(self, rest: bytes) -> None:
        name = rest.strip().decode("ascii", "replace").lower()
        if not name:
            self.reply(f"error logLevel needs a level: {', '.join(logs.LEVELS)}".encode())
            return
        logs.set_level(_LEVEL_ALIASES.get(name, name))
        self.reply(f"logLevel set to {logs.parse_level(_LEVEL_ALIASES.get(name, name)).name}"
                   .encode())

    def do_help(self, rest: bytes) -> None:
        self.out.write(HELP.encode("ascii") + b"\n")
        self.out.flush()

    # -- helpers --------------------------------------------------------------------------------

    def _connected(self) -> Any:
        if self.store is None:
            raise _NotConnected()
        return self.store

    def _key(self, command: str, rest: bytes) -> bytes | None:
        key = rest.strip(b" \t")
        if not key:
            self.reply(f"error {command} needs a key: {command} <key>".encode())
            return None
        return key_bytes(key)

    def _no_args(self, command: str, rest: bytes) -> bool:
        if rest.strip():
            self.reply(f"error {command} takes no arguments".encode())
            return False
        return True

    def close(self) -> None:
        store, self.store, self.address = self.store, None, None
        if store is not None:
            store.close()


_COMMANDS: dict[bytes, Callable[[Shell, bytes], None]] = {
    b"connect": Shell.do_connect,
    b"disconnect": Shell.do_disconnect,
    b"put": Shell.do_put,
    b"get": Shell.do_get,
    b"delete": Shell.do_delete,
    b"keyrange": Shell.do_keyrange,
    b"keyrange_read": Shell.do_keyrange_read,
    b"stats": Shell.do_stats,
    b"loglevel": Shell.do_loglevel,
    b"help": Shell.do_help,
}


class _NotConnected(Exception):
    def __str__(self) -> str:
        return "not connected; use connect <host> <port> (a server's AMP port)"


def describe(error: Exception) -> bytes:
    """The text after ``error `` for an exception a command raised."""
    if isinstance(error, (InvalidKey, ValueTooLarge, ClientError, _NotConnected, ValueError)):
        text = str(error)
    elif isinstance(error, (ConnectError, ConnectionClosed, DNSLookupError)):
        text = f"cannot reach the server: {error}"
    elif isinstance(error, KeyNotFound):
        text = "no such key"
    elif (why := tls.describe_failure(error)) is not None:
        text = why
    else:
        text = f"{type(error).__name__}: {error}"
    return text.encode("utf-8", "replace")


def _log_to_stderr() -> None:
    """Show the client's own log events on stderr; Twisted's chatter only from errors up."""

    def ours(event: dict[str, Any]) -> PredicateResult:
        namespace = event.get("log_namespace") or ""
        if namespace.startswith(("client.", "chainstore.")):
            return PredicateResult.yes  # already filtered by chainstore.logs
        if event.get("log_level", LogLevel.info) >= LogLevel.error:
            return PredicateResult.yes
        return PredicateResult.no

    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [ours])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _lines(interactive: bool) -> Iterator[bytes]:
    if not interactive:
        yield from sys.stdin.buffer
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            text = input(PROMPT)
        except EOFError:
            sys.stdout.write("\n")
            sys.stdout.flush()
            return
        yield text.encode("utf-8", "surrogateescape")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvclient",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The interactive shell of a chainstore key-value cluster.\n"
                    "It reads one command per line from stdin (a terminal or a pipe)\n"
                    "and prints one reply line per command.",
        epilog=HELP + "\n\nexample:\n  printf 'put a 1\\nget a\\n' | kvclient --connect "
                      "127.0.0.1:51000",
    )
    parser.add_argument("--connect", metavar="HOST:PORT",
                        help="connect at once to this server's AMP port (its --listen option)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for one answer (default: %(default)s)")
    parser.add_argument("--deadline", type=float, default=30.0, metavar="SECONDS",
                        help="how long to keep retrying while the cluster is stopped, locked or "
                             "unreachable (default: %(default)s)")
    parser.add_argument("--read-policy", default="any", choices=["any", "tail"],
                        help="where gets go: any live member of the key's chain (default) or "
                             "its tail")
    parser.add_argument("--log-level", default="warn", choices=list(logs.LEVELS),
                        help="client log events shown on stderr (default: %(default)s)")
    tls.add_arguments(parser, "client")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the shell; 0 after quit or the end of the input, 1 if --connect failed."""
    args = build_parser().parse_args(argv)
    if args.timeout <= 0 or args.deadline <= 0:
        build_parser().error("--timeout and --deadline must be positive")
    address = None
    if args.connect:
        try:
            address = parse_address(args.connect)
        except ValueError as e:
            build_parser().error(f"--connect: {e}")
    credentials = tls.credentials_from(args)
    logs.set_level(args.log_level)
    _log_to_stderr()

    def make_store(addr: Address) -> Any:
        from client.blocking import BlockingKVStore
        return BlockingKVStore([addr], timeout=args.timeout, deadline=args.deadline,
                               tls=credentials, read_policy=args.read_policy)

    shell = Shell(sys.stdout.buffer, make_store)
    try:
        if address is not None and not shell.connect(address, announce=False):
            return 1
        for line in _lines(sys.stdin.isatty()):
            if not shell.handle(line):
                break
    except KeyboardInterrupt:
        return 130
    finally:
        shell.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
