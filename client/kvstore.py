"""L{KVStore}: the Deferred-based client of a chainstore cluster, over AMP.

It learns the ring from any server (L{protocol.GetMetadata}), sends puts and deletes to the head
of a key's chain and gets to any live member of it (C{read_policy="any"}, the default: every
member answers linearizable reads, see chainstore/craq.py) or to its tail (C{"tail"}), keeps one
AMP connection per server and reuses it, and hides the cluster's transient states from its
caller:

- C{ServerStopped}, C{WriteLocked}: back off exponentially with full jitter, retry until the
  deadline, then raise the last error.
- C{NotResponsible}: the ring changed; fetch it again (first from the server that refused) and
  retry at once, up to C{max_refreshes} times; then, since the fresh ring still names a server
  that refuses (a new tail waiting for its read lease), back off and retry until the deadline.
- connection refused or lost, or no answer within the per-request timeout (a hung server): fetch
  the ring from another known server, back off, retry while a whole attempt fits before the
  deadline, then raise (L{RequestTimedOut} for a timeout: the write may or may not have
  happened). Retrying a write is safe because each carries a request id that the chain applies
  once; a retry of a write that had been applied can answer C{put_update} for a key it created,
  or C{KeyNotFound} for a key it deleted.
- C{ServerError} (a server whose storage failed answers it to everything until restarted, and
  the ECS repairs it away like a crashed one): as an unreachable server, the ring is fetched
  from another server and the request retried until the deadline, then raised.
- C{KeyNotFound}, C{InvalidKey}, C{ValueTooLarge} and anything unexpected: raised at once.
"""

from __future__ import annotations

import json
import os
import random as _random
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.failure import Failure

from chainstore import protocol
from chainstore.errors import (
    InvalidKey,
    KVError,
    NotResponsible,
    ServerError,
    ServerStopped,
    WriteLocked,
)
from chainstore.limits import check_key, check_value
from chainstore.logs import get_logger
from chainstore.peers import no_delay
from chainstore.ring import NodeInfo, Ring, position
from chainstore.roles import SERVER, RoleGuard
from chainstore.tls import Credentials, TLSFiles, client_endpoint
from client.errors import ClientClosed, RequestTimedOut, WrongProtocol
from client.readers import ReaderChoice

log = get_logger("client.kvstore")

Address = tuple[str, int]
Key = str | bytes
Value = str | bytes
EndpointFactory = Callable[[str, int], IStreamClientEndpoint]

# A server we cannot reach or lost while waiting for its answer.
_UNREACHABLE = (ConnectError, ConnectionClosed, DNSLookupError)
# Errors after which the same request, repeated a little later, may succeed.
_BACK_OFF = (ServerStopped, WriteLocked)

# Every AMP box starts with a two-byte key length below 256, so its first byte is zero; the text
# console instead greets each connection with a line that starts with this word.
_CONSOLE_GREETING = b"chainstore"

_T = TypeVar("_T")

#: Where gets go: to a live member of the key's chain (client/readers.py), or to its tail.
READ_POLICIES = ("any", "tail")
#: How long a server we failed to reach is asked last. Without an end, a client that only
#: reads would never dial a member again once it had paused (only a write to the member's own
#: range reconnects), and its reads of that member's keys would stay on the other members.
SUSPECT_SECONDS = 10.0

#: The largest answer box a server sends: a Get of a 120,000-byte value in two AMP chunks, or a
#: ring of 256 members (chainstore/bounds.py sizes the servers' own caps the same way).
MAX_ANSWER_BOX = 1 << 20

#: What a client presents by default: the certificate C{make run} issues to clients.
DEFAULT_TLS = TLSFiles.in_dir(os.path.join("data", "pki"), "client")


def key_bytes(key: Key) -> bytes:
    """C{key} as bytes (a str is encoded as ASCII), or L{InvalidKey} saying why not."""
    if isinstance(key, str):
        try:
            key = key.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidKey("key may only hold printable ASCII characters without spaces") \
                from None
    elif isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    elif not isinstance(key, bytes):
        raise TypeError(f"a key is str or bytes, not {type(key).__name__}")
    return check_key(key)


