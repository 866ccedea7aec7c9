"""The ECS's brain: membership, heartbeats, the admin commands and status, free of sockets.

Servers reach it through links (their control connections, L{ecs.server.ECSProtocol}); admins
through the admin commands. Time comes from an injected clock, so the state machine is tested
with ``Clock`` and iosim.

Every ring change (join, leave, repair after a failure) runs the reconfiguration sequence of
L{ecs.reconfiguration}, with ring positions chosen by L{ecs.placement}; L{ECS} holds the busy
lock around it and refuses other admin commands meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import (CancelledError, Deferred, DeferredList, DeferredLock,
                                    gatherResults, succeed)
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectionClosed, ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import LogLevel
from twisted.protocols import amp
from twisted.python.failure import Failure

from chainstore import control
from chainstore.chain import LEASE_SECONDS
from chainstore.logs import get_logger
from chainstore.protocol import ring_to_wire
from chainstore.ring import Ring
from ecs.config import ECSConfig
from ecs.control_calls import CONTROL_TIMEOUT, ControlCalls
from ecs.chains import ChainReports
from ecs.failures import may_revive, missing_members, orphaned_ranges
from ecs.protocol import AdminError
from ecs.metrics import ECSMetrics
from ecs.reconfiguration import Operation, Reconfigurer, save_until_saved
from ecs.state import ACTIVE, FAILED, IDLE, LAUNCHING, REMOVED, ClusterState, Member, StateStore
from ecs.status import status_report

log = get_logger("ecs.coordinator")

# Beyond a lease, for the servers' clocks running a little apart from ours.
LEASE_MARGIN = 0.2

# Bounds on what registrations can make the ECS keep (and save, and put in Status): members
# (servers it launched and servers that registered, in any state), the length of a name and of a
# host, and the epochs a server may claim to have seen (a server only ever sees epochs this ECS
# allocated, so a higher one is refused, except by an ECS that lost its state, below).
MAX_MEMBERS = 256
MAX_NAME_CHARS = 64
MAX_HOST_CHARS = 255
MAX_EPOCH = 2 ** 40

# How long a new leader's probe of a ring member's AMP port may take to connect. Loopback or a
# LAN refuses at once when nothing listens; a probe that has not connected by then proves
# nothing (the member keeps its grace).
PROBE_TIMEOUT = 0.5

# A failed repair is tried again after 1 s, then 2, 4, ... up to 30 s, until it succeeds.
REPAIR_RETRY_FIRST = 1.0
REPAIR_RETRY_MAX = 30.0

__all__ = ["CONTROL_TIMEOUT", "ECS", "Operation"]


def _neighbours(ring: Ring, name: str) -> set[str]:
    """The members next to C{name} in any of C{ring}'s live chains: those holding a lease it
    granted (its successor as tail, its predecessor upstream), or granting it one."""
    found: set[str] = set()
    for index in range(len(ring.nodes)):
        chain = [n.name for n in ring.chain_for_index(index)]
        if name in chain:
            i = chain.index(name)
            found.update(chain[max(i - 1, 0):i] + chain[i + 1:i + 2])
    return found


class ECS:
    """The ECS's façade: its AMP endpoint (L{ecs.server}) and C{twistd ecs} use only this.

    It keeps the membership and the servers' links, runs heartbeats, answers the admin commands
    and C{status}, and runs each ring change (L{Reconfigurer}) under its C{busy} lock.
    """

    def __init__(self, config: ECSConfig, clock: IReactorTime, launcher: Any,
                 state_file: StateStore, exit: Callable[[], None] = lambda: None,
                 takeover: bool = False,
                 dial: Callable[[str, int, float], Deferred[Any]] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.launcher = launcher
        self.state_file = state_file
        self.exit = exit
        loaded = state_file.load()
        self.resumed = loaded is not None
        self.state = loaded or ClusterState(replication=config.replication)
        # The newest epoch allocated and saved: heartbeats carry it, never one allocated and not
        # yet saved (with etcd, committed), so no server sees an epoch a deposed leader
        # allocated after it lost the lead, and servers refuse an ECS whose epoch is behind
        # theirs (chainstore.ecs_link).
        self.committed_epoch = self.state.last_epoch
        # The epoch of the newest ring saved: a ring in memory only (its save failed, or is on
        # its way) is sent to no server (L{_sync}). A restarted ECS would resume the one saved
        # before, and the writes servers took under the unsaved one would be lost.
        self.saved_epoch = self.state.epoch
        # Servers' leases end by the failure timeout an ECS answered their Alive with: one
        # before this one, with a longer setting, may have promised more (L{start}). Ours is
        # saved before any Alive is answered (a server registers first, which saves).
        self._promised = self.state.failure_timeout
        self._promised_until = 0.0
        self.state.failure_timeout = max(self._promised, config.failure_timeout)
        self.links: dict[str, amp.AMP] = {}
        self.last_seen: dict[str, float] = {}
        self._waiting: dict[str, list[Deferred[None]]] = {}
        self._failing: set[str] = set()
        # bumped on every failure, so a change in progress knows it must not commit
        self._failures = 0
        self.calls = ControlCalls(self.links, clock)
        # ring members not back since this ECS resumed the ring -> seconds they have beyond
        # failure-timeout to come back
        self._returning: dict[str, float] = {}
        # A new leader of several ECS (takeover): its servers are running and redial within a
        # second or two, so each gets failure-timeout and a heartbeat round (one whose port
        # refuses a connection, none: see _probe_absent); if none is back
        # after failure-timeout (every process was down), the absent pool servers are
        # relaunched then, with register-timeout to come up. After an ECS restart they may
        # come back at their back-off's pace (at most a second or two, like a new leader's),
        # but without replicas one counted as failed would hand its range to nobody: with
        # replication 1, register-timeout for all and a relaunch after it; with replicas, as
        # after a takeover (L{_quick_resume}).
        self.takeover = takeover
        # dial(host, port, timeout) connects to a server's AMP port (a protocol, or a failure);
        # a new leader uses it to tell a ring member that is gone from one that is slow
        self.dial = dial
        # ring members a takeover's probe found nothing listening for, marked dead at once
        self._refused: set[str] = set()
        self.busy = DeferredLock()
        self.reconfigurer = Reconfigurer(self.state, clock, self._call, self._save,
                                         self._metadata, lambda: self._failures,
                                         config.placement, lambda name: self.links.get(name),
                                         config.copies_beside_moves == "on")
        # changes of whether to serve still being applied to the servers (Status waits for them)
        self._applying_states = 0
        # when every read lease a server marked dead may hold has run out (ECS clock)
        self._leases_out_at = 0.0
        self._started_at = clock.seconds()
        self.heartbeats = LoopingCall(self._heartbeat_tick)
        self.heartbeats.clock = clock
        # repairs failed in a row, and the retry scheduled after the last of them
        self._repair_failures = 0
        self._repair_retry: Any = None
        # Background work (_spawn) in progress; stop and abdicate cancel it, and a stopped ECS
        # starts none (see _halt).
        self._tasks: set[Deferred[None]] = set()
        self._stopped = False
        # what the servers report with their heartbeats (lag, window), and the ECS's metrics
        self.reports = ChainReports()
        self.metrics = ECSMetrics()
        self.metrics.collector(self)

    @property
    def operation(self) -> Operation | None:
        """The reconfiguration in progress (None when none runs), for C{status}."""
        return self.reconfigurer.operation

    @operation.setter
    def operation(self, operation: Operation | None) -> None:
        self.reconfigurer.operation = operation

    @property
    def last_reconfiguration(self) -> dict[str, Any] | None:
        """The summary of the last completed reconfiguration (None before the first)."""
        return self.reconfigurer.last

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start heartbeats and bring the ring back (or up, on a first start)."""
        self._started_at = self.clock.seconds()
        for name in self.state.ring_members:
            self.last_seen[name] = self._started_at
        # Nobody is declared failed before the leases an earlier ECS let them grant have run
        # out: it answered their Alive before we started, with its failure timeout.
        self._promised_until = self._started_at + self._promised
        # After a restart the servers come back at their reconnect back-off's pace (or must be
        # relaunched): they get register-timeout, not failure-timeout, before counting as
        # failed; without replicas a failure would hand their data to nobody.
        # (a new leader's: one heartbeat round, so that the relaunch decision at
        # failure-timeout comes before any of them counts as failed)
        grace = (self.config.heartbeat_interval if self._quick_resume
                 else self.config.register_timeout)
        self._returning = {n: grace for n in self.state.ring_members} if self.resumed else {}
        self.heartbeats.start(self.config.heartbeat_interval, now=False).addErrback(
            lambda f: log.failure("heartbeats stopped: failures go unnoticed", f))
        return self._spawn(self._bring_up())

    @property
    def _quick_resume(self) -> bool:
        """Whether ring members not back within failure-timeout of resuming count as failed
        (a takeover, or replicas to repair from) rather than get register-timeout."""
        return self.takeover or self.state.replication > 1

    async def _bring_up(self) -> None:
        try:
            if self.resumed and (self.state.formed or not self.config.initial_nodes):
                await self._resume()
            elif self.config.initial_nodes:
                if self.resumed:
                    # The first start was cut short (stopped while its servers started, or
                    # they never registered): start again rather than resume an empty ring
                    # and wait for an admin. The slots it used are free again (_bring_in).
                    log.info("no ring was formed before: starting {count} servers as on a "
                             "first start", count=self.config.initial_nodes)
                await self.add_nodes(self.config.initial_nodes, self.config.cache_strategy,
                                     self.config.cache_size, start=True)
        except Exception:
            if self._stopped:
                raise  # however the cancellation reached it (an aborted launch, say)
            log.failure("could not bring the ring up", level=LogLevel.error)

    async def _resume(self) -> None:
        # A fresh epoch for the same ring: every server that reconnects adopts it, which also
        # clears any lock an interrupted reconfiguration left behind.
        self.state.epoch = self.state.allocate_epoch()
        await self._save()
        log.info("resumed epoch {epoch} with ring {ring}", epoch=self.state.epoch,
                 ring=self.state.ring_members)
        if self.dial is not None:
            # A member killed while the ECS was down is not waited for (its grace, and a
            # heartbeat round) while its chains hold their writes.
            self._spawn(self._probe_absent())
        # Servers that outlived the ECS reconnect by themselves: relaunching them at once
        # would start a second process on the same stores and ports. Wait for them first.
        absent = [n for n in self.state.ring_members if n not in self.links
                  and self.state.members[n].origin == "pool" and self.config.slot(n)]
        if absent:
            wait = self.config.failure_timeout if self._quick_resume else None
            await DeferredList([self._registered(n, wait) for n in absent], consumeErrors=True)
            if self._stopped:
                # the waits were cancelled (a DeferredList fires all the same): relaunch nothing
                raise CancelledError()
            if self._quick_resume and any(n in self.links for n in self.state.ring_members):
                # The cluster is up and only some are missing: they died (with the old leader,
                # say). They are marked dead now and repaired away, not relaunched: a relaunch
                # would hold their chains up until they are back.
                absent = []
        for name in absent:
            member = self.state.members[name]
            slot = self.config.slot(name)
            if name not in self.links and slot is not None and name not in self._refused:
                try:
                    self.launcher.launch(slot, member.cache_strategy, member.cache_size)
                    self.last_seen[name] = self.clock.seconds()
                    if name in self._returning:
                        self._returning[name] = self.config.register_timeout
                except Exception as e:
                    log.warn("not relaunching {name}: {error}", name=name, error=e)
        for name in list(self.links):
            await self._sync(name)

    async def _probe_absent(self) -> None:
        """A resumed ECS's (a restart, a new leader) quick check of the ring members that have
        not registered yet: one whose AMP port refuses a connection has no process behind it,
        so it is treated as failed now instead of after failure-timeout and a heartbeat
        round. One that accepts, or does not answer within L{PROBE_TIMEOUT}, may be alive and
        slow or cut off: it keeps its grace. Being wrong costs a repair, never data: a member
        marked dead is fenced by the new epoch, and one that comes back registers and is
        repaired back in."""
        absent = [n for n in self.state.ring_members
                  if n not in self.links and n not in self.state.dead]
        if not absent or self.state.replication < 2:
            # Without replicas a member marked dead hands its data to nobody: it keeps its
            # grace, to come back (or be relaunched) with its files.
            return
        found = await gatherResults([self._probe(n) for n in absent])
        if self._stopped:
            return  # the probes were cancelled, and answer "unknown"
        refused = [n for n, what in zip(absent, found) if what == "refused"]
        if not refused:
            return
        if "up" not in found and not any(n in self.links for n in self.state.ring_members):
            # Nothing of the cluster is up (every process was down and is starting again):
            # the relaunch at failure-timeout brings them back; marking them all dead would
            # leave their ranges to nobody.
            log.info("no ring member answers after this ECS resumed; waiting for them "
                     "(relaunched after {t}s)", t=self.config.failure_timeout)
            return
        ring = self.state.ring()
        for name in refused:
            if name in self.links or name in self._failing or name in self.state.dead:
                continue  # registered meanwhile, or already being handled
            together = _neighbours(ring, name) & set(refused)
            if together:
                # A firewall that rejects refuses too, with the processes alive: two members
                # of a chain cut off that way grant each other leases, which run out within
                # their grace (the lease bound), not before. Marked dead now, their chain
                # went on without them while one answered reads under the other's lease.
                log.warn("{name} refused a connection after this ECS resumed, and so did "
                         "{others}, next to it in a chain: keeping their grace",
                         name=name, others=", ".join(sorted(together)))
                continue
            member = self.state.members[name]
            self._refused.add(name)
            self._failing.add(name)
            log.warn("{name} refused a connection at {host}:{port} after this ECS resumed "
                     "(nothing listens there): treating it as failed", name=name,
                     host=member.host, port=member.amp_port)
            self._declare_failed(name)

    def _probe(self, name: str) -> Deferred[str]:
        """``refused``, ``up`` or ``unknown`` (timed out or any other error) for C{name}."""
        assert self.dial is not None
        member = self.state.members[name]

        def up(protocol: Any) -> str:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.loseConnection()
            return "up"

        def down(failure: Any) -> str:
            return "refused" if failure.check(ConnectionRefusedError) else "unknown"

        try:
            d = self.dial(member.host, member.amp_port, PROBE_TIMEOUT)
        except Exception:
            log.failure("could not probe {name}", name=name, level=LogLevel.warn)
            return succeed("unknown")
        # the endpoint's timeout covers the TCP connect; this one the TLS handshake too
        d.addTimeout(PROBE_TIMEOUT, self.clock)
        return d.addCallbacks(up, down)

    def stop(self) -> Deferred[Any]:
        """Stop everything (L{_halt}) and the servers this ECS launched."""
        self._halt()
        return self.launcher.stop_all()

    def _halt(self) -> None:
        """Stop heartbeats and cancel this ECS's background work: its tasks (a repair waiting
        on C{busy} or a lease, a change under way, resyncs, probes), the repair retry, the waits
        for registrations and every control call in flight; later calls and tasks fail or end
        at once. A stopped ECS leaves nothing running or scheduled: a task left suspended would
        be ended by the garbage collector at any later time, its C{finally} releasing C{busy}
        into a coroutine collected before it. A change cancelled before its commit leaves its
        locks to the next ECS's ring (over a new link), as after a crash."""
        self._stopped = True
        if self.heartbeats.running:
            self.heartbeats.stop()
        if self._repair_retry is not None and self._repair_retry.active():
            self._repair_retry.cancel()
        for task in list(self._tasks):
            task.cancel()
        for waits in list(self._waiting.values()):
            for wait in list(waits):
                wait.cancel()
        self._waiting.clear()
        self.calls.close()

    def abdicate(self) -> None:
        """Stop acting at once, without touching the servers' processes: another ECS leads now.
        Heartbeats and repairs stop, every server link is closed (the servers dial the next
        ECS of their list and find the new leader), and its background work, a change in
        progress with it, is cancelled (L{_halt})."""
        self._halt()
        for name, link in list(self.links.items()):
            if link.transport is not None:
                link.transport.loseConnection()
        self.links.clear()

    # -- servers ---------------------------------------------------------------------------------

    def register(self, link: amp.AMP, name: str, host: str, console_port: int, amp_port: int,
                 epoch: int) -> Deferred[str]:
        """Record C{name} at its address and take C{link} as its control link once the state
        is saved; the answer says whether it is in the ring. A refusal is raised at once."""
        try:
            self._check_registration(name, host, console_port, amp_port, epoch)
        except control.RegistrationRefused as e:
            log.warn("refused the registration of {name!r}: {why}", name=name[:MAX_NAME_CHARS],
                     why=e)
            raise
        address = (host, console_port, amp_port)
        for other in self.state.members.values():
            if other.name != name and (other.host, other.console_port) == (host, console_port) \
                    and other.status in (ACTIVE, IDLE, LAUNCHING):
                raise control.RegistrationRefused(
                    f"console address {host}:{console_port} belongs to {other.name}")
        member = self.state.members.get(name)
        if member is None:
            self._make_room()
        if member is not None and (member.host, member.console_port, member.amp_port) != address:
            if member.status in (ACTIVE, LAUNCHING) or name in self.links:
                raise control.RegistrationRefused(
                    f"{name} is registered at {member.host}:{member.console_port}")
            member.host, member.console_port, member.amp_port = address
        if member is None:
            member = Member(name, host, console_port, amp_port, IDLE, "operator")
            self.state.members[name] = member
        if epoch > self.state.last_epoch:
            # Only if our state file was lost: never hand out an epoch a server has seen.
            self.state.last_epoch = epoch
        if name not in self.state.ring_members and member.status != IDLE:
            member.status = IDLE
        if name in self.state.dead and may_revive(self.state.ring(), name,
                                                  self.state.departures()):
            # Every replica of its ranges went down (a whole-cluster outage) and it left each
            # of their chains last: it holds every acknowledged write of them, so it rejoins as
            # it is rather than losing them. (One that left earlier would serve a stale copy.)
            self.state.dead.discard(name)
            self.state.epoch = self.state.allocate_epoch()
            member.status = ACTIVE
            member.left_at = 0
            self._failing.discard(name)
            log.warn("epoch {epoch}: {name} is back and every replica of its ranges was down: "
                     "it rejoins its chains", epoch=self.state.epoch, name=name)
            revived = True
        else:
            revived = False
        return self._save().addCallback(lambda _: self._registered_link(link, name, revived))

    def _registered_link(self, link: amp.AMP, name: str, revived: bool) -> str:
        self.links[name] = link
        self._returning.pop(name, None)
        link.server_name = name  # type: ignore[attr-defined]
        self.last_seen[name] = self.clock.seconds()
        for d in self._waiting.pop(name, []):
            d.callback(None)
        if revived:
            # Everyone learns the new chains; members still dead are repaired away later.
            self._spawn(self._set_states())
            self._spawn(self._repair())
        else:
            self._spawn(self._sync(name))
            if name in self.state.dead:
                # It may hold the last copy of a range a repair was waiting for.
                self._spawn(self._repair())
        in_ring = name in self.state.ring_members
        log.info("{name} registered ({where})", name=name,
                 where="in the ring" if in_ring else "idle")
        return "in the ring" if in_ring else "registered; waiting to be added to the ring"

    def _check_registration(self, name: str, host: str, console_port: int, amp_port: int,
                            epoch: int) -> None:
        """Refuse (L{control.RegistrationRefused}) what the ECS must not record."""
        refuse = control.RegistrationRefused
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise refuse(f"a server name is 1-{MAX_NAME_CHARS} printable characters")
        if not host or len(host) > MAX_HOST_CHARS or not host.isprintable():
            raise refuse(f"a host is 1-{MAX_HOST_CHARS} printable characters")
        if not (0 < console_port < 65536 and 0 < amp_port < 65536):
            raise refuse("ports are 1-65535")
        if epoch < 0 or epoch > MAX_EPOCH:
            raise refuse(f"epoch {epoch} is not one any ECS allocates")
        if epoch > self.state.last_epoch and (self.resumed or self.state.ring_members):
            # Only an ECS that started without its state file (and has formed no ring since)
            # takes a higher epoch from a server, to stay above what that server has seen.
            raise refuse(f"epoch {epoch} is beyond this ECS's latest, {self.state.last_epoch}: "
                         f"no server can have seen it (was the ECS's state file replaced?)")
        if name not in self.state.members and len(self.state.members) >= MAX_MEMBERS \
                and not self._removable():
            raise refuse(f"the ECS keeps at most {MAX_MEMBERS} members, and every one is in "
                         f"the ring, connected or being launched")

    def _removable(self) -> list[str]:
        """Members the ECS may forget to make room: out of the ring, not connected, not being
        launched; removed ones first. (A server forgotten registers again when it reconnects.)"""
        spare = [m for m in self.state.members.values()
                 if m.name not in self.state.ring_members and m.name not in self.links
                 and m.status != LAUNCHING]
        spare.sort(key=lambda m: m.status != REMOVED)
        return [m.name for m in spare]

    def _make_room(self) -> None:
        while len(self.state.members) >= MAX_MEMBERS:
            name = self._removable()[0]
            del self.state.members[name]
            self.last_seen.pop(name, None)
            log.info("forgot member {name} to make room for a new one", name=name)

    def alive(self, link: amp.AMP) -> float:
        """A registered server's L{control.Alive}: heard from it now. Returns the failure
        timeout, the least time from now before this ECS may declare it failed."""
        name = getattr(link, "server_name", None)
        if name is None or self.links.get(name) is not link:
            raise control.ControlFailed("this link is not the server's current one")
        if name in self._failing or name in self.state.dead:
            # Declared failed already (its link goes once its death is saved, an etcd round
            # trip): an answer now would let it grant leases past the moment its chains went
            # on without it.
            raise control.ControlFailed(f"{name} has been declared failed")
        self.last_seen[name] = max(self.last_seen.get(name, 0.0), self.clock.seconds())
        return self.config.failure_timeout

    def link_lost(self, link: amp.AMP) -> None:
        name = getattr(link, "server_name", None)
        if name is not None and self.links.get(name) is link:
            del self.links[name]
            log.info("{name} disconnected", name=name)

    async def _sync(self, name: str) -> None:
        """Bring one server up to date: the current ring and whether to serve."""
        link = self.links.get(name)
        if link is None:
            return
        try:
            if self.state.ring_members and self.state.epoch <= self.saved_epoch:
                await self._call(name, control.SetMetadata, **self._metadata())
            serving = self.state.serving and name in self.state.ring_members
            await self._call(name, control.SetState, state="running" if serving else "stopped")
        except CancelledError:
            return  # the ECS stopped
        except (ConnectionClosed, DeferredTimeout, control.ControlFailed) as e:
            # It went away, hangs or refused with its reason: the heartbeats deal with the
            # first two, and a traceback would add nothing to any of them.
            log.warn("could not update {name}: {error}", name=name,
                     error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        except Exception:
            log.failure("could not update {name}", name=name, level=LogLevel.warn)

    def copy_progress(self, operation: int, keys: int, nbytes: int, source: str) -> None:
        op = self.operation
        if op is None or op.number != operation:
            return
        op.copies[source] = (keys, nbytes)

    # -- heartbeats and failures -----------------------------------------------------------------

    def _heartbeat_tick(self) -> None:
        try:
            now = self.clock.seconds()
            for name, link in list(self.links.items()):
                d = self._call(name, control.Heartbeat, timeout=self.config.heartbeat_interval,
                               epoch=self.committed_epoch)
                d.addCallbacks(self._heard, lambda f: None, (name, now))
            for name in list(self.state.ring_members):
                silent = now - self.last_seen.get(name, self._started_at)
                limit = self.config.failure_timeout
                limit += self._returning.get(name, 0.0)
                if silent > limit and name not in self._failing:
                    if name in self.state.dead or now <= self._promised_until:
                        continue
                    self._failing.add(name)
                    log.warn("{name} missed heartbeats for {silent:.1f}s: treating it as failed",
                             name=name, silent=silent)
                    self._declare_failed(name)
        except Exception:
            log.failure("heartbeat round failed")

    def _heard(self, reply: dict[str, Any], name: str, sent: float | None = None) -> None:
        self.last_seen[name] = self.clock.seconds()
        self.reports.heard(name, reply.get("report"))
        if sent is not None:
            self.metrics.heartbeat_answered(name, sent, self.last_seen[name])
        if self.busy.locked:
            return
        report = self.reports.reports.get(name) or {}
        if name in self.state.ring_members and reply["epoch"] < self.state.epoch \
                or report.get("orphaned_locks"):
            # Behind on the ring, or still holding the locks of an old link (the ring sent
            # when it registered may have failed): no change is running, so the ring sent
            # now lifts them.
            self._spawn(self._sync(name))

    def _declare_failed(self, name: str) -> None:
        """Mark C{name} dead at once (chains skip it), then repair in the background."""
        self._failures += 1
        self.metrics.failure_detected()
        # A change in progress may be waiting on the failed server: fail those calls now, so
        # the change aborts instead of hanging.
        self.calls.cancel(name)
        self._spawn(self._mark_dead(name))

    async def _mark_dead(self, name: str) -> None:
        try:
            if name not in self.state.ring_members or name in self.state.dead:
                return
            self.state.epoch = self.state.allocate_epoch()
            self.state.dead.add(name)
            self.state.members[name].status = FAILED
            # The order members leave a chain in says which of them holds its every write.
            self.state.members[name].left_at = self.state.epoch
            await save_until_saved(self._save, self.clock, self.state.epoch)
            live = self.state.live_members
            log.warn("epoch {epoch}: {name} is dead; chains skip it ({live} live servers{deg})",
                     epoch=self.state.epoch, name=name, live=len(live),
                     deg=", degraded" if len(live) < self.state.replication else "")
            link = self.links.pop(name, None)
            if link is not None and link.transport is not None:
                link.transport.loseConnection()
            # Successors first: the server after the dead one must be in the new epoch before
            # its new predecessor resends a window to it.
            ring = self.state.ring()
            names = [n.name for n in ring.nodes]
            i = names.index(name)
            clockwise = names[i + 1:] + names[:i]
            # All at once, so one hung server delays nobody (it fails within the call's
            # timeout, or sooner when it is declared failed); a predecessor whose resend reaches
            # a successor still in the old epoch is refused and resends a moment later.
            metadata = self._metadata()

            def not_told(failure: Any, server: str) -> None:
                if failure.check(CancelledError):
                    return  # the ECS stopped
                log.failure("could not tell {server} that {name} is dead", failure,
                            LogLevel.warn, server=server, name=name)

            await gatherResults([
                self._call(server, control.SetMetadata, **metadata).addErrback(not_told, server)
                for server in clockwise if server in self.links])
            # From now on no live server grants it a read lease (they refuse its old epoch);
            # one it holds runs out within a lease. (A chain of one has no leases.)
            if self.state.replication > 1:
                self._leases_out_at = max(self._leases_out_at,
                                          self.clock.seconds() + LEASE_SECONDS + LEASE_MARGIN)
        finally:
            self._failing.discard(name)
        self._spawn(self._repair())

    async def _repair(self) -> None:
        """Take dead members out of the ring, copying their data to restore the chains.

        A repair that fails is tried again with back-off (L{REPAIR_RETRY_FIRST} doubling up to
        L{REPAIR_RETRY_MAX}) until one succeeds; the ECS is not busy in between, so admin
        commands run meanwhile (an addNode or removeNode also takes the dead members out)."""
        await self.busy.acquire()
        try:
            # A dead member may be only cut off from us, still serving reads under a lease its
            # predecessor granted before it heard of the death (that predecessor, tail now,
            # waits the lease out before it reads or acknowledges). The repair makes new chains
            # whose new tails would not wait: it starts only once any such lease has run out.
            wait = self._leases_out_at - self.clock.seconds()
            if wait > 0:
                log.info("repairing in {wait:.1f}s, once the dead servers' read leases have "
                         "run out", wait=wait)
                await deferLater(self.clock, wait, lambda: None)
            dead = self.state.dead & set(self.state.ring_members)
            if not dead:
                self._repair_failures = 0
                return
            remaining = [n for n in self.state.ring_members if n not in dead]
            # Dead members that registered again may give their data to ranges nobody else
            # holds any more, each to those whose chain it left last (see ecs.failures).
            returned = {name for name in dead if name in self.links}
            ring = self.state.ring()
            left = self.state.departures()
            orphaned = (orphaned_ranges(ring, returned, left)
                        if self.state.replication > 1 else [])
            if orphaned:
                # Taking them out would drop the last copies of these ranges, and copying
                # them from a replica that left its chain early would bring back a stale
                # copy: wait for the last of each chain to leave (see register).
                waiting = missing_members(ring, returned, left)
                log.error("not repairing: every replica of {count} range(s) is down "
                          "({names}); {waiting}",
                          count=len(orphaned), names=", ".join(sorted(dead)),
                          waiting=f"waiting for {', '.join(waiting)} to come back, the "
                          "last to leave their chains" if waiting else "the order they "
                          "left in is not known (a state saved by an older ECS)")
                return
            try:
                await self._reconfigure(
                    remaining, f"repair after the failure of {', '.join(sorted(dead))}",
                    returned)
                for name in returned:
                    # Back and registered, now out of the ring: ready to be added again.
                    self.state.members[name].status = IDLE
                await self._save()
                self._repair_failures = 0
            except CancelledError:
                raise  # the ECS stopped: no retry
            except Exception:
                self._repair_failures += 1
                delay = min(REPAIR_RETRY_MAX,
                            REPAIR_RETRY_FIRST * 2 ** (self._repair_failures - 1))
                log.failure("repair attempt {attempt} failed; trying again in {delay:.0f}s",
                            level=LogLevel.warn, attempt=self._repair_failures,
                            delay=delay)
                self._repair_later(delay)
                return
            if self.config.replace_failed == "on":
                await self._replace(sorted(dead))
        finally:
            self.busy.release()

    async def _replace(self, failed: list[str]) -> None:
        """With replace-failed on, after a repair: as many servers join as failed (C{busy}
        held), idle registered ones first, else pool slots launched again, the failed ones'
        among them (their stores are cleared and filled by the join's copies). A replacement
        that fails is logged and left to an operator: the repair itself is done."""
        try:
            names = await self._add(len(failed), self.config.cache_strategy,
                                    self.config.cache_size)
        except CancelledError:
            raise
        except Exception as e:
            log.warn("could not replace {failed}: {error}; add servers with ecsclient addNode",
                     failed=", ".join(failed), error=e)
            return
        log.info("replaced {failed} with {names}", failed=", ".join(failed),
                 names=", ".join(names))

    def _repair_later(self, delay: float) -> None:
        if self._stopped:
            return
        if self._repair_retry is None or not self._repair_retry.active():
            self._repair_retry = self.clock.callLater(
                delay, lambda: self._spawn(self._repair()))

    # -- admin commands --------------------------------------------------------------------------

    def _claim(self) -> None:
        if self.busy.locked:
            op = self.operation
            raise AdminError(
                f"busy: {op.description if op else 'another operation'} is in progress; "
                "try again when it is done (see status)")

    async def add_nodes(self, count: int, cache_strategy: str, cache_size: int,
                        start: bool = False) -> list[str]:
        if count < 1:
            raise AdminError("count must be at least 1")
        from chainstore.cache import STRATEGIES
        if cache_strategy.upper() not in STRATEGIES:
            raise AdminError(f"unknown cache strategy {cache_strategy!r}: use FIFO, LRU or LFU")
        if cache_size < 0:
            raise AdminError("cache size must be 0 or more")
        self._claim()
        await self.busy.acquire()
        try:
            return await self._add(count, cache_strategy.upper(), cache_size, start)
        finally:
            self.busy.release()

    async def _add(self, count: int, cache_strategy: str, cache_size: int,
                   start: bool = False) -> list[str]:
        """Bring C{count} servers in and join them to the ring (C{busy} held)."""
        names = await self._bring_in(count, cache_strategy, cache_size)
        await self._reconfigure(self.state.live_members + names, f"adding {', '.join(names)}")
        for name in names:
            self.state.members[name].status = ACTIVE
        if start:
            if len(self.state.live_members) >= self.state.replication:
                self.state.serving = True
            else:
                log.warn("{count} servers, fewer than the replication factor {k}: the "
                         "service waits for more (addNode) before it starts",
                         count=len(self.state.live_members), k=self.state.replication)
        await self._save()
        await self._apply_states()
        return names

    async def _bring_in(self, count: int, cache_strategy: str, cache_size: int) -> list[str]:
        """Pick C{count} servers (idle registered ones, then pool slots), launched and empty."""
        idle = [m.name for m in self.state.members.values()
                if m.status == IDLE and m.name in self.links]
        chosen = idle[:count]
        # Before any ring was formed, a slot launching or idle and not registered is one a
        # first start cut short launched: free again.
        free = (REMOVED, FAILED) if self.state.formed else (REMOVED, FAILED, LAUNCHING, IDLE)
        free_slots = [s for s in self.config.nodes
                      if s.name not in self.links and s.name not in self.state.ring_members
                      and self.state.members.get(s.name, Member(s.name, "", 0, 0, REMOVED)).status
                      in free]
        needed = count - len(chosen)
        if needed > len(free_slots):
            raise AdminError(
                f"cannot add {count}: {len(idle)} idle registered server(s) and "
                f"{len(free_slots)} free node slot(s) in the pool")
        launched = []
        for slot in free_slots[:needed]:
            self.state.members[slot.name] = Member(
                slot.name, slot.host, slot.console_port, slot.amp_port, LAUNCHING, "pool",
                cache_strategy, cache_size)
            try:
                self.launcher.launch(slot, cache_strategy, cache_size)
            except Exception as e:
                self.state.members[slot.name].status = FAILED
                raise AdminError(f"could not launch {slot.name}: {e}") from None
            launched.append(slot.name)
        await self._save()
        try:
            await gatherResults([self._registered(n) for n in launched], consumeErrors=True)
        except Exception:
            if self._stopped:
                # The waits were cancelled, not timed out: the state is the next ECS's to judge
                # (it waits for the launched servers to register again, or relaunches them).
                raise CancelledError() from None
            for name in launched:
                if name not in self.links:
                    self.state.members[name].status = FAILED
                    self.launcher.stop(name)
            await self._save()
            missing = [n for n in launched if n not in self.links]
            raise AdminError(
                f"{', '.join(missing)} did not register within {self.config.register_timeout}s;"
                f" see {self.config.log_dir}/") from None
        chosen += launched
        for name in chosen:
            await self._call(name, control.ClearStores)
        return chosen

    def _registered(self, name: str, timeout: float | None = None) -> Deferred[None]:
        """Fires once C{name} registers; fails after C{timeout} (default register-timeout)."""
        if name in self.links:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.setdefault(name, []).append(d)
        d.addTimeout(self.config.register_timeout if timeout is None else timeout, self.clock)
        return d

    async def remove_node(self, name: str, force: bool = False) -> str:
        member = self.state.members.get(name)
        if member is None:
            known = ", ".join(sorted(self.state.members)) or "none"
            raise AdminError(f"unknown server {name!r}; known servers: {known}")
        if name not in self.state.ring_members:
            raise AdminError(f"{name} is not in the ring (it is {member.status})")
        if name in self.state.dead:
            raise AdminError(f"{name} has failed; the repair in progress takes it out")
        remaining = [n for n in self.state.live_members if n != name]
        if not remaining:
            raise AdminError(f"{name} is the last server in the ring; use shutDown instead")
        if len(remaining) < self.state.replication and not force:
            raise AdminError(
                f"removing {name} leaves {len(remaining)} servers, fewer than the replication "
                f"factor {self.state.replication}; add --force to remove it and stop the service")
        self._claim()
        await self.busy.acquire()
        try:
            await self._reconfigure(remaining, f"removing {name}")
            member.status = REMOVED
            if len(remaining) < self.state.replication:
                self.state.serving = False
            await self._save()
            if name in self.links:
                try:
                    await self._call(name, control.Shutdown)
                except Exception as e:
                    log.warn("{name} did not take its shutdown: {error}", name=name, error=e)
            self.links.pop(name, None)
            await self._set_states()
            return f"{name} removed; {len(remaining)} servers in the ring"
        finally:
            self.busy.release()

    async def set_serving(self, serving: bool) -> str:
        if serving and not self.state.ring_members:
            raise AdminError("there are no servers in the ring; add some with addNode")
        live = len(self.state.live_members)
        if serving and live < self.state.replication:
            raise AdminError(
                f"{live} live servers in the ring, fewer than the replication factor "
                f"{self.state.replication}: add servers first")
        self._claim()
        self.state.serving = serving
        await self._save()
        await self._apply_states()
        return f"{len(self.state.ring_members)} servers {'started' if serving else 'stopped'}"

    async def shut_down(self) -> str:
        self._claim()
        names = list(self.links)
        for name in names:
            try:
                await self._call(name, control.Shutdown)
            except Exception as e:
                log.warn("{name} did not take its shutdown: {error}", name=name, error=e)
        self.state.serving = False
        await self._save()
        self.clock.callLater(0.2, self.exit)
        return f"shut down {len(names)} servers and the ECS"

    def status(self) -> dict[str, Any]:
        """The C{Status} answer (see L{ecs.status.status_report}); "serving" only once every
        server has its state."""
        return status_report(self.state, self.links, self.last_seen, self.operation,
                             self.state.serving and not self._applying_states,
                             self.clock.seconds(), self.reports)

    # -- reconfiguration -------------------------------------------------------------------------

    async def _reconfigure(self, new_members: list[str], description: str,
                           returned: set[str] = frozenset()) -> None:
        """Take the cluster from the current ring to one of C{new_members}; dead members of the
        current ring take no part (see L{ecs.reconfiguration}). The caller holds C{busy}."""
        started = self.clock.seconds()
        try:
            await self.reconfigurer.run(new_members, description, returned)
        except BaseException:
            self.metrics.reconfigured(description, self.clock.seconds() - started, ok=False)
            raise
        self.metrics.reconfigured(description, self.clock.seconds() - started, ok=True)

    async def _set_states(self) -> None:
        await gatherResults([Deferred.fromCoroutine(self._sync(n)) for n in list(self.links)])

    async def _apply_states(self) -> None:
        """L{_set_states} after a change of whether the service serves: until every server has
        its state, Status does not say "serving" (a client that starts on it would be refused by
        a server still stopped)."""
        self._applying_states += 1
        try:
            await self._set_states()
        finally:
            self._applying_states -= 1

    # -- plumbing --------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return ring_to_wire(self.state.ring())

    def _call(self, name: str, command: type[amp.Command], timeout: float | None = CONTROL_TIMEOUT,
              **kwargs: Any) -> Deferred[Any]:
        return self.calls.call(name, command, timeout, **kwargs)

    def _save(self) -> Deferred[None]:
        epoch, ring_epoch = self.state.last_epoch, self.state.epoch

        def saved(_: None) -> None:
            self.committed_epoch = max(self.committed_epoch, epoch)
            self.saved_epoch = max(self.saved_epoch, ring_epoch)

        return self.state_file.save(self.state).addCallback(saved)

    def _spawn(self, coroutine: Any) -> Deferred[None]:
        """Run C{coroutine} as this ECS's background work, which L{_halt} cancels; the
        Deferred fires (with None) when it ends. A stopped ECS does not start it."""
        if self._stopped:
            coroutine.close()
            return succeed(None)
        task = Deferred.fromCoroutine(coroutine)
        self._tasks.add(task)

        def ended(result: Any) -> None:
            self._tasks.discard(task)
            # A stopped ECS's work ends in CancelledError, or in what the cancellation caused
            # (a launch it waited for failed, say): expected, not worth a line.
            if isinstance(result, Failure) and not self._stopped:
                log.failure("background task failed", result)

        return task.addBoth(ended)
