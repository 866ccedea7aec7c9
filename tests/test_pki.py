"""chainstore-pki: the CA, issued certificates, their roles and hosts, and the command line."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from chainstore import pki


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_then_issue_writes_a_certificate_its_ca_signed(tmp_path: Path) -> None:
    pki.init_ca(str(tmp_path))
    crt, key = pki.issue(str(tmp_path), "server", "server1", ["db1.example.net", "10.0.0.11"])
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600
    cert, ca = load(Path(crt)), load(tmp_path / "ca.crt")
    cert.verify_directly_issued_by(ca)
    assert pki.identity_of(cert) == pki.Identity("server1", "server")
    [issued] = pki.list_issued(str(tmp_path))
    assert (issued.name, issued.role) == ("server1", "server")
    assert set(issued.hosts) == {"db1.example.net", "10.0.0.11"}


def test_a_second_ca_is_refused(tmp_path: Path) -> None:
    pki.init_ca(str(tmp_path))
    with pytest.raises(pki.PKIError, match="a CA exists"):
        pki.init_ca(str(tmp_path))


@pytest.mark.parametrize("role, name, hosts, message", [
    ("root", "x", [], "role 'root'"),
    ("client", "a b", [], "name 'a b'"),
    ("client", "ca", [], "name 'ca'"),
    ("server", "s", ["not a host!"], "neither an IP address nor a DNS name"),
])
def test_bad_requests_are_refused(tmp_path: Path, role: str, name: str, hosts: list[str],
                                  message: str) -> None:
    pki.init_ca(str(tmp_path))
    with pytest.raises(pki.PKIError, match=message):
        pki.issue(str(tmp_path), role, name, hosts)


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match="chainstore-pki init"):
        pki.issue(str(tmp_path), "client", "c")


def test_ensure_makes_what_is_missing_and_keeps_what_exists(tmp_path: Path) -> None:
    pki.ensure(str(tmp_path), [("server", "s1", ["10.1.1.1"]), ("client", "c", ["10.9.9.9"])])
    first = (tmp_path / "s1.crt").read_bytes()
    pki.ensure(str(tmp_path), [("server", "s1", []), ("admin", "a", [])])
    assert (tmp_path / "s1.crt").read_bytes() == first
    hosts = {c.name: set(c.hosts) for c in pki.list_issued(str(tmp_path))}
    # Servers are dialled on this machine too; a client's certificate names no host at all.
    assert hosts == {"s1": {"10.1.1.1", "127.0.0.1", "localhost"}, "c": set(), "a": set()}


def test_a_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    pki.init_ca(str(tmp_path), days=10)
    crt, _ = pki.issue(str(tmp_path), "client", "c", days=400)
    assert load(Path(crt)).not_valid_after_utc <= load(tmp_path / "ca.crt").not_valid_after_utc


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = str(tmp_path / "pki")
    assert pki.main(["--dir", directory, "init"]) == 0
    assert pki.main(["--dir", directory, "issue", "admin", "alice"]) == 0
    assert pki.main(["--dir", directory, "issue", "server", "s1", "--host", "h1", "--local"]) == 0
    assert pki.main(["--dir", directory, "init"]) == 1
    capsys.readouterr()
    assert pki.main(["--dir", directory, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "EXPIRES", "HOSTS"]
    expires = (datetime.datetime.now(datetime.timezone.utc)
               + datetime.timedelta(days=pki.CERT_DAYS, minutes=-5)).date().isoformat()
    assert lines[1].split() == ["alice", "admin", expires]
    assert lines[2].split()[:2] == ["s1", "server"] and lines[2].endswith("h1, localhost, 127.0.0.1")
    assert pki.main(["--dir", str(tmp_path / "none"), "list"]) == 1
    assert "no PKI directory" in capsys.readouterr().err


# -- revocation ------------------------------------------------------------------------------------

def test_revoke_lists_the_serial_in_a_crl_the_ca_signed(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    directory = str(tmp_path)
    pki.ensure(directory, [("client", "alice", []), ("client", "bob", [])])
    ca_file = pki.cert_path(directory, "ca")
    assert pki.revoked_serials(ca_file) == frozenset()  # no list: nothing revoked
    alice = load(tmp_path / "alice.crt").serial_number
    assert pki.revoke(directory, "alice") == alice
    crl = x509.load_pem_x509_crl((tmp_path / "ca.crl").read_bytes())
    assert crl.is_signature_valid(load(tmp_path / "ca.crt").public_key())  # type: ignore[arg-type]
    assert pki.revoked_serials(ca_file) == {alice}
    # Revoking again changes nothing; another name is added to what the list held.
    pki.revoke(directory, "alice")
    bob = pki.revoke(directory, "bob")
    assert pki.revoked_serials(ca_file) == {alice, bob}
    # Issued again, alice has a new certificate the list does not name.
    pki.issue(directory, "client", "alice")
    assert load(tmp_path / "alice.crt").serial_number not in pki.revoked_serials(ca_file)
    assert pki.main(["--dir", directory, "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "REVOKED" in lines["bob"] and "REVOKED" not in lines["alice"]


def test_a_revocation_list_of_another_ca_or_unreadable_is_an_error(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    pki.ensure(str(ours), [("client", "alice", [])])
    pki.ensure(str(theirs), [("client", "alice", [])])
    pki.revoke(str(theirs), "alice")
    (ours / "ca.crl").write_bytes((theirs / "ca.crl").read_bytes())
    with pytest.raises(pki.PKIError, match="ours/ca.crl is not signed by the CA beside it"):
        pki.revoked_serials(str(ours / "ca.crt"))
    # Checked against the CA the caller loaded (a TLS reload), not the file read again.
    assert pki.revoked_serials(str(ours / "ca.crt"), (theirs / "ca.crt").read_bytes()) == {
        load(theirs / "alice.crt").serial_number}
    (ours / "ca.crl").write_bytes(b"garbage")
    with pytest.raises(pki.PKIError, match="ca.crl cannot be read"):
        pki.revoked_serials(str(ours / "ca.crt"))
    with pytest.raises(pki.PKIError, match="no certificate .*nobody.crt to revoke"):
        pki.revoke(str(theirs), "nobody")
    # A certificate of another CA copied in is not this CA's to revoke.
    (theirs / "stranger.crt").write_bytes((ours / "alice.crt").read_bytes())
    with pytest.raises(pki.PKIError, match="was not issued by this CA"):
        pki.revoke(str(theirs), "stranger")
