"""The control plane: AMP commands between the ECS and the KVServers, and between servers.

Who sends what:

- A KVServer started with ``--ecs`` connects to the ECS and sends C{Register} on every
  (re)connection. The ECS then drives the server over that same connection (AMP is symmetric):
  C{Heartbeat} every interval, C{SetMetadata} after every ring change, C{SetState} to start or stop
  serving, C{LockRanges}/C{UnlockRanges} around data movement, C{CopyRange} to make a server stream
  part of one of its stores to another server, C{MoveLocal} and C{DropRange} to reshape its own
  stores, C{ClearStores} before a fresh join, C{Shutdown} to end its process.
- While a server executes C{CopyRange} it sends C{ReceiveRange} batches to the target server's AMP
  port (the server-to-server link), at most C{migration.COPY_WINDOW} batches in flight, so
  memory stays bounded by the batch size whatever the range size, and reports C{CopyProgress}
  to the ECS; the target writes them in order, one per reactor turn. Copies are fenced: the
  epoch a copy carries identifies its reconfiguration attempt, a target takes batches only of
  the attempt its last C{DropRange} with C{attempt} prepared it for, and a source whose ECS
  link drops stops streaming.

Ranges are (start, end] of the ring as 128-bit integers (see L{chainstore.ring.KeyRange}).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Any

from twisted.protocols import amp

from chainstore.errors import ALL_ERRORS
from chainstore.protocol import RING_FIELDS, BigBytes


class StaleEpoch(Exception):
    """The message belongs to an older configuration than the receiver's; it was ignored."""


class RegistrationRefused(Exception):
    """The ECS will not accept this server (its name is taken by another address, ...)."""


class ControlFailed(Exception):
    """A control command could not be carried out; the message says why."""


class NotLeader(Exception):
    """This ECS is a standby (several ECS, one leader): the message names the leader,
    "not the leader; the leader is HOST:PORT", so a server or an admin can dial it."""


CONTROL_ERRORS = {
    **ALL_ERRORS,
    StaleEpoch: b"STALE_EPOCH",
    RegistrationRefused: b"REGISTRATION_REFUSED",
    ControlFailed: b"CONTROL_FAILED",
    NotLeader: b"NOT_LEADER",
}

RANGE_FIELDS = [(b"start", amp.Integer()), (b"end", amp.Integer())]


class _ControlCommand(amp.Command):
    errors = CONTROL_ERRORS
    fatalErrors: dict[type[Exception], bytes] = {}


# -- server -> ECS -------------------------------------------------------------------------------

class Register(_ControlCommand):
    """A server announces itself; the answer says whether it is in the ring and serving. A
    standby ECS refuses it with L{NotLeader}, naming the leader."""

    arguments = [(b"name", amp.Unicode()), (b"host", amp.Unicode()),
                 (b"console_port", amp.Integer()), (b"amp_port", amp.Integer()),
                 (b"epoch", amp.Integer())]
    # ecs_epoch: the newest epoch this ECS has committed; a server that has seen a newer one
    # is talking to a deposed leader and hangs up (several ECS, see ecs.leadership)
    response = [(b"message", amp.Unicode()), (b"ecs_epoch", amp.Integer(optional=True))]


class CopyProgress(_ControlCommand):
    """How far a C{CopyRange} has come (sent by the source server, for the admin's display)."""

    arguments = [(b"operation", amp.Integer()), (b"keys", amp.Integer()),
                 (b"bytes", amp.Integer())]
    response: list[tuple[bytes, amp.Argument]] = []
    requiresAnswer = False


