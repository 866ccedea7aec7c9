"""Several ECS, one leader, state in etcd: the election, the fenced commit of a deposed leader and
epochs across leaders, with a Clock and an in-memory etcd (L{tests.fake_etcd})."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from chainstore import control
from ecs.config import ECSConfig
from ecs.coordinator import ECS
from ecs.election import DEPOSE_MARGIN, Election
from ecs.etcd import EtcdClient, EtcdError, EtcdUnavailable, unb64
from ecs.etcd_state import Deposed, EtcdState, leader_key, leader_record, state_key
from ecs.leadership import Leadership
from ecs.server import ECSProtocol
from ecs.state import ACTIVE, ClusterState, Member
from tests.fake_etcd import FakeEtcd

PREFIX = "/test"
TTL = 2
STEP = 0.05


# Every coordinator a test here makes (itself or through a Leadership) is stopped when the test
# ends: work it left under way would otherwise be ended by the garbage collector, in a later test.
_made: list[ECS] = []


def made(ecs: ECS) -> ECS:
    _made.append(ecs)
    return ecs


@pytest.fixture(autouse=True)
def stop_coordinators() -> Any:
    yield
    while _made:
        _made.pop().stop()


def result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (its failure raised)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class Candidate:
    """One ECS process's election (no coordinator), recording when it led."""

    def __init__(self, etcd: FakeEtcd, name: str, watch: bool = True) -> None:
        self.transport = etcd.client()
        # watch: the leader key is watched, as ecs.tap's clients do (else it is polled)
        self.client = EtcdClient(["http://etcd:2379"], self.transport.post,
                                 self.transport.stream if watch else None)
        self.elected: list[float] = []
        self.deposed: list[float] = []
        self.election = Election(self.client, etcd.clock, PREFIX,
                                 leader_record(name, f"tcp:127.0.0.1:{name}", f"127.0.0.1:{name}"),
                                 TTL, self._elected, self._deposed)
        self.clock = etcd.clock
        self.dead = False

    def _elected(self, lease: int) -> None:
        self.elected.append(self.clock.seconds())

    def _deposed(self) -> None:
        self.deposed.append(self.clock.seconds())

    def kill(self) -> None:
        """SIGKILL: nothing more is sent; the lease runs out at etcd."""
        self.dead = True
        self.election._loop.stop()
        if self.election._deadline is not None and self.election._deadline.active():
            self.election._deadline.cancel()


def run(clock: Clock, seconds: float, candidates: list[Candidate]) -> None:
    """Advance in small steps, checking that at most one candidate believes it leads."""
    for _ in range(int(seconds / STEP)):
        clock.advance(STEP)
        leading = [c for c in candidates if c.election.leading and not c.dead]
        assert len(leading) <= 1, "two ECS lead at once"


def test_one_leader_and_standbys_that_know_it() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    a, b, c = (Candidate(etcd, n) for n in ("1", "2", "3"))
    for x in (a, b, c):
        x.election.start()
    run(clock, 3, [a, b, c])
    assert a.election.leading and a.elected == [0]
    assert not b.election.leading and not c.election.leading
    assert b.election.leader == {"name": "1", "advertise": "tcp:127.0.0.1:1",
                                 "admin": "127.0.0.1:1"}
    # the leader renews its lease: still leading long after the TTL
    run(clock, 10, [a, b, c])
    assert a.election.leading and not a.deposed


def started_pair(clock: Clock, etcd: FakeEtcd, *, stagger: float = 0.0,
                 seconds: float = 1.0) -> tuple[Candidate, Candidate]:
    """Candidates "1" and "2" started in that order, C{stagger} apart, then run for C{seconds}."""
    a, b = Candidate(etcd, "1"), Candidate(etcd, "2")
    a.election.start()
    if stagger:
        clock.advance(stagger)
    b.election.start()
    run(clock, seconds, [a, b])
    return a, b


def test_a_killed_leader_is_replaced_within_ttl_and_a_tick() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    a, b = started_pair(clock, etcd, stagger=0.01, seconds=2)
    killed_at = clock.seconds()
    a.kill()
    run(clock, TTL + 2, [a, b])
    assert b.election.leading
    # the lease was last renewed at most one interval before the kill
    assert b.elected[0] - killed_at <= TTL + b.election.interval + STEP
    assert b.election.leader["name"] == "2"


def test_a_leader_cut_from_etcd_stands_down_before_another_is_elected() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    a, b = started_pair(clock, etcd, seconds=2)
    assert a.election.leading
    a.transport.reachable = False
    run(clock, TTL + 2, [a, b])  # run() checks there is never a second leader meanwhile
    assert a.deposed and b.elected
    assert a.deposed[0] <= b.elected[0]
    assert a.deposed[0] - 2 <= TTL, "it stood down within a TTL of losing etcd"


def test_a_hung_etcd_request_does_not_keep_a_leader_leading() -> None:
    # Its renewal never returns: the deadline timer stands it down anyway, by the lease's end.
    clock = Clock()
    etcd = FakeEtcd(clock)
    a = Candidate(etcd, "1")
    a.election.start()
    run(clock, 1, [a])
    hung_at = clock.seconds()
    a.transport.hang = True
    run(clock, TTL + 1, [a])
    # its last confirmed renewal was sent before the hang
    assert a.deposed and a.deposed[0] <= hung_at + TTL - DEPOSE_MARGIN + STEP


