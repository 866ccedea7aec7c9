"""Named fault scenarios, and the phases of one scenario run.

A scenario is data: a cycle of L{Step}s, each an action of the nemesis (L{torture.nemesis}) at
an offset in seconds from the start of its cycle. A run of a scenario goes through fixed phases:

 1. start: an ECS and five servers behind fault proxies, all in the ring (not timed);
 2. quiet (L{QUIET} s): the clients run, no fault;
 3. faults: the cycle, repeated while another whole cycle fits before the heal phase (at least
    once), the clients running; a step runs at its offset or as soon as the one before it has
    finished, whichever is later;
 4. heal (L{HEAL} s): every fault ended (links healed, processes continued or started), the
    clients still running;
 5. recovery: the clients stopped (each operation ends within the library's deadline); wait,
    bounded, until the ECS shows the whole ring, nothing dead, no operation running, serving;
 6. final reads of every key, through the client library;
 7. checks: per-key linearizability of the whole history (final reads included), lost writes
    against the final reads, and replica agreement of the SQLite files of every server after a
    clean ECS C{ShutDown}.

Everything random (the key whose chain the roles refer to, victims of C{any}, delays, the
clients' choices) comes from one generator seeded with the scenario's name and the run's seed,
so C{--scenario NAME --seed N} repeats the same faults on the same roles and the same workload
choices; the timing of a real cluster does not repeat exactly.
"""

from __future__ import annotations

import io
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.task import deferLater

from chainstore.logs import get_logger
from torture.checker import check_all
from torture.cluster import Cluster
from torture.history import History
from torture.nemesis import ACTIONS, Nemesis
from torture.report import OUTCOME_COLUMNS, ScenarioResult, keep_evidence
from torture.workload import Workload, WorkloadConfig, final_reads

log = get_logger("torture.schedule")

QUIET = 2.0
HEAL = 2.0
RECOVERY_BOUND = 60.0
#: Seconds a scenario runs (quiet, faults, heal) in the CI schedule and in a long run.
SHORT_SECONDS = 15.0
LONG_SECONDS = 60.0


@dataclass(frozen=True)
class Step:
    """Nemesis action C{action} with C{args}, C{at} seconds into its cycle."""

    at: float
    action: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; known: {', '.join(ACTIONS)}")
        unknown = set(self.args) - set(ACTIONS[self.action])
        if unknown:
            raise ValueError(f"{self.action} takes {', '.join(ACTIONS[self.action]) or 'nothing'}"
                             f", not {', '.join(sorted(unknown))}")
        if self.at < 0:
            raise ValueError("a step's offset is 0 or more seconds")


