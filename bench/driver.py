"""What the benchmarks' entry points (``python -m bench``, ``python -m bench.reconfig``) share:
running one coroutine on the global reactor, turning SIGTERM into an interruption, the exit
status of an interrupted run, and progress lines on stderr."""

from __future__ import annotations

import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

#: The exit status of a run stopped by Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


def log(text: str) -> None:
    """One progress line on stderr, flushed at once (stdout carries the report)."""
    print(text, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM raises KeyboardInterrupt, as Ctrl-C does: a SIGTERM while servers
    start (before the reactor installs its own handler) must still reach the code that stops
    them."""
    signal.signal(signal.SIGTERM, _interrupt)


def run_reactor(main: Callable[[Any], Coroutine[Any, Any, Any]]) -> tuple[bool, Any]:
    """Run C{main(reactor)} on the global reactor until it finishes or a signal stops it.

    Returns (True, result) if it finished, (False, None) if the reactor was stopped first;
    re-raises what C{main} raised.
    """
    from twisted.internet import reactor

    outcome: list[Any] = []
    interrupted: list[bool] = []

    def finished(result: Any) -> None:
        if interrupted:
            # A signal stopped the reactor, which cut the connections under the run: its
            # failure is the interruption's echo, not a result.
            return
        outcome.append(result)
        reactor.stop()  # type: ignore[attr-defined]

    def shutting_down() -> None:
        if not outcome:
            interrupted.append(True)

    def begin() -> None:
        Deferred.fromCoroutine(main(reactor)).addBoth(finished)

    reactor.addSystemEventTrigger("before", "shutdown", shutting_down)  # type: ignore[attr-defined]
    reactor.callWhenRunning(begin)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if interrupted or not outcome:
        return False, None
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return True, outcome[0]


def print_report(measure: Callable[[Any, Path], Coroutine[Any, Any, list[str]]],
                 prefix: str) -> int:
    """Run C{measure(reactor, workdir)} in a fresh temporary directory (removed afterwards) and
    print the lines it returns; the exit status: 0, or L{INTERRUPTED} if a signal stopped it."""
    interrupt_on_sigterm()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        finished, lines = run_reactor(lambda reactor: measure(reactor, Path(tmp)))
    if not finished:
        return INTERRUPTED
    for line in lines:
        print(line)
    return 0
