"""``python -m bench.message_floor``: what one message costs in CPU, in the servers' stack and at
the floor of CPython.

Two processes on loopback pass a message back and forth, one in flight, so every message wakes
its receiver, as a chain's messages do on an idle machine. Each mode is timed on both sides (the
processes' own CPU time, user and system) over the same number of round trips:

- ``twisted-tls``: the servers' stack: a ``Relay`` box (``chainstore.control.send_relay``, the
  chain's own box), AMP over the servers' mutual TLS (``chainstore.tls``), Twisted's reactor;
- ``twisted-plain``: the same without TLS;
- ``std-tls``: blocking sockets, the standard library's ``ssl`` with the same certificates, a
  4-byte length before each message: the least CPython can do per message with TLS;
- ``std-plain``: the same without TLS.

A round trip is two messages, one received and one sent by each side, so a side's CPU per round
trip is what a turn costs: a wake-up, a message read and one written. The certificates come
from a PKI made for the run in a temporary directory.
"""

from __future__ import annotations

import argparse
import resource
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

from chainstore import pki
from chainstore.tls import Credentials, TLSFiles

MODES = ("twisted-tls", "twisted-plain", "std-tls", "std-plain")
WARM_UP = 200
# A side that waits this long for a message gives up: the run fails instead of hanging.
PATIENCE = 30.0
_LENGTH = struct.Struct(">I")


class Result(NamedTuple):
    mode: str
    round_trips: int
    client_cpu: float
    server_cpu: float
    wall: float


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_pki(directory: str) -> TLSFiles:
    """A CA and one server certificate for 127.0.0.1, used by both sides."""
    pki.init_ca(directory)
    pki.issue(directory, "server", "floor", hosts=["127.0.0.1"])
    return TLSFiles.in_dir(directory, "floor")


# -- the standard library ---------------------------------------------------------------------

