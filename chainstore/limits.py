"""Limits on keys and values, shared by every protocol, the server and the client library.

The numbers come from the classic text protocol (see docs/DESIGN.md): keys of at most 20 bytes
without whitespace, values of at most 120,000 bytes, messages of at most 128 KiB.
"""

from chainstore.errors import InvalidKey, InvalidRequestId, ValueTooLarge

MAX_KEY_BYTES = 20
MAX_VALUE_BYTES = 120_000
MAX_LINE_BYTES = 128 * 1024
# A request id is remembered by every server of the chain (up to 150,000 of them, see
# chainstore/chain.py), so its size is bounded too; the client library draws 16 random bytes.
MAX_REQUEST_ID_BYTES = 64

# Printable ASCII without the space: whitespace would split a console line, and control or
# non-ASCII bytes make keys that no terminal user can type back.
_KEY_BYTES = frozenset(range(0x21, 0x7F))


def check_key(key: bytes) -> bytes:
    """Return C{key} if it is a valid key, else raise L{InvalidKey} saying why."""
    if not key:
        raise InvalidKey("key is empty")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidKey(f"key is {len(key)} bytes, the limit is {MAX_KEY_BYTES}")
    if not _KEY_BYTES.issuperset(key):
        raise InvalidKey("key may only hold printable ASCII characters without spaces")
    return key


def check_value(value: bytes) -> bytes:
    """Return C{value} if it fits, else raise L{ValueTooLarge}."""
    if len(value) > MAX_VALUE_BYTES:
        raise ValueTooLarge(f"value is {len(value)} bytes, the limit is {MAX_VALUE_BYTES}")
    return value


def check_request_id(request_id: bytes) -> bytes:
    """Return C{request_id} if it fits, else raise L{InvalidRequestId}."""
    if len(request_id) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequestId(f"request id is {len(request_id)} bytes, the limit is "
                               f"{MAX_REQUEST_ID_BYTES}")
    return request_id
