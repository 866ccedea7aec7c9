"""Several ECS processes, one leader (C{state: etcd}): the service that runs the coordinator only
while this process leads.

L{Leadership} campaigns (L{ecs.election.Election}); once elected it reads the saved state from
etcd and builds a fresh L{ECS} on it (L{ECS.start} resumes the saved ring under a fresh epoch, saved
before it is sent, so it is strictly greater than any epoch a previous leader committed, and none
it did not commit ever reached a server). When deposed, the coordinator abdicates at once (no
heartbeats, links closed; the servers keep running and find the new leader). Meanwhile, and as a
standby, C{current()} raises L{NotLeader} naming the leader, which the AMP endpoint sends back to
servers (L{chainstore.control.Register}) and admins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from chainstore.control import NotLeader
from chainstore.logs import get_logger
from chainstore.tls import client_host_port
from ecs.coordinator import ECS
from ecs.election import Election
from ecs.etcd import EtcdClient
from ecs.etcd_state import EtcdState, leader_record
from ecs.state import StateStore

log = get_logger("ecs.leadership")


def address_of(advertise: str) -> str:
    """HOST:PORT of an ECS's advertise endpoint (``tcp:HOST:PORT``), as servers and admins dial."""
    host, port = client_host_port(advertise)
    return f"{host}:{port}"


class Fixed:
    """The single ECS of C{state: file}: it always leads."""

    def __init__(self, ecs: ECS) -> None:
        self.ecs = ecs
        self.clock = ecs.clock

    def current(self) -> ECS:
        return self.ecs

    def ha_status(self) -> dict[str, Any]:
        return {}


class Leadership(Service):
    """Runs an L{ECS} made by C{make_ecs(state_store)} while this process leads."""

    def __init__(self, client: EtcdClient, clock: Any, prefix: str, name: str, advertise: str,
                 ttl: int, make_ecs: Callable[[StateStore], ECS],
                 interval: float | None = None) -> None:
        self.client = client
        self.clock = clock
        self.prefix = prefix
        self.name = name
        self.address = address_of(advertise)
        self.make_ecs = make_ecs
        self.ecs: ECS | None = None
        self.election = Election(client, clock, prefix,
                                 leader_record(name, advertise, self.address), ttl,
                                 self._elected, self._deposed, interval)

    def current(self) -> ECS:
        if self.ecs is None:
            leader = self.election.leader
            if leader and leader.get("admin") and leader.get("name") != self.name:
                raise NotLeader(f"not the leader; the leader is {leader['admin']}")
            raise NotLeader("not the leader; no leader is elected yet")
        return self.ecs

    def ha_status(self) -> dict[str, Any]:
        """The C{leader} and C{standbys} fields of C{Status}: names and addresses."""
        standbys = sorted(
            ({"name": str(m.get("name")), "address": str(m.get("admin"))}
             for m in self.election.members if m.get("name") != self.name),
            key=lambda m: m["name"])
        return {"leader": {"name": self.name, "address": self.address}, "standbys": standbys}

    async def _elected(self, lease: int) -> None:
        store = EtcdState(self.client, self.prefix, lease,
                          on_deposed=lambda: self.election.depose("a save was refused"))
        state = await store.fetch()
        if not self.election.leading:
            return
        ecs = self.make_ecs(store)
        self.ecs = ecs
        log.info("leading: {what}", what="resuming the saved ring" if state is not None
                 else "no saved state: a first start")
        # Not awaited: bringing the ring back waits for servers; the lease is renewed meanwhile.
        ecs.start()

    def _deposed(self) -> None:
        ecs, self.ecs = self.ecs, None
        if ecs is not None:
            ecs.abdicate()

    def startService(self) -> None:
        super().startService()
        self.election.start()

    def stopService(self) -> Deferred[Any]:
        """Hand over: the lease is revoked, so a standby leads at once. Unlike a lone ECS, this
        one leaves the servers it launched running, under the next leader (Ctrl-C at a
        terminal reaches them anyway: they share its process group)."""
        super().stopService()
        return Deferred.fromCoroutine(self.election.stop())
