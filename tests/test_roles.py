"""RoleGuard without sockets: the role table, the handshake timeout, the dialled peer's role."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from OpenSSL.crypto import X509
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure

from chainstore import control, pki, protocol, tls
from chainstore.bounds import MAX_UNVERIFIED_PER_HOST, PEER_RESERVE, CappedFactory, Counted
from chainstore.errors import PermissionDenied
from chainstore.roles import CLIENT, SERVER, RoleGuard, allow


class TLSTransport(StringTransport):
    """A transport that looks like TLS: it has a peer certificate (None before the handshake)."""

    def __init__(self, cert_path: str | None = None) -> None:
        super().__init__()
        self.cert = None
        if cert_path is not None:
            with open(cert_path, "rb") as f:
                self.cert = X509.from_cryptography(x509.load_pem_x509_certificate(f.read()))
        self.aborted = False

    def getPeerCertificate(self) -> Any:
        return self.cert

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class Echo(amp.Command):
    arguments = [(b"text", amp.Unicode())]
    response = [(b"text", amp.Unicode())]
    errors = {PermissionDenied: PermissionDenied.code}


class Secret(Echo):
    commandName = b"Secret"


class Guarded(RoleGuard):
    command_roles = allow((CLIENT,), (Echo,))

    @Echo.responder
    def echo(self, text: str) -> dict[str, Any]:
        return {"text": text}

    @Secret.responder
    def secret(self, text: str) -> dict[str, Any]:
        return {"text": "the secret"}


def ask(proto: amp.AMP, transport: StringTransport, command: type[amp.Command],
        **arguments: Any) -> dict[bytes, bytes]:
    box = command.makeArguments(arguments, proto)
    box[b"_command"], box[b"_ask"] = command.commandName, b"7"
    transport.clear()
    proto.dataReceived(box.serialize())
    [answer] = amp.parseString(transport.value())
    return answer


@pytest.fixture(scope="module")
def certs(tmp_path_factory: Any) -> Path:
    directory = tmp_path_factory.mktemp("roles-pki")
    pki.ensure(str(directory), [("client", "alice", []), ("server", "server1", [])])
    return directory


def connected(transport: StringTransport, clock: Clock | None = None) -> Guarded:
    proto = Guarded()
    proto.clock = clock
    proto.makeConnection(transport)
    return proto


def test_a_command_is_answered_for_its_roles_and_refused_for_the_others(certs: Path) -> None:
    transport = TLSTransport(str(certs / "alice.crt"))
    proto = connected(transport)
    assert ask(proto, transport, Echo, text="hi")[b"text"] == b"hi"
    # Not in the table: nobody may send it over TLS.
    answer = ask(proto, transport, Secret, text="hi")
    assert answer[b"_error_code"] == PermissionDenied.code
    assert answer[b"_error_description"] == b"Secret is not accepted on this port"

    transport = TLSTransport(str(certs / "server1.crt"))
    proto = connected(transport)
    answer = ask(proto, transport, Echo, text="hi")
    assert answer[b"_error_code"] == PermissionDenied.code
    assert answer[b"_error_description"] == (
        b"Echo needs the role client; this certificate's role is server")


def test_before_the_handshake_a_peer_has_no_role(certs: Path) -> None:
    transport = TLSTransport(None)
    proto = connected(transport)
    answer = ask(proto, transport, Echo, text="hi")
    assert answer[b"_error_code"] == PermissionDenied.code


def test_plaintext_is_trusted_as_configured() -> None:
    transport = StringTransport()
    proto = connected(transport)
    assert ask(proto, transport, Echo, text="hi")[b"text"] == b"hi"
    assert ask(proto, transport, Secret, text="x")[b"text"] == b"the secret"


def test_a_connection_that_does_not_finish_its_handshake_is_closed(certs: Path) -> None:
    clock = Clock()
    transport = TLSTransport(None)
    connected(transport, clock)
    clock.advance(tls.HANDSHAKE_TIMEOUT - 0.1)
    assert not transport.aborted
    clock.advance(0.2)
    assert transport.aborted

    done = TLSTransport(str(certs / "alice.crt"))
    proto = connected(done, clock)
    proto.handshakeCompleted()
    clock.advance(tls.HANDSHAKE_TIMEOUT * 2)
    assert not done.aborted
    assert not clock.getDelayedCalls()


def test_a_dialled_peer_of_another_role_is_hung_up_on(certs: Path) -> None:
    # The client library dials a server; a client's certificate answering is not one.
    impostor = TLSTransport(str(certs / "alice.crt"))
    proto = connected(impostor)
    proto.peer_roles = frozenset({SERVER})
    proto.handshakeCompleted()
    assert impostor.aborted

    genuine = TLSTransport(str(certs / "server1.crt"))
    proto = connected(genuine)
    proto.peer_roles = frozenset({SERVER})
    proto.handshakeCompleted()
    assert not genuine.aborted


def test_every_command_a_server_or_the_ecs_answers_has_its_roles() -> None:
    from chainstore.amp_server import KVServerProtocol
    from chainstore.ecs_link import ServerControlProtocol
    from ecs.server import ECSProtocol

    for kind in (KVServerProtocol, ServerControlProtocol, ECSProtocol):
        # AMP's own StartTLS is answered by none (TLS is set up before AMP starts).
        names = set(kind._commandDispatch) - {b"StartTLS"}
        assert names and names == set(kind.command_roles), kind
    assert KVServerProtocol.command_roles[protocol.Put.commandName] == {"client", "admin"}
    assert KVServerProtocol.command_roles[control.Relay.commandName] == {"server"}


def test_a_revocation_closes_the_open_connections_of_the_peer_it_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusing a revoked peer's commands left it its connections: slots of the listener's
    cap, and the answers it sends to our own calls (a revoked server acknowledging the
    writes replicated to it, or answering the ECS's heartbeats)."""
    monkeypatch.setattr(tls, "_revoked", frozenset())
    directory = str(tmp_path)
    pki.ensure(directory, [("client", "mallory", []), ("client", "alice", []),
                           ("server", "server1", [])])
    credentials = tls.Credentials(tls.TLSFiles.in_dir(directory, "server1"))
    credentials.check()
    transports = {name: TLSTransport(str(tmp_path / f"{name}.crt")) for name in
                  ("mallory", "alice")}
    # (the protocols are kept: a socket's transport holds its protocol, this one does not)
    protocols = [connected(transport) for transport in transports.values()]
    # an answer-only connection: we dialled mallory (it sends no command of its own)
    dialled = TLSTransport(str(tmp_path / "mallory.crt"))
    protocols.append(connected(dialled))
    for proto in protocols:
        proto.handshakeCompleted()
    pki.revoke(directory, "mallory")
    credentials.check()  # what the watcher does every tls.REFRESH_SECONDS
    assert transports["mallory"].aborted and dialled.aborted
    assert not transports["alice"].aborted
    # A handshake that completes after the list was loaded is cut off as well.
    late = TLSTransport(str(tmp_path / "mallory.crt"))
    connected(late).handshakeCompleted()
    assert late.aborted


