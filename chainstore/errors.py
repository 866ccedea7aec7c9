"""The errors a server can answer instead of a result.

Each one is declared on the AMP commands (so it crosses the wire as a typed error), mapped to a
state reply of the text console, and raised again by the client library. Keep the three in step
by adding new errors here only.
"""


class KVError(Exception):
    """Base of every error a key-value server reports to its clients."""

    #: Error code on the AMP wire; stable, never reuse one.
    code: bytes = b"KV_ERROR"


class ServerStopped(KVError):
    """The server is not serving (not started yet by the ECS, or shutting down). Retry later."""

    code = b"SERVER_STOPPED"


class WriteLocked(KVError):
    """The key's range is being moved or rechained: writes are refused, reads still served."""

    code = b"SERVER_WRITE_LOCK"


class NotResponsible(KVError):
    """This server may not serve this request for this key: refresh the metadata and retry."""

    code = b"SERVER_NOT_RESPONSIBLE"


class InvalidKey(KVError):
    """The key is empty, too long, or contains whitespace or non-ASCII bytes."""

    code = b"INVALID_KEY"


class ValueTooLarge(KVError):
    """The value is larger than the store accepts."""

    code = b"VALUE_TOO_LARGE"


class KeyNotFound(KVError):
    """No value is stored under the key (a get or delete of a missing key)."""

    code = b"KEY_NOT_FOUND"


class ServerError(KVError):
    """The server failed to carry out the request (a storage error, a bug); it logged why.
    Whether a write took effect is unknown."""

    code = b"SERVER_ERROR"


class StorageFailed(ServerError):
    """A store of this server failed (disk full, I/O error, corruption): the server stopped
    serving at once and answers every request with this until it is restarted (see
    docs/DESIGN.md, "When storage fails"). It crosses AMP as L{ServerError}, whose code it
    shares; whether a write took effect is unknown."""


class InvalidRequestId(KVError):
    """The request id is longer than a server keeps (64 bytes); nothing was applied."""

    code = b"INVALID_REQUEST_ID"


class PermissionDenied(KVError):
    """The peer's certificate does not carry the role this command needs (or names another
    server than the one it acts as); nothing was applied."""

    code = b"PERMISSION_DENIED"


#: Every error above, for declaring them on AMP commands in one place.
ALL_ERRORS: dict[type[Exception], bytes] = {
    cls: cls.code
    for cls in (ServerStopped, WriteLocked, NotResponsible, InvalidKey, ValueTooLarge, KeyNotFound,
                ServerError, PermissionDenied, InvalidRequestId)
}
