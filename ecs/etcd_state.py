"""The ECS's state in etcd (C{state: etcd}): one JSON document under the cluster's key prefix,
written only by the leader, each write fenced.

Membership, the ring, positions, chain epochs and the highest epoch allocated are one
L{ClusterState}, kept as JSON at ``PREFIX/state``. Every save is an etcd transaction that commits
only if (1) the state is still at the revision this ECS last read or wrote, and (2) the leader
key ``PREFIX/leader`` is attached to this ECS's lease. A deposed leader (its lease expired,
revoked, or another ECS elected since) therefore never commits: its save fails with L{Deposed},
and since the ECS awaits each save before it sends what the save allocated (an epoch, a ring),
nothing it allocated after losing the lead reaches a server.

Saves are applied in the order they are made: each is a snapshot taken when C{save} is called,
sent once the previous save is answered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, fail

from chainstore.logs import get_logger
from ecs.etcd import EtcdClient, get, lease_is, mod_revision_is, put
from ecs.protocol import AdminError
from ecs.state import ClusterState

log = get_logger("ecs.etcd_state")


class Deposed(AdminError):
    """This ECS no longer leads: its change was not committed (an admin sees this message)."""


def state_key(prefix: str) -> bytes:
    return f"{prefix.rstrip('/')}/state".encode()


def leader_key(prefix: str) -> bytes:
    return f"{prefix.rstrip('/')}/leader".encode()


class EtcdState:
    """A L{ecs.state.StateStore} in etcd, for the leader holding C{lease}."""

    def __init__(self, client: EtcdClient, prefix: str, lease: int,
                 on_deposed: Callable[[], None] = lambda: None) -> None:
        self.client = client
        self.key = state_key(prefix)
        self.leader_key = leader_key(prefix)
        self.lease = lease
        self.on_deposed = on_deposed
        #: the state key's revision as this ECS last read or wrote it (0: absent)
        self.revision = 0
        self.deposed = False
        self._loaded: ClusterState | None = None
        self._lock = DeferredLock()

    async def fetch(self) -> ClusterState | None:
        """Read the state (None if no ECS has saved one yet); L{load} returns it afterwards."""
        kv, _ = await self.client.get(self.key)
        if kv is None:
            self.revision = 0
            self._loaded = None
        else:
            self.revision = kv.mod_revision
            self._loaded = ClusterState.from_json(json.loads(kv.value))
        return self._loaded

    def load(self) -> ClusterState | None:
        return self._loaded

    def save(self, state: ClusterState) -> Deferred[None]:
        if self.deposed:
            return fail(Deposed("this ECS is no longer the leader"))
        document = json.dumps(state.to_json(), sort_keys=True).encode()
        return self._lock.run(lambda: Deferred.fromCoroutine(self._commit(document)))

    async def _commit(self, document: bytes) -> None:
        if self.deposed:
            raise Deposed("this ECS is no longer the leader")
        ok, responses = await self.client.txn(
            [mod_revision_is(self.key, self.revision), lease_is(self.leader_key, self.lease)],
            [put(self.key, document)],
            [get(self.leader_key)])
        if not ok:
            # Someone else leads, or wrote the state since we read it: never write again.
            # (So does a save etcd applied whose answer was lost and that was sent again: the
            # revision moved; standing down is the safe way out of that doubt.)
            self.deposed = True
            log.warn("state not saved: this ECS no longer leads (leader key lease or state "
                     "revision changed); standing down")
            self.on_deposed()
            raise Deposed("this ECS is no longer the leader: the change was not committed")
        self.revision = int(responses[0]["response_put"]["header"]["revision"])


def members_prefix(prefix: str) -> bytes:
    """Where each ECS announces itself, under its own lease (the standbys Status lists)."""
    return f"{prefix.rstrip('/')}/ecs/".encode()


def leader_record(name: str, advertise: str, admin: str) -> bytes:
    """The leader key's value: who leads and where servers and admins reach it."""
    return json.dumps({"name": name, "advertise": advertise, "admin": admin},
                      sort_keys=True).encode()


def parse_leader(value: bytes) -> dict[str, Any]:
    try:
        record = json.loads(value)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
