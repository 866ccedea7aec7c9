"""ECS configuration: embedded defaults, overridden by ``etc/ecs.yaml``, overridden by flags.

The node pool lists the server slots the ECS may launch itself (the classic ``ecs.config`` lists
eight); servers started by an operator with ``--ecs`` register themselves and need no slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any


from chainstore.cache import STRATEGIES
from chainstore.control import ALIVE_SECONDS
from chainstore.config import read_options
from chainstore.logs import LEVELS
from chainstore.web import WebConfigError, check_endpoint, is_loopback
from chainstore.tls import (
    Credentials,
    TLSConfigError,
    TLSFiles,
    client_host_port,
    holder_credentials,
    holder_files,
    switch,
)


class ECSConfigError(ValueError):
    """The ECS configuration is wrong; the message names the option and the fix."""


#: The shortest failure timeout: leases end LEASE_BOUND_MARGIN before it, renewed from an Alive
#: every ALIVE_SECONDS (docs/DESIGN.md, "The lease bound").
MIN_FAILURE_TIMEOUT = 1.0


@dataclass(frozen=True)
class NodeSlot:
    name: str
    host: str
    console_port: int
    amp_port: int
    data_dir: str
    #: the ECS endpoint this slot's server dials (default: the ECS's advertise option)
    ecs: str | None = None
    #: the server's --peer-routes file (which address to dial for which peer), if any
    peer_routes: str | None = None
    #: the server's TLS files (default: its NAME.crt and NAME.key in the ECS's pki-dir)
    tls_cert: str | None = None
    tls_key: str | None = None
    #: the server's --metrics endpoint (default: its console port + 2000 on loopback)
    metrics: str | None = None


def default_pool() -> tuple[NodeSlot, ...]:
    return tuple(
        NodeSlot(f"server{i}", "127.0.0.1", 50000 + i, 51000 + i, f"data/server{i}")
        for i in range(1, 9)
    )


@dataclass(frozen=True)
class ECSConfig:
    listen: str = "tcp:49999:interface=127.0.0.1"
    #: the endpoint servers dial to reach this ECS (given to the servers it launches)
    advertise: str = "tcp:127.0.0.1:49999"
    state_file: str = "data/ecs/state.json"
    log_dir: str = "data/logs"
    heartbeat_interval: float = 1.0
    failure_timeout: float = 3.0
    replication: int = 3
    initial_nodes: int = 3
    cache_strategy: str = "LRU"
    cache_size: int = 1000
    launcher: str = "local"
    #: split like a shell command line; {command} is the remote command (ecs/launcher.py)
    ssh_command: str = "ssh -o BatchMode=yes {host} {command}"
    register_timeout: float = 20.0
    #: balanced: the ECS places each joining server in the middle of the largest range (the
    #: first servers evenly); hash: at the MD5 of its console address (the classic ring)
    placement: str = "balanced"
    log_level: str = "info"
    #: on: mutual TLS for servers and admins (and the servers it launches); off: plaintext
    tls: str = "on"
    pki_dir: str = "data/pki"
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: the status page, its JSON and the ECS's /metrics (chainstore/web.py, ecs/web.py), or off
    web: str = "tcp:49990:interface=127.0.0.1"
    #: also log JSON lines (twisted.logger's jsonFileLogObserver) to this file
    log_json: str | None = None
    nodes: tuple[NodeSlot, ...] = field(default_factory=default_pool)
    #: file: the state in state-file, one ECS; etcd: in etcd, several ECS with one leader
    state: str = "file"
    #: the etcd members' client URLs (http://HOST:PORT or https://HOST:PORT), with state etcd
    etcd_endpoints: tuple[str, ...] = ()
    #: for https endpoints: the CA etcd's certificates are issued by, and the client certificate
    #: and key this ECS presents (etcd with --client-cert-auth trusts only its own CA's)
    etcd_tls_ca: str | None = None
    etcd_tls_cert: str | None = None
    etcd_tls_key: str | None = None
    #: the key prefix of this cluster's state and leader key in etcd
    etcd_prefix: str = "/chainstore"
    #: seconds of the leader's etcd lease: a dead leader is replaced within about this
    lease_ttl: int = 2
    #: this ECS's name among several (default: its advertise HOST:PORT)
    name: str = ""
    #: on: after repairing a failure, add as many servers as failed (idle ones, or pool slots
    #: launched again); off: the ring stays smaller until an admin adds servers
    replace_failed: str = "off"
    #: on: a join's or a leave's copies run beside its local moves (the change ends sooner, and
    #: the writes going on meanwhile wait longer for CPUs); off: one bulk step at a time
    copies_beside_moves: str = "on"

    def validated(self) -> ECSConfig:
        if self.heartbeat_interval <= 0:
            raise ECSConfigError("heartbeat-interval must be more than 0 seconds")
        if self.failure_timeout < MIN_FAILURE_TIMEOUT:
            raise ECSConfigError(
                f"failure-timeout ({self.failure_timeout}s) must be at least "
                f"{MIN_FAILURE_TIMEOUT}s: a server grants read leases only until a little "
                "before the ECS could declare it failed, and tells the ECS it is there every "
                f"{ALIVE_SECONDS}s")
        if self.failure_timeout <= self.heartbeat_interval:
            raise ECSConfigError(
                f"failure-timeout ({self.failure_timeout}s) must be longer than "
                f"heartbeat-interval ({self.heartbeat_interval}s)")
        if self.replication < 1:
            raise ECSConfigError("replication must be at least 1")
        if self.initial_nodes < 0:
            raise ECSConfigError("initial-nodes must be 0 or more")
        if self.initial_nodes > len(self.nodes):
            raise ECSConfigError(
                f"initial-nodes is {self.initial_nodes} but the pool has only "
                f"{len(self.nodes)} node slots")
        if self.cache_strategy.upper() not in STRATEGIES:
            raise ECSConfigError(
                f"cache-strategy {self.cache_strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.cache_size < 0:
            raise ECSConfigError(f"cache-size must be 0 or more, not {self.cache_size}")
        if self.register_timeout <= 0:
            raise ECSConfigError("register-timeout must be more than 0 seconds")
        if self.launcher not in ("local", "ssh", "none"):
            raise ECSConfigError(f"launcher {self.launcher!r}: choose local, ssh or none")
        if self.placement not in ("balanced", "hash"):
            raise ECSConfigError(f"placement {self.placement!r}: choose balanced or hash")
        if self.log_level.lower() not in LEVELS:
            raise ECSConfigError(f"log-level {self.log_level!r}: choose one of {', '.join(LEVELS)}")
        if self.state not in ("file", "etcd"):
            raise ECSConfigError(f"state {self.state!r}: choose file or etcd")
        if self.state == "etcd":
            if not self.etcd_endpoints:
                raise ECSConfigError("state etcd needs etcd-endpoints (http://HOST:PORT, ...)")
            for url in self.etcd_endpoints:
                if not re.fullmatch(r"https?://[^/\s]+:\d+/?", url):
                    raise ECSConfigError(f"etcd-endpoints: {url!r} is not http://HOST:PORT "
                                         "or https://HOST:PORT")
            if self.lease_ttl < 2:
                raise ECSConfigError("lease-ttl must be at least 2 seconds (etcd's minimum)")
            if not self.etcd_prefix.startswith("/"):
                raise ECSConfigError(f"etcd-prefix {self.etcd_prefix!r} must start with /")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ECSConfigError("two node slots share a name")
        addresses = [(n.host, n.console_port) for n in self.nodes]
        if len(set(addresses)) != len(addresses):
            raise ECSConfigError("two node slots share a console address")
        # Each slot listens on two ports; a port taken twice on one host fails the later launch.
        seen: dict[tuple[str, int], str] = {}
        for n in self.nodes:
            for port in (n.console_port, n.amp_port):
                other = seen.setdefault((n.host, port), n.name)
                if other != n.name or n.console_port == n.amp_port:
                    raise ECSConfigError(
                        f"port {n.host}:{port} is used by both {other} and {n.name}"
                        if other != n.name else
                        f"{n.name}: console-port and amp-port are both {port}")
        try:
            replace_failed = switch(self.replace_failed, "replace-failed")
            copies_beside_moves = switch(self.copies_beside_moves, "copies-beside-moves")
        except TLSConfigError as e:
            raise ECSConfigError(str(e)) from None
        if replace_failed == "on" and self.launcher == "none":
            raise ECSConfigError("replace-failed needs a launcher (local or ssh) to start "
                                 "servers in place of failed ones")
        try:
            tls = switch(self.tls)
            if tls == "on":
                client_host_port(self.advertise)
                for slot in self.nodes:
                    for description in (slot.ecs or "").split(","):
                        if description.strip():
                            client_host_port(description.strip())
        except TLSConfigError as e:
            raise ECSConfigError(str(e)) from None
        if tls == "on" and not self.listen.startswith("tcp:"):
            raise ECSConfigError(
                f"listen {self.listen!r}: with tls on give a tcp: endpoint; the ECS wraps it in "
                "mutual TLS with its certificate (tls-cert)")
        if self.state == "etcd":
            _check_etcd_security(self, tls)
        try:
            check_endpoint("web", self.web, tls == "on")
            for slot in self.nodes:
                if slot.metrics:
                    check_endpoint(f"{slot.name}: metrics", slot.metrics, tls == "on")
        except WebConfigError as e:
            raise ECSConfigError(str(e)) from None
        return replace(self, cache_strategy=self.cache_strategy.upper(),
                       log_level=self.log_level.lower(), tls=tls, replace_failed=replace_failed,
                       copies_beside_moves=copies_beside_moves)

    @property
    def tls_files(self) -> TLSFiles | None:
        """The ECS's own TLS files (None: plaintext)."""
        if self.tls == "off":
            return None
        return holder_files(self.pki_dir, "ecs", self.tls_ca, self.tls_cert, self.tls_key)

    @property
    def etcd_tls_files(self) -> TLSFiles | None:
        """What this ECS presents to, and trusts of, etcd over https (None: no https
        endpoint)."""
        if not any(url.startswith("https://") for url in self.etcd_endpoints):
            return None
        assert self.etcd_tls_ca and self.etcd_tls_cert and self.etcd_tls_key
        return TLSFiles(self.etcd_tls_ca, self.etcd_tls_cert, self.etcd_tls_key)

    @property
    def tls_auto(self) -> bool:
        """No TLS file was named: the PKI under pki-dir is used, and made when missing."""
        return self.tls == "on" and not (self.tls_ca or self.tls_cert or self.tls_key)

    def slot_tls(self, slot: NodeSlot) -> TLSFiles | None:
        """The TLS files a launched server of C{slot} is given (None: plaintext)."""
        mine = self.tls_files
        if mine is None:
            return None
        return holder_files(self.pki_dir, slot.name, mine.ca, slot.tls_cert, slot.tls_key)

    def slot(self, name: str) -> NodeSlot | None:
        for slot in self.nodes:
            if slot.name == name:
                return slot
        return None


