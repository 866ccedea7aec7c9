"""The Replicate box that chain members read and write directly (chainstore/control.py) is the
declared AMP command's, byte for byte, both ways, errors included."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim

from chainstore import control


def payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.mark.parametrize("size", [0, 100, 65_535, 65_536, 200_000])
@pytest.mark.parametrize("resumed", [False, True])
def test_the_box_is_the_one_amp_makes_and_reads_back(size, resumed):
    ops = payload(size)
    ours = control.replicate_box(7, "n\u00e9", ops, resumed)
    theirs = control.Replicate.makeArguments(
        {"epoch": 7, "owner": "n\u00e9", "ops": ops, "resumed": resumed}, None)
    wire = ours.serialize()
    assert wire == theirs.serialize()
    box = amp.AmpBox(amp.parseString(wire)[0])
    assert control.read_replicate(amp.AmpBox(box)) == (7, "n\u00e9", ops, resumed)
    assert control.Replicate.parseArguments(box, None) == {
        "epoch": 7, "owner": "n\u00e9", "ops": ops, "resumed": resumed}


@pytest.mark.parametrize("box, error", [
    ({b"owner": b"n", b"ops": b""}, KeyError),
    ({b"epoch": b"x", b"owner": b"n", b"ops": b""}, ValueError),
    ({b"epoch": b"1", b"owner": b"\xff", b"ops": b""}, UnicodeDecodeError),
    ({b"epoch": b"1", b"owner": b"n", b"ops": b"", b"resumed": b"yes"}, TypeError),
])
def test_a_bad_box_is_refused_as_amp_refuses_it(box, error):
    with pytest.raises(error):
        control.read_replicate(amp.AmpBox(box))
    with pytest.raises(error):
        control.Replicate.parseArguments(amp.AmpBox(box), None)


class Follower(amp.AMP):
    """A peer answering Replicate with control.replicate_responder."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.received = []

    def locateResponder(self, name):
        if name == control.Replicate.commandName:
            def respond(epoch, owner, ops, resumed):
                self.received.append((epoch, owner, ops, resumed))
                return self.answer(epoch)
            return control.replicate_responder(respond)
        return super().locateResponder(name)


def exchange(answer, ops=b"abc", resumed=False):
    follower = Follower(answer)
    leader = amp.AMP()
    _, _, pump = iosim.connectedServerAndClient(lambda: follower, lambda: leader,
                                                 clock=Clock(), greet=False)
    results = []
    control.call_replicate(leader, 3, "n1", ops, resumed).addBoth(results.append)
    pump.flush()
    return follower, results, pump


def test_a_call_is_answered_with_acked():
    follower, results, _ = exchange(lambda epoch: epoch * 10, payload(150_000), True)
    assert results == [30]
    assert follower.received == [(3, "n1", payload(150_000), True)]


def test_a_deferred_answer_is_sent_when_it_fires():
    later = Deferred()
    follower, results, pump = exchange(lambda epoch: later)
    assert follower.received and results == []
    later.callback(12)
    pump.flush()
    assert results == [12]


@pytest.mark.parametrize("error", [control.StaleEpoch, control.ControlFailed])
def test_a_declared_error_crosses_as_itself(error):
    def refuse(epoch):
        raise error("no")
    _, results, _ = exchange(refuse)
    assert len(results) == 1 and results[0].check(error)
    assert results[0].getErrorMessage() == "no"
