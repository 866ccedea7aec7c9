"""The ECS's AMP endpoint: servers' control connections and admins' commands arrive here."""

from __future__ import annotations

import json
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from chainstore import control
from chainstore.bounds import MAX_CONNECTIONS, BoundedAMP, CappedFactory
from chainstore.roles import ADMIN, SERVER, RoleGuard, allow
from ecs import protocol
from ecs.coordinator import ECS
from ecs.leadership import Fixed


class Leader(Protocol):
    """Which L{ECS} answers: C{current()} raises L{control.NotLeader} on a standby."""

    clock: Any

    def current(self) -> ECS: ...

    def ha_status(self) -> dict[str, Any]: ...


class ECSProtocol(BoundedAMP, RoleGuard):
    """Servers register and report here; admins (ecsclient) run the admin commands."""

    command_roles = {
        **allow((SERVER,), (control.Register, control.CopyProgress, control.Alive)),
        **allow((ADMIN,), (protocol.Start, protocol.Stop, protocol.ShutDown, protocol.AddNodes,
                           protocol.RemoveNode, protocol.Status)),
    }

    def __init__(self, ecs: ECS | Leader) -> None:
        super().__init__()
        self.leader: Leader = Fixed(ecs) if isinstance(ecs, ECS) else ecs
        self.clock = self.leader.clock
        # the ECS this server registered with (a leader deposed since still forgets the link)
        self.registered_with: ECS | None = None

    @property
    def ecs(self) -> ECS:
        """The leading ECS; on a standby, L{control.NotLeader} naming the leader."""
        return self.leader.current()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if self.registered_with is not None:
            self.registered_with.link_lost(self)

    # -- from servers ----------------------------------------------------------------------------

    @control.Register.responder
    def register(self, name: str, host: str, console_port: int, amp_port: int,
                 epoch: int) -> Deferred[dict[str, Any]]:
        # A server's certificate names the one server it may register as: no impersonation.
        self.require_name(name)
        ecs = self.ecs
        d = ecs.register(self, name, host, console_port, amp_port, epoch)
        self.registered_with = ecs
        return d.addCallback(lambda message: {"message": message,
                                              "ecs_epoch": ecs.committed_epoch})

    @control.Alive.responder
    def alive(self) -> dict[str, Any]:
        if self.registered_with is None:
            raise control.ControlFailed("this server has not registered on this link")
        return {"timeout": self.registered_with.alive(self)}

    @control.CopyProgress.responder
    def copy_progress(self, operation: int, keys: int, bytes: int) -> dict[str, Any]:
        if self.registered_with is not None:
            self.registered_with.copy_progress(operation, keys, bytes,
                                               getattr(self, "server_name", "?"))
        return {}

    # -- from admins -----------------------------------------------------------------------------

    @protocol.Start.responder
    def start(self) -> Deferred[dict[str, Any]]:
        return _admin(self.ecs.set_serving(True))

    @protocol.Stop.responder
    def stop(self) -> Deferred[dict[str, Any]]:
        return _admin(self.ecs.set_serving(False))

    @protocol.ShutDown.responder
    def shut_down(self) -> Deferred[dict[str, Any]]:
        return _admin(self.ecs.shut_down())

    @protocol.AddNodes.responder
    def add_nodes(self, count: int, cache_strategy: str,
                  cache_size: int) -> Deferred[dict[str, Any]]:
        async def add() -> dict[str, Any]:
            names = await _stopping(self.ecs.add_nodes(count, cache_strategy, cache_size))
            return {"names": names, "message": f"added {', '.join(names)}"}

        return Deferred.fromCoroutine(add())

    @protocol.RemoveNode.responder
    def remove_node(self, name: str, force: bool) -> Deferred[dict[str, Any]]:
        return _admin(self.ecs.remove_node(name, force))

    @protocol.Status.responder
    def status(self) -> dict[str, Any]:
        return {"status": json.dumps({**self.ecs.status(), **self.leader.ha_status()},
                                     sort_keys=True)}


def _admin(coroutine: Any) -> Deferred[dict[str, Any]]:
    async def run() -> dict[str, Any]:
        return {"message": await _stopping(coroutine)}

    return Deferred.fromCoroutine(run())


async def _stopping(coroutine: Any) -> Any:
    """An admin command's result; an L{protocol.AdminError} if the ECS stopped meanwhile
    (its calls were cancelled), not an error AMP does not know."""
    try:
        return await coroutine
    except CancelledError:
        raise protocol.AdminError("the ECS stopped, or lost the lead, before the command "
                                  "finished") from None


class ECSFactory(CappedFactory):
    def __init__(self, ecs: ECS | Leader, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(max_connections)
        self.ecs = ecs

    def build_protocol(self, addr: Any) -> ECSProtocol:
        return ECSProtocol(self.ecs)
