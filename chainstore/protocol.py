"""The AMP commands between clients and KVServers, declared once.

Who sends what:

- A client (the ``client.KVStore`` library, ``kvclient``) sends C{Put} and C{Delete} to the head
  of a key's chain, C{Get} to its tail, and C{GetMetadata} to any server to learn the ring (which
  server is head and tail of which range, and their AMP ports). C{KeyRange} and C{KeyRangeRead}
  return the classic text rendering of the same ring, C{Stats} a server's counters.
- A server answers each with the response below or with one of the errors of
  L{chainstore.errors}, declared on every command so that they arrive typed.

AMP limits one value to 64 KiB; values travel as L{BigBytes}, split over several box keys.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp

from chainstore.errors import ALL_ERRORS
from chainstore.ring import NodeInfo, Ring, parse_position, render_position


class BigBytes(amp.Argument):
    """Bytes of any length: split into 65,535-byte chunks under ``name``, ``name.1``, ...

    A whole AMP box has no size limit, only each key's value does, so a 120,000-byte value
    travels as two chunks of one box.
    """

    def toBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        value = self.retrieve(objects, name.decode("ascii"), proto)
        if self.optional and value is None:
            return
        if not isinstance(value, bytes):
            raise TypeError(f"{name!r} must be bytes, not {type(value).__name__}")
        step = amp.MAX_VALUE_LENGTH
        strings[name] = value[:step]
        for i, start in enumerate(range(step, len(value), step), 1):
            strings[b"%s.%d" % (name, i)] = value[start:start + step]

    def fromBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        first = self.retrieve(strings, name, proto)
        if first is None:
            objects[name.decode("ascii")] = None
            return
        parts = [first]
        i = 1
        while (part := strings.pop(b"%s.%d" % (name, i), None)) is not None:
            parts.append(part)
            i += 1
        objects[name.decode("ascii")] = b"".join(parts)


class BigUnicode(BigBytes):
    """Text of any length: UTF-8, split like L{BigBytes} (for answers such as the ECS's
    C{Status}, whose size grows with the cluster past AMP's 64 KiB per value)."""

    def toBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        key = name.decode("ascii")
        if isinstance(objects.get(key), str):
            objects = {**objects, key: objects[key].encode("utf-8")}
        super().toBox(name, strings, objects, proto)

    def fromBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        super().fromBox(name, strings, objects, proto)
        key = name.decode("ascii")
        if objects[key] is not None:
            objects[key] = objects[key].decode("utf-8")


class _KVCommand(amp.Command):
    errors = ALL_ERRORS
    fatalErrors: dict[type[Exception], bytes] = {}


class Put(_KVCommand):
    """Store C{value} under C{key}; C{updated} says the key already held a value.

    C{request_id} (any bytes, unique per logical write) makes a retry safe: a write the chain
    already carries is not applied again.
    """

    arguments = [(b"key", amp.String()), (b"value", BigBytes()),
                 (b"request_id", amp.String(optional=True))]
    response = [(b"updated", amp.Boolean())]


class Get(_KVCommand):
    """The value stored under C{key}, or L{KeyNotFound}."""

    arguments = [(b"key", amp.String())]
    response = [(b"value", BigBytes())]


class Delete(_KVCommand):
    """Remove C{key}, or L{KeyNotFound} if it held no value."""

    arguments = [(b"key", amp.String()), (b"request_id", amp.String(optional=True))]
    response: list[tuple[bytes, amp.Argument]] = []


class KeyRange(_KVCommand):
    """The classic C{keyrange} payload: every range with its head's console address."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"ranges", amp.Unicode())]


class KeyRangeRead(_KVCommand):
    """The classic C{keyrange_read} payload: every range with its tail's console address."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"ranges", amp.Unicode())]


NODE_FIELDS = [
    (b"name", amp.Unicode()),
    (b"host", amp.Unicode()),
    (b"console_port", amp.Integer()),
    (b"amp_port", amp.Integer()),
    # the ring position the ECS chose, 32 hex digits (absent: the MD5 of the console address)
    (b"position", amp.Unicode(optional=True)),
    # the epoch at which the chain of this server's range was formed (absent: 0)
    (b"chain_epoch", amp.Integer(optional=True)),
]


#: The ring on the wire, in C{GetMetadata} answers and the ECS's C{SetMetadata}.
RING_FIELDS = [
    (b"epoch", amp.Integer()),
    (b"replication", amp.Integer()),
    (b"nodes", amp.AmpList(NODE_FIELDS)),
    # failed members still on the ring, skipped in chains (absent: none)
    (b"dead", amp.ListOf(amp.Unicode(), optional=True)),
]


def ring_to_wire(ring: Ring) -> dict[str, Any]:
    return {
        "epoch": ring.epoch,
        "replication": ring.replication,
        "nodes": [_node_to_wire(n) for n in ring.nodes],
        "dead": sorted(ring.dead),
    }


def _node_to_wire(node: NodeInfo) -> dict[str, Any]:
    wire: dict[str, Any] = {"name": node.name, "host": node.host,
                            "console_port": node.console_port, "amp_port": node.amp_port}
    if node.token is not None:
        wire["position"] = render_position(node.token)
    if node.chain_epoch:
        wire["chain_epoch"] = node.chain_epoch
    return wire


def ring_from_wire(wire: dict[str, Any]) -> Ring:
    nodes = tuple(NodeInfo(n["name"], n["host"], n["console_port"], n["amp_port"],
                           token=parse_position(n["position"]) if n.get("position") else None,
                           chain_epoch=n.get("chain_epoch") or 0)
                  for n in wire["nodes"])
    return Ring(nodes, epoch=wire["epoch"], replication=wire["replication"],
                dead=frozenset(wire.get("dead") or ()))


class GetMetadata(_KVCommand):
    """The ring as this server knows it: epoch, chain length and every server's addresses."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = RING_FIELDS


class Stats(_KVCommand):
    """A server's counters and settings, as a JSON object (for humans and monitoring)."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"stats", amp.Unicode())]
