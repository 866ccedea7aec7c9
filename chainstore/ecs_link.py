"""A KVServer's link to the ECS: register, then obey the ECS's control commands.

The server dials the ECS (``--ecs``) and keeps that connection up with reconnect and back-off
(``ClientService``). On every connection it sends C{Register}; the ECS then drives the server over
the same connection. While the ECS is unreachable the server keeps serving on the ring it last
received.

With several ECS (``--ecs`` a list: one leads, the others stand by) the server dials them in
turn; a standby refuses C{Register} with L{control.NotLeader} naming the leader, which is dialled
next. A leader silent for L{LEADER_SILENCE} seconds (paused, or cut off) is hung up on, so the
server finds the next leader. Whatever the ECS, the server refuses control commands from one
whose epoch is behind the newest epoch it has seen (a deposed leader): C{Heartbeat} and
C{SetMetadata} carry the ECS's epoch, and the C{Register} answer its newest committed one.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.protocols import amp
from zope.interface import implementer

from chainstore import control, migration, tls
from chainstore.bounds import BoundedAMP
from chainstore.protocol import ring_from_wire
from chainstore.logs import get_logger
from chainstore.metrics import heartbeat_report
from chainstore.node import RUNNING, STOPPED, KVNode
from chainstore.ring import KeyRange
from chainstore.roles import ECS, SERVER, DialledAMP, RoleGuard, allow

log = get_logger("chainstore.ecs_link")

#: Seconds a copy's target has to confirm one batch before the copy fails.
COPY_BATCH_TIMEOUT = 30.0

#: With several ECS: seconds without a heartbeat after which the server hangs up on its ECS
#: and dials the next (the ECS heartbeats every second by default).
LEADER_SILENCE = 3.0

#: Control commands that carry the ECS's epoch; the others are fenced by the link's epoch.
_EPOCH_CARRIERS = ("Heartbeat", "SetMetadata")


class ServerControlProtocol(BoundedAMP, RoleGuard):
    """The server's end of the ECS connection: only the ECS's certificate may drive it."""

    command_roles = allow((ECS,), (
        control.Heartbeat, control.SetMetadata, control.SetState, control.LockRanges,
        control.UnlockRanges, control.TrackWrites, control.StopTracking, control.DrainWrites,
        control.CopyRange, control.MoveLocal, control.DropRange, control.ClearStores,
        control.Shutdown))
    peer_roles = frozenset({ECS})

    def __init__(self, node: KVNode, reactor: Any, shutdown: Callable[[], None],
                 connect_peer: Callable[[str, int], Deferred[amp.AMP]] | None = None,
                 credentials: tls.Credentials | None = None,
                 endpoints: LeaderEndpoints | None = None) -> None:
        super().__init__()
        self.node = node
        # several ECS: where a standby's NotLeader points, and the silence watch
        self.endpoints = endpoints
        self._silence: Any = None
        #: the newest epoch this link's ECS has shown (None: none yet)
        self.ecs_epoch: int | None = None
        self.reactor = reactor
        self.shutdown = shutdown
        self.credentials = credentials
        # How a copy reaches the target server's AMP port; tests pass an in-memory connector.
        self.connect_peer = connect_peer or self._dial
        # write tracker -> the chain's request-id mark when it began
        self._request_marks: dict[int, int] = {}
        # copies and local moves running for the ECS on this link, cancelled if it drops
        self._running: set[Deferred[Any]] = set()
        # the locks this link set and has not lifted: (reads, the range object in its list)
        self._locks: list[tuple[bool, KeyRange]] = []
        # Alive every ALIVE_SECONDS once registered (the lease bound, chainstore/chain.py)
        self._alive = LoopingCall(self._send_alive)
        self._alive.clock = reactor

    def _dial(self, host: str, port: int) -> Deferred[amp.AMP]:
        # A copy's target checks our server certificate; we check its name is the host.
        return connectProtocol(
            tls.client_endpoint(self.reactor, self.credentials, host, port, 10),
            DialledAMP((SERVER,)))

    def connectionLost(self, reason: Any) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if self._alive.running:
            self._alive.stop()
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        # Any change the ECS was making through this link fails on its side when the link
        # drops, and it aborts, or it had committed and its new ring did not get here. Which
        # one, only the ECS knows: the locks stay until it tells this server its ring over a
        # new link (an old tail that dropped its read lock here would answer reads the new
        # chain has overwritten, for as long as its lease lasts).
        self.node.orphaned_locks.extend(self._locks)
        self._locks = []
        # Write trackers and running copies serve only the change itself, which is over.
        if self.node.stores is not None:
            for store in self.node.stores.stores.values():
                store.trackers.clear()
        # Nor may its copies and moves: the retry wipes their targets first, and a batch sent
        # after that would bring back stale or deleted keys. (A target also refuses batches of
        # an attempt it was not last prepared for, for a source that never sees the drop.)
        for running in list(self._running):
            running.cancel()

    def _run(self, coroutine: Any) -> Deferred[Any]:
        """Run a copy or a move for the ECS; it is cancelled if this link drops."""
        d = Deferred.fromCoroutine(coroutine)
        if not d.called:
            self._running.add(d)
            d.addBoth(self._ended, d)
        return d

    def _ended(self, result: Any, d: Deferred[Any]) -> Any:
        self._running.discard(d)
        return result

    def _watch(self) -> None:
        """(Re)arm the silence watch: with several ECS, a silent one is hung up on."""
        if self.endpoints is None or len(self.endpoints.endpoints) < 2:
            return
        if self._silence is not None and self._silence.active():
            self._silence.reset(LEADER_SILENCE)
            return
        self._silence = self.reactor.callLater(LEADER_SILENCE, self._silent)

    def _silent(self) -> None:
        log.warn("no heartbeat from the ECS for {s}s: dialling the next ECS", s=LEADER_SILENCE)
        if self.transport is not None:
            self.transport.abortConnection()

    def _seen(self, epoch: int) -> None:
        """Refuse (L{control.StaleEpoch}) an ECS behind the newest epoch this server has seen;
        else remember its epoch for the link's other commands."""
        if epoch < self.node.ring.epoch:
            raise control.StaleEpoch(
                f"this ECS is at epoch {epoch}, this server has seen epoch "
                f"{self.node.ring.epoch}: it is not the leader any more")
        self.ecs_epoch = max(epoch, self.ecs_epoch or 0)

    def locateResponder(self, name: bytes) -> Any:
        responder = super().locateResponder(name)
        if responder is None or name.decode("ascii", "replace") in _EPOCH_CARRIERS:
            return responder

        def fenced(box: Any) -> Any:
            epoch = self.ecs_epoch
            if epoch is not None and epoch < self.node.ring.epoch:
                log.warn("refused {command} from an ECS at epoch {epoch}: this server has "
                         "seen epoch {newest}", command=name.decode("ascii", "replace"),
                         epoch=epoch, newest=self.node.ring.epoch)
                return fail(amp.RemoteAmpError(
                    control.CONTROL_ERRORS[control.StaleEpoch],
                    f"this ECS is at epoch {epoch}, this server has seen epoch "
                    f"{self.node.ring.epoch}: it is not the leader any more"))
            return responder(box)

        return fenced

    def connectionMade(self) -> None:
        super().connectionMade()
        self._watch()
        me = self.node.me
        d = self.callRemote(control.Register, name=me.name, host=me.host,
                            console_port=me.console_port, amp_port=me.amp_port,
                            epoch=self.node.ring.epoch)
        d.addCallbacks(self._registered, self._refused)

    def _registered(self, result: dict[str, Any]) -> None:
        epoch = result.get("ecs_epoch")
        if epoch is not None:
            try:
                self._seen(epoch)
            except control.StaleEpoch as e:
                log.warn("hanging up on the ECS: {why}", why=e)
                self.transport.loseConnection()
                return
        log.info("registered with the ECS: {message}", message=result["message"])
        if not self._alive.running:
            self._alive.start(control.ALIVE_SECONDS, now=True).addErrback(
                lambda f: log.failure("the Alive loop stopped", f))

    def _send_alive(self) -> None:
        chain = self.node.chain
        sent = chain.monotonic()
        d = self.callRemote(control.Alive)
        d.addTimeout(control.ALIVE_SECONDS * 2, self.reactor)
        d.addCallbacks(lambda answer: chain.ecs_contact(sent, answer["timeout"]),
                       lambda f: log.debug("Alive unanswered: {error}",
                                           error=f.getErrorMessage()))

    def _refused(self, failure: Any) -> None:
        if failure.check(control.NotLeader):
            leader = re.search(r"the leader is (\S+)$", failure.getErrorMessage())
            if leader and self.endpoints is not None:
                self.endpoints.follow(leader.group(1))
            log.info("{error}: dialling the leader", error=failure.getErrorMessage())
        else:
            log.error("the ECS refused this server: {error}", error=failure.getErrorMessage())
        self.transport.loseConnection()

    @control.Heartbeat.responder
    def heartbeat(self, epoch: int) -> dict[str, Any]:
        self._seen(epoch)
        self._watch()
        return {"epoch": self.node.ring.epoch, "state": self.node.state,
                "report": json.dumps(heartbeat_report(self.node))}

    @control.SetMetadata.responder
    def set_metadata(self, **wire: Any) -> dict[str, Any]:
        ring = ring_from_wire(wire)
        self.node.set_ring(ring)
        self.ecs_epoch = max(ring.epoch, self.ecs_epoch or 0)
        # A newer ring lifted every lock: forget ours, so the list stays as short as the locks.
        self._locks = [(reads, rng) for reads, rng in self._locks if self.node.holds(reads, rng)]
        released = self.node.release_orphaned_locks()
        if released:
            log.info("epoch {epoch}: lifted {count} locks left by the ECS's previous link",
                     epoch=ring.epoch, count=released)
        return {}

    @control.SetState.responder
    def set_state(self, state: str) -> dict[str, Any]:
        if state not in (RUNNING, STOPPED):
            raise control.ControlFailed(f"unknown state {state!r}")
        if self.node.failure is not None:
            # A server whose storage failed never serves again (it drops this link too).
            raise control.ControlFailed(self.node.failure)
        if state != self.node.state:
            log.info("now {state}", state=state)
        self.node.state = state
        return {}

    @control.LockRanges.responder
    def lock_ranges(self, ranges: list[dict[str, int]], reads: bool) -> dict[str, Any]:
        locks = self.node.read_locks if reads else self.node.write_locks
        for r in ranges:
            rng = KeyRange(r["start"], r["end"])
            locks.append(rng)
            self._locks.append((reads, rng))
        return {}

    @control.UnlockRanges.responder
    def unlock_ranges(self, ranges: list[dict[str, int]], reads: bool) -> dict[str, Any]:
        for r in ranges:
            wanted = KeyRange(r["start"], r["end"])
            # Only a lock this link set: one of a dropped link's waits for the ring.
            mine = next((i for i, (r_reads, rng) in enumerate(self._locks)
                         if r_reads == reads and rng == wanted), None)
            if mine is not None:
                self.node.unlock(*self._locks.pop(mine))
        return {}

    @control.TrackWrites.responder
    def track_writes(self, store: str, start: int, end: int) -> dict[str, Any]:
        tracker = migration.start_tracking(self._store(store), KeyRange(start, end))
        # The copy that reads this tracker also carries the request ids remembered since.
        self._request_marks[tracker] = self.node.chain.request_mark()
        return {"tracker": tracker}

    @control.StopTracking.responder
    def stop_tracking(self, tracker: int) -> dict[str, Any]:
        self._request_marks.pop(tracker, None)
        try:
            migration.stop_tracking(self._stores(), tracker)
        except KeyError:
            pass
        return {}

    @control.DrainWrites.responder
    def drain_writes(self) -> Deferred[dict[str, Any]]:
        return self.node.chain.settle_heads().addCallback(lambda _: {})

    @control.CopyRange.responder
    def copy_range(self, operation: int, store: str, start: int, end: int, target_host: str,
                   target_port: int, target_store: str, epoch: int,
                   tracker: int | None = None) -> Deferred[dict[str, Any]]:
        return self._run(self._copy_range(
            operation, store, KeyRange(start, end), target_host, target_port, target_store,
            epoch, tracker))

    async def _copy_range(self, operation: int, store: str, rng: KeyRange, host: str,
                          port: int, target_store: str, epoch: int,
                          tracker: int | None) -> dict[str, Any]:
        source = self._store(store)
        dirty = self._tracked(tracker) if tracker is not None else None
        # Request ids of writes to the range travel with it (all of them with the bulk copy,
        # those since the tracker began with a catch-up): a client retrying a write that was
        # applied here must not have it applied again by the range's new head.
        mark = 0 if tracker is None else self._request_marks.pop(tracker, 0)
        remembered = self.node.chain.requests_since(mark)
        try:
            target = await self.connect_peer(host, port)
        except CancelledError:
            raise control.ControlFailed("copy cancelled: the ECS link dropped") from None
        except Exception as e:
            raise control.ControlFailed(f"cannot reach {host}:{port}: {e}") from None

        def progress(keys: int, nbytes: int) -> None:
            self.callRemote(control.CopyProgress, operation=operation, keys=keys, bytes=nbytes)

        self.node.metrics.copy_started()
        keys = nbytes = 0
        try:
            requests = await migration.requests_in(remembered, rng, self.reactor)
            if dirty is None:
                keys, nbytes = await migration.copy_range(
                    source, rng, target, target_store, epoch, progress, self.reactor,
                    COPY_BATCH_TIMEOUT)
            else:
                keys, nbytes = await migration.copy_dirty(
                    source, dirty, target, target_store, epoch, self.reactor,
                    COPY_BATCH_TIMEOUT)
            await migration.send_requests(requests, target, target_store, epoch, self.reactor,
                                          COPY_BATCH_TIMEOUT)
        except CancelledError:
            log.info("copy of {store} to {host}:{port} stopped: the ECS link dropped",
                     store=store, host=host, port=port)
            raise control.ControlFailed("copy cancelled: the ECS link dropped") from None
        except Exception as e:
            if type(e) in control.CONTROL_ERRORS:
                raise
            # An undeclared error would make AMP drop this link, and with it the ECS's way to
            # unlock this server; a lost target connection is an ordinary failed copy.
            raise control.ControlFailed(f"copy to {host}:{port} failed: {e!r}") from None
        finally:
            target.transport.loseConnection()
            self.node.metrics.copy_ended(keys, nbytes)
        log.info("copied {keys} {what} ({nbytes} bytes) of {store} to {host}:{port}",
                 keys=keys, what="keys" if dirty is None else "keys written meanwhile",
                 nbytes=nbytes, store=store, host=host, port=port)
        return {"keys": keys, "bytes": nbytes}

    def _tracked(self, tracker: int) -> set[bytes]:
        try:
            return migration.stop_tracking(self._stores(), tracker)
        except KeyError:
            raise control.ControlFailed(f"no write tracker {tracker} on this server") from None

    @control.MoveLocal.responder
    def move_local(self, source: str, target: str, start: int, end: int,
                   tracker: int | None = None) -> Deferred[dict[str, Any]]:
        from_store, to_store = self._store(source), self._store(target)
        dirty = self._tracked(tracker) if tracker is not None else None

        async def move() -> dict[str, Any]:
            try:
                if dirty is not None:
                    keys = await migration.move_dirty(from_store, to_store, dirty, self.reactor)
                else:
                    keys = await migration.move_local(from_store, to_store,
                                                      KeyRange(start, end), self.reactor)
            except CancelledError:
                raise control.ControlFailed("move cancelled: the ECS link dropped") from None
            return {"keys": keys}

        return self._run(move())

    @control.DropRange.responder
    def drop_range(self, store: str, start: int, end: int,
                   attempt: int | None = None) -> Deferred[dict[str, Any]]:
        target = self._store(store)
        if attempt is not None:
            # From now on only this attempt's batches land here; set before the drop starts,
            # so none of an older attempt lands while it runs either.
            self.node.copy_attempt = attempt

        async def drop() -> dict[str, Any]:
            keys = await migration.drop_range(target, KeyRange(start, end), self.reactor)
            return {"keys": keys}

        return Deferred.fromCoroutine(drop())

    @control.ClearStores.responder
    def clear_stores(self) -> dict[str, Any]:
        for store in self._stores().stores.values():
            # A new, empty file for each: as quick for a million keys as for none.
            store.clear()
            # The serials go with the data: a chain of the same names may be formed again
            # with this server, and a serial kept from before would make it skip new writes.
            store.set_chain_state("", 0)
        self.node.cache.clear()
        return {}

    @control.Shutdown.responder
    def shutdown_server(self) -> dict[str, Any]:
        log.info("shutting down at the ECS's request")
        self.node.state = STOPPED
        self.reactor.callLater(0.1, self.shutdown)
        return {}

    def _stores(self) -> Any:
        if self.node.stores is None:
            raise control.ControlFailed("the stores are not open")
        return self.node.stores

    def _store(self, name: str) -> Any:
        try:
            return migration.store_named(self._stores(), name)
        except ValueError as e:
            # declared, so the link survives a bad store name
            raise control.ControlFailed(str(e)) from None


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, node: KVNode, reactor: Any, shutdown: Callable[[], None],
                 credentials: tls.Credentials | None,
                 endpoints: LeaderEndpoints | None = None) -> None:
        self.node, self.reactor, self.shutdown = node, reactor, shutdown
        self.credentials = credentials
        self.endpoints = endpoints

    def buildProtocol(self, addr: Any) -> ServerControlProtocol:
        return ServerControlProtocol(self.node, self.reactor, self.shutdown,
                                     credentials=self.credentials, endpoints=self.endpoints)


