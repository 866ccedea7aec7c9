"""Mutual TLS and roles against real ``twistd`` processes on loopback.

Every probe a stranger ran against the plaintext cluster is here, and must be refused: no
certificate, a certificate of another CA, an expired one, a server certificate that does not
name the host dialled, a certificate of the wrong role, a server registering as another one. A
certificate renewed on disk is used for the next connection without a restart.
"""

from __future__ import annotations

import datetime
import json
import shutil
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from chainstore import control, pki, protocol, tls
from chainstore.errors import PermissionDenied
from harness.processes import (
    AMPError,
    ECSProcess,
    KVServerProcess,
    amp_call,
    connect,
    sock_call,
)
from chainstore.tls import TLSFiles
from client.kvstore import KVStore
from ecs import protocol as admin

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: Any) -> Any:
    """A standalone server with TLS on by default: it made its PKI in its work directory."""
    workdir = tmp_path_factory.mktemp("tls-server")
    proc = KVServerProcess(workdir, "kvserver")
    try:
        proc.start()
        amp_call(proc.host, proc.amp_port, proc.tls("client"), protocol.Put, key=b"k",
                 value=b"original")
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def ecs(tmp_path_factory: Any) -> Any:
    """An ECS that launches nothing (its pool's certificates are made all the same)."""
    workdir = tmp_path_factory.mktemp("tls-ecs")
    proc = ECSProcess(workdir, slots=3, initial_nodes=0, launcher="none")
    try:
        proc.start()
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def strangers(tmp_path_factory: Any) -> dict[str, TLSFiles]:
    """Certificates no cluster here trusts: another CA's admin and server, with that CA."""
    directory = tmp_path_factory.mktemp("other-ca")
    pki.ensure(str(directory), [("admin", "admin", []), ("server", "server1", []),
                                ("client", "client", [])])
    return {name: TLSFiles.in_dir(str(directory), name) for name in ("admin", "server1",
                                                                       "client")}


def no_certificate(files: TLSFiles) -> TLSFiles:
    """Files that trust the cluster's CA but present no certificate at all (see L{refused})."""
    return TLSFiles(files.ca, "", "")


def expired(directory: Path, role: str, name: str) -> TLSFiles:
    """A certificate of the cluster's own CA for C{name} that expired yesterday."""
    out = directory.parent / f"expired-{name}"
    out.mkdir(exist_ok=True)
    for f in ("ca.crt", "ca.key"):
        shutil.copy(directory / f, out / f)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    pki.issue(str(out), role, name, ["127.0.0.1"], days=2, now=past)
    return TLSFiles(str(directory / "ca.crt"), str(out / f"{name}.crt"),
                    str(out / f"{name}.key"))


def raw_call(host: str, port: int, files: TLSFiles, command: Any, **arguments: Any) -> Any:
    """L{amp_call}, also presenting no certificate when C{files} has none."""
    if files.cert:
        return amp_call(host, port, files, command, TIMEOUT, **arguments)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.ca)
    box = command.makeArguments(arguments, None)
    box[b"_command"], box[b"_ask"] = command.commandName, b"1"
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock, \
            context.wrap_socket(sock, server_hostname=host) as s:
        s.sendall(box.serialize())
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed without an answer")
        return data


def refused_at_handshake(host: str, port: int, files: TLSFiles, command: Any,
                         **arguments: Any) -> None:
    """The connection fails: no answer to C{command} ever comes back."""
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        raw_call(host, port, files, command, **arguments)


# -- the server's AMP port ---------------------------------------------------------------------


def test_a_server_refuses_connections_without_a_certificate_of_its_ca(
        server: KVServerProcess, strangers: dict[str, TLSFiles], tmp_path: Path) -> None:
    host, port = server.amp_address
    mine = server.tls("client")
    assert mine is not None and server.pki_dir is not None
    refused_at_handshake(host, port, no_certificate(mine), protocol.Get, key=b"k")
    # Another CA's client: the server does not trust it (and we do not trust the server).
    other = TLSFiles(mine.ca, strangers["client"].cert, strangers["client"].key)
    refused_at_handshake(host, port, other, protocol.Get, key=b"k")
    refused_at_handshake(host, port, expired(server.pki_dir, "client", "client"), protocol.Get,
                         key=b"k")
    # Plaintext to the TLS port: no answer either (a TLS alert at most, then the close).
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        box = protocol.Get.makeArguments({"key": b"k"}, None)
        box[b"_command"], box[b"_ask"] = b"Get", b"1"
        s.sendall(box.serialize())
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except OSError:
            pass
        assert b"_answer" not in received and b"original" not in received
    # The cluster's own client is served.
    assert amp_call(host, port, mine, protocol.Get, key=b"k") == {"value": b"original"}


