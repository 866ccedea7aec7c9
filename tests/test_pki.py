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
