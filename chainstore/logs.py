"""Logging for chainstore daemons: one level filter that every chainstore Logger goes through.

twistd owns the log destination (``--logfile``, ``--syslog``, stdout with ``-n``); chainstore only
decides how much it says, with ``--log-level``, and can also write JSON lines (``--log-json``).
"""

from __future__ import annotations

from typing import IO, Any

from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
)

LEVELS = {level.name: level for level in LogLevel.iterconstants()}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def parse_level(name: str) -> LogLevel:
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {name!r}; choose one of {', '.join(LEVELS)}"
        ) from None


def set_level(level: LogLevel | str) -> None:
    """Emit chainstore events of C{level} and above."""
    if isinstance(level, str):
        level = parse_level(level)
    _predicate.setLogLevelForNamespace(None, level)


def get_logger(namespace: str | None = None) -> Logger:
    """A Logger whose events pass the chainstore level filter."""
    return Logger(namespace=namespace, observer=_observer)


class JSONLog(Service):
    """While running, every log event (chainstore's and Twisted's, whatever their level, as
    twistd's own log gets them) is also written to C{path} as one JSON object per line
    (C{twisted.logger.jsonFileLogObserver}; read back with C{eventsFromJSONLogFile})."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._observer: Any = None

    def startService(self) -> None:
        super().startService()
        self._file = open(self.path, "a", encoding="utf-8")
        self._observer = jsonFileLogObserver(self._file)
        globalLogPublisher.addObserver(self._observer)

    def stopService(self) -> None:
        super().stopService()
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._observer = None
        if self._file is not None:
            self._file.close()
            self._file = None
