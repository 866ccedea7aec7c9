"""HTTP for operators, on twisted.web: a Prometheus ``/metrics`` resource and the listener that
serves it (a server's metrics endpoint; the ECS's status page uses the same listener).

Access: on a loopback interface (the default) plain HTTP, since only local users reach it.
Bound anywhere else it needs the cluster's TLS: HTTPS with this process's certificate, and
only a client presenting an **admin** certificate of the cluster's CA gets past the handshake
and the role check (Prometheus: ``tls_config`` with ``cert_file``/``key_file`` of an admin
certificate, ``ca_file`` the CA). With ``tls: off`` a non-loopback address is refused at start.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from prometheus_client import disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from twisted.application.service import Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from chainstore import tls
from chainstore.bounds import Refused
from chainstore.logs import get_logger
from chainstore.roles import ADMIN

log = get_logger("chainstore.web")

# A _created sample per child and histogram doubles the exposition for nothing a dashboard uses.
disable_created_metrics()

OFF = "off"

#: Connections a web listener serves at once, and from one address: a scraper or an operator's
#: browser needs a few. Without a cap every stranger's idle connection was kept, each a file
#: descriptor and some memory of the process that also serves the data (all of 1,500 idle
#: connections to a server's metrics port were held, and of 19,950 about 9,900).
MAX_WEB_CONNECTIONS = 64
MAX_WEB_PER_HOST = 16
#: A connection silent this long is closed (twisted.web's default is a minute): a slot held
#: by an idle stranger comes back sooner. The timer runs from the accept, so it also ends a TLS
#: connection whose handshake never comes.
WEB_IDLE_SECONDS = 30.0


class WebConfigError(ValueError):
    """An HTTP endpoint option cannot be served safely or is malformed; the message says why."""


def interface(description: str) -> str:
    """The interface a ``tcp:PORT[:interface=HOST]`` endpoint binds (all of them: 0.0.0.0)."""
    parts = description.replace("\\:", "\0").split(":")
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "interface":
            return value.replace("\0", ":")
    return "0.0.0.0"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(option: str, description: str, tls_on: bool) -> None:
    """Refuse what L{web_service} could not serve safely: anything but ``tcp:`` (or C{off}),
    and a non-loopback interface without TLS."""
    if description == OFF:
        return
    parts = description.split(":")
    if parts[0] != "tcp" or len(parts) < 2:
        raise WebConfigError(f"{option} {description!r}: give a tcp: endpoint such as "
                             "tcp:52000:interface=127.0.0.1, or off")
    if not is_loopback(interface(description)) and not tls_on:
        raise WebConfigError(
            f"{option} {description!r} is not on loopback: it is served only over HTTPS to "
            "admin certificates, which needs tls on; bind it to 127.0.0.1")


class MetricsResource(Resource):
    """``/metrics`` of one registry, rendered in the reactor thread (its collectors read the
    node's state, which only the reactor thread may touch; prometheus_client's own Twisted
    resource renders in a thread pool)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        request.setHeader("content-type", content_type)
        return encoder(self.registry)


class AdminOnly(Resource):
    """Wraps a resource tree: over TLS only a peer whose certificate has the admin role is
    served (others get 403); over plain HTTP (loopback) everyone is."""

    def __init__(self, wrapped: Resource) -> None:
        super().__init__()
        self.wrapped = wrapped

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        refusal = _refusal(request)
        if refusal is not None:
            return refusal
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes:
        refusal = _refusal(request)
        if refusal is not None:
            return refusal.render(request)
        return self.wrapped.render(request)


def plain_error(request: Request, code: int, text: str) -> bytes:
    """Answer C{request} with status C{code} and C{text} as one line of plain text."""
    request.setResponseCode(code)
    request.setHeader("content-type", "text/plain; charset=utf-8")
    return f"{text}\n".encode("utf-8")


class _Forbidden(Resource):
    isLeaf = True

    def __init__(self, why: str) -> None:
        super().__init__()
        self.why = why

    def render(self, request: Request) -> bytes:
        return plain_error(request, 403, self.why)


