"""``python -m bench.flood``: a client that asks and never reads must cost a server neither its
memory nor its other clients.

For each scenario (``--scenarios console,amp``) this starts a fresh real ``twistd kvserver``
(mutual TLS, the default; 127.0.0.1 and ephemeral ports only), puts one value of
``--value-bytes`` (120,000, the largest there is) under one key through the console, and then:

1. connects the I{other client}, which gets that key every ``--probe-every`` seconds (one at a
   time, each answer checked) for ``--baseline`` seconds, while the server's VmRSS is sampled
   (its level before the flood);
2. connects the I{flooder}, which writes ``--gets`` requests for the key at once and never reads
   a byte (it stops reading from its socket as soon as it is connected: on the console after
   the TCP connect, over AMP after the TLS handshake): on the console ``get KEY`` lines, over
   AMP raw C{Get} boxes, each asking for an answer. Answered in full, that is ``--gets`` times
   the value (600 MB by default) to hold for a client that does not take it;
3. for ``--seconds`` keeps the other client asking and samples the server's VmRSS (and its
   VmHWM, the kernel's own peak, which catches spikes between samples);
4. drops the flooder and samples once more after ``--settle`` seconds.

It reports, per scenario, the server's RSS growth (peak during the flood minus the level
before it), the bytes of answers waiting unread in the flooder's socket (what the server did
send it), and the other client's latency (p50, worst, and any request left unanswered, whose
age at the end counts as its latency), and judges the targets: growth <= 64 MiB and every
request of the other client answered within 1 s. A table on stdout, a JSON file (``--json``).

Every process is stopped by PID when the run ends, fails or is interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import termios
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from bench.driver import INTERRUPTED, interrupt_on_sigterm, log, run_reactor
from bench.memory import MemorySampler, read_memory
from bench.systems import CONNECT_TIMEOUT, HOST, amp_connection
from chainstore import protocol
from chainstore.limits import MAX_LINE_BYTES, MAX_VALUE_BYTES
from harness.processes import KVServerProcess
from chainstore.tls import client_endpoint, load

SCENARIOS = ("console", "amp")
KEY = b"flood-key"
#: The targets: what a client that never reads may cost the server and its other clients.
MAX_GROWTH_MIB = 64.0
MAX_LATENCY_S = 1.0
#: Upper bounds on the options, so that a typo cannot start an unbounded run.
MAX_GETS = 100_000
MAX_SECONDS = 120.0
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


def value_bytes(size: int) -> bytes:
    """C{size} printable bytes without spaces (a console line carries them as they are)."""
    pattern = b"0123456789abcdefghijklmnopqrstuvwxyz"
    return (pattern * (size // len(pattern) + 1))[:size]


# -- the two clients ------------------------------------------------------------------------------


def console_flood(count: int) -> bytes:
    return b"get %s\r\n" % KEY * count


def amp_flood(count: int) -> bytes:
    """C{count} C{Get} boxes for L{KEY}, each with its own C{_ask} tag: the bytes an AMP client
    sends for C{count} callRemote(Get) in a row."""
    boxes = []
    for tag in range(1, count + 1):
        box = protocol.Get.makeArguments({"key": KEY}, None)
        box[b"_command"] = protocol.Get.commandName
        box[b"_ask"] = b"%x" % tag
        boxes.append(box.serialize())
    return b"".join(boxes)


@implementer(IHandshakeListener)
class Flooder(Protocol):
    """Writes C{payload} once connected (over TLS: once the handshake is done, which needs
    reading) and from then on never reads: its transport stops reading the socket."""

    def __init__(self, payload: bytes, tls: bool) -> None:
        self.payload = payload
        self.tls = tls
        self.flooded: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if not self.tls:
            self._flood()

    def handshakeCompleted(self) -> None:
        self._flood()

    def _flood(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.flooded.callback(None)

    def unread_bytes(self) -> int | None:
        """Bytes the server sent that wait in this socket's receive queue (Linux FIONREAD)."""
        transport: Any = self.transport
        if isinstance(transport, TLSMemoryBIOProtocol):
            transport = transport.transport
        try:
            raw = fcntl.ioctl(transport.getHandle().fileno(), termios.FIONREAD, b"\0" * 4)
        except (OSError, AttributeError):
            return None
        return int(struct.unpack("i", raw)[0])


