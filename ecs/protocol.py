"""The admin protocol: AMP commands from ``ecsclient`` (or any admin tool) to the ECS.

Long commands (C{AddNodes}, C{RemoveNode}) answer when the change is complete; meanwhile the
admin may poll C{Status}, whose ``operation`` field shows the keys and bytes moved so far.
"""

from __future__ import annotations

from twisted.protocols import amp

from chainstore.control import NotLeader
from chainstore.errors import PermissionDenied, ServerError
from chainstore.protocol import BigUnicode


class AdminError(Exception):
    """The ECS refused or could not finish the command; the message says why."""


class _AdminCommand(amp.Command):
    # ServerError: a request the ECS could not even read (see chainstore.roles)
    # NotLeader: a standby ECS answers every admin command with the leader's address
    errors = {AdminError: b"ADMIN_ERROR", PermissionDenied: PermissionDenied.code,
              ServerError: ServerError.code, NotLeader: b"NOT_LEADER"}
    fatalErrors: dict[type[Exception], bytes] = {}


_NONE: list[tuple[bytes, amp.Argument]] = []


class Start(_AdminCommand):
    """Every server in the ring starts answering clients."""

    arguments = _NONE
    response = [(b"message", amp.Unicode())]


class Stop(_AdminCommand):
    """Every server in the ring answers ``server_stopped`` (the processes keep running)."""

    arguments = _NONE
    response = [(b"message", amp.Unicode())]


class ShutDown(_AdminCommand):
    """End every server process and then the ECS itself."""

    arguments = _NONE
    response = [(b"message", amp.Unicode())]


class AddNodes(_AdminCommand):
    """Add C{count} servers (registered idle ones first, then pool slots) to the ring."""

    arguments = [(b"count", amp.Integer()), (b"cache_strategy", amp.Unicode()),
                 (b"cache_size", amp.Integer())]
    response = [(b"names", amp.ListOf(amp.Unicode())), (b"message", amp.Unicode())]


class RemoveNode(_AdminCommand):
    """Move a server's data to the others, take it out of the ring and end it."""

    arguments = [(b"name", amp.Unicode()), (b"force", amp.Boolean())]
    response = [(b"message", amp.Unicode())]


class Status(_AdminCommand):
    """The ring, every member's state and last heartbeat, and the running operation (JSON).

    Chunked: with the ECS's largest member table (ecs.coordinator.MAX_MEMBERS) the JSON is larger
    than one AMP value."""

    arguments = _NONE
    response = [(b"status", BigUnicode())]