def _check_etcd_security(config: ECSConfig, tls: str) -> None:
    """The state in etcd is the ring: whoever can write it can hand a range's data to a host
    of theirs, or take the cluster down. So etcd beyond loopback is reached over https only,
    presenting a client certificate (etcd's --client-cert-auth), unless tls is off (a trusted
    network)."""
    https = [url for url in config.etcd_endpoints if url.startswith("https://")]
    given = [config.etcd_tls_ca, config.etcd_tls_cert, config.etcd_tls_key]
    if https and not all(given):
        raise ECSConfigError(
            f"etcd-endpoints: {https[0]} is https: give etcd-tls-ca (the CA of etcd's "
            "certificates), etcd-tls-cert and etcd-tls-key (the client certificate etcd trusts)")
    if any(given) and not https:
        raise ECSConfigError("etcd-tls-ca, etcd-tls-cert and etcd-tls-key are for https:// "
                             "etcd-endpoints; these are http://")
    for url in config.etcd_endpoints:
        host = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)[0].strip("[]")
        if url.startswith("http://") and tls == "on" and not is_loopback(host):
            raise ECSConfigError(
                f"etcd-endpoints: {url} is plain HTTP beyond loopback, where anyone who reaches "
                "it can rewrite the ring: run etcd with TLS and --client-cert-auth and give "
                "https:// with etcd-tls-ca, etcd-tls-cert and etcd-tls-key, or set tls: off "
                "on a trusted network")