def std_context(files: TLSFiles, server: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(files.cert, files.key)
    context.load_verify_locations(files.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    parts, got = [], 0
    while got < count:
        chunk = sock.recv(count - got)
        if not chunk:
            raise EOFError
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def std_serve(files: TLSFiles | None) -> None:
    context = None if files is None else std_context(files, True)
    listener = socket.create_server(("127.0.0.1", 0))
    print("ready", listener.getsockname()[1], flush=True)
    listener.settimeout(PATIENCE)
    sock, _ = listener.accept()
    listener.close()
    sock.settimeout(PATIENCE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is not None:
        sock = context.wrap_socket(sock, server_side=True)
    start = cpu_seconds()
    try:
        while True:
            (length,) = _LENGTH.unpack(recv_exactly(sock, 4))
            sock.sendall(_LENGTH.pack(length) + recv_exactly(sock, length))
    except (EOFError, OSError):
        pass
    print("cpu", cpu_seconds() - start, flush=True)


def std_client(port: int, files: TLSFiles | None, round_trips: int,
               size: int) -> tuple[float, float]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if files is not None:
        sock = std_context(files, False).wrap_socket(sock, server_hostname="127.0.0.1")
    message = _LENGTH.pack(size) + b"x" * size

    def trips(count: int) -> None:
        for _ in range(count):
            sock.sendall(message)
            (length,) = _LENGTH.unpack(recv_exactly(sock, 4))
            recv_exactly(sock, length)

    trips(WARM_UP)
    cpu, wall = cpu_seconds(), time.monotonic()
    trips(round_trips)
    cpu, wall = cpu_seconds() - cpu, time.monotonic() - wall
    sock.close()
    return cpu, wall


# -- Twisted, as the servers run it --------------------------------------------------------------

def twisted_run(files: TLSFiles | None, serve: bool, port: int = 0, round_trips: int = 0,
                size: int = 0) -> tuple[float, float]:
    from twisted.internet import reactor
    from twisted.internet.endpoints import connectProtocol
    from twisted.internet.protocol import Factory
    from twisted.protocols import amp

    from chainstore.control import Relay, send_relay
    from chainstore.peers import no_delay
    from chainstore.tls import client_endpoint, server_endpoint

    credentials = None if files is None else Credentials(files)
    done: dict[str, Any] = {"count": 0}
    # Each message re-arms the deadline: a side left waiting stops instead of hanging.
    deadline = reactor.callLater(PATIENCE, lambda: failed_with("no message for 30 s"))

    class Echo(amp.AMP):
        def connectionMade(self) -> None:
            super().connectionMade()
            no_delay(self.transport)
            done["cpu"], done["wall"] = cpu_seconds(), time.monotonic()

        @Relay.responder
        def relay(self, epoch: int, data: bytes) -> dict[str, Any]:
            deadline.reset(PATIENCE)
            if not serve:
                done["count"] += 1
                if done["count"] == WARM_UP:
                    done["cpu"], done["wall"] = cpu_seconds(), time.monotonic()
                elif done["count"] == WARM_UP + round_trips:
                    done["result"] = (cpu_seconds() - done["cpu"],
                                      time.monotonic() - done["wall"])
                    self.transport.loseConnection()
                    return {}
            send_relay(self, epoch, data)
            return {}

        def connectionLost(self, reason: Any) -> None:
            super().connectionLost(reason)
            if serve:
                print("cpu", cpu_seconds() - done["cpu"], flush=True)
            stop()

    def stop() -> None:
        if deadline.active():
            deadline.cancel()
        if reactor.running:
            reactor.stop()

    def failed_with(message: str) -> None:
        done["error"] = message
        stop()

    def failed(failure: Any) -> None:
        failed_with(failure.getErrorMessage())

    if serve:
        endpoint = server_endpoint(reactor, "tcp:0:interface=127.0.0.1", credentials)
        endpoint.listen(Factory.forProtocol(Echo)).addCallbacks(
            lambda port: print("ready", port.getHost().port, flush=True), failed)
    else:
        dialled = connectProtocol(client_endpoint(reactor, credentials, "127.0.0.1", port),
                                  Echo())
        dialled.addCallbacks(lambda proto: send_relay(proto, 1, b"x" * size), failed)
    reactor.run()
    if "error" in done:
        raise RuntimeError(done["error"])
    return done.get("result", (0.0, 0.0))


# -- the two processes ---------------------------------------------------------------------------

def serve(mode: str, pki_dir: str) -> None:
    files = files_for(mode, pki_dir)
    if mode.startswith("twisted"):
        twisted_run(files, serve=True)
    else:
        std_serve(files)


def files_for(mode: str, pki_dir: str) -> TLSFiles | None:
    return TLSFiles.in_dir(pki_dir, "floor") if mode.endswith("tls") else None


def spawn(*arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.message_floor", *arguments],
                            stdout=subprocess.PIPE, text=True)


def answer(process: subprocess.Popen[str], word: str, name: str) -> list[str]:
    """The values of the line C{word ...} C{process} prints; RuntimeError naming the process
    (C{name}) if it prints none."""
    assert process.stdout is not None
    line = process.stdout.readline().split()
    if not line or line[0] != word:
        raise RuntimeError(f"the {name} process failed (it printed no {word!r} line)")
    return line[1:]


def measure(mode: str, pki_dir: str, round_trips: int, size: int) -> Result:
    """One mode: the echoing side and the timed side in processes of their own (a reactor
    runs once per process)."""
    processes = [spawn("--serve", mode, "--pki", pki_dir)]
    try:
        (port,) = answer(processes[0], "ready", f"{mode} echo")
        processes.append(spawn("--dial", mode, "--pki", pki_dir, "--port", port,
                               "--round-trips", str(round_trips), "--size", str(size)))
        client_cpu, wall = map(float, answer(processes[1], "result", f"{mode} client"))
        (server_cpu,) = map(float, answer(processes[0], "cpu", f"{mode} echo"))
        for process in processes:
            process.wait(timeout=30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    # (The echoing side's time covers the warm-up round trips too; the timed side's does not.)
    server_cpu *= round_trips / (round_trips + WARM_UP)
    return Result(mode, round_trips, client_cpu, server_cpu, wall)


def dial(mode: str, pki_dir: str, port: int, round_trips: int, size: int) -> None:
    files = files_for(mode, pki_dir)
    if mode.startswith("twisted"):
        cpu, wall = twisted_run(files, serve=False, port=port, round_trips=round_trips,
                                size=size)
    else:
        cpu, wall = std_client(port, files, round_trips, size)
    print("result", cpu, wall, flush=True)


def report(result: Result) -> str:
    per = 1e6 / result.round_trips
    return (f"{result.mode:<14} {result.client_cpu * per:7.1f} {result.server_cpu * per:7.1f} "
            f"{(result.client_cpu + result.server_cpu) * per / 2:7.1f} {result.wall * per:7.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.message_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=20_000,
                        help="timed round trips per mode [20000]")
    parser.add_argument("--size", type=int, default=1_000,
                        help="bytes of data per message [1000, about a batch of six 100-byte "
                             "puts]")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, from {', '.join(MODES)} [all]")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every mode [1]")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--dial", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.pki)
        return 0
    if args.dial:
        dial(args.dial, args.pki, args.port, args.round_trips, args.size)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"unknown mode {', '.join(unknown) or '(none)'}: choose from "
                     f"{', '.join(MODES)}")
    if args.round_trips < 1 or args.size < 1:
        parser.error("--round-trips and --size must be at least 1")
    print(f"{args.round_trips} round trips of {args.size} B, one in flight, per mode; "
          "µs of CPU per round trip (each side receives one message and sends one)")
    print(f"{'mode':<14} {'client':>7} {'echo':>7} {'a turn':>7} {'wall':>7}")
    with tempfile.TemporaryDirectory(prefix="bench-message-floor-") as pki_dir:
        make_pki(pki_dir)
        for _ in range(args.repeat):
            for mode in modes:
                print(report(measure(mode, pki_dir, args.round_trips, args.size)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
