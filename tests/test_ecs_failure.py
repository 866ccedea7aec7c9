"""Server faults under a real ECS: a server killed (SIGKILL) or frozen (SIGSTOP) past the timeout.

The ECS (pool of five, three servers, replication 1, heartbeats every 0.3 s, failure timeout
1.5 s) must notice within the failure timeout plus two heartbeat intervals, commit a ring without
the server under a new epoch, and keep serving every other key. Without replicas the failed
server's own keys are gone, and the tests assert exactly that: its keys are missing and every
other key is intact. A frozen server that wakes up must stop serving its old range once it hears
of the new ring.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from chainstore import protocol
from chainstore.errors import KeyNotFound, NotResponsible, ServerStopped
from test_ecs_integration import (
    FAILURE_TIMEOUT,
    HEARTBEAT,
    POLL,
    TIMEOUT,
    amp_client,
    assert_all_readable,
    assert_placement,
    ecs_status,
    keys,
    kvserver_pids,
    library,
    put_all,
    ring_of,
    start_ecs,
    stop_pids,
    value_for,
    wait_status,
)

# Real processes (integration) that the tests kill or freeze (fault).
pytestmark = [pytest.mark.integration, pytest.mark.fault]

# A server silent since just after its last answered heartbeat is failed one failure timeout
# later, seen at the next heartbeat round; one more interval covers the ring change itself.
DETECTION_BOUND = FAILURE_TIMEOUT + 2 * HEARTBEAT


@pytest.fixture
def cluster(tmp_path):
    ecs = start_ecs(tmp_path)
    frozen: list[int] = []
    try:
        yield ecs, frozen
    finally:
        # A stopped process ignores SIGTERM until it is continued.
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        ecs.stop()
        stop_pids(list(kvserver_pids(tmp_path)))


async def loaded(ecs: Any, reactor: Any, count: int = 1500) -> tuple[Any, dict[bytes, bytes],
                                                                      dict[str, Any]]:
    store = library(ecs, reactor)
    data = {key: value_for(key) for key in keys(count)}
    await put_all(reactor, store, data)
    return store, data, await ecs_status(reactor, ecs)


async def wait_failed(reactor: Any, ecs: Any, victim: str, before: dict[str, Any],
                      since: float) -> tuple[dict[str, Any], float]:
    """Poll C{Status} until C{victim} is failed and out of a newer ring; (status, seconds)."""
    deadline = since + DETECTION_BOUND + 5.0  # fail with the status, not a hang, if too slow
    while True:
        status = await ecs_status(reactor, ecs)
        members = {m["name"]: m for m in status["members"]}
        if members[victim]["status"] == "failed" and victim not in status["ring"]:
            return status, reactor.seconds() - since
        assert reactor.seconds() < deadline, f"{victim} not failed in time: {status}"
        await deferLater(reactor, POLL)


def owned_by(ecs: Any, status: dict[str, Any], data: dict[bytes, bytes],
             name: str) -> dict[bytes, bytes]:
    ring = ring_of(ecs, status)
    return {k: v for k, v in data.items() if ring.head(k).name == name}


async def assert_missing(reactor: Any, store: Any, lost: dict[bytes, bytes]) -> None:
    for key in lost:
        with pytest.raises(KeyNotFound):
            await store.get(key)


@pytest_twisted.ensureDeferred
async def test_a_killed_server_is_failed_in_time_and_only_its_keys_are_lost(cluster, reactor):
    ecs, _ = cluster
    store, data, before = await loaded(ecs, reactor)
    try:
        victim = "server2"
        lost = owned_by(ecs, before, data, victim)
        kept = {k: v for k, v in data.items() if k not in lost}
        assert lost and kept
        pid = ecs.server_pids()[victim][0]
        assert kvserver_pids(ecs.workdir)[pid] == victim

        killed_at = reactor.seconds()
        os.kill(pid, signal.SIGKILL)
        status, seconds = await wait_failed(reactor, ecs, victim, before, killed_at)
        # Noticed neither before the timeout (less the heartbeat it may have answered just
        # before dying) nor later than the bound.
        assert FAILURE_TIMEOUT - HEARTBEAT <= seconds <= DETECTION_BOUND, seconds
        assert status["epoch"] > before["epoch"]
        assert status["ring"] == [n for n in before["ring"] if n != victim]
        assert status["serving"]
        # The repair may still be finishing (its drops) when the ring shows it: let it end.
        await wait_status(reactor, ecs, lambda s: s["operation"] is None, timeout=10,
                          what="the repair done")

        await assert_all_readable(reactor, store, kept)
        await assert_missing(reactor, store, lost)
        await assert_placement(reactor, ecs, status, kept, skip={victim})
        # The range it headed now belongs to a live server, which takes new writes for it.
        key = next(iter(lost))
        assert await store.put(key, b"written again") is False
        assert await store.get(key) == b"written again"
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_frozen_server_leaves_the_ring_and_stops_serving_its_old_range(cluster, reactor):
    ecs, frozen = cluster
    store, data, before = await loaded(ecs, reactor)
    try:
        victim = "server3"
        lost = owned_by(ecs, before, data, victim)
        kept = {k: v for k, v in data.items() if k not in lost}
        pid = ecs.server_pids()[victim][0]
        node = ring_of(ecs, before).node(victim)

        stopped_at = reactor.seconds()
        os.kill(pid, signal.SIGSTOP)
        frozen.append(pid)
        status, seconds = await wait_failed(reactor, ecs, victim, before, stopped_at)
        assert FAILURE_TIMEOUT - HEARTBEAT <= seconds <= DETECTION_BOUND, seconds
        assert status["ring"] == [n for n in before["ring"] if n != victim]
        failed_epoch = status["epoch"]
        await wait_status(reactor, ecs, lambda s: s["operation"] is None, timeout=10,
                          what="the repair done")
        # The library would wait for the frozen server, which holds the connection open, until
        # its request timeout (it does not retry a timed-out request): give it the new ring.
        assert (await store.refresh_metadata()).epoch == failed_epoch
        await assert_all_readable(reactor, store, kept)
        await assert_missing(reactor, store, lost)

        # Awake again, it reconnects to the ECS, learns the ring without itself, and from then
        # on refuses its old keys (not responsible, or stopped: it is idle now).
        os.kill(pid, signal.SIGCONT)
        continued_at = reactor.seconds()
        proto = await amp_client(reactor, node.host, node.amp_port, ecs.tls("client"))
        probe_keys = list(lost)[:20]
        refused_at = None
        try:
            for _ in range(1000):  # bounded by count and by the deadline below
                assert reactor.seconds() - continued_at < 5.0, \
                    f"{victim} still serves its old range 5 s after waking up"
                try:
                    await proto.callRemote(protocol.Get, key=probe_keys[0]) \
                        .addTimeout(TIMEOUT, reactor)
                except (NotResponsible, ServerStopped):
                    refused_at = reactor.seconds()
                    break
                await deferLater(reactor, POLL)
            assert refused_at is not None
            # And it keeps refusing, every key of its old range, reads and writes alike.
            for key in probe_keys:
                with pytest.raises((NotResponsible, ServerStopped)):
                    await proto.callRemote(protocol.Get, key=key).addTimeout(TIMEOUT, reactor)
                with pytest.raises((NotResponsible, ServerStopped)):
                    await proto.callRemote(protocol.Put, key=key, value=b"stale") \
                        .addTimeout(TIMEOUT, reactor)
        finally:
            proto.transport.loseConnection()

        # It came back as an idle member: the ring and its epoch stay as the failure left them.
        status = await ecs_status(reactor, ecs)
        members = {m["name"]: m for m in status["members"]}
        assert members[victim]["status"] == "idle" and members[victim]["connected"], status
        assert status["ring"] == [n for n in before["ring"] if n != victim]
        assert status["epoch"] == failed_epoch
        await assert_all_readable(reactor, store, kept)
        await assert_missing(reactor, store, lost)
        await assert_placement(reactor, ecs, status, kept, skip={victim})
    finally:
        await store.close()
