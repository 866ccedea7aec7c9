"""A readers/writer lock for Deferred-based code (one reactor thread, no OS locks).

Readers share the lock, a writer holds it alone. Waiters are served in arrival order, and a
waiting writer holds back readers that arrive after it, so a stream of readers cannot starve a
writer. It orders bulk operations on one store (a copy streaming it out holds it for reading,
a drop of a range for writing); client writes do not take it: a range being moved refuses them
through the node's range locks (``server_write_lock``), so only that range is refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from twisted.internet.defer import Deferred, succeed


class ReadWriteLock:
    """Shared read, exclusive write, granted in arrival order; see the module docstring.

    A waiter that cancels its Deferred leaves the queue (and so can unblock those behind it).
    """

    def __init__(self) -> None:
        self.readers = 0
        self.writer = False
        self._waiting: deque[tuple[bool, Deferred[None]]] = deque()

    @property
    def locked(self) -> bool:
        """True while anyone holds the lock or waits for it."""
        return self.writer or self.readers > 0 or bool(self._waiting)

    def acquire_read(self) -> Deferred[None]:
        """Fires once a read lock is held; release it with L{release_read}."""
        if not self.writer and not self._waiting:
            self.readers += 1
            return succeed(None)
        return self._enqueue(False)

    def acquire_write(self) -> Deferred[None]:
        """Fires once the write lock is held; release it with L{release_write}."""
        if self.try_acquire_write():
            return succeed(None)
        return self._enqueue(True)

    def _enqueue(self, exclusive: bool) -> Deferred[None]:
        # Without a canceller a cancelled waiter would stay queued: _wake would then call back
        # an already-fired Deferred (AlreadyCalledError) and grant the lock to nobody, forever.
        d: Deferred[None] = Deferred(self._cancel)
        self._waiting.append((exclusive, d))
        return d

    def _cancel(self, d: Deferred[None]) -> None:
        for entry in self._waiting:
            if entry[1] is d:
                self._waiting.remove(entry)
                break
        # A cancelled writer may have been holding back readers queued behind it.
        self._wake()

    def try_acquire_write(self) -> bool:
        """Take the write lock now if nobody holds or waits for the lock; never queues."""
        if self.locked:
            return False
        self.writer = True
        return True

    def release_read(self) -> None:
        if self.readers <= 0:
            raise RuntimeError("release_read() without a read lock held")
        self.readers -= 1
        self._wake()

    def release_write(self) -> None:
        if not self.writer:
            raise RuntimeError("release_write() without the write lock held")
        self.writer = False
        self._wake()

    def _wake(self) -> None:
        while self._waiting and not self.writer:
            exclusive, d = self._waiting[0]
            if exclusive:
                if self.readers:
                    return
                self._waiting.popleft()
                self.writer = True
                d.callback(None)
                return
            self._waiting.popleft()
            self.readers += 1
            d.callback(None)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        await self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        await self.acquire_write()
        try:
            yield
        finally:
            self.release_write()
