"""A real ``twistd ecs`` that cannot start says why in one line and exits with status 1.

The state file holds the ring and every epoch handed out: an ECS that cannot read it, or could
not write it, must not start (the first save would fail only once servers were launched), and
an operator needs the reason, not a traceback.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from harness.processes import TWISTD
from tests.test_store_integrity import one_line_error

pytestmark = pytest.mark.integration


def failed_start(workdir: Path, *args: str) -> str:
    """Start an ECS (TLS off, nothing launched) that must exit with status 1; its output."""
    argv = TWISTD + ["--pidfile=", "-n", "ecs", "--tls", "off", "--launcher", "none",
                     "--web", "off", *args]
    proc = subprocess.run(argv, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=30)
    text = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, text[-4000:]
    return text


def one_line(text: str, *needles: str) -> None:
    assert "ecs cannot start" in one_line_error(text, *needles), text[-4000:]


def test_a_port_in_use(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        one_line(failed_start(tmp_path, "--listen", f"tcp:{port}:interface=127.0.0.1",
                              "--state-file", str(tmp_path / "state.json")),
                 f"127.0.0.1:{port}", "in use")
    finally:
        taken.close()
    assert not (tmp_path / "state.json").exists()


def test_a_state_file_that_cannot_be_written_or_read(tmp_path):
    (tmp_path / "blocker").write_text("")
    one_line(failed_start(tmp_path, "--listen", "tcp:0:interface=127.0.0.1",
                          "--state-file", str(tmp_path / "blocker" / "state.json")),
             f"{tmp_path / 'blocker'} is a file")
    damaged = tmp_path / "state.json"
    damaged.write_text('{"epoch": 7, "members": ')
    one_line(failed_start(tmp_path, "--listen", "tcp:0:interface=127.0.0.1",
                          "--state-file", str(damaged)),
             str(damaged), "cannot be read", "restore it")
    assert damaged.read_text() == '{"epoch": 7, "members": '  # left for the operator
