"""The ECS's persisted state: atomic save/load, and epochs that never go backwards, not even
across a restart or after the state file was lost."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from ecs.config import ECSConfig
from ecs.coordinator import ECS
from ecs.state import ACTIVE, FAILED, IDLE, ClusterState, Member, StateFile


def sample_state() -> ClusterState:
    state = ClusterState(epoch=4, last_epoch=6, serving=True, replication=3,
                         ring_members=["b", "a"])
    state.members["a"] = Member("a", "127.0.0.1", 6001, 7001, ACTIVE, "pool", "LFU", 5)
    state.members["b"] = Member("b", "127.0.0.2", 6002, 7002, ACTIVE, "operator")
    state.members["c"] = Member("c", "127.0.0.3", 6003, 7003, FAILED, "pool", "LRU", 0)
    assert state.formed
    return state


def test_a_state_saved_before_formed_was_kept_is_formed_unless_nothing_got_past_launching():
    old = sample_state().to_json()
    del old["formed"]
    assert ClusterState.from_json(old).formed
    old.update(ring_members=[], members=[m for m in old["members"] if m["name"] == "c"])
    assert not ClusterState.from_json(old).formed  # c failed to start: nothing formed


def test_save_then_load_round_trips_everything(tmp_path):
    path = tmp_path / "sub" / "state.json"  # the directory is created on demand
    state = sample_state()
    StateFile(str(path)).save(state)
    loaded = StateFile(str(path)).load()
    assert loaded == state
    assert loaded.ring().epoch == 4
    assert [n.name for n in loaded.ring().nodes] == sorted(
        ["a", "b"], key=lambda n: state.members[n].info.position)
    assert not os.path.exists(str(path) + ".tmp")


def test_a_missing_file_loads_as_none(tmp_path):
    assert StateFile(str(tmp_path / "nothing.json")).load() is None


def test_a_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "state.json")
    state_file = StateFile(path)
    first = sample_state()
    state_file.save(first)

    def crash(*args: Any) -> None:
        raise OSError("disk gone")

    # The crash happens after the new contents are written but before the rename: a reader
    # must still see the old state in full, never a torn mix.
    monkeypatch.setattr(os, "replace", crash)
    second = sample_state()
    second.epoch = second.last_epoch = 99
    with pytest.raises(OSError):
        state_file.save(second)
    monkeypatch.undo()
    assert state_file.load() == first
    with open(path) as f:
        assert json.load(f)["epoch"] == 4


def test_old_files_without_last_epoch_still_load(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"epoch": 7, "members": [], "ring_members": []}))
    loaded = StateFile(str(path)).load()
    assert (loaded.epoch, loaded.last_epoch, loaded.replication, loaded.serving) == (
        7, 7, 1, False)
    assert loaded.allocate_epoch() == 8


def test_the_order_dead_members_left_in_survives_a_reload_and_old_files_have_none(tmp_path):
    state = sample_state()
    state.members["a"].left_at, state.members["b"].left_at = 5, 6
    state.dead = {"a", "b"}
    path = str(tmp_path / "state.json")
    StateFile(path).save(state)
    assert StateFile(path).load().departures() == {"a": 5, "b": 6}
    data = state.to_json()
    for member in data["members"]:
        del member["left_at"]  # saved by an ECS that did not keep it
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert StateFile(str(tmp_path / "old.json")).load().departures() == {"a": 0, "b": 0}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["allocate", "commit", "reload"]), max_size=30))
def test_allocated_epochs_strictly_increase_across_reloads(tmp_path_factory, steps):
    path = str(tmp_path_factory.mktemp("s") / "state.json")
    state_file = StateFile(path)
    state = ClusterState()
    handed_out: list[int] = []
    for step in steps:
        if step == "allocate":
            # the coordinator saves every allocation before using it
            handed_out.append(state.allocate_epoch())
            state_file.save(state)
        elif step == "commit" and handed_out:
            state.epoch = handed_out[-1]
            state_file.save(state)
        elif step == "reload":
            state = state_file.load() or ClusterState()
    handed_out.append(state.allocate_epoch())
    assert handed_out == sorted(set(handed_out)), handed_out
    assert state.epoch <= state.last_epoch


class SilentLink:
    """A control link whose commands never get an answer (the test looks at the ECS only)."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, dict[str, Any]]] = []

    def callRemote(self, command: Any, **kwargs: Any) -> Deferred[Any]:
        self.sent.append((command, kwargs))
        return Deferred()


class NoLaunch:
    def launch(self, *args: Any) -> None:
        raise AssertionError("nothing should be launched")

    def stop_all(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


def test_allocate_epoch_after_a_lost_file_stays_above_what_servers_have_seen(tmp_path):
    config = ECSConfig(initial_nodes=0).validated()
    path = str(tmp_path / "state.json")
    ecs = ECS(config, Clock(), NoLaunch(), StateFile(path))
    assert not ecs.resumed
    # Servers from before the loss come back knowing epochs 12 and 9.
    ecs.register(SilentLink(), "x", "127.0.0.1", 6001, 7001, epoch=12)
    ecs.register(SilentLink(), "y", "127.0.0.1", 6002, 7002, epoch=9)
    assert ecs.state.members["x"].status == IDLE
    assert ecs.state.allocate_epoch() == 13
    # and the knowledge is persisted at once: a restart now still starts above 12
    reloaded = StateFile(path).load()
    assert reloaded.last_epoch >= 12
    assert reloaded.allocate_epoch() > 12
