"""Mutual TLS for every AMP link: who we are, whom we trust, and endpoints that use them.

Each process holds one certificate issued by the cluster's CA (L{chainstore.pki}) and trusts
that CA only. A listener requires a certificate from its peers; a dialling side checks with
service-identity that the peer's certificate names the host it dialled (DNS or IP
subjectAltName). What a peer may then do is decided by its role (L{chainstore.roles}).

Certificate files are read again when they change on disk, so a renewed certificate is used
for new connections without a restart; connections already open keep the one they began with.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.application.internet import TimerService
from twisted.internet.endpoints import HostnameEndpoint, serverFromString, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from chainstore import pki
from chainstore.logs import get_logger

log = get_logger("chainstore.tls")

#: Seconds a new connection has to finish its TLS handshake before it is closed.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds between two looks at a running process's TLS files (renewed certificates, a changed
#: revocation list), beside the look each new connection takes.
REFRESH_SECONDS = 2.0

# Every Credentials of this process (one, but for tests and the benchmarks), and the serials
# their revocation lists name together: is_revoked runs for every AMP box.
_everyone: weakref.WeakSet[Credentials] = weakref.WeakSet()
_revoked: frozenset[int] = frozenset()
# Open connections whose peer's certificate is known (L{roles.RoleGuard} adds each one when its
# handshake completes): a revocation list loaded later closes those of the peers it names.
# Refusing their commands alone would leave a revoked peer its connections (slots of the
# listener's cap) and the answers it sends to our calls (a revoked server still acknowledging
# replicated writes, or answering the ECS's heartbeats).
_open: weakref.WeakSet[Any] = weakref.WeakSet()


def is_revoked(serial: int | None) -> bool:
    """Whether a revocation list this process has loaded names the certificate C{serial}."""
    return serial in _revoked


def watch_peer(connection: Any) -> None:
    """Close C{connection} (its C{cut_off_revoked}) when a revocation list this process
    loads names its peer's certificate (C{connection.peer.serial})."""
    _open.add(connection)


def forget_peer(connection: Any) -> None:
    """C{connection} is closed (see L{watch_peer})."""
    _open.discard(connection)


def _cut_off_revoked() -> None:
    for connection in list(_open):
        peer = connection.peer
        if peer is not None and peer.serial in _revoked:
            _open.discard(connection)
            connection.cut_off_revoked()


class TLSConfigError(ValueError):
    """The TLS files are missing or unreadable; the message names the file and the fix."""


@dataclass(frozen=True)
class TLSFiles:
    """The files of one holder: the cluster's CA certificate, its own certificate and key."""

    ca: str
    cert: str
    key: str

    @classmethod
    def in_dir(cls, directory: str, name: str) -> TLSFiles:
        return cls(pki.cert_path(directory, pki.CA_NAME), pki.cert_path(directory, name),
                   pki.key_path(directory, name))


def switch(value: object, option: str = "tls") -> str:
    """C{on} or C{off} from a flag or YAML value (YAML reads a bare off as false)."""
    text = str(value).strip().lower()
    if text in ("on", "true", "yes", "1"):
        return "on"
    if text in ("off", "false", "no", "0"):
        return "off"
    raise TLSConfigError(f"{option} {value!r}: give on or off")


def holder_files(pki_dir: str, name: str, ca: str | None, cert: str | None,
                 key: str | None) -> TLSFiles:
    """The files given, each missing one taken from C{pki_dir} (C{NAME.crt} and C{NAME.key})."""
    default = TLSFiles.in_dir(pki_dir, name)
    return TLSFiles(ca or default.ca, cert or default.cert, key or default.key)


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