class Alive(_ControlCommand):
    """A registered server tells the ECS it is there (every L{ALIVE_SECONDS}). The ECS counts
    the moment it receives it as heard from the server, and answers with its failure timeout:
    the server then knows the ECS will not declare it failed before C{timeout} seconds after
    it sent this, and grants read leases only that far (chainstore/chain.py, "lease bound")."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"timeout", amp.Float())]


#: Seconds between two L{Alive} of a server.
ALIVE_SECONDS = 0.5


# -- ECS -> server -------------------------------------------------------------------------------

class Heartbeat(_ControlCommand):
    # report: JSON of chainstore.metrics.heartbeat_report (metrics URL, lag and window per
    # chain), for the ECS's status; optional, so either side may be older
    arguments = [(b"epoch", amp.Integer())]
    response = [(b"epoch", amp.Integer()), (b"state", amp.Unicode()),
                (b"report", amp.Unicode(optional=True))]


class SetMetadata(_ControlCommand):
    """Adopt this ring; refused with L{StaleEpoch} if the server already has a newer one."""

    arguments = RING_FIELDS
    response: list[tuple[bytes, amp.Argument]] = []


class SetState(_ControlCommand):
    """``running`` serves clients; ``stopped`` answers them ``server_stopped``."""

    arguments = [(b"state", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []


class LockRanges(_ControlCommand):
    """Refuse client requests to keys in these ranges until C{UnlockRanges}.

    Without C{reads}: writes are refused (``server_write_lock``), reads go on, while a range is
    copied. With C{reads}: reads are refused (``server_not_responsible``) for the moment of a
    switch, so the old tail never answers once the new chain may commit writes. Locks set over
    a link that drops stay until the ECS sends the ring over a new one.
    """

    arguments = [(b"ranges", amp.AmpList(RANGE_FIELDS)), (b"reads", amp.Boolean())]
    response: list[tuple[bytes, amp.Argument]] = []


class UnlockRanges(_ControlCommand):
    arguments = [(b"ranges", amp.AmpList(RANGE_FIELDS)), (b"reads", amp.Boolean())]
    response: list[tuple[bytes, amp.Argument]] = []


class TrackWrites(_ControlCommand):
    """Record the keys written to C{store} in (start, end] from now on (a dirty set).

    A copy made while writes go on is followed, under the write lock, by a second pass that
    sends only the tracked keys (C{CopyRange}/C{MoveLocal} with C{tracker}).
    """

    arguments = [(b"store", amp.Unicode()), (b"start", amp.Integer()), (b"end", amp.Integer())]
    response = [(b"tracker", amp.Integer())]


class StopTracking(_ControlCommand):
    arguments = [(b"tracker", amp.Integer())]
    response: list[tuple[bytes, amp.Argument]] = []


class DrainWrites(_ControlCommand):
    """Answer once every write this server has taken as a head has reached its chain's tail."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []


class CopyRange(_ControlCommand):
    """Stream the keys of C{store} in (start, end] to C{target_store} of another server.

    With C{tracker}: only the keys that tracker recorded, with their current values (or as
    deletions), after which the tracker ends.
    """

    arguments = [(b"operation", amp.Integer()), (b"store", amp.Unicode()),
                 (b"start", amp.Integer()), (b"end", amp.Integer()),
                 (b"target_host", amp.Unicode()), (b"target_port", amp.Integer()),
                 (b"target_store", amp.Unicode()), (b"epoch", amp.Integer()),
                 (b"tracker", amp.Integer(optional=True))]
    response = [(b"keys", amp.Integer()), (b"bytes", amp.Integer())]


class MoveLocal(_ControlCommand):
    """Copy the keys in (start, end] from one of the server's stores into another
    (with C{tracker}: only the keys it recorded)."""

    arguments = [(b"source", amp.Unicode()), (b"target", amp.Unicode()),
                 (b"start", amp.Integer()), (b"end", amp.Integer()),
                 (b"tracker", amp.Integer(optional=True))]
    response = [(b"keys", amp.Integer())]


class DropRange(_ControlCommand):
    """Delete the keys in (start, end] from C{store} (data the server no longer holds).

    With C{attempt} (the epoch of the reconfiguration attempt, which every attempt allocates
    anew): the drop prepares the store as the target of that attempt's copy, and from now on
    the server accepts C{ReceiveRange} batches of that attempt only (a late batch of an aborted
    one is refused with L{StaleEpoch}).
    """

    arguments = [(b"store", amp.Unicode()), (b"start", amp.Integer()), (b"end", amp.Integer()),
                 (b"attempt", amp.Integer(optional=True))]
    response = [(b"keys", amp.Integer())]


class ClearStores(_ControlCommand):
    """Empty all three stores: a joining server must not serve leftovers of an earlier life."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []


class Shutdown(_ControlCommand):
    """Stop serving, close the stores and end the process."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []


# -- server -> server ----------------------------------------------------------------------------

class ReceiveRange(_ControlCommand):
    """One batch of a C{CopyRange}: write these pairs (and delete these keys) in C{store},
    atomically. C{image}: instead of C{items} and C{deletes}, the pairs as a database image
    (the usual batch, made and written inside SQLite: chainstore/storage/sqlitedbm.py,
    C{export_page}). C{requests}: (request id, key) pairs of client writes to keys of the
    range, so that a retry reaching the range's new head is recognised there."""

    arguments = [(b"epoch", amp.Integer()), (b"store", amp.Unicode()),
                 (b"items", BigBytes()), (b"deletes", BigBytes(optional=True)),
                 (b"requests", BigBytes(optional=True)), (b"image", BigBytes(optional=True))]
    response: list[tuple[bytes, amp.Argument]] = []


