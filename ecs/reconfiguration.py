"""The ECS's ring changes: one sequence for a join, a leave or a repair, for any replication
factor (see "Reconfiguration" in docs/DESIGN.md). The servers are placed on the new ring
(L{ecs.placement}) and the data movement from the old ring to the new one is planned
(L{ecs.planner}); then, numbered as in L{Reconfigurer.run}:

1. copy while writes go on: each source starts a write tracker on the range; for each target
   store the range is first dropped there (a clean slate: leftovers of an aborted attempt must
   not survive), then streamed or moved locally, batch by batch; the wipe also fences the
   target: it takes batches only of this attempt (its epoch), never a late one of an aborted
   attempt;
1b. catch up, still unlocked: fresh trackers start and the keys written during the bulk copy
   move again;
2. lock writes to every changing range at its old head (reads go on) and drain them to the
   tails;
3. move again the keys written during the unlocked pass;
4. lock reads of every changing range at its old tail, so no old tail can answer once the new
   chain accepts writes;
5. commit: save the new ring with its epoch, then send it to every server (adopting a ring
   clears a server's locks); from here on the change is completed, never undone;
6. drop the data every server holds but no longer should.

A failure before the commit (a call failing, or a server failing meanwhile) aborts: the
trackers stop, the locks are released and the ring stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import LogLevel

from chainstore import control
from chainstore.logs import get_logger
from chainstore.ring import KeyRange, Ring
from ecs import planner
from ecs.etcd_state import Deposed
from ecs.placement import place
from ecs.protocol import AdminError
from ecs.state import ClusterState

# The ECS's log lines keep the namespace they always had, whichever module now holds the code:
# operators and bench.reconfig read the ECS log as one voice.
log = get_logger("ecs.coordinator")

# A new ring (a commit, a death) whose save failed is saved again after 1 s, then 2, 4, ...
# up to 30 s (save_until_saved).
SAVE_RETRY_FIRST = 1.0
SAVE_RETRY_MAX = 30.0


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


class Reconfigurer:
    """Runs the ring changes of one ECS and keeps what C{status} shows of them: the
    L{operation} in progress (None between changes) and the summary of the L{last} one.

    It runs one change at a time: its caller holds the ECS's busy lock. It reaches the servers
    through C{call} (the ECS's control call: C{call(name, command, timeout=..., **arguments)}),
    saves C{state} with C{save}, sends C{metadata()} as the new ring, and aborts a change if
    C{failures()} (a count the ECS bumps on every server failure) moves while it runs, or if
    C{link_of(name)} (a server's control link, None if none) changes for a server it locked.
    """

    def __init__(self, state: ClusterState, clock: IReactorTime,
                 call: Callable[..., Deferred[Any]], save: Callable[[], Deferred[None]],
                 metadata: Callable[[], dict[str, Any]], failures: Callable[[], int],
                 placement: str, link_of: Callable[[str], Any] = lambda name: None,
                 copies_beside_moves: bool = False) -> None:
        self.state = state
        self.clock = clock
        self._call = call
        self._save = save
        self._metadata = metadata
        self._failures = failures
        self._link_of = link_of
        self.placement = placement
        self.copies_beside_moves = copies_beside_moves
        self.operation: Operation | None = None
        self.last: dict[str, Any] | None = None
        self._operations = 0

    async def run(self, new_members: list[str], description: str,
                  returned: set[str] = frozenset()) -> None:
        """Take the cluster from the current ring to one of C{new_members} (see the module
        docstring); dead members of the current ring take no part.

        Raises L{AdminError} if the change aborted before its commit (the old ring stays).
        """
        dead = set(self.state.dead)
        old = self.state.ring()
        epoch = self.state.allocate_epoch()
        tokens = place(self.state.members, self.state.ring_members, new_members,
                       self.placement)
        placed = Ring(tuple(replace(self.state.members[n].info, token=tokens.get(n))
                            for n in new_members),
                      epoch=epoch, replication=self.state.replication)
        # The chains' formation epochs follow from the placed ring's order.
        formed = planner.chain_epochs(old, placed)
        new = Ring(tuple(replace(n, chain_epoch=formed[n.name]) for n in placed.nodes),
                   epoch=epoch, replication=self.state.replication)
        plan = planner.plan(old, new, dead, returned, self.state.departures())
        failures = self._failures()
        self._operations += 1
        op = self.operation = Operation(self._operations, description, self.clock.seconds())
        # Save the allocation first: even if we crash now, the epoch is never handed out twice.
        await self._save()
        log.info("epoch {epoch}: {description}: {copies} copies, {moves} local moves, "
                 "{drops} drops", epoch=epoch, description=description,
                 copies=len(plan.copies), moves=len(plan.moves), drops=len(plan.drops))
        for rng in plan.lost:
            log.error("range {start:032X}-{end:032X} had no surviving replica: its data is lost",
                      start=rng.start, end=rng.end)
        locked: list[tuple[str, list[KeyRange], bool]] = []
        trackers: list[tuple[str, int, planner.Copy | planner.LocalMove]] = []
        renewed: list[tuple[str, int, planner.Copy | planner.LocalMove]] = []
        locked_at: float | None = None
        try:
            # 1. The bulk of the data moves while writes go on; each source records the keys
            #    written meanwhile. One move or copy at a time (or, with copies-beside-moves,
            #    a move and a copy): side by side they finish sooner but take the CPUs from
            #    the writes going on, whose latency is what the clients see (docs/DESIGN.md,
            #    "Where a writer's time goes").
            op.step = "copying"
            await self._by_server(self._bulk_lanes(op, epoch, plan, trackers))
            # 1b. One more unlocked pass: the keys written during the bulk copy move again while
            #     fresh trackers record the writes of this (much shorter) pass, so what is left
            #     for the locked pass below depends on the write rate, not on the data size.
            #     Still one at a time, as bulk work: at a million keys this pass moves thousands
            #     of keys per range.
            op.step = "catching up"
            for server, tracker, item in trackers:
                result = await self._call(server, control.TrackWrites, store=item.source_store,
                                          start=item.range.start, end=item.range.end)
                renewed.append((server, result["tracker"], item))
                await self._catch_up(op, epoch, server, tracker, item)
            trackers[:], renewed[:] = renewed, []
            self._check(failures)
            # 2. Writes to the changing ranges stop at their heads, and what is in flight
            #    reaches the tails, so every replica is identical. Every lock is in place
            #    before any drain begins: a head locked late could take a write after its
            #    drain had been answered.
            op.step = "locking writes"
            locked_at = self.clock.seconds()
            # A server whose link drops keeps the locks it was given until the ECS sends it
            # the ring over a new link; sent before the commit, that ring would lift them
            # while the change goes on. So a change whose locked server changed links aborts.
            links = {server: self._link_of(server)
                     for server in (*plan.write_locks, *plan.read_locks)}
            # Listed before they are sent: an abort unlocks a lock whose answer it never saw.
            locked.extend((server, ranges, False) for server, ranges in plan.write_locks.items())
            await self._together(
                [self._call(server, control.LockRanges, ranges=_wire(ranges), reads=False)
                 for server, ranges in plan.write_locks.items()])
            await self._together([self._call(server, control.DrainWrites, timeout=30.0)
                                  for server in plan.write_locks])
            # 3. Only the keys written since the last pass move again, every server at once
            #    (each its own in turn): writes are refused meanwhile.
            op.step = "final catch-up"
            work: dict[str, list[Callable[[], Coroutine[Any, Any, None]]]] = {}
            for server, tracker, item in trackers:
                work.setdefault(server, []).append(
                    lambda s=server, t=tracker, i=item: self._catch_up(op, epoch, s, t, i))
            trackers.clear()
            await self._by_server(work)
            self._check(failures, links)
            # 4. The old tails stop reading for the switch itself.
            op.step = "switching"
            locked.extend((server, ranges, True) for server, ranges in plan.read_locks.items())
            await self._together(
                [self._call(server, control.LockRanges, ranges=_wire(ranges), reads=True)
                 for server, ranges in plan.read_locks.items()])
            # Nothing may wait between this check and the commit below.
            self._check(failures, links)
        except CancelledError:
            # The ECS stopped: no abort (its calls would fail). The next ECS's ring, sent over
            # a new link, lifts the locks, as after a crash.
            self.operation = None
            raise
        except Exception as e:
            log.failure("{description} aborted at {step}", level=LogLevel.error,
                        description=description, step=op.step)
            for server, tracker, _ in trackers + renewed:
                self._call(server, control.StopTracking, tracker=tracker).addErrback(
                    lambda f: None)
            await self._unlock(locked)
            self.operation = None
            raise AdminError(f"{description} failed while {op.step}: {e}") from None
        # 5. Commit point: from here the change is completed, never undone.
        self.state.epoch = epoch
        for name, member in self.state.members.items():
            # A server that leaves the ring gives its position up; back later, it is placed anew.
            node = new.node(name) if name in new_members else None
            member.token = None if node is None else node.token
            member.chain_epoch = 0 if node is None else node.chain_epoch
        self.state.ring_members = list(new_members)
        self.state.formed = self.state.formed or bool(new_members)
        self.state.dead &= set(new_members)
        # Saved before anything is sent, even if it takes several tries: the locks hold meanwhile.
        await save_until_saved(self._save, self.clock, epoch)
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
            await self._drop(drop)
        elapsed = self.clock.seconds() - op.started
        log.info("epoch {epoch}: {description} done in {elapsed:.2f}s, moved {keys} keys "
                 "({nbytes} bytes); writes to the moved ranges were refused for "
                 "{locked:.3f}s", epoch=epoch, description=description, elapsed=elapsed,
                 keys=op.keys, nbytes=op.bytes, locked=write_locked)
        self.last = {"description": description, "seconds": elapsed,
                                     "keys": op.keys, "bytes": op.bytes,
                                     "write_locked_seconds": write_locked}
        self.operation = None

    async def _by_server(
            self, work: dict[str, list[Callable[[], Coroutine[Any, Any, None]]]]) -> None:
        """Run each lane's steps in order, every lane at once (a lane per server, or per kind
        of bulk step). Once a step fails, no lane begins another: the change aborts once those
        under way have ended."""
        failed = False

        async def in_turn(steps: list[Callable[[], Coroutine[Any, Any, None]]]) -> None:
            nonlocal failed
            for step in steps:
                if failed:
                    return
                try:
                    await step()
                except BaseException:
                    failed = True
                    raise

        await self._together([Deferred.fromCoroutine(in_turn(steps))
                              for steps in work.values()])

    @staticmethod
    async def _together(running: list[Deferred[Any]]) -> None:
        """Wait for every one of C{running}, then raise the first error if any failed.

        None is cancelled: a call under way may already have changed its server (a tracker
        started, a range wiped), and the abort must know of it to undo it."""
        results = await DeferredList(running, consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()

    def _bulk_lanes(self, op: Operation, epoch: int, plan: planner.Plan,
                    trackers: list[tuple[str, int, planner.Copy | planner.LocalMove]],
                    ) -> dict[str, list[Callable[[], Coroutine[Any, Any, None]]]]:
        """The bulk steps in lanes, each one step at a time: the local moves, then the copies;
        with C{copies_beside_moves}, the copies in a lane of their own beside the moves, but
        for a copy that touches keys of a store a move writes or reads (its target's, or its
        source's where the move writes): that one goes after the moves, in their lane, as when
        everything ran in turn, so that its wipe never meets the move."""
        moves = [lambda move=move: self._move(epoch, move, trackers) for move in plan.moves]
        beside: list[Callable[[], Coroutine[Any, Any, None]]] = []
        after: list[Callable[[], Coroutine[Any, Any, None]]] = []
        for copy in plan.copies:
            meets = not self.copies_beside_moves or any(_meet(copy, m) for m in plan.moves)
            (after if meets else beside).append(
                lambda copy=copy: self._bulk_copy(op, epoch, copy, trackers))
        return {"moves": moves + after, "copies": beside}

    async def _move(self, epoch: int, move: planner.LocalMove,
                    trackers: list[tuple[str, int, planner.Copy | planner.LocalMove]]) -> None:
        result = await self._call(move.server, control.TrackWrites, store=move.source_store,
                                  start=move.range.start, end=move.range.end)
        trackers.append((move.server, result["tracker"], move))
        await self._call(move.server, control.DropRange, timeout=None, store=move.target_store,
                         start=move.range.start, end=move.range.end)
        began = self.clock.seconds()
        result = await self._call(move.server, control.MoveLocal, timeout=None,
                                  source=move.source_store, target=move.target_store,
                                  start=move.range.start, end=move.range.end)
        log.info("epoch {epoch}: moved {keys} keys from {source} to {target} on "
                 "{server} in {seconds:.3f}s", epoch=epoch, keys=result["keys"],
                 source=move.source_store, target=move.target_store,
                 server=move.server, seconds=self.clock.seconds() - began)

    async def _bulk_copy(self, op: Operation, epoch: int, copy: planner.Copy,
                         trackers: list[tuple[str, int, planner.Copy | planner.LocalMove]],
                         ) -> None:
        result = await self._call(copy.source, control.TrackWrites, store=copy.source_store,
                                  start=copy.range.start, end=copy.range.end)
        trackers.append((copy.source, result["tracker"], copy))
        # The wipe prepares the target for this attempt: from now on it refuses batches of
        # any other (a late one of an aborted attempt must not land).
        await self._call(copy.target, control.DropRange, timeout=None,
                         store=copy.target_store, start=copy.range.start, end=copy.range.end,
                         attempt=epoch)
        began = self.clock.seconds()
        result = await self._copy(op, copy, epoch)
        log.info("epoch {epoch}: copied {keys} keys ({nbytes} bytes) from {source} "
                 "{source_store} to {target} {target_store} in {seconds:.3f}s",
                 epoch=epoch, keys=result["keys"], nbytes=result["bytes"],
                 source=copy.source, source_store=copy.source_store,
                 target=copy.target, target_store=copy.target_store,
                 seconds=self.clock.seconds() - began)
        op.copies.clear()
        op.keys += result["keys"]
        op.bytes += result["bytes"]

    async def _drop(self, drop: planner.Drop) -> None:
        try:
            await self._call(drop.server, control.DropRange, timeout=None, store=drop.store,
                             start=drop.range.start, end=drop.range.end)
        except CancelledError:
            raise  # the ECS stopped
        except Exception as e:
            log.warn("could not drop {store} data on {server}: {error}", store=drop.store,
                     server=drop.server, error=e)

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

    def _check(self, failures: int, links: dict[str, Any] | None = None) -> None:
        if self._failures() != failures:
            raise control.ControlFailed("a server failed while the change was running")
        for server, link in (links or {}).items():
            if self._link_of(server) is not link:
                raise control.ControlFailed(
                    f"the link to {server} dropped while it held this change's locks")

    async def _unlock(self, locked: list[tuple[str, list[KeyRange], bool]]) -> None:
        for server, ranges, reads in locked:
            try:
                await self._call(server, control.UnlockRanges, ranges=_wire(ranges), reads=reads)
            except Exception as e:
                log.warn("could not unlock {server}: {error}", server=server, error=e)


async def save_until_saved(save: Callable[[], Deferred[None]], clock: IReactorTime,
                           epoch: int) -> None:
    """C{save()} again after a failure (a full disk, an etcd request that timed out) until it
    succeeds, waiting L{SAVE_RETRY_FIRST} doubling up to L{SAVE_RETRY_MAX}. Until then the
    ring of C{epoch} reaches no server (L{ecs.coordinator.ECS.saved_epoch}): sent unsaved, it
    took writes that an ECS restarted on its state would not know of (it resumes the ring
    saved before). A deposed leader stops trying: the new one resumes the ring etcd holds."""
    delay = SAVE_RETRY_FIRST
    while True:
        try:
            await save()
            return
        except (Deposed, CancelledError):
            raise
        except Exception:
            log.failure("epoch {epoch}: could not save the new ring; trying again in "
                        "{delay:.0f}s", level=LogLevel.error, epoch=epoch, delay=delay)
        await deferLater(clock, delay, lambda: None)
        delay = min(SAVE_RETRY_MAX, 2 * delay)


def old_members(ring: Ring) -> list[str]:
    return [n.name for n in ring.nodes]


def _wire(ranges: list[KeyRange]) -> list[dict[str, int]]:
    return [{"start": r.start, "end": r.end} for r in ranges]


def _warn(failure: Any, name: str) -> None:
    if failure.check(CancelledError):
        return  # the ECS stopped
    log.failure("could not send the new ring to {name}", failure, LogLevel.warn, name=name)


def _not_started(failure: Any, name: str) -> None:
    if failure.check(CancelledError):
        return  # the ECS stopped
    log.failure("could not start {name}", failure, LogLevel.warn, name=name)


def _overlap(a: KeyRange, b: KeyRange) -> bool:
    """Whether two ranges of the ring share a position: where two arcs meet, the first of
    their two ends past a shared position lies in both."""
    return a.end in b or b.end in a


def _meet(copy: planner.Copy, move: planner.LocalMove) -> bool:
    """Whether a copy and a local move touch the same keys of a store, one of them writing."""
    if not _overlap(copy.range, move.range):
        return False
    return ((copy.target == move.server
             and copy.target_store in (move.source_store, move.target_store))
            or (copy.source == move.server and copy.source_store == move.target_store))