def value_bytes(value: Value) -> bytes:
    """C{value} as bytes (a str is encoded as UTF-8), or L{ValueTooLarge}."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    elif isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    elif not isinstance(value, bytes):
        raise TypeError(f"a value is str or bytes, not {type(value).__name__}")
    return check_value(value)


def ring_from_metadata(answer: dict[str, Any]) -> Ring:
    """The L{Ring} that a C{GetMetadata} answer describes."""
    return protocol.ring_from_wire(answer)


class _Shared(Generic[_T]):
    """The result of one Deferred, handed to every caller of L{wait}, before or after it fires."""

    _PENDING = object()

    def __init__(self, d: Deferred[_T], on_done: Callable[[], None] = lambda: None) -> None:
        self._d = d
        self._on_done = on_done
        self._waiters: list[Deferred[_T]] = []
        self._result: Any = self._PENDING
        d.addBoth(self._fire)

    @property
    def done(self) -> bool:
        return self._result is not self._PENDING

    def wait(self) -> Deferred[_T]:
        if self.done:
            return fail(self._result) if isinstance(self._result, Failure) \
                else succeed(self._result)
        waiter: Deferred[_T] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def cancel(self) -> None:
        self._d.cancel()

    def _fire(self, result: Any) -> None:
        self._result = result
        self._on_done()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        # The waiters own the result now; returning None keeps an unwaited failure from being
        # logged as unhandled.


class _ClientProtocol(RoleGuard):
    """One AMP connection to one server; recognises a text console answering instead."""

    # Over TLS the host's certificate must be a server's (not, say, another client's).
    peer_roles = frozenset({SERVER})

    def __init__(self, address: Address, on_lost: Callable[[_ClientProtocol], None]) -> None:
        super().__init__()
        self.address = address
        self._on_lost = on_lost
        self._first = b""
        self._checked = False
        self._wrong: WrongProtocol | None = None
        self._box_bytes = 0
        self._lost: Deferred[None] = Deferred()
        self._lost_shared = _Shared(self._lost)

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if not self._checked:
            data = self._first + data
            if (data[:1] != b"\x00" and len(data) < len(_CONSOLE_GREETING)
                    and _CONSOLE_GREETING.startswith(data)):
                # Perhaps the start of the console's greeting: wait for the rest of the word.
                self._first = data
                return
            self._checked, self._first = True, b""
            if data[:1] != b"\x00":
                self._refuse(data)
                return
        super().dataReceived(data)

    def stringReceived(self, string: bytes) -> None:
        # AMP reads a box's keys and values until the empty key that ends it: a peer that
        # never ends one would grow this client's memory without bound.
        self._box_bytes += len(string) + 2
        if self._box_bytes > MAX_ANSWER_BOX:
            host, port = self.address
            self._wrong = WrongProtocol(
                f"{host}:{port} sent an answer of over {MAX_ANSWER_BOX} bytes: not a chainstore "
                "server's")
            self.paused = True  # nothing more of this connection is parsed
            self.abort()
            return
        super().stringReceived(string)
        if self.state == "init":  # (the box ended)
            self._box_bytes = 0

    def _refuse(self, data: bytes) -> None:
        host, port = self.address
        if data.startswith(_CONSOLE_GREETING):
            message = (f"{host}:{port} is the text console of a chainstore server, not its AMP "
                       f"port; connect to the address of the server's --listen option")
        else:
            message = (f"{host}:{port} does not speak AMP (it sent {data[:40]!r}); give the AMP "
                       f"port of a chainstore server")
        self._wrong = WrongProtocol(message)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._wrong is not None:
            # Every request waiting on this connection fails with the reason it was dropped.
            reason = Failure(self._wrong)
        super().connectionLost(reason)
        self._on_lost(self)
        self._lost.callback(None)

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once this connection is closed."""
        return self._lost_shared.wait()


