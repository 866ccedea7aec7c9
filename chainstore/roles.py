"""Who may send which AMP command: one role per certificate, checked before any responder runs.

- client: the data commands (put, get, delete, key ranges, metadata, stats) on a server;
- admin: the same, and the ECS's admin commands (start, stop, shutDown, addNodes, removeNode,
  status);
- server: C{Register} and C{CopyProgress} at the ECS (as the server its certificate names), and
  the server-to-server commands (C{Relay}, C{RenewLease}, C{ReceiveRange});
- ecs: the control commands a server obeys on its link to the ECS.

A command a peer's role does not allow is answered with L{PermissionDenied} naming the role it
needs, logged with the peer's identity, and nothing of it is applied. Over plaintext (``tls:
off``, an explicit choice for a trusted machine) there are no identities and every command is
allowed, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from chainstore import tls
from chainstore.bounds import peer_of
from chainstore.errors import PermissionDenied, ServerError
from chainstore.logs import get_logger
from chainstore.pki import Identity

log = get_logger("chainstore.roles")

SERVER, ECS, ADMIN, CLIENT = "server", "ecs", "admin", "client"

RoleTable = Mapping[bytes, frozenset[str]]


def allow(roles: Iterable[str], commands: Iterable[type[amp.Command]]) -> dict[bytes, frozenset[str]]:
    """A role table granting C{roles} each of C{commands}."""
    granted = frozenset(roles)
    return {command.commandName: granted for command in commands}  # type: ignore[attr-defined]


@implementer(IHandshakeListener)
class RoleGuard(amp.AMP):
    """An AMP protocol whose commands are answered only for the roles of C{command_roles}.

    A command missing from the table is refused to everyone over TLS: new commands are closed
    until someone decides who may send them. Over TLS a connection that has not finished its
    handshake within L{tls.HANDSHAKE_TIMEOUT} seconds is closed.
    """

    command_roles: RoleTable = {}
    #: the roles the peer must hold at all, checked when the handshake completes (the side
    #: that dials knows whom it meant to reach); None: any role, each command checked alone
    peer_roles: frozenset[str] | None = None
    #: the reactor for the handshake timeout (None: no timeout, as in most unit tests)
    clock: Any = None

    _peer: Identity | None = None
    _handshake_timer: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if not tls.is_tls(self.transport):
            return
        listener = getattr(self, "listener", None)
        if listener is not None:
            host = _host(self.transport)
            if not listener.admit_unverified(host):
                self.transport.abortConnection()
                return
            self._unverified_at = (listener, host)
        if self.clock is not None:
            self._handshake_timer = self.clock.callLater(
                tls.HANDSHAKE_TIMEOUT, self._handshake_too_slow)

    def _end_unverified(self) -> None:
        counted = self.__dict__.pop("_unverified_at", None)
        if counted is not None:
            counted[0].verified(counted[1])

    def _handshake_too_slow(self) -> None:
        self._handshake_timer = None
        log.warn("closing a connection from {peer}: no TLS handshake within {seconds} s",
                 peer=peer_of(self.transport), seconds=tls.HANDSHAKE_TIMEOUT)
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._end_unverified()
        who = self.peer
        listener = getattr(self, "listener", None)
        if listener is not None and (who is None or who.role not in (SERVER, ECS)):
            if not listener.admit_unreserved():
                self.transport.abortConnection()
                return
            self._unreserved = listener
        if self.peer_roles is not None and (who is None or who.role not in self.peer_roles):
            # The host's name matched, but the certificate is not of the kind we dialled
            # for (a client's certificate where a server should answer): hang up before
            # sending anything.
            log.error("{peer} is not a {roles}: closing the connection",
                      peer=self.describe_peer(), roles=" or ".join(sorted(self.peer_roles)))
            self.transport.abortConnection()
        elif who is not None and tls.is_revoked(who.serial):
            self.cut_off_revoked()  # (a list loaded while the handshake ran)
        elif who is not None:
            tls.watch_peer(self)

    def connectionLost(self, reason: Any) -> None:  # type: ignore[override]
        tls.forget_peer(self)
        self._end_unverified()
        listener = self.__dict__.pop("_unreserved", None)
        if listener is not None:
            listener.release_unreserved()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        super().connectionLost(reason)

    @property
    def peer(self) -> Identity | None:
        """The peer's identity (None over plaintext or before the handshake)."""
        if self._peer is None:
            self._peer = tls.peer_identity(self.transport)
        return self._peer

    def describe_peer(self) -> str:
        who = self.peer
        where = peer_of(self.transport)
        return f"{where} (plaintext)" if who is None else \
            f"{where} ({who.name}, role {who.role or 'none'})"

    def refusal(self, command: bytes) -> str | None:
        """Why the peer may not send C{command}, or None if it may."""
        if not tls.is_tls(self.transport):
            return None
        needed = self.command_roles.get(command, frozenset())
        who = self.peer
        if who is not None and who.role in needed:
            return None
        name = command.decode("ascii", "replace")
        if not needed:
            return f"{name} is not accepted on this port"
        return (f"{name} needs the role {' or '.join(sorted(needed))}; this certificate's "
                f"role is {(who.role if who else None) or 'none'}")

    def locateResponder(self, name: bytes) -> Callable[[amp.AmpBox], Any] | None:
        # Every box asks this: each allowed command's responder is built once per connection
        # (the lookup and the role check were ~13% of a chain head's CPU in py-spy).
        if self._peer is not None and tls.is_revoked(self._peer.serial):
            return self._revoked(name)
        allowed = self.__dict__.setdefault("_allowed", {})
        found = allowed.get(name)
        if found is not None:
            return found  # type: ignore[no-any-return]
        try:
            responder = super().locateResponder(name)
        except UnicodeDecodeError:
            return None  # not one of our command names: AMP answers it as unhandled
        if responder is None:
            return None
        why = self.refusal(name)
        if why is not None:
            log.warn("refused {command} from {peer}: {why}",
                     command=name.decode("ascii", "replace"), peer=self.describe_peer(), why=why)
            return lambda box: fail(amp.RemoteAmpError(PermissionDenied.code, why))

        def guarded(box: amp.AmpBox) -> Any:
            return maybeDeferred(responder, box).addErrback(self._undeclared, name)

        # Kept once the peer is known, which a box over TLS always finds (TLS delivers nothing
        # before its handshake); refusals are not kept: each one is logged.
        if self._peer is not None or not tls.is_tls(self.transport):
            allowed[name] = guarded
        return guarded

    def _revoked(self, name: bytes) -> Callable[[amp.AmpBox], Any]:
        # The certificate was revoked after this connection was made: nothing more from it.
        # (A connection watched since its handshake is closed as the list is loaded; this
        # covers any other.)
        why = "this certificate is revoked"
        self.cut_off_revoked()
        return lambda box: fail(amp.RemoteAmpError(PermissionDenied.code, why))

    def cut_off_revoked(self) -> None:
        """The peer's certificate is revoked: close the connection (L{tls.watch_peer})."""
        if not self.__dict__.get("_revocation_logged"):
            self._revocation_logged = True
            assert self._peer is not None
            log.warn("closing the connection of {peer}: its certificate (serial {serial:X}) "
                     "was revoked", peer=self.describe_peer(), serial=self._peer.serial)
        if self.transport is not None:
            self.transport.abortConnection()

    def _undeclared(self, failure: Failure, name: bytes) -> Failure:
        # AMP answers an undeclared error (a bug, or arguments that do not parse) by closing
        # the connection, which would cut off every other request on it, and on a server's
        # ECS link drop its locks: log it and answer the declared ServerError instead.
        if failure.check(amp.RemoteAmpError):
            return failure
        log.failure("{command} from {peer} failed", failure,
                    command=name.decode("ascii", "replace"), peer=self.describe_peer())
        return Failure(amp.RemoteAmpError(
            ServerError.code, f"the server failed: {failure.getErrorMessage()}", False,
            local=failure))

    def require_name(self, name: str) -> None:
        """Refuse (L{PermissionDenied}) unless the peer's certificate names C{name}."""
        who = self.peer
        if who is not None and who.name != name:
            log.warn("refused {peer} acting as {name}", peer=self.describe_peer(), name=name)
            raise PermissionDenied(
                f"this certificate is {who.name!r}'s; it cannot act as {name!r}")


def _host(transport: Any) -> str:
    try:
        return str(getattr(transport.getPeer(), "host", "?"))
    except Exception:
        return "?"


class DialledAMP(RoleGuard):
    """A plain AMP connection we dial to a peer that must hold one of C{roles}; it answers
    no command of the peer's."""

    def __init__(self, roles: Iterable[str]) -> None:
        super().__init__()
        self.peer_roles = frozenset(roles)
