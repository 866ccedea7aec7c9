"""``python -m bench``: YCSB-style workloads against chainstore and its peers, in one session.

Systems (``--systems``, default ``chain,chain-any,chain-plain,single,redis,etcd``): ``chain``, an
ECS with three ``twistd kvserver`` processes replicating every range three ways (puts to each
key's head, gets to its tail); ``chain-any``, the same with each get sent to a member of the key's
chain as the client library picks it (client/readers.py: by key, hot keys in turn; reads at any
member, CRAQ; its targets: at least chain's throughput in workloads
C and B, and under C no server sent more than 45% of the gets); ``single``, one unreplicated server; ``redis``, a primary and two replicas,
each write followed by ``WAIT 2 0``; ``etcd``, three members, linearizable reads; ``echo``, a
bare AMP echo server over plaintext (what AMP itself costs; not in the default set). chain and
single run with mutual TLS, chainstore's default, the load generator presenting the ``client``
certificate of their PKI; ``chain-plain`` and ``single-plain`` are the same processes with tls
off (``chain-plain`` is in the default set, so that every default run shows what TLS costs and
judges the target that it costs at most 20% of the chain's put throughput; Redis and etcd run
plaintext, so ``chain-plain`` is the like-for-like beside them); ``chain-nometrics`` is the
chain with metrics off on every server (not in the default set; beside ``chain`` it judges the
target that metrics cost at most 5% of its put throughput). Redis and etcd come from
Debian's packages: missing ones are installed with apt-get when this runs as root, and a system
still missing is reported as such (and the exit status is 3).

For each value size, every system is loaded with the record set, then each workload runs with
each key distribution and in-flight count, repetitions interleaved and the systems' order
rotating. The load generator is this process (one Twisted reactor); every server runs in its own
processes, listens on 127.0.0.1 only, and is stopped by PID when the run ends, fails or is
interrupted (Ctrl-C, SIGTERM). ``redis-benchmark`` runs against the same Redis primary after
each repetition, to show what our load generator costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import twisted

from bench.cpu_limit import CpuLimitError, CpuLimits
from bench.driver import INTERRUPTED, interrupt_on_sigterm, log, run_reactor
from bench.peers import (EtcdSystem, RedisSystem, ensure_installed, program_version,
                         run_redis_benchmark)
from bench.plots import matplotlib_missing, write_plots
from bench.report import (format_native, format_read_shares, format_table, summarize,
                          target_verdicts)
from bench.runner import NATIVE_REDIS, Case, Measurement, Settings, run_session
from bench.systems import (ChainSystem, EchoSystem, SingleSystem, SystemUnderTest, chain_any,
                           chain_nometrics, chain_plain, single_plain)
from bench.ycsb import DISTRIBUTIONS, WORKLOADS, ZIPFIAN_CONSTANT, parse_names
from chainstore.limits import MAX_KEY_BYTES, MAX_VALUE_BYTES

#: Some requested system could not be measured (its programs are missing).
SYSTEM_MISSING = 3

#: What --systems may name.
SYSTEMS: dict[str, Callable[[str], SystemUnderTest]] = {
    "chain": ChainSystem, "chain-any": chain_any, "chain-plain": chain_plain,
    "chain-nometrics": chain_nometrics,
    "single": SingleSystem,
    "single-plain": single_plain, "redis": RedisSystem, "etcd": EtcdSystem, "echo": EchoSystem}
DEFAULT_SYSTEMS = ("chain", "chain-any", "chain-plain", "single", "redis", "etcd")
RESULTS = Path(__file__).resolve().parent / "results"
MIN_KEY_BYTES = 8


def _names(known: tuple[str, ...] | list[str], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        try:
            return parse_names(text, known, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _counts(minimum: int, maximum: int | None = None) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas") from None
        if not values or min(values) < minimum or (maximum is not None and max(values) > maximum):
            bound = f"{minimum}-{maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r}: give one or more numbers {bound}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r}: a number is given twice")
        return values
    return parse


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "YCSB-style workloads (A 50/50 read/update, B 95/5, C read only, W update only) "
            "over a loaded record set, against a chainstore chain of three, one unreplicated "
            "chainstore server (both with mutual TLS, the default; chain-plain and "
            "single-plain: the same with tls off), Redis (primary + 2 replicas, SET + WAIT 2 "
            "0) and etcd (3 members, linearizable reads), through one load generator; "
            "throughput and p50/p99/p99.9 latency, the ratio chain / each system, the issue's "
            "targets, a JSON file and PNG plots."),
    )
    parser.add_argument("--systems", type=_names(list(SYSTEMS), "systems"),
                        default=DEFAULT_SYSTEMS,
                        help=f"among {','.join(SYSTEMS)} [default: {','.join(DEFAULT_SYSTEMS)}]")
    parser.add_argument("--workloads", type=_names(list(WORKLOADS), "workloads"),
                        default=d.workloads,
                        help=f"among {','.join(WORKLOADS)} [default: {','.join(d.workloads)}]")
    parser.add_argument("--distributions", type=_names(list(DISTRIBUTIONS), "distributions"),
                        default=d.distributions,
                        help="key choice, among uniform,zipfian (constant "
                             f"{ZIPFIAN_CONSTANT}, popular keys scattered over the key space) "
                             f"[default: {','.join(d.distributions)}]")
    parser.add_argument("--values", type=_counts(0, MAX_VALUE_BYTES), default=d.value_sizes,
                        help="value sizes in bytes, each with its own load phase "
                             f"[default: {','.join(map(str, d.value_sizes))}]")
    parser.add_argument("--inflight", type=_counts(1), default=d.inflight,
                        help="requests in flight per run "
                             f"[default: {','.join(map(str, d.inflight))}]")
    parser.add_argument("--repeat", type=_positive(int), default=d.repeat,
                        help="repetitions; the table shows median and min-max "
                             f"[default: {d.repeat}]")
    parser.add_argument("--ops", type=_positive(int), default=d.ops,
                        help=f"operations per run, and per redis-benchmark test [default: {d.ops}]")
    parser.add_argument("--seconds", type=_positive(float), default=d.seconds,
                        help=f"time cap per run; no request starts after it [default: {d.seconds}]")
    parser.add_argument("--records", type=_positive(int), default=d.records,
                        help=f"records inserted by the load phase [default: {d.records}]")
    parser.add_argument("--load-seconds", type=_positive(float), default=d.load_seconds,
                        help="bound on one system's load phase; a load that does not finish "
                             f"fails the run [default: {d.load_seconds}]")
    parser.add_argument("--connections", type=_positive(int), default=d.connections,
                        help="AMP connections per chainstore system (chain: per server), "
                             "requests round-robin over them; Redis and etcd get one "
                             f"connection per request in flight [default: {d.connections}]")
    parser.add_argument("--warmup", type=int, default=d.warmup,
                        help="unmeasured operations per system after each load phase "
                             f"[default: {d.warmup}]")
    parser.add_argument("--key-size", type=int, default=d.key_size,
                        help=f"key bytes [default: {d.key_size}]")
    parser.add_argument("--json", metavar="PATH", type=Path, default=RESULTS / "latest.json",
                        help="where every run, the summary and the machine go "
                             "[default: bench/results/latest.json]")
    parser.add_argument("--plots", metavar="DIR", type=Path, default=RESULTS / "plots",
                        help="folder for the PNG plots [default: bench/results/plots]")
    parser.add_argument("--no-plots", action="store_true", help="draw no plots")
    parser.add_argument("--no-native", action="store_true",
                        help="do not run redis-benchmark beside the load generator")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install missing Redis or etcd packages")
    parser.add_argument("--server-cpus", metavar="N", type=_positive(float), default=None,
                        help="limit each server process of every system to N CPUs (a cgroup "
                             "CPU quota each; root only), as if each ran on a machine of its "
                             "own; the load generator is not limited [default: no limit]")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not MIN_KEY_BYTES <= args.key_size <= MAX_KEY_BYTES:
        parser.error(f"--key-size must be {MIN_KEY_BYTES}-{MAX_KEY_BYTES}")
    args.settings = Settings(
        ops=args.ops, seconds=args.seconds, repeat=args.repeat, inflight=args.inflight,
        connections=args.connections, warmup=args.warmup, records=args.records,
        workloads=args.workloads, distributions=args.distributions, value_sizes=args.values,
        key_size=args.key_size, load_seconds=args.load_seconds, native=not args.no_native)
    return args


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def memory_total() -> str | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError):
        pass
    return None


def machine_description(systems: tuple[str, ...]) -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version(),
                                "twisted": twisted.__version__}
    if "redis" in systems:
        versions["redis-server"] = program_version(["redis-server", "--version"])
        versions["redis-benchmark"] = program_version(["redis-benchmark", "--version"])
    if "etcd" in systems:
        versions["etcd"] = program_version(["etcd", "--version"])
    try:
        import matplotlib
        versions["matplotlib"] = matplotlib.__version__
    except ImportError:
        versions["matplotlib"] = None
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "memory": memory_total(),
            "platform": platform.platform(), "versions": versions}


def _progress(m: Measurement) -> None:
    r, c = m.result, m.case
    cut = " (time cap)" if r.stopped_by_time else ""
    log(f"  rep {m.repetition} {c.workload:<4} {c.distribution:<7} {c.value_size:>6}B "
        f"in-flight {c.inflight:>3} {m.system:>15}: {r.ops_per_second:>9,.0f} ops/s, "
        f"{r.completed} ops{cut}")


async def native_redis(reactor: Any, system: SystemUnderTest, inflight: int, ops: int,
                       value_size: int, records: int) -> list[tuple[str, Case, Any]] | None:
    """redis-benchmark SET and GET against the primary of a L{RedisSystem}."""
    if not isinstance(system, RedisSystem):
        return None
    results = await run_redis_benchmark(reactor, system, inflight, ops, value_size, records)
    return [(NATIVE_REDIS, Case(test, "uniform", value_size, inflight), result)
            for test, result in results.items() if test in ("SET", "GET")]


def _machine_line(machine: dict[str, Any]) -> str:
    return f"{machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory']}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = None
    if args.server_cpus is not None:
        try:
            limits = CpuLimits(args.server_cpus)
        except CpuLimitError as e:
            log(f"--server-cpus: {e}")
            return 2
    # SIGTERM while the servers start (before the reactor's own handler) must still stop them.
    interrupt_on_sigterm()
    settings = args.settings
    missing = ensure_installed(args.systems, install=not args.no_install, log=log)
    for name, why in missing.items():
        log(f"MISSING: {name} cannot be measured: {why}")
    names = tuple(n for n in args.systems if n not in missing)
    machine = machine_description(args.systems)
    load_before = _load_average()
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="chainstore-bench-") as workdir:
        systems: list[SystemUnderTest] = []
        try:
            for name in names:
                system = SYSTEMS[name](workdir)
                systems.append(system)
                system.start()
                log(f"started {system.name} pid {','.join(map(str, system.pids))} "
                    "on %s:%d" % system.address)
                if limits is not None:
                    for i, pid in enumerate(system.serving_pids, 1):
                        limits.limit(f"{system.name}-{i}", pid)
            log(f"measuring: workloads {','.join(settings.workloads)}, keys "
                f"{','.join(settings.distributions)}, values {settings.value_sizes} B, "
                f"{settings.records} records, in flight {settings.inflight}, "
                f"{settings.ops} ops or {settings.seconds}s per run, {settings.repeat} "
                "repetitions")
            native = native_redis if settings.native else None
            done, measurements = run_reactor(
                lambda reactor: run_session(reactor, systems, settings, _progress, native))
            described = [s.describe() for s in systems]
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM before the reactor runs (while starting the servers); once it
            # runs, the reactor's own handlers stop it and run_reactor reports that instead.
            done = False
        except CpuLimitError as e:
            log(f"--server-cpus: {e}; every server process was stopped")
            return 1
        finally:
            for system in reversed(systems):
                system.stop()
            if limits is not None:
                limits.release()
    if not done:
        log("interrupted: every server process was stopped")
        return INTERRUPTED

    machine["load_average_before"] = load_before
    machine["load_average_after"] = _load_average()
    machine["server_cpus"] = args.server_cpus
    limited = ("" if args.server_cpus is None else
               f" (each server process limited to {args.server_cpus:g} CPUs)")
    rows = summarize(measurements)
    print(f"chainstore YCSB-style benchmark of {', '.join(names) or 'nothing'}: "
          f"{settings.records} records loaded per value size, {settings.repeat} repetitions "
          f"of {settings.ops} ops (cap {settings.seconds}s each), systems' order rotating; "
          f"load generator and servers share {_machine_line(machine)}{limited}; 1/5/15-minute "
          f"load average {load_before} before, {machine['load_average_after']} after (other "
          "work on the machine skews every figure)")
    for name, why in missing.items():
        print(f"MISSING: {name} was not measured: {why}")
    print(format_table(rows))
    native_table = format_native(rows)
    if native_table:
        print("\nthe load generator's cost: redis-benchmark (-c N -P 1: N connections, one "
              "request in flight each, uniform random keys) against the same primary\n"
              + native_table)
    shares = format_read_shares(measurements)
    verdicts = target_verdicts(rows, missing, settings.distributions) + \
        [line for line in shares if line.startswith(("PASS", "FAIL", "NOT MEASURED"))]
    print("\nshare of the gets each server was sent (100-byte values, 32 in flight):\n"
          + "\n".join(line for line in shares if line not in verdicts))
    print("\ntargets (100-byte values, 32 in flight):\n" + "\n".join(verdicts))
    plots: list[str] = []
    if not args.no_plots:
        why = matplotlib_missing()
        if why:
            print(f"\nno plots: {why}")
        else:
            plots = [str(p) for p in write_plots(rows, args.plots, _machine_line(machine))]
            print("\nplots: " + ", ".join(plots))
    report = {
        "argv": sys.argv[1:] if argv is None else argv,
        "settings": settings.to_json(),
        "machine": machine,
        "systems": described,
        "missing": missing,
        "runs": [m.to_json() for m in measurements],
        "summary": [{"system": r.system, **r.case.__dict__,
                     **{k: v for k, v in r.__dict__.items() if k not in ("system", "case")}}
                    for r in rows],
        "targets": verdicts,
        "plots": plots,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"json: {args.json}")
    return SYSTEM_MISSING if missing else 0


if __name__ == "__main__":
    sys.exit(main())
