"""The data L{bench.reconfig} loads and reads back: keys and values that name their version,
loading N keys through the chains, and reading keys back from their tails to check that no
acknowledged write was lost."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, FirstError, gatherResults
from twisted.internet.task import deferLater

from bench.cluster import MeasurementFailed
from bench.driver import log
from bench.systems import ChainRouter
from chainstore import protocol
from chainstore.errors import KeyNotFound, NotResponsible, ServerStopped

#: How long loading retries a put that a server refuses because it does not serve yet, and
#: the first and the longest pause between two tries (the pause doubles).
LOAD_RETRY_SECONDS = 30.0
LOAD_BACKOFF = (0.01, 0.5)


def key_of(i: int) -> bytes:
    return b"key%012d" % i


def value_of(key: bytes, size: int, version: int) -> bytes:
    """C{size} bytes that start with C{key/version/}, so a read tells which write it sees."""
    head = b"%s/%d/" % (key, version)
    return (head * (size // len(head) + 1))[:size]


def version_of(value: bytes) -> int:
    return int(value.split(b"/", 2)[1])


async def put_retrying(reactor: Any, router: ChainRouter, key: bytes, value: bytes,
                       give_up_at: float) -> int:
    """Put C{key} to its head, trying again after a growing pause while the server answers
    C{ServerStopped} or C{NotResponsible}; the number of retries it took.

    The ECS reports a ring as serving before every server has taken its order to run (and a
    server started late may not hold the ring yet), so the first puts may be refused. Fails
    with L{MeasurementFailed} if the put is still refused at C{give_up_at} (reactor time)."""
    pause, longest = LOAD_BACKOFF
    retries = 0
    while True:
        try:
            await router.head(key).callRemote(protocol.Put, key=key, value=value)
            return retries
        except (ServerStopped, NotResponsible) as e:
            if reactor.seconds() + pause > give_up_at:
                raise MeasurementFailed(f"a put of {key.decode()} was still refused after "
                                        f"{retries} retries: {type(e).__name__}: {e}") from None
        await deferLater(reactor, pause)
        pause = min(2 * pause, longest)
        retries += 1


async def load(reactor: Any, router: ChainRouter, count: int, value_size: int, inflight: int,
               limit: float, retry_for: float = LOAD_RETRY_SECONDS) -> float:
    """Put C{count} keys (version 0), C{inflight} at a time, each to its head; the seconds.

    A put refused because its server does not serve yet is retried (L{put_retrying}) for up to
    C{retry_for} seconds. Fails once loading has taken more than C{limit} seconds."""
    next_key = iter(range(count))
    started = reactor.seconds()
    done = retried = 0
    step = max(10_000, count // 10)

    async def worker() -> None:
        nonlocal done, retried
        for i in next_key:
            now = reactor.seconds()
            if now - started > limit:
                raise MeasurementFailed(f"loading took more than {limit}s ({done:,} keys so far)")
            key = key_of(i)
            retried += await put_retrying(reactor, router, key, value_of(key, value_size, 0),
                                          min(now + retry_for, started + limit))
            done += 1
            if done % step == 0:
                elapsed = reactor.seconds() - started
                log(f"  loaded {done:,} keys in {elapsed:.1f} s ({done / elapsed:,.0f} puts/s)")

    try:
        await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(inflight)],
                            consumeErrors=True)
    except FirstError as e:
        # The worker's own failure, not the wrapper: the caller reports a MeasurementFailed.
        e.subFailure.raiseException()
    if retried:
        log(f"  {retried:,} puts retried while the servers started serving")
    return reactor.seconds() - started


def keys_to_verify(keys: int, acked: dict[int, int], sample: int,
                   seed: int = 7) -> tuple[list[int], str]:
    """The key indexes to read back and a sentence saying which: every key the writer got
    acknowledged, and every loaded key if there are at most C{sample}, else a seeded uniform
    sample of C{sample} of them."""
    if keys <= sample:
        return list(range(keys)), f"all {keys:,} keys (the {len(acked):,} the writer overwrote " \
                                  "at their last acknowledged version)"
    chosen = set(random.Random(seed).sample(range(keys), sample)) | set(acked)
    return sorted(chosen), (f"{len(chosen):,} keys: the {len(acked):,} the writer overwrote "
                            f"(their last acknowledged version) and a uniform sample of "
                            f"{sample:,} of the {keys:,} loaded (seed {seed})")


async def verify(router: ChainRouter, indexes: list[int], acked: dict[int, int], value_size: int,
                 problems: list[str], inflight: int = 64) -> int:
    """Read each key from its tail: its value must be whole and of the acknowledged version or
    a later one (version 0, the load, for keys the writer never got acknowledged)."""
    todo = iter(indexes)
    lost: list[str] = []

    async def reader() -> None:
        for index in todo:
            key = key_of(index)
            version = acked.get(index, 0)
            try:
                answer = await router.tail(key).callRemote(protocol.Get, key=key)
            except KeyNotFound:
                lost.append(f"{key.decode()} is missing")
                continue
            value = answer["value"]
            seen = version_of(value)
            if value != value_of(key, value_size, seen):
                lost.append(f"{key.decode()} holds a garbled value {value[:40]!r}")
            elif seen < version:
                lost.append(f"{key.decode()} holds version {seen}, {version} was acknowledged")

    results = await DeferredList([Deferred.fromCoroutine(reader()) for _ in range(inflight)],
                                 consumeErrors=True)
    for ok, failure in results:
        if not ok:
            problems.append(f"reading back failed: {failure.value!r}")
    if lost:
        problems.append(f"{len(lost):,} acknowledged writes lost: " + "; ".join(lost[:5]))
    return len(indexes)
