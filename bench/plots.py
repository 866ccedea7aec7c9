"""PNG plots of a session: throughput and p99 latency against the number of requests in flight.

One figure per key distribution and value size; in it, one column per workload, throughput on
top (median, bars from min to max over the repetitions) and p99 latency below, one line per
system. matplotlib is optional (``pip install -e '.[bench]'``): without it, L{write_plots}
says so and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.report import Row
from bench.runner import LOAD, NATIVE_REDIS

#: Each system keeps its colour and marker in every figure.
STYLES = {"chain": ("tab:blue", "o"), "single": ("tab:cyan", "s"),
          "chain-plain": ("tab:purple", "o"), "chain-any": ("tab:orange", "o"),
          "chain-nometrics": ("tab:brown", "o"), "single-plain": ("tab:olive", "s"),
          "redis": ("tab:red", "^"), "etcd": ("tab:green", "D"), "echo": ("tab:gray", "x")}


def matplotlib_missing() -> str | None:
    """Why plots cannot be drawn, or None if they can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'; make bench does)"
    return None


def plot_groups(rows: Sequence[Row]) -> dict[tuple[str, int], list[Row]]:
    """The load generator's run rows by (distribution, value size), in order of appearance."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        if r.case.workload == LOAD or r.system == NATIVE_REDIS:
            continue
        groups.setdefault((r.case.distribution, r.case.value_size), []).append(r)
    return groups


def plot_name(distribution: str, value_size: int) -> str:
    return f"{distribution}-{value_size}B.png"


def write_plots(rows: Sequence[Row], folder: Path, machine: str) -> list[Path]:
    """One PNG per (distribution, value size) into C{folder}; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (distribution, value_size), group in plot_groups(rows).items():
        workloads = list(dict.fromkeys(r.case.workload for r in group))
        systems = list(dict.fromkeys(r.system for r in group))
        counts = sorted({r.case.inflight for r in group})
        fig, axes = plt.subplots(2, len(workloads), figsize=(3.6 * len(workloads) + 0.6, 6.4),
                                 squeeze=False, sharex=True)
        for col, workload in enumerate(workloads):
            top, bottom = axes[0][col], axes[1][col]
            for system in systems:
                line = sorted((r for r in group if r.system == system
                               and r.case.workload == workload), key=lambda r: r.case.inflight)
                if not line:
                    continue
                colour, marker = STYLES.get(system, (None, "."))
                xs = [r.case.inflight for r in line]
                ys = [r.ops_per_s for r in line]
                errors = [[r.ops_per_s - r.ops_per_s_min for r in line],
                          [r.ops_per_s_max - r.ops_per_s for r in line]]
                top.errorbar(xs, ys, yerr=errors, label=system, color=colour, marker=marker,
                             capsize=3)
                p99 = [(r.case.inflight, r.p99_ms) for r in line if r.p99_ms is not None]
                bottom.plot([x for x, _ in p99], [y for _, y in p99], label=system,
                            color=colour, marker=marker)
            top.set_title(f"workload {workload}")
            top.set_ylim(bottom=0)
            bottom.set_yscale("log")
            bottom.set_xscale("log", base=2)
            bottom.set_xticks(counts, [str(c) for c in counts])
            bottom.set_xlabel("requests in flight")
            top.grid(True, alpha=0.3)
            bottom.grid(True, which="both", alpha=0.3)
            if col == 0:
                top.set_ylabel("throughput (ops/s)")
                bottom.set_ylabel("p99 latency (ms)")
        axes[0][0].legend(fontsize="small")
        fig.suptitle(f"{distribution} keys, {value_size}-byte values; {machine}",
                     fontsize="medium")
        fig.tight_layout()
        path = folder / plot_name(distribution, value_size)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
