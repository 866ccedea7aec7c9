"""The benchmark's baseline: a bare AMP server with one command that does nothing.

``python -m bench.echo_server --port P`` listens on 127.0.0.1:P until SIGTERM or SIGINT. Its one
command, L{Echo}, takes exactly the arguments of L{chainstore.protocol.Put} (the value as
BigBytes) and answers exactly like it, without looking at them: what it costs is what AMP and
Twisted cost, the floor under any chainstore request.
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols import amp

from chainstore import protocol


class Echo(amp.Command):
    """Put's arguments in, Put's answer out (C{updated} is always False), nothing done."""

    arguments = protocol.Put.arguments
    response = protocol.Put.response


class EchoProtocol(amp.AMP):
    @Echo.responder
    def echo(self, key: bytes, value: bytes, request_id: bytes | None = None) -> dict[str, Any]:
        return {"updated": False}


class EchoFactory(Factory):
    noisy = False
    protocol = EchoProtocol


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.echo_server",
        description="A bare AMP echo server, the baseline of the chainstore benchmark.")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on [default: 127.0.0.1]")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    # Listening before run() means a client that can connect is served as soon as run() starts.
    reactor.listenTCP(args.port, EchoFactory(), interface=args.host)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
