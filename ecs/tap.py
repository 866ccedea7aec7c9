"""``twistd ecs``: the External Configuration Service (the plugin loads this lazily)."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.error import CannotListenError
from twisted.python import usage

from chainstore import logs
from chainstore.service import (StartupError, cannot_listen, listening_service,
                                quiet_startup_errors)
from chainstore.tls import server_endpoint
from ecs.config import (ECSConfig, ECSConfigError, build_config, ecs_credentials,
                        etcd_credentials, load_yaml)

DEFAULT_CONFIG = os.path.join("etc", "ecs.yaml")
log = logs.get_logger("ecs.tap")
_D = ECSConfig()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the chainstore ECS: it owns the ring, launches servers from its node pool (or "
        "accepts servers started with --ecs), moves data when servers join or leave, and "
        "detects failures by heartbeat. Options come from built-in defaults, then the YAML "
        "file (--config, etc/ecs.yaml if present), then the command line. The node pool is "
        "configured in the YAML file only."
    )
    optParameters = [
        ["config", "c", None, f"YAML configuration file [default: {DEFAULT_CONFIG} if it exists]"],
        ["listen", None, None, f"endpoint for servers and admins [default: {_D.listen}]"],
        ["advertise", None, None,
         f"client endpoint servers dial to reach this ECS [default: {_D.advertise}]"],
        ["state-file", None, None, f"where membership and epoch persist [default: {_D.state_file}]"],
        ["log-dir", None, None, f"where launched servers log [default: {_D.log_dir}]"],
        ["heartbeat-interval", None, None,
         f"seconds between heartbeats [default: {_D.heartbeat_interval}]"],
        ["failure-timeout", None, None,
         f"seconds of silence before a server counts as failed [default: {_D.failure_timeout}]"],
        ["replication", None, None, f"chain length [default: {_D.replication}]"],
        ["initial-nodes", None, None,
         f"servers to launch and start on a first start [default: {_D.initial_nodes}]"],
        ["cache-strategy", None, None,
         f"cache of the initial servers [default: {_D.cache_strategy}]"],
        ["cache-size", None, None, f"cache of the initial servers [default: {_D.cache_size}]"],
        ["launcher", None, None, f"local, ssh or none [default: {_D.launcher}]"],
        ["register-timeout", None, None,
         f"seconds a launched server has to register [default: {_D.register_timeout}]"],
        ["placement", None, None,
         "ring positions of joining servers: balanced (the middle of the largest range) or "
         f"hash (MD5 of the console address) [default: {_D.placement}]"],
        ["log-level", None, None, f"debug, info, warn, error, critical [default: {_D.log_level}]"],
        ["tls", None, None,
         "on: mutual TLS for servers and admins, and for the servers it launches; off: "
         "plaintext, for a trusted single machine only [default: on]"],
        ["pki-dir", None, None,
         "PKI directory used when no tls-* file is given; on a first start a CA and the "
         "certificates of the ECS, every pool slot, admin and client are created there "
         f"[default: {_D.pki_dir}]"],
        ["tls-ca", None, None, "the cluster CA's certificate [default: PKI-DIR/ca.crt]"],
        ["tls-cert", None, None, "the ECS's certificate, role ecs [default: PKI-DIR/ecs.crt]"],
        ["tls-key", None, None, "the ECS's private key [default: PKI-DIR/ecs.key]"],
        ["state", None, None,
         "file: the state in state-file (one ECS); etcd: in etcd, several ECS of which one "
         f"leads [default: {_D.state}]"],
        ["etcd-endpoints", None, None,
         "with state etcd: the etcd members, http://HOST:PORT,... or https://HOST:PORT,... "
         "(repeatable); plain http only on loopback unless tls is off"],
        ["etcd-tls-ca", None, None,
         "for https etcd endpoints: the CA that issued etcd's certificates"],
        ["etcd-tls-cert", None, None,
         "for https etcd endpoints: the client certificate etcd trusts (--client-cert-auth)"],
        ["etcd-tls-key", None, None, "for https etcd endpoints: that certificate's key"],
        ["etcd-prefix", None, None, f"this cluster's etcd key prefix [default: {_D.etcd_prefix}]"],
        ["lease-ttl", None, None,
         f"seconds of the leader's etcd lease [default: {_D.lease_ttl}]"],
        ["name", None, None, "this ECS's name among several [default: its advertise HOST:PORT]"],
        ["copies-beside-moves", None, None,
         "on: a join's or a leave's copies run beside its local moves (it ends sooner; the "
         "writes going on meanwhile wait longer for CPUs); off: one bulk step at a time "
         f"[default: {_D.copies_beside_moves}]"],
        ["replace-failed", None, None,
         "on: after repairing a failure, add as many servers as failed (idle ones, or pool "
         f"slots launched again); off: wait for an admin's addNode [default: {_D.replace_failed}]"],
        ["web", None, None,
         "the status page, its JSON (/status.json) and the ECS's /metrics, or off; beyond "
         f"loopback it is HTTPS for admin certificates only [default: {_D.web}]"],
        ["log-json", None, None, "also write the log as JSON lines to this file [default: none]"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.etcd_endpoints: list[str] = []

    def opt_etcd_endpoints(self, value: str) -> None:
        self.etcd_endpoints.append(value)

    def postOptions(self) -> None:
        path = self["config"]
        try:
            if path is None:
                yaml_options = load_yaml(DEFAULT_CONFIG) if os.path.exists(DEFAULT_CONFIG) else {}
            else:
                yaml_options = load_yaml(path)
            flags = {name: self[name] for name, *_ in self.optParameters if name != "config"}
            flags["etcd-endpoints"] = self.etcd_endpoints or None
            self.config = build_config(yaml_options, flags)
            self.credentials = ecs_credentials(self.config)
            self.etcd_credentials = etcd_credentials(self.config)
        except ECSConfigError as e:
            raise usage.UsageError(str(e)) from None


class ECSService(Service):
    """Runs the coordinator: heartbeats from start, the launched servers ended on stop."""

    def __init__(self, ecs: Any) -> None:
        self.ecs = ecs

    def startService(self) -> None:
        super().startService()
        self.ecs.start()

    def stopService(self) -> Any:
        super().stopService()
        return self.ecs.stop()


class ECSTop(MultiService):
    """The ECS's services; a listener that cannot listen ends the start with one line."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = cannot_listen(e)
            log.critical("ecs cannot start: {reason}", reason=reason)
            raise StartupError(reason) from None


