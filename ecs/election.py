"""Leader election among ECS processes on an etcd lease-backed key.

Each ECS holds a lease of C{ttl} seconds. A standby campaigns with one transaction: "if
``PREFIX/leader`` does not exist, create it attached to my lease, else read it"; the one that
creates it leads until its lease ends. A standby that lost watches the leader key from the
revision it read (etcd's v3 watch, L{ecs.etcd.EtcdClient.watch}): when the key is deleted (the
leader's lease ran out or was revoked) it campaigns at once, and a new leader's record reaches it
as soon as it is written. The watch is not trusted alone: a standby still campaigns every C{ttl}
seconds (a watch on a member cut off from the others can stay open and quiet), and every
C{interval} while it has no watch (a watch that ended is opened again after a back-off of
L{WATCH_RETRY_FIRST} doubling up to L{WATCH_RETRY_MAX}); without a streaming transport it
campaigns every C{interval}, polling. Meanwhile it renews its own lease every C{interval}.

The leader renews its lease every C{interval}; it counts itself deposed as soon as a renewal says
the lease is gone, or when C{ttl} (less a margin) has passed since it sent the last renewal etcd
confirmed. That deadline is a timer of its own, so a hung etcd request cannot keep a leader
believing it leads after etcd let the lease go. When the leader dies or is cut from etcd, etcd
deletes the key with the lease and the watching standbys campaign: a takeover within C{ttl} plus
a few requests' time (C{ttl + interval} when polling).

Being deposed is never a danger to the data: every state change the leader saves is fenced on
its lease (L{ecs.etcd_state}); stepping down in time only keeps a deposed leader from *talking*
to servers (which refuse its old epoch anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel

from chainstore.logs import get_logger
from ecs.etcd import EtcdClient, KeyValue, absent, get, key_value, put
from ecs.etcd_state import leader_key, members_prefix, parse_leader

log = get_logger("ecs.election")

#: A leader stands down this long before its lease could have run out at etcd.
DEPOSE_MARGIN = 0.2

#: A watch of the leader key that ended is opened again (after a campaign) this long after, then
#: twice as long each time it ends again soon, up to WATCH_RETRY_MAX seconds.
WATCH_RETRY_FIRST = 0.1
WATCH_RETRY_MAX = 2.0


class Election:
    """Campaigns for the leader key; C{on_elected(lease)} when this ECS wins (a Deferred: the
    takeover; if it fails the ECS stands down), C{on_deposed()} when it stops leading."""

    def __init__(self, client: EtcdClient, clock: IReactorTime, prefix: str, record: bytes,
                 ttl: int, on_elected: Callable[[int], Any], on_deposed: Callable[[], None],
                 interval: float | None = None) -> None:
        self.client = client
        self.clock = clock
        self.key = leader_key(prefix)
        self.record = record
        self.ttl = ttl
        self.interval = interval if interval is not None else max(0.1, ttl / 4)
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.lease = 0
        self.leading = False
        #: the leader key's record (parsed JSON) as last read; ours while we lead
        self.leader: dict[str, Any] | None = None
        #: every ECS campaigning or leading (their records, ours included), as the leader
        #: last read them: Status shows the standbys
        self.members: list[dict[str, Any]] = []
        self._members_prefix = members_prefix(prefix)
        self._member_key = self._members_prefix + str(
            parse_leader(record).get("name", "")).encode()
        self._deadline: Any = None
        # A standby with a watch still campaigns this often: the safety net for a watch cut off
        # without a word.
        self.safety = max(float(ttl), self.interval)
        self._last_campaign = float("-inf")
        self._campaigning = False
        # a reason to campaign came while a campaign was running: campaign again after it
        self._again = False
        # the running watch of the leader key (None: none), since when, and its reopening
        self._watch: Deferred[None] | None = None
        self._watch_started = 0.0
        self._watch_delay = WATCH_RETRY_FIRST
        self._watch_retry: Any = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("the election loop stopped", f))

    async def stop(self) -> None:
        """Stop campaigning; a leader revokes its lease so a standby takes over at once."""
        if self._loop.running:
            self._loop.stop()
        self._stop_watching()
        lease, leading = self.lease, self.leading
        if leading:
            self.depose("this ECS is stopping")
        if lease:
            try:
                await self.client.revoke(lease)
            except Exception as e:
                log.warn("could not revoke lease {lease:x}: {error}", lease=lease, error=e)

    def depose(self, why: str) -> None:
        """Stop leading now (idempotent); the lease is dropped and a new one campaigns."""
        if not self.leading:
            return
        self.leading = False
        self.leader = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        log.warn("no longer the leader: {why}", why=why)
        lease, self.lease = self.lease, 0
        # Let the key go at once (if etcd still has it) so that another ECS need not wait out
        # the lease; best effort: it expires by itself anyway.
        Deferred.fromCoroutine(self.client.revoke(lease)).addErrback(lambda f: None)
        try:
            self.on_deposed()
        except Exception:
            log.failure("standing down failed")

    async def _tick(self) -> None:
        try:
            if self.leading:
                await self._renew()
            elif self._campaigning:
                return
            elif self._watch is None or \
                    self.clock.seconds() - self._last_campaign >= self.safety:
                await self._run_campaign()
            elif not self.lease or await self.client.keep_alive(self.lease) <= 0:
                # the watch tells us of the leader key; the lease holds our announcement and
                # is ready for a campaign
                self.lease = 0
                await self._run_campaign()
        except Exception as e:
            # etcd unreachable or refusing: the leader's deadline stands it down in time; a
            # standby simply tries again next tick.
            log.debug("election round failed: {error}", error=e)

    async def _run_campaign(self) -> None:
        """Campaign, again as long as a reason to came meanwhile (one campaign at a time)."""
        self._campaigning = True
        try:
            while True:
                self._again = False
                self._last_campaign = self.clock.seconds()
                try:
                    await self._campaign()
                except Exception as e:
                    log.debug("campaign failed: {error}", error=e)
                if self.leading or not self._again or not self._loop.running:
                    return
        finally:
            self._campaigning = False

    def _campaign_now(self) -> None:
        if self.leading or not self._loop.running:
            return
        if self._campaigning:
            # the running one may have read the key before the change: it campaigns again
            self._again = True
            return
        Deferred.fromCoroutine(self._run_campaign())

    # -- the watch of the leader key (standbys) ---------------------------------------------------

    def _start_watching(self, start_revision: int) -> None:
        if self.client.stream is None or self._watch is not None or self.leading \
                or not self._loop.running:
            return
        if self._watch_retry is not None and self._watch_retry.active():
            return
        try:
            d = self.client.watch(self.key, start_revision, self._leader_changed)
        except Exception as e:
            log.warn("could not watch the leader key: {error}", error=e)
            return
        if d.called:
            # ended at once (etcd refused it): the next tick campaigns and tries again
            d.addErrback(lambda f: None)
            return
        self._watch = d
        self._watch_started = self.clock.seconds()
        d.addBoth(self._watch_ended, d)

    def _stop_watching(self) -> None:
        if self._watch_retry is not None and self._watch_retry.active():
            self._watch_retry.cancel()
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()

    def _watch_ended(self, result: Any, d: Deferred[None]) -> None:
        if self._watch is not d:
            return  # stopped by us
        self._watch = None
        if not self._loop.running or self.leading:
            return
        if self.clock.seconds() - self._watch_started >= self.safety:
            self._watch_delay = WATCH_RETRY_FIRST  # it had been working: no back-off
        delay = self._watch_delay
        self._watch_delay = min(2 * delay, WATCH_RETRY_MAX)
        why = "it ended" if not hasattr(result, "getErrorMessage") else (
            "cancelled" if result.check(CancelledError) else result.getErrorMessage())
        log.info("the watch of the leader key stopped ({why}); campaigning and watching again "
                 "in {delay:.2f}s", why=why, delay=delay)
        self._watch_retry = self.clock.callLater(delay, self._campaign_now)

    def _leader_changed(self, kind: str, kv: KeyValue) -> None:
        if self.leading:
            return
        if kind == "DELETE":
            self.leader = None
            log.info("the leader key is gone: campaigning")
            self._campaign_now()
            return
        leader = parse_leader(kv.value)
        if leader != self.leader:
            self.leader = leader
            log.info("standing by; the leader is {leader}", leader=leader.get("name"))

    async def _renew(self) -> None:
        lease, sent = self.lease, self.clock.seconds()
        ttl = await self.client.keep_alive(lease)
        if not self.leading or lease != self.lease:
            return
        if ttl <= 0:
            self.depose(f"lease {lease:x} expired")
            return
        self._arm(sent + ttl - DEPOSE_MARGIN)
        self.members = [parse_leader(kv.value)
                        for kv in await self.client.get_prefix(self._members_prefix)]

    def _arm(self, at: float) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = self.clock.callLater(
            max(0.0, at - self.clock.seconds()),
            lambda: self.depose(f"lease not renewed within its {self.ttl}s"))

    async def _campaign(self) -> None:
        if self.lease:
            if await self.client.keep_alive(self.lease) <= 0:
                self.lease = 0
        if not self.lease:
            self.lease = await self.client.grant(self.ttl)
            # announced under the same lease: it goes when this ECS does
            await self.client.txn([], [put(self._member_key, self.record, self.lease)])
        lease, sent = self.lease, self.clock.seconds()
        won, responses = await self.client.txn(
            [absent(self.key)], [put(self.key, self.record, lease)], [get(self.key)])
        if not won:
            kvs = responses[0].get("response_range", {}).get("kvs") or [] if responses else []
            previous = self.leader
            current = key_value(kvs[0]) if kvs else None
            self.leader = parse_leader(current.value) if current else None
            if self.leader != previous and self.leader:
                log.info("standing by; the leader is {leader}", leader=self.leader.get("name"))
            if current is not None:
                # any change after the one read: its deletion included, if it came already
                self._start_watching(current.mod_revision + 1)
            return
        if not self._loop.running or lease != self.lease:
            return
        self._stop_watching()
        self.leading = True
        self.leader = parse_leader(self.record)
        self._arm(sent + self.ttl - DEPOSE_MARGIN)
        log.info("elected leader (lease {lease:x}, {ttl}s)", lease=lease, ttl=self.ttl)
        try:
            await maybeDeferred(self.on_elected, lease)
        except Exception:
            log.failure("taking over failed; standing down", level=LogLevel.error)
            self.depose("the takeover failed")
