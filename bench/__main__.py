"""``python -m bench``: start the systems, measure them in one session, print the table.

``--systems echo,single,chain`` (the default) chooses what is measured: a bare AMP echo server,
one unreplicated ``twistd kvserver``, and an ECS with three servers replicating three ways.

The driver is the load generator: this process runs a Twisted reactor and talks raw AMP to
servers that run in their own processes. Every process it starts is stopped by PID when the
run ends, fails or is interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import twisted
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from bench.report import format_ratios, format_table, goal_verdicts, summarize
from bench.runner import Measurement, Settings, run_session
from bench.systems import ChainSystem, EchoSystem, SingleSystem, SystemUnderTest
from bench.workload import KeyValueWorkload

INTERRUPTED = 130

#: What --systems may name, in the default order.
SYSTEMS: dict[str, Callable[[str], SystemUnderTest]] = {
    "echo": EchoSystem, "single": SingleSystem, "chain": ChainSystem}


def _system_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in SYSTEMS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give distinct names among {','.join(SYSTEMS)}, separated by commas")
    return names


def _inflight_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more counts >= 1")
    return values


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Settings()
    w = KeyValueWorkload()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Measure, in one session: a bare AMP echo server (echo), one unreplicated "
            "chainstore server (single) and a chain of three servers under an ECS, every range "
            "replicated three ways (chain): put and get throughput and p50/p99 latency with 1, "
            "8 and 32 requests in flight; the ratios single/echo and chain/single. Chain puts "
            "go to each key's head, gets to its tail. The load generator is this process, "
            "speaking raw AMP over loopback."),
    )
    parser.add_argument("--systems", type=_system_list, default=tuple(SYSTEMS),
                        help="systems to measure, comma-separated, among "
                             f"{','.join(SYSTEMS)} [default: {','.join(SYSTEMS)}]")
    parser.add_argument("--ops", type=_positive(int), default=d.ops,
                        help=f"operations per run [default: {d.ops}]")
    parser.add_argument("--seconds", type=_positive(float), default=d.seconds,
                        help=f"time cap per run; no request starts after it [default: {d.seconds}]")
    parser.add_argument("--repeat", type=_positive(int), default=d.repeat,
                        help="repetitions; the table shows median and min-max "
                             f"[default: {d.repeat}]")
    parser.add_argument("--inflight", type=_inflight_list, default=d.inflight,
                        help="requests in flight per run, comma-separated "
                             f"[default: {','.join(map(str, d.inflight))}]")
    parser.add_argument("--connections", type=_positive(int), default=d.connections,
                        help="AMP connections per system (chain: per server); requests go "
                             f"round-robin over them [default: {d.connections}]")
    parser.add_argument("--warmup", type=int, default=d.warmup,
                        help="unmeasured operations per system before the runs "
                             f"[default: {d.warmup}]")
    parser.add_argument("--key-size", type=int, default=w.key_size,
                        help=f"key bytes [default: {w.key_size}]")
    parser.add_argument("--value-size", type=int, default=w.value_size,
                        help=f"value bytes [default: {w.value_size}]")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write every run and the summary as JSON to PATH")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    try:
        args.workload = KeyValueWorkload(args.key_size, args.value_size)
    except ValueError as e:
        parser.error(str(e))
    args.settings = Settings(ops=args.ops, seconds=args.seconds, repeat=args.repeat,
                             inflight=args.inflight, connections=args.connections,
                             warmup=args.warmup)
    return args


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _progress(m: Measurement) -> None:
    r = m.result
    cut = " (time cap)" if r.stopped_by_time else ""
    _log(f"  rep {m.repetition} {m.system:>10} {m.op:<4} in-flight {r.inflight:>3}: "
         f"{r.ops_per_second:>9,.0f} ops/s, {r.completed} ops in {r.elapsed:.2f}s{cut}")


def run_reactor(main: Callable[[Any], Coroutine[Any, Any, Any]]) -> tuple[bool, Any]:
    """Run C{main(reactor)} on the global reactor until it finishes or a signal stops it.

    Returns (True, result) if it finished, (False, None) if the reactor was stopped first;
    re-raises what C{main} raised.
    """
    from twisted.internet import reactor

    outcome: list[Any] = []
    interrupted: list[bool] = []

    def finished(result: Any) -> None:
        if interrupted:
            # A signal stopped the reactor, which cut the connections under the session: its
            # failure is the interruption's echo, not a result.
            return
        outcome.append(result)
        reactor.stop()  # type: ignore[attr-defined]

    def shutting_down() -> None:
        if not outcome:
            interrupted.append(True)

    def begin() -> None:
        Deferred.fromCoroutine(main(reactor)).addBoth(finished)

    reactor.addSystemEventTrigger("before", "shutdown", shutting_down)  # type: ignore[attr-defined]
    reactor.callWhenRunning(begin)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if interrupted or not outcome:
        return False, None
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return True, outcome[0]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM while the servers start (before the reactor's own handler) must still stop them.
    signal.signal(signal.SIGTERM, _interrupt)
    settings, workload = args.settings, args.workload
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="chainstore-bench-") as workdir:
        systems: list[SystemUnderTest] = [SYSTEMS[name](workdir) for name in args.systems]
        try:
            for system in systems:
                system.start()
                _log(f"started {system.name} pid {','.join(map(str, system.pids))} "
                     "on %s:%d" % system.address)
            _log(f"measuring: {settings.ops} ops or {settings.seconds}s per run, "
                 f"{settings.repeat} repetitions, in flight {settings.inflight}, "
                 f"{settings.connections} connection(s) per system, "
                 f"{workload.key_size}-byte keys, {workload.value_size}-byte values")
            done, measurements = run_reactor(
                lambda reactor: run_session(reactor, systems, workload, settings, _progress))
            described = [s.describe() for s in systems]
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM before the reactor runs (while starting the servers); once it
            # runs, the reactor's own handlers stop it and run_reactor reports that instead.
            done = False
        finally:
            for system in reversed(systems):
                system.stop()
    if not done:
        _log("interrupted: every server process was stopped")
        return INTERRUPTED

    load_after = _load_average()
    names = {s.name for s in systems}
    compare_to = {s.name: s.compare_to for s in systems
                  if s.compare_to is not None and s.compare_to in names}
    rows = summarize(measurements, compare_to)
    print(f"chainstore benchmark of {', '.join(s.name for s in systems)}: {settings.repeat} "
          f"repetitions of {settings.ops} ops (cap {settings.seconds}s each), system order "
          f"rotating, {settings.connections} AMP connection(s) per system (chain: per server), "
          f"{workload.key_size}-byte keys, {workload.value_size}-byte values; load generator "
          f"and servers share {os.cpu_count()} CPUs (1-minute load average {load_before} "
          f"before, {load_after} after: other work on the machine skews every figure)")
    print(format_table(rows))
    ratios = format_ratios(rows)
    if ratios:
        print("\nthroughput ratios:\n" + ratios)
    verdicts = goal_verdicts(rows)
    if verdicts:
        print("\n" + "\n".join(verdicts))
    if args.json:
        report = {
            "argv": sys.argv[1:] if argv is None else argv,
            "settings": {**vars(settings), "inflight": list(settings.inflight)},
            "workload": workload.describe(),
            "environment": {
                "python": platform.python_version(), "twisted": twisted.__version__,
                "platform": platform.platform(), "cpus": os.cpu_count(),
                "load_average_before": load_before, "load_average_after": load_after,
            },
            "systems": described,
            "compare_to": compare_to,
            "runs": [m.to_json() for m in measurements],
            "summary": [vars(r) for r in rows],
            "goals": verdicts,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
