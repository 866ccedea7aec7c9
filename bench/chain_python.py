"""``python -m bench.chain_python``: the CPU of the chain's own Python per put, without the
machine's noise.

Three KVNodes in one process on the tests' simulated network (``tests/simnet.py``: real
KVServerProtocol on both ends, so every Relay box is serialized and parsed as on the wire,
and every batch is applied to SQLite), but no TLS, no sockets, no reactor wake-ups
and no client boxes: puts are handed to the heads' ``KVNode.put``, 32 in flight over the keys of
every range, as ``python -m bench --inflight 32`` loads them. The process's CPU time per put is
the Python (and SQLite) a put costs the three servers together; with ``--replication 1`` each
node is a chain of one, so the difference is what replication adds. Each "turn" delivers every
byte in flight, then runs the calls due (the end of the reactor turn: commit and forward).

The network's Clock keeps its calls in a list it sorts at every ``callLater``, unlike the
reactor's heap: a change that saves ``callLater`` calls looks a little better here than it is.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from simnet import SimNet  # noqa: E402  (tests/simnet.py, not a package)

from chainstore.ring import position  # noqa: E402


class PutLoop:
    """Puts of C{value} to random keys of every range, C{inflight} at a time."""

    def __init__(self, net: SimNet, ring: Any, value: bytes, inflight: int,
                 records: int = 2_000, seed: int = 1) -> None:
        self.net = net
        self.keys = [b"user%08d" % i for i in range(records)]
        self.heads = [net.nodes[ring.nodes[ring.owner_index(position(k))].name]
                      for k in self.keys]
        self.value = value
        self.inflight = inflight
        self.random = random.Random(seed)
        self.issued = self.done = self.limit = 0
        self.failures: list[Any] = []

    def _issue(self) -> None:
        i = self.random.randrange(len(self.keys))
        self.issued += 1
        d = self.heads[i].put(self.keys[i], self.value, b"r%015d" % self.issued)
        d.addCallbacks(self._answered, self.failures.append)

    def _answered(self, _: object) -> None:
        self.done += 1
        if self.issued < self.limit:
            self._issue()

    def run(self, count: int) -> None:
        """C{count} more puts, until every one is answered."""
        self.limit = self.issued + count
        for _ in range(min(self.inflight, count)):
            self._issue()
        while self.done < self.issued and not self.failures:
            self.net.flush()
            self.net.clock.advance(0)
        if self.failures:
            self.failures[0].raiseException()


def measure(puts: int, replication: int, value_bytes: int, inflight: int,
            workdir: Path) -> tuple[float, float]:
    """(CPU µs per put, writes per batch) over C{puts} puts after a warm-up."""
    net = SimNet(workdir)
    ring = net.cluster(3, replication=replication)
    # (The nodes join one at a time: the first ones' dials to the later ones fail, and they
    # dial again RETRY_SECONDS later, in simulated time.)
    net.run(1.0)
    loop = PutLoop(net, ring, b"x" * value_bytes, inflight)
    loop.run(min(puts, 2_000))  # warm up: insert the keys, fill the caches
    net.run(1.0)  # leases

    def sent() -> tuple[int, int]:
        chains = [r for node in net.nodes.values() for r in node.chain.replicas.values()]
        return sum(r.batches_sent for r in chains), sum(r.ops_sent for r in chains)

    batches, writes = sent()
    start = time.process_time()
    loop.run(puts)
    cpu = time.process_time() - start
    batches_after, writes_after = sent()
    for node in net.nodes.values():
        node.chain.stop()
        node.stores.close()
    return cpu / puts * 1e6, (writes_after - writes) / max(batches_after - batches, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chain_python", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--puts", type=int, default=20_000, help="measured puts [20000]")
    parser.add_argument("--replication", type=lambda t: [int(v) for v in t.split(",")],
                        default=[1, 3], help="chain lengths, alternated [1,3]")
    parser.add_argument("--value", type=int, default=100, help="value bytes [100]")
    parser.add_argument("--inflight", type=int, default=32, help="puts in flight [32]")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each [2]")
    args = parser.parse_args(argv)
    print(f"{args.puts} puts of {args.value} B, {args.inflight} in flight, three nodes")
    for run in range(args.repeat):
        for replication in args.replication:
            with tempfile.TemporaryDirectory(prefix="bench-chain-python-") as tmp:
                us, batch = measure(args.puts, replication, args.value, args.inflight,
                                    Path(tmp))
            extra = f", {batch:.1f} writes per batch" if replication > 1 else ""
            print(f"run {run + 1}, replication {replication}: {us:.1f} us CPU per put{extra}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