class ConsoleClient(LineReceiver):
    """The console's other client: one request at a time, each answered by one line."""

    MAX_LENGTH = 2 * MAX_LINE_BYTES

    def __init__(self) -> None:
        self.greeted: Deferred[bytes] = Deferred()
        self._waiting: deque[Deferred[bytes]] = deque()

    def lineReceived(self, line: bytes) -> None:
        if not self.greeted.called:
            self.greeted.callback(line)
        elif self._waiting:
            self._waiting.popleft().callback(line)

    def ask(self, line: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._waiting.append(d)
        self.sendLine(line)
        return d


# -- the other client's latency -------------------------------------------------------------------


@dataclass
class ProbeResult:
    """The other client's requests in one window: latencies in seconds, in order."""

    latencies: list[float] = field(default_factory=list)
    #: a request still unanswered when the window ended (its age counts as a latency)
    unanswered: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies
        return {"requests": len(lat), "unanswered": self.unanswered, "errors": self.errors[:5],
                "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
                "worst_ms": round(max(lat) * 1000, 2) if lat else None}


async def probe(reactor: Any, ask: Any, check: Any, seconds: float, every: float,
                result: ProbeResult) -> None:
    """Call C{ask()} every C{every} seconds (the next at once if one took longer) for
    C{seconds}, waiting for each answer and checking it with C{check}; a request unanswered at
    the end counts as unanswered, with its age as its latency."""
    until = reactor.seconds() + seconds
    next_at = reactor.seconds()
    while reactor.seconds() < until:
        sent = reactor.seconds()
        d = ask()
        d.addTimeout(max(until - sent, every), reactor)
        try:
            answer = await d
        except DeferredTimeout:
            result.unanswered += 1
            result.latencies.append(reactor.seconds() - sent)
            return
        except Exception as e:
            result.errors.append(f"{type(e).__name__}: {e}")
            return
        result.latencies.append(reactor.seconds() - sent)
        if not check(answer):
            result.errors.append(f"a get answered {answer[:60]!r}...")
            return
        next_at = max(next_at + every, reactor.seconds())
        if next_at > reactor.seconds():
            await deferLater(reactor, next_at - reactor.seconds())


# -- one scenario ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    gets: int = 5_000
    seconds: float = 10.0
    baseline: float = 2.0
    settle: float = 1.0
    probe_every: float = 0.1
    sample_every: float = 0.1
    value_bytes: int = MAX_VALUE_BYTES


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


async def run_scenario(reactor: Any, kind: str, server: KVServerProcess, value: bytes,
                       settings: Settings) -> dict[str, Any]:
    """Flood C{server} over C{kind} (console or amp) and measure; the scenario's figures."""
    credentials = load(server.tls("client"))
    pid = server.pid
    if kind == "console":
        # the console is plaintext (and off the public interface): no credentials
        console: ConsoleClient = await connectProtocol(
            client_endpoint(reactor, None, *server.console_address, CONNECT_TIMEOUT),
            ConsoleClient())
        await console.greeted
        expected = b"get_success %s %s" % (KEY, value)
        ask: Any = lambda: console.ask(b"get " + KEY)  # noqa: E731
        check: Any = lambda line: line == expected  # noqa: E731
        other: Any = console
        payload, tls = console_flood(settings.gets), False
        address = server.console_address
    else:
        conn = await amp_connection(reactor, server.amp_address, credentials)
        ask = lambda: conn.callRemote(protocol.Get, key=KEY)  # noqa: E731
        check = lambda answer: answer["value"] == value  # noqa: E731
        other = conn
        payload, tls = amp_flood(settings.gets), credentials is not None
        address = server.amp_address
    sampler = MemorySampler(reactor, lambda: {"server": pid}, interval=settings.sample_every)
    before, during = ProbeResult(), ProbeResult()
    flooder: Flooder | None = None
    try:
        sampler.start("before")
        await probe(reactor, ask, check, settings.baseline, settings.probe_every, before)
        hwm_before = (read_memory(pid) or (0, 0))[1]
        sampler.set_phase("flood")
        flooder = await connectProtocol(
            client_endpoint(reactor, credentials if tls else None, *address, CONNECT_TIMEOUT),
            Flooder(payload, tls))
        await flooder.flooded.addTimeout(CONNECT_TIMEOUT, reactor)
        log(f"  {kind}: {settings.gets:,} gets written ({len(payload):,} bytes), never read")
        await probe(reactor, ask, check, settings.seconds, settings.probe_every, during)
        unread = flooder.unread_bytes()
        memory = read_memory(pid)
        if memory is None:
            raise RuntimeError(f"the server (pid {pid}) is gone:\n{server.diagnostics()}")
        sampler.set_phase("after")
        flooder.transport.abortConnection()  # type: ignore[union-attr]
        flooder = None
        await deferLater(reactor, settings.settle)
        sampler.stop()
    finally:
        sampler.stop()
        if flooder is not None and flooder.transport is not None:
            flooder.transport.abortConnection()  # type: ignore[attr-defined]
        other.transport.loseConnection()
    rss = sampler.rss.get("server", {})
    base, peak = rss.get("before", 0), rss.get("flood", 0)
    hwm_during = memory[1]
    if hwm_during > hwm_before:  # the process reached a new peak during the flood
        peak = max(peak, hwm_during)
    return {
        "scenario": kind, "tls": tls, "gets": settings.gets, "request_bytes": len(payload),
        "seconds": settings.seconds, "value_bytes": len(value), "server_pid": pid,
        "rss_before_mib": _mib(base), "rss_peak_mib": _mib(peak),
        "rss_growth_mib": _mib(peak - base), "rss_after_mib": _mib(rss.get("after")),
        "hwm_mib": _mib(hwm_during), "rss_samples": sampler.samples,
        "unread_reply_bytes": unread,
        "other_before": before.summary(), "other_during": during.summary(),
    }


def verdicts(results: list[dict[str, Any]]) -> list[str]:
    """Two lines per scenario: the server's RSS growth and the other client's worst latency."""
    lines = []
    for r in results:
        name = f"{r['scenario']} flood ({r['gets']:,} gets never read" + \
            (", TLS)" if r["tls"] else ")")
        growth = r["rss_growth_mib"]
        ok = growth is not None and growth <= MAX_GROWTH_MIB
        lines.append(f"{'PASS' if ok else 'FAIL'}: {name}: server RSS grows at most "
                     f"{MAX_GROWTH_MIB:.0f} MiB: grew {growth} MiB ({r['rss_before_mib']} -> "
                     f"{r['rss_peak_mib']} MiB)")
        other = r["other_during"]
        worst = other["worst_ms"]
        ok = (worst is not None and worst <= MAX_LATENCY_S * 1000 and not other["unanswered"]
              and not other["errors"])
        why = f"worst {worst} ms over {other['requests']} gets"
        if other["unanswered"]:
            why += ", one left unanswered at the end"
        if other["errors"]:
            why += f", failed: {other['errors'][0]}"
        lines.append(f"{'PASS' if ok else 'FAIL'}: {name}: the other client served within "
                     f"{MAX_LATENCY_S:g} s: {why}")
    return lines


def format_table(results: list[dict[str, Any]]) -> str:
    header = ("scenario", "gets", "RSS before MiB", "peak MiB", "growth MiB", "after MiB",
              "unread reply MB", "other: gets", "p50 ms", "worst ms", "worst before ms")
    lines = [header]
    for r in results:
        during, before = r["other_during"], r["other_before"]
        unread = r["unread_reply_bytes"]
        lines.append((
            r["scenario"] + (" (TLS)" if r["tls"] else ""), f"{r['gets']:,}",
            str(r["rss_before_mib"]), str(r["rss_peak_mib"]), str(r["rss_growth_mib"]),
            str(r["rss_after_mib"]), "?" if unread is None else f"{unread / 1e6:.1f}",
            str(during["requests"]) + (" +1 unanswered" if during["unanswered"] else ""),
            str(during["p50_ms"]), str(during["worst_ms"]), str(before["worst_ms"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


# -- main -----------------------------------------------------------------------------------------


def _bounded(kind: type, low: float, high: float) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text}: give {low:g} to {high:g}")
        return value
    return parse


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or any(n not in SCENARIOS for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct scenarios among "
                                         f"{','.join(SCENARIOS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench.flood",
        description=(
            "Does a client that pipelines gets of a 120,000-byte value and never reads cost a "
            "kvserver its memory, or its other clients their service? Per scenario a fresh "
            "server (mutual TLS) on 127.0.0.1: a flooder writes --gets requests and never "
            "reads, on the text console or as AMP Get boxes over TLS, while another client "
            "gets the same key every --probe-every seconds and the server's RSS is sampled. "
            f"Targets: RSS growth <= {MAX_GROWTH_MIB:.0f} MiB, the other client answered "
            f"within {MAX_LATENCY_S:g} s. A table on stdout, a JSON file."),
        epilog="Every process it starts is stopped by PID, also on failure or Ctrl-C. Exit "
               "status: 0 when measured (whatever the verdicts), 1 on a failure, 130 when "
               "interrupted.")
    parser.add_argument("--scenarios", type=_scenarios, default=SCENARIOS,
                        help=f"among {','.join(SCENARIOS)} [default: {','.join(SCENARIOS)}]")
    parser.add_argument("--gets", type=_bounded(int, 1, MAX_GETS), default=d.gets,
                        help=f"requests the flooder writes and never reads (at most "
                             f"{MAX_GETS:,}) [default: {d.gets:,}]")
    parser.add_argument("--seconds", type=_bounded(float, 0.5, MAX_SECONDS), default=d.seconds,
                        help=f"how long the flood is watched (at most {MAX_SECONDS:g}) "
                             f"[default: {d.seconds:g}]")
    parser.add_argument("--baseline", type=_bounded(float, 0.2, MAX_SECONDS),
                        default=d.baseline,
                        help="seconds the other client runs and the RSS is sampled before "
                             f"the flood [default: {d.baseline:g}]")
    parser.add_argument("--settle", type=_bounded(float, 0.0, MAX_SECONDS), default=d.settle,
                        help="seconds after the flooder is dropped before the last RSS "
                             f"sample [default: {d.settle:g}]")
    parser.add_argument("--probe-every", type=_bounded(float, 0.01, 10.0),
                        default=d.probe_every,
                        help=f"the other client's pace, seconds [default: {d.probe_every:g}]")
    parser.add_argument("--sample-every", type=_bounded(float, 0.01, 10.0),
                        default=d.sample_every,
                        help=f"seconds between RSS samples [default: {d.sample_every:g}]")
    parser.add_argument("--value-bytes", type=_bounded(int, 1, MAX_VALUE_BYTES),
                        default=d.value_bytes,
                        help=f"the size of the value flooded [default: {d.value_bytes:,}]")
    parser.add_argument("--json", metavar="PATH", type=Path, default=RESULTS / "flood.json",
                        help="where the figures go [default: bench/results/flood.json]")
    args = parser.parse_args(argv)
    args.settings = Settings(gets=args.gets, seconds=args.seconds, baseline=args.baseline,
                             settle=args.settle, probe_every=args.probe_every,
                             sample_every=args.sample_every, value_bytes=args.value_bytes)
    return args


def put_by_console(server: KVServerProcess, value: bytes, timeout: float = 10.0) -> None:
    """Store C{value} under L{KEY} through the server's console (blocking, before the reactor
    runs)."""
    with socket.create_connection(server.console_address, timeout=timeout) as sock:
        stream = sock.makefile("rwb")
        stream.readline()  # the greeting
        stream.write(b"put %s %s\r\n" % (KEY, value))
        stream.flush()
        reply = stream.readline().rstrip(b"\r\n")
    if reply not in (b"put_success " + KEY, b"put_update " + KEY):
        raise RuntimeError(f"the put was answered {reply[:200]!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()
    settings: Settings = args.settings
    value = value_bytes(settings.value_bytes)
    results: list[dict[str, Any]] = []
    servers: list[KVServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="chainstore-flood-") as workdir:
        try:
            # A fresh server per scenario: memory one flood left behind (and the allocator
            # may keep) does not hide or inflate the next one's.
            for kind in args.scenarios:
                server = KVServerProcess(Path(workdir) / kind, name=f"flood-{kind}", host=HOST)
                servers.append(server)
                server.start()
                put_by_console(server, value)
                log(f"started {server.name} pid {server.pid} (AMP with TLS on "
                    f"%s:%d, console on %s:%d)" % (*server.amp_address, *server.console_address))

            async def measure(reactor: Any) -> None:
                for kind, server in zip(args.scenarios, servers):
                    log(f"{kind}: {settings.baseline:g} s before the flood, then "
                        f"{settings.seconds:g} s of it")
                    results.append(await run_scenario(reactor, kind, server, value, settings))

            done, _ = run_reactor(measure)
            argvs = [s.argv()[3:] for s in servers]
        except KeyboardInterrupt:
            done = False
        finally:
            for server in reversed(servers):
                server.stop()
    if not done:
        log("interrupted: every server process was stopped")
        return INTERRUPTED
    lines = verdicts(results)
    print(f"a client that never reads, {settings.gets:,} gets of a {settings.value_bytes:,}-byte "
          f"value ({settings.gets * settings.value_bytes / 1e6:,.0f} MB of answers), watched "
          f"{settings.seconds:g} s; the other client gets the key every "
          f"{settings.probe_every:g} s; {os.cpu_count()} CPUs, load average "
          f"{[round(x, 2) for x in os.getloadavg()]}")
    print(format_table(results))
    print("\ntargets:\n" + "\n".join(lines))
    report = {"argv": sys.argv[1:] if argv is None else argv, "settings": asdict(settings),
              "targets_limits": {"rss_growth_mib": MAX_GROWTH_MIB,
                                 "other_client_seconds": MAX_LATENCY_S},
              "server_argv": argvs, "scenarios": results, "targets": lines}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
