"""A simulated network of KVNodes for deterministic tests: iosim connections, a Clock.

Every node gets a C{connect} that opens an iosim pair to the target node's real
L{KVServerProtocol}, so chain replication crosses the real AMP wire format. Nothing moves until
the test calls L{SimNet.flush} (deliver all bytes) or L{SimNet.run} (deliver and advance time);
links can be cut (C{partition}) to simulate failures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.protocols.amp import AMP
from twisted.test import iosim

from chainstore.amp_server import KVServerProtocol
from chainstore.cache import make_cache
from chainstore.node import KVNode
from chainstore.ring import NodeInfo, Ring
from chainstore.storage import StoreSet


class PeerAMP(AMP):
    """The dialling side of a peer connection, telling the pool when it is lost (as
    L{chainstore.peers}' own protocol does)."""

    lost: Any = None

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if self.lost is not None:
            self.lost()


def node_info(i: int) -> NodeInfo:
    return NodeInfo(f"n{i}", "127.0.0.1", 50000 + i, 51000 + i)


class SimNet:
    def __init__(self, tmp_path: Path, clock: Clock | None = None) -> None:
        self.tmp_path = tmp_path
        self.clock = clock or Clock()
        self.nodes: dict[str, KVNode] = {}
        # (from, to, pump); cut links stop delivering and refuse new connections
        self.links: list[tuple[str, str, iosim.IOPump]] = []
        self.cut: set[frozenset[str]] = set()
        self.down: set[str] = set()

    def add(self, info: NodeInfo, ring: Ring, cache_size: int = 100) -> KVNode:
        node = KVNode(info, make_cache("LRU", cache_size), self.clock, ring=ring,
                      connect=lambda target, src=info.name: self._connect(src, target))
        node.stores = StoreSet.open(str(self.tmp_path / info.name))
        self.nodes[info.name] = node
        return node

    def cluster(self, count: int, replication: int = 3, epoch: int = 1) -> Ring:
        infos = [node_info(i) for i in range(count)]
        ring = Ring(tuple(infos), epoch=epoch, replication=replication)
        for info in infos:
            self.add(info, ring)
        return ring

    def _connect(self, source: str, target: NodeInfo) -> Deferred[AMP]:
        node = self.nodes.get(target.name)
        if node is None or target.name in self.down or frozenset((source, target.name)) in self.cut:
            return fail(ConnectionRefusedError(target.name))
        client = PeerAMP()
        server = KVServerProtocol(node)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                             iosim.makeFakeClient(client), greet=False, clock=self.clock)
        self.links.append((source, target.name, pump))
        return succeed(client)

    def flush(self) -> None:
        """Deliver bytes on every live link until nothing moves."""
        for _ in range(10_000):
            moved = False
            for source, target, pump in list(self.links):
                if self._alive(source, target) and pump.pump():
                    moved = True
            if not moved:
                return
        raise AssertionError("the network never went quiet")

    def _alive(self, source: str, target: str) -> bool:
        return (source not in self.down and target not in self.down
                and frozenset((source, target)) not in self.cut)

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Deliver, advance the clock by C{step}, repeat for C{seconds} of simulated time."""
        elapsed = 0.0
        while elapsed < seconds:
            self.flush()
            self.clock.advance(step)
            elapsed += step
        self.flush()

    def settle(self, d: Deferred[Any], seconds: float = 30.0) -> Any:
        """Run until C{d} fires; its result (or raise its failure)."""
        results: list[Any] = []
        d.addBoth(results.append)
        elapsed = 0.0
        while not results and elapsed < seconds:
            self.flush()
            self.clock.advance(0.05)
            elapsed += 0.05
        self.flush()
        assert results, f"did not fire within {seconds}s of simulated time"
        result = results[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result

    def kill(self, name: str) -> None:
        """The node stops answering: its links drop and it refuses new connections."""
        self.down.add(name)
        for source, target, pump in self.links:
            if name in (source, target):
                pump.clientIO.loseConnection()
                pump.serverIO.loseConnection()
        for source, target, pump in self.links:
            if name in (source, target):
                pump.pump()
        self.links = [(s, t, p) for s, t, p in self.links if name not in (s, t)]

    def restart(self, info: NodeInfo, ring: Ring) -> KVNode:
        """A new process for C{info} on the same files (call L{kill} or cut its links first)."""
        old = self.nodes[info.name]
        old.chain.stop()
        old.stores.close()
        self.down.discard(info.name)
        return self.add(info, ring)

    def set_ring(self, ring: Ring, order: list[str] | None = None) -> None:
        for name in order or list(self.nodes):
            if name not in self.down:
                self.nodes[name].set_ring(ring)

    def close(self) -> None:
        for node in self.nodes.values():
            node.chain.stop()
            if node.stores is not None:
                node.stores.close()