@dataclass(frozen=True)
class Scenario:
    """A named cycle of steps, C{cycle} seconds long."""

    name: str
    description: str
    steps: tuple[Step, ...]
    cycle: float

    def __post_init__(self) -> None:
        if any(s.at > self.cycle for s in self.steps):
            raise ValueError(f"{self.name}: a step lies beyond the cycle of {self.cycle}s")
        offsets = [s.at for s in self.steps]
        if offsets != sorted(offsets):
            raise ValueError(f"{self.name}: steps must be in time order")

    def cycles(self, fault_seconds: float) -> int:
        """How many cycles a fault phase of C{fault_seconds} holds (at least one)."""
        return max(1, int(fault_seconds // self.cycle))


def _s(at: float, action: str, **args: Any) -> Step:
    return Step(at, action, args)


def _kill(role: str) -> tuple[Step, ...]:
    return (_s(0.5, "kill", role=role, label="A"), _s(4.0, "restart", label="A"),
            _s(4.5, "recover"))


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("kill-head", "SIGKILL the head of a chain, restart it on its data, add it back",
             _kill("head"), 9.0),
    Scenario("kill-middle", "SIGKILL the middle of a chain, restart it, add it back",
             _kill("middle"), 9.0),
    Scenario("kill-tail", "SIGKILL the tail of a chain, restart it, add it back",
             _kill("tail"), 9.0),
    Scenario("kill-ecs", "SIGKILL the ECS, restart it on its state file; then kill a server "
             "under the restarted ECS",
             (_s(0.5, "kill", role="ecs", label="E"), _s(3.5, "restart", label="E"),
              _s(4.0, "kill", role="any", label="A"), _s(6.5, "restart", label="A"),
              _s(7.0, "recover")), 10.0),
    # The pause outlasts the failure timeout and its detection (1.5 + 0.3 s) but not the
    # clients' timeout after that: gets sent to the paused tail after the ECS replaced it are
    # still awaited when it continues, so a tail that answered them without a valid lease
    # would be caught (a harness check with the lease test removed from chain.py finds
    # stale reads here at once; a 4 s pause hid them behind client timeouts).
    Scenario("pause-tail", "SIGSTOP a tail past the failure timeout, then SIGCONT it",
             (_s(0.5, "pause", role="tail", label="P"), _s(3.1, "resume", label="P"),
              _s(3.6, "recover")), 8.0),
    Scenario("partition-servers", "cut a head and its middle apart both ways, then heal",
             (_s(0.5, "partition", a="head", b="middle", label="X"),
              _s(4.0, "heal", label="X"), _s(4.5, "recover")), 8.0),
    Scenario("partition-ecs", "cut a chain's middle from the ECS (not from its peers)",
             (_s(0.5, "partition", a="middle", b="ecs", label="X"),
              _s(4.5, "heal", label="X"), _s(5.0, "recover")), 9.0),
    Scenario("one-way", "drop every byte from a head to its middle, the answers still flow",
             (_s(0.5, "drop", source="head", target="middle", label="X"),
              _s(4.0, "heal", label="X"), _s(4.5, "recover")), 8.0),
    Scenario("delay", "50-200 ms of latency on three server links and one client link",
             (_s(0.5, "delay", links=3, low=0.05, high=0.2, label="D"),
              _s(5.5, "heal", label="D"), _s(6.0, "recover")), 8.0),
    Scenario("join-leave", "RemoveNode a ring member under load, start it again, AddNodes it",
             (_s(0.5, "leave", role="any", label="L"), _s(3.0, "restart", label="L"),
              _s(3.5, "join", count=1), _s(6.0, "recover")), 9.0),
    Scenario("combined", "delays, a killed middle and its tail cut from the ECS at once (two "
             "failures in one chain), then a paused server; all healed",
             (_s(0.5, "delay", links=2, low=0.05, high=0.15, clients=False, label="D"),
              _s(1.0, "kill", role="middle", label="A"),
              _s(2.0, "partition", a="tail", b="ecs", label="X"),
              _s(5.0, "restart", label="A"), _s(6.0, "heal", label="X"),
              _s(7.0, "pause", role="other", label="P"), _s(10.0, "resume", label="P"),
              _s(10.5, "heal_all"), _s(11.0, "recover")), 14.0),
    # Past the fault tolerance: three failures in a row on the ring leave one range with no live
    # replica; the ECS repairs it only from the last of them to leave its chain, once it is back
    # (the others lack what the chain acknowledged after they left: seed 8080 caught that).
    Scenario("orphan-range", "kill a middle, cut its tail from the ECS and pause the server "
             "after the tail: every replica of one range down at once, then all back",
             (_s(0.5, "kill", role="middle", label="A"),
              _s(1.0, "partition", a="tail", b="ecs", label="X"),
              _s(1.5, "pause", role="next", label="P"),
              _s(5.0, "resume", label="P"), _s(5.5, "heal", label="X"),
              _s(6.0, "restart", label="A"), _s(6.5, "recover")), 10.0),
]}

