"""Integrity at start (docs/DESIGN.md, "When storage fails"): a store file that is missing,
empty or corrupt while the data directory's manifest says it held data is refused, with one
line naming the file; start-up errors of a real ``twistd kvserver`` are one line, never a
traceback. With root, a real full disk (a 2 MB tmpfs) on a real process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from chainstore.storage import StoreIntegrityError, StoreSet
from chainstore.storage.integrity import MANIFEST
from harness.processes import KVServerProcess


def filled(directory: Path, keys: int = 500) -> None:
    stores = StoreSet.open(str(directory))
    coordinator = stores.coordinator
    for i in range(keys):
        coordinator.apply_one(0, b"k%d" % i, b"value %d" % i * 10, i + 1)
    coordinator.commit()
    stores.close()


def manifest(directory: Path) -> dict[str, list[str]]:
    return json.loads((directory / MANIFEST).read_text())


def test_a_new_directory_opens_and_the_manifest_records_a_store_once_it_holds_data(tmp_path):
    stores = StoreSet.open(str(tmp_path))
    assert not (tmp_path / MANIFEST).exists()
    stores.coordinator.set_chain_state("a@1", 0)  # no value yet: nothing to record
    assert not (tmp_path / MANIFEST).exists()
    stores.coordinator.apply_one(0, b"k", b"v", 1)
    stores.coordinator.commit()
    assert manifest(tmp_path) == {"held_data": ["coordinator"]}
    stores["replica2"].write_batch([(b"x", b"y")])
    assert manifest(tmp_path) == {"held_data": ["coordinator", "replica2"]}
    stores.close()
    StoreSet.open(str(tmp_path)).close()


@pytest.mark.parametrize("damage", ["emptied", "deleted"])
def test_an_emptied_or_deleted_store_that_held_data_is_refused_naming_the_file(tmp_path, damage):
    filled(tmp_path)
    path = tmp_path / "coordinator.sqlite"
    if damage == "emptied":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(StoreIntegrityError) as e:
        StoreSet.open(str(tmp_path))
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    assert ("empty (0 bytes)" if damage == "emptied" else "missing") in message


def test_a_corrupt_page_fails_the_check_at_start(tmp_path):
    filled(tmp_path, keys=2000)
    path = tmp_path / "coordinator.sqlite"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096))
    with pytest.raises(StoreIntegrityError) as e:
        StoreSet.open(str(tmp_path))
    assert str(path) in str(e.value) and "integrity check" in str(e.value)


def test_a_store_emptied_on_purpose_still_opens(tmp_path):
    # ClearStores and range drops delete keys, not the file: that is no damage.
    filled(tmp_path)
    stores = StoreSet.open(str(tmp_path))
    stores.coordinator.clear()
    stores.close()
    stores = StoreSet.open(str(tmp_path))
    assert len(stores.coordinator) == 0
    stores.close()


def test_data_written_before_manifests_existed_is_recorded_at_open(tmp_path):
    filled(tmp_path)
    (tmp_path / MANIFEST).unlink()
    StoreSet.open(str(tmp_path)).close()
    assert manifest(tmp_path) == {"held_data": ["coordinator"]}


# -- real processes ------------------------------------------------------------------------------


def console(server: KVServerProcess) -> tuple[socket.socket, object]:
    sock = socket.create_connection(server.console_address, timeout=10)
    lines = sock.makefile("rb")
    lines.readline()
    return sock, lines


def ask(sock: socket.socket, lines: object, request: bytes) -> bytes:
    sock.sendall(request + b"\r\n")
    return lines.readline().rstrip(b"\r\n")  # type: ignore[attr-defined]


def failed_start(server: KVServerProcess) -> str:
    """Start C{server}, which must exit with status 1; its stdout, stderr and log together."""
    server.workdir.mkdir(parents=True, exist_ok=True)
    server.proc = subprocess.Popen(server.argv(), cwd=server.workdir, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = server.proc.communicate(timeout=30)
    assert server.proc.returncode == 1, (out, err)
    log = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
    return out.decode(errors="replace") + err.decode(errors="replace") + log


def one_line_error(text: str, *needles: str) -> str:
    assert "Traceback" not in text, text[-4000:]
    hits = [line for line in text.splitlines() if "cannot start" in line]
    assert len(hits) == 1, text[-4000:]
    for needle in needles:
        assert needle in hits[0], hits[0]
    return hits[0]


@pytest.mark.integration
def test_a_real_server_refuses_to_start_on_an_emptied_store_file(processes):
    first = processes.server("s1").start()
    sock, lines = console(first)
    for i in range(50):
        assert ask(sock, lines, b"put k%d v%d" % (i, i)) == b"put_success k%d" % i
    sock.close()
    first.stop()
    path = first.data_dir / "coordinator.sqlite"
    path.write_bytes(b"")
    again = processes.server("s1", console_port=first.console_port, amp_port=first.amp_port)
    one_line_error(failed_start(again), str(path), "empty (0 bytes)")


@pytest.mark.integration
def test_start_up_errors_are_one_line_not_a_traceback(processes, tmp_path):
    # A port in use.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        server = processes.server("s1", console_port=port)
        one_line_error(failed_start(server), f"127.0.0.1:{port}", "in use")
    finally:
        taken.close()
    # A data directory that cannot be made (a file is in the way).
    (tmp_path / "blocker").write_text("")
    server = processes.server("s2", extra_args=["--data-dir", str(tmp_path / "blocker" / "d")])
    one_line_error(failed_start(server), str(tmp_path / "blocker"))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                 str(path)], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.mark.integration
def test_a_real_full_disk_answers_every_write_and_keeps_every_acknowledged_one(processes,
                                                                                 tmp_path):
    data = tmp_path / "full"
    if not _mount_tmpfs(data, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        server = processes.server("s1", extra_args=["--data-dir", str(data / "s1")])
        server.start()
        sock, lines = console(server)
        acked: list[bytes] = []
        value = b"x" * 2048
        failed = None
        for i in range(5000):
            key = b"k%d" % i
            sent = time.monotonic()
            reply = ask(sock, lines, b"put %s %s" % (key, value))
            assert time.monotonic() - sent < 1.0, (i, reply)
            if reply != b"put_success " + key:
                failed = (key, reply)
                break
            acked.append(key)
        assert failed is not None and failed[1].startswith(b"error storage failed"), failed
        # No dirty read of the unacknowledged write, from a new connection either.
        other, other_lines = console(server)
        assert ask(other, other_lines, b"get " + failed[0]).startswith(b"error storage failed")
        stats = json.loads(ask(other, other_lines, b"stats")[len(b"stats "):])
        assert stats["state"] == "failed" and "full" in stats["failure"]
        sock.close()
        other.close()
        server.stop()
        # Space comes back; the restarted server has every acknowledged write and not the
        # failed one.
        subprocess.run(["mount", "-o", "remount,size=16m", str(data)], check=True, timeout=10)
        again = processes.server("s1", console_port=server.console_port,
                                 amp_port=server.amp_port,
                                 extra_args=["--data-dir", str(data / "s1")]).start()
        sock, lines = console(again)
        for key in acked:
            assert ask(sock, lines, b"get " + key) == b"get_success %s %s" % (key, value)
        assert ask(sock, lines, b"get " + failed[0]) == b"get_error " + failed[0]
        sock.close()
        again.stop()
    finally:
        processes.stop_all()
        subprocess.run(["umount", "-l", str(data)], timeout=10)
