"""The ECS's AMP endpoint: servers' control connections and admins' commands arrive here."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from chainstore import control
from chainstore.bounds import MAX_CONNECTIONS, BoundedAMP, CappedFactory
from chainstore.roles import ADMIN, SERVER, RoleGuard, allow
from ecs import protocol
from ecs.coordinator import ECS


class ECSProtocol(BoundedAMP, RoleGuard):
    """Servers register and report here; admins (ecsclient) run the admin commands."""

    command_roles = {
        **allow((SERVER,), (control.Register, control.CopyProgress)),
        **allow((ADMIN,), (protocol.Start, protocol.Stop, protocol.ShutDown, protocol.AddNodes,
                           protocol.RemoveNode, protocol.Status)),
    }

    def __init__(self, ecs: ECS) -> None:
        super().__init__()
        self.ecs = ecs
        self.clock = ecs.clock

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.ecs.link_lost(self)

    # -- from servers ----------------------------------------------------------------------------

    @control.Register.responder
    def register(self, name: str, host: str, console_port: int, amp_port: int,
                 epoch: int) -> dict[str, Any]:
        # A server's certificate names the one server it may register as: no impersonation.
        self.require_name(name)
        return {"message": self.ecs.register(self, name, host, console_port, amp_port, epoch)}

    @control.CopyProgress.responder
    def copy_progress(self, operation: int, keys: int, bytes: int) -> dict[str, Any]:
        self.ecs.copy_progress(operation, keys, bytes, getattr(self, "server_name", "?"))
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
            names = await self.ecs.add_nodes(count, cache_strategy, cache_size)
            return {"names": names, "message": f"added {', '.join(names)}"}

        return Deferred.fromCoroutine(add())

    @protocol.RemoveNode.responder
    def remove_node(self, name: str, force: bool) -> Deferred[dict[str, Any]]:
        return _admin(self.ecs.remove_node(name, force))

    @protocol.Status.responder
    def status(self) -> dict[str, Any]:
        return {"status": json.dumps(self.ecs.status(), sort_keys=True)}


def _admin(coroutine: Any) -> Deferred[dict[str, Any]]:
    async def run() -> dict[str, Any]:
        return {"message": await coroutine}

    return Deferred.fromCoroutine(run())


class ECSFactory(CappedFactory):
    def __init__(self, ecs: ECS, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(max_connections)
        self.ecs = ecs

    def build_protocol(self, addr: Any) -> ECSProtocol:
        return ECSProtocol(self.ecs)
