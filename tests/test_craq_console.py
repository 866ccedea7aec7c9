"""Black box: reads at every chain member over the text console of a real cluster (an ECS and
three ``twistd kvserver`` processes, replication 3), as a classic client of the course's
replication milestone sees it: ``keyrange`` for the heads, ``keyrange_read`` for the servers
that may answer a get, plain lines over TCP."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from chainstore.ring import parse_keyrange
from harness.processes import ECSProcess, stop_pids, write_ecs_config


class Console:
    """One blocking connection to a server's console: send lines, read one reply each."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=20)
        self.reader = self.sock.makefile("rb")
        self.reader.readline()  # the greeting

    def ask(self, lines: list[str]) -> list[str]:
        """Send every line at once (pipelined), then read one reply per line."""
        self.sock.sendall("".join(line + "\n" for line in lines).encode("ascii"))
        return [self.reader.readline().decode("ascii").rstrip("\r\n") for _ in lines]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def cluster(tmp_path: Path):
    ecs = ECSProcess(tmp_path, config_path=write_ecs_config(
        tmp_path, slots=3, initial_nodes=3, replication=3, failure_timeout=3.0)).start()
    try:
        status = ecs.wait_ready(ring_size=3)
        deadline = time.monotonic() + 30
        while not status["serving"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
            status = ecs.status()
        yield ecs
    finally:
        pids = [pid for pids in ecs.server_pids().values() for pid in pids]
        ecs.stop()
        stop_pids(pids)


@pytest.mark.integration
def test_every_chain_member_answers_the_latest_value_over_the_console(cluster) -> None:
    slots = {f"{s['host']}:{s['console-port']}": s for s in cluster.slots}
    consoles = {address: Console(s["host"], int(s["console-port"]))
                for address, s in slots.items()}
    try:
        first = next(iter(consoles.values()))
        [heads_line, reads_line] = first.ask(["keyrange", "keyrange_read"])
        assert heads_line.startswith("keyrange_success ")
        assert reads_line.startswith("keyrange_read_success ")
        heads = parse_keyrange(heads_line.split(" ", 1)[1])
        readers = parse_keyrange(reads_line.split(" ", 1)[1])
        keys = [f"key{i:03d}" for i in range(200)]

        def head_of(key: str) -> str:
            [address] = [f"{h}:{p}" for r, h, p in heads if r.contains_key(key.encode())]
            return address

        def readers_of(key: str) -> list[str]:
            return [f"{h}:{p}" for r, h, p in readers if r.contains_key(key.encode())]

        # keyrange_read covers every key three times: once per member of its chain.
        assert all(len(set(readers_of(k))) == 3 for k in keys)
        for version in (1, 2):
            by_head: dict[str, list[str]] = {}
            for key in keys:
                by_head.setdefault(head_of(key), []).append(key)
            for address, batch in by_head.items():
                replies = consoles[address].ask([f"put {k} v{version}-{k}" for k in batch])
                kind = "put_success" if version == 1 else "put_update"
                assert replies == [f"{kind} {k}" for k in batch]
            # Right after the acknowledgements, a get at each of the three members (head,
            # middle, tail; the second round finds the first round's values there) returns the
            # latest value.
            for address, console in consoles.items():
                mine = [k for k in keys if address in readers_of(k)]
                assert console.ask([f"get {k}" for k in mine]) == [
                    f"get_success {k} v{version}-{k}" for k in mine]
        # A server outside a key's chain would refuse it; with three servers every server is in
        # every chain, so the stats show the gets spread over all of them.
        served = [c.ask(["stats"])[0] for c in consoles.values()]
        assert all('"gets": 400' in line for line in served), served
    finally:
        for console in consoles.values():
            console.close()
