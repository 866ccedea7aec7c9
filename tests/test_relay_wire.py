"""The Relay box that chain members read and write directly (chainstore/control.py) is the
declared AMP command's, byte for byte, and its sections come back as they were packed."""

from __future__ import annotations

import pytest
from twisted.protocols import amp

from chainstore import control


def payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.mark.parametrize("size", [0, 100, 65_535, 65_536, 200_000])
def test_the_box_is_the_one_amp_makes_and_reads_back(size):
    data = payload(size)
    ours = control.relay_box(7, data)
    theirs = control.Relay.makeArguments({"epoch": 7, "data": data}, None)
    wire = ours.serialize()
    assert wire == theirs.serialize()
    box = amp.AmpBox(amp.parseString(wire)[0])
    assert control.read_relay(amp.AmpBox(box)) == (7, data)
    assert control.Relay.parseArguments(box, None) == {"epoch": 7, "data": data}


@pytest.mark.parametrize("box, error", [
    ({b"data": b""}, KeyError),
    ({b"epoch": b"x", b"data": b""}, ValueError),
    ({b"epoch": b"1"}, KeyError),
])
def test_a_bad_box_is_refused_as_amp_refuses_it(box, error):
    with pytest.raises(error):
        control.read_relay(amp.AmpBox(box))
    with pytest.raises(error):
        control.Relay.parseArguments(amp.AmpBox(box), None)


def test_sections_come_back_as_packed():
    ops = control.pack_ops([(5, control.PUT, b"k", b"v" * 70_000, b"id"),
                            (6, control.DELETE, b"k2", b"", b"")])
    data = b"".join(control.pack_section(control.BATCH, "s\u00e9", 4, ops,
                                         control.RESUMED | control.RESENT)
                    + control.pack_section(control.ACK, "s2", 2 ** 40)
                    + control.pack_section(control.BATCH, "s3", 0))
    sections = control.unpack_sections(data)
    assert [(kind, flags, owner, acked, bytes(p)) for kind, flags, owner, acked, p in sections] \
        == [(control.BATCH, control.RESUMED | control.RESENT, "s\u00e9", 4, ops),
            (control.ACK, 0, "s2", 2 ** 40, b""),
            (control.BATCH, 0, "s3", 0, b"")]
    assert [op[:3] for op in control.unpack_ops(sections[0][4])] == [
        (5, control.PUT, b"k"), (6, control.DELETE, b"k2")]


@pytest.mark.parametrize("data", [
    b"\x00",  # a truncated header
    b"".join(control.pack_section(control.BATCH, "s", 1, b"abc"))[:-1],  # a truncated payload
    b"".join(control.pack_section(7, "s", 1)),  # an unknown kind
    control._SECTION.pack(control.ACK, 0, 1, 1, 0) + b"\xff",  # an owner that is not UTF-8
])
def test_a_malformed_run_of_sections_is_refused(data):
    with pytest.raises(ValueError):
        control.unpack_sections(data)
