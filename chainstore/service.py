"""The KVServer as a Twisted service: open the stores, then listen; stop listening, then close.

The listeners are child services; the stores belong to the parent, which opens them before
starting its children and closes them only after every child has stopped, so no request can
reach a closed store. A start that cannot succeed (a port in use, a data directory that cannot
be written, a store file that fails its check) logs one line and raises L{StartupError}, whose
traceback ``twistd kvserver`` does not print (chainstore/tap.py).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import time
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError

from chainstore import tls
from chainstore.amp_server import KVServerFactory
from chainstore.cache import make_cache
from chainstore.config import (
    ServerConfig,
    endpoint_option,
    load_peer_routes,
    server_credentials,
)
from chainstore.console import ConsoleFactory
from chainstore.logs import JSONLog, get_logger
from chainstore.metrics import NoMetrics, server_registry
from chainstore.ecs_link import make_ecs_link
from chainstore.node import RUNNING, STOPPED, KVNode
from chainstore.peers import tcp_connector
from chainstore.reactor_lag import ReactorLag
from chainstore.ring import NodeInfo, Ring
from chainstore.storage import StoreIntegrityError, StoreSet
from chainstore.web import OFF, WebListener, metrics_root

log = get_logger("chainstore.service")


class StartupError(Exception):
    """The server cannot start; the message, one line, says why (it is logged as it is)."""


def quiet_startup_errors() -> None:
    """Print nothing for a L{StartupError} that ends the process: it has logged its one line
    already (twistd then exits with status 1). Any other exception keeps its traceback."""
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(exc_type, StartupError):
            previous(exc_type, value, tb)
    sys.excepthook = hook


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_UNSET: Any = object()


class KVServerService(MultiService):
    """C{credentials}: this server's TLS credentials, None for plaintext; by default made from
    the configuration (L{server_credentials})."""

    def __init__(self, config: ServerConfig, reactor: Any,
                 credentials: tls.Credentials | None = _UNSET) -> None:
        super().__init__()
        self.config = config
        if credentials is _UNSET:
            credentials = server_credentials(config)
        self.credentials = credentials
        if credentials is not None:
            credentials.watcher(reactor).setServiceParent(self)
        me = NodeInfo(config.name, config.advertised_host, config.console_port, config.amp_port)
        # Peers named in --peer-routes are dialled at the address given there (a fault proxy).
        routes = load_peer_routes(config.peer_routes) if config.peer_routes else {}
        # Under an ECS a server knows no ring and answers server_stopped until the ECS gives it
        # one and starts it; it must not adopt a ring of its own, which would restart the
        # serials its stores recorded in the chains it belongs to.
        self.node = KVNode(me, make_cache(config.cache_strategy, config.cache_size), reactor,
                           ring=Ring((), epoch=0) if config.ecs else None,
                           state=STOPPED if config.ecs else RUNNING,
                           monotonic=time.monotonic,
                           connect=tcp_connector(reactor, routes=routes,
                                                 credentials=credentials))
        self._factories = [KVServerFactory(self.node), ConsoleFactory(self.node)]
        listening_service(tls.server_endpoint(reactor, config.listen, credentials),
                          self._factories[0]).setServiceParent(self)
        # The classic console has no TLS (its clients cannot do it) unless given an ssl:
        # endpoint; the start-up warnings below say what binding it elsewhere exposes.
        listening_service(serverFromString(reactor, config.console),
                          self._factories[1]).setServiceParent(self)
        if config.metrics_endpoint == OFF:
            self.node.metrics = NoMetrics(self.node.metrics.clock)
        else:
            self.web = WebListener(reactor, config.metrics_endpoint, metrics_root(
                server_registry(self.node, lambda: self._factories)), credentials, "metrics")
            self.web.setServiceParent(self)
            # the ECS lists it in status (heartbeat reports)
            self.node.metrics.url = lambda: self.web.url(config.advertised_host)
        if config.log_json:
            JSONLog(config.log_json).setServiceParent(self)
        self.ecs_link: Any = None
        if config.ecs:
            self.ecs_link = make_ecs_link(self.node, config.ecs, reactor, reactor.stop,
                                          credentials)
            self.ecs_link.setServiceParent(self)
        self.node.failure_listeners.append(self._storage_failed)
        self.node.reactor_lag = ReactorLag(reactor)
        self.node.reactor_lag.setServiceParent(self)

    def _storage_failed(self, reason: str) -> None:
        # Fail-stop: the server leaves the ECS for good (no link, no heartbeats), so the ECS's
        # failure detector declares it failed and repairs its ranges from the other replicas.
        # The listeners stay up, answering every request with the error.
        if self.ecs_link is not None and self.ecs_link.running:
            log.warn("leaving the ECS: it will treat this server as failed")
            self.ecs_link.stopService()

    def _cannot_start(self, reason: str) -> StartupError:
        log.critical("kvserver {name} cannot start: {reason}", name=self.config.name,
                     reason=reason)
        return StartupError(reason)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise self._cannot_start(cannot_listen(e)) from None

    def startService(self) -> None:
        cfg, me = self.config, self.node.me
        try:
            self.node.stores = StoreSet.open(cfg.data_dir, cfg.backend, cfg.durability)
        except StoreIntegrityError as e:
            raise self._cannot_start(f"refusing to start: {e}") from None
        except (OSError, sqlite3.Error) as e:
            raise self._cannot_start(
                f"cannot open the stores in {cfg.data_dir}: {e}") from None
        counts = {name: len(s) for name, s in self.node.stores.stores.items()}
        log.info("opened stores in {data_dir} ({backend}, durability {durability}): {counts}",
                 data_dir=cfg.data_dir, backend=cfg.backend, durability=cfg.durability,
                 counts=counts)
        mode = stat.S_IMODE(os.stat(cfg.data_dir).st_mode)
        if mode & 0o077:
            # (a directory made by the server is 0700; this one was made before, or by hand)
            log.warn("the data directory {data_dir} is open to other local users (mode "
                     "{mode:04o}): chmod 700 it to keep the data private",
                     data_dir=cfg.data_dir, mode=mode)
        super().startService()
        # Under an ECS the ring position is the one it chose (the ring says); alone, or with
        # placement "hash", the MD5 of the console address below.
        log.info("kvserver {name}: AMP on {listen}, console on {console}, "
                 "address hash {pos:032X}", name=me.name, listen=cfg.listen,
                 console=cfg.console, pos=me.position)
        if self.credentials is None:
            log.warn("TLS is off: any host that reaches the AMP port {listen} can read, change "
                     "or delete data and act as a peer server; use tls: off only on a trusted "
                     "single machine", listen=cfg.listen)
        else:
            log.info("mutual TLS with {cert} (CA {ca})", cert=self.credentials.files.cert,
                     ca=self.credentials.files.ca)
        console_host = endpoint_option(cfg.console, "interface") or "0.0.0.0"
        if cfg.console.startswith("tcp:") and console_host not in _LOOPBACK:
            log.warn("the text console {console} is plaintext with no authentication and is "
                     "bound to {host}: anyone who reaches it can read, change and delete every "
                     "key this server holds; bind it to 127.0.0.1 or give an ssl: endpoint",
                     console=cfg.console, host=console_host)

    def stopService(self) -> Deferred[None]:
        self.node.state = STOPPED
        self.node.chain.stop()
        d: Deferred[Any] = super().stopService()  # type: ignore[assignment]
        d.addBoth(self._close_stores)
        return d

    def _close_stores(self, result: Any) -> Any:
        stores, self.node.stores = self.node.stores, None
        if stores is not None:
            stores.close()
            log.info("closed stores in {data_dir}", data_dir=self.config.data_dir)
        return result


def cannot_listen(error: CannotListenError) -> str:
    """The one line that says why a listener could not start."""
    why = getattr(error.socketError, "strerror", None) or error.socketError
    return f"cannot listen on {error.interface or '0.0.0.0'}:{error.port}: {why}"


def listening_service(endpoint: Any, factory: Any) -> StreamServerEndpointService:
    service = StreamServerEndpointService(endpoint, factory)
    # Fail the start (and so twistd) on a port in use, instead of only logging it.
    service._raiseSynchronously = True
    return service
