"""The ECS's durable state: membership, the ring's members and the epoch.

Saved atomically (write to a temporary file, fsync, rename) after every change, so a restarted
ECS resumes the same ring and never hands out an epoch it has handed out before: every epoch is
allocated and saved *before* it is sent to any server.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed

from chainstore.ring import NodeInfo, Ring

# Member status: launching (spawned, not yet registered), idle (registered, not in the ring),
# active (in the ring), failed (missed its heartbeats; out of the ring), removed (left cleanly).
LAUNCHING, IDLE, ACTIVE, FAILED, REMOVED = "launching", "idle", "active", "failed", "removed"


@dataclass
class Member:
    name: str
    host: str
    console_port: int
    amp_port: int
    status: str = IDLE
    #: "pool" if the ECS launched it from a node slot, "operator" if it registered by itself
    origin: str = "operator"
    cache_strategy: str = ""
    cache_size: int = 0
    #: the ring position the ECS placed it at while it is in the ring (None: the MD5 of its
    #: console address, as with placement "hash" or a state saved before placements existed)
    token: int | None = None
    #: while it is in the ring: the epoch at which the chain of the range it heads was formed
    chain_epoch: int = 0
    #: while it is a dead ring member: the epoch in which the ECS marked it dead (0 otherwise,
    #: and in a state saved before this was kept). Of a chain whose members are all dead, the
    #: one that left last holds every write the chain acknowledged (see ecs.failures).
    left_at: int = 0

    @property
    def info(self) -> NodeInfo:
        return NodeInfo(self.name, self.host, self.console_port, self.amp_port, token=self.token,
                        chain_epoch=self.chain_epoch)


@dataclass
class ClusterState:
    #: the epoch of the committed ring below
    epoch: int = 0
    #: the highest epoch ever allocated (>= epoch): an aborted change burns its epoch
    last_epoch: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    #: names of the servers in the ring, in the order they joined
    ring_members: list[str] = field(default_factory=list)
    #: ring members that failed and are not yet repaired away: skipped in chains
    dead: set[str] = field(default_factory=set)
    #: whether the service as a whole is started (servers answer clients)
    serving: bool = False
    replication: int = 1
    #: whether a ring was ever committed: an ECS restarted before then starts its initial
    #: servers again, as on a first start, instead of resuming an empty ring
    formed: bool = False
    #: the longest failure timeout an ECS of this state answered a server's Alive with: a
    #: server's leases end by it (chainstore/chain.py, the lease bound), so an ECS restarted
    #: with a shorter one declares nobody failed before this has passed (0: not known)
    failure_timeout: float = 0.0

    def __post_init__(self) -> None:
        self.formed = self.formed or bool(self.ring_members)

    def allocate_epoch(self) -> int:
        self.last_epoch = max(self.last_epoch, self.epoch) + 1
        return self.last_epoch

    def ring(self) -> Ring:
        return Ring(tuple(self.members[n].info for n in self.ring_members),
                    epoch=self.epoch, replication=self.replication,
                    dead=frozenset(self.dead & set(self.ring_members)))

    @property
    def live_members(self) -> list[str]:
        return [n for n in self.ring_members if n not in self.dead]

    def departures(self) -> dict[str, int]:
        """The epoch in which each dead ring member was marked dead (see L{Member.left_at})."""
        return {n: self.members[n].left_at for n in self.ring_members
                if n in self.dead and n in self.members}

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "last_epoch": self.last_epoch,
            "serving": self.serving,
            "replication": self.replication,
            "failure_timeout": self.failure_timeout,
            "ring_members": list(self.ring_members),
            "formed": self.formed,
            "dead": sorted(self.dead),
            "members": [asdict(m) for m in self.members.values()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterState:
        members = {m["name"]: Member(**m) for m in data.get("members", [])}
        ring_members = list(data.get("ring_members", []))
        # A state saved before this was kept: formed unless nothing ever got past launching.
        formed = data.get("formed", bool(ring_members) or any(
            m.status not in (LAUNCHING, FAILED) for m in members.values()))
        return cls(epoch=int(data["epoch"]), last_epoch=int(data.get("last_epoch", data["epoch"])),
                   members=members, ring_members=ring_members,
                   dead=set(data.get("dead", [])),
                   serving=bool(data.get("serving", False)),
                   replication=int(data.get("replication", 1)), formed=bool(formed),
                   failure_timeout=float(data.get("failure_timeout", 0.0)))


class StateStore(Protocol):
    """Where the ECS keeps its L{ClusterState}: L{StateFile} (one ECS) or
    L{ecs.etcd_state.EtcdState} (several, one leader). C{save} fires once the state is durable
    (and, with etcd, committed by the leader: it fails if this ECS no longer leads); the ECS
    awaits it before it sends anything the state allocated, such as an epoch."""

    def load(self) -> ClusterState | None: ...

    def save(self, state: ClusterState) -> Deferred[None]: ...


class StateFile:
    """The state in one JSON file (C{state: file}, the default)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> ClusterState | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return ClusterState.from_json(json.load(f))
        except FileNotFoundError:
            return None

    def save(self, state: ClusterState) -> Deferred[None]:
        """Write C{state} now (the Deferred has fired when this returns)."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state.to_json(), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return succeed(None)
