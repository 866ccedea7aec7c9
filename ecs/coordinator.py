"""The ECS's brain: membership, heartbeats and reconfiguration, free of sockets.

Servers reach it through links (their control connections, L{ecs.server.ECSProtocol}); admins
through the admin commands. Time comes from an injected clock, so the state machine is tested
with ``Clock`` and iosim.

Reconfiguration (join, leave, failure) follows one sequence, for any replication factor:

1. plan the data movement from the old ring to the new one (L{ecs.planner});
2. lock writes to every changing range at its old head (reads go on);
3. copy: for each target store, first drop the range there (a clean slate: leftovers of an
   aborted attempt must not survive), then stream or copy it locally, batch by batch;
4. lock reads of every changing range at its old tail, so no old tail can answer once the new
   chain accepts writes;
5. commit: save the new ring with a new epoch, then send it to every server (adopting a ring
   clears a server's locks); from here on the change is redone, never undone, after an ECS crash;
6. drop the data every server holds but no longer should.

A failure before step 5 aborts: the locks are released and the ring stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.protocols import amp

from chainstore import control
from chainstore.protocol import ring_to_wire
from chainstore.logs import get_logger
from chainstore.ring import RING_BITS, KeyRange, Ring
from ecs import planner
from ecs.config import ECSConfig
from ecs.protocol import AdminError
from ecs.state import ACTIVE, FAILED, IDLE, LAUNCHING, REMOVED, ClusterState, Member, StateFile

log = get_logger("ecs.coordinator")

CONTROL_TIMEOUT = 10.0


@dataclass
class Operation:
    """The reconfiguration in progress, for C{status}."""

    number: int
    description: str
    started: float
    keys: int = 0
    bytes: int = 0
    step: str = "planning"
    # per copy in flight: (keys, bytes) reported so far
    copies: dict[str, tuple[int, int]] = field(default_factory=dict)


class ECS:
    def __init__(self, config: ECSConfig, clock: IReactorTime, launcher: Any,
                 state_file: StateFile, exit: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.clock = clock
        self.launcher = launcher
        self.state_file = state_file
        self.exit = exit
        loaded = state_file.load()
        self.resumed = loaded is not None
        self.state = loaded or ClusterState(replication=config.replication)
        self.links: dict[str, amp.AMP] = {}
        self.last_seen: dict[str, float] = {}
        self._waiting: dict[str, list[Deferred[None]]] = {}
        self._failing: set[str] = set()
        # bumped on every failure, so a change in progress knows it must not commit
        self._failures = 0
        # control calls in flight, per server, to cancel when it fails
        self._inflight: dict[str, set[Deferred[Any]]] = {}
        self._returning: set[str] = set()
        self.busy = DeferredLock()
        self.operation: Operation | None = None
        self.last_reconfiguration: dict[str, Any] | None = None
        self._operations = 0
        # changes of whether to serve still being applied to the servers (Status waits for them)
        self._applying_states = 0
        self._started_at = clock.seconds()
        self.heartbeats = LoopingCall(self._heartbeat_tick)
        self.heartbeats.clock = clock

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start heartbeats and bring the ring back (or up, on a first start)."""
        self._started_at = self.clock.seconds()
        for name in self.state.ring_members:
            self.last_seen[name] = self._started_at
        # After a restart the servers come back at their reconnect back-off's pace (or must be
        # relaunched): they get register-timeout, not failure-timeout, before counting as
        # failed; without replicas a failure would hand their data to nobody.
        self._returning = set(self.state.ring_members) if self.resumed else set()
        self.heartbeats.start(self.config.heartbeat_interval, now=False)
        return Deferred.fromCoroutine(self._bring_up())

    async def _bring_up(self) -> None:
        try:
            if self.resumed:
                await self._resume()
            elif self.config.initial_nodes:
                await self.add_nodes(self.config.initial_nodes, self.config.cache_strategy,
                                     self.config.cache_size, start=True)
        except Exception as e:
            log.error("could not bring the ring up: {error}", error=e)

    async def _resume(self) -> None:
        # A fresh epoch for the same ring: every server that reconnects adopts it, which also
        # clears any lock an interrupted reconfiguration left behind.
        self.state.epoch = self.state.allocate_epoch()
        self._save()
        log.info("resumed epoch {epoch} with ring {ring}", epoch=self.state.epoch,
                 ring=self.state.ring_members)
        # Servers that outlived the ECS reconnect by themselves: relaunching them at once
        # would start a second process on the same stores and ports. Wait for them first.
        absent = [n for n in self.state.ring_members if n not in self.links
                  and self.state.members[n].origin == "pool" and self.config.slot(n)]
        if absent:
            await DeferredList([self._registered(n) for n in absent], consumeErrors=True)
        for name in absent:
            member = self.state.members[name]
            slot = self.config.slot(name)
            if name not in self.links and slot is not None:
                try:
                    self.launcher.launch(slot, member.cache_strategy, member.cache_size)
                    self.last_seen[name] = self.clock.seconds()
                except Exception as e:
                    log.warn("not relaunching {name}: {error}", name=name, error=e)
        for name in list(self.links):
            await self._sync(name)

    def stop(self) -> Deferred[Any]:
        if self.heartbeats.running:
            self.heartbeats.stop()
        return self.launcher.stop_all()

    # -- servers ---------------------------------------------------------------------------------

    def register(self, link: amp.AMP, name: str, host: str, console_port: int, amp_port: int,
                 epoch: int) -> str:
        address = (host, console_port, amp_port)
        for other in self.state.members.values():
            if other.name != name and (other.host, other.console_port) == (host, console_port) \
                    and other.status in (ACTIVE, IDLE, LAUNCHING):
                raise control.RegistrationRefused(
                    f"console address {host}:{console_port} belongs to {other.name}")
        member = self.state.members.get(name)
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
        if name in self.state.dead and self._may_revive(name):
            # Every replica of its ranges went down (a whole-cluster outage): it holds every
            # acknowledged write of them, so it rejoins as it is rather than losing them.
            self.state.dead.discard(name)
            self.state.epoch = self.state.allocate_epoch()
            member.status = ACTIVE
            self._failing.discard(name)
            log.warn("epoch {epoch}: {name} is back and every replica of its ranges was down: "
                     "it rejoins its chains", epoch=self.state.epoch, name=name)
            revived = True
        else:
            revived = False
        self._save()
        self.links[name] = link
        self._returning.discard(name)
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
            if self.state.ring_members:
                await self._call(name, control.SetMetadata, **self._metadata())
            serving = self.state.serving and name in self.state.ring_members
            await self._call(name, control.SetState, state="running" if serving else "stopped")
        except Exception as e:
            log.warn("could not update {name}: {error}", name=name, error=e)

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
                               epoch=self.state.epoch)
                d.addCallbacks(self._heard, lambda f: None, (name,))
            for name in list(self.state.ring_members):
                silent = now - self.last_seen.get(name, self._started_at)
                limit = self.config.failure_timeout
                if name in self._returning:
                    limit += self.config.register_timeout
                if silent > limit and name not in self._failing:
                    if name in self.state.dead:
                        continue
                    self._failing.add(name)
                    log.warn("{name} missed heartbeats for {silent:.1f}s: treating it as failed",
                             name=name, silent=silent)
                    self._declare_failed(name)
        except Exception:
            log.failure("heartbeat round failed")

    def _heard(self, reply: dict[str, Any], name: str) -> None:
        self.last_seen[name] = self.clock.seconds()
        if name in self.state.ring_members and reply["epoch"] < self.state.epoch \
                and not self.busy.locked:
            self._spawn(self._sync(name))

    def _declare_failed(self, name: str) -> None:
        """Mark C{name} dead at once (chains skip it), then repair in the background."""
        self._failures += 1
        # A change in progress may be waiting on the failed server: fail those calls now, so
        # the change aborts instead of hanging.
        for d in list(self._inflight.get(name, ())):
            d.cancel()
        self._spawn(self._mark_dead(name))

    async def _mark_dead(self, name: str) -> None:
        try:
            if name not in self.state.ring_members or name in self.state.dead:
                return
            self.state.epoch = self.state.allocate_epoch()
            self.state.dead.add(name)
            self.state.members[name].status = FAILED
            self._save()
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
            metadata = self._metadata()
            for server in clockwise:
                if server in self.links:
                    try:
                        await self._call(server, control.SetMetadata, **metadata)
                    except Exception as e:
                        log.warn("could not tell {server} that {name} is dead: {error}",
                                 server=server, name=name, error=e)
        finally:
            self._failing.discard(name)
        self._spawn(self._repair())

    async def _repair(self) -> None:
        """Take dead members out of the ring, copying their data to restore the chains."""
        await self.busy.acquire()
        try:
            for attempt in range(1, 6):
                dead = self.state.dead & set(self.state.ring_members)
                if not dead:
                    return
                remaining = [n for n in self.state.ring_members if n not in dead]
                # Dead members that registered again may give their data to ranges nobody else
                # holds any more (nothing was written there since they went down).
                returned = {name for name in dead if name in self.links}
                orphaned = self._orphaned(returned) if self.state.replication > 1 else []
                if orphaned:
                    # Taking them out would drop the last copies of these ranges: wait for one
                    # of their replicas to come back (see register).
                    log.error("not repairing: every replica of {count} range(s) is down "
                              "({names}); waiting for one of them to come back",
                              count=len(orphaned), names=", ".join(sorted(dead)))
                    return
                try:
                    await self._reconfigure(
                        remaining, f"repair after the failure of {', '.join(sorted(dead))}",
                        returned)
                    for name in returned:
                        # Back and registered, now out of the ring: ready to be added again.
                        self.state.members[name].status = IDLE
                    self._save()
                    return
                except Exception as e:
                    log.warn("repair attempt {attempt} failed: {error}", attempt=attempt,
                             error=e)
                    await deferLater(self.clock, attempt * 1.0, lambda: None)
        finally:
            self.busy.release()

    def _orphaned(self, returned: set[str] = frozenset()) -> list[Any]:
        """Ranges of the current ring whose every replica is dead and none of them is back.
        (With replication 1 any failure is handled like a removal: its data is gone.)"""
        ring = self.state.ring()
        return [ring.range_of(i) for i in range(len(ring.nodes))
                if not ring.chain_for_index(i)
                and not {n.name for n in ring.ring_chain(i)} & returned]

    def _may_revive(self, name: str) -> bool:
        """Whether dead member C{name} can rejoin its chains as it is: only if every chain it is
        in has no live member, so nothing was written there while it was away."""
        ring = self.state.ring()
        names = [n.name for n in ring.nodes]
        if name not in names:
            return False
        me = names.index(name)
        for position in range(ring.chain_length):
            owner = (me - position) % len(names)
            if ring.chain_for_index(owner):
                return False
        return True

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
            names = await self._bring_in(count, cache_strategy.upper(), cache_size)
            await self._reconfigure(self.state.live_members + names,
                                    f"adding {', '.join(names)}")
            for name in names:
                self.state.members[name].status = ACTIVE
            if start:
                if len(self.state.live_members) >= self.state.replication:
                    self.state.serving = True
                else:
                    log.warn("{count} servers, fewer than the replication factor {k}: the "
                             "service waits for more (addNode) before it starts",
                             count=len(self.state.live_members), k=self.state.replication)
            self._save()
            await self._apply_states()
            return names
        finally:
            self.busy.release()

    async def _bring_in(self, count: int, cache_strategy: str, cache_size: int) -> list[str]:
        """Pick C{count} servers (idle registered ones, then pool slots), launched and empty."""
        idle = [m.name for m in self.state.members.values()
                if m.status == IDLE and m.name in self.links]
        chosen = idle[:count]
        free_slots = [s for s in self.config.nodes
                      if s.name not in self.links and s.name not in self.state.ring_members
                      and self.state.members.get(s.name, Member(s.name, "", 0, 0, REMOVED)).status
                      in (REMOVED, FAILED)]
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
        self._save()
        try:
            await gatherResults([self._registered(n) for n in launched], consumeErrors=True)
        except Exception:
            for name in launched:
                if name not in self.links:
                    self.state.members[name].status = FAILED
                    self.launcher.stop(name)
            self._save()
            missing = [n for n in launched if n not in self.links]
            raise AdminError(
                f"{', '.join(missing)} did not register within {self.config.register_timeout}s;"
                f" see {self.config.log_dir}/") from None
        chosen += launched
        for name in chosen:
            await self._call(name, control.ClearStores)
        return chosen

    def _registered(self, name: str) -> Deferred[None]:
        if name in self.links:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.setdefault(name, []).append(d)
        d.addTimeout(self.config.register_timeout, self.clock)
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
            self._save()
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
        self._save()
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
        self._save()
        self.clock.callLater(0.2, self.exit)
        return f"shut down {len(names)} servers and the ECS"

    def status(self) -> dict[str, Any]:
        now = self.clock.seconds()
        ring = self.state.ring()
        ranges = {n.name: ring.range_of(i) for i, n in enumerate(ring.nodes)}
        members = []
        for m in sorted(self.state.members.values(), key=lambda m: m.name):
            entry: dict[str, Any] = {
                "name": m.name, "status": m.status, "origin": m.origin,
                "console": f"{m.host}:{m.console_port}", "amp": f"{m.host}:{m.amp_port}",
                "connected": m.name in self.links,
            }
            if m.name in self.last_seen:
                entry["last_heartbeat_s"] = round(now - self.last_seen[m.name], 2)
            if m.name in ranges:
                entry["range"] = [f"{ranges[m.name].start:032X}", f"{ranges[m.name].end:032X}"]
                entry["position"] = f"{ranges[m.name].end:032X}"
            members.append(entry)
        op = self.operation
        return {
            "epoch": self.state.epoch,
            "serving": self.state.serving and not self._applying_states,
            "replication": self.state.replication,
            "degraded": bool(self.state.ring_members)
                        and len(self.state.live_members) < self.state.replication,
            "ring": [n.name for n in ring.nodes],
            "dead": sorted(ring.dead),
            "members": members,
            "operation": None if op is None else {
                "description": op.description, "step": op.step,
                "keys_moved": op.keys + sum(k for k, _ in op.copies.values()),
                "bytes_moved": op.bytes + sum(b for _, b in op.copies.values()),
                "seconds": round(now - op.started, 2),
            },
        }

    # -- reconfiguration -------------------------------------------------------------------------

    def _placed(self, new_members: list[str]) -> dict[str, int | None]:
        """The ring positions of C{new_members}: members of the current ring keep theirs; with
        placement "balanced", the first servers are spread evenly and each later one goes to the
        middle of the largest range (with "hash", None: the MD5 of the console address)."""
        members = self.state.members
        current = set(self.state.ring_members)
        tokens: dict[str, int | None] = {n: members[n].token for n in new_members if n in current}
        joining = [n for n in new_members if n not in current]
        if self.config.placement != "balanced" or not joining:
            return {**tokens, **{n: None for n in joining}}
        taken = [members[n].info.position for n in tokens]
        if not taken:
            # Evenly from where the first one's address hashes to.
            start, step = members[joining[0]].info.position, (1 << RING_BITS) // len(joining)
            return {n: (start + i * step) % (1 << RING_BITS) for i, n in enumerate(joining)}
        for name in joining:
            ordered = sorted(taken)
            gaps = [((ordered[(i + 1) % len(ordered)] - p) % (1 << RING_BITS) or 1 << RING_BITS, p)
                    for i, p in enumerate(ordered)]
            size, after = max(gaps)
            token = (after + size // 2) % (1 << RING_BITS)
            log.info("placing {name} at {token:032X}, the middle of the largest range "
                     "({share:.1%} of the ring)", name=name, token=token,
                     share=size / (1 << RING_BITS))
            tokens[name] = token
            taken.append(token)
        return tokens

    async def _reconfigure(self, new_members: list[str], description: str,
                           returned: set[str] = frozenset()) -> None:
        """Take the cluster from the current ring to one of C{new_members} (see the module
        docstring); dead members of the current ring take no part."""
        dead = set(self.state.dead)
        old = self.state.ring()
        epoch = self.state.allocate_epoch()
        tokens = self._placed(new_members)
        new = Ring(tuple(replace(self.state.members[n].info, token=tokens.get(n))
                         for n in new_members),
                   epoch=epoch, replication=self.state.replication)
        plan = planner.plan(old, new, dead, returned)
        failures = self._failures
        self._operations += 1
        op = self.operation = Operation(self._operations, description, self.clock.seconds())
        # Save the allocation first: even if we crash now, the epoch is never handed out twice.
        self._save()
        log.info("epoch {epoch}: {description}: {copies} copies, {moves} local moves, "
                 "{drops} drops", epoch=epoch, description=description,
                 copies=len(plan.copies), moves=len(plan.moves), drops=len(plan.drops))
        for rng in plan.lost:
            log.error("range {start:032X}-{end:032X} had no surviving replica: its data is lost",
                      start=rng.start, end=rng.end)
        locked: list[tuple[str, list[KeyRange], bool]] = []
        trackers: list[tuple[str, int, planner.Copy | planner.LocalMove]] = []
        locked_at: float | None = None
        try:
            # 1. The bulk of the data moves while writes go on; each source records the keys
            #    written meanwhile.
            op.step = "copying"
            for move in plan.moves:
                result = await self._call(move.server, control.TrackWrites,
                                          store=move.source_store, start=move.range.start,
                                          end=move.range.end)
                trackers.append((move.server, result["tracker"], move))
                await self._call(move.server, control.DropRange, timeout=None,
                                 store=move.target_store, start=move.range.start,
                                 end=move.range.end)
                await self._call(move.server, control.MoveLocal, timeout=None,
                                 source=move.source_store, target=move.target_store,
                                 start=move.range.start, end=move.range.end)
            for copy in plan.copies:
                result = await self._call(copy.source, control.TrackWrites,
                                          store=copy.source_store, start=copy.range.start,
                                          end=copy.range.end)
                trackers.append((copy.source, result["tracker"], copy))
                await self._call(copy.target, control.DropRange, timeout=None,
                                 store=copy.target_store, start=copy.range.start,
                                 end=copy.range.end)
                result = await self._copy(op, copy, epoch)
                op.copies.clear()
                op.keys += result["keys"]
                op.bytes += result["bytes"]
            # 1b. One more unlocked pass: the keys written during the bulk copy move again while
            #     fresh trackers record the writes of this (much shorter) pass, so what is left
            #     for the locked pass below depends on the write rate, not on the data size.
            op.step = "catching up"
            renewed = []
            for server, tracker, item in trackers:
                source_store = item.source_store
                result = await self._call(server, control.TrackWrites, store=source_store,
                                          start=item.range.start, end=item.range.end)
                renewed.append((server, result["tracker"], item))
                await self._catch_up(op, epoch, server, tracker, item)
            trackers = renewed
            self._check(failures)
            # 2. Writes to the changing ranges stop at their heads, and what is in flight
            #    reaches the tails, so every replica is identical.
            op.step = "locking writes"
            locked_at = self.clock.seconds()
            for server, ranges in plan.write_locks.items():
                await self._call(server, control.LockRanges, ranges=_wire(ranges), reads=False)
                locked.append((server, ranges, False))
            for server in plan.write_locks:
                await self._call(server, control.DrainWrites, timeout=30.0)
            # 3. Only the keys written since the last pass move again.
            op.step = "final catch-up"
            while trackers:
                server, tracker, item = trackers.pop(0)
                await self._catch_up(op, epoch, server, tracker, item)
            self._check(failures)
            # 4. The old tails stop reading for the switch itself.
            op.step = "switching"
            for server, ranges in plan.read_locks.items():
                await self._call(server, control.LockRanges, ranges=_wire(ranges), reads=True)
                locked.append((server, ranges, True))
            self._check(failures)
        except Exception as e:
            log.error("{description} aborted at {step}: {error}", description=description,
                      step=op.step, error=e)
            for server, tracker, _ in trackers:
                self._call(server, control.StopTracking, tracker=tracker).addErrback(
                    lambda f: None)
            await self._unlock(locked)
            self.operation = None
            raise AdminError(f"{description} failed while {op.step}: {e}") from None
        # 5. Commit point: from here the change is completed, never undone.
        self.state.epoch = epoch
        for name, member in self.state.members.items():
            # A server that leaves the ring gives its position up; back later, it is placed anew.
            member.token = tokens.get(name) if name in new_members else None
        self.state.ring_members = list(new_members)
        self.state.dead &= set(new_members)
        self._save()
        metadata = self._metadata()
        await gatherResults(
            [self._call(n, control.SetMetadata, **metadata).addErrback(_warn, n)
             for n in set(new_members) | (set(old_members(old)) - dead)],
        )
        write_locked = 0.0 if locked_at is None else self.clock.seconds() - locked_at
        if self.state.serving:
            # Joined servers hold their ranges now; left stopped until the drops below are
            # done, they would keep those ranges unavailable for as long as the drops take.
            joined = [n for n in new_members if n not in old_members(old)]
            await gatherResults([self._call(n, control.SetState, state="running")
                                 .addErrback(_not_started, n) for n in joined])
        # 6. Drop what no store should hold any more.
        op.step = "dropping moved data"
        for drop in plan.drops:
            try:
                await self._call(drop.server, control.DropRange, timeout=None, store=drop.store,
                                 start=drop.range.start, end=drop.range.end)
            except Exception as e:
                log.warn("could not drop {store} data on {server}: {error}", store=drop.store,
                         server=drop.server, error=e)
        elapsed = self.clock.seconds() - op.started
        log.info("epoch {epoch}: {description} done in {elapsed:.2f}s, moved {keys} keys "
                 "({nbytes} bytes); writes to the moved ranges were refused for "
                 "{locked:.3f}s", epoch=epoch, description=description, elapsed=elapsed,
                 keys=op.keys, nbytes=op.bytes, locked=write_locked)
        self.last_reconfiguration = {"description": description, "seconds": elapsed,
                                     "keys": op.keys, "bytes": op.bytes,
                                     "write_locked_seconds": write_locked}
        self.operation = None

    async def _catch_up(self, op: Operation, epoch: int, server: str, tracker: int,
                        item: planner.Copy | planner.LocalMove) -> None:
        """Send again the keys C{tracker} recorded (current values, or deletions)."""
        if isinstance(item, planner.LocalMove):
            await self._call(server, control.MoveLocal, timeout=None,
                             source=item.source_store, target=item.target_store,
                             start=item.range.start, end=item.range.end, tracker=tracker)
        else:
            await self._copy(op, item, epoch, tracker)

    def _copy(self, op: Operation, copy: planner.Copy, epoch: int,
              tracker: int | None = None) -> Deferred[dict[str, int]]:
        target = self.state.members[copy.target]
        extra = {} if tracker is None else {"tracker": tracker}
        return self._call(
            copy.source, control.CopyRange, timeout=None, operation=op.number,
            store=copy.source_store, start=copy.range.start, end=copy.range.end,
            target_host=target.host, target_port=target.amp_port,
            target_store=copy.target_store, epoch=epoch, **extra)

    def _check(self, failures: int) -> None:
        if self._failures != failures:
            raise control.ControlFailed("a server failed while the change was running")

    async def _unlock(self, locked: list[tuple[str, list[KeyRange], bool]]) -> None:
        for server, ranges, reads in locked:
            try:
                await self._call(server, control.UnlockRanges, ranges=_wire(ranges), reads=reads)
            except Exception as e:
                log.warn("could not unlock {server}: {error}", server=server, error=e)

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
        link = self.links.get(name)
        if link is None:
            return _failed(control.ControlFailed(f"{name} is not connected to the ECS"))
        d = link.callRemote(command, **kwargs)
        if timeout is not None:
            d.addTimeout(timeout, self.clock)
        inflight = self._inflight.setdefault(name, set())
        inflight.add(d)

        def done(result: Any) -> Any:
            inflight.discard(d)
            return result

        return d.addBoth(done)

    def _save(self) -> None:
        self.state_file.save(self.state)

    def _spawn(self, coroutine: Any) -> None:
        Deferred.fromCoroutine(coroutine).addErrback(
            lambda f: log.failure("background task failed", f))


def old_members(ring: Ring) -> list[str]:
    return [n.name for n in ring.nodes]


def _wire(ranges: list[KeyRange]) -> list[dict[str, int]]:
    return [{"start": r.start, "end": r.end} for r in ranges]


def _warn(failure: Any, name: str) -> None:
    log.warn("could not send the new ring to {name}: {error}", name=name,
             error=failure.getErrorMessage())


def _not_started(failure: Any, name: str) -> None:
    log.warn("could not start {name}: {error}", name=name, error=failure.getErrorMessage())


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