# Several ECS over etcd (python -m torture --ha, L{torture.ha}): the leader's lease is 2 s, a
# server hangs up on a silent leader after 3 s (chainstore.ecs_link.LEADER_SILENCE).
HA_SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("ha-kill-leader", "SIGKILL the leading ECS; a standby takes over; restart it",
             (_s(0.5, "kill", role="leader", label="E"), _s(5.0, "restart", label="E"),
              _s(5.5, "recover")), 6.5),
    # Past its lease and past the servers' patience (3 s without a heartbeat): the servers
    # move to the new leader, and the old one wakes deposed among servers that refuse it.
    Scenario("ha-pause-leader", "SIGSTOP the leading ECS past its lease, then SIGCONT it",
             (_s(0.5, "pause", role="leader", label="P"), _s(5.0, "resume", label="P"),
              _s(5.5, "recover")), 6.5),
    Scenario("ha-kill-server-new-leader", "SIGKILL the leading ECS, then a server under the "
             "new leader; restart both",
             (_s(0.5, "kill", role="leader", label="E"), _s(3.5, "kill", role="any", label="A"),
              _s(5.0, "restart", label="E"), _s(8.0, "restart", label="A"),
              _s(8.5, "recover")), 9.5),
    Scenario("ha-cut-leader-etcd", "cut the leading ECS from every etcd member, then heal",
             (_s(0.5, "cut_etcd", role="leader", label="X"), _s(5.0, "heal", label="X"),
              _s(5.5, "recover")), 9.0),
    Scenario("ha-kill-etcd", "SIGKILL an etcd member and a chain's tail; restart both",
             (_s(0.5, "kill", role="etcd", label="K"), _s(1.0, "kill", role="tail", label="A"),
              _s(4.5, "restart", label="K"), _s(5.0, "restart", label="A"),
              _s(5.5, "recover")), 9.0),
    # For a while no ECS can lead (one dead, one cut from etcd, the third paused): the
    # servers keep serving on their last ring; the cut one leads once healed.
    Scenario("ha-combined", "delays, a standby cut from etcd, the leader killed, a middle "
             "killed, the new leader paused past its lease; all healed",
             (_s(0.5, "delay", links=2, low=0.05, high=0.15, clients=False, label="D"),
              _s(1.0, "cut_etcd", role="standby", label="X"),
              _s(1.5, "kill", role="leader", label="E"),
              _s(2.5, "kill", role="middle", label="A"),
              _s(5.5, "pause", role="leader", label="P"),
              _s(6.5, "heal", label="X"), _s(9.0, "resume", label="P"),
              _s(9.5, "restart", label="E"), _s(10.0, "restart", label="A"),
              _s(11.0, "heal_all"), _s(11.5, "recover")), 15.0),
]}
SCENARIOS.update(HA_SCENARIOS)

#: The CI schedule: six scenarios, short.
SHORT = ("kill-middle", "kill-tail", "pause-tail", "partition-servers", "kill-ecs",
         "join-leave")
#: Every scenario of one ECS, for C{make torture}.
LONG = tuple(name for name in SCENARIOS if name not in HA_SCENARIOS)
#: The CI schedule with several ECS (--ha): a leader paused past its lease, and a leader killed
#: then a server killed under the new leader (which holds every step of ha-kill-leader, so that
#: one runs only in --ha --long); with --ha --long, every scenario of several ECS.
SHORT_HA = ("ha-pause-leader", "ha-kill-server-new-leader")
LONG_HA = tuple(HA_SCENARIOS)