class _Suspects:
    """Addresses that failed lately, each for L{SUSPECT_SECONDS}; expired ones are dropped
    at each addition, so it holds only what failed within that time."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._until: dict[Address, float] = {}

    def add(self, address: Address) -> None:
        now = self._clock.seconds()
        self._until = {a: t for a, t in self._until.items() if t > now}
        self._until[address] = now + SUSPECT_SECONDS

    def discard(self, address: Address) -> None:
        self._until.pop(address, None)

    def __contains__(self, address: object) -> bool:
        until = self._until.get(address)  # type: ignore[call-overload]
        return until is not None and until > self._clock.seconds()


class KVStore:
    """A client of a chainstore cluster; every method returns a Deferred.

    @param reactor: provides IReactorTCP and IReactorTime (a real reactor, or the clock of the
        tests together with C{endpoint_factory}).
    @param addresses: AMP addresses C{(host, port)} of servers to learn the ring from.
    @param timeout: seconds to wait for the answer to one request (and for one TCP connect).
    @param deadline: seconds after which a request that keeps meeting transient errors gives up
        and raises the last one.
    @param max_retries: at most this many back-offs per request.
    @param max_refreshes: at most this many immediate ring refreshes per request after
        C{NotResponsible}; later ones wait a back-off first.
    @param backoff_base: the cap of the first back-off; the cap doubles with each retry...
    @param backoff_max: ...up to this; each delay is uniform in [0, cap) ("full jitter").
    @param random: anything with a C{random()} method returning floats in [0, 1).
    @param tls: the client's TLS files (L{TLSFiles}) or loaded L{Credentials}; by default
        C{data/pki/client.crt}, C{client.key} and C{ca.crt} (what C{make run} creates); None
        for plaintext (a cluster run with C{tls: off}). The files are read at once: missing
        ones raise L{chainstore.tls.TLSConfigError}.
    @param endpoint_factory: C{(host, port) -> IStreamClientEndpoint}; by default a TCP
        connection with C{timeout}, with mutual TLS unless C{tls} is None (C{tls} is then
        not used).
    @param read_policy: C{"any"} (default): each get goes to a member of the key's live chain,
        the same one for every get of a key (each member then caches a share of the keys),
        except for the few keys that take a large share of the recent gets, whose reads go to
        every member in turn (L{client.readers}); a retry, or a get whose member we failed to
        reach lately, goes to a member chosen at random (those we reach first);
        C{"tail"}: to the chain's tail.
    """

    def __init__(self, reactor: Any, addresses: Iterable[Address], *, timeout: float = 10.0,
                 deadline: float = 30.0, max_retries: int = 100, max_refreshes: int = 5,
                 backoff_base: float = 0.05, backoff_max: float = 2.0,
                 random: Any = None, endpoint_factory: EndpointFactory | None = None,
                 tls: TLSFiles | Credentials | None = DEFAULT_TLS,
                 read_policy: str = "any") -> None:
        if read_policy not in READ_POLICIES:
            raise ValueError(f"read_policy is one of {', '.join(READ_POLICIES)}, "
                             f"not {read_policy!r}")
        self.read_policy = read_policy
        self._reader_choice = ReaderChoice()
        self._reactor = reactor
        self.addresses: list[Address] = [(str(h), int(p)) for h, p in addresses]
        if not self.addresses:
            raise ValueError("give at least one server address (host, amp_port)")
        if timeout <= 0 or deadline <= 0:
            raise ValueError("timeout and deadline must be positive")
        self.timeout = timeout
        self.deadline = deadline
        self.max_retries = max_retries
        self.max_refreshes = max_refreshes
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._random = random if random is not None else _random.Random()
        if endpoint_factory is None:
            credentials = tls if isinstance(tls, Credentials) or tls is None else \
                Credentials(tls)
            if credentials is not None:
                credentials.check()

            def endpoint_factory(host: str, port: int) -> IStreamClientEndpoint:
                return client_endpoint(reactor, credentials, host, port, timeout)
        self._endpoint_factory = endpoint_factory
        self._ring: Ring | None = None
        self._connections: dict[Address, _ClientProtocol] = {}
        self._connecting: dict[Address, _Shared[_ClientProtocol]] = {}
        self._refreshing: _Shared[Ring] | None = None
        # Servers we failed to reach lately: asked last until a connection to them succeeds
        # or SUSPECT_SECONDS pass.
        self._suspects = _Suspects(reactor)
        self._sleeps: set[Deferred[None]] = set()
        self._closed = False

    # -- the API --------------------------------------------------------------------------------

    @staticmethod
    def _request_id() -> bytes:
        # One id per logical write, kept across its retries: the chain applies it once.
        return os.urandom(16)

    def put(self, key: Key, value: Value) -> Deferred[bool]:
        """Store C{value} under C{key}; fires with True if the key already held a value."""
        return Deferred.fromCoroutine(self._put(key, value))

    def get(self, key: Key) -> Deferred[bytes]:
        """The value stored under C{key}; fails with C{KeyNotFound} if there is none."""
        return Deferred.fromCoroutine(self._get(key))

    def delete(self, key: Key) -> Deferred[None]:
        """Remove C{key}; fails with C{KeyNotFound} if it held no value."""
        return Deferred.fromCoroutine(self._delete(key))

    def keyrange(self) -> Deferred[str]:
        """The classic C{keyrange} payload: every range with its head's console address."""
        return self._any(protocol.KeyRange, lambda answer: answer["ranges"])

    def keyrange_read(self) -> Deferred[str]:
        """The classic C{keyrange_read} payload: every range with its tail's console address."""
        return self._any(protocol.KeyRangeRead, lambda answer: answer["ranges"])

    def stats(self) -> Deferred[dict[str, Any]]:
        """One server's counters and settings."""
        return self._any(protocol.Stats, lambda answer: json.loads(answer["stats"]))

    def refresh_metadata(self) -> Deferred[Ring]:
        """Fetch the ring now, from the first server that answers, and return it."""
        return self._refresh(None, None)

    @property
    def ring(self) -> Ring | None:
        """The ring as last fetched, or None before the first request."""
        return self._ring

    def close(self) -> Deferred[None]:
        """Close every connection; fires when they are closed. Later requests fail."""
        if not self._closed:
            self._closed = True
            for shared in list(self._connecting.values()):
                shared.cancel()
            for sleep in list(self._sleeps):
                sleep.cancel()
        protos = list(self._connections.values())
        for proto in protos:
            proto.transport.loseConnection()
        return gatherResults([p.when_lost() for p in protos]).addCallback(lambda _: None)

    # -- requests -------------------------------------------------------------------------------

    async def _put(self, key: Key, value: Value) -> bool:
        k, v = key_bytes(key), value_bytes(value)
        answer = await self._request(protocol.Put, lambda ring: ring.head(k), key=k, value=v,
                                     request_id=self._request_id())
        return bool(answer["updated"])

    async def _get(self, key: Key) -> bytes:
        k = key_bytes(key)
        attempts = 0

        def route(ring: Ring) -> NodeInfo:
            nonlocal attempts
            attempts += 1
            return self._reader(ring, k, attempts == 1)
        answer = await self._request(protocol.Get, route, key=k)
        return bytes(answer["value"])

    def _reader(self, ring: Ring, key: bytes, first: bool = True) -> NodeInfo:
        """The member of C{key}'s live chain a get goes to (see C{read_policy}); C{first}:
        the get's first attempt (a retry goes to a member at random: the one the key's reads
        go to may be the one refusing them)."""
        pos = position(key)
        chain = ring.chain_for_index(ring.owner_index(pos))
        if self.read_policy == "tail" or not chain:
            return ring.tail(key)
        if first:
            choice = chain[self._reader_choice.member(key, pos, len(chain))]
            if (choice.host, choice.amp_port) not in self._suspects:
                return choice
        reachable = [n for n in chain if (n.host, n.amp_port) not in self._suspects]
        choices = reachable or list(chain)
        return choices[int(self._random.random() * len(choices)) % len(choices)]

    async def _delete(self, key: Key) -> None:
        k = key_bytes(key)
        await self._request(protocol.Delete, lambda ring: ring.head(k), key=k,
                            request_id=self._request_id())

    def _any(self, command: type[amp.Command], extract: Callable[[dict[str, Any]], _T]
             ) -> Deferred[_T]:
        async def run() -> _T:
            return extract(await self._request(command, None))
        return Deferred.fromCoroutine(run())

    async def _request(self, command: type[amp.Command],
                       route: Callable[[Ring], NodeInfo] | None, **arguments: Any
                       ) -> dict[str, Any]:
        """Send C{command} to the server C{route} picks from the ring (any server if None)."""
        give_up_at = self._reactor.seconds() + self.deadline
        failures = refreshes = 0
        refresh, prefer, avoid = False, None, None
        while True:
            self._check_open()
            address: Address | None = None
            try:
                if route is None:
                    address = self._any_address()
                else:
                    ring = self._ring
                    if ring is None or refresh:
                        ring = await self._refresh(prefer, avoid)
                        refresh = False
                    node = route(ring)
                    address = (node.host, node.amp_port)
                proto = await self._connection(address)
                answer = await self._call(proto, command, arguments)
                self._suspects.discard(address)
                return answer
            except NotResponsible as e:
                refreshes += 1
                # The refusing server knows the newer ring: ask it first.
                refresh, prefer, avoid = True, address, None
                if refreshes <= self.max_refreshes:
                    log.debug("{address} is not responsible for this {command}; refreshing the "
                              "ring", address=_show(address), command=command.__name__)
                    continue  # at once: the ring moved on
                # Refused again on a fresh ring: a transient state of the server the ring
                # names (a new tail waiting for its first read lease, a server that has not
                # heard of the ring yet), so back off like ServerStopped until the deadline.
                error = e
            except _BACK_OFF as e:
                error: Exception = e
            except (*_UNREACHABLE, ServerError) as e:
                # A server whose storage failed answers ServerError to everything until it is
                # restarted, and never hears of the ring the ECS makes without it: like one
                # that is gone, learn the ring from another server. (A write's outcome is
                # unknown after ServerError; its retry carries the same request id.)
                error = e
                if address is not None:
                    self._suspects.add(address)
                refresh, prefer, avoid = route is not None, None, address
            except RequestTimedOut as e:
                # A hung server (paused, partitioned) is replaced by the ECS within its failure
                # timeout. Reads are safe to repeat and writes carry a request id that the chain
                # applies once, so try again, on a fresh ring, if a whole attempt still fits.
                error = e
                if address is not None:
                    self._suspects.add(address)
                refresh, prefer, avoid = route is not None, None, address
                if self._reactor.seconds() + self.timeout > give_up_at:
                    raise
            self._check_open()
            failures += 1
            delay = self._backoff_delay(failures)
            if failures > self.max_retries or self._reactor.seconds() + delay > give_up_at:
                raise error
            log.debug("{command} to {address} failed ({error}); retry {n} in {delay:.3f}s",
                      command=command.__name__, address=_show(address), error=error, n=failures,
                      delay=delay)
            await self._sleep(delay)

    def _backoff_delay(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(backoff_max, backoff_base * 2**(failures - 1)))."""
        cap = min(self.backoff_max, self.backoff_base * 2.0 ** min(failures - 1, 64))
        return float(self._random.random()) * cap

    async def _sleep(self, delay: float) -> None:
        d = deferLater(self._reactor, delay)
        self._sleeps.add(d)
        try:
            await d
        except CancelledError:
            raise ClientClosed("the store was closed") from None
        finally:
            self._sleeps.discard(d)

    async def _call(self, proto: _ClientProtocol, command: type[amp.Command],
                    arguments: dict[str, Any]) -> dict[str, Any]:
        d = proto.callRemote(command, **arguments)
        # Both the timeout and the await attach their errbacks now, before any answer arrives.
        d.addTimeout(self.timeout, self._reactor)
        try:
            return await d
        except defer.TimeoutError:
            # A server that does not answer is hung or gone: open a fresh connection next time.
            self._drop(proto)
            host, port = proto.address
            raise RequestTimedOut(
                f"{host}:{port} did not answer {command.__name__} within {self.timeout}s"
                + ("; it may or may not have been applied"
                   if command in (protocol.Put, protocol.Delete) else "")
            ) from None

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the store was closed")

    # -- the ring -------------------------------------------------------------------------------

    def _refresh(self, prefer: Address | None, avoid: Address | None) -> Deferred[Ring]:
        """Fetch the ring; concurrent callers share one fetch."""
        if self._refreshing is None:
            d = Deferred.fromCoroutine(self._fetch_ring(prefer, avoid))
            shared = _Shared(d, on_done=self._refreshed)
            if not shared.done:
                self._refreshing = shared
            return shared.wait()
        return self._refreshing.wait()

    def _refreshed(self) -> None:
        self._refreshing = None

    async def _fetch_ring(self, prefer: Address | None, avoid: Address | None) -> Ring:
        errors: list[Exception] = []
        best: Ring | None = None
        for address in self._candidates(prefer, avoid):
            self._check_open()
            try:
                proto = await self._connection(address)
                ring = ring_from_metadata(await self._call(proto, protocol.GetMetadata, {}))
            except (*_UNREACHABLE, RequestTimedOut, WrongProtocol, KVError, ValueError) as e:
                if isinstance(e, _UNREACHABLE):
                    self._suspects.add(address)
                errors.append(e)
                continue
            if not len(ring):
                errors.append(ServerStopped(f"{address[0]}:{address[1]} is in no ring yet"))
                continue
            if self._ring is None or ring.epoch >= self._ring.epoch:
                best = ring
                break
            # An older ring than ours: that server has not heard of the change yet.
            if best is None or ring.epoch > best.epoch:
                best = ring
        if best is None:
            # A wrong port says more about what to fix than whatever the last server said.
            raise next((e for e in errors if isinstance(e, WrongProtocol)), errors[-1])
        if self._ring is None or best != self._ring:
            log.info("ring epoch {epoch}: {count} server(s), chains of {length}",
                     epoch=best.epoch, count=len(best), length=best.chain_length)
        self._ring = best
        return best

    def _known_addresses(self) -> list[Address]:
        known = list(self.addresses)
        if self._ring is not None:
            known += [(n.host, n.amp_port) for n in self._ring.nodes]
        return list(dict.fromkeys(known))

    def _candidates(self, prefer: Address | None, avoid: Address | None) -> list[Address]:
        known = self._known_addresses()
        ordered = sorted(known, key=lambda a: (a == avoid, a in self._suspects))
        if prefer is not None:
            ordered = [prefer] + [a for a in ordered if a != prefer]
        return ordered

    def _any_address(self) -> Address:
        return self._candidates(None, None)[0]

    # -- connections ----------------------------------------------------------------------------

    def _connection(self, address: Address) -> Deferred[_ClientProtocol]:
        """The open connection to C{address}, opening one if there is none."""
        proto = self._connections.get(address)
        if proto is not None:
            return succeed(proto)
        shared = self._connecting.get(address)
        if shared is None:
            proto = _ClientProtocol(address, self._lost)
            d = connectProtocol(self._endpoint_factory(*address), proto)
            d.addCallback(self._connected, address)
            shared = _Shared(d, on_done=lambda: self._connecting.pop(address, None))
            if not shared.done:
                self._connecting[address] = shared
        return shared.wait()

    def _connected(self, proto: _ClientProtocol, address: Address) -> _ClientProtocol:
        if self._closed:
            proto.abort()
            raise ClientClosed("the store was closed")
        log.debug("connected to {address}", address=_show(address))
        self._connections[address] = proto
        self._suspects.discard(address)
        return proto

    def _drop(self, proto: _ClientProtocol) -> None:
        if self._connections.get(proto.address) is proto:
            del self._connections[proto.address]
        proto.abort()

    def _lost(self, proto: _ClientProtocol) -> None:
        if self._connections.get(proto.address) is proto:
            del self._connections[proto.address]
            log.debug("connection to {address} closed", address=_show(proto.address))


def _show(address: Address | None) -> str:
    return "no server" if address is None else f"{address[0]}:{address[1]}"


def parse_address(text: str) -> Address:
    """Parse ``host:port`` (``[v6]:port`` for IPv6) into an address, or raise ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


__all__ = ["Address", "KVStore", "key_bytes", "parse_address", "ring_from_metadata",
           "value_bytes"]
