"""The workload of a torture run: concurrent clients on a few shared keys, every operation
recorded in a L{torture.history.History}.

Each client is a coroutine in the harness's reactor with its own L{client.kvstore.KVStore}, so
the clients share nothing but the cluster. They pick keys from a small set (operations collide),
write values that are unique in the run (a read names the write it saw), and pause a little
between operations (a bounded rate).

Outcomes, as the library finally reports them after its own retries (see
L{torture.history.classify_error} with C{single_attempt=False}): an answer is C{ok}; KeyNotFound
is an ok get of nothing or an ok delete that found nothing; InvalidKey and ValueTooLarge are
C{fail}; every other error is C{unknown}. A get that ends unknown constrains nothing (the
checkers drop it). A delete answered KeyNotFound may be a retry of a delete that did apply, so
the checkers are run with C{delete_answers_observe=False}.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from chainstore.logs import get_logger
from chainstore.tls import Credentials
from client.kvstore import KVStore
from torture.history import DELETE, GET, OK, PUT, UNKNOWN, History, classify_error

log = get_logger("torture.workload")

#: The process number of the harness's own final reads in the history.
FINAL_READER = 0


@dataclass(frozen=True)
class WorkloadConfig:
    """What the clients do: C{clients} of them on C{keys} keys; of their operations
    C{put_ratio} are puts and C{delete_ratio} deletes, the rest gets; each pauses uniformly in
    C{pause} seconds between operations. C{timeout} is the library's per-request timeout,
    C{deadline} the most one operation may take with its retries. C{read_policy}: where the
    library sends gets (C{"any"}: a member of the key's chain; with only a few keys, each takes
    a large share of a client's gets, so the library sends them to every member in turn)."""

    clients: int = 6
    keys: int = 10
    put_ratio: float = 0.5
    delete_ratio: float = 0.1
    pause: tuple[float, float] = (0.005, 0.03)
    timeout: float = 2.0
    deadline: float = 5.0
    read_policy: str = "any"

    def key_names(self) -> list[bytes]:
        return [b"k%02d" % i for i in range(self.keys)]


@dataclass
class Counts:
    """Operations per (kind, outcome), as they completed."""

    by: Counter[tuple[str, str]] = field(default_factory=Counter)

    def outcome(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.by.items() if o == outcome)


class Workload:
    """C{config.clients} clients running until L{stop}; the history records every operation.

    @param endpoint_factory: how the clients dial the servers (through the fault proxies);
        it does TLS itself (L{torture.proxy.ProxyFabric.endpoint_factory}).
    @param tls: the clients' credentials when they dial directly (no C{endpoint_factory});
        None: plaintext.
    @param rng: the source of every choice (keys, kinds, pauses): a seeded run repeats them.
    """

    def __init__(self, reactor: Any, history: History, addresses: Sequence[tuple[str, int]],
                 config: WorkloadConfig, rng: random.Random, endpoint_factory: Any = None,
                 run_tag: str = "", tls: Credentials | None = None) -> None:
        self.reactor = reactor
        self.history = history
        self.addresses = list(addresses)
        self.config = config
        self.keys = config.key_names()
        self.endpoint_factory = endpoint_factory
        self.tls = tls
        # One generator per client, seeded from the run's: the choices of a client do not
        # depend on how the others' operations interleave with it.
        self._rngs = [random.Random(rng.random()) for _ in range(config.clients)]
        self.run_tag = run_tag
        self.counts = Counts()
        self._stopping = False
        self._loops: list[Deferred[None]] = []
        self._stores: list[KVStore] = []

    def start(self) -> None:
        for number in range(1, self.config.clients + 1):
            store = KVStore(self.reactor, self.addresses, timeout=self.config.timeout,
                            deadline=self.config.deadline,
                            endpoint_factory=self.endpoint_factory, tls=self.tls,
                            random=random.Random(self._rngs[number - 1].random()),
                            read_policy=self.config.read_policy)
            self._stores.append(store)
            self._loops.append(Deferred.fromCoroutine(self._client(number, store)))

    @property
    def stopped(self) -> bool:
        """Whether L{stop} was called."""
        return self._stopping

    async def stop(self) -> None:
        """Ask every client to stop after its current operation; return once all have (each
        operation ends within the library's deadline) and their connections are closed."""
        self._stopping = True
        await gatherResults(self._loops, consumeErrors=True)
        await gatherResults([s.close() for s in self._stores], consumeErrors=True)

    async def _client(self, number: int, store: KVStore) -> None:
        rng = self._rngs[number - 1]
        seq = 0
        while not self._stopping:
            seq += 1
            key = rng.choice(self.keys)
            dice = rng.random()
            if dice < self.config.put_ratio:
                value = f"{self.run_tag}p{number}-{seq}".encode("ascii")
                await record(self.history, self.counts, number, PUT, key,
                             lambda: store.put(key, value), value)
            elif dice < self.config.put_ratio + self.config.delete_ratio:
                await record(self.history, self.counts, number, DELETE, key,
                             lambda: store.delete(key))
            else:
                await record(self.history, self.counts, number, GET, key,
                             lambda: store.get(key))
            low, high = self.config.pause
            await deferLater(self.reactor, rng.uniform(low, high), lambda: None)


async def record(history: History, counts: Counts, process: int, kind: str, key: bytes,
                 call: Any, value: bytes | None = None) -> tuple[str, bytes | None]:
    """Invoke C{call()} (a Deferred-returning client call) as operation C{kind} of C{process}
    and record its invocation and outcome; return (outcome, the value a get read)."""
    handle = history.invoke(process, kind, key, value)
    try:
        result = await call()
    except Exception as e:
        outcome, missing = classify_error(kind, e, single_attempt=False)
        if outcome == UNKNOWN:
            log.debug("p{process} {kind} {key}: {error}", process=process, kind=kind,
                      key=key, error=e)
        history.complete(handle, outcome, None, missing=missing)
        counts.by[(kind, outcome)] += 1
        return outcome, None
    read = bytes(result) if kind == GET else None
    history.complete(handle, OK, read)
    counts.by[(kind, OK)] += 1
    return OK, read


async def final_reads(reactor: Any, history: History, addresses: Sequence[tuple[str, int]],
                      keys: Sequence[bytes], *, attempts: int = 5, timeout: float = 2.0,
                      deadline: float = 10.0,
                      tls: Credentials | None = None) -> dict[bytes, bytes | None]:
    """Read every key once more (after healing and recovery), recorded in the history as
    process L{FINAL_READER}, straight from the servers (no proxy) with the client credentials
    C{tls} (None: plaintext); a read that ends without an answer is retried, at most
    C{attempts} times. Returns key -> value (C{None}: absent) for every key that was read."""
    store = KVStore(reactor, addresses, timeout=timeout, deadline=deadline, tls=tls)
    counts = Counts()
    found: dict[bytes, bytes | None] = {}
    try:
        for key in keys:
            for _ in range(attempts):
                outcome, value = await record(history, counts, FINAL_READER, GET, key,
                                              lambda k=key: store.get(k))
                if outcome == OK:
                    found[key] = value
                    break
    finally:
        await store.close()
    return found


__all__ = ["FINAL_READER", "Counts", "Workload", "WorkloadConfig", "final_reads",
           "record"]
