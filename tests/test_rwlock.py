"""ReadWriteLock: shared readers, an exclusive writer, first come first served.

Everything here fires synchronously, so no reactor is involved: a Deferred either has fired
when the call returns or is still waiting for a release.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred

from chainstore.storage.rwlock import ReadWriteLock


def fired(d: Deferred) -> bool:
    return d.called


def test_a_free_lock_is_not_locked():
    lock = ReadWriteLock()
    assert not lock.locked
    assert lock.readers == 0
    assert not lock.writer


def test_readers_share():
    lock = ReadWriteLock()
    ds = [lock.acquire_read() for _ in range(3)]
    assert all(fired(d) for d in ds)
    assert lock.readers == 3
    assert lock.locked
    for _ in range(3):
        lock.release_read()
    assert not lock.locked


def test_writer_is_exclusive_against_readers_and_writers():
    lock = ReadWriteLock()
    assert fired(lock.acquire_write())
    assert lock.writer and lock.locked
    r = lock.acquire_read()
    w = lock.acquire_write()
    assert not fired(r)
    assert not fired(w)
    assert lock.readers == 0
    lock.release_write()
    # First come, first served: the reader queued first gets it, the writer still waits.
    assert fired(r)
    assert not fired(w)
    assert lock.readers == 1 and not lock.writer
    lock.release_read()
    assert fired(w)
    assert lock.writer
    lock.release_write()
    assert not lock.locked


def test_writer_waits_for_all_readers():
    lock = ReadWriteLock()
    lock.acquire_read()
    lock.acquire_read()
    w = lock.acquire_write()
    assert not fired(w)
    lock.release_read()
    assert not fired(w)
    lock.release_read()
    assert fired(w)
    assert lock.writer and lock.readers == 0


def test_waiters_are_served_in_arrival_order():
    lock = ReadWriteLock()
    order: list[str] = []
    lock.acquire_write()
    plan = ["r1", "r2", "w1", "r3", "w2", "w3", "r4", "r5"]
    for name in plan:
        d = lock.acquire_write() if name.startswith("w") else lock.acquire_read()
        d.addCallback(lambda _, name=name: order.append(name))
    assert order == []
    lock.release_write()
    # r1 and r2 share; w1 waits for both of them.
    assert order == ["r1", "r2"]
    lock.release_read()
    assert order == ["r1", "r2"]
    lock.release_read()
    assert order == ["r1", "r2", "w1"]
    lock.release_write()
    assert order == ["r1", "r2", "w1", "r3"]
    lock.release_read()
    assert order == ["r1", "r2", "w1", "r3", "w2"]
    lock.release_write()
    assert order == ["r1", "r2", "w1", "r3", "w2", "w3"]
    lock.release_write()
    assert order == plan
    assert lock.readers == 2
    lock.release_read()
    lock.release_read()
    assert not lock.locked


def test_a_waiting_writer_blocks_new_readers():
    lock = ReadWriteLock()
    lock.acquire_read()
    w = lock.acquire_write()
    late_reader = lock.acquire_read()
    # The lock is only read-held, but a writer waits: a new reader must queue behind it, or a
    # stream of readers would starve the writer.
    assert not fired(late_reader)
    assert lock.readers == 1
    lock.release_read()
    assert fired(w) and not fired(late_reader)
    lock.release_write()
    assert fired(late_reader)
    assert lock.readers == 1


def test_try_acquire_write():
    lock = ReadWriteLock()
    assert lock.try_acquire_write()
    assert lock.writer
    assert not lock.try_acquire_write()
    lock.release_write()
    lock.acquire_read()
    assert not lock.try_acquire_write()
    assert not lock.writer
    lock.release_read()
    assert lock.try_acquire_write()
    lock.release_write()


def test_try_acquire_write_never_overtakes_a_waiter():
    lock = ReadWriteLock()
    lock.acquire_read()
    waiting = lock.acquire_write()
    lock.release_read()
    assert fired(waiting)
    lock.release_write()
    # Now: a reader holds it and another reader waits behind a queued writer.
    lock.acquire_read()
    lock.acquire_write()
    assert not lock.try_acquire_write()


def test_locked_counts_waiters_too():
    lock = ReadWriteLock()
    lock.acquire_write()
    queued = lock.acquire_read()
    lock.release_write()
    assert fired(queued)
    assert lock.locked  # the reader now holds it
    lock.release_read()
    assert not lock.locked


def test_misuse_raises():
    lock = ReadWriteLock()
    with pytest.raises(RuntimeError):
        lock.release_read()
    with pytest.raises(RuntimeError):
        lock.release_write()
    lock.acquire_read()
    with pytest.raises(RuntimeError):
        lock.release_write()
    lock.release_read()
    with pytest.raises(RuntimeError):
        lock.release_read()
    lock.acquire_write()
    with pytest.raises(RuntimeError):
        lock.release_read()
    lock.release_write()
    assert not lock.locked


def test_a_cancelled_waiting_writer_leaves_the_queue():
    lock = ReadWriteLock()
    lock.acquire_read()
    w = lock.acquire_write()
    r = lock.acquire_read()
    assert not fired(r)
    w.cancel()
    failures: list = []
    w.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError)
    # The reader behind the cancelled writer no longer has to wait.
    assert fired(r)
    assert lock.readers == 2 and not lock.writer
    lock.release_read()
    lock.release_read()
    assert not lock.locked
    assert lock.try_acquire_write()


def test_a_cancelled_waiting_reader_is_not_granted_later():
    lock = ReadWriteLock()
    lock.acquire_write()
    r = lock.acquire_read()
    w2 = lock.acquire_write()
    r.cancel()
    r.addErrback(lambda f: f.trap(CancelledError))
    lock.release_write()
    assert fired(w2)
    assert lock.readers == 0 and lock.writer
    lock.release_write()
    assert not lock.locked


def test_reading_context_manager():
    lock = ReadWriteLock()
    seen: list[tuple[int, bool]] = []

    async def reader():
        async with lock.reading():
            seen.append((lock.readers, lock.writer))

    d = ensureDeferred(reader())
    assert fired(d)
    assert seen == [(1, False)]
    assert not lock.locked


def test_writing_context_manager_waits_and_releases():
    lock = ReadWriteLock()
    lock.acquire_read()
    seen: list[tuple[int, bool]] = []

    async def writer():
        async with lock.writing():
            seen.append((lock.readers, lock.writer))

    d = ensureDeferred(writer())
    assert not fired(d)
    assert seen == []
    lock.release_read()
    assert fired(d)
    assert seen == [(0, True)]
    assert not lock.locked


def test_context_managers_release_on_error():
    lock = ReadWriteLock()

    async def failing(cm):
        async with cm:
            raise KeyError("boom")

    for cm in (lock.reading(), lock.writing()):
        d = ensureDeferred(failing(cm))
        failures: list = []
        d.addErrback(failures.append)
        assert failures[0].check(KeyError)
        assert not lock.locked


def test_context_managers_nest_in_fifo_order():
    lock = ReadWriteLock()
    order: list[str] = []
    gate: Deferred[None] = Deferred()

    async def holder():
        async with lock.reading():
            order.append("read start")
            await gate
            order.append("read end")

    async def writer():
        async with lock.writing():
            order.append("write")

    async def reader():
        async with lock.reading():
            order.append("late read")

    ds = [ensureDeferred(f()) for f in (holder, writer, reader)]
    assert order == ["read start"]
    gate.callback(None)
    assert order == ["read start", "read end", "write", "late read"]
    assert all(fired(d) for d in ds)
    assert not lock.locked


def test_cancelling_a_coroutine_waiting_in_writing_frees_the_queue():
    lock = ReadWriteLock()
    lock.acquire_read()
    entered: list[str] = []

    async def writer():
        async with lock.writing():
            entered.append("writer")

    async def reader():
        async with lock.reading():
            entered.append("reader")

    w = ensureDeferred(writer())
    r = ensureDeferred(reader())
    w.cancel()
    w.addErrback(lambda f: f.trap(CancelledError))
    assert entered == ["reader"]
    assert fired(r)
    lock.release_read()
    assert not lock.locked
