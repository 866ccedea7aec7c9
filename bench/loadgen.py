"""The load generator: a closed loop keeping N requests in flight, timing each one.

It knows nothing of AMP or of any system under test: it calls C{request(i)} for operation
number C{i} and expects a Deferred. That keeps it testable with synchronous fakes and a fake
clock, and lets any system and any workload share it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure


class RequestFailed(Exception):
    """A request of a run failed; a benchmark with failing requests measures nothing."""


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending sequence (C{fraction} in (0, 1])."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    # The epsilon keeps 100 * 0.99 from rounding up to rank 100 in binary floating point.
    rank = max(1, math.ceil(len(sorted_values) * fraction - 1e-9))
    return sorted_values[rank - 1]


@dataclass
class RunResult:
    """What one closed-loop run measured; times in seconds of the loop's clock."""

    inflight: int
    completed: int
    elapsed: float
    latencies: list[float] = field(repr=False)
    stopped_by_time: bool = False

    @property
    def ops_per_second(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    def latency(self, fraction: float) -> float:
        return percentile(sorted(self.latencies), fraction)

    def summary(self) -> dict[str, Any]:
        """The run's figures without the raw latencies (latencies in milliseconds)."""
        ordered = sorted(self.latencies)
        return {
            "inflight": self.inflight,
            "completed": self.completed,
            "elapsed_s": self.elapsed,
            "ops_per_s": self.ops_per_second,
            "p50_ms": percentile(ordered, 0.50) * 1e3,
            "p99_ms": percentile(ordered, 0.99) * 1e3,
            "p999_ms": percentile(ordered, 0.999) * 1e3,
            "max_ms": ordered[-1] * 1e3,
            "stopped_by_time": self.stopped_by_time,
        }


class ClosedLoop:
    """Issue C{ops} requests with at most C{inflight} outstanding, or fewer if time runs out.

    A new request starts as soon as one completes, so exactly C{inflight} are outstanding until
    the end. No request but the first starts once C{seconds} have passed since the run began;
    those already sent are awaited. The first failure stops new requests and fails the run with
    L{RequestFailed}. C{now} is a monotonic clock in seconds.
    """

    def __init__(self, request: Callable[[int], Deferred[Any]], ops: int, inflight: int,
                 seconds: float, now: Callable[[], float] = time.perf_counter) -> None:
        if ops < 1 or inflight < 1 or seconds <= 0:
            raise ValueError("ops and inflight must be >= 1 and seconds > 0")
        self.request = request
        self.ops = ops
        self.inflight = inflight
        self.seconds = seconds
        self.now = now
        self._latencies: list[float] = []
        self._issued = 0
        self._outstanding = 0
        self._started = 0.0
        self._last_done = 0.0
        self._stopped_by_time = False
        self._failure: Failure | None = None
        self._pumping = False
        self._result: Deferred[RunResult] = Deferred()

    def run(self) -> Deferred[RunResult]:
        """Start the run; the Deferred fires with its L{RunResult} when the last answer is in."""
        self._started = self._last_done = self.now()
        self._pump()
        return self._result

    def _may_issue(self) -> bool:
        if self._failure is not None or self._issued >= self.ops:
            return False
        # The first request always goes out: a run measures at least one answer.
        if self._issued and self.now() - self._started >= self.seconds:
            self._stopped_by_time = True
            return False
        return True

    def _pump(self) -> None:
        # A request whose Deferred has already fired re-enters here from _done; looping instead
        # of recursing keeps the stack flat however many requests complete synchronously.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._outstanding < self.inflight and self._may_issue():
                self._issue()
        finally:
            self._pumping = False
        if self._outstanding == 0 and not self._result.called:
            self._finish()

    def _issue(self) -> None:
        i = self._issued
        self._issued += 1
        self._outstanding += 1
        sent = self.now()
        try:
            d = self.request(i)
        except Exception:
            d = fail()
        d.addCallbacks(self._done, self._failed, callbackArgs=(sent,))

    def _done(self, _: object, sent: float) -> None:
        self._last_done = self.now()
        self._latencies.append(self._last_done - sent)
        self._outstanding -= 1
        self._pump()

    def _failed(self, failure: Failure) -> None:
        if self._failure is None:
            self._failure = failure
        self._outstanding -= 1
        self._pump()

    def _finish(self) -> None:
        if self._failure is not None:
            error = self._failure.value
            self._result.errback(RequestFailed(
                f"request failed after {len(self._latencies)} answers: "
                f"{type(error).__name__}: {error}"))
            return
        self._result.callback(RunResult(
            inflight=self.inflight, completed=len(self._latencies),
            elapsed=self._last_done - self._started, latencies=self._latencies,
            stopped_by_time=self._stopped_by_time))
