"""BlockingKVStore: a plain script (no Twisted in sight) against a real kvserver process.

The facade runs the reactor in a daemon thread, which pytest-twisted's reactor (running in this
process's main thread) rules out here; so the script runs as its own process, as a user's would.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_twisted

from client.blocking import BlockingKVStore

SCRIPT = textwrap.dedent("""
    import json, random, sys
    from client.blocking import BlockingKVStore
    from client.errors import KeyNotFound, InvalidKey

    host, port = sys.argv[1], int(sys.argv[2])
    rng = random.Random(5)
    values = {f"key{i}": rng.randbytes(rng.randrange(1, 200)) for i in range(199)}
    values["big"] = rng.randbytes(120_000)
    report = {"created": 0, "updated": 0, "read_back": 0, "deleted": 0, "missing_after": 0}
    with BlockingKVStore([(host, port)], timeout=5.0, deadline=10.0) as store:
        for key, value in values.items():
            report["updated" if store.put(key, value) else "created"] += 1
        for key in list(values)[:10]:
            report["updated" if store.put(key, values[key]) else "created"] += 1
        for key, value in values.items():
            report["read_back"] += store.get(key) == value
        for key in values:
            store.delete(key)
            report["deleted"] += 1
        for key in values:
            try:
                store.get(key)
            except KeyNotFound:
                report["missing_after"] += 1
        try:
            store.put("k" * 21, "v")
        except InvalidKey:
            report["invalid_key"] = True
        report["kept_updated"] = store.put("kept", "still here")
        report["keyrange"] = store.keyrange()
    print(json.dumps(report))
""")


def console_get(host: str, port: int, key: bytes) -> bytes:
    """Read C{key} through the text console, independently of the client library."""
    with socket.create_connection((host, port), timeout=5) as s:
        f = s.makefile("rb")
        f.readline()  # greeting
        s.sendall(b"get " + key + b"\r\n")
        return f.readline().rstrip(b"\r\n")


@pytest.mark.integration
def test_a_plain_script_puts_gets_and_deletes_200_keys(processes, tmp_path: Path) -> None:
    server = processes.server().start()
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, str(script), server.host, str(server.amp_port)],
                         capture_output=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr.decode()
    report = json.loads(run.stdout)
    assert report == {
        "created": 200, "updated": 10, "read_back": 200, "deleted": 200, "missing_after": 200,
        "invalid_key": True, "kept_updated": False,
        "keyrange": report["keyrange"],
    }
    ((start, end, address),) = [t.split(",") for t in report["keyrange"].split(";") if t]
    assert start == end and address == f"{server.host}:{server.console_port}"
    # The script's last write is on the server, whoever asks.
    assert console_get(server.host, server.console_port, b"kept") == b"get_success kept still here"


@pytest_twisted.ensureDeferred
async def test_refuses_to_block_the_reactor_thread(reactor) -> None:
    # Here the reactor runs in this very thread: blocking would wait for ourselves forever.
    with pytest.raises(RuntimeError, match="reactor thread"):
        BlockingKVStore([("127.0.0.1", 9)], reactor=reactor)