def etcd_credentials(config: ECSConfig) -> Credentials | None:
    """The files for etcd over https, loaded now (a start-up check; None: plain HTTP)."""
    files = config.etcd_tls_files
    if files is None:
        return None
    credentials = Credentials(files)
    try:
        credentials.check()
    except TLSConfigError as e:
        raise ECSConfigError(f"etcd-tls-*: {e}") from None
    return credentials


_SCALARS = {
    "listen": str, "advertise": str, "state-file": str, "log-dir": str,
    "heartbeat-interval": float, "failure-timeout": float, "replication": int,
    "initial-nodes": int, "cache-strategy": str, "cache-size": int, "launcher": str,
    "ssh-command": str, "register-timeout": float, "log-level": str, "placement": str,
    "tls": str, "pki-dir": str, "tls-ca": str, "tls-cert": str, "tls-key": str,
    "state": str, "etcd-prefix": str, "lease-ttl": int, "name": str,
    "web": str, "log-json": str, "replace-failed": str, "copies-beside-moves": str,
    "etcd-tls-ca": str, "etcd-tls-cert": str, "etcd-tls-key": str,
}
OPTION_NAMES = set(_SCALARS) | {"nodes", "etcd-endpoints"}


def load_yaml(path: str) -> dict[str, Any]:
    """The options of an ECS YAML config file."""
    return read_options(path, OPTION_NAMES, ECSConfigError)


