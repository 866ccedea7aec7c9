"""A small etcd v3 client over its JSON gateway (HTTP), for the ECS's state and leader election.

Every call is one ``POST /v3/...`` with a JSON body, made with Twisted's own HTTP client, so the
reactor never blocks. Keys and values travel base64-encoded and 64-bit integers as strings, as
the gateway expects. A request that cannot reach a member, or gets no answer within the timeout,
is tried on the next member of the list (etcd forwards writes to its Raft leader itself); only
when every member failed does the call fail, with L{EtcdUnavailable}.

The transport is one function, C{post(url, body) -> Deferred[dict]}: tests give a fake etcd that
speaks the same JSON (L{tests.fake_etcd}).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from chainstore.logs import get_logger

log = get_logger("ecs.etcd")

#: Seconds one request to one member may take before the next member is tried.
REQUEST_TIMEOUT = 2.0

Post = Callable[[str, dict[str, Any]], "Deferred[dict[str, Any]]"]


class EtcdError(Exception):
    """etcd answered with an error (the message is etcd's)."""


class EtcdUnavailable(EtcdError):
    """No etcd member answered."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


def key_value(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(unb64(raw["key"]), unb64(raw.get("value", "")),
                    int(raw.get("mod_revision", 0)), int(raw.get("create_revision", 0)),
                    int(raw.get("lease", 0)))


# -- compares and requests of a transaction (the gateway's JSON) -----------------------------------

def mod_revision_is(key: bytes, revision: int) -> dict[str, Any]:
    """True when C{key} was last written at C{revision} (0: the key does not exist)."""
    return {"key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(revision)}


def lease_is(key: bytes, lease: int) -> dict[str, Any]:
    """True when C{key} exists and is attached to C{lease} (a missing key has lease 0)."""
    return {"key": b64(key), "result": "EQUAL", "target": "LEASE", "lease": str(lease)}


def absent(key: bytes) -> dict[str, Any]:
    return {"key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}


def put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def get(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def http_post(reactor: Any, timeout: float = REQUEST_TIMEOUT) -> Post:
    """The real transport: a JSON POST with Twisted's HTTP client and persistent connections."""
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))
    headers = Headers({b"Content-Type": [b"application/json"]})

    async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
        from twisted.web.client import FileBodyProducer
        from io import BytesIO

        d = agent.request(b"POST", url.encode("ascii"), headers,
                          FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8"))))
        d.addTimeout(timeout, reactor)
        response = await d
        text = await readBody(response)
        try:
            answer = json.loads(text)
        except ValueError:
            raise EtcdError(f"etcd answered HTTP {response.code} with non-JSON "
                            f"{text[:200]!r}") from None
        if not isinstance(answer, dict):
            raise EtcdError(f"etcd answered {text[:200]!r}")
        return answer

    return lambda url, body: Deferred.fromCoroutine(post(url, body))


class EtcdClient:
    """The few etcd v3 calls the ECS needs, on the members at C{endpoints} (``http://H:P``)."""

    def __init__(self, endpoints: Sequence[str], post: Post) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._post = post
        # the member that answered last: tried first next time
        self._current = 0

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for i in range(len(self.endpoints)):
            index = (self._current + i) % len(self.endpoints)
            try:
                answer = await self._post(self.endpoints[index] + path, body)
            except Exception as e:
                errors.append(f"{self.endpoints[index]}: {e!r}")
                continue
            self._current = index
            if "error" in answer or ("code" in answer and "message" in answer):
                raise EtcdError(str(answer.get("message") or answer.get("error")))
            return answer
        raise EtcdUnavailable("no etcd member answered: " + "; ".join(errors))

    async def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        """C{key}'s value (None if absent) and the store's revision when it was read."""
        answer = await self.call("/v3/kv/range", {"key": b64(key)})
        kvs = answer.get("kvs") or []
        return (key_value(kvs[0]) if kvs else None), int(answer["header"]["revision"])

    async def get_prefix(self, prefix: bytes) -> list[KeyValue]:
        """Every key starting with C{prefix} (a non-empty prefix not ending in byte 0xff)."""
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        answer = await self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
        return [key_value(raw) for raw in answer.get("kvs") or []]

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]] = ()) -> tuple[bool, list[dict[str, Any]]]:
        """One transaction: if every C{compare} holds, C{success} is applied, else C{failure};
        returns whether it succeeded and the responses of the branch applied."""
        answer = await self.call("/v3/kv/txn", {"compare": compare, "success": success,
                                                "failure": list(failure)})
        return bool(answer.get("succeeded", False)), list(answer.get("responses") or [])

    async def grant(self, ttl: int) -> int:
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    async def keep_alive(self, lease: int) -> int:
        """Renew C{lease}; its remaining TTL in seconds (0: it has expired)."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "not found" not in str(e):
                raise
