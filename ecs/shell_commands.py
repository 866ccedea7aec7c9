"""The commands of ``ecsclient``: their help text and the parsing of a command line into a
L{Command} (its canonical name and the arguments of its AMP command), with L{UsageError} for a
line the shell cannot run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chainstore.cache import STRATEGIES

HELP = """\
commands (names are case-insensitive: addnode works as well as addNode):
  start                          every server in the ring answers clients
  stop                           every server answers server_stopped (processes keep running)
  shutDown                       end every server process and the ECS
  addNode <strategy> <size>      add one server with cache FIFO, LRU or LFU of <size> entries
  addNodes <count> <strategy> <size>
                                 add <count> servers
  removeNode <name> [--force]    move a server's data to the others and end it (--force: even
                                 if fewer servers than the replication factor remain)
  status [--json]                ring, ranges, server states, last heartbeats (--json: raw JSON)
  help                           this text
  quit                           leave (so does the end of the input)
addNode(s) and removeNode show progress (keys and bytes moved) until the data has moved."""


class UsageError(Exception):
    """A command line the shell cannot run; the message gives the right form."""



@dataclass(frozen=True)
class Command:
    """A parsed command: its canonical name and the arguments of its AMP command."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    #: C{status --json}
    json: bool = False


_NAMES = {name.lower(): name for name in (
    "start", "stop", "shutDown", "addNode", "addNodes", "removeNode", "status", "help", "quit")}
_NAMES["exit"] = "quit"

_USAGE = {
    "addNode": "addNode <strategy> <size>",
    "addNodes": "addNodes <count> <strategy> <size>",
    "removeNode": "removeNode <name> [--force]",
    "status": "status [--json]",
}


def parse_command(words: list[str]) -> Command | None:
    """The command in C{words} (a line split on blanks); None for an empty line.

    Raises L{UsageError} for an unknown command or wrong arguments.
    """
    if not words:
        return None
    name = _NAMES.get(words[0].lower())
    if name is None:
        raise UsageError(f"unknown command {words[0][:40]!r}; type help for the commands")
    args = words[1:]
    if name == "addNode":
        if len(args) != 2:
            raise UsageError(f"usage: {_USAGE[name]}")
        return Command("addNodes", _add_arguments(name, "1", *args))
    if name == "addNodes":
        if len(args) != 3:
            raise UsageError(f"usage: {_USAGE[name]}")
        return Command("addNodes", _add_arguments(name, *args))
    if name == "removeNode":
        force = "--force" in args
        rest = [a for a in args if a != "--force"]
        if len(rest) != 1 or rest[0].startswith("-"):
            raise UsageError(f"usage: {_USAGE[name]}")
        return Command(name, {"name": rest[0], "force": force})
    if name == "status":
        if args not in ([], ["--json"]):
            raise UsageError(f"usage: {_USAGE[name]}")
        return Command(name, json=bool(args))
    if args:
        raise UsageError(f"{name} takes no arguments")
    return Command(name)


def _add_arguments(name: str, count: str, strategy: str, size: str) -> dict[str, Any]:
    if not count.isdigit() or int(count) < 1:
        raise UsageError(f"{name}: count must be a whole number of 1 or more, not {count!r}")
    if strategy.upper() not in STRATEGIES:
        raise UsageError(f"{name}: unknown cache strategy {strategy!r}; "
                         f"choose one of {', '.join(STRATEGIES)}")
    if not size.isdigit():
        raise UsageError(f"{name}: cache size must be a whole number of 0 or more, not {size!r}")
    return {"count": int(count), "cache_strategy": strategy.upper(), "cache_size": int(size)}


def parse_address(text: str) -> tuple[str, int]:
    """C{HOST:PORT} as C{(host, port)}; ValueError with the reason if it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT with a port in 1-65535")
    return host.strip("[]"), int(port)