def _state_file_problem(path: str) -> str | None:
    """Why the ECS could not keep its state in C{path} (None: it can): found at start, not at
    the first save, when servers are already being launched."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        blocker = directory
        while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
            blocker = os.path.dirname(blocker)
        if os.path.exists(blocker) and not os.path.isdir(blocker):
            return f"cannot make the directory of the state file {path}: {blocker} is a file"
        return f"cannot make the directory of the state file {path}: {e.strerror or e}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot write the state file {path}: {directory} is not writable"
    if os.path.isdir(path):
        return f"the state file {path} is a directory"
    return None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from ecs.coordinator import ECS
    from ecs.launcher import make_launcher
    from ecs.server import ECSFactory
    from chainstore.web import OFF, WebListener
    from ecs.leadership import Fixed
    from ecs.state import StateFile
    from ecs.web import status_root

    config: ECSConfig = options.config
    logs.set_level(config.log_level)
    quiet_startup_errors()
    launcher = make_launcher(reactor, config)
    top = ECSTop()
    leader: Any
    if config.state == "etcd":
        leader = ha_leadership(config, reactor, launcher, options.credentials,
                               options.etcd_credentials)
        leader.setServiceParent(top)
    else:
        # Logging has not begun yet: the reason goes to stderr, as twistd's own usage errors.
        problem = _state_file_problem(config.state_file)
        if problem is not None:
            raise SystemExit(f"ecs cannot start: {problem}")
        try:
            leader = coordinator = ECS(config, reactor, launcher, StateFile(config.state_file),
                                       exit=reactor.stop,
                                       dial=dialler(reactor, options.credentials))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"ecs cannot start: the state file {config.state_file} cannot be "
                             f"read ({type(e).__name__}: {e}); it holds the ring and the "
                             f"epochs: restore it rather than delete it") from None
    credentials = options.credentials
    if credentials is None:
        log.warn("TLS is off: any host that reaches {listen} can run admin commands (shut the "
                 "cluster down, remove servers) and register fake servers; use tls: off only "
                 "on a trusted single machine", listen=config.listen)
    else:
        log.info("mutual TLS with {cert} (CA {ca})", cert=credentials.files.cert,
                 ca=credentials.files.ca)
        credentials.watcher(reactor).setServiceParent(top)
    listening_service(server_endpoint(reactor, config.listen, credentials),
                      ECSFactory(leader)).setServiceParent(top)
    if config.state == "file":
        ECSService(coordinator).setServiceParent(top)
    if config.web != OFF:
        # the page follows whichever ECS leads (with state etcd, a standby answers 503)
        WebListener(reactor, config.web, status_root(
            Fixed(coordinator) if config.state == "file" else leader), credentials,
            "status page").setServiceParent(top)
    if config.log_json:
        logs.JSONLog(config.log_json).setServiceParent(top)
    return top


def dialler(reactor: Any, credentials: Any) -> Any:
    """How a resumed ECS probes a ring member's AMP port (ECS._probe_absent): over the same
    mutual TLS as every connection to it."""
    from twisted.internet.endpoints import connectProtocol
    from twisted.internet.protocol import Protocol

    from chainstore.tls import client_endpoint

    def dial(host: str, port: int, timeout: float) -> Any:
        return connectProtocol(client_endpoint(reactor, credentials, host, port, timeout),
                               Protocol())
    return dial


def ha_leadership(config: ECSConfig, reactor: Any, launcher: Any,
                  credentials: Any, etcd_tls: Any = None) -> Any:
    """With state etcd: the service that campaigns and runs a coordinator while it leads."""
    from ecs.coordinator import ECS
    from ecs.etcd import EtcdClient, http_post, http_stream
    from ecs.leadership import Leadership, address_of

    dial = dialler(reactor, credentials)
    # http_stream: standbys watch the leader key rather than poll it
    client = EtcdClient(config.etcd_endpoints, http_post(reactor, tls=etcd_tls),
                        http_stream(reactor, tls=etcd_tls))
    name = config.name or address_of(config.advertise)
    log.info("state in etcd {endpoints} under {prefix}{how}; campaigning as {name}",
             endpoints=",".join(config.etcd_endpoints), prefix=config.etcd_prefix, name=name,
             how="" if etcd_tls is None else f", presenting {etcd_tls.files.cert}")
    return Leadership(client, reactor, config.etcd_prefix, name, config.advertise,
                      config.lease_ttl,
                      # A new leader's servers are running and redial within a second or
                      # two (LEADER_SILENCE after a paused leader): failure-timeout from the
                      # takeover is grace enough (see ECS.takeover). A server killed with
                      # the leader is skipped sooner: dial probes the members that have not
                      # redialled (over the mutual TLS of every connection to a server's AMP
                      # port), and one whose port refuses is marked dead at once.
                      lambda store: ECS(config, reactor, launcher, store, exit=reactor.stop,
                                        takeover=True, dial=dial))
