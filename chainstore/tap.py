"""``twistd kvserver``: options and service construction (the plugin loads this lazily)."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from chainstore import logs
from chainstore.config import (
    ConfigError,
    ServerConfig,
    build_config,
    load_yaml,
    server_credentials,
)

DEFAULT_CONFIG = os.path.join("etc", "kvserver.yaml")
_D = ServerConfig()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a chainstore KVServer: AMP for the client library, a telnet-style text console for "
        "humans and classic clients. Options come from built-in defaults, then the YAML file "
        "given by --config (etc/kvserver.yaml if present), then the command line. Without "
        "--ecs the server runs alone and owns the whole ring."
    )
    optParameters = [
        ["config", "c", None,
         f"YAML configuration file [default: {DEFAULT_CONFIG} if it exists]"],
        ["name", None, None, f"this server's name [default: {_D.name}]"],
        ["listen", None, None, f"AMP endpoint to listen on [default: {_D.listen}]"],
        ["console", None, None,
         f"text console endpoint; its host:port is the server's ring address "
         f"[default: {_D.console}]"],
        ["host", None, None,
         "host clients use to reach this server [default: the console's interface]"],
        ["data-dir", "d", None, f"directory of the three stores [default: {_D.data_dir}]"],
        ["cache-size", None, None, f"cache entries, 0 disables [default: {_D.cache_size}]"],
        ["cache-strategy", None, None,
         f"cache eviction: FIFO, LRU or LFU [default: {_D.cache_strategy}]"],
        ["ecs", None, None,
         "client endpoint of the ECS, such as tcp:127.0.0.1:49999; the server registers there "
         "and serves once the ECS starts it; several ECS (one leads): repeat it or separate "
         "them with commas [default: none, run standalone]"],
        ["log-level", None, None,
         f"debug, info, warn, error or critical [default: {_D.log_level}]"],
        ["backend", None, None, f"store backend: sqlite or dumb [default: {_D.backend}]"],
        ["durability", None, None,
         "crash: writes survive kill -9 of the server; power: fsync each write, survive a "
         f"power cut [default: {_D.durability}]"],
        ["peer-routes", None, None,
         'YAML file of peer server name: "host:port" to dial instead of that peer\'s own AMP '
         "address (fault-injection proxies) [default: none, dial peers directly]"],
        ["tls", None, None,
         "on: mutual TLS on the AMP port and on every link this server dials (peers, ECS); "
         "off: plaintext, for a trusted single machine only [default: on]"],
        ["pki-dir", None, None,
         f"PKI directory (chainstore-pki) used when no tls-* file is given; created with a new "
         f"CA and this server's certificate when missing [default: {_D.pki_dir}]"],
        ["tls-ca", None, None, "the cluster CA's certificate [default: PKI-DIR/ca.crt]"],
        ["tls-cert", None, None,
         "this server's certificate, role server, named after --name [default: PKI-DIR/NAME.crt]"],
        ["tls-key", None, None, "this server's private key [default: PKI-DIR/NAME.key]"],
        ["metrics", None, None,
         "Prometheus /metrics endpoint, such as tcp:52000:interface=127.0.0.1, or off; beyond "
         "loopback it is HTTPS for admin certificates only [default: the console's port + "
         "2000 on 127.0.0.1]"],
        ["log-json", None, None,
         "also write the log as JSON lines to this file [default: none]"],
    ]

    def opt_ecs(self, value: str) -> None:
        # repeatable: every --ecs adds ECS endpoints
        self["ecs"] = value if not self.get("ecs") else f"{self['ecs']},{value}"

    def postOptions(self) -> None:
        path = self["config"]
        if path is None:
            # The default file is optional, but when it exists its errors are usage errors too.
            yaml_options = self._load(DEFAULT_CONFIG) if os.path.exists(DEFAULT_CONFIG) else {}
        else:
            yaml_options = self._load(path)
        flags = {k: self[k] for k in
                 ("name", "listen", "console", "host", "data-dir", "cache-size",
                  "cache-strategy", "ecs", "log-level", "backend", "durability",
                  "peer-routes", "tls", "pki-dir", "tls-ca", "tls-cert", "tls-key",
                  "metrics", "log-json")}
        try:
            self.config = build_config(yaml_options, flags)
            self.credentials = server_credentials(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    @staticmethod
    def _load(path: str) -> dict[str, Any]:
        try:
            return load_yaml(path)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from chainstore.service import KVServerService, quiet_startup_errors

    logs.set_level(options.config.log_level)
    quiet_startup_errors()
    return KVServerService(options.config, reactor, options.credentials)
