"""A server's ECS link with several ECS: it follows the leader a standby names, hangs up on a
silent one, and refuses an ECS whose epoch is behind the newest it has seen (over iosim)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim

from chainstore import control
from chainstore.ecs_link import LEADER_SILENCE, LeaderEndpoints, ServerControlProtocol
from tests.test_ecs_link import ME, make_node, ring


class ECSPeer(amp.AMP):
    """An ECS that answers Register as told: with its epoch, or as a standby."""

    def __init__(self, ecs_epoch: int | None = None, leader: str | None = None) -> None:
        super().__init__()
        self.ecs_epoch = ecs_epoch
        self.leader = leader
        self.lost = False

    @control.Register.responder
    def register(self, **kwargs: Any) -> dict[str, Any]:
        if self.leader is not None:
            raise control.NotLeader(f"not the leader; the leader is {self.leader}")
        answer: dict[str, Any] = {"message": "in the ring"}
        if self.ecs_epoch is not None:
            answer["ecs_epoch"] = self.ecs_epoch
        return answer

    def connectionLost(self, reason: Any) -> None:
        self.lost = True
        super().connectionLost(reason)


class Endpoint:
    def __init__(self) -> None:
        self.dialled = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.dialled += 1
        return succeed(None)


class Server:
    def __init__(self, tmp_path: Any, ecs: ECSPeer, epoch: int = 0,
                 endpoints: LeaderEndpoints | None = None) -> None:
        self.clock = Clock()
        self.node = make_node(tmp_path, self.clock, ME)
        if epoch:
            self.node.set_ring(ring(ME, epoch=epoch))
        self.ecs = ecs
        self.proto = ServerControlProtocol(self.node, self.clock, lambda: None,
                                           endpoints=endpoints)
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: self.ecs, lambda: self.proto, greet=False, clock=self.clock)
        self.pump.flush()

    def call(self, command: Any, **kwargs: Any) -> Any:
        out: list[Any] = []
        self.ecs.callRemote(command, **kwargs).addBoth(out.append)
        self.pump.flush()
        assert out, f"{command.__name__} was never answered"
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    def close(self) -> None:
        self.node.stores.close()


def two_endpoints() -> tuple[LeaderEndpoints, list[Endpoint]]:
    raw = [Endpoint(), Endpoint()]
    return LeaderEndpoints(raw, ["127.0.0.1:49999", "127.0.0.1:49998"]), raw


def test_an_ecs_behind_the_servers_epoch_is_hung_up_on_at_registration(tmp_path):
    server = Server(tmp_path, ECSPeer(ecs_epoch=4), epoch=6)
    assert server.ecs.lost
    server.close()


def test_an_ecs_at_or_past_the_servers_epoch_keeps_the_link(tmp_path):
    server = Server(tmp_path, ECSPeer(ecs_epoch=6), epoch=6)
    assert not server.ecs.lost and server.proto.ecs_epoch == 6
    server.close()


def test_a_deposed_ecs_is_refused_every_control_command(tmp_path):
    # Registered at epoch 6; a newer leader's ring (epoch 9) reached the server since.
    server = Server(tmp_path, ECSPeer(ecs_epoch=6), epoch=6)
    server.call(control.Heartbeat, epoch=6)
    server.call(control.LockRanges, ranges=[{"start": 0, "end": 5}], reads=False)
    server.node.set_ring(ring(ME, epoch=9))
    with pytest.raises(control.StaleEpoch, match="not the leader any more"):
        server.call(control.Heartbeat, epoch=6)
    for command, kwargs in ((control.LockRanges, {"ranges": [{"start": 0, "end": 5}],
                                                  "reads": False}),
                            (control.SetState, {"state": "running"}),
                            (control.ClearStores, {}),
                            (control.Shutdown, {})):
        with pytest.raises(control.StaleEpoch, match="not the leader any more"):
            server.call(command, **kwargs)
    assert server.node.state != "running" and not server.node.write_locks
    # the refusal is the declared StaleEpoch, so the link itself survives
    assert not server.ecs.lost
    server.close()


def test_a_heartbeat_or_ring_at_the_newest_epoch_is_obeyed(tmp_path):
    server = Server(tmp_path, ECSPeer(), epoch=3)
    server.call(control.Heartbeat, epoch=3)
    server.call(control.SetState, state="running")
    assert server.node.state == "running"
    server.close()


def test_a_standby_names_the_leader_which_is_dialled_next(tmp_path):
    endpoints, raw = two_endpoints()
    server = Server(tmp_path, ECSPeer(leader="127.0.0.1:49998"), endpoints=endpoints)
    assert server.ecs.lost
    endpoints.connect(None)
    assert raw[1].dialled == 1 and raw[0].dialled == 0
    server.close()


def test_endpoints_are_dialled_in_turn():
    endpoints, raw = two_endpoints()
    for _ in range(3):
        endpoints.connect(None)
    assert [e.dialled for e in raw] == [2, 1]
    endpoints.follow("10.0.0.1:1")  # not one of ours: ignored
    endpoints.connect(None)
    assert [e.dialled for e in raw] == [2, 2]


def test_a_silent_leader_is_hung_up_on_when_there_are_others(tmp_path):
    endpoints, _ = two_endpoints()
    server = Server(tmp_path, ECSPeer(ecs_epoch=0), endpoints=endpoints)
    for _ in range(5):
        server.clock.advance(LEADER_SILENCE - 1)
        server.call(control.Heartbeat, epoch=0)
    assert not server.ecs.lost
    server.clock.advance(LEADER_SILENCE)
    server.pump.flush()
    assert server.ecs.lost
    server.close()


def test_a_single_ecs_is_never_hung_up_on_for_silence(tmp_path):
    # one ECS (today's setup): a paused ECS keeps its link, as before
    endpoints = LeaderEndpoints([Endpoint()], ["127.0.0.1:49999"])
    server = Server(tmp_path, ECSPeer(ecs_epoch=0), endpoints=endpoints)
    server.clock.advance(10 * LEADER_SILENCE)
    server.pump.flush()
    assert not server.ecs.lost
    server.close()