def parse_schedule(text: str, default_seconds: float) -> list[tuple[Scenario, float]]:
    """Scenarios from C{"kill-tail,pause-tail:30"}: names, each with an optional
    C{:seconds}; C{short} and C{long} stand for those schedules, C{all} for the long one."""
    plan: list[tuple[Scenario, float]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, seconds_text = item.partition(":")
        seconds = default_seconds
        if seconds_text:
            try:
                seconds = float(seconds_text)
            except ValueError:
                raise ValueError(f"{item!r}: the seconds after ':' must be a number") from None
            if seconds <= QUIET + HEAL:
                raise ValueError(f"{item!r}: a scenario needs more than {QUIET + HEAL:g} s "
                                 f"(quiet and heal phases)")
        names = {"short": SHORT, "long": LONG, "all": LONG, "ha-short": SHORT_HA,
                 "ha-long": LONG_HA}.get(name, (name,))
        for n in names:
            if n not in SCENARIOS:
                raise ValueError(f"unknown scenario {n!r}; known: {', '.join(SCENARIOS)}")
            plan.append((SCENARIOS[n], seconds))
    if not plan:
        raise ValueError("the schedule names no scenario")
    return plan


def scenario_rng(name: str, seed: int) -> random.Random:
    """The generator of scenario C{name} in a run with C{seed}."""
    return random.Random(f"{name}/{seed}")


# -- one run ---------------------------------------------------------------------------------------


async def run_scenario(reactor: Any, scenario: Scenario, seed: int, seconds: float,
                       folder: Path, *, workload: WorkloadConfig | None = None,
                       keep: str = "failed", network: Any = None,
                       tls: bool = True, ha: bool = False) -> ScenarioResult:
    """Run C{scenario} for C{seconds} (quiet, faults, heal) in C{folder}; see the module
    docstring for the phases. C{keep}: "failed" keeps C{folder} only if the scenario did not
    pass (with the evidence of L{torture.report.keep_evidence}); "always", "never".
    C{network}: where the servers live (L{torture.cluster.Namespaces}; loopback by default).
    C{tls}: mutual TLS on every link (the default), or a plaintext cluster for comparison.
    C{ha}: three ECS over a three-member etcd (L{torture.ha.HACluster}) instead of one."""
    config = workload or WorkloadConfig()
    rng = scenario_rng(scenario.name, seed)
    options = [*([] if network is None else ["--netns"]), *([] if tls else ["--tls off"]),
               *(["--ha"] if ha else [])]
    result = ScenarioResult(scenario.name, seed, 0.0, planned=seconds,
                            options=" ".join(options))
    started = reactor.seconds()
    # The seed runs half the scenarios with the ECS's copies-beside-moves on, so that both ways
    # of running a reconfiguration's bulk step meet the faults (a generator of its own: the
    # scenario's draws stay what they were).
    beside = scenario_rng(f"{scenario.name}/copies-beside-moves", seed).random() < 0.5
    log.info("{scenario}: the ECS runs with copies-beside-moves {setting}",
             scenario=scenario.name, setting="on" if beside else "off")
    if ha:
        from torture.ha import HACluster

        cluster: Cluster = HACluster(reactor, folder / "cluster", network=network, tls=tls,
                                     copies_beside_moves=beside)
    else:
        cluster = Cluster(reactor, folder / "cluster", network=network, tls=tls,
                          copies_beside_moves=beside)
    history = History(reactor.seconds)
    load: Workload | None = None
    nemesis: Nemesis | None = None
    origin = started
    try:
        await cluster.start()
        load = Workload(reactor, history, cluster.amp_addresses, config, rng,
                        endpoint_factory=cluster.endpoint_factory(config.timeout),
                        run_tag=f"{seed}-")
        nemesis = Nemesis(cluster, reactor, rng, config.key_names())
        origin = reactor.seconds()
        load.start()
        await _sleep(reactor, QUIET)
        fault_seconds = max(0.0, seconds - QUIET - HEAL)
        for _ in range(scenario.cycles(fault_seconds)):
            cycle_start = reactor.seconds()
            for step in scenario.steps:
                wait = cycle_start + step.at - reactor.seconds()
                if wait > 0:
                    await _sleep(reactor, wait)
                await nemesis.perform(step.action, dict(step.args))
            rest = cycle_start + scenario.cycle - reactor.seconds()
            if rest > 0:
                await _sleep(reactor, rest)
        await nemesis.heal_all()
        await _sleep(reactor, HEAL)
        await load.stop()
        await cluster.wait_healthy(RECOVERY_BOUND)
        reads = await final_reads(reactor, history, cluster.amp_addresses, config.key_names(),
                                  tls=cluster.credentials("client"))
        ring = await cluster.ring()
        result.reads = await cluster.reads_by_role()
        await cluster.shut_down()
        summary = check_all(history, final_reads=reads, ring=ring, dumps=cluster.dumps(),
                            delete_answers_observe=False)
        result.anomalies = summary.counts
        result.details = summary.details()
        result.checked = True
    except Exception as e:
        log.failure("scenario {name} failed", name=scenario.name)
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if load is not None and not load.stopped:
            await load.stop()
        await cluster.stop()
    if result.error is not None and len(history):
        # No final reads or replicas to compare, but what the clients saw is still judged.
        summary = check_all(history, delete_answers_observe=False)
        result.anomalies = summary.counts
        result.details = summary.details()
    result.seconds = reactor.seconds() - started
    if load is not None:
        result.ops = {outcome: load.counts.outcome(outcome) for outcome in OUTCOME_COLUMNS}
    if nemesis is not None:
        result.faults = nemesis.injected
        result.fault_log = [f.describe(origin) for f in nemesis.faults]
    if keep == "always" or (keep == "failed" and not result.passed):
        out = io.StringIO()
        history.save(out)
        keep_evidence(folder, result, out.getvalue(), cluster.log_files())
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return result


async def _sleep(reactor: Any, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


__all__ = ["HA_SCENARIOS", "HEAL", "LONG", "LONG_HA", "LONG_SECONDS", "QUIET", "SCENARIOS",
           "SHORT", "SHORT_HA", "SHORT_SECONDS",
           "Scenario", "Step", "parse_schedule", "run_scenario", "scenario_rng"]
