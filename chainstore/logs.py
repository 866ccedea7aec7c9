"""Logging for chainstore daemons: one level filter that every chainstore Logger goes through.

twistd owns the log destination (``--logfile``, ``--syslog``, stdout with ``-n``); chainstore only
decides how much it says, with ``--log-level``.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
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