def test_a_clients_certificate_may_not_replicate_or_copy_into_a_server(
        server: KVServerProcess) -> None:
    host, port = server.amp_address
    client = server.tls("client")
    for command, arguments in (
            (control.Relay, {"epoch": 1, "data": b"".join(control.pack_section(
                control.BATCH, "kvserver", 0, control.pack_ops([(1, control.PUT, b"k",
                                                                 b"injected", b"")])))}),
            (control.ReceiveRange, {"epoch": 2 ** 40, "store": "coordinator",
                                    "items": control.pack_items([(b"k", b"injected")])}),
            (control.RenewLease, {"epoch": 1, "owner": "kvserver"})):
        with pytest.raises(AMPError) as refused:
            amp_call(host, port, client, command, **arguments)
        assert refused.value.code == PermissionDenied.code
        assert "needs the role server" in refused.value.description
        assert "role is client" in refused.value.description
    # Nothing was applied.
    assert amp_call(host, port, client, protocol.Get, key=b"k") == {"value": b"original"}
    log = server.log_path.read_text()
    assert "refused ReceiveRange from 127.0.0.1" in log and "(client, role client)" in log


def test_a_servers_certificate_may_not_use_the_data_commands(server: KVServerProcess) -> None:
    host, port = server.amp_address
    with pytest.raises(AMPError) as refused:
        amp_call(host, port, server.tls("kvserver"), protocol.Put, key=b"k", value=b"x")
    assert refused.value.code == PermissionDenied.code
    assert refused.value.description == ("Put needs the role admin or client; this "
                                         "certificate's role is server")
    # An admin may.
    assert amp_call(host, port, server.tls("admin"), protocol.Get, key=b"k") == \
        {"value": b"original"}


def test_a_renewed_server_certificate_is_used_for_new_connections(
        server: KVServerProcess) -> None:
    host, port = server.amp_address
    assert server.pki_dir is not None

    def serial() -> int:
        with connect(host, port, server.tls("client")) as s:
            return int(s.getpeercert()["serialNumber"], 16)  # type: ignore[index]

    before = serial()
    pki.issue(str(server.pki_dir), "server", "kvserver", ["127.0.0.1", "localhost"])
    assert serial() != before
    assert amp_call(host, port, server.tls("client"), protocol.Get, key=b"k") == \
        {"value": b"original"}
    assert "loaded renewed TLS files" in server.log_path.read_text()


@pytest_twisted.ensureDeferred
async def test_the_library_refuses_a_server_whose_certificate_does_not_name_its_host(
        tmp_path: Path, pki_dir: Path, reactor: Any) -> None:
    # A certificate of the right CA and role, issued for another host only.
    directory = tmp_path / "pki"
    shutil.copytree(pki_dir, directory)
    pki.issue(str(directory), "server", "elsewhere", ["db9.example.net"])
    proc = KVServerProcess(tmp_path, "elsewhere", extra_args=[
        "--tls-ca", str(directory / "ca.crt"), "--tls-cert", str(directory / "elsewhere.crt"),
        "--tls-key", str(directory / "elsewhere.key")])
    try:
        proc.start()
        store = KVStore(reactor, [proc.amp_address], timeout=5, deadline=5,
                        tls=TLSFiles.in_dir(str(directory), "client"))
        try:
            with pytest.raises(Exception) as failed:
                await store.get("k")
            assert tls.describe_failure(failed.value) is not None, repr(failed.value)
            assert "does not name the host" in tls.describe_failure(failed.value) or \
                "certificate verify failed" in tls.describe_failure(failed.value)
        finally:
            store.close()
    finally:
        proc.stop()


@pytest_twisted.ensureDeferred
async def test_a_revoked_certificate_is_refused_at_the_handshake_both_ways(
        tmp_path: Path, pki_dir: Path, reactor: Any) -> None:
    # A key leaks: its certificate is revoked, and from the next connection on neither a
    # server nor a client accepts it, while every other certificate still works.
    directory = tmp_path / "pki"
    shutil.copytree(pki_dir, directory)
    pki.issue(str(directory), "client", "mallory")
    proc = KVServerProcess(tmp_path, "server1", extra_args=[
        "--tls-ca", str(directory / "ca.crt"), "--tls-cert", str(directory / "server1.crt"),
        "--tls-key", str(directory / "server1.key")])
    try:
        proc.start()
        host, port = proc.amp_address
        mallory = TLSFiles.in_dir(str(directory), "mallory")
        client = TLSFiles.in_dir(str(directory), "client")
        amp_call(host, port, mallory, protocol.Put, key=b"k", value=b"v")
        with connect(host, port, mallory) as open_before:
            assert sock_call(open_before, protocol.Get, key=b"k") == {"value": b"v"}
            pki.revoke(str(directory), "mallory")
            refused_at_handshake(host, port, mallory, protocol.Get, key=b"k")
            # The connection made before is closed once the server has loaded the list (at
            # the refused handshake, or its look every tls.REFRESH_SECONDS).
            deadline = time.monotonic() + 3 * tls.REFRESH_SECONDS + 5
            while True:
                try:
                    sock_call(open_before, protocol.Get, key=b"k")
                except OSError:  # closed (reset, or the end of the stream)
                    break
                assert time.monotonic() < deadline, "the revoked peer was still served"
                time.sleep(0.2)
        assert amp_call(host, port, client, protocol.Get, key=b"k") == {"value": b"v"}
        log = proc.log_path.read_text()
        assert "1 revoked certificate(s) in" in log
        assert "refused the certificate of mallory (role client, serial" in log
        assert "closing the connection of 127.0.0.1" in log and "was revoked" in log
        # The library, given a list that revokes the server's certificate, will not talk to it.
        own = tmp_path / "client-pki"
        shutil.copytree(directory, own)
        pki.revoke(str(own), "server1")
        store = KVStore(reactor, [proc.amp_address], timeout=5, deadline=3,
                        tls=TLSFiles.in_dir(str(own), "client"))
        try:
            with pytest.raises(Exception) as failed:
                await store.get("k")
            assert "certificate verify failed" in str(tls.describe_failure(failed.value))
        finally:
            store.close()
    finally:
        proc.stop()


