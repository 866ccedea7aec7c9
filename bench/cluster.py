"""The cluster that L{bench.reconfig} measures: an ECS config whose joining and leaving servers
head comparable shares of the ring, the ECS's admin commands over AMP, waiting until its ring
serves, and reading the ring and routing by it.

Every connection is mutual TLS with a certificate of the PKI the ECS made (C{admin} for its
admin commands, C{client} for the servers), or plaintext if the ECS runs with tls off."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.task import deferLater
from twisted.protocols import amp

from bench.systems import ChainRouter, amp_connection
from chainstore import protocol
from chainstore.ring import RING_BITS, NodeInfo, Ring
from harness.processes import ECSProcess, ProcessFailed, write_ecs_config
from chainstore.tls import Credentials, load
from ecs import protocol as admin

INITIAL_SERVERS = 3
CACHE_SIZE = 1000
#: A server's stores, in chain order (what its C{Stats} counts as C{<store>_keys}).
STORES = ("coordinator", "replica1", "replica2")


class MeasurementFailed(RuntimeError):
    """The measurement could not finish; the reason is in the message and the logs."""


def share(nodes: Iterable[NodeInfo], node: NodeInfo) -> float:
    """The fraction of the ring C{node} heads among C{nodes}."""
    ring = Ring(tuple(nodes), replication=1)
    rng = ring.range_of(ring.index_of(node.name))
    return ((rng.end - rng.start) % (1 << RING_BITS) or 1 << RING_BITS) / (1 << RING_BITS)


def slot_node(slot: dict[str, Any]) -> NodeInfo:
    return NodeInfo(str(slot["name"]), str(slot["host"]), int(slot["console-port"]),
                    int(slot["amp-port"]))


def pick_leaving(pool: list[NodeInfo], target_share: tuple[float, float]) -> NodeInfo | None:
    """The server of the first three to remove once the fourth has joined: one whose share of
    the four-server ring is within C{target_share} (the one nearest its middle), or None."""
    low, high = target_share
    ring = pool[:INITIAL_SERVERS + 1]
    fits = [n for n in pool[:INITIAL_SERVERS] if low <= share(ring, n) <= high]
    middle = (low + high) / 2
    return min(fits, key=lambda n: abs(share(ring, n) - middle), default=None)


def pool_config(workdir: Path, replication: int, target_share: tuple[float, float],
                failure_timeout: float, attempts: int = 2000,
                **options: object) -> tuple[Path, str]:
    """An ECS config (three initial servers, four slots) whose fourth slot heads a share of
    the ring within C{target_share} once it joins, and the name of one of the first three with
    such a share then (the one to remove), so that runs at different sizes move comparable
    fractions of the data (ring positions hash the ports, drawn afresh for each attempt).
    Further ECS options as keyword arguments with underscores."""
    low, high = target_share
    for _ in range(attempts):
        # Positions from the ports (not the ECS's balanced placement), so that the shares that
        # join and leave can be chosen here.
        path = write_ecs_config(workdir, slots=INITIAL_SERVERS + 1, initial_nodes=INITIAL_SERVERS,
                                replication=replication, heartbeat_interval=1.0,
                                failure_timeout=failure_timeout, cache_size=CACHE_SIZE,
                                placement="hash", **options)
        pool = [slot_node(s) for s in yaml.safe_load(path.read_text())["nodes"]]
        leaving = pick_leaving(pool, target_share)
        if leaving is not None and low <= share(pool, pool[INITIAL_SERVERS]) <= high and \
                min(share(pool[:INITIAL_SERVERS], n) for n in pool[:INITIAL_SERVERS]) >= 0.2:
            return path, leaving.name
    raise MeasurementFailed(f"no pool of free ports gave a joining and a leaving server a share "
                            f"in {target_share}")


# Loaded once per PKI and holder (Credentials reads its files again if they change).
_loaded: dict[tuple[str, str], Credentials] = {}


def credentials_of(ecs: ECSProcess, holder: str) -> Credentials | None:
    """The credentials of C{holder} (C{admin}, C{client}) in C{ecs}'s PKI; None with tls off.
    The ECS makes the PKI on its first start: call this once it has started."""
    files = ecs.tls(holder)
    if files is None:
        return None
    key = (files.cert, files.key)
    if key not in _loaded:
        loaded = load(files)
        assert loaded is not None
        _loaded[key] = loaded
    return _loaded[key]


async def ask_ecs(reactor: Any, ecs: ECSProcess, command: type[amp.Command],
                  **arguments: Any) -> dict[str, Any]:
    """One admin command over a fresh AMP connection (not the blocking L{ECSProcess.call}: a
    thread blocked in a long C{AddNodes} would hold up the reactor's shutdown on Ctrl-C)."""
    proto = await amp_connection(reactor, (ecs.host, ecs.port), credentials_of(ecs, "admin"))
    try:
        return await proto.callRemote(command, **arguments)
    finally:
        proto.transport.loseConnection()


async def status_of(reactor: Any, ecs: ECSProcess) -> dict[str, Any]:
    return json.loads((await ask_ecs(reactor, ecs, admin.Status))["status"])


async def wait_serving(reactor: Any, ecs: ECSProcess, servers: int,
                       timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the ECS serves a ring of C{servers}, every one connected, with no
    reconfiguration under way; its Status.

    The ECS says it serves before every server has taken its C{SetState running}: a request
    sent at once may still be refused (C{ServerStopped}), so the first requests must retry."""
    deadline = reactor.seconds() + timeout
    last: object = "no answer"
    while reactor.seconds() < deadline:
        if not ecs.running:
            raise ProcessFailed(f"the ECS exited:\n{ecs.diagnostics()}")
        try:
            status = await status_of(reactor, ecs)
        except Exception as e:  # not listening yet
            last = e
        else:
            last = status
            connected = {m["name"] for m in status["members"] if m["connected"]}
            if status["serving"] and status["operation"] is None \
                    and len(status["ring"]) == servers and set(status["ring"]) <= connected:
                return status
        await deferLater(reactor, 0.1)
    raise MeasurementFailed(f"the ring did not start serving in {timeout}s (last: {last})")


async def fetch_ring(reactor: Any, node: NodeInfo, credentials: Credentials | None) -> Ring:
    conn = await amp_connection(reactor, (node.host, node.amp_port), credentials)
    try:
        return protocol.ring_from_wire(await conn.callRemote(protocol.GetMetadata))
    finally:
        conn.transport.loseConnection()


async def router_for(reactor: Any, ring: Ring, conns: dict[str, Any],
                     credentials: Credentials | None) -> ChainRouter:
    """A router for C{ring}, reusing C{conns} and dialing the servers it lacks (into C{conns})
    with C{credentials}."""
    for node in ring.live_nodes:
        if node.name not in conns:
            conns[node.name] = await amp_connection(reactor, (node.host, node.amp_port),
                                                    credentials)
    return ChainRouter(ring, conns, credentials)
