"""The errors the client library raises.

A server's answers arrive as the errors of L{chainstore.errors} (re-exported here, so a user
imports every error from one place); the errors below are the library's own, raised without a
server having said so.
"""

from chainstore.errors import (
    InvalidKey,
    KeyNotFound,
    KVError,
    NotResponsible,
    ServerStopped,
    ValueTooLarge,
    WriteLocked,
)

__all__ = [
    "ClientClosed",
    "ClientError",
    "InvalidKey",
    "KVError",
    "KeyNotFound",
    "NotResponsible",
    "RequestTimedOut",
    "ServerStopped",
    "ValueTooLarge",
    "WriteLocked",
    "WrongProtocol",
]


class ClientError(Exception):
    """Base of the errors the client library raises by itself."""


class RequestTimedOut(ClientError):
    """A server did not answer one request within the per-request timeout.

    The request is not retried: a put or delete that timed out may or may not have been
    applied, and only the caller knows whether doing it again is safe.
    """


class WrongProtocol(ClientError):
    """The address does not speak AMP; for example it is a server's text console."""


class ClientClosed(ClientError):
    """The store was closed; it makes no more requests."""
