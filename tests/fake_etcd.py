"""An in-memory etcd that speaks the v3 JSON gateway's dialect, for Clock tests.

It keeps keys with their create and mod revisions and leases, leases that expire on the given
Clock (deleting their keys, as etcd does), and transactions with the compares the ECS uses
(MOD, CREATE, LEASE; EQUAL). L{FakeClient.post} is an L{ecs.etcd.Post}, L{FakeClient.stream} an
L{ecs.etcd.Stream} that serves watches (a key's changes from a revision on, as the gateway sends
them, history included): give them to L{ecs.etcd.EtcdClient}. Set C{reachable} to False to cut a
client off (its requests fail at once) or C{hang} to True to leave them unanswered; set
C{watch_silent} to True to let its watches open and then hear nothing, and call
L{FakeEtcd.drop_watches} to break every open watch. Leases run out on the Clock, as at etcd.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock


def _d(text: str) -> bytes:
    return base64.b64decode(text)


def _e(data: bytes) -> str:
    return base64.b64encode(data).decode()


class FakeEtcd:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.revision = 1
        # key -> {"value", "create_revision", "mod_revision", "lease"}
        self.kvs: dict[bytes, dict[str, Any]] = {}
        # lease id -> (ttl, expires at)
        self.leases: dict[int, tuple[int, float]] = {}
        self._ids = itertools.count(0x1000)
        self.requests: list[tuple[str, dict[str, Any]]] = []
        # every change: (revision, "PUT" or "DELETE", key, the key-value's JSON)
        self.history: list[tuple[int, str, bytes, dict[str, Any]]] = []
        # open watches: [key, on_message, the stream's Deferred, silent]
        self.watches: list[list[Any]] = []
        self._expiry: Any = None

    def client(self) -> "FakeClient":
        """One process's view: its own reachability, the same store."""
        return FakeClient(self)

    # -- the store ---------------------------------------------------------------------------

    def _expire(self) -> None:
        now = self.clock.seconds()
        for lease, (_, expires) in list(self.leases.items()):
            if expires <= now:
                self._revoke(lease)
        self._schedule_expiry()

    def _schedule_expiry(self) -> None:
        """Expire the next lease on time, so that watchers hear of its keys' deletion."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        if self.leases:
            at = min(expires for _, expires in self.leases.values())
            self._expiry = self.clock.callLater(max(0.0, at - self.clock.seconds()),
                                                self._expire)

    def _revoke(self, lease: int) -> None:
        self.leases.pop(lease, None)
        doomed = [k for k, kv in self.kvs.items() if kv["lease"] == lease]
        if doomed:
            self.revision += 1
            for k in doomed:
                gone = self._kv_json(k)
                gone["mod_revision"] = str(self.revision)
                del self.kvs[k]
                self._changed("DELETE", k, gone)

    def _changed(self, kind: str, key: bytes, kv: dict[str, Any]) -> None:
        self.history.append((self.revision, kind, key, kv))
        for watch in list(self.watches):
            if watch[0] == key and not watch[3]:
                watch[1](self._event_message([(kind, kv)]))

    def _event_message(self, events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        # as the gateway sends them: PUT, the default, is left out
        return {"result": {"header": self._header(), "events": [
            ({"type": kind, "kv": kv} if kind != "PUT" else {"kv": kv}) for kind, kv in events]}}

    def watch(self, body: dict[str, Any], on_message: Any, silent: bool) -> Deferred[None]:
        request = body["create_request"]
        key, start = _d(request["key"]), int(request.get("start_revision", 0))
        watch: list[Any] = [key, on_message, None, silent]

        def cancel(d: Deferred[None]) -> None:
            if watch in self.watches:
                self.watches.remove(watch)

        d: Deferred[None] = Deferred(cancel)
        watch[2] = d
        self.watches.append(watch)
        on_message({"result": {"header": self._header(), "created": True}})
        past = [(kind, kv) for revision, kind, k, kv in self.history
                if k == key and revision >= start]
        if past and not silent:
            on_message(self._event_message(past))
        return d

    def drop_watches(self) -> None:
        """Every open watch's stream breaks (its member went down, say)."""
        watches, self.watches = self.watches, []
        for watch in watches:
            watch[2].errback(ConnectionLost("the watch's connection was lost"))

    def _kv_json(self, key: bytes) -> dict[str, Any]:
        kv = self.kvs[key]
        return {"key": _e(key), "value": _e(kv["value"]),
                "create_revision": str(kv["create_revision"]),
                "mod_revision": str(kv["mod_revision"]), "lease": str(kv["lease"])}

    def _header(self) -> dict[str, Any]:
        return {"revision": str(self.revision)}

    def _compare(self, c: dict[str, Any]) -> bool:
        kv = self.kvs.get(_d(c["key"]))
        target = c["target"]
        assert c["result"] == "EQUAL", c
        if target == "MOD":
            return (kv["mod_revision"] if kv else 0) == int(c["mod_revision"])
        if target == "CREATE":
            return (kv["create_revision"] if kv else 0) == int(c["create_revision"])
        if target == "LEASE":
            return (kv["lease"] if kv else 0) == int(c["lease"])
        raise AssertionError(f"compare target {target} not modelled")

    def _apply(self, request: dict[str, Any]) -> dict[str, Any]:
        if "request_put" in request:
            body = request["request_put"]
            key, lease = _d(body["key"]), int(body.get("lease", 0))
            if lease and lease not in self.leases:
                raise KeyError("etcdserver: requested lease not found")
            self.revision += 1
            old = self.kvs.get(key)
            self.kvs[key] = {"value": _d(body.get("value", "")), "lease": lease,
                             "create_revision": old["create_revision"] if old else self.revision,
                             "mod_revision": self.revision}
            self._changed("PUT", key, self._kv_json(key))
            return {"response_put": {"header": self._header()}}
        if "request_range" in request:
            key = _d(request["request_range"]["key"])
            kvs = [self._kv_json(key)] if key in self.kvs else []
            return {"response_range": {"header": self._header(), "kvs": kvs}}
        raise AssertionError(f"request {request} not modelled")

    def handle(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((path, body))
        self._expire()
        if path == "/v3/kv/range":
            key = _d(body["key"])
            answer: dict[str, Any] = {"header": self._header()}
            if "range_end" in body:
                end = _d(body["range_end"])
                keys = sorted(k for k in self.kvs if key <= k < end)
            else:
                keys = [key] if key in self.kvs else []
            if keys:
                answer["kvs"] = [self._kv_json(k) for k in keys]
            return answer
        if path == "/v3/kv/txn":
            ok = all(self._compare(c) for c in body.get("compare", []))
            branch = body.get("success" if ok else "failure", [])
            try:
                responses = [self._apply(r) for r in branch]
            except KeyError as e:
                return {"error": e.args[0], "message": e.args[0], "code": 5}
            answer = {"header": self._header(), "responses": responses}
            if ok:
                answer["succeeded"] = True
            return answer
        if path == "/v3/lease/grant":
            lease, ttl = next(self._ids), int(body["TTL"])
            self.leases[lease] = (ttl, self.clock.seconds() + ttl)
            self._schedule_expiry()
            return {"header": self._header(), "ID": str(lease), "TTL": str(ttl)}
        if path == "/v3/lease/keepalive":
            lease = int(body["ID"])
            if lease not in self.leases:
                return {"result": {"header": self._header(), "ID": str(lease)}}
            ttl, _ = self.leases[lease]
            self.leases[lease] = (ttl, self.clock.seconds() + ttl)
            self._schedule_expiry()
            return {"result": {"header": self._header(), "ID": str(lease), "TTL": str(ttl)}}
        if path == "/v3/lease/revoke":
            lease = int(body["ID"])
            if lease not in self.leases:
                msg = "etcdserver: requested lease not found"
                return {"error": msg, "message": msg, "code": 5}
            self._revoke(lease)
            self._schedule_expiry()
            return {"header": self._header()}
        raise AssertionError(f"path {path} not modelled")


class FakeClient:
    """A transport to L{FakeEtcd} that can be cut off or made to hang."""

    def __init__(self, etcd: FakeEtcd) -> None:
        self.etcd = etcd
        self.reachable = True
        self.hang = False
        self.watch_silent = False

    def post(self, url: str, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if self.hang:
            return Deferred()
        if not self.reachable:
            return fail(ConnectionRefusedError("cut off from etcd"))
        path = url[url.index("/v3/"):]
        return succeed(self.etcd.handle(path, body))

    def stream(self, url: str, body: dict[str, Any], on_message: Any) -> Deferred[None]:
        assert url.endswith("/v3/watch"), url
        if self.hang:
            return Deferred()
        if not self.reachable:
            return fail(ConnectionRefusedError("cut off from etcd"))
        return self.etcd.watch(body, on_message, self.watch_silent)
