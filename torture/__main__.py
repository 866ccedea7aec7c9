"""``python -m torture``: run fault scenarios against a real cluster and judge the histories.

    python -m torture                      # the CI schedule: six scenarios of 15 s
    python -m torture --long               # every scenario for a minute each (make torture)
    python -m torture --scenario kill-tail --seed 42 [--seconds 30]
    python -m torture --tls off            # a plaintext cluster, for comparison
    python -m torture --ha                 # three ECS over etcd: the HA CI schedule
    python -m torture --ha --long          # every HA scenario for a minute each
    python -m torture --list

Every link (clients, servers, the ECS, the harness's admin link) is mutual TLS by default, with
a PKI that each scenario's ECS creates in its work directory.

Prints a table (one row per scenario), writes a JSON summary, keeps the evidence of every
scenario that did not pass in torture-runs/<run id>/<scenario>/ and exits 1 if any did not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            globalLogBeginner, textFileLogObserver)

from torture.cluster import Namespaces
from torture.report import exit_code, format_table, write_json
from torture.schedule import (HA_SCENARIOS, LONG, LONG_HA, LONG_SECONDS, SCENARIOS, SHORT,
                              SHORT_HA, SHORT_SECONDS, parse_schedule, run_scenario)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m torture", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", action="append", default=[],
                        help="a scenario name, or a comma-separated list with optional :seconds "
                             "(kill-tail,pause-tail:30); may be repeated [default: the CI "
                             "schedule]")
    parser.add_argument("--long", action="store_true",
                        help=f"every scenario, {LONG_SECONDS:g} s each")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"seconds per scenario (quiet, faults, heal) [default: "
                             f"{SHORT_SECONDS:g}, {LONG_SECONDS:g} with --long]")
    parser.add_argument("--seed", type=int, default=None,
                        help="the run's seed [default: a random one, printed]")
    parser.add_argument("--out", default="torture-runs",
                        help="where runs keep their evidence [default: torture-runs]")
    parser.add_argument("--keep", choices=("failed", "always", "never"), default="failed",
                        help="which scenario folders to keep [default: failed]")
    parser.add_argument("--netns", action="store_true",
                        help="run each server in its own network namespace, linked by a veth "
                             "pair (root and iproute2's ip command needed)")
    parser.add_argument("--tls", choices=("on", "off"), default="on",
                        help="on: mutual TLS on every link; off: a plaintext cluster (tls: off "
                             "everywhere), for comparison [default: on]")
    parser.add_argument("--ha", action="store_true",
                        help="three ECS (one leads) over a three-member etcd (needs etcd); "
                             "the default schedule is then the HA one (ha-* scenarios), and "
                             "the server scenarios run under several ECS too")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser.parse_args(argv)


async def run(reactor: Any, args: argparse.Namespace, out: Any) -> int:
    seconds = args.seconds or (LONG_SECONDS if args.long else SHORT_SECONDS)
    text = ",".join(args.scenario) or ",".join(
        (LONG_HA if args.long else SHORT_HA) if args.ha else (LONG if args.long else SHORT))
    plan = parse_schedule(text, seconds)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{seed}"
    run_dir = Path(args.out).resolve() / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(run_dir / "harness.log", "a", encoding="utf-8")
    # The harness's own story at info, everything else (Twisted's connection chatter) from warn.
    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    for namespace in ("torture", "client"):
        levels.setLogLevelForNamespace(namespace, LogLevel.info)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(log_file), [levels])], redirectStandardIO=False)
    out.write(f"torture run {run_id}: {len(plan)} scenario(s), seed {seed}, TLS {args.tls}; "
              f"log: {run_dir / 'harness.log'}\n")
    out.flush()
    results = []
    for scenario, scenario_seconds in plan:
        network = Namespaces(f"{run_id}/{scenario.name}") if args.netns else None
        result = await run_scenario(reactor, scenario, seed, scenario_seconds,
                                    run_dir / scenario.name, keep=args.keep, network=network,
                                    tls=args.tls == "on", ha=args.ha)
        results.append(result)
        verdict = "pass" if result.passed else "FAIL"
        out.write(f"  {scenario.name}: {verdict} ({result.seconds:.1f} s, "
                  f"{sum(result.ops.values())} ops, {result.faults} faults)"
                  + (f": {result.error}" if result.error else "") + "\n")
        if result.kept:
            out.write(f"    evidence kept in {result.kept}\n")
        out.flush()
    out.write("\n" + format_table(results) + "\n")
    write_json(run_dir / "summary.json", results, run_id)
    out.write(f"\nJSON summary: {run_dir / 'summary.json'}\n")
    for result in results:
        if not result.passed:
            out.write(f"\n{result.name} did not pass; rerun: {result.rerun()}\n")
            for line in result.details[:10]:
                out.write("  " + line.replace("\n", "\n  ") + "\n")
    out.flush()
    return exit_code(results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for scenario in SCENARIOS.values():
            mark = (" (CI)" if scenario.name in SHORT else
                    " (CI, --ha)" if scenario.name in SHORT_HA else
                    " (--ha)" if scenario.name in HA_SCENARIOS else "")
            print(f"{scenario.name:18} {scenario.description}{mark}")
        return 0
    try:
        parse_schedule(",".join(args.scenario) or "short", 60.0)
    except ValueError as e:
        print(f"python -m torture: {e}", file=sys.stderr)
        return 2
    if not args.ha and any(name.split(":")[0].strip() in HA_SCENARIOS or
                           name.strip().startswith("ha-")
                           for text in args.scenario for name in text.split(",")):
        print("python -m torture: the ha-* scenarios need --ha", file=sys.stderr)
        return 2
    if args.ha and args.netns:
        print("python -m torture: --ha runs on loopback only (not with --netns)",
              file=sys.stderr)
        return 2
    if args.netns and Namespaces.available() is not None:
        print(f"python -m torture: --netns: {Namespaces.available()}", file=sys.stderr)
        return 2
    codes: list[int] = []

    async def react_main(reactor: Any) -> None:
        codes.append(await run(reactor, args, sys.stdout))

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(react_main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return codes[0] if codes else 1


if __name__ == "__main__":
    sys.exit(main())