def test_stop_revokes_the_lease_so_a_standby_takes_over_at_once() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    a, b = started_pair(clock, etcd, seconds=1)
    stopped_at = clock.seconds()
    result(Deferred.fromCoroutine(a.election.stop()))
    run(clock, 1, [a, b])
    assert b.elected and b.elected[0] - stopped_at <= b.election.interval + STEP


def takeover_delay(watch: bool) -> float:
    """Seconds from the dead leader's lease running out at etcd to a standby leading."""
    clock = Clock()
    etcd = FakeEtcd(clock)
    a, b, c = Candidate(etcd, "1", watch), Candidate(etcd, "2", watch), Candidate(etcd, "3", watch)
    a.election.start()
    clock.advance(0.01)
    # the standbys' ticks fall half-way between the leader's (so its lease's end)
    clock.advance(0.25)
    b.election.start()
    c.election.start()
    run(clock, 2, [a, b, c])
    expires = etcd.leases[a.election.lease][1]
    a.kill()
    run(clock, TTL + 2, [a, b, c])
    elected = b.elected + c.elected
    assert len(elected) == 1
    new = b if b.elected else c
    other = c if new is b else b
    # the other standby knows the new leader (from the watch, or its next campaign)
    assert other.election.leader is not None
    assert other.election.leader["name"] == new.election.leader["name"]
    return elected[0] - expires


def test_a_watching_standby_campaigns_as_soon_as_the_leader_key_is_deleted() -> None:
    assert takeover_delay(watch=True) <= STEP + 1e-6
    # polling, the standbys learn of it only at their next tick
    assert takeover_delay(watch=False) > 0.2


def test_a_watching_standby_campaigns_only_as_a_safety_net() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    a, b = started_pair(clock, etcd, seconds=1)
    before = len(campaigns(etcd))
    run(clock, 10, [a, b])
    # one every TTL, where polling takes one every TTL/4 (20 in 10 s)
    assert len(campaigns(etcd)) - before <= 10 / b.election.safety + 1
    assert a.election.leading


def campaigns(etcd: FakeEtcd) -> list[Any]:
    """The transactions that tried to create the leader key."""
    key = leader_key(PREFIX)
    return [body for path, body in etcd.requests if path == "/v3/kv/txn" and any(
        c["target"] == "CREATE" and unb64(c["key"]) == key for c in body.get("compare", []))]


def test_a_broken_watch_is_opened_again_after_a_back_off() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    a, b = started_pair(clock, etcd, stagger=0.25, seconds=1)
    assert len(etcd.watches) == 1
    for _ in range(3):  # back-off 0.1, 0.2, 0.4 s
        etcd.drop_watches()
        assert not etcd.watches
        run(clock, 0.5, [a, b])
        assert len(etcd.watches) == 1, "watching again"
    expires = etcd.leases[a.election.lease][1]
    a.kill()
    run(clock, TTL + 1, [a, b])
    assert b.elected and b.elected[0] - expires <= STEP + 1e-6


def test_a_silent_watch_still_takes_over_by_the_safety_campaign() -> None:
    # Its etcd member is cut off from the others and keeps the stream open, silent.
    clock = Clock()
    etcd = FakeEtcd(clock)
    a, b = Candidate(etcd, "1"), Candidate(etcd, "2")
    b.transport.watch_silent = True
    a.election.start()
    clock.advance(0.25)
    b.election.start()
    run(clock, 2, [a, b])
    expires = etcd.leases[a.election.lease][1]
    a.kill()
    run(clock, TTL + b.election.safety + 1, [a, b])
    assert b.elected and b.elected[0] - expires <= b.election.safety + STEP


# -- the fenced commit ----------------------------------------------------------------------------

def elected_leader() -> tuple[Clock, FakeEtcd, Candidate, EtcdState]:
    """A clock, an etcd, the ECS elected on it and its state store, read."""
    clock = Clock()
    etcd = FakeEtcd(clock)
    a = Candidate(etcd, "1")
    a.election.start()
    run(clock, 1, [a])
    store = EtcdState(a.client, PREFIX, a.election.lease)
    result(Deferred.fromCoroutine(store.fetch()))
    return clock, etcd, a, store


def saved_state(etcd: FakeEtcd) -> dict[str, Any]:
    return json.loads(etcd.kvs[state_key(PREFIX)]["value"])


