"""A small etcd v3 client over its JSON gateway (HTTP), for the ECS's state and leader election.

Every call is one ``POST /v3/...`` with a JSON body, made with Twisted's own HTTP client, so the
reactor never blocks. Keys and values travel base64-encoded and 64-bit integers as strings, as
the gateway expects. A request that cannot reach a member, or gets no answer within the timeout,
is tried on the next member of the list (etcd forwards writes to its Raft leader itself); only
when every member failed does the call fail, with L{EtcdUnavailable}.

The transport is one function, C{post(url, body) -> Deferred[dict]}, and for watches a second,
C{stream(url, body, on_message) -> Deferred} (the gateway streams one JSON message per change);
tests give a fake etcd that speaks the same JSON (L{tests.fake_etcd}).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from chainstore.logs import get_logger
from chainstore.tls import Credentials

log = get_logger("ecs.etcd")

#: Seconds one request to one member may take before the next member is tried.
REQUEST_TIMEOUT = 2.0

Post = Callable[[str, dict[str, Any]], "Deferred[dict[str, Any]]"]
#: stream(url, body, on_message): calls on_message with each JSON message of the answer; fires
#: (None) when the answer ends, fails if it cannot be had or breaks; cancelling it hangs up
Stream = Callable[[str, dict[str, Any], Callable[[dict[str, Any]], None]], "Deferred[None]"]

#: A watch's messages may be up to this long (the leader key's events are a few hundred bytes).
MAX_MESSAGE = 1 << 20
#: An answer may be up to this long: the state of MAX_MEMBERS members is about 100 kB (and a
#: third more in base64); anything far larger is not etcd's to send.
MAX_ANSWER = 8 << 20


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


@implementer(IPolicyForHTTPS)
class _TrustEtcd:
    """https to etcd: its certificate must be of the CA in C{credentials} and name the host
    dialled; ours (C{credentials}'s certificate) is presented for its --client-cert-auth."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.credentials.client_options(hostname.decode("ascii"))


def _agent(reactor: Any, tls: Credentials | None, **kwargs: Any) -> Agent:
    if tls is None:
        return Agent(reactor, **kwargs)
    return Agent(reactor, contextFactory=_TrustEtcd(tls), **kwargs)


class _Answer(Protocol):
    """An answer's body, whole, or an error past L{MAX_ANSWER} bytes."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > MAX_ANSWER:
            self.done.errback(EtcdError(f"etcd's answer is over {MAX_ANSWER} bytes"))
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Any) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _read_answer(response: Any) -> Deferred[bytes]:
    """The body of C{response}; cancelling the Deferred hangs up."""
    answer: _Answer

    def cancel(_: Deferred[bytes]) -> None:
        if answer.transport is not None:
            answer.transport.stopProducing()

    answer = _Answer(Deferred(cancel))
    response.deliverBody(answer)
    return answer.done


def http_post(reactor: Any, timeout: float = REQUEST_TIMEOUT,
              tls: Credentials | None = None, agent: Any = None) -> Post:
    """The real transport: a JSON POST with Twisted's HTTP client and persistent connections
    (https with C{tls}, see L{_TrustEtcd}). C{timeout} bounds the whole request, the answer's
    body included: a member that sends its headers and then nothing more is given up on."""
    if agent is None:
        agent = _agent(reactor, tls, pool=HTTPConnectionPool(reactor, persistent=True))
    headers = Headers({b"Content-Type": [b"application/json"]})

    async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
        from twisted.web.client import FileBodyProducer
        from io import BytesIO

        began = reactor.seconds()
        d = agent.request(b"POST", url.encode("ascii"), headers,
                          FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8"))))
        d.addTimeout(timeout, reactor)
        response = await d
        body_read = _read_answer(response)
        body_read.addTimeout(max(0.0, timeout - (reactor.seconds() - began)), reactor)
        text = await body_read
        try:
            answer = json.loads(text)
        except ValueError:
            raise EtcdError(f"etcd answered HTTP {response.code} with non-JSON "
                            f"{text[:200]!r}") from None
        if not isinstance(answer, dict):
            raise EtcdError(f"etcd answered {text[:200]!r}")
        return answer

    return lambda url, body: Deferred.fromCoroutine(post(url, body))


class _Messages(Protocol):
    """An answer's body as JSON messages, handed on one by one as they arrive (the gateway
    writes each followed by a newline; any whitespace between them is skipped)."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None], done: Deferred[None]) -> None:
        self.on_message = on_message
        self.done = done
        self._buffer = ""
        self._decoder = json.JSONDecoder()
        self._bytes = b""

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return  # cancelled: nothing more is handed on
        self._bytes += data
        try:
            self._buffer += self._bytes.decode("utf-8")
            self._bytes = b""
        except UnicodeDecodeError:
            pass  # a character split between chunks: wait for the rest
        while True:
            text = self._buffer.lstrip()
            if not text:
                self._buffer = ""
                break
            try:
                message, end = self._decoder.raw_decode(text)
            except ValueError:
                self._buffer = text
                if len(text) > MAX_MESSAGE:
                    self._fail(EtcdError(f"a message of etcd's stream is over {MAX_MESSAGE} "
                                         f"bytes or not JSON: {text[:200]!r}"))
                break
            self._buffer = text[end:]
            if isinstance(message, dict):
                self.on_message(message)

    def _fail(self, error: Exception) -> None:
        if not self.done.called:
            self.done.errback(error)
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Any) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def http_stream(reactor: Any, timeout: float = REQUEST_TIMEOUT,
                tls: Credentials | None = None) -> Stream:
    """The real watch transport: a POST whose answer is read as it streams in. C{timeout}
    bounds the wait for the answer's headers; the stream itself may stay quiet for ever."""
    # its own connections: a watch holds one for as long as it runs
    agent = _agent(reactor, tls)
    headers = Headers({b"Content-Type": [b"application/json"]})

    def stream(url: str, body: dict[str, Any],
               on_message: Callable[[dict[str, Any]], None]) -> Deferred[None]:
        from io import BytesIO

        from twisted.web.client import FileBodyProducer

        messages: list[_Messages] = []

        def cancel(d: Deferred[None]) -> None:
            # fired first, so that what hanging up reports is not taken for a failure
            d.errback(CancelledError())
            if not messages:
                request.cancel()
            elif messages[0].transport is not None:
                messages[0].transport.stopProducing()

        done: Deferred[None] = Deferred(cancel)
        request = agent.request(b"POST", url.encode("ascii"), headers,
                                FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8"))))
        request.addTimeout(timeout, reactor)

        def answered(response: Any) -> None:
            if response.code != 200:
                if not done.called:
                    done.errback(EtcdError(f"etcd answered a watch with HTTP {response.code}"))
                response.deliverBody(Protocol())
                return
            protocol = _Messages(on_message, done)
            messages.append(protocol)
            response.deliverBody(protocol)

        def failed(failure: Any) -> None:
            if not done.called:
                done.errback(failure)

        def answered_if_wanted(response: Any) -> None:
            if done.called:
                response.deliverBody(Protocol())  # cancelled meanwhile
            else:
                answered(response)

        request.addCallbacks(answered_if_wanted, failed)
        return done

    return stream


def watch_events(message: dict[str, Any]) -> tuple[list[tuple[str, KeyValue]], bool]:
    """The events of one watch message (``PUT``/``DELETE`` and the key-value) and whether the
    watch ended (cancelled by etcd, e.g. its start revision was compacted, or an error)."""
    if "error" in message:
        return [], True
    result = message.get("result") or {}
    events = [(str(event.get("type") or "PUT"), key_value(event.get("kv") or {"key": ""}))
              for event in result.get("events") or []]
    return events, bool(result.get("canceled"))


class EtcdClient:
    """The few etcd v3 calls the ECS needs, on the members at C{endpoints} (``http://H:P``)."""

    def __init__(self, endpoints: Sequence[str], post: Post,
                 stream: Stream | None = None) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._post = post
        #: None: no watches (the election polls)
        self.stream = stream
        # the member the next watch goes to: the next one after a watch failed
        self._watch_index = 0
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

    def watch(self, key: bytes, start_revision: int,
              on_event: Callable[[str, KeyValue], None]) -> Deferred[None]:
        """Watch C{key} from C{start_revision} on the member that answered last (or the next,
        once that one fails): C{on_event(type, kv)} for each change, C{type} ``PUT`` or
        ``DELETE``. Fires when the watch ends (etcd cancelled it, the stream closed), fails when
        it breaks; cancel it to stop watching."""
        if self.stream is None:
            raise EtcdError("this client has no streaming transport")
        index = self._watch_index
        body = {"create_request": {"key": b64(key), "start_revision": str(start_revision)}}
        ended: list[bool] = []
        streams: list[Deferred[None]] = []

        def on_message(message: dict[str, Any]) -> None:
            if ended:
                return
            events, over = watch_events(message)
            for kind, kv in events:
                if kv.key == key:
                    on_event(kind, kv)
            if over:
                ended.append(True)
                if streams:
                    streams[0].cancel()

        d = self.stream(self.endpoints[index] + "/v3/watch", body, on_message)
        streams.append(d)
        if ended:
            d.cancel()

        def failed(failure: Any) -> Any:
            if ended and failure.check(CancelledError):
                return None  # etcd ended it
            if not failure.check(CancelledError):
                # that member may be down or cut off: the next watch tries the next one
                self._watch_index = (index + 1) % len(self.endpoints)
            return failure

        return d.addErrback(failed)
