"""A stopped ECS leaves nothing behind: no task, no timer, no lock held or waited for.

A repair suspended in a stopped (or deposed) ECS used to stay suspended until the garbage
collector ended it, at any later time: its C{finally} released C{busy} into a waiter whose
coroutine had been collected first, and "cannot reuse already awaited coroutine" was logged
into whatever ran then.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from chainstore import control
from chainstore.chain import LEASE_SECONDS
from ecs.config import ECSConfig
from ecs.coordinator import ECS
from ecs.protocol import AdminError
from ecs.server import ECSProtocol
from ecs.state import ACTIVE, LAUNCHING, ClusterState, Member, StateFile

NAMES = ["s1", "s2", "s3", "s4"]
INTERVAL = 0.25
TIMEOUT = 1.0


class Link:
    """A server's control link that answers heartbeats at once, refuses the commands named
    in C{refuse} and accepts the others."""

    transport = None

    def __init__(self, refuse: tuple[type[Any], ...] = ()) -> None:
        self.refuse = refuse

    def callRemote(self, command: Any, **kwargs: Any) -> Deferred[Any]:
        if command is control.Heartbeat:
            return succeed({"epoch": kwargs["epoch"], "state": "running"})
        if command in self.refuse:
            return fail(control.ControlFailed(f"{command.__name__} refused"))
        return succeed({})


class NoLaunch:
    def launch(self, *args: Any) -> None:
        raise AssertionError("nothing is launched here")

    def stop_all(self) -> Deferred[None]:
        return succeed(None)


def started(tmp_path: Any, refuse: tuple[type[Any], ...] = (),
            back: list[str] = NAMES[:3]) -> tuple[Clock, ECS]:
    """A restarted ECS over a saved ring of four at replication 3, with C{back} back: by
    default s4 is not, so it is marked dead and a repair begins, waiting out its read
    leases."""
    state = ClusterState(epoch=5, last_epoch=5, replication=3, serving=True,
                         ring_members=list(NAMES))
    for i, name in enumerate(NAMES):
        state.members[name] = Member(name, "127.0.0.1", 6001 + i, 7001 + i, ACTIVE)
    store = StateFile(str(tmp_path / "state.json"))
    store.save(state)
    clock = Clock()
    config = ECSConfig(initial_nodes=0, launcher="none", tls="off", replication=3,
                       heartbeat_interval=INTERVAL, failure_timeout=TIMEOUT).validated()
    ecs = ECS(config, clock, NoLaunch(), store)
    ecs.start()
    for name in back:
        i = NAMES.index(name)
        ecs.register(Link(refuse), name, "127.0.0.1", 6001 + i, 7001 + i, 0)
    for _ in range(int((TIMEOUT + 3 * INTERVAL) / INTERVAL)):
        clock.advance(INTERVAL)
    assert ecs.state.dead == set(NAMES) - set(back)
    return clock, ecs


def hang_data_moves(ecs: ECS, hung: list[Deferred[Any]]) -> None:
    """From now on no server answers a command that moves or drops data (each such call is
    added to C{hung}): a change stays in its copying step."""

    def moves_hang(command: Any, **kwargs: Any) -> Deferred[Any]:
        if command is control.TrackWrites:
            return succeed({"tracker": 1})
        if command in (control.DropRange, control.MoveLocal, control.CopyRange):
            hung.append(Deferred())
            return hung[-1]
        return Link().callRemote(command, **kwargs)

    for link in ecs.links.values():
        link.callRemote = moves_hang  # type: ignore[method-assign]


@pytest.fixture
def failures() -> Any:
    """Every event logged with a failure, whatever its level."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def stopped_cleanly(clock: Clock, ecs: ECS, failures: list[dict[str, Any]],
                    end: str = "stop") -> None:
    """Stop C{ecs} (or depose it: C{end} "abdicate") and check that nothing is left."""
    failures.clear()
    getattr(ecs, end)()
    assert clock.getDelayedCalls() == []
    assert not ecs.busy.locked and not ecs.busy.waiting
    assert [e["log_failure"].value for e in failures] == []
    assert not ecs._tasks


