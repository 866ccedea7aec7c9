"""KVServer configuration: embedded defaults, overridden by a YAML file, overridden by flags.

Every option has the same name in YAML as on the command line (``cache-size`` and ``--cache-size``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from collections.abc import Iterable
from typing import Any

import yaml

from chainstore import web
from chainstore.cache import STRATEGIES
from chainstore.logs import LEVELS
from chainstore.storage import BACKENDS
from chainstore.storage.sqlitedbm import DURABILITY
from chainstore.tls import (
    Credentials,
    TLSConfigError,
    TLSFiles,
    client_host_port,
    holder_credentials,
    holder_files,
    switch,
)


#: a server's default metrics port is its console port plus this
METRICS_PORT_OFFSET = 2000


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message says which."""


@dataclass(frozen=True)
class ServerConfig:
    name: str = "kvserver"
    listen: str = "tcp:51000:interface=127.0.0.1"
    console: str = "tcp:50000:interface=127.0.0.1"
    host: str | None = None
    data_dir: str = "data/kvserver"
    cache_size: int = 1000
    cache_strategy: str = "LRU"
    ecs: str | None = None
    log_level: str = "info"
    backend: str = "sqlite"
    durability: str = "crash"
    peer_routes: str | None = None
    #: on: mutual TLS on the AMP port and every link this server dials; off: plaintext
    tls: str = "on"
    pki_dir: str = "data/pki"
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Prometheus endpoint (chainstore/web.py): a tcp: endpoint, or off; None: the console's
    #: port + 2000 on loopback (metrics_endpoint)
    metrics: str | None = None
    #: also log JSON lines (twisted.logger's jsonFileLogObserver) to this file
    log_json: str | None = None

    def validated(self) -> ServerConfig:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"name {self.name!r}: use letters, digits, '_', '.' or '-'")
        if self.cache_size < 0:
            raise ConfigError(f"cache-size must be 0 or more, not {self.cache_size}")
        strategy = self.cache_strategy.upper()
        if strategy not in STRATEGIES:
            raise ConfigError(
                f"cache-strategy {self.cache_strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.log_level.lower() not in LEVELS:
            raise ConfigError(f"log-level {self.log_level!r}: choose one of {', '.join(LEVELS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.backend == "dumb" and self.ecs:
            # dbm.dumb has no place for the chain state: its serial would live only in memory,
            # and a restarted replica could not tell which writes it holds.
            raise ConfigError(
                "backend 'dumb' cannot serve under an ECS (ecs is set): it keeps the chain "
                "serial only in memory; use backend sqlite")
        if self.durability not in DURABILITY:
            raise ConfigError(
                f"durability {self.durability!r}: choose one of {', '.join(DURABILITY)}")
        for option in ("listen", "console"):
            endpoint_port(getattr(self, option), option)
        if self.peer_routes is not None:
            load_peer_routes(self.peer_routes)  # refuse a bad file now, not at the first dial
        try:
            tls = switch(self.tls)
        except TLSConfigError as e:
            raise ConfigError(str(e)) from None
        if tls == "on" and self.ecs:
            try:
                for description in self.ecs.split(","):
                    client_host_port(description.strip())
            except TLSConfigError as e:
                raise ConfigError(f"ecs: {e}") from None
        if tls == "on" and _split_endpoint(self.listen)[0] != "tcp":
            raise ConfigError(
                f"listen {self.listen!r}: with tls on give a tcp: endpoint; the server wraps it "
                "in mutual TLS with its certificate (tls-cert)")
        try:
            web.check_endpoint("metrics", self.metrics_endpoint, tls == "on")
        except web.WebConfigError as e:
            raise ConfigError(str(e)) from None
        return replace(self, cache_strategy=strategy, log_level=self.log_level.lower(), tls=tls)

    @property
    def metrics_endpoint(self) -> str:
        """Where Prometheus scrapes this server: the option, or by default the console's port
        + 2000 on loopback (server1's console 50001: metrics on 52001), off past port 65535."""
        if self.metrics:
            return self.metrics
        port = self.console_port + METRICS_PORT_OFFSET
        if port > 65535:
            return web.OFF
        return f"tcp:{port}:interface=127.0.0.1"

    @property
    def tls_files(self) -> TLSFiles | None:
        """This server's TLS files (None: plaintext)."""
        if self.tls == "off":
            return None
        return holder_files(self.pki_dir, self.name, self.tls_ca, self.tls_cert, self.tls_key)

    @property
    def tls_auto(self) -> bool:
        """No TLS file was named: the PKI under pki-dir is used, and made when missing."""
        return self.tls == "on" and not (self.tls_ca or self.tls_cert or self.tls_key)

    @property
    def advertised_host(self) -> str:
        if self.host:
            return self.host
        interface = endpoint_option(self.console, "interface")
        if interface in (None, "", "0.0.0.0", "::"):
            return "127.0.0.1"
        return interface

    @property
    def console_port(self) -> int:
        return endpoint_port(self.console, "console")

    @property
    def amp_port(self) -> int:
        return endpoint_port(self.listen, "listen")


OPTION_NAMES = {f.name.replace("_", "-"): f for f in fields(ServerConfig)}


def _split_endpoint(description: str) -> list[str]:
    # Endpoint strings escape colons with a backslash (IPv6 interfaces).
    return [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", description)]


def endpoint_option(description: str, option: str) -> str | None:
    for part in _split_endpoint(description)[1:]:
        key, sep, value = part.partition("=")
        if sep and key == option:
            return value
    return None


def endpoint_port(description: str, option: str) -> int:
    """The TCP port of a ``tcp:`` or ``ssl:`` server endpoint string (its ring address)."""
    parts = _split_endpoint(description)
    if parts[0] not in ("tcp", "ssl") or len(parts) < 2:
        raise ConfigError(
            f"{option} {description!r}: give a tcp: or ssl: endpoint, such as "
            "tcp:50000:interface=127.0.0.1")
    port = endpoint_option(description, "port") or parts[1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {description!r}: the port must be 1-65535")
    return int(port)


def _read_mapping(path: str, what: str, shape: str,
                  error: type[ValueError]) -> dict[Any, Any]:
    """A YAML file holding one mapping (empty file: empty mapping); errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping of {shape}")
    return data


def read_options(path: str, known: Iterable[str],
                 error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """The options of a YAML config file, keyed by option name; any problem raises C{error}
    with a message that names the file (shared by the server's and the ECS's configuration)."""
    data = _read_mapping(path, "config file", "option: value", error)
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise error(f"config file {path}: unknown option(s) {', '.join(unknown)}; "
                    f"known: {', '.join(sorted(known))}")
    return data


def load_peer_routes(path: str) -> dict[str, tuple[str, int]]:
    """The ``--peer-routes`` file: a YAML mapping of peer server name -> ``"host:port"`` to dial
    instead of that peer's advertised AMP address (an IPv6 host goes in brackets,
    ``"[::1]:7000"``). An empty file routes nothing; any other problem raises L{ConfigError}
    naming the file and the entry."""
    data = _read_mapping(path, "peer-routes file", 'server name: "host:port"', ConfigError)
    routes: dict[str, tuple[str, int]] = {}
    for name, address in data.items():
        # YAML reads a bare 7 as an int (a valid name) but yes/no as booleans (never meant).
        if isinstance(name, bool) or not isinstance(name, (str, int)) or not re.fullmatch(
                r"[A-Za-z0-9_.-]+", str(name)):
            raise ConfigError(f"peer-routes file {path}: {name!r} is not a server name")
        routes[str(name)] = _host_port(address, f"peer-routes file {path}: {name}")
    return routes


def _host_port(address: Any, where: str) -> tuple[str, int]:
    if not isinstance(address, str):
        raise ConfigError(f'{where}: give "host:port", not {address!r}')
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
        if ":" in host:
            sep = ""  # an IPv6 address without brackets: which colon ends it is a guess
    if not sep or not host or any(c.isspace() for c in host):
        raise ConfigError(f'{where}: give "host:port" (IPv6 as "[::1]:port"), not {address!r}')
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: the port of {address!r} must be 1-65535")
    return host, int(port)


def load_yaml(path: str) -> dict[str, Any]:
    """The options of a KVServer YAML config file."""
    return read_options(path, OPTION_NAMES)


def build_config(yaml_options: dict[str, Any], flags: dict[str, Any]) -> ServerConfig:
    """Defaults, then the YAML options, then the flags that were given (not None).

    An option left empty in the YAML file (``host:``) keeps its default, as an absent flag does.
    """
    values: dict[str, Any] = {}
    for source in (yaml_options, flags):
        for option, raw in source.items():
            if raw is None:
                continue
            if option == "ecs" and isinstance(raw, (list, tuple)):
                # several ECS (one leads): a YAML list, or --ecs repeated
                raw = ",".join(str(item) for item in raw)
            field = OPTION_NAMES[option]
            values[field.name] = _convert(option, field.type, raw)
    return ServerConfig(**values).validated()


def _convert(option: str, kind: Any, raw: Any) -> Any:
    if kind in ("int", int):
        # int() would quietly take True as 1 and 2.5 as 2; only whole numbers are meant.
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ConfigError(f"{option} must be a whole number, not {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{option} must be a whole number, not {raw!r}") from None
    if isinstance(raw, (dict, list)):
        raise ConfigError(f"{option} must be a single value, not {raw!r}")
    return os.fspath(raw) if isinstance(raw, os.PathLike) else str(raw)


def server_credentials(config: ServerConfig) -> Credentials | None:
    """The server's TLS credentials, checked now (None: plaintext). With no TLS file named,
    the PKI under pki-dir is used, made when missing: a CA, this server's certificate (for
    its advertised host and this machine) and the client and admin certificates that
    ``kvclient`` and ``ecsclient`` use by default."""
    files = config.tls_files
    if files is None:
        return None
    try:
        return holder_credentials(
            files, "server", config.name, config.pki_dir if config.tls_auto else None,
            [("server", config.name, [config.advertised_host]),
             ("client", "client", []), ("admin", "admin", [])],
            f"chainstore-pki issue server {config.name} --host {config.advertised_host}")
    except TLSConfigError as e:
        raise ConfigError(str(e)) from None