def test_a_deposed_leader_never_commits() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    a, b = Candidate(etcd, "1"), Candidate(etcd, "2")
    a.election.start()
    run(clock, 1, [a])
    store_a = EtcdState(a.client, PREFIX, a.election.lease)
    assert result(Deferred.fromCoroutine(store_a.fetch())) is None
    result(store_a.save(ClusterState(epoch=3, last_epoch=3)))
    assert saved_state(etcd)["epoch"] == 3
    # A pauses (SIGSTOP) past its lease: it still believes it leads; B is elected and saves.
    a.kill()
    b.election.start()
    run(clock, TTL + 1, [b])
    assert b.election.leading
    store_b = EtcdState(b.client, PREFIX, b.election.lease)
    assert result(Deferred.fromCoroutine(store_b.fetch())).epoch == 3
    result(store_b.save(ClusterState(epoch=4, last_epoch=4)))
    # A wakes and saves what it was doing: refused, and every later save too.
    deposed: list[bool] = []
    store_a.on_deposed = lambda: deposed.append(True)
    with pytest.raises(Deposed):
        result(store_a.save(ClusterState(epoch=4, last_epoch=4, serving=True)))
    with pytest.raises(Deposed):
        result(store_a.save(ClusterState(epoch=5, last_epoch=5)))
    assert deposed == [True]
    assert saved_state(etcd)["epoch"] == 4 and saved_state(etcd)["serving"] is False
    # B goes on committing.
    result(store_b.save(ClusterState(epoch=5, last_epoch=5)))
    assert saved_state(etcd)["epoch"] == 5


def test_a_leader_whose_lease_ran_out_cannot_commit_even_with_no_successor() -> None:
    clock, etcd, a, store = elected_leader()
    a.kill()
    clock.advance(TTL + 1)
    with pytest.raises(Deposed):
        result(store.save(ClusterState(epoch=1, last_epoch=1)))
    assert leader_key(PREFIX) not in etcd.kvs and state_key(PREFIX) not in etcd.kvs


def test_a_state_written_behind_the_leaders_back_deposes_it() -> None:
    # The state key's revision is compared too: a write this ECS did not make means it is
    # not alone, and it stands down rather than overwrite it.
    clock, etcd, a, store = elected_leader()
    result(store.save(ClusterState(epoch=1, last_epoch=1)))
    etcd.handle("/v3/kv/txn", {"compare": [], "success": [{"request_put": {
        "key": "L3Rlc3Qvc3RhdGU=", "value": "e30="}}]})
    with pytest.raises(Deposed):
        result(store.save(ClusterState(epoch=2, last_epoch=2)))


def test_saves_are_committed_in_the_order_they_were_made() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    a = Candidate(etcd, "1")
    a.election.start()
    run(clock, 1, [a])
    gate: Deferred[None] = Deferred()
    real_post = a.transport.post
    posts: list[int] = []  # the epoch each transaction commits, as sent

    def slow_post(url: str, body: dict[str, Any]) -> Deferred[Any]:
        if url.endswith("/txn"):
            posts.append(json.loads(unb64(body["success"][0]["request_put"]["value"]))["epoch"])
            return gate.addCallback(lambda _: real_post(url, body)) if len(posts) == 1 \
                else real_post(url, body)
        return real_post(url, body)

    client = EtcdClient(["http://etcd:2379"], slow_post)
    store = EtcdState(client, PREFIX, a.election.lease)
    result(Deferred.fromCoroutine(store.fetch()))
    state = ClusterState(epoch=1, last_epoch=1)
    first = store.save(state)
    state.epoch = state.last_epoch = 2
    second = store.save(state)
    # the second waits for the first: one transaction in flight, each a snapshot of its call
    assert posts == [1]
    gate.callback(None)
    result(first)
    result(second)
    assert posts == [1, 2] and saved_state(etcd)["epoch"] == 2


def test_etcd_unreachable_fails_the_save_without_deposing() -> None:
    clock, etcd, a, store = elected_leader()
    a.transport.reachable = False
    with pytest.raises(EtcdUnavailable):
        result(store.save(ClusterState(epoch=1, last_epoch=1)))
    a.transport.reachable = True
    result(store.save(ClusterState(epoch=1, last_epoch=1)))
    assert saved_state(etcd)["epoch"] == 1


# -- leaders, epochs and standbys -----------------------------------------------------------------

class NoLaunch:
    def launch(self, *args: Any) -> None:
        raise AssertionError("nothing is launched here")

    def stop(self, name: str) -> Deferred[None]:
        return succeed(None)

    def stop_all(self) -> Deferred[None]:
        return succeed(None)


