"""The cluster's certificates: a CA, and one certificate per server, ECS, admin and client.

Every AMP link is mutual TLS between holders of certificates issued by the cluster's CA. A
certificate names its holder in the subject's common name (a server's name is the one it
registers under) and carries exactly one role in a subjectAltName URI,
``chainstore-role:<role>`` (one colon: service-identity parses every URI name of a
certificate it checks as ``scheme:host``, and refuses the certificate otherwise); its DNS and IP subjectAltNames are the hosts it may be dialled
at, which the dialling side checks with service-identity.

A PKI directory holds ``ca.crt`` and ``ca.key`` and, for each holder, ``NAME.crt`` and
``NAME.key``; private keys are written with mode 0600. ``chainstore-pki`` (L{main}) is the
command line for it.

A certificate whose key leaked is **revoked** (L{revoke}): its serial number goes into
``ca.crl``, a certificate revocation list signed by the CA, beside ``ca.crt``. Every process
reads the list beside the CA certificate it trusts, checks its signature, and refuses a peer
whose certificate it names during the handshake (L{chainstore.tls}); a list changed on disk is
read again for the next connection, as renewed certificates are.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("server", "ecs", "admin", "client")
ROLE_URI = "chainstore-role:"
DEFAULT_DIR = os.path.join("data", "pki")
CA_NAME = "ca"
CA_DAYS = 3650
CERT_DAYS = 825
#: Hosts every certificate made for this machine may be dialled at, beside the given ones.
LOCAL_HOSTS = ("127.0.0.1", "localhost")

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class PKIError(Exception):
    """A PKI operation cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Identity:
    """Who holds a certificate: its common name and its one role (None: no chainstore role)."""

    name: str
    role: str | None
    #: the certificate's serial number (a revocation list names certificates by it)
    serial: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Issued:
    name: str
    role: str | None
    hosts: tuple[str, ...]
    not_after: datetime.datetime
    serial: int


def crl_path(ca_cert: str) -> str:
    """Where the revocation list of the CA certificate C{ca_cert} is: beside it, C{.crl}."""
    return os.path.splitext(ca_cert)[0] + ".crl"


def cert_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.crt")


def key_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.key")


def identity_of(cert: x509.Certificate) -> Identity:
    """The holder's name (common name) and role (the SAN URI) of a certificate."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    roles = [uri[len(ROLE_URI):] for uri in _sans(cert, x509.UniformResourceIdentifier)
             if uri.startswith(ROLE_URI)]
    # Two roles in one certificate is not something this PKI issues: trust neither.
    role = roles[0] if len(roles) == 1 and roles[0] in ROLES else None
    return Identity(name, role, cert.serial_number)


def _sans(cert: x509.Certificate, kind: type) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.value.get_values_for_type(kind)]


def _write_private(path: str, data: bytes) -> None:
    # Written under a temporary name and renamed, so a reader never sees half a key, and
    # created 0600 from the start, never readable by others even for a moment.
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@contextmanager
def _locked(directory: str) -> Iterator[None]:
    # Several processes may set up one directory at once (servers started together).
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: small keys, fast handshakes, supported by every TLS stack.
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(directory: str = DEFAULT_DIR, days: int = CA_DAYS, name: str = "chainstore CA",
            now: datetime.datetime | None = None) -> str:
    """Create the CA in C{directory}; refuse if one is there (it would orphan every
    certificate it issued). Returns the CA certificate's path."""
    with _locked(directory):
        return _init_ca(directory, days, name, now)


