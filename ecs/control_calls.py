"""The ECS's control commands to its servers (L{chainstore.control}), over their links."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp

from chainstore import control

CONTROL_TIMEOUT = 10.0


class ControlCalls:
    """Sends control commands to the servers connected in C{links} (a mapping the ECS keeps up to
    date, by server name).

    A call fails at once with L{control.ControlFailed} if its server is not connected, after
    C{timeout} seconds if it is not answered, and when its server is declared failed
    (L{cancel}), so a change waiting on a failed server aborts instead of hanging. Once the
    ECS stops (L{close}), every call fails with C{CancelledError}.
    """

    def __init__(self, links: Mapping[str, amp.AMP], clock: IReactorTime) -> None:
        self.links = links
        self.clock = clock
        # calls in flight, per server, to cancel when it fails
        self._inflight: dict[str, set[Deferred[Any]]] = {}
        self.closed = False

    def call(self, name: str, command: type[amp.Command], timeout: float | None = CONTROL_TIMEOUT,
             **kwargs: Any) -> Deferred[Any]:
        if self.closed:
            return _failed(CancelledError("the ECS has stopped"))
        link = self.links.get(name)
        if link is None:
            return _failed(control.ControlFailed(f"{name} is not connected to the ECS"))
        d = link.callRemote(command, **kwargs)
        if timeout is not None:
            d.addTimeout(timeout, self.clock)
        inflight = self._inflight.setdefault(name, set())
        inflight.add(d)

        def done(result: Any) -> Any:
            inflight.discard(d)
            return result

        return d.addBoth(done)

    def cancel(self, name: str) -> None:
        """Fail every call to C{name} still in flight."""
        for d in list(self._inflight.get(name, ())):
            d.cancel()

    def close(self) -> None:
        """Cancel every call in flight, and fail every later one at once: the ECS stopped."""
        self.closed = True
        for name in list(self._inflight):
            self.cancel(name)


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
