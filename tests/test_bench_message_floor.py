"""bench.message_floor: one message back and forth between two processes, in the servers'
stack (a Relay box, AMP, mutual TLS) and with the standard library's sockets and ssl."""

import pytest

from bench import message_floor


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    message_floor.make_pki(str(directory))
    return str(directory)


@pytest.mark.parametrize("mode", message_floor.MODES)
def test_every_mode_passes_its_messages_and_times_both_sides(pki_dir, mode):
    result = message_floor.measure(mode, pki_dir, round_trips=50, size=300)
    assert result.mode == mode and result.round_trips == 50
    # Both processes did the work (a side that never received would report no CPU or hang).
    assert result.client_cpu > 0 and result.server_cpu > 0 and result.wall > 0
    row = message_floor.report(result).split()
    assert row[0] == mode and len(row) == 5


def test_the_table_has_a_row_per_mode(capsys):
    assert message_floor.main(["--round-trips", "20", "--modes", "std-plain,twisted-tls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["std-plain", "twisted-tls"]


def test_an_echo_process_that_cannot_start_is_named(tmp_path):
    # No certificates where the TLS echo process looks for them: it dies before it listens.
    with pytest.raises(RuntimeError, match="the std-tls echo process failed"):
        message_floor.measure("std-tls", str(tmp_path / "missing"), round_trips=10, size=10)


def test_an_unknown_mode_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        message_floor.main(["--modes", "carrier-pigeon"])
    assert exit_.value.code == 2
    assert "unknown mode carrier-pigeon" in capsys.readouterr().err
