"""What a torture run tells its user: a table with one row per scenario, a JSON summary, and,
for every scenario that found an anomaly (or could not finish), a folder with the evidence.

A scenario passes when the checkers found no violation and decided every key (see
L{torture.checker.Summary.ok}) and the harness itself met no error (a cluster that never
recovered is an error, not a pass). The exit code of a run is 0 only if every scenario passed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torture.checker import INFORMATIONAL, VIOLATIONS

OUTCOME_COLUMNS = ("ok", "fail", "unknown")


@dataclass
class ScenarioResult:
    """The outcome of one scenario run.

    C{ops} counts the clients' operations per outcome (final reads not included); C{faults}
    is the number of faults injected, C{fault_log} one line per fault; C{anomalies} counts
    per checker kind (every kind present, zeros included); C{error} is a harness error that
    ended the run early, if any; C{kept} the evidence folder, if one was kept.
    """

    name: str
    seed: int
    seconds: float
    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOME_COLUMNS, 0))
    faults: int = 0
    fault_log: list[str] = field(default_factory=list)
    anomalies: dict[str, int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    error: str | None = None
    kept: str | None = None
    checked: bool = False
    #: the seconds asked for (quiet, faults, heal); 0: not given
    planned: float = 0.0
    #: extra options of the run that a rerun needs (such as --netns)
    options: str = ""
    #: gets the servers answered, by where: "tail", and at heads and middles "local" (clean
    #: keys) and "resolved" (asked the tail first), and "waited" (of those two, dirty keys
    #: that waited for their acknowledgement first); see Cluster.reads_by_role
    reads: dict[str, int] = field(default_factory=dict)

    @property
    def violations(self) -> int:
        return sum(self.anomalies.get(kind, 0) for kind in VIOLATIONS) \
            + self.anomalies.get("undecided", 0)

    @property
    def passed(self) -> bool:
        return self.checked and self.error is None and self.violations == 0

    def rerun(self) -> str:
        """The command that runs this scenario again with the same seed."""
        return (f"python -m torture --scenario {self.name} --seed {self.seed}"
                + (f" --seconds {self.planned:g}" if self.planned else "")
                + (f" {self.options}" if self.options else ""))


def anomaly_text(anomalies: dict[str, int]) -> str:
    """C{"none"}, or the non-zero kinds: C{"lost_write=2 stray_key=1"}."""
    shown = [f"{kind}={n}" for kind, n in anomalies.items() if n]
    return " ".join(shown) if shown else "none"


def format_table(results: list[ScenarioResult]) -> str:
    """The run's table: one row per scenario and a total row."""
    header = ("scenario", "ops ok", "fail", "unknown", "faults", "gets t/l/r", "seconds",
              "result", "anomalies")
    rows = []
    for r in results:
        verdict = "PASS" if r.passed else ("ERROR" if r.error else "FAIL")
        rows.append((r.name, str(r.ops.get("ok", 0)), str(r.ops.get("fail", 0)),
                     str(r.ops.get("unknown", 0)), str(r.faults), _reads(r.reads),
                     f"{r.seconds:.1f}",
                     verdict, anomaly_text(r.anomalies) + ("" if r.checked else
                                                            " (history only)")
                     if r.anomalies else "not checked"))
    total_anomalies: dict[str, int] = {}
    for r in results:
        for kind, n in r.anomalies.items():
            total_anomalies[kind] = total_anomalies.get(kind, 0) + n
    passed = sum(1 for r in results if r.passed)
    rows.append(("total", str(sum(r.ops.get("ok", 0) for r in results)),
                 str(sum(r.ops.get("fail", 0) for r in results)),
                 str(sum(r.ops.get("unknown", 0) for r in results)),
                 str(sum(r.faults for r in results)),
                 _reads({k: sum(r.reads.get(k, 0) for r in results)
                         for k in ("tail", "local", "resolved")}),
                 f"{sum(r.seconds for r in results):.1f}", f"{passed}/{len(results)}",
                 anomaly_text(total_anomalies)))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])]
        return "  ".join(cells + [row[-1]])

    rule = "-" * (sum(widths[:-1]) + 2 * (len(widths) - 1) + max(widths[-1], 9))
    return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])


def _reads(reads: dict[str, int]) -> str:
    """Gets at tails / answered locally by heads and middles / resolved with the tail."""
    if not reads:
        return "-"
    return f"{reads.get('tail', 0)}/{reads.get('local', 0)}/{reads.get('resolved', 0)}"


def summary_json(results: list[ScenarioResult], run_id: str) -> dict[str, Any]:
    """The JSON summary of a run."""
    scenarios = []
    for r in results:
        entry = asdict(r)
        entry.pop("details")
        entry["passed"] = r.passed
        entry["rerun"] = r.rerun()
        scenarios.append(entry)
    return {"run": run_id, "passed": all(r.passed for r in results) and bool(results),
            "scenarios": scenarios}


def exit_code(results: list[ScenarioResult]) -> int:
    """0 if every scenario passed (and there was one), 1 otherwise."""
    return 0 if results and all(r.passed for r in results) else 1


def keep_evidence(folder: Path, result: ScenarioResult, history_lines: str,
                  logs: list[Path]) -> Path:
    """Write the evidence of a failed scenario into C{folder}: the history, the checkers'
    findings, the fault log, copies of the logs, and a README.txt that says how to rerun it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "history.jsonl").write_text(history_lines, encoding="utf-8")
    (folder / "anomalies.txt").write_text(
        "\n\n".join(result.details) + "\n" if result.details else "(none)\n", encoding="utf-8")
    (folder / "faults.txt").write_text("\n".join(result.fault_log) + "\n", encoding="utf-8")
    logs_dir = folder / "logs"
    logs_dir.mkdir(exist_ok=True)
    for path in logs:
        if path.exists() and path.parent != logs_dir:
            shutil.copy2(path, logs_dir / path.name)
    counts = ", ".join(f"{kind}={n}" for kind, n in result.anomalies.items() if n) or "none"
    (folder / "README.txt").write_text(
        f"torture scenario {result.name}, seed {result.seed}\n"
        f"result: {'PASS' if result.passed else 'FAIL'}"
        + (f" (harness error: {result.error})" if result.error else "") + "\n"
        f"anomalies: {counts}\n"
        f"operations: {result.ops}\n"
        f"faults injected: {result.faults}\n\n"
        f"Rerun it (same faults on the same roles, same workload choices; timing differs):\n"
        f"  {result.rerun()}\n\n"
        f"Files: history.jsonl (one operation a line: torture.history.History.load reads it),\n"
        f"anomalies.txt (what the checkers found), faults.txt (when each fault began and\n"
        f"ended, seconds from the start of the workload), logs/ (the ECS's and every\n"
        f"server's log).\n", encoding="utf-8")
    result.kept = str(folder)
    return folder


def write_json(path: Path, results: list[ScenarioResult], run_id: str) -> None:
    path.write_text(json.dumps(summary_json(results, run_id), indent=2, sort_keys=True) + "\n",
                    encoding="utf-8")


__all__ = ["INFORMATIONAL", "OUTCOME_COLUMNS", "ScenarioResult", "anomaly_text", "exit_code",
           "format_table", "keep_evidence", "summary_json", "write_json"]
