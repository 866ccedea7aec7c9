"""bench.cpu_limit: each server process in a cgroup of its own under a CPU quota (on fake cgroup
trees; the real one needs root)."""

import pytest

from bench import __main__ as bench_main
from bench.cpu_limit import PERIOD_US, CpuLimitError, CpuLimits


def v1_tree(root):
    cpu = root / "cpu"
    cpu.mkdir(parents=True)
    for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cgroup.procs"):
        (cpu / name).write_text("")
    return cpu


def v2_tree(root, enabled="memory pids"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids")
    (root / "cgroup.subtree_control").write_text(enabled)
    (root / "cgroup.procs").write_text("")
    return root


def test_v1_a_process_gets_a_group_of_its_own_with_its_quota(tmp_path):
    cpu = v1_tree(tmp_path)
    limits = CpuLimits(0.5, root=tmp_path, prefix="t")
    limits.limit("chain-1", 4242)
    limits.limit("chain-2", 4343)
    group = cpu / "t-chain-1"
    assert (group / "cpu.cfs_period_us").read_text() == str(PERIOD_US)
    assert (group / "cpu.cfs_quota_us").read_text() == str(PERIOD_US // 2)
    assert (group / "cgroup.procs").read_text() == "4242"
    assert (cpu / "t-chain-2" / "cgroup.procs").read_text() == "4343"


def test_v2_enables_the_cpu_controller_and_writes_cpu_max(tmp_path):
    root = v2_tree(tmp_path / "cg")
    limits = CpuLimits(1.5, root=root, prefix="t")
    limits.limit("redis-1", 77)
    assert (root / "cgroup.subtree_control").read_text() == "+cpu"
    assert (root / "t-redis-1" / "cpu.max").read_text() == f"{3 * PERIOD_US // 2} {PERIOD_US}"
    assert (root / "t-redis-1" / "cgroup.procs").read_text() == "77"


def test_v2_leaves_an_enabled_cpu_controller_alone(tmp_path):
    root = v2_tree(tmp_path / "cg", enabled="cpu memory")
    CpuLimits(1, root=root, prefix="t").limit("single-1", 5)
    assert (root / "cgroup.subtree_control").read_text() == "cpu memory"


def test_release_moves_what_is_left_back_to_the_root_group(tmp_path):
    cpu = v1_tree(tmp_path)
    limits = CpuLimits(0.25, root=tmp_path, prefix="t")
    limits.limit("etcd-1", 99)
    limits.release()
    assert (cpu / "cgroup.procs").read_text() == "99"
    assert limits.groups == []


def test_release_removes_an_empty_group(tmp_path):
    cpu = v1_tree(tmp_path)
    limits = CpuLimits(0.25, root=tmp_path, prefix="t")
    group = cpu / "t-gone"
    group.mkdir()
    limits.groups.append(group)  # as a real group is once its process has exited
    limits.release()
    assert not group.exists()


def test_no_controller_and_a_bad_budget_are_refused(tmp_path):
    with pytest.raises(CpuLimitError, match="no cgroup cpu controller"):
        CpuLimits(1, root=tmp_path)
    v1_tree(tmp_path)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            CpuLimits(bad, root=tmp_path)


def test_a_group_that_cannot_be_made_says_which_process_and_where(tmp_path):
    cpu = v1_tree(tmp_path)
    (cpu / "t-chain-1").write_text("a file where the group would go")
    with pytest.raises(CpuLimitError, match="cannot limit process 12 to 0.5 CPUs"):
        CpuLimits(0.5, root=tmp_path, prefix="t").limit("chain-1", 12)


def test_the_benchmark_takes_a_positive_server_cpu_budget():
    assert bench_main.parse_args([]).server_cpus is None
    assert bench_main.parse_args(["--server-cpus", "0.5"]).server_cpus == 0.5
    for bad in ("0", "-1", "many"):
        with pytest.raises(SystemExit):
            bench_main.parse_args(["--server-cpus", bad])
