"""The chainstore client library.

- L{KVStore} (C{client.kvstore}): the Deferred-based client, for Twisted code.
- L{BlockingKVStore} (C{client.blocking}): the same methods, blocking, for plain scripts.
- L{FakeKVStore} (C{client.testing}): an in-memory stand-in for your own tests.
- C{kvclient} (C{client.shell}): the interactive shell.

Every error they raise is in C{client.errors}.
"""

from client.blocking import BlockingKVStore
from client.errors import (
    ClientClosed,
    ClientError,
    InvalidKey,
    KeyNotFound,
    KVError,
    NotResponsible,
    RequestTimedOut,
    ServerStopped,
    ValueTooLarge,
    WriteLocked,
    WrongProtocol,
)
from client.kvstore import KVStore

__all__ = [
    "BlockingKVStore",
    "ClientClosed",
    "ClientError",
    "InvalidKey",
    "KVError",
    "KeyNotFound",
    "KVStore",
    "NotResponsible",
    "RequestTimedOut",
    "ServerStopped",
    "ValueTooLarge",
    "WriteLocked",
    "WrongProtocol",
]