def _init_ca(directory: str, days: int, name: str, now: datetime.datetime | None) -> str:
    crt, key_file = cert_path(directory, CA_NAME), key_path(directory, CA_NAME)
    if os.path.exists(crt) or os.path.exists(key_file):
        raise PKIError(f"a CA exists in {directory} already; certificates it issued would no "
                       "longer be trusted if it were replaced")
    key = _new_key()
    start = (now or _now()) - datetime.timedelta(minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_file, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write_public(crt, cert.public_bytes(serialization.Encoding.PEM))
    return crt


def _load_ca(directory: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        with open(cert_path(directory, CA_NAME), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path(directory, CA_NAME), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
    except FileNotFoundError:
        raise PKIError(f"no CA in {directory}: create one with 'chainstore-pki init "
                       f"--dir {directory}'") from None
    except ValueError as e:
        raise PKIError(f"the CA in {directory} cannot be read: {e}") from None
    return cert, key  # type: ignore[return-value]


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?", host):
        raise PKIError(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def issue(directory: str, role: str, name: str, hosts: Iterable[str] = (),
          days: int = CERT_DAYS, now: datetime.datetime | None = None) -> tuple[str, str]:
    """Issue (or renew: the files are replaced) the certificate of C{name} with C{role},
    valid for C{hosts}; returns the paths of its certificate and key."""
    with _locked(directory):
        return _issue(directory, role, name, hosts, days, now)


def _issue(directory: str, role: str, name: str, hosts: Iterable[str], days: int,
           now: datetime.datetime | None) -> tuple[str, str]:
    if role not in ROLES:
        raise PKIError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    if not _NAME.fullmatch(name) or name == CA_NAME:
        raise PKIError(f"name {name!r}: use letters, digits, '_', '.' or '-' (not 'ca')")
    if days < 1:
        raise PKIError("a certificate must be valid for at least one day")
    ca_cert, ca_key = _load_ca(directory)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI + role)]
    for host in dict.fromkeys(hosts):
        names.append(_host_name(host))
    key = _new_key()
    start = (now or _now()) - datetime.timedelta(minutes=5)
    end = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        # Every holder both dials and is dialled (a server serves clients and dials peers).
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt, key_file = cert_path(directory, name), key_path(directory, name)
    # The key first: a reader that sees the new certificate finds its key already there.
    _write_private(key_file, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write_public(crt, cert.public_bytes(serialization.Encoding.PEM))
    return crt, key_file


def ensure(directory: str, holders: Iterable[tuple[str, str, Sequence[str]]]) -> None:
    """Create the CA if C{directory} has none, and issue each C{(role, name, hosts)} that has
    no certificate yet. What exists is reused as it is, never replaced."""
    holders = list(holders)
    with _locked(directory):
        if not os.path.exists(cert_path(directory, CA_NAME)):
            _init_ca(directory, CA_DAYS, "chainstore CA", None)
        for role, name, hosts in holders:
            if not os.path.exists(cert_path(directory, name)):
                # Only those that are dialled get hosts: a client's certificate names none,
                # so it can never pass for a server at any address.
                dialled = role in ("server", "ecs")
                _issue(directory, role, name, [*hosts, *LOCAL_HOSTS] if dialled else [],
                       CERT_DAYS, None)


def revoke(directory: str, name: str, now: datetime.datetime | None = None) -> int:
    """Revoke the certificate C{NAME.crt} of C{directory}: add its serial number to the CA's
    revocation list (written anew, signed by the CA) and return it. Issuing C{name} again
    gives a new certificate, with a new serial number, that the list does not name."""
    with _locked(directory):
        ca_cert, ca_key = _load_ca(directory)
        try:
            with open(cert_path(directory, name), "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except FileNotFoundError:
            raise PKIError(f"no certificate {cert_path(directory, name)} to revoke") from None
        except ValueError as e:
            raise PKIError(f"{cert_path(directory, name)} cannot be read: {e}") from None
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise PKIError(f"{cert_path(directory, name)} was not issued by this CA") from None
        crl_file = crl_path(cert_path(directory, CA_NAME))
        listed = _read_crl(crl_file, ca_cert) if os.path.exists(crl_file) else None
        when = now or _now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(ca_cert.subject)
                   .last_update(when - datetime.timedelta(minutes=5))
                   # Checked by nothing here, but required: the CA's own end.
                   .next_update(max(ca_cert.not_valid_after_utc,
                                    when + datetime.timedelta(days=1))))
        serials = set()
        for entry in listed or ():
            serials.add(entry.serial_number)
            builder = builder.add_revoked_certificate(entry)
        if cert.serial_number not in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(when).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        _write_public(crl_file, crl.public_bytes(serialization.Encoding.PEM))
        return cert.serial_number


def _read_crl(path: str, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    try:
        with open(path, "rb") as f:
            crl = x509.load_pem_x509_crl(f.read())
    except ValueError as e:
        raise PKIError(f"the revocation list {path} cannot be read: {e}") from None
    public_key = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(public_key):  # type: ignore[arg-type]
        raise PKIError(f"the revocation list {path} is not signed by the CA beside it: "
                       "replace it with the one 'chainstore-pki revoke' made")
    return crl


def revoked_serials(ca_cert_file: str, ca_pem: bytes | None = None) -> frozenset[int]:
    """The serial numbers the revocation list beside C{ca_cert_file} names (none if there is
    no list); L{PKIError} if the list is there but unreadable or not signed by that CA.
    C{ca_pem}: the CA certificate as the caller already read it (so that the list is checked
    against the very CA it loaded, even if the file is being replaced meanwhile)."""
    path = crl_path(ca_cert_file)
    if not os.path.exists(path):
        return frozenset()
    try:
        if ca_pem is None:
            with open(ca_cert_file, "rb") as f:
                ca_pem = f.read()
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except (OSError, ValueError) as e:
        raise PKIError(f"cannot read the CA certificate {ca_cert_file}: {e}") from None
    return frozenset(entry.serial_number for entry in _read_crl(path, ca_cert))


def list_issued(directory: str = DEFAULT_DIR) -> list[Issued]:
    """Every certificate in C{directory} but the CA's, by name."""
    found = []
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        raise PKIError(f"no PKI directory {directory}") from None
    for entry in entries:
        if not entry.endswith(".crt") or entry == f"{CA_NAME}.crt":
            continue
        with open(os.path.join(directory, entry), "rb") as f:
            try:
                cert = x509.load_pem_x509_certificate(f.read())
            except ValueError:
                continue
        who = identity_of(cert)
        hosts = tuple(_sans(cert, x509.DNSName) + _sans(cert, x509.IPAddress))
        found.append(Issued(who.name, who.role, hosts, cert.not_valid_after_utc,
                            cert.serial_number))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chainstore-pki",
        description="Create the cluster's CA and issue the certificates of its servers, ECS, "
                    "admins and clients (mutual TLS on every AMP link).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  chainstore-pki init\n"
               "  chainstore-pki issue server server1 --host db1.example.net --host 10.0.0.11\n"
               "  chainstore-pki issue admin alice\n"
               "  chainstore-pki list\n"
               "  chainstore-pki revoke alice\n"
               "Issuing a name again renews it: running processes use the new files for "
               "their new connections.")
    parser.add_argument("--dir", default=DEFAULT_DIR,
                        help="the PKI directory (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = sub.add_parser("init", help="create the CA (ca.crt, ca.key)")
    init.add_argument("--days", type=int, default=CA_DAYS,
                      help="validity in days (default: %(default)s)")
    new = sub.add_parser("issue", help="issue or renew NAME.crt and NAME.key")
    new.add_argument("role", choices=ROLES)
    new.add_argument("name", help="the holder; a server's is the name it registers under")
    new.add_argument("--host", action="append", default=[], metavar="HOST",
                     help="a DNS name or IP address it is dialled at (repeat for several)")
    new.add_argument("--local", action="store_true",
                     help=f"add {' and '.join(LOCAL_HOSTS)} to the hosts")
    new.add_argument("--days", type=int, default=CERT_DAYS,
                     help="validity in days (default: %(default)s)")
    sub.add_parser("list", help="every certificate issued: name, role, hosts, expiry")
    gone = sub.add_parser(
        "revoke", help="revoke NAME.crt (a leaked key): its serial goes into ca.crl, which "
                       "every process reads beside ca.crt; copy ca.crl wherever ca.crt is")
    gone.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            print(f"created {init_ca(args.dir, args.days)}")
        elif args.command == "issue":
            hosts = [*args.host, *(LOCAL_HOSTS if args.local else ())]
            crt, key = issue(args.dir, args.role, args.name, hosts, args.days)
            print(f"issued {crt} and {key} ({args.role}; hosts: {', '.join(hosts) or 'none'})")
        elif args.command == "revoke":
            serial = revoke(args.dir, args.name)
            print(f"revoked {cert_path(args.dir, args.name)} (serial {serial:X}) in "
                  f"{crl_path(cert_path(args.dir, CA_NAME))}; copy it wherever ca.crt is")
        else:
            now = _now()
            revoked = revoked_serials(cert_path(args.dir, CA_NAME))
            print(f"{'NAME':<20} {'ROLE':<7} {'EXPIRES':<11} HOSTS")
            for c in list_issued(args.dir):
                expiry = c.not_after.date().isoformat() + (" EXPIRED" if c.not_after < now
                                                             else "")
                if c.serial in revoked:
                    expiry += " REVOKED"
                print(f"{c.name:<20} {c.role or '-':<7} {expiry:<11} {', '.join(c.hosts)}")
    except PKIError as e:
        print(f"chainstore-pki: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