def _slot(index: int, raw: Any) -> NodeSlot:
    where = f"nodes[{index}]"
    if not isinstance(raw, dict):
        raise ECSConfigError(f"{where} must be a mapping with name, host, console-port, amp-port")
    try:
        name = str(raw["name"])
        host = str(raw.get("host", "127.0.0.1"))
        console_port = int(raw["console-port"])
        amp_port = int(raw["amp-port"])
    except KeyError as e:
        raise ECSConfigError(f"{where} lacks {e.args[0]}") from None
    except (TypeError, ValueError):
        raise ECSConfigError(f"{where}: ports must be whole numbers") from None
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ECSConfigError(f"{where}: name {name!r} may hold letters, digits, '_', '.', '-'")
    for port in (console_port, amp_port):
        if not 0 < port < 65536:
            raise ECSConfigError(f"{where}: port {port} is not in 1-65535")
    unknown = sorted(set(map(str, raw)) - _SLOT_KEYS)
    if unknown:
        raise ECSConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(_SLOT_KEYS))}")
    def text(key: str) -> str | None:
        value = raw.get(key)
        return None if value is None else str(value)

    return NodeSlot(name, host, console_port, amp_port, str(raw.get("data-dir", f"data/{name}")),
                    text("ecs"), text("peer-routes"), text("tls-cert"), text("tls-key"),
                    text("metrics"))


_SLOT_KEYS = {"name", "host", "console-port", "amp-port", "data-dir", "ecs", "peer-routes",
              "tls-cert", "tls-key", "metrics"}


def build_config(yaml_options: dict[str, Any], flags: dict[str, Any]) -> ECSConfig:
    values: dict[str, Any] = {}
    for source in (yaml_options, {k: v for k, v in flags.items() if v is not None}):
        for option, raw in source.items():
            if option == "nodes":
                if not isinstance(raw, list) or not raw:
                    raise ECSConfigError("nodes must be a non-empty list of node slots")
                values["nodes"] = tuple(_slot(i, r) for i, r in enumerate(raw))
                continue
            if option == "etcd-endpoints":
                values["etcd_endpoints"] = endpoint_list(raw, option, ECSConfigError)
                continue
            kind = _SCALARS[option]
            try:
                values[option.replace("-", "_")] = kind(raw)
            except (TypeError, ValueError):
                raise ECSConfigError(f"{option} must be a {kind.__name__}, not {raw!r}") from None
    return ECSConfig(**values).validated()


def endpoint_list(raw: Any, option: str, error: type[Exception]) -> tuple[str, ...]:
    """A list of endpoints given as a YAML list or a comma-separated string (or a list of
    comma-separated strings: a repeated command-line option)."""
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    out = []
    for item in items:
        if not isinstance(item, str):
            raise error(f"{option} must be a list or a comma-separated string, not {item!r}")
        out += [part.strip() for part in item.split(",") if part.strip()]
    if not out:
        raise error(f"{option} is empty")
    return tuple(out)


def ecs_credentials(config: ECSConfig) -> Credentials | None:
    """The ECS's TLS credentials, checked now (None: plaintext). With no TLS file named, the
    PKI under pki-dir is used and completed: a CA, the ECS's certificate, one per pool slot
    (for the slot's host), and admin's and client's, each made only when missing."""
    files = config.tls_files
    if files is None:
        return None
    try:
        host, _ = client_host_port(config.advertise)
        return holder_credentials(
            files, "ecs", None, config.pki_dir if config.tls_auto else None,
            [("ecs", "ecs", [host]),
             *(("server", slot.name, [slot.host]) for slot in config.nodes if not slot.tls_cert),
             ("admin", "admin", []), ("client", "client", [])],
            "chainstore-pki issue ecs NAME --host ...")
    except TLSConfigError as e:
        raise ECSConfigError(str(e)) from None