# -- the listener's slots: per address before the handshake, a reserve for servers after -------


class CountedGuarded(Counted, Guarded):
    pass


class Listener(CappedFactory):
    def build_protocol(self, addr: Any) -> Counted:
        return CountedGuarded()


def accept(listener: Listener, transport: TLSTransport, host: str = "10.0.0.1") -> Any:
    from twisted.internet.address import IPv4Address
    transport.peerAddr = IPv4Address("TCP", host, 40000)
    proto = listener.buildProtocol(transport.peerAddr)
    proto.makeConnection(transport)
    return proto


def test_one_address_may_hold_only_so_many_connections_before_their_handshake(
        certs: Path) -> None:
    listener = Listener(max_connections=MAX_UNVERIFIED_PER_HOST * 4)
    waiting = [TLSTransport(str(certs / "alice.crt")) for _ in range(MAX_UNVERIFIED_PER_HOST)]
    protos = [accept(listener, t) for t in waiting]
    assert not any(t.aborted for t in waiting)
    one_more = TLSTransport(str(certs / "alice.crt"))
    accept(listener, one_more)
    assert one_more.aborted  # closed at once, not after the handshake timeout
    elsewhere = TLSTransport(str(certs / "server1.crt"))
    accept(listener, elsewhere, host="10.0.0.2")
    assert not elsewhere.aborted
    # A finished handshake frees its address's slot.
    protos[0].handshakeCompleted()
    again = TLSTransport(str(certs / "alice.crt"))
    accept(listener, again)
    assert not again.aborted
    # So does a connection that closes before it.
    protos[1].connectionLost(Failure(ConnectionDone()))
    assert listener.unverified["10.0.0.1"] == MAX_UNVERIFIED_PER_HOST - 1


def test_clients_cannot_take_the_slots_kept_for_servers(certs: Path) -> None:
    listener = Listener(max_connections=PEER_RESERVE + 3)
    clients = []
    for i in range(3):
        transport = TLSTransport(str(certs / "alice.crt"))
        accept(listener, transport, host=f"10.0.1.{i}").handshakeCompleted()
        clients.append(transport)
    assert not any(t.aborted for t in clients)
    fourth = TLSTransport(str(certs / "alice.crt"))
    proto = accept(listener, fourth, host="10.0.1.9")
    assert not fourth.aborted  # not known as a client before its handshake
    proto.handshakeCompleted()
    assert fourth.aborted
    proto.connectionLost(Failure(ConnectionDone()))
    server = TLSTransport(str(certs / "server1.crt"))
    accept(listener, server, host="10.0.2.1").handshakeCompleted()
    assert not server.aborted
    assert listener.unreserved == 3
