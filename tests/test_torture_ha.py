"""The torture harness with several ECS over etcd (python -m torture --ha): its nemesis roles
and actions on a fake cluster, its schedules, and the HA CI schedule against real processes."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from tests.test_torture import FakeCluster, run
from torture.__main__ import main as torture_main
from torture.nemesis import PARTITION_ETCD, Nemesis, NemesisError
from torture.report import anomaly_text, exit_code, format_table
from torture.schedule import (HA_SCENARIOS, LONG, LONG_HA, SCENARIOS, SHORT_HA,
                              parse_schedule, run_scenario)


class FakeHACluster(FakeCluster):
    ha = True

    def __init__(self) -> None:
        super().__init__()
        self.etcd_names = ["etcd1", "etcd2", "etcd3"]
        self.leader = "ecs2"

    def resolve_ha(self, role: str, rng: random.Random) -> Any:
        if role == "etcd":
            return succeed(rng.choice(self.etcd_names))
        return succeed(self.leader if role in ("leader", "ecs") else "ecs3")


def ha_nemesis() -> tuple[Nemesis, FakeHACluster]:
    cluster = FakeHACluster()
    return Nemesis(cluster, Clock(), random.Random(5), [b"k%02d" % i for i in range(10)]), \
        cluster


def test_ha_roles_name_the_leader_a_standby_and_an_etcd_member() -> None:
    nemesis, cluster = ha_nemesis()
    assert run(nemesis.resolve("leader")) == "ecs2"
    assert run(nemesis.resolve("ecs")) == "ecs2"  # with several ECS, "ecs" is the leader
    assert run(nemesis.resolve("standby")) == "ecs3"
    assert run(nemesis.resolve("etcd")) in cluster.etcd_names
    # the chain roles are unchanged
    assert run(nemesis.resolve("head")).startswith("server")


def test_ha_roles_need_several_ecs() -> None:
    nemesis = Nemesis(FakeCluster(), Clock(), random.Random(5), [b"k"])
    with pytest.raises(NemesisError, match="needs several ECS"):
        run(nemesis.resolve("leader"))
    # and "ecs" still names the one ECS
    assert run(nemesis.resolve("ecs")) == "ecs"


def test_cut_etcd_partitions_the_ecs_from_every_member_and_heal_lifts_it() -> None:
    nemesis, cluster = ha_nemesis()
    fault = run(nemesis.cut_etcd("leader", label="X"))
    assert fault.kind == PARTITION_ETCD and fault.targets == ("ecs2",)
    assert cluster.fabric.calls == [("partition", "ecs2", m) for m in cluster.etcd_names]
    cluster.fabric.calls.clear()
    run(nemesis.heal("X"))
    assert cluster.fabric.calls == [("heal", "ecs2", m) for m in cluster.etcd_names]
    assert not fault.active


def test_a_killed_ecs_restarts_at_once_and_heal_all_ends_an_etcd_cut() -> None:
    nemesis, cluster = ha_nemesis()
    run(nemesis.kill("leader", label="E"))
    run(nemesis.cut_etcd("standby", label="X"))
    # an ECS is not a ring member: its restart does not wait for a repair
    run(nemesis.restart("E"))
    assert ("restart", "ecs2") in cluster.calls
    run(nemesis.heal_all())
    assert not nemesis.active()


def test_the_ha_schedules() -> None:
    assert SHORT_HA == ("ha-pause-leader", "ha-kill-server-new-leader")
    assert set(LONG_HA) == set(HA_SCENARIOS) and set(SHORT_HA) <= set(LONG_HA)
    # make torture (one ECS) runs no ha-* scenario; --ha --long runs them all
    assert not set(LONG) & set(HA_SCENARIOS)
    assert [s.name for s, _ in parse_schedule("ha-short", 15.0)] == list(SHORT_HA)
    assert all(name in SCENARIOS for name in LONG_HA)


def test_ha_scenarios_need_ha(capsys: Any) -> None:
    assert torture_main(["--scenario", "ha-kill-leader"]) == 2
    assert "need --ha" in capsys.readouterr().err
    assert torture_main(["--ha", "--netns"]) == 2


@pytest.mark.integration
@pytest.mark.fault
@pytest.mark.skipif(shutil.which("etcd") is None,
                    reason="etcd is not installed (Debian: apt-get install etcd-server; "
                           ".ci/run installs it)")
@pytest_twisted.ensureDeferred
async def test_the_ha_schedule_finds_no_anomaly(reactor: Any, tmp_path: Path) -> None:
    results = []
    for name in SHORT_HA:
        result = await run_scenario(reactor, SCENARIOS[name], seed=20, seconds=12.0,
                                    folder=tmp_path / name, ha=True)
        results.append(result)
    print("\n" + format_table(results))
    for r in results:
        where = f"{r.name}: {r.error or anomaly_text(r.anomalies)}; evidence: {r.kept}\n" \
                + "\n".join(r.details[:3])
        assert r.error is None, where
        assert r.options == "--ha", where
        assert r.checked and r.faults >= 1 and r.ops["ok"] > 200, where
        assert r.passed, where
    assert exit_code(results) == 0
