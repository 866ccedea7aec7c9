"""The nemesis: injects faults into a running cluster and keeps the books on them.

Faults name their victims by role, resolved when the fault is injected: C{head}, C{middle},
C{tail} (of the live chain of the nemesis's chosen key, so that "head" and "middle" are chain
neighbours), C{next} (the live ring member after that tail: middle, tail and next are the
whole chain of the next range), C{other} (a ring member in none of those places when there is
one), C{any} (a random ring member), C{ecs}; or by the label of an earlier fault (C{"A"}),
which names the same process again. Every fault is recorded as a L{Fault}: what, on whom, when
it began and ended. L{Nemesis.heal_all} ends every fault still active: every proxy healed,
every paused process continued, every killed process started again.

The nemesis drives a cluster through a small interface (L{torture.cluster.Cluster} provides it;
the unit tests pass a fake): C{kill}, C{pause}, C{resume}, C{restart}, C{fabric} (partition,
drop, delay, heal), C{admin}, C{status}, C{ring}, C{names}.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import deferLater

from chainstore.logs import get_logger
from ecs import protocol as admin

log = get_logger("torture.nemesis")

ECS = "ecs"
CLIENT = "client"
ROLES = ("head", "middle", "tail", "next", "other", "any", ECS)
#: Roles of a cluster of several ECS over etcd (L{torture.ha.HACluster}): the leading ECS, a
#: standby, an etcd member (C{ecs} is the leader there)
HA_ROLES = ("leader", "standby", "etcd")

# Fault kinds, as counted in reports.
KILL, PAUSE, PARTITION, PARTITION_ECS, DROP, DELAY, LEAVE, JOIN = (
    "kill", "pause", "partition", "partition-ecs", "one-way", "delay", "leave", "join")
PARTITION_ETCD = "partition-etcd"


class NemesisError(RuntimeError):
    """A fault could not be injected as asked (no such role, label unknown)."""


@dataclass
class Fault:
    """One fault: C{kind} on C{targets} from C{began} to C{ended} (C{None}: still active).
    C{error} says why it could not be injected or undone, if it could not."""

    kind: str
    targets: tuple[str, ...]
    began: float
    ended: float | None = None
    label: str | None = None
    error: str | None = None
    detail: str = ""

    @property
    def active(self) -> bool:
        return self.ended is None and self.error is None

    def describe(self, origin: float = 0.0) -> str:
        span = f"{self.began - origin:7.2f}s .. " + (
            "   active" if self.ended is None else f"{self.ended - origin:7.2f}s")
        what = f"{self.kind} {'/'.join(self.targets)}" + (f" ({self.detail})"
                                                          if self.detail else "")
        return f"{span}  {what}" + (f"  FAILED: {self.error}" if self.error else "")


@dataclass
class _Books:
    faults: list[Fault] = field(default_factory=list)
    labels: dict[str, Fault] = field(default_factory=dict)


class Nemesis:
    """Faults on C{cluster}, their victims chosen with C{rng} around the chain of one of
    C{keys} (chosen once, with C{rng})."""

    def __init__(self, cluster: Any, reactor: Any, rng: random.Random,
                 keys: Sequence[bytes]) -> None:
        self.cluster = cluster
        self.reactor = reactor
        self.rng = rng
        self.key = rng.choice(list(keys))
        self._books = _Books()

    # -- the books -------------------------------------------------------------------------------

    @property
    def faults(self) -> list[Fault]:
        """Every fault, in the order injected."""
        return list(self._books.faults)

    @property
    def injected(self) -> int:
        """Faults that were injected (those that failed to be are not counted)."""
        return sum(1 for f in self._books.faults if f.error is None)

    def active(self, kind: str | None = None) -> list[Fault]:
        return [f for f in self._books.faults if f.active and kind in (None, f.kind)]

    def _begin(self, kind: str, targets: Sequence[str], label: str | None,
               detail: str = "") -> Fault:
        fault = Fault(kind, tuple(targets), self.reactor.seconds(), label=label, detail=detail)
        self._books.faults.append(fault)
        if label is not None:
            self._books.labels[label] = fault
        log.info("nemesis: {kind} {targets} {detail}", kind=kind, targets=targets,
                 detail=detail)
        return fault

    def _end(self, fault: Fault) -> None:
        if fault.ended is None:
            fault.ended = self.reactor.seconds()

    def labelled(self, label: str) -> Fault:
        try:
            return self._books.labels[label]
        except KeyError:
            raise NemesisError(f"no fault is labelled {label!r}") from None

    # -- victims ---------------------------------------------------------------------------------

    async def resolve(self, role: str) -> str:
        """The process C{role} names now (see the module docstring)."""
        if role in self._books.labels:
            return self._books.labels[role].targets[0]
        if role in HA_ROLES or (role == ECS and getattr(self.cluster, "ha", False)):
            if not getattr(self.cluster, "ha", False):
                raise NemesisError(f"role {role!r} needs several ECS (python -m torture --ha)")
            return await self.cluster.resolve_ha(role, self.rng)
        if role == ECS:
            return ECS
        if role not in ROLES:
            raise NemesisError(f"unknown role {role!r}: choose one of {', '.join(ROLES)} or a "
                               f"label of an earlier fault")
        ring = await self.cluster.ring()
        members = [n.name for n in ring.live_nodes]
        if role == "any":
            return self.rng.choice(members)
        chain = [n.name for n in ring.chain(self.key)]
        if role == "other":
            others = [m for m in members if m not in chain]
            return self.rng.choice(others or members)
        if role == "next":
            order = [n.name for n in ring.nodes if n.name not in ring.dead]
            return order[(order.index(chain[-1]) + 1) % len(order)]
        if role == "head":
            return chain[0]
        if role == "tail":
            return chain[-1]
        if len(chain) < 3:
            raise NemesisError(f"the chain of {self.key!r} has no middle: {chain}")
        return chain[1]

    # -- faults ----------------------------------------------------------------------------------

    async def kill(self, role: str, label: str | None = None) -> Fault:
        """SIGKILL a server or the ECS (until L{restart})."""
        name = await self.resolve(role)
        fault = self._begin(KILL, [name], label)
        self.cluster.kill(name)
        return fault

    async def restart(self, label: str) -> None:
        """Start a killed process (or one that left the ring) again, on its data.

        A killed server is started once the ECS has repaired it away (bounded: three failure
        timeouts and a repair), so that it registers as an idle server that recovery adds back.
        """
        fault = self.labelled(label)
        if fault.error is not None or fault.ended is not None:
            return  # it never happened (a refused leave), or it is over already
        name = fault.targets[0]
        if name in self.cluster.names:
            await self._wait_repaired(name)
        try:
            await self.cluster.restart(name)
        except Exception as e:
            fault.error = f"restart: {e}"
            raise
        self._end(fault)

    async def _wait_repaired(self, name: str, bound: float = 15.0) -> None:
        deadline = self.reactor.seconds() + bound
        while self.reactor.seconds() < deadline:
            try:
                status = await self.cluster.status()
            except Exception:
                pass  # the ECS may be down too (combined faults): wait out the bound
            else:
                if name not in status["ring"] and status["operation"] is None:
                    return
            await deferLater(self.reactor, 0.1, lambda: None)

    async def pause(self, role: str, label: str | None = None) -> Fault:
        """SIGSTOP a server or the ECS (until L{resume})."""
        name = await self.resolve(role)
        fault = self._begin(PAUSE, [name], label)
        self.cluster.pause(name)
        return fault

    async def resume(self, label: str) -> None:
        fault = self.labelled(label)
        self.cluster.resume(fault.targets[0])
        self._end(fault)

    async def partition(self, a: str, b: str, label: str | None = None) -> Fault:
        """Cut two servers (or a server and the ECS, C{b} "ecs") apart, both ways."""
        first, second = await self.resolve(a), await self.resolve(b)
        if first == second:
            raise NemesisError(f"{a} and {b} are both {first}")
        fault = self._begin(PARTITION_ECS if ECS in (first, second) else PARTITION,
                            [first, second], label)
        self.cluster.fabric.partition(first, second)
        return fault

    async def drop(self, source: str, target: str, label: str | None = None) -> Fault:
        """One-way: nothing from C{source} reaches C{target}; the other way still flows."""
        first, second = await self.resolve(source), await self.resolve(target)
        if first == second:
            raise NemesisError(f"{source} and {target} are both {first}")
        fault = self._begin(DROP, [first, second], label, detail=f"{first} -> {second} dropped")
        self.cluster.fabric.drop(first, second)
        return fault

    async def delay(self, links: int = 3, low: float = 0.05, high: float = 0.2,
                    clients: bool = True, label: str | None = None) -> Fault:
        """Add a latency, uniform in [C{low}, C{high}] seconds per link, to C{links} random
        links between servers (and to every client link of one server if C{clients})."""
        names = list(self.cluster.names)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        chosen = self.rng.sample(pairs, min(links, len(pairs)))
        parts = []
        for a, b in chosen:
            seconds = self.rng.uniform(low, high)
            self.cluster.fabric.delay(a, b, seconds)
            parts.append(f"{a}-{b} {seconds * 1000:.0f}ms")
        touched = {n for pair in chosen for n in pair}
        if clients:
            victim = self.rng.choice(names)
            seconds = self.rng.uniform(low, high)
            self.cluster.fabric.delay(CLIENT, victim, seconds)
            parts.append(f"client-{victim} {seconds * 1000:.0f}ms")
            touched.add(victim)
        return self._begin(DELAY, sorted(touched), label, detail=", ".join(parts))

    async def cut_etcd(self, role: str = "leader", label: str | None = None) -> Fault:
        """Cut an ECS (by default the leader) from every etcd member, both ways (several ECS:
        its lease runs out and another ECS leads)."""
        name = await self.resolve(role)
        fault = self._begin(PARTITION_ETCD, [name], label, detail=f"{name} cut from etcd")
        for member in self.cluster.etcd_names:
            self.cluster.fabric.partition(name, member)
        return fault

    async def heal(self, label: str) -> None:
        """Lift the network fault C{label} (a partition, drop or delay)."""
        fault = self.labelled(label)
        if fault.kind == DELAY:
            self._heal_delay(fault)
        elif fault.kind == PARTITION_ETCD:
            for member in self.cluster.etcd_names:
                self.cluster.fabric.heal(fault.targets[0], member)
        else:
            self.cluster.fabric.heal(*fault.targets[:2])
        self._end(fault)

    def _heal_delay(self, fault: Fault) -> None:
        for part in fault.detail.split(", "):
            a, b = part.split(" ", 1)[0].split("-", 1)
            self.cluster.fabric.heal(a, b)

    async def leave(self, role: str, label: str | None = None) -> Fault:
        """C{RemoveNode} a ring member (its data moves to the others, its process exits);
        L{restart} of the label starts it again, idle, for a later L{join}."""
        name = await self.resolve(role)
        fault = self._begin(LEAVE, [name], label)
        try:
            await self.cluster.admin(admin.RemoveNode, name=name, force=False, timeout=60.0)
        except Exception as e:
            fault.error = str(e)
            log.info("nemesis: leave {name} refused: {error}", name=name, error=e)
        return fault

    async def join(self, count: int = 1, label: str | None = None) -> Fault:
        """C{AddNodes}: bring C{count} idle registered servers into the ring."""
        fault = self._begin(JOIN, [], label)
        try:
            answer = await self.cluster.admin(admin.AddNodes, count=count,
                                              cache_strategy="LRU", cache_size=1000,
                                              timeout=60.0)
        except Exception as e:
            fault.error = str(e)
            log.info("nemesis: join refused: {error}", error=e)
        else:
            fault.targets = tuple(answer["names"])
        self._end(fault)
        return fault

    async def recover(self, timeout: float = 40.0) -> None:
        """End every fault and wait until the cluster is whole again (under load)."""
        await self.heal_all()
        await self.cluster.wait_healthy(timeout)

    async def heal_all(self) -> None:
        """End every active fault: heal every link, continue every paused process, start every
        killed or departed process again."""
        self.cluster.fabric.heal()
        for fault in self.active():
            if fault.kind == PAUSE:
                self.cluster.resume(fault.targets[0])
                self._end(fault)
            elif fault.kind in (PARTITION, PARTITION_ECS, PARTITION_ETCD, DROP, DELAY, JOIN):
                self._end(fault)
        for fault in self.active():
            if fault.kind == KILL or fault.kind == LEAVE:
                if fault.label is None:
                    fault.label = f"_{len(self._books.labels)}"
                    self._books.labels[fault.label] = fault
                await self.restart(fault.label)

    # -- steps -----------------------------------------------------------------------------------

    async def perform(self, action: str, args: dict[str, Any]) -> None:
        """Run one schedule step: C{action} is a method name, C{args} its keyword arguments."""
        if action not in ACTIONS:
            raise NemesisError(f"unknown action {action!r}: choose one of {', '.join(ACTIONS)}")
        await getattr(self, action)(**args)


#: The actions a schedule step may name, with the arguments each takes.
ACTIONS: dict[str, tuple[str, ...]] = {
    "kill": ("role", "label"),
    "restart": ("label",),
    "pause": ("role", "label"),
    "resume": ("label",),
    "partition": ("a", "b", "label"),
    "drop": ("source", "target", "label"),
    "delay": ("links", "low", "high", "clients", "label"),
    "heal": ("label",),
    "cut_etcd": ("role", "label"),
    "leave": ("role", "label"),
    "join": ("count", "label"),
    "recover": ("timeout",),
    "heal_all": (),
}
