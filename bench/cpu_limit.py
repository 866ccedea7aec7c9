"""Each serving process of a system on a CPU budget of its own, as if on a machine of its own.

On one machine every server shares the same CPUs, so a server that takes more than its share of
the work (the tail of a hot key) borrows the others' idle time, and spreading work over the
servers cannot show what it gains where each server has CPUs of its own, as the users' servers
do. ``python -m bench --server-cpus N`` puts each serving process of every system (the chain's
servers, the single server, Redis's primary and replicas, etcd's members) in a cgroup of its own
whose CPU quota is N CPUs (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``); the load
generator and the ECS are not limited. It needs root and a cgroup cpu controller.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The quota's period: 100 ms, the kernel's default.
PERIOD_US = 100_000


class CpuLimitError(Exception):
    """The processes cannot be limited here (no cgroup cpu controller, or no right to use it)."""


class CpuLimits:
    """Puts processes, one cgroup each, under a quota of C{cpus} CPUs; L{release} undoes it."""

    def __init__(self, cpus: float, root: Path = CGROUP_ROOT, prefix: str | None = None) -> None:
        if not cpus > 0:
            raise ValueError(f"a CPU budget must be more than 0, not {cpus}")
        self.cpus = cpus
        if (root / "cgroup.controllers").exists():
            self.version, self.base = 2, root
        elif (root / "cpu" / "cpu.cfs_quota_us").exists():
            self.version, self.base = 1, root / "cpu"
        else:
            raise CpuLimitError(f"no cgroup cpu controller under {root}")
        self.prefix = prefix or f"chainstore-bench-{os.getpid()}"
        self.groups: list[Path] = []

    def limit(self, name: str, pid: int) -> None:
        """Move process C{pid} (all its threads) into a new cgroup C{name} under the quota."""
        quota = max(1_000, round(self.cpus * PERIOD_US))
        group = self.base / f"{self.prefix}-{name}"
        try:
            if self.version == 2:
                enabled = (self.base / "cgroup.subtree_control").read_text().split()
                if "cpu" not in enabled:
                    (self.base / "cgroup.subtree_control").write_text("+cpu")
            group.mkdir(exist_ok=True)
            self.groups.append(group)
            if self.version == 2:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            raise CpuLimitError(f"cannot limit process {pid} to {self.cpus} CPUs in {group}: "
                                f"{e.strerror or e}") from None

    def release(self) -> None:
        """Move what is left in the groups back to the root group and remove the groups (a
        process that exited has left already)."""
        for group in reversed(self.groups):
            try:
                for pid in (group / "cgroup.procs").read_text().split():
                    (self.base / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # a process that exited meanwhile, or the group is gone
            try:
                group.rmdir()
            except OSError:
                pass  # gone already, or a process still exiting: nothing else holds it
        self.groups.clear()


__all__ = ["CGROUP_ROOT", "CpuLimitError", "CpuLimits", "PERIOD_US"]