@implementer(IStreamClientEndpoint)
class LeaderEndpoints:
    """The ECS endpoints of a list, dialled in turn; after a standby named the leader
    (L{follow}), the leader's next."""

    def __init__(self, endpoints: Sequence[Any], addresses: Sequence[str | None]) -> None:
        self.endpoints = list(endpoints)
        self.addresses = list(addresses)
        self._next = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        index = self._next
        self._next = (index + 1) % len(self.endpoints)
        return self.endpoints[index].connect(factory)

    def follow(self, address: str) -> None:
        """Dial C{address} (HOST:PORT) next, if it is one of ours."""
        if address in self.addresses:
            self._next = self.addresses.index(address)


def ecs_descriptions(value: str) -> list[str]:
    """The ECS endpoints of C{--ecs}: one, or several separated by commas."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _address(description: str) -> str | None:
    try:
        host, port = tls.client_host_port(description)
    except tls.TLSConfigError:
        return None
    return f"{host}:{port}"


def ecs_endpoint(reactor: Any, description: str, credentials: tls.Credentials | None) -> Any:
    """The ECS's client endpoint: C{description} as it is over plaintext; with TLS, its host and
    port dialled with mutual TLS (the ECS's certificate must name that host)."""
    if credentials is None:
        return clientFromString(reactor, description)
    host, port = tls.client_host_port(description)
    return tls.client_endpoint(reactor, credentials, host, port, 10)


def make_ecs_link(node: KVNode, description: str, reactor: Any,
                  shutdown: Callable[[], None],
                  credentials: tls.Credentials | None = None) -> ClientService:
    """A service that keeps this server connected and registered to the ECS at C{description}
    (several, comma-separated: to whichever leads)."""
    # Under an ECS, no read lease before the ECS has answered an Alive (chainstore/chain.py).
    node.chain.lease_bound = 0.0
    descriptions = ecs_descriptions(description)
    endpoints = LeaderEndpoints([ecs_endpoint(reactor, d, credentials) for d in descriptions],
                                [_address(d) for d in descriptions])
    return ClientService(
        endpoints,
        _LinkFactory(node, reactor, shutdown, credentials, endpoints),
        # At most a second between two dials: a server that lost its ECS grants no read lease
        # once the ECS could have declared it failed, so its successor's reads wait for the
        # link (chainstore/chain.py, "lease bound"); a dial a second costs the ECS nothing.
        retryPolicy=(backoffPolicy(initialDelay=0.2, maxDelay=1.0, factor=2.0)
                     if len(descriptions) == 1 else
                     # Several ECS: a standby's answer names the leader, to be dialled at once,
                     # and a new leader waits for its servers; so little jitter, a short cap.
                     backoffPolicy(initialDelay=0.05, maxDelay=2.0, factor=2.0,
                                   jitter=lambda: random.random() * 0.1)),
        clock=reactor,
    )