def test_a_server_refuses_to_start_with_another_servers_certificate(
        tmp_path: Path, pki_dir: Path) -> None:
    proc = KVServerProcess(tmp_path, "server2", extra_args=[
        "--tls-ca", str(pki_dir / "ca.crt"), "--tls-cert", str(pki_dir / "server1.crt"),
        "--tls-key", str(pki_dir / "server1.key")])
    with pytest.raises(Exception) as failed:
        proc.start(timeout=10)
    proc.stop()
    assert "is the certificate of 'server1' with role server; this server needs one of " \
           "'server2'" in str(failed.value)


# -- the ECS's port ----------------------------------------------------------------------------


def test_the_ecs_obeys_admin_commands_only_from_an_admin(ecs: ECSProcess,
                                                         strangers: dict[str, TLSFiles]) -> None:
    host, port = ecs.host, ecs.port
    client = ecs.tls("client")
    for command, arguments in ((admin.ShutDown, {}), (admin.Stop, {}),
                               (admin.RemoveNode, {"name": "server1", "force": True}),
                               (admin.AddNodes, {"count": 1, "cache_strategy": "LRU",
                                                 "cache_size": 10}),
                               (admin.Status, {})):
        with pytest.raises(AMPError) as refused:
            amp_call(host, port, client, command, **arguments)
        assert refused.value.code == PermissionDenied.code
        assert f"{command.commandName.decode()} needs the role admin" in \
            refused.value.description
        # A server's certificate is no admin's either.
        with pytest.raises(AMPError):
            amp_call(host, port, ecs.tls("server1"), command, **arguments)
    assert ecs.tls("admin") is not None and ecs.pki_dir is not None
    mine = ecs.tls("admin")
    assert mine is not None
    refused_at_handshake(host, port, no_certificate(mine), admin.ShutDown)
    refused_at_handshake(host, port, TLSFiles(mine.ca, strangers["admin"].cert,
                                              strangers["admin"].key), admin.ShutDown)
    refused_at_handshake(host, port, expired(ecs.pki_dir, "admin", "admin"), admin.ShutDown)
    # Still running, and it answers its admin.
    assert ecs.running
    status = json.loads(amp_call(host, port, mine, admin.Status)["status"])
    assert status["members"] == []


def test_only_a_server_registers_and_only_as_itself(ecs: ECSProcess) -> None:
    host, port = ecs.host, ecs.port
    register = {"host": "127.0.0.1", "console_port": 1, "amp_port": 2, "epoch": 0}
    # server1's certificate may not register as server3 (impersonation)...
    with pytest.raises(AMPError) as refused:
        amp_call(host, port, ecs.tls("server1"), control.Register, name="server3", **register)
    assert refused.value.code == PermissionDenied.code
    assert "this certificate is 'server1''s; it cannot act as 'server3'" in \
        refused.value.description
    # ...nor may a client or an admin register at all.
    for holder in ("client", "admin"):
        with pytest.raises(AMPError) as refused:
            amp_call(host, port, ecs.tls(holder), control.Register, name=holder, **register)
        assert "Register needs the role server" in refused.value.description
    status = ecs.status()
    assert status["members"] == []
    assert "refused 127.0.0.1" in ecs.log_path.read_text()


def test_alive_counts_only_from_a_registered_server_link(ecs: ECSProcess) -> None:
    # Alive keeps a server "heard from" (and so not declared failed): only a server's
    # certificate may send it, and only on a link it registered on.
    host, port = ecs.host, ecs.port
    for holder in ("client", "admin"):
        with pytest.raises(AMPError) as refused:
            amp_call(host, port, ecs.tls(holder), control.Alive)
        assert refused.value.code == PermissionDenied.code
        assert "Alive needs the role server" in refused.value.description
    with pytest.raises(AMPError) as refused:
        amp_call(host, port, ecs.tls("server1"), control.Alive)
    assert refused.value.description == "this server has not registered on this link"