class SilentLink:
    transport = None

    def callRemote(self, command: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred()


def seed(etcd: FakeEtcd) -> None:
    """A saved cluster of three operator-started servers at epoch 5 (epoch 7 burned)."""
    state = ClusterState(epoch=5, last_epoch=7, replication=3, serving=True,
                         ring_members=["a", "b", "c"])
    for i, name in enumerate("abc"):
        state.members[name] = Member(name, "127.0.0.1", 6001 + i, 7001 + i, ACTIVE)
    etcd.kvs[state_key(PREFIX)] = {"value": json.dumps(state.to_json()).encode(), "lease": 0,
                                   "create_revision": 1, "mod_revision": 1}


def ha_ecs(etcd: FakeEtcd, port: int) -> Leadership:
    config = ECSConfig(initial_nodes=0, launcher="none", tls="off", state="etcd",
                       etcd_endpoints=("http://etcd:2379",), advertise=f"tcp:127.0.0.1:{port}",
                       register_timeout=5.0).validated()
    client = EtcdClient(list(config.etcd_endpoints), etcd.client().post)
    return Leadership(client, etcd.clock, PREFIX, f"ecs{port}", config.advertise, TTL,
                      lambda store: made(ECS(config, etcd.clock, NoLaunch(), store,
                                             takeover=True)))  # as ecs.tap makes them


def test_each_new_leader_resumes_the_ring_under_a_strictly_greater_epoch() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    seed(etcd)
    first, second, third = ha_ecs(etcd, 1), ha_ecs(etcd, 2), ha_ecs(etcd, 3)
    for leader in (first, second, third):
        leader.startService()
    clock.advance(1)
    assert first.ecs is not None and second.ecs is None and third.ecs is None
    # resumed above every epoch the saved state allocated, burned ones included
    assert first.ecs.state.epoch == 8 and saved_state(etcd)["epoch"] == 8
    assert first.ecs.state.ring_members == ["a", "b", "c"]
    epochs = [8]
    for old, new in ((first, second), (second, third)):
        stale = old.ecs
        old.election._loop.stop()  # SIGSTOP: the old leader sends nothing more
        old.election._deadline.cancel()
        for _ in range(int((TTL + 2) / STEP)):
            clock.advance(STEP)
        successor = new if new.ecs is not None else None
        assert successor is not None, "a standby took over"
        epochs.append(successor.ecs.state.epoch)
        assert saved_state(etcd)["epoch"] == epochs[-1]
        # The stale leader wakes and tries to mark a server dead: refused, nothing committed.
        with pytest.raises(Deposed):
            stale.state.epoch = stale.state.allocate_epoch()
            result(stale._save())
        assert saved_state(etcd)["epoch"] == epochs[-1]
        # heartbeats carry only what was committed
        assert stale.committed_epoch < successor.ecs.committed_epoch
    assert epochs == sorted(set(epochs)) and len(epochs) == 3


def test_a_standby_names_the_leader_to_servers_and_admins() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    leader, standby = ha_ecs(etcd, 49999), ha_ecs(etcd, 49998)
    leader.startService()
    clock.advance(0.5)
    standby.startService()
    clock.advance(1)
    assert leader.ecs is not None and standby.ecs is None
    proto = ECSProtocol(standby)
    with pytest.raises(control.NotLeader, match="the leader is 127.0.0.1:49999$"):
        proto.register("s1", "127.0.0.1", 6001, 7001, 0)
    with pytest.raises(control.NotLeader, match="the leader is 127.0.0.1:49999$"):
        proto.status()
    with pytest.raises(control.NotLeader):
        proto.start()
    # the leader answers, and says it leads
    status = json.loads(ECSProtocol(leader).status()["status"])
    assert status["leader"] == {"name": "ecs49999", "address": "127.0.0.1:49999"}
    assert status["standbys"] == [{"name": "ecs49998", "address": "127.0.0.1:49998"}]
    # a standby that dies leaves the list once its lease runs out
    standby.election._loop.stop()
    for _ in range(int((TTL + 1) / STEP)):
        clock.advance(STEP)
    assert json.loads(ECSProtocol(leader).status()["status"])["standbys"] == []


def test_a_deposed_leader_abdicates_its_server_links() -> None:
    clock = Clock()
    etcd = FakeEtcd(clock)
    leader = ha_ecs(etcd, 1)
    leader.startService()
    clock.advance(1)
    ecs = leader.ecs
    assert ecs is not None

    class Transport:
        closed = False

        def loseConnection(self) -> None:
            self.closed = True

    link = SilentLink()
    link.transport = Transport()  # type: ignore[assignment]
    result(ecs.register(link, "s1", "127.0.0.1", 6001, 7001, 0))
    assert "s1" in ecs.links
    leader.election.depose("test")
    assert leader.ecs is None and not ecs.heartbeats.running
    assert link.transport.closed and not ecs.links
    with pytest.raises(control.NotLeader):
        leader.current()
    # its lease is revoked: whatever it was doing fails at its next save
    with pytest.raises(Deposed):
        result(ecs._save())


def test_ecsclient_follows_a_standby_to_the_leader_and_past_a_dead_ecs() -> None:
    from twisted.internet.error import ConnectionRefusedError
    from twisted.internet.defer import fail
    from twisted.test import iosim

    from ecs.shell import AdminLink, ShellError
    from ecs.shell_commands import Command
    from ecs.shell_format import format_status

    clock = Clock()
    etcd = FakeEtcd(clock)
    ecs1, ecs2 = ha_ecs(etcd, 49999), ha_ecs(etcd, 49998)
    ecs2.startService()  # 49998 leads, 49999 stands by, nothing listens on 49997
    clock.advance(0.5)
    ecs1.startService()
    clock.advance(1)
    by_port = {49999: ecs1, 49998: ecs2}
    pumps: list[Any] = []
    dialled: list[int] = []

    def connect(client: Any) -> Deferred[Any]:
        dialled.append(link.port)
        if link.port not in by_port:
            return fail(ConnectionRefusedError("nothing listens"))
        server = ECSProtocol(by_port[link.port])
        pumps.append(iosim.connect(server, iosim.makeFakeServer(server), client,
                                   iosim.makeFakeClient(client), greet=False, clock=clock))
        return succeed(client)

    link = AdminLink(clock, "127.0.0.1", 49997, timeout=5.0, connect=connect,
                     others=[("127.0.0.1", 49999), ("127.0.0.1", 49998)])
    out: list[Any] = []
    Deferred.fromCoroutine(link.run(Command("status"))).addBoth(out.append)
    for _ in range(5):
        for pump in pumps:
            pump.flush()
    status = json.loads(out[0]["status"])
    # refused at 49997, a standby at 49999 named 49998, which answered
    assert dialled == [49997, 49999, 49998]
    assert status["leader"]["address"] == "127.0.0.1:49998"
    assert format_status(status).splitlines()[1] == (
        "leader: ecs49998 (127.0.0.1:49998); standbys: ecs49999 (127.0.0.1:49999)")
    # given only the standby, it follows the leader the standby names
    dialled.clear()
    link = AdminLink(clock, "127.0.0.1", 49999, timeout=5.0, connect=connect)
    out.clear()
    Deferred.fromCoroutine(link.run(Command("status"))).addBoth(out.append)
    for _ in range(5):
        for pump in pumps:
            pump.flush()
    assert dialled == [49999, 49998]
    assert json.loads(out[0]["status"])["leader"]["address"] == "127.0.0.1:49998"
    # nobody leads (the leader's lease ran out, the standby is cut from etcd): a clear error
    ecs2.election._loop.stop()
    ecs2.election.depose("test")
    ecs1.election._loop.stop()
    out.clear()
    Deferred.fromCoroutine(link.run(Command("status"))).addBoth(out.append)
    for _ in range(5):
        for pump in pumps:
            pump.flush()
    out[0].trap(ShellError)
    assert str(out[0].value) == ("the ECS at 127.0.0.1:49998 is not the leader; no leader is "
                                 "elected yet")


# -- a change the deposed leader left half done ---------------------------------------------------

class EtcdCluster:
    """L{tests.test_ecs_coordinator.Cluster} whose ECS keep their state in a fake etcd, each
    under a lease it renews until it is "paused"."""

    def __init__(self, tmp_path: Any) -> None:
        from twisted.internet.task import LoopingCall

        from tests.test_ecs_coordinator import Cluster

        self.LoopingCall = LoopingCall
        self.etcd: FakeEtcd | None = None
        self.renewals: dict[int, Any] = {}
        cluster = self

        class Backed(Cluster):
            def new_ecs(self) -> ECS:
                return cluster.leader(self)

        self.c = Backed(tmp_path, replication=3, initial=3)

    def leader(self, c: Any) -> ECS:
        """A new ECS elected: it holds the leader key under a fresh lease it renews."""
        if self.etcd is None:
            self.etcd = FakeEtcd(c.clock)
        client = EtcdClient(["http://etcd:2379"], self.etcd.client().post)
        lease = result(Deferred.fromCoroutine(client.grant(TTL)))
        from ecs.etcd import absent, put

        won, _ = result(Deferred.fromCoroutine(client.txn(
            [absent(leader_key(PREFIX))], [put(leader_key(PREFIX), b"{}", lease)])))
        assert won, "the previous leader's key is still there"
        renew = self.LoopingCall(lambda: Deferred.fromCoroutine(client.keep_alive(lease)))
        renew.clock = c.clock
        renew.start(0.5)
        store = EtcdState(client, PREFIX, lease)
        result(Deferred.fromCoroutine(store.fetch()))
        ecs = c.own(ECS(c.config, c.clock, c.launcher, store))
        store.on_deposed = ecs.abdicate
        self.renewals[id(ecs)] = renew
        return ecs

    def pause(self, ecs: ECS) -> None:
        """SIGSTOP: it renews nothing (and, in this test, does nothing) until resumed."""
        self.renewals[id(ecs)].stop()


def test_a_deposed_leaders_half_done_change_never_commits_and_the_next_leader_goes_on(
        tmp_path: Any) -> None:
    from tests.test_ecs_coordinator import KEYS

    h = EtcdCluster(tmp_path)
    c = h.c
    try:
        c.start()
        c.put_all(KEYS)
        old = c.ecs
        committed = saved_state(h.etcd)["epoch"]
        # addNode runs up to its copy to the new server, which stalls there
        c.peer_gate = Deferred()
        outcome: list[Any] = []
        Deferred.fromCoroutine(old.add_nodes(1, "LRU", 10)).addBoth(outcome.append)
        c.settle()
        assert old.operation is not None and old.operation.step == "copying"
        attempt = old.state.last_epoch
        assert saved_state(h.etcd)["last_epoch"] == attempt  # allocated and saved first
        # The leader pauses past its lease; another ECS is elected (no server reaches it yet).
        h.pause(old)
        c.clock.advance(TTL + 0.5)
        new = h.leader(c)
        # The old leader wakes: its change goes on through the locks to its commit, refused.
        gate, c.peer_gate = c.peer_gate, None
        gate.callback(None)
        c.settle()
        assert len(outcome) == 1 and outcome[0].check(Deposed)
        assert saved_state(h.etcd)["epoch"] == committed
        assert "s4" not in saved_state(h.etcd)["ring_members"]
        for name in ("s1", "s2", "s3"):
            node = c.servers[name].node
            # No server saw the attempt's ring. The abdication dropped its links, but not the
            # locks it set through them: only the next leader knows the change is void.
            assert node.ring.epoch == committed
            assert node.write_locks and node.orphaned_locks
        assert not old.links and not old.heartbeats.running
        # The servers find the new leader, which resumes above the aborted attempt's epoch.
        c.ecs = new
        new.start()
        for server in c.servers.values():
            c.connect_to_ecs(server)
        c.settle()
        assert new.state.epoch > attempt
        assert all(c.servers[n].node.ring.epoch == new.state.epoch for n in ("s1", "s2", "s3"))
        assert not any(c.servers[n].node.write_locks or c.servers[n].node.read_locks
                       for n in ("s1", "s2", "s3"))
        assert new.state.ring_members == ["s1", "s2", "s3"]
        # and completes the change cleanly: the half-copied s4 is wiped and added anew
        assert c.run(new.add_nodes(1, "LRU", 10)) == ["s4"]
        c.check_placement(KEYS)
        assert saved_state(h.etcd)["epoch"] == new.state.epoch
    finally:
        for renew in h.renewals.values():
            if renew.running:
                renew.stop()
        c.close()


def test_a_new_leader_gives_its_servers_failure_timeout_to_come_back() -> None:
    # They are running (only the ECS changed): one that does not redial within failure-timeout
    # of the takeover died too, and is skipped then, not after register-timeout.
    clock = Clock()
    etcd = FakeEtcd(clock)
    seed(etcd)
    leader = ha_ecs(etcd, 1)
    leader.startService()
    clock.advance(0.01)
    ecs = leader.ecs
    assert ecs is not None
    took_over = clock.seconds()
    result(ecs.register(SilentLink(), "b", "127.0.0.1", 6002, 7002, 0))
    result(ecs.register(SilentLink(), "c", "127.0.0.1", 6003, 7003, 0))
    while clock.seconds() < took_over + ecs.config.failure_timeout - 0.1:
        clock.advance(STEP)
    assert not ecs.state.dead
    for _ in range(int((2 * ecs.config.heartbeat_interval + 0.2) / STEP)):
        clock.advance(STEP)
    assert "a" in ecs.state.dead


class RecordingLauncher(NoLaunch):
    def __init__(self) -> None:
        self.launched: list[str] = []

    def launch(self, slot: Any, cache_strategy: str, cache_size: int) -> None:
        self.launched.append(slot.name)


def pool_leader(dial: Any = None) -> tuple[Clock, RecordingLauncher, ECS]:
    """A clock, a launcher and the coordinator of a leader just elected over a saved ring of
    three pool servers (server1-3 of the default pool), probing them with C{dial} if given."""
    clock = Clock()
    etcd = FakeEtcd(clock)
    launcher = RecordingLauncher()
    state = ClusterState(epoch=5, last_epoch=5, replication=3, serving=True,
                         ring_members=["server1", "server2", "server3"])
    for i, name in enumerate(state.ring_members, 1):
        state.members[name] = Member(name, "127.0.0.1", 50000 + i, 51000 + i, ACTIVE, "pool")
    etcd.kvs[state_key(PREFIX)] = {"value": json.dumps(state.to_json()).encode(), "lease": 0,
                                   "create_revision": 1, "mod_revision": 1}
    config = ECSConfig(initial_nodes=0, launcher="none", tls="off", state="etcd",
                       etcd_endpoints=("http://etcd:2379",), advertise="tcp:127.0.0.1:1",
                       register_timeout=20.0).validated()
    client = EtcdClient(list(config.etcd_endpoints), etcd.client().post)
    leader = Leadership(client, etcd.clock, PREFIX, "ecs1", config.advertise, TTL,
                        lambda store: made(ECS(config, etcd.clock, launcher, store,
                                               takeover=True, dial=dial)))
    leader.startService()
    clock.advance(0.01)
    assert leader.ecs is not None
    return clock, launcher, leader.ecs


def test_a_new_leader_relaunches_its_pool_servers_only_when_none_came_back() -> None:
    # Every process was down (make run-ha started again): nobody registers within
    # failure-timeout, so the leader relaunches them and gives them register-timeout.
    clock, launcher, ecs = pool_leader()
    for _ in range(int((ecs.config.failure_timeout + 0.5) / STEP)):
        clock.advance(STEP)
    assert sorted(launcher.launched) == ["server1", "server2", "server3"]
    for _ in range(int(10 / STEP)):
        clock.advance(STEP)
    assert not ecs.state.dead, "relaunched servers have register-timeout to come up"


def test_a_new_leader_marks_a_server_that_died_with_the_old_one_dead_not_relaunched() -> None:
    clock, launcher, ecs = pool_leader()
    result(ecs.register(SilentLink(), "server1", "127.0.0.1", 50001, 51001, 0))
    result(ecs.register(SilentLink(), "server2", "127.0.0.1", 50002, 51002, 0))
    for _ in range(int((ecs.config.failure_timeout + 2 * ecs.config.heartbeat_interval + 0.2)
                       / STEP)):
        clock.advance(STEP)
    assert launcher.launched == []
    assert "server3" in ecs.state.dead


class Dialler:
    """The new leader's probes: each AMP port refuses, connects, or never answers (hangs)."""

    def __init__(self, answers: dict[int, str]) -> None:
        self.answers = answers
        self.dialled: list[int] = []

    def __call__(self, host: str, port: int, timeout: float) -> Deferred[Any]:
        self.dialled.append(port)
        answer = self.answers.get(port, "hang")
        if answer == "refused":
            return fail(ConnectionRefusedError(host, port))
        if answer == "up":
            return succeed(Protocol())
        return Deferred()


def test_a_new_leader_marks_a_member_whose_port_refuses_dead_at_once() -> None:
    # server1 died with the old leader: nothing listens at its AMP port. server2 is back,
    # server3 runs but has not redialled yet (its probe connects).
    dial = Dialler({51001: "refused", 51003: "up"})
    clock, launcher, ecs = pool_leader(dial)
    result(ecs.register(SilentLink(), "server2", "127.0.0.1", 50002, 51002, 0))
    for _ in range(int(0.5 / STEP)):
        clock.advance(STEP)
    assert sorted(dial.dialled) == [51001, 51002, 51003]
    assert ecs.state.dead == {"server1"}, "refused: dead within half a second of the takeover"
    assert launcher.launched == []


def test_a_new_leader_keeps_the_grace_of_a_member_that_accepts_or_hangs() -> None:
    dial = Dialler({51001: "up", 51002: "hang"})
    clock, launcher, ecs = pool_leader(dial)
    result(ecs.register(SilentLink(), "server3", "127.0.0.1", 50003, 51003, 0))
    while clock.seconds() < ecs.config.failure_timeout - 0.1:
        clock.advance(STEP)
    assert set(dial.dialled) >= {51001, 51002}
    assert not ecs.state.dead


def test_a_new_leader_relaunches_when_every_probe_is_refused() -> None:
    # Every process was down (make run-ha started again): all refuse, which is no reason to
    # mark them dead (their ranges would go to nobody); they are relaunched at failure-timeout.
    dial = Dialler({51001: "refused", 51002: "refused", 51003: "refused"})
    clock, launcher, ecs = pool_leader(dial)
    for _ in range(int((ecs.config.failure_timeout + 0.5) / STEP)):
        clock.advance(STEP)
    assert len(dial.dialled) == 3
    assert not ecs.state.dead
    assert sorted(launcher.launched) == ["server1", "server2", "server3"]


def test_a_restarted_ecs_marks_a_member_whose_port_refuses_dead_at_once(tmp_path) -> None:
    # One ECS (state in a file) restarts; meanwhile server1 was killed: nothing listens at
    # its AMP port. Without the probe it had register-timeout (20 s here) to come back, and
    # the writes of its chains waited as long.
    from ecs.state import StateFile
    state = ClusterState(epoch=5, last_epoch=5, replication=3, serving=True,
                         ring_members=["server1", "server2", "server3"])
    for i, name in enumerate(state.ring_members, 1):
        state.members[name] = Member(name, "127.0.0.1", 50000 + i, 51000 + i, ACTIVE)
    store = StateFile(str(tmp_path / "state.json"))
    store.save(state)
    clock = Clock()
    dial = Dialler({51001: "refused", 51003: "up"})
    config = ECSConfig(initial_nodes=0, launcher="none", tls="off",
                       register_timeout=20.0).validated()
    launcher = RecordingLauncher()
    ecs = made(ECS(config, clock, launcher, store, dial=dial))
    ecs.start()
    result(ecs.register(SilentLink(), "server2", "127.0.0.1", 50002, 51002, 0))
    for _ in range(int(0.7 / STEP)):  # the probes' timeout (0.5 s), and a step
        clock.advance(STEP)
    assert 51001 in dial.dialled
    assert ecs.state.dead == {"server1"}
    assert launcher.launched == []


def test_two_neighbours_whose_ports_refuse_keep_their_grace(tmp_path) -> None:
    # A refused connection is taken for "no process", but a firewall rejecting (iptables'
    # REJECT, a partition) refuses too, with the processes alive. Two members of a chain cut
    # off that way go on granting each other leases, by the bound the old ECS let them have:
    # both marked dead at once, their chain went on without them at the restart while one
    # still answered reads under the other's lease. One whose chain neighbours are back (or
    # only slow) is marked dead at once, as before; neighbours that both refuse wait for the
    # failure timeout, by which their leases have run out.
    from ecs.state import StateFile
    state = ClusterState(epoch=5, last_epoch=5, replication=3, serving=True,
                         ring_members=["server1", "server2", "server3", "server4"])
    for i, name in enumerate(state.ring_members, 1):
        state.members[name] = Member(name, "127.0.0.1", 50000 + i, 51000 + i, ACTIVE)
    store = StateFile(str(tmp_path / "state.json"))
    store.save(state)
    # Two next to each other in the ring (so in a chain), the third back, the fourth slow.
    first, second, back, slow = state.ring().nodes
    clock = Clock()
    dial = Dialler({first.amp_port: "refused", second.amp_port: "refused",
                    slow.amp_port: "up"})
    config = ECSConfig(initial_nodes=0, launcher="none", tls="off",
                       register_timeout=20.0).validated()
    ecs = made(ECS(config, clock, RecordingLauncher(), store, dial=dial))
    ecs.start()
    result(ecs.register(SilentLink(), back.name, back.host, back.console_port, back.amp_port,
                        0))
    pair = {first.name, second.name}
    while clock.seconds() < config.failure_timeout:
        clock.advance(STEP)
        assert not ecs.state.dead & pair, clock.seconds()
    while clock.seconds() < config.failure_timeout + 2 * config.heartbeat_interval + STEP:
        clock.advance(STEP)
    assert pair <= ecs.state.dead


def test_without_replicas_a_member_whose_port_refuses_keeps_its_grace(tmp_path) -> None:
    # Marked dead, its range would go to nobody: it has register-timeout to come back with
    # its files (or to be relaunched), as before the probes.
    from ecs.state import StateFile
    state = ClusterState(epoch=5, last_epoch=5, replication=1, serving=True,
                         ring_members=["server1", "server2"])
    for i, name in enumerate(state.ring_members, 1):
        state.members[name] = Member(name, "127.0.0.1", 50000 + i, 51000 + i, ACTIVE)
    store = StateFile(str(tmp_path / "state.json"))
    store.save(state)
    clock = Clock()
    dial = Dialler({51001: "refused"})
    config = ECSConfig(initial_nodes=0, launcher="none", tls="off",
                       register_timeout=20.0).validated()
    ecs = made(ECS(config, clock, RecordingLauncher(), store, dial=dial))
    ecs.start()
    result(ecs.register(SilentLink(), "server2", "127.0.0.1", 50002, 51002, 0))
    while clock.seconds() < 5:  # past the probes, short of register-timeout
        clock.advance(STEP)
    assert "server1" in ecs.state.ring_members and "server1" not in ecs.state.dead


# -- the watch's stream, as the gateway sends it ------------------------------------------------

def test_a_watch_stream_is_read_message_by_message_across_chunks() -> None:
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone

    from ecs.etcd import _Messages, watch_events

    got: list[dict[str, Any]] = []
    done: Deferred[None] = Deferred()
    reader = _Messages(got.append, done)
    key = base64.b64encode(b"/test/leader").decode()
    created = b'{"result":{"header":{"revision":"5"},"created":true}}\n'
    put_ = ('{"result":{"header":{"revision":"6"},"events":[{"kv":{"key":"%s","value":"%s",'
            '"mod_revision":"6","create_revision":"6","lease":"7"}}]}}\n'
            % (key, base64.b64encode("ecs1 é".encode()).decode())).encode()
    delete = ('{"result":{"header":{"revision":"7"},"events":[{"type":"DELETE","kv":{"key":"%s",'
              '"mod_revision":"7"}}]}}\n' % key).encode()
    stream = created + put_ + delete
    # split everywhere, one byte at a time at the start
    for i in range(0, 10):
        reader.dataReceived(stream[i:i + 1])
    reader.dataReceived(stream[10:70])
    reader.dataReceived(stream[70:])
    assert len(got) == 3
    assert watch_events(got[0]) == ([], False)
    (kind, kv), = watch_events(got[1])[0]
    assert (kind, kv.key, kv.value, kv.mod_revision) == ("PUT", b"/test/leader",
                                                         "ecs1 é".encode(), 6)
    (kind, kv), = watch_events(got[2])[0]
    assert (kind, kv.mod_revision) == ("DELETE", 7)
    assert watch_events({"result": {"canceled": True, "compact_revision": "9"}}) == ([], True)
    assert not done.called
    reader.connectionLost(Failure(ResponseDone()))
    assert result(done) is None


class _StalledAnswer:
    """An etcd answer whose headers came and whose body sends C{chunk}, then nothing."""

    code = 200
    phrase = b"OK"

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.hung_up = False

    def deliverBody(self, protocol: Any) -> None:
        from twisted.internet.testing import StringTransport
        answer = self
        transport = StringTransport()
        transport.stopProducing = lambda: setattr(answer, "hung_up", True)
        protocol.makeConnection(transport)
        protocol.dataReceived(self.chunk)


class _Agent:
    def __init__(self, answer: _StalledAnswer) -> None:
        self.answer = answer

    def request(self, *args: Any) -> Deferred[Any]:
        return succeed(self.answer)


def test_an_etcd_answer_whose_body_stalls_or_grows_without_end_is_given_up():
    # The request's timeout bounded only the wait for the headers: a member that then sent
    # part of its body and nothing more held the ECS's save for ever (and the next member was
    # never tried). And the body was read whole, however large.
    from ecs.etcd import MAX_ANSWER, http_post
    clock = Clock()
    stalled = _StalledAnswer(b'{"header": ')
    d = http_post(clock, timeout=2.0, agent=_Agent(stalled))("http://etcd:2379/v3/kv/range", {})
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(defer.TimeoutError) and stalled.hung_up
    huge = _StalledAnswer(b" " * (MAX_ANSWER + 1))
    d = http_post(clock, timeout=2.0, agent=_Agent(huge))("http://etcd:2379/v3/kv/range", {})
    d.addErrback(failures.append)
    assert failures[1].check(EtcdError) and "over" in failures[1].getErrorMessage()
    assert huge.hung_up
