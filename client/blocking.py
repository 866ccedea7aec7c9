"""L{BlockingKVStore}: the client for plain scripts that know nothing of Twisted.

It runs the reactor in a daemon thread if nobody runs it yet (as crochet does) and calls the
Deferred-based L{KVStore} there, waiting for each answer::

    from client.blocking import BlockingKVStore

    with BlockingKVStore([("127.0.0.1", 51000)]) as store:
        store.put("greeting", "hello")
        print(store.get("greeting"))      # b'hello'

Methods block the calling thread, return plain values and raise the same errors as L{KVStore}.
Use it from any thread except the reactor's own (it would wait for itself forever).
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread
from twisted.python import threadable

from chainstore.ring import Ring
from client.kvstore import Address, Key, KVStore, Value

_T = TypeVar("_T")

_lock = threading.Lock()
_thread: threading.Thread | None = None


def ensure_reactor_running(reactor: Any, timeout: float = 10.0) -> None:
    """Make sure C{reactor} runs, starting it in a daemon thread if nobody runs it yet.

    Raises RuntimeError when called from the reactor's thread, or when the reactor has run and
    stopped (a reactor cannot be restarted).
    """
    global _thread
    if threadable.isInIOThread():
        raise RuntimeError(
            "BlockingKVStore would wait for the reactor thread it runs in; "
            "use client.KVStore, which returns Deferreds, in reactor code")
    with _lock:
        if reactor.running:
            return
        if _thread is not None:
            raise RuntimeError("the reactor has stopped and cannot be restarted")
        started = threading.Event()
        reactor.callWhenRunning(started.set)
        # Signal handlers can only be installed from the main thread; the script keeps its own.
        thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                  name="chainstore-reactor", daemon=True)
        thread.start()
        if not started.wait(timeout):
            raise RuntimeError(f"the reactor did not start within {timeout}s")
        _thread = thread
        atexit.register(_stop_reactor, reactor, thread)


def _stop_reactor(reactor: Any, thread: threading.Thread) -> None:
    # Stopping lets connections close cleanly instead of vanishing with the process.
    def stop() -> None:
        if reactor.running:
            reactor.stop()

    reactor.callFromThread(stop)
    thread.join(2.0)


class BlockingKVStore:
    """The methods of L{KVStore}, blocking; also a context manager that closes the store.

    @param addresses: AMP addresses C{(host, port)} of servers to learn the ring from.
    @param reactor: the reactor to use (the global one by default).
    @param knobs: passed to L{KVStore} (C{timeout}, C{deadline}, C{backoff_base}, ...).
    """

    def __init__(self, addresses: Iterable[Address], *, reactor: Any = None,
                 **knobs: Any) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        self._reactor = reactor
        ensure_reactor_running(reactor)
        self._store: KVStore = blockingCallFromThread(
            reactor, KVStore, reactor, list(addresses), **knobs)

    def _call(self, method: Callable[..., Deferred[_T]], *args: Any) -> _T:
        return blockingCallFromThread(self._reactor, method, *args)

    def put(self, key: Key, value: Value) -> bool:
        """Store C{value} under C{key}; True if the key already held a value."""
        return self._call(self._store.put, key, value)

    def get(self, key: Key) -> bytes:
        """The value of C{key}; raises C{KeyNotFound} if there is none."""
        return self._call(self._store.get, key)

    def delete(self, key: Key) -> None:
        """Remove C{key}; raises C{KeyNotFound} if it held no value."""
        self._call(self._store.delete, key)

    def keyrange(self) -> str:
        return self._call(self._store.keyrange)

    def keyrange_read(self) -> str:
        return self._call(self._store.keyrange_read)

    def stats(self) -> dict[str, Any]:
        return self._call(self._store.stats)

    def refresh_metadata(self) -> Ring:
        """Fetch the ring now; raises if no server answers."""
        return self._call(self._store.refresh_metadata)

    @property
    def addresses(self) -> list[Address]:
        return self._store.addresses

    def close(self) -> None:
        """Close the store's connections (the reactor thread stays, for other stores)."""
        self._call(self._store.close)

    def __enter__(self) -> BlockingKVStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