@pytest.mark.parametrize("end", ["stop", "abdicate"])
def test_a_repair_waiting_on_leases_and_one_waiting_on_busy_end_at_stop(tmp_path, failures,
                                                                        end):
    clock, ecs = started(tmp_path)
    # The repair holds busy while the dead server's leases run out.
    assert ecs.busy.locked and ecs.operation is None
    # s4 comes back meanwhile: it registers, which asks for another repair, waiting on busy.
    ecs.register(Link(), "s4", "127.0.0.1", 6004, 7004, 0)
    assert len(ecs.busy.waiting) == 1
    stopped_cleanly(clock, ecs, failures, end)


def test_a_repair_retry_scheduled_is_cancelled_at_stop(tmp_path, failures):
    # The repair copies ranges to restore the chains: each source refuses to track writes.
    clock, ecs = started(tmp_path, refuse=(control.TrackWrites,))
    clock.advance(LEASE_SECONDS + 0.3)
    assert not ecs.busy.locked and ecs.state.dead == {"s4"}
    assert ecs._repair_retry is not None and ecs._repair_retry.active()
    stopped_cleanly(clock, ecs, failures)


def test_a_change_under_way_ends_at_stop_without_an_abort(tmp_path, failures):
    # The repair's first move of data is never answered: the ECS stops in the middle of the
    # change.
    clock, ecs = started(tmp_path)
    hung: list[Deferred[Any]] = []
    hang_data_moves(ecs, hung)
    clock.advance(LEASE_SECONDS + 0.3)
    assert hung and ecs.operation is not None and ecs.operation.step == "copying"
    stopped_cleanly(clock, ecs, failures)
    # the call was cancelled, not left to its server
    assert all(d.called for d in hung)


def test_an_admin_command_cut_short_by_stop_is_answered_with_an_admin_error(tmp_path,
                                                                            failures):
    clock, ecs = started(tmp_path, back=NAMES)
    hung: list[Deferred[Any]] = []
    hang_data_moves(ecs, hung)
    answers: list[Any] = []
    ECSProtocol(ecs).remove_node("s4", False).addBoth(answers.append)
    assert hung and not answers
    stopped_cleanly(clock, ecs, failures)
    # an error the admin's AMP command declares (else AMP would log it and answer UNKNOWN)
    [answer] = answers
    assert answer.check(AdminError) and "the ECS stopped" in str(answer.value)


class Launches:
    """Launches nothing for real: the servers never register."""

    def __init__(self) -> None:
        self.launched: list[str] = []
        self.stopped: list[str] = []

    def launch(self, slot: Any, *args: Any) -> None:
        self.launched.append(slot.name)

    def stop(self, name: str) -> Deferred[None]:
        self.stopped.append(name)
        return succeed(None)

    def stop_all(self) -> Deferred[None]:
        return succeed(None)


def test_an_ecs_stopped_while_its_first_servers_start_leaves_their_state_alone(tmp_path):
    # Stopping is not the servers' failure: the state saved stays what it was (launching),
    # for the next start to judge, and nothing is saved after the stop.
    store = StateFile(str(tmp_path / "state.json"))
    config = ECSConfig(initial_nodes=3, tls="off", heartbeat_interval=INTERVAL,
                       failure_timeout=TIMEOUT, register_timeout=5.0).validated()
    clock, launcher = Clock(), Launches()
    ecs = ECS(config, clock, launcher, store)
    ecs.start()
    clock.advance(1.0)
    assert len(launcher.launched) == 3
    saved = (tmp_path / "state.json").read_text()
    ecs.stop()
    clock.advance(10.0)
    assert (tmp_path / "state.json").read_text() == saved
    assert launcher.stopped == [] and clock.getDelayedCalls() == []
    assert {m.status for m in StateFile(str(tmp_path / "state.json")).load().members.values()
            } == {LAUNCHING}