class Credentials:
    """A holder's TLS files, loaded lazily and loaded again when any of them changes."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._stamps: tuple[Any, ...] | None = None
        self._ca: Certificate | None = None
        self._mine: PrivateCertificate | None = None
        self._server: CertificateOptions | None = None
        self._clients: dict[str, Any] = {}
        #: serial numbers of the certificates the CA's revocation list names
        self.revoked: frozenset[int] = frozenset()
        _everyone.add(self)

    def _fresh(self) -> None:
        crl = pki.crl_path(self.files.ca)
        try:
            stamps = tuple(_stamp(p) for p in (self.files.ca, self.files.cert, self.files.key))
            stamps += (_stamp(crl) if os.path.exists(crl) else None,)
        except OSError as e:
            raise TLSConfigError(
                f"cannot read {e.filename}: {e.strerror}; create the PKI with chainstore-pki "
                "(see README, 'Security') or set tls: off for a trusted single machine") from None
        if stamps == self._stamps:
            return
        try:
            with open(self.files.ca, "rb") as f:
                ca_pem = f.read()
            ca = Certificate.loadPEM(ca_pem)
            with open(self.files.cert, "rb") as f:
                cert_pem = f.read()
            with open(self.files.key, "rb") as f:
                key_pem = f.read()
            mine = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
            revoked = pki.revoked_serials(self.files.ca, ca_pem)
        except pki.PKIError as e:
            raise TLSConfigError(str(e)) from None
        except (OSError, SSL.Error, ValueError) as e:
            raise TLSConfigError(f"cannot load {self.files}: {e}") from None
        if self._stamps is not None:
            log.info("loaded renewed TLS files {cert}", cert=self.files.cert)
        if revoked != self.revoked:
            log.info("{count} revoked certificate(s) in {crl}", count=len(revoked), crl=crl)
        self._stamps, self._ca, self._mine, self.revoked = stamps, ca, mine, revoked
        global _revoked
        before, _revoked = _revoked, frozenset().union(*(c.revoked for c in _everyone))
        if _revoked - before:
            _cut_off_revoked()
        self._server = None
        self._clients.clear()

    def check(self) -> pki.Identity:
        """Load the files now (a start-up check) and return whom they identify."""
        self._fresh()
        assert self._mine is not None
        return pki.identity_of(self._mine.original.to_cryptography())

    def server_options(self) -> CertificateOptions:
        self._fresh()
        if self._server is None:
            assert self._ca is not None and self._mine is not None
            self._server = CertificateOptions(
                # pyOpenSSL takes cryptography's objects (its own are deprecated there)
                privateKey=self._mine.privateKey.original.to_cryptography_key(),
                certificate=self._mine.original.to_cryptography(),
                # a peer without a certificate of our CA does not get past the handshake
                trustRoot=trustRootFromCertificates([self._ca]),
                raiseMinimumTo=TLSVersion.TLSv1_2,
            )
        return self._server

    def client_options(self, hostname: str) -> Any:
        self._fresh()
        options = self._clients.get(hostname)
        if options is None:
            assert self._ca is not None and self._mine is not None
            options = optionsForClientTLS(hostname, trustRoot=self._ca, extraCertificateOptions={
                "privateKey": self._mine.privateKey.original.to_cryptography_key(),
                "certificate": self._mine.original.to_cryptography(),
                "raiseMinimumTo": TLSVersion.TLSv1_2})
            if len(self._clients) > 256:
                self._clients.clear()
            self._clients[hostname] = options
        return options

    def watcher(self, clock: Any, interval: float = REFRESH_SECONDS) -> TimerService:
        """A service that looks at the files every C{interval} seconds, so that a revocation
        reaches the connections already open (they are closed, L{watch_peer}) without waiting
        for a new connection."""
        def look() -> None:
            try:
                self._fresh()
            except TLSConfigError as e:
                # New connections fail with the same error; the open ones keep what they had.
                log.error("{error}", error=str(e))

        service = TimerService(interval, look)
        service.clock = clock
        return service

    def refusing_revoked(self, connection: SSL.Connection) -> SSL.Connection:
        """C{connection}, made to fail its handshake if the peer's certificate is revoked
        (the chain is checked as before: this only adds the revocation list)."""
        revoked = self.revoked
        if not revoked:
            return connection

        def verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
            if not ok:
                return False
            if depth == 0 and cert.get_serial_number() in revoked:
                who = pki.identity_of(cert.to_cryptography())
                log.warn("refused the certificate of {name} (role {role}, serial {serial:X}): "
                         "it is revoked", name=who.name, role=who.role or "none",
                         serial=cert.get_serial_number())
                return False
            return True

        connection.set_verify(connection.get_context().get_verify_mode(), verify)
        return connection


def holder_credentials(files: TLSFiles, role: str, name: str | None, pki_dir: str | None,
                       holders: list[tuple[str, str, list[str]]], fix: str) -> Credentials:
    """A process's own credentials, checked at start: with C{pki_dir}, the PKI there is first
    completed with C{holders} (each made only when missing); then the files must load and name
    a holder of C{role} (and C{name}, if given). Raises L{TLSConfigError} naming the file and
    C{fix}, the command that would issue the right certificate."""
    try:
        if pki_dir is not None:
            pki.ensure(pki_dir, holders)
        credentials = Credentials(files)
        who = credentials.check()
    except (pki.PKIError, OSError) as e:
        raise TLSConfigError(str(e)) from None
    if who.role != role or (name is not None and who.name != name):
        wanted = f"one of {name!r}" if name is not None else "one"
        raise TLSConfigError(
            f"{files.cert} is the certificate of {who.name!r} with role {who.role or 'none'}; "
            f"this {'server' if role == 'server' else role.upper()} needs {wanted} with role "
            f"{role} ({fix})")
    return credentials


def load(files: TLSFiles | None) -> Credentials | None:
    """Credentials of C{files}, read now (None stays None: plaintext)."""
    if files is None:
        return None
    credentials = Credentials(files)
    credentials.check()
    return credentials


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return self.credentials.refusing_revoked(
            self.credentials.server_options().serverConnectionForTLS(protocol))


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    # Chosen per connection rather than once, so that a long-lived dialler (the ECS link's
    # ClientService) presents a renewed certificate when it reconnects.
    def __init__(self, credentials: Credentials, hostname: str) -> None:
        self.credentials, self.hostname = credentials, hostname

    def clientConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return self.credentials.refusing_revoked(
            self.credentials.client_options(self.hostname).clientConnectionForTLS(protocol))


@implementer(IStreamServerEndpoint)
class _TLSServerEndpoint:
    def __init__(self, wrapped: IStreamServerEndpoint, credentials: Credentials) -> None:
        self.wrapped, self.credentials = wrapped, credentials

    def listen(self, factory: Any) -> Any:
        return self.wrapped.listen(
            TLSMemoryBIOFactory(_ServerCreator(self.credentials), False, factory))


def server_endpoint(reactor: Any, description: str,
                    credentials: Credentials | None) -> IStreamServerEndpoint:
    """A listener for C{description} (``tcp:...``), mutual TLS unless C{credentials} is None."""
    endpoint = serverFromString(reactor, description)
    return endpoint if credentials is None else _TLSServerEndpoint(endpoint, credentials)


def client_endpoint(reactor: Any, credentials: Credentials | None, host: str, port: int,
                    timeout: float = 10.0, name: str | None = None) -> IStreamClientEndpoint:
    """A dialler of C{host:port}: TLS that checks the peer's certificate names C{host} (or
    C{name}, the peer's own host, when C{host:port} is a TCP relay in front of it, such as a
    fault proxy), and presents ours, unless C{credentials} is None (plaintext)."""
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if credentials is None:
        return endpoint
    return wrapClientTLS(_ClientCreator(credentials, name or host), endpoint)


def client_host_port(description: str) -> tuple[str, int]:
    """Host and port of a ``tcp:HOST:PORT`` (or ``tcp:host=HOST:port=PORT``) client endpoint
    string, the form the ECS's address is given in."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    named = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    plain = [p for p in parts[1:] if "=" not in p]
    host = named.get("host") or (plain[0] if plain else "")
    port = named.get("port") or (plain[1] if len(plain) > 1 else "")
    if parts[0] != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TLSConfigError(f"{description!r}: give a tcp:HOST:PORT endpoint (TLS is added "
                             "from the certificates)")
    return host, int(port)