# A batch is a run of (key length, value length, key, value); AmpList cannot carry it because
# it packs all items into one 64 KiB value.
_PAIR_HEADER = struct.Struct(">BI")
PAIR_HEADER_BYTES = _PAIR_HEADER.size


def pack_items(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    out = bytearray()
    for key, value in items:
        out += _PAIR_HEADER.pack(len(key), len(value))
        out += key
        out += value
    return bytes(out)


def unpack_items(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    view = memoryview(data)
    offset, size = 0, _PAIR_HEADER.size
    while offset < len(view):
        # Check the whole pair fits before reading it: a cut inside a header or a key (even one
        # followed by an empty value) must not yield a shortened key.
        if offset + size > len(view):
            raise ValueError("truncated batch")
        key_len, value_len = _PAIR_HEADER.unpack_from(view, offset)
        offset += size
        if offset + key_len + value_len > len(view):
            raise ValueError("truncated batch")
        key = bytes(view[offset:offset + key_len])
        offset += key_len
        value = bytes(view[offset:offset + value_len])
        offset += value_len
        yield key, value


# -- chain replication (server -> server) ----------------------------------------------------

class Relay(_ControlCommand):
    """Everything one chain member has for another in one reactor turn, one way (no answer):
    batches of writes and acknowledgements, as sections (L{pack_section}).

    A batch section carries writes of the range owned by C{owner}, in serial order, from a
    member to the next (a head to its middle, a middle to its tail), and the highest serial the
    sender knows the range's tail to have applied. An acknowledgement section says that the
    tail of C{owner}'s range has applied every write up to C{acked}: the tail sends it to the
    range's head, which passes it on to its middle. Acknowledgements are cumulative and a write
    is applied once (serials), so any section may be sent again: a member resends what is not
    acknowledged when its link drops, when a new ring comes, and when no acknowledgement has
    come for L{chainstore.chain.ACK_TIMEOUT}.
    """

    arguments = [(b"epoch", amp.Integer()), (b"data", BigBytes())]
    requiresAnswer = False


#: Section kinds of a L{Relay}.
BATCH = 0
ACK = 1
#: Flags of a batch section. RESUMED: the sender restarted, and its successor may skip a gap
#: of writes that it applied and never forwarded (L{chainstore.chain}). RESENT: the section
#: is sent again; a middle that receives it sends its own window on again, so that the tail
#: acknowledges again whatever acknowledgement was lost. PROBE (with RESENT): sent because
#: nothing was acknowledged for a long while; the tail dials its head again before it
#: acknowledges, since its own link to the head may be the one that delivers nothing.
RESUMED = 1
RESENT = 2
PROBE = 4
# kind, flags, owner's length, acked, payload's length
_SECTION = struct.Struct(">BBHqI")


def pack_section(kind: int, owner: str, acked: int, payload: bytes = b"",
                 flags: int = 0) -> list[bytes]:
    """A section of a L{Relay}'s C{data}, as parts to join (the payload is not copied)."""
    name = owner.encode("utf-8")
    return [_SECTION.pack(kind, flags, len(name), acked, len(payload)), name, payload]


def unpack_sections(data: bytes) -> list[tuple[int, int, str, int, memoryview]]:
    """(kind, flags, owner, acked, payload) of every section of a L{Relay}'s C{data}, the
    payloads as views of C{data}; ValueError (UnicodeDecodeError too) if it is malformed."""
    view = memoryview(data).toreadonly()
    sections = []
    offset, size, end = 0, _SECTION.size, len(view)
    while offset < end:
        if offset + size > end:
            raise ValueError("truncated relay section")
        kind, flags, name_len, acked, payload_len = _SECTION.unpack_from(view, offset)
        offset += size
        stop = offset + name_len + payload_len
        if stop > end or kind not in (BATCH, ACK):
            raise ValueError("malformed relay section")
        owner = bytes(view[offset:offset + name_len]).decode("utf-8")
        offset += name_len
        sections.append((kind, flags, owner, acked, view[offset:stop]))
        offset = stop
    return sections


class RenewLease(_ControlCommand):
    """A tail asks its predecessor to renew its read lease on the range owned by C{owner}; with
    C{upstream}, a head or middle asks its successor (the lease under which it answers reads of
    clean keys itself, L{chainstore.craq})."""

    arguments = [(b"epoch", amp.Integer()), (b"owner", amp.Unicode()),
                 (b"upstream", amp.Boolean(optional=True))]
    response = [(b"seconds", amp.Float())]


class ReadVersion(_ControlCommand):
    """A head or middle asks the tail of C{owner}'s range which serial it has applied, before it
    answers a read of C{key} (L{chainstore.craq}). C{newest}: the serial of the asker's newest
    write to the key; C{held}: the last serial the asker has applied. The answer carries the
    tail's C{serial}, and only when the asker's value is not the committed one, the tail's:
    C{found} and C{value}."""

    arguments = [(b"epoch", amp.Integer()), (b"owner", amp.Unicode()), (b"key", amp.String()),
                 (b"newest", amp.Integer()), (b"held", amp.Integer())]
    response = [(b"serial", amp.Integer()), (b"found", amp.Boolean(optional=True)),
                (b"value", BigBytes(optional=True))]


PUT, DELETE = 0, 1
_OP_HEADER = struct.Struct(">QBBIB")


def pack_ops(ops: Iterable[tuple[int, int, bytes, bytes, bytes]]) -> bytes:
    """Pack (serial, kind, key, value, request id) tuples for a batch section of a C{Relay}:
    per write a 15-byte header (serial, kind, key, value and request id lengths), then the
    three fields.
    Key, value and request id may be any bytes-like objects (a middle forwards the
    memoryviews L{unpack_ops} gave it): each is copied once, into the result."""
    header = _OP_HEADER.pack
    parts: list[Any] = []
    add = parts.append
    for serial, kind, key, value, request_id in ops:
        add(header(serial, kind, len(key), len(value), len(request_id)))
        add(key)
        add(value)
        add(request_id)
    return b"".join(parts)


def unpack_ops(data: bytes | memoryview) -> list[tuple[int, int, bytes, Any, bytes]]:
    """The writes L{pack_ops} packed. Keys and request ids are bytes; each value is a
    read-only C{memoryview} of C{data}, not a copy (SQLite binds it as a BLOB, and a middle
    forwards it as it came), so a value's bytes are copied only where they must go."""
    view = memoryview(data).toreadonly()
    offset, size, end = 0, _OP_HEADER.size, len(view)
    header = _OP_HEADER.unpack_from
    ops = []
    add = ops.append
    while offset < end:
        if offset + size > end:
            raise ValueError("truncated batch of writes")
        serial, kind, key_len, value_len, rid_len = header(view, offset)
        offset += size
        stop = offset + key_len + value_len + rid_len
        if stop > end:
            raise ValueError("truncated batch of writes")
        key = bytes(view[offset:offset + key_len])
        offset += key_len
        value = view[offset:offset + value_len]
        offset += value_len
        request_id = bytes(view[offset:stop])
        offset = stop
        add((serial, kind, key, value, request_id))
    return ops


# -- the Relay box, read and written directly -----------------------------------------------------
#
# Relay carries every write between chain members, so its box is built and read here without
# AMP's generic argument machinery (Command.makeArguments / parseArguments, which py-spy and
# cProfile showed at a third of the Python time of a replicated put). The bytes on the wire are
# exactly those of the declared command: a peer using callRemote(Relay, ...) and one using
# these interoperate.

_RELAY = Relay.commandName


def relay_box(epoch: int, data: bytes) -> amp.AmpBox:
    """The arguments of a C{Relay} as AMP puts them in a box (C{data} as L{BigBytes}: split in
    65,535-byte chunks under C{data}, C{data.1}, ...; the chunks are views, copied once when
    the box is serialized)."""
    box = amp.AmpBox()
    box[b"epoch"] = b"%d" % epoch
    step = amp.MAX_VALUE_LENGTH
    if len(data) <= step:
        box[b"data"] = data
    else:
        view = memoryview(data)
        box[b"data"] = view[:step]
        for i, start in enumerate(range(step, len(data), step), 1):
            box[b"data.%d" % i] = view[start:start + step]
    return box


def read_relay(box: amp.AmpBox) -> tuple[int, bytes]:
    """(epoch, data) of a received C{Relay} box; raises as AMP's own parsing does (KeyError
    for a missing argument, ValueError for a bad one)."""
    epoch = int(box[b"epoch"])
    first = box[b"data"]
    if b"data.1" in box:
        parts = [first]
        i = 1
        while (part := box.get(b"data.%d" % i)) is not None:
            parts.append(part)
            i += 1
        first = b"".join(parts)
    return epoch, first


def send_relay(proto: amp.AMP, epoch: int, data: bytes) -> None:
    """Send a C{Relay} on C{proto} (as C{callRemote(Relay, ...)} would: no answer asked)."""
    proto._sendBoxCommand(_RELAY, relay_box(epoch, data), requiresAnswer=False)