def _refusal(request: Request) -> Resource | None:
    transport = request.channel.transport
    if not tls.is_tls(transport):
        return None
    who = tls.peer_identity(transport)
    if who is not None and who.role == ADMIN:
        return None
    role = "none" if who is None else who.role
    log.warn("HTTP request refused: {peer} presented a certificate of role {role}, not admin",
             peer=request.getClientAddress(), role=role)
    return _Forbidden(f"this page needs an admin certificate; yours has role {role}")


class _QuietSite(Site):
    noisy = False

    # One line per request would drown the daemon's log at a scrape every few seconds.
    def log(self, request: Request) -> None:
        pass


class CappedWeb(WrappingFactory):
    """Wraps a site: at most C{max_connections} connections at once, C{per_host} from one
    address; more are closed on accept (under TLS too, unlike a None from buildProtocol). The
    first refusal while full is logged, and how many followed once a connection closes."""

    def __init__(self, site: Site, what: str = "HTTP",
                 max_connections: int = MAX_WEB_CONNECTIONS,
                 per_host: int = MAX_WEB_PER_HOST) -> None:
        super().__init__(site)
        self.what = what
        self.max_connections = max_connections
        self.per_host = per_host
        self.hosts: dict[str, int] = {}
        self.open = 0
        self.refused = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        host = str(getattr(addr, "host", addr))
        if self.open >= self.max_connections or self.hosts.get(host, 0) >= self.per_host:
            if not self.refused:
                log.warn("{what}: {count} connections open ({here} from {host}): refusing "
                         "more until one closes", what=self.what,
                         count=self.open, here=self.hosts.get(host, 0), host=host)
            self.refused += 1
            return Refused()
        wrapper = super().buildProtocol(addr)
        wrapper.web_host = host  # type: ignore[attr-defined]
        self.open += 1
        self.hosts[host] = self.hosts.get(host, 0) + 1
        return wrapper

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        host = p.web_host  # type: ignore[attr-defined]
        self.open -= 1
        left = self.hosts[host] - 1
        if left:
            self.hosts[host] = left
        else:
            del self.hosts[host]
        if self.refused:
            log.warn("{what}: refused {count} connections while full", what=self.what,
                     count=self.refused)
            self.refused = 0


class WebListener(Service):
    """Serves C{root} at C{description}: plain HTTP on loopback, HTTPS restricted to admin
    certificates elsewhere (L{check_endpoint} has refused that without TLS).

    A port it cannot take is logged as an error and does not stop the process: metrics and
    status pages are for operators, and the data must stay served without them."""

    def __init__(self, reactor: Any, description: str, root: Resource,
                 credentials: tls.Credentials | None, what: str = "HTTP") -> None:
        self.description = description
        self.what = what
        self.port: Any = None
        if is_loopback(interface(description)) or credentials is None:
            self.endpoint = serverFromString(reactor, description)
        else:
            self.endpoint = tls.server_endpoint(reactor, description, credentials)
        self.factory = CappedWeb(_QuietSite(AdminOnly(root), timeout=WEB_IDLE_SECONDS,
                                            reactor=reactor), what)

    def startService(self) -> None:
        super().startService()
        self.endpoint.listen(self.factory).addCallbacks(self._listening, self._failed)

    def _listening(self, port: Any) -> None:
        if not self.running:
            port.stopListening()
            return
        self.port = port
        log.info("{what} on {url}", what=self.what, url=self.url("127.0.0.1", ""))

    def _failed(self, failure: Any) -> None:
        log.error("{what} not served: cannot listen on {description}: {error}",
                  what=self.what, description=self.description,
                  error=failure.getErrorMessage())

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None

    def url(self, host: str, path: str = "/metrics") -> str | None:
        """The URL to reach this listener at C{host} (its bound interface if it has one), None
        until it listens."""
        if self.port is None:
            return None
        bound = interface(self.description)
        if bound not in ("0.0.0.0", "::", ""):
            host = bound
        if ":" in host:
            host = f"[{host}]"
        scheme = "http" if is_loopback(interface(self.description)) else "https"
        return f"{scheme}://{host}:{self.port.getHost().port}{path}"


def metrics_root(registry: CollectorRegistry) -> Resource:
    """A tree with C{/metrics} (and C{/}, the same, for a quick look with curl)."""
    root = Resource()
    metrics = MetricsResource(registry)
    root.putChild(b"metrics", metrics)
    root.putChild(b"", metrics)
    return root