def peer_identity(transport: Any) -> pki.Identity | None:
    """Who is at the other end of a TLS transport, or None (plaintext, or no handshake yet)."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except SSL.Error:
        return None
    if cert is None:
        return None
    return pki.identity_of(cert.to_cryptography())


def is_tls(transport: Any) -> bool:
    return getattr(transport, "getPeerCertificate", None) is not None


def add_arguments(parser: Any, holder: str) -> None:
    """The TLS options of a command-line client that presents C{holder}'s certificate."""
    group = parser.add_argument_group(
        "TLS", f"mutual TLS with the cluster's certificates; by default {holder}'s, from the "
               f"PKI that make run creates ({pki.DEFAULT_DIR})")
    group.add_argument("--tls", default="on", choices=("on", "off"),
                       help="off: plaintext, for a cluster run with tls: off (default: on)")
    group.add_argument("--pki-dir", default=pki.DEFAULT_DIR, metavar="DIR",
                       help="where ca.crt, NAME.crt and NAME.key are (default: %(default)s)")
    group.add_argument("--cert-name", default=holder, metavar="NAME",
                       help="whose certificate in the PKI directory (default: %(default)s)")
    group.add_argument("--tls-ca", metavar="FILE", help="the CA certificate, instead")
    group.add_argument("--tls-cert", metavar="FILE", help="the certificate, instead")
    group.add_argument("--tls-key", metavar="FILE", help="the private key, instead")


def credentials_from(args: Any) -> Credentials | None:
    """The credentials the options of L{add_arguments} name (None: plaintext); their files are
    read at the first connection (L{Credentials.check}), so a shell starts without them."""
    if args.tls == "off":
        return None
    return Credentials(holder_files(args.pki_dir, args.cert_name, args.tls_ca, args.tls_cert,
                                    args.tls_key))


def describe_failure(error: BaseException) -> str | None:
    """A readable reason for a failed TLS handshake, or None if C{error} is not one."""
    if isinstance(error, SSL.Error):
        reasons = [r[2] for r in error.args[0] if len(r) > 2] if error.args and \
            isinstance(error.args[0], list) else []
        text = ", ".join(r for r in reasons if r) or str(error)
        if "wrong version number" in text or "packet length too long" in text:
            text += " (the peer does not speak TLS: is this the AMP port, and is tls on there?)"
        return f"TLS handshake failed: {text}"
    name = type(error).__name__
    if name == "VerificationError":
        return f"the peer's certificate does not name the host dialled: {error}"
    return None
