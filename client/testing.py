"""In-memory stand-ins for the client, for testing your own code without a cluster.

L{FakeKVStore} has the API of L{client.kvstore.KVStore}: the same methods, the same local
validation and the same errors, but it keeps the data in a dict and returns Deferreds that have
already fired. L{FakeBlockingKVStore} does the same for L{client.blocking.BlockingKVStore}.

To test how your code handles failures, queue them::

    store = FakeKVStore()
    store.fail_next(ServerStopped("down for maintenance"), method="put")
    d = my_code_that_puts(store)   # its first put fails with ServerStopped

Each queued failure is used by exactly one request (the next one, or the next one of
C{method}), after that request's key and value passed validation: a request the real client
rejects without asking a server never reaches a server's failure either.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from chainstore.errors import KeyNotFound
from chainstore.ring import NodeInfo, Ring
from client.errors import ClientClosed
from client.kvstore import Address, Key, Value, key_bytes, value_bytes

METHODS = ("put", "get", "delete", "keyrange", "keyrange_read", "stats", "refresh_metadata")


class FakeKVStore:
    """A one-server store in memory with the Deferred API of L{KVStore}.

    @ivar data: the stored values, bytes to bytes; read or preload it in tests.
    @ivar requests: every request that passed validation, as C{(method, key)} (key None for
        requests without one), in order; failed requests included.
    """

    def __init__(self, host: str = "127.0.0.1", console_port: int = 50000,
                 amp_port: int = 51000, name: str = "fake") -> None:
        self.data: dict[bytes, bytes] = {}
        self.requests: list[tuple[str, bytes | None]] = []
        self.addresses: list[Address] = [(host, amp_port)]
        self.closed = False
        self._ring = Ring((NodeInfo(name, host, console_port, amp_port),), replication=1)
        self._failures: deque[tuple[str | None, Exception]] = deque()
        self._counts: Counter[str] = Counter()

    def fail_next(self, error: Exception, *, method: str | None = None, times: int = 1) -> None:
        """Make the next C{times} requests (of C{method}, if given) fail with C{error}."""
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
        for _ in range(times):
            self._failures.append((method, error))

    @property
    def pending_failures(self) -> int:
        """How many queued failures no request has used yet."""
        return len(self._failures)

    # -- the KVStore API ------------------------------------------------------------------------

    def put(self, key: Key, value: Value) -> Deferred[bool]:
        def run() -> bool:
            k, v = key_bytes(key), value_bytes(value)
            self._served("put", k)
            updated = k in self.data
            self.data[k] = v
            return updated
        return self._fired(run)

    def get(self, key: Key) -> Deferred[bytes]:
        def run() -> bytes:
            k = key_bytes(key)
            self._served("get", k)
            if k not in self.data:
                raise KeyNotFound(f"no value is stored under {k!r}")
            return self.data[k]
        return self._fired(run)

    def delete(self, key: Key) -> Deferred[None]:
        def run() -> None:
            k = key_bytes(key)
            self._served("delete", k)
            if self.data.pop(k, None) is None:
                raise KeyNotFound(f"no value is stored under {k!r}")
        return self._fired(run)

    def keyrange(self) -> Deferred[str]:
        return self._fired(lambda: self._served("keyrange") or self._ring.keyrange_text())

    def keyrange_read(self) -> Deferred[str]:
        return self._fired(
            lambda: self._served("keyrange_read") or self._ring.keyrange_read_text())

    def stats(self) -> Deferred[dict[str, Any]]:
        def run() -> dict[str, Any]:
            self._served("stats")
            return {
                "name": self._ring.nodes[0].name, "state": "running", "epoch": self._ring.epoch,
                "puts": self._counts["put"], "gets": self._counts["get"],
                "deletes": self._counts["delete"], "coordinator_keys": len(self.data),
            }
        return self._fired(run)

    def refresh_metadata(self) -> Deferred[Ring]:
        return self._fired(lambda: self._served("refresh_metadata") or self._ring)

    @property
    def ring(self) -> Ring:
        return self._ring

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)

    # -- helpers --------------------------------------------------------------------------------

    def _served(self, method: str, key: bytes | None = None) -> None:
        """Record a request that reached the "server"; raise a queued failure meant for it."""
        self.requests.append((method, key))
        self._counts[method] += 1
        for i, (wanted, error) in enumerate(self._failures):
            if wanted is None or wanted == method:
                del self._failures[i]
                raise error

    def _fired(self, run: Any) -> Deferred[Any]:
        if self.closed:
            return fail(ClientClosed("the store was closed"))
        try:
            return succeed(run())
        except Exception:
            return fail()


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class FakeBlockingKVStore:
    """L{FakeKVStore} with the blocking API of L{BlockingKVStore}; C{fake} is the store."""

    def __init__(self, fake: FakeKVStore | None = None) -> None:
        self.fake = fake if fake is not None else FakeKVStore()

    @property
    def addresses(self) -> list[Address]:
        return self.fake.addresses

    def put(self, key: Key, value: Value) -> bool:
        return bool(_result(self.fake.put(key, value)))

    def get(self, key: Key) -> bytes:
        return bytes(_result(self.fake.get(key)))

    def delete(self, key: Key) -> None:
        _result(self.fake.delete(key))

    def keyrange(self) -> str:
        return str(_result(self.fake.keyrange()))

    def keyrange_read(self) -> str:
        return str(_result(self.fake.keyrange_read()))

    def stats(self) -> dict[str, Any]:
        return dict(_result(self.fake.stats()))

    def refresh_metadata(self) -> Ring:
        return _result(self.fake.refresh_metadata())  # type: ignore[no-any-return]

    def close(self) -> None:
        _result(self.fake.close())

    def __enter__(self) -> FakeBlockingKVStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
