"""The AMP side of a KVServer: one responder per command of L{chainstore.protocol}."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.protocols import amp

from chainstore import control, migration, protocol
from chainstore.bounds import BACKLOG, MAX_CONNECTIONS, BoundedAMP, CappedFactory
from chainstore.roles import ADMIN, CLIENT, SERVER, RoleGuard, allow
from chainstore.logs import get_logger
from chainstore.node import KVNode
from chainstore.peers import no_delay

log = get_logger("chainstore.amp_server")


# The largest box this listener takes. Clients and peer servers share it, so it must admit the
# largest legitimate server-to-server box; a client's is at most a 120,000-byte value, a key and a
# 64-byte request id (about 121 KB). A Relay box holds sections of at most 512 KiB together, or
# one batch of writes cut past 512 KiB (a batch's last write may be a 120,099-byte op;
# chainstore/chain.py BATCH_BYTES) with its section header; a ReceiveRange batch is cut
# once it reaches 512 KiB of keys and values (chainstore/migration.py), so it holds at most
# 524,287 bytes plus one last 120,020-byte pair plus 5 bytes of header for each of at most 1,000
# pairs or deletes (669,307 bytes), or 1,000 (id, key) pairs of 89 bytes. With AMP's framing
# (a few bytes per 65,535-byte chunk) the largest is under 700,000 bytes: 1 MiB leaves room.
SERVER_BOX_BYTES = 1024 * 1024

# The commands held back, and reading paused, while the write backlog is over its bounds. Only
# clients' writes: peers' Relay boxes must always be read, or two heads each waiting for the
# other to acknowledge would never drain (and reads add nothing to the backlog).
BACKLOGGED_COMMANDS = frozenset((protocol.Put.commandName, protocol.Delete.commandName))


class KVServerProtocol(BoundedAMP, RoleGuard):
    """Answers clients' commands from a L{KVNode}; errors cross as the declared AMP errors.

    Clients (and admins) may use the data commands; only servers may replicate, renew a lease
    or copy a range here.
    """

    command_roles = {
        **allow((CLIENT, ADMIN), (protocol.Put, protocol.Get, protocol.Delete, protocol.KeyRange,
                                  protocol.KeyRangeRead, protocol.GetMetadata, protocol.Stats)),
        **allow((SERVER,), (control.ReceiveRange, control.Relay, control.RenewLease,
                            control.ReadVersion)),
    }

    max_box_bytes = SERVER_BOX_BYTES

    def __init__(self, node: KVNode) -> None:
        super().__init__()
        self.node = node
        self.clock = node.clock
        self._gone = False
        # the wait for room of a write held back by the backlog (at most one: reading pauses)
        self._room: Deferred[None] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)

    def connectionLost(self, reason: Any = None) -> None:
        self._gone = True
        if self._room is not None:
            self._room.cancel()  # the held write is dropped: nobody waits for its answer
        super().connectionLost(reason)

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred[Any]:
        if self.node.chain.backlogged and box.get(amp.COMMAND) in BACKLOGGED_COMMANDS:
            return self._hold(box)
        return super().dispatchCommand(box)

    def _hold(self, box: amp.AmpBox) -> Deferred[Any]:
        """Carry out the write C{box} once the backlog has room; read nothing until then."""
        answer: Deferred[Any] = Deferred()
        self._pause(BACKLOG)

        def room(_: None) -> None:
            self._room = None
            if self._gone:
                return
            super(KVServerProtocol, self).dispatchCommand(box).chainDeferred(answer)
            self._resume(BACKLOG)

        self._room = self.node.chain.wait_for_room()
        self._room.addCallbacks(room, lambda f: f.trap(CancelledError))
        return answer

    @protocol.Put.responder
    def put(self, key: bytes, value: bytes,
            request_id: bytes | None = None) -> Deferred[dict[str, Any]]:
        return self.node.put(key, value, request_id or b"").addCallback(
            lambda updated: {"updated": updated})

    @protocol.Get.responder
    def get(self, key: bytes) -> dict[str, Any] | Deferred[dict[str, Any]]:
        value = self.node.get(key)
        if isinstance(value, Deferred):
            return value.addCallback(lambda v: {"value": v})
        return {"value": value}

    @protocol.Delete.responder
    def delete(self, key: bytes, request_id: bytes | None = None) -> Deferred[dict[str, Any]]:
        return self.node.delete(key, request_id or b"").addCallback(lambda _: {})

    @protocol.KeyRange.responder
    def keyrange(self) -> dict[str, Any]:
        return {"ranges": self.node.ring.keyrange_text()}

    @protocol.KeyRangeRead.responder
    def keyrange_read(self) -> dict[str, Any]:
        return {"ranges": self.node.ring.keyrange_read_text()}

    @protocol.GetMetadata.responder
    def get_metadata(self) -> dict[str, Any]:
        return protocol.ring_to_wire(self.node.ring)

    @control.ReceiveRange.responder
    def receive_range(self, epoch: int, store: str, items: bytes,
                      deletes: bytes | None = None, requests: bytes | None = None,
                      image: bytes | None = None) -> Deferred[dict[str, Any]]:
        self._admit_copy(epoch)
        try:
            migration.store_named(self.node.stores, store)
        except ValueError as e:
            raise control.ControlFailed(str(e)) from None  # declared: the sender's mistake
        # Unpack the request ids before writing the batch: ids that do not unpack must not
        # leave a batch written and the request refused.
        adopted = list(control.unpack_items(requests)) if requests else []

        def write() -> dict[str, Any]:
            # Again: while the batch waited for its turn, the ECS may have aborted its attempt
            # and prepared the next (wiping the range), or moved the ring on.
            self._admit_copy(epoch)
            migration.receive_range(migration.store_named(self.node.stores, store), items,
                                    deletes, image)
            self.node.chain.adopt_requests(adopted)
            return {}

        return self.node.copy_batches.submit(
            write, len(items) + len(deletes or b"") + len(image or b""))

    def _admit_copy(self, epoch: int) -> None:
        """Refuse a copy's batch of C{epoch} that must not be written (now)."""
        # Copies are made for a configuration the ECS is preparing, always newer than ours; an
        # older one is a leftover of an aborted attempt and must not overwrite anything.
        if epoch <= self.node.ring.epoch:
            raise control.StaleEpoch(
                f"copy for epoch {epoch}, but this server is at {self.node.ring.epoch}")
        # And only of the attempt the ECS last prepared this target for (wiping the range
        # first): a late batch of an aborted attempt would bring back stale or deleted keys.
        prepared = self.node.copy_attempt
        if prepared is not None and epoch != prepared:
            raise control.StaleEpoch(
                f"copy of attempt {epoch}, but this server was prepared for attempt {prepared}")
        if self.node.stores is None or self.node.failure is not None:
            raise control.ControlFailed(self.node.failure or "the stores are not open")

    @control.Relay.responder
    def relay(self, epoch: int, data: bytes) -> None:
        if self.node.stores is None:
            raise control.ControlFailed("the stores are not open")
        self.node.chain.relayed(epoch, data, self.node.metrics.batch_applied)

    def _wrapWithSerialization(self, responder: Any, command: type[amp.Command]) -> Any:
        # Relay's box is read directly (control.read_relay), not by AMP's generic argument
        # machinery: it carries every write of the chain.
        if command is control.Relay:
            return lambda box: self._relayed(responder, box)
        return super()._wrapWithSerialization(responder, command)

    def _relayed(self, responder: Any, box: amp.AmpBox) -> amp.AmpBox:
        try:
            responder(*control.read_relay(box))
        except control.ControlFailed as e:
            if amp.ASK in box:  # (asked for an answer, as no server does: it gets one)
                raise amp.RemoteAmpError(control.Relay.allErrors[control.ControlFailed],
                                         str(e)) from None
            # Nothing is answered, so the peer learns by its connection closing, and resends
            # what it sent on it (chainstore/chain.py).
            log.warn("closing the link of {peer}: {error}", peer=self.describe_peer(), error=e)
            self.transport.loseConnection()
        return amp.AmpBox()

    @control.RenewLease.responder
    def renew_lease(self, epoch: int, owner: str, upstream: bool | None = None) -> dict[str, Any]:
        return {"seconds": self.node.chain.grant_lease(epoch, owner, bool(upstream))}

    @control.ReadVersion.responder
    def read_version(self, epoch: int, owner: str, key: bytes, newest: int,
                     held: int) -> dict[str, Any] | Deferred[dict[str, Any]]:
        return self.node.read_version(epoch, owner, key, newest, held)

    @protocol.Stats.responder
    def stats(self) -> dict[str, Any]:
        return {"stats": json.dumps(self.node.stats(), sort_keys=True)}


class KVServerFactory(CappedFactory):
    def __init__(self, node: KVNode, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(max_connections)
        self.node = node

    def build_protocol(self, addr: Any) -> KVServerProtocol:
        return KVServerProtocol(self.node)
