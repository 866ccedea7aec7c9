"""Chain replication under real faults: ``twistd ecs`` and its ``twistd kvserver`` children on
loopback, with servers SIGKILLed or SIGSTOPped while clients write.

Every cluster here runs with replication 3, heartbeats every 0.3 s and a failure timeout of
1.5 s. Clients are separate processes using the blocking facade of the client library, as a
user's script would (pytest-twisted's reactor runs in this process's main thread, so the facade
cannot run here). What the tests prove:

- with five servers and four writers writing without pause, SIGKILLing the head, then a middle,
  then a tail of some key's chain (each failure repaired before the next, the last one leaving
  the ring degraded until a server is added) loses no acknowledged write: every key reads back
  its last acknowledged value, or a later one of the same writer whose put failed (it may have
  been applied); and once the writes have stopped, the replicas of every range, read from the
  servers' SQLite files after a clean shutdown, hold identical data and chain serials, and no
  store holds a key outside its roles;
- a tail paused (SIGSTOP) past the failure timeout, while a new value of one of its keys is
  acknowledged by the shortened chain, never answers the old value once it is continued, not
  even to requests that were waiting in its sockets while it was stopped;
- with three servers and no free slot, a SIGKILLed server leaves chains of two: the ECS reports
  the ring degraded (``ecsclient status``), reads and writes keep working, nothing acknowledged
  is lost, and the two replicas of every range agree;
- the same with ``replace-failed: on``: the ECS launches the killed server's slot again after
  the repair and it joins empty while the writes go on; chains of three are back, nothing
  acknowledged is lost, and the three replicas of every range agree.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chainstore.ring import NodeInfo, Ring, parse_position, position
from chainstore.storage import STORE_NAMES
from harness.processes import ECSProcess, pid_alive, write_ecs_config
from ecs import protocol as admin

# Real processes (integration) that the tests kill or freeze (fault).
pytestmark = [pytest.mark.integration, pytest.mark.fault]

HEARTBEAT = 0.3
FAILURE_TIMEOUT = 1.5
REPLICATION = 3
# Every wait below polls at most this often and gives up after its own bound.
POLL = 0.05
# A failure is noticed within the failure timeout plus a heartbeat round; the repair that
# follows copies at most a few hundred small keys. Generous, for a loaded two-core machine.
REPAIR_BOUND = 25.0
# Client knobs of every writer and agent: a put may wait out a failure detection and a lease.
CLIENT_TIMEOUT = 8.0
CLIENT_DEADLINE = 20.0


# -- client processes ------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    # One writer: puts to its own keys in turn, logging each attempt before it is sent and its
    # outcome after, so the test knows which writes were acknowledged.
    import json, os, sys, time
    from client.blocking import BlockingKVStore

    cfg = json.loads(sys.argv[1])
    sys.path.insert(0, cfg["tests"])
    from test_chain_faults import writer_value

    wid, keys = cfg["writer"], cfg["keys"]
    stop_at = time.monotonic() + cfg["max_seconds"]
    with open(cfg["log"], "a", buffering=1) as log, BlockingKVStore(
            [tuple(a) for a in cfg["addresses"]], timeout=cfg["timeout"],
            deadline=cfg["deadline"]) as store:
        seq = 0
        while time.monotonic() < stop_at and not os.path.exists(cfg["stop"]):
            seq += 1
            key = keys[seq % len(keys)]
            log.write(f"a {seq} {key}\\n")
            try:
                store.put(key, writer_value(wid, seq))
            except Exception as e:
                log.write(f"f {seq} {type(e).__name__}\\n")
            else:
                log.write(f"k {seq}\\n")
            time.sleep(cfg["pause"])
""")

AGENT = textwrap.dedent("""
    # A client on request: one JSON command a line on stdin, one JSON answer a line on stdout.
    import json, sys
    from client.blocking import BlockingKVStore

    cfg = json.loads(sys.argv[1])
    with BlockingKVStore([tuple(a) for a in cfg["addresses"]], timeout=cfg["timeout"],
                         deadline=cfg["deadline"]) as store:
        for line in sys.stdin:
            cmd = json.loads(line)
            answer = {}
            try:
                if cmd["op"] == "put":
                    for key, value in cmd["items"].items():
                        store.put(key, bytes.fromhex(value))
                elif cmd["op"] == "refresh":
                    answer["epoch"] = store.refresh_metadata().epoch
                elif cmd["op"] == "get":
                    for key in cmd["keys"]:
                        try:
                            answer[key] = store.get(key).hex()
                        except KeyError:
                            answer[key] = None
                        except Exception as e:
                            if type(e).__name__ != "KeyNotFound":
                                raise
                            answer[key] = None
                reply = {"ok": True, "values": answer}
            except Exception as e:
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)
""")


def writer_value(writer: int, seq: int) -> bytes:
    """The value of write C{seq} of C{writer}: unique, and recognisable from its bytes alone.

    Mostly small values; every 40th is over AMP's 64 KiB value limit (BigBytes' path)."""
    size = 70_000 if seq % 40 == 0 else 20 + (seq * 37) % 500
    head = f"w{writer}:{seq}:".encode("ascii")
    return (head * (size // len(head) + 1))[:size]


def parse_value(value: bytes) -> tuple[int, int]:
    """(writer, seq) of a value made by L{writer_value}; raise ValueError for anything else."""
    writer, seq, _ = value.split(b":", 2)
    if not writer.startswith(b"w"):
        raise ValueError(value[:40])
    return int(writer[1:]), int(seq)


@dataclass
class WriterLog:
    """What one writer did: its attempts (seq -> key), acknowledged and failed seqs."""

    writer: int
    attempts: dict[int, str] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)

    @classmethod
    def read(cls, writer: int, path: Path) -> WriterLog:
        result = cls(writer)
        if not path.exists():
            return result
        for line in path.read_text(encoding="ascii").splitlines():
            fields = line.split()
            if len(fields) < 2:
                continue  # a line cut short: only the last one can be, and only if killed
            seq = int(fields[1])
            if fields[0] == "a" and len(fields) == 3:
                result.attempts[seq] = fields[2]
            elif fields[0] == "k":
                result.acked.add(seq)
            elif fields[0] == "f" and len(fields) == 3:
                result.failed[seq] = fields[2]
        return result


class Writer:
    """A writer process (see L{WRITER}) over its own disjoint keys."""

    def __init__(self, workdir: Path, writer: int, keys: list[str],
                 addresses: list[tuple[str, int]], pause: float = 0.002,
                 max_seconds: float = 120.0) -> None:
        self.writer = writer
        self.keys = keys
        self.log_path = workdir / f"writer{writer}.log"
        self.stop_path = workdir / f"writer{writer}.stop"
        script = workdir / "writer.py"
        if not script.exists():
            script.write_text(WRITER, encoding="utf-8")
        cfg = {"writer": writer, "keys": keys, "addresses": addresses,
               "log": str(self.log_path), "stop": str(self.stop_path),
               "tests": str(Path(__file__).parent), "pause": pause,
               "max_seconds": max_seconds, "timeout": CLIENT_TIMEOUT,
               "deadline": CLIENT_DEADLINE}
        self.proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)],
                                     cwd=workdir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def acked_count(self) -> int:
        return len(WriterLog.read(self.writer, self.log_path).acked)

    def ask_to_stop(self) -> None:
        self.stop_path.touch()

    def wait(self, timeout: float) -> WriterLog:
        """Wait for the writer to finish its last put and exit; its log."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"writer {self.writer} did not stop within {timeout}s")
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        assert code == 0, f"writer {self.writer} exited {code}:\n{err[-3000:]}"
        return WriterLog.read(self.writer, self.log_path)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Agent:
    """A client process that puts and gets on request (see L{AGENT})."""

    def __init__(self, workdir: Path, addresses: list[tuple[str, int]]) -> None:
        script = workdir / "agent.py"
        script.write_text(AGENT, encoding="utf-8")
        cfg = {"addresses": addresses, "timeout": CLIENT_TIMEOUT, "deadline": CLIENT_DEADLINE}
        self.proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)],
                                     cwd=workdir, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def request(self, command: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command).encode("ascii") + b"\n")
        self.proc.stdin.flush()
        # One answer per command, so nothing waits in the reader's buffer when we select.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the client agent did not answer {command['op']} "
                                 f"within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise AssertionError(f"the client agent exited:\n{err[-3000:]}")
        return json.loads(line)

    def put(self, items: dict[str, bytes]) -> None:
        reply = self.request({"op": "put", "items": {k: v.hex() for k, v in items.items()}})
        assert reply["ok"], reply

    def get(self, keys: list[str]) -> dict[str, bytes | None]:
        reply = self.request({"op": "get", "keys": keys})
        assert reply["ok"], reply
        return {k: None if v is None else bytes.fromhex(v) for k, v in reply["values"].items()}

    def refresh(self) -> int:
        """Fetch the ring now; its epoch. (A get sent to a frozen tail would wait out the
        request timeout: the library learns a new ring only when a server refuses.)"""
        reply = self.request({"op": "refresh"})
        assert reply["ok"], reply
        return reply["values"]["epoch"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- the cluster -----------------------------------------------------------------------------------


class Cluster:
    """An ECS with its servers, and every client process a test starts, all stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ecs: ECSProcess | None = None
        self.writers: list[Writer] = []
        self.agents: list[Agent] = []
        self.paused: list[int] = []

    def start(self, slots: int, initial: int, **options: Any) -> dict[str, Any]:
        path = write_ecs_config(self.workdir, slots=slots, initial_nodes=initial,
                                replication=REPLICATION, heartbeat_interval=HEARTBEAT,
                                failure_timeout=FAILURE_TIMEOUT, cache_size=100,
                                register_timeout=20.0, **options)
        self.ecs = ECSProcess(self.workdir, config_path=path).start()
        self.ecs.wait_ready(timeout=30.0)
        return self.wait(lambda s: s["serving"] and len(s["ring"]) == initial
                         and all_connected(s) and not s["dead"] and s["operation"] is None,
                         30.0, f"{initial} servers serving")

    @property
    def ecs_process(self) -> ECSProcess:
        assert self.ecs is not None
        return self.ecs

    def status(self) -> dict[str, Any]:
        return self.ecs_process.status(timeout=5.0)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
             what: str) -> dict[str, Any]:
        """Poll the ECS's status until C{predicate} holds; fail with the last status if not."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {timeout}s; last status: {status}\n"
                                     f"{self.ecs_process.diagnostics()}")
            time.sleep(POLL)

    def amp_addresses(self, status: dict[str, Any]) -> list[tuple[str, int]]:
        members = {m["name"]: m for m in status["members"]}
        return [split_address(members[name]["amp"]) for name in status["ring"]]

    def pid_of(self, name: str) -> int:
        pids = self.ecs_process.server_pids()[name]
        assert pids and pid_alive(pids[-1]), f"{name} is not running: {pids}"
        return pids[-1]

    def writer(self, writer: int, keys: list[str], addresses: list[tuple[str, int]],
               **options: Any) -> Writer:
        w = Writer(self.workdir, writer, keys, addresses, **options)
        self.writers.append(w)
        return w

    def agent(self, addresses: list[tuple[str, int]]) -> Agent:
        a = Agent(self.workdir, addresses)
        self.agents.append(a)
        return a

    def pause(self, pid: int) -> None:
        self.paused.append(pid)
        os.kill(pid, signal.SIGSTOP)

    def shut_down(self, status: dict[str, Any]) -> None:
        """Stop the cluster cleanly (the ECS's ShutDown): every server closes its stores."""
        pids = [self.pid_of(name) for name in status["ring"]]
        self.ecs_process.call(admin.ShutDown, timeout=20.0)
        self.ecs_process.wait_exit(20.0)
        deadline = time.monotonic() + 20.0
        while any(pid_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "servers still running 20 s after ShutDown"
            time.sleep(POLL)

    def close(self) -> None:
        for pid in self.paused:
            try:
                os.kill(pid, signal.SIGCONT)  # a stopped process ignores SIGTERM until then
            except ProcessLookupError:
                pass
        for w in self.writers:
            w.kill()
        for a in self.agents:
            a.close()
        if self.ecs is not None:
            self.ecs.stop()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def all_connected(status: dict[str, Any]) -> bool:
    members = {m["name"]: m for m in status["members"]}
    return all(members[n]["connected"] and members[n]["status"] == "active"
               for n in status["ring"])


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def ring_of(status: dict[str, Any]) -> Ring:
    """The ring the ECS's status describes, dead members included."""
    members = {m["name"]: m for m in status["members"]}
    nodes = []
    for name in status["ring"]:
        host, console = split_address(members[name]["console"])
        nodes.append(NodeInfo(name, host, console, split_address(members[name]["amp"])[1],
                              token=parse_position(members[name]["position"])))
    return Ring(tuple(nodes), epoch=status["epoch"], replication=status["replication"],
                dead=frozenset(status["dead"]))


def repaired(victim: str) -> Callable[[dict[str, Any]], bool]:
    """The status after C{victim}'s failure has been repaired: out of the ring, nothing dead,
    no change running, every member connected."""
    def check(status: dict[str, Any]) -> bool:
        members = {m["name"]: m for m in status["members"]}
        return (members[victim]["status"] == "failed" and victim not in status["ring"]
                and not status["dead"] and status["operation"] is None
                and all_connected(status))
    return check


def console(node: NodeInfo, line: bytes, timeout: float = 5.0) -> bytes:
    """One request on a fresh connection to C{node}'s text console; the reply line."""
    with socket.create_connection((node.host, node.console_port), timeout=timeout) as s:
        f = s.makefile("rb")
        f.readline()  # greeting
        s.sendall(line + b"\r\n")
        return f.readline().rstrip(b"\r\n")


def chain_stats(node: NodeInfo) -> dict[str, dict[str, Any]]:
    """The chain part of a server's C{stats}: store name -> serial, acked, window, pending."""
    reply = console(node, b"stats")
    assert reply.startswith(b"stats "), reply
    stats = json.loads(reply[len(b"stats "):])
    return {name: stats[f"{name}_chain"] for name in STORE_NAMES if f"{name}_chain" in stats}


def wait_quiescent(ring: Ring, timeout: float = 20.0) -> None:
    """Wait until no chain has writes in flight and the members of each chain agree on its
    last serial (every write taken by a head has reached its tail)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = {n.name: chain_stats(n) for n in ring.nodes}
        busy = [(name, store) for name, per in stats.items() for store, s in per.items()
                if s["window"] or s["pending"]]
        apart = []
        for i in range(len(ring)):
            serials = [stats[n.name].get(STORE_NAMES[j], {}).get("serial")
                       for j, n in enumerate(ring.ring_chain(i))]
            if len(set(serials)) != 1:
                apart.append((ring.nodes[i].name, serials))
        if not busy and not apart:
            return
        assert time.monotonic() < deadline, \
            f"chains not quiescent after {timeout}s: in flight {busy}, serials apart {apart}"
        time.sleep(POLL)


# -- checks ------------------------------------------------------------------------------------------


def check_acknowledged(logs: list[WriterLog], values: dict[str, bytes | None]) -> dict[str, int]:
    """Every key holds its last acknowledged value or a later one of its writer that failed
    (and so may have been applied); never an older one, nor anything else. Counts."""
    counts = {"keys": 0, "attempts": 0, "acked": 0, "failed": 0, "later_failed_write_read": 0}
    for log in logs:
        counts["attempts"] += len(log.attempts)
        counts["acked"] += len(log.acked)
        counts["failed"] += len(log.failed)
        by_key: dict[str, list[int]] = {}
        for seq, key in log.attempts.items():
            by_key.setdefault(key, []).append(seq)
        for key, seqs in by_key.items():
            counts["keys"] += 1
            acked = [s for s in seqs if s in log.acked]
            last_acked = max(acked, default=0)
            value = values[key]
            if value is None:
                assert not acked, f"{key}: acknowledged write {last_acked} lost (no value)"
                continue
            writer, seq = parse_value(value)
            assert writer == log.writer and seq in seqs, f"{key}: holds a foreign value {seq}"
            assert value == writer_value(writer, seq), f"{key}: value of write {seq} corrupted"
            assert seq >= last_acked, \
                f"{key}: acknowledged write {last_acked} lost; it holds older write {seq}"
            if seq > last_acked:
                assert seq in log.failed, f"{key}: holds write {seq}, never acknowledged " \
                                          f"and never reported failed"
                counts["later_failed_write_read"] += 1
    return counts


def read_stores(data_dir: Path) -> dict[str, tuple[dict[bytes, bytes], tuple[str, int]]]:
    """Each store's pairs and chain state (chain id, serial), read-only from its SQLite file."""
    result = {}
    for name in STORE_NAMES:
        path = data_dir / f"{name}.sqlite"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            pairs = {bytes(k): bytes(v) for k, v in db.execute("SELECT k, v FROM kv")}
            row = db.execute("SELECT chain, serial FROM chain WHERE id = 0").fetchone()
        finally:
            db.close()
        result[name] = (pairs, ("", 0) if row is None else (row[0], row[1]))
    return result


def check_replicas(cluster: Cluster, ring: Ring) -> tuple[dict[str, int], dict[bytes, bytes]]:
    """After a clean shutdown: every range's chain holds identical data and chain state, and
    every store holds exactly the keys of the ranges it has a role in. Counts, and the data."""
    slots = {str(s["name"]): Path(str(s["data-dir"])) for s in cluster.ecs_process.slots}
    stores = {n.name: read_stores(slots[n.name]) for n in ring.nodes}
    expected: dict[tuple[str, str], set[bytes]] = {
        (n.name, store): set() for n in ring.nodes for store in STORE_NAMES}
    ranges = 0
    data: dict[bytes, bytes] = {}
    for i in range(len(ring)):
        rng = ring.range_of(i)
        chain = ring.ring_chain(i)
        copies = []
        for role, member in enumerate(chain):
            pairs, state = stores[member.name][STORE_NAMES[role]]
            part = {k: v for k, v in pairs.items() if position(k) in rng}
            expected[(member.name, STORE_NAMES[role])] |= set(part)
            copies.append((member.name, STORE_NAMES[role], part, state))
        first = copies[0]
        for other in copies[1:]:
            differ = sorted(k for k in set(first[2]) | set(other[2])
                            if first[2].get(k) != other[2].get(k))
            assert not differ, (f"range of {ring.nodes[i].name}: {first[0]}/{first[1]} and "
                                f"{other[0]}/{other[1]} differ on {len(differ)} keys, "
                                f"e.g. {differ[:5]}")
            assert other[3] == first[3], (f"range of {ring.nodes[i].name}: chain state "
                                          f"{first[0]}/{first[1]} {first[3]} but "
                                          f"{other[0]}/{other[1]} {other[3]}")
        ranges += 1
        data.update(first[2])
    for (name, store), want in expected.items():
        held = set(stores[name][store][0])
        extra = held - want
        assert not extra, f"{name}/{store} holds {len(extra)} keys outside its roles"
    return {"ranges": ranges, "keys": len(data), "chain_length": ring.chain_length}, data


def wait_progress(writers: list[Writer], more: int, timeout: float, what: str) -> None:
    """Wait until every writer has C{more} acknowledged writes beyond its count now."""
    start = {w.writer: w.acked_count() for w in writers}
    deadline = time.monotonic() + timeout
    while True:
        now = {w.writer: w.acked_count() for w in writers}
        if all(now[w] >= start[w] + more for w in start):
            return
        for w in writers:
            assert w.proc.poll() is None, f"writer {w.writer} exited early"
        assert time.monotonic() < deadline, \
            f"writers stalled {what}: acknowledged {start} -> {now} in {timeout}s"
        time.sleep(POLL)


def key_in_role(ring: Ring, role: int, name: str) -> bytes:
    """A key whose live chain has C{name} at index C{role} (0 head, 1 middle, -1 tail)."""
    for i in range(100_000):  # every server has each role in some range: found long before
        key = b"probe%d" % i
        if ring.chain(key)[role].name == name:
            return key
    raise AssertionError(f"no key has {name} at {role} in {ring}")


def kill_and_repair(cluster: Cluster, victim: str, role: str, report: dict[str, Any]) -> \
        dict[str, Any]:
    killed_at = time.monotonic()
    os.kill(cluster.pid_of(victim), signal.SIGKILL)
    status = cluster.wait(repaired(victim), REPAIR_BOUND, f"{victim} ({role}) repaired away")
    assert status["serving"]
    assert status["degraded"] == (len(status["ring"]) < REPLICATION), status
    report.setdefault("repairs", []).append(
        {"role": role, "victim": victim, "seconds": round(time.monotonic() - killed_at, 2),
         "ring": len(status["ring"]), "degraded": status["degraded"]})
    return status


def three_under_writes(cluster: Cluster, prefix: str, **options: Any) -> \
        tuple[dict[str, Any], Agent, dict[str, bytes], list[Writer]]:
    """Three servers and no free slot, 150 keys put through an agent, two writers writing
    (20 acknowledged writes each already): (status, agent, the keys put, writers)."""
    status = cluster.start(slots=3, initial=3, **options)
    addresses = cluster.amp_addresses(status)
    agent = cluster.agent(addresses)
    data = {f"{prefix}{i}": f"value {i}".encode() for i in range(150)}
    agent.put(data)
    writers = [cluster.writer(w, [f"w{w}k{i}" for i in range(20)], addresses) for w in range(2)]
    wait_progress(writers, 20, 20.0, "before the failure")
    return status, agent, data, writers


def stop_and_check(cluster: Cluster, status: dict[str, Any], agent: Agent,
                   data: dict[str, bytes], writers: list[Writer],
                   chain_length: int) -> tuple[dict[str, int], dict[str, int]]:
    """Stop the writers; check that nothing they had acknowledged is lost, then, after a clean
    shutdown, that the replicas of every range agree and hold exactly C{data} and what the
    writers left. (counts, replicas)."""
    for w in writers:
        w.ask_to_stop()
    logs = [w.wait(CLIENT_DEADLINE + 10.0) for w in writers]
    ring = ring_of(status)
    assert ring.chain_length == chain_length
    wait_quiescent(ring)
    values = agent.get([k for w in writers for k in w.keys])
    counts = check_acknowledged(logs, values)
    final = cluster.status()
    assert final["epoch"] == status["epoch"], "the ring changed during the checks"
    cluster.shut_down(final)
    replicas, stored = check_replicas(cluster, ring)
    assert stored == {k.encode(): v for k, v in {**data, **values}.items() if v is not None}
    return counts, replicas


# -- the tests ---------------------------------------------------------------------------------------


def test_killing_a_head_a_middle_and_a_tail_under_writes_loses_no_acknowledged_write(
        cluster, capsys):
    started = time.monotonic()
    status = cluster.start(slots=7, initial=5)
    addresses = cluster.amp_addresses(status)
    writers = [cluster.writer(w, [f"w{w}k{i}" for i in range(25)], addresses) for w in range(4)]
    report: dict[str, Any] = {}
    wait_progress(writers, 20, 20.0, "before any failure")

    # The head, then a middle, then a tail of some keys' chains in the ring of the moment,
    # each failure repaired before the next. The victims are picked so that the server the ECS
    # adds at the end (the first free slot of its pool) is the last one killed: the ring of
    # three comes back, and with it chains of the same names as before the last failure,
    # whose old serials no store may resume.
    for role, victim in ((0, "server5"), (1, "server4"), (-1, "server1")):
        key = key_in_role(ring_of(status), role, victim)
        assert ring_of(status).chain(key)[role].name == victim
        status = kill_and_repair(cluster, victim, ("head", "middle", "tail")[role], report)
        wait_progress(writers, 20, 20.0, f"after {victim}'s failure")
    # Two servers are left: chains of two, degraded, and writes went on.
    assert len(status["ring"]) == 2 and status["degraded"]
    # A new server restores chains of three while the writes go on.
    cluster.ecs_process.call(admin.AddNodes, count=1, cache_strategy="LRU", cache_size=100,
                             timeout=60.0)
    status = cluster.wait(lambda s: len(s["ring"]) == 3 and not s["degraded"]
                          and s["operation"] is None and all_connected(s), 20.0,
                          "three servers again")
    assert sorted(status["ring"]) == ["server1", "server2", "server3"], status
    wait_progress(writers, 20, 20.0, "after the join")

    for w in writers:
        w.ask_to_stop()
    logs = [w.wait(CLIENT_DEADLINE + 10.0) for w in writers]
    ring = ring_of(status)
    wait_quiescent(ring)
    agent = cluster.agent(cluster.amp_addresses(status))
    values = agent.get([k for w in writers for k in w.keys])
    counts = check_acknowledged(logs, values)
    assert counts["acked"] >= 4 * 100, counts  # the writers really wrote through it all

    final = cluster.status()
    assert final["epoch"] == status["epoch"], "the ring changed during the checks"
    cluster.shut_down(final)
    replicas, stored = check_replicas(cluster, ring)
    # The stores hold exactly what the library read, no more.
    assert stored == {k.encode(): v for k, v in values.items() if v is not None}
    report.update(counts=counts, replicas=replicas,
                  seconds=round(time.monotonic() - started, 1))
    with capsys.disabled():
        print(f"\nchain faults: {json.dumps(report)}")


def test_a_paused_tail_never_answers_an_old_value_when_it_wakes(cluster, capsys):
    status = cluster.start(slots=4, initial=4)
    ring = ring_of(status)
    agent = cluster.agent(cluster.amp_addresses(status))
    # Two keys with one tail: the first is written while the tail is stopped (the write may
    # wait in the tail's socket when it wakes), the second only once the ECS has failed it
    # (the woken tail has never seen it).
    first = b"zombie-a"
    tail = ring.chain(first)[-1]
    second = key_in_role(ring, -1, tail.name)
    keys = [first.decode(), second.decode()]
    old = {k: b"old value of " + k.encode() for k in keys}
    new = {k: b"new value of " + k.encode() for k in keys}
    agent.put(old)
    # Read once, so the tail also holds the old values in its cache.
    assert agent.get(keys) == old
    for k in keys:
        assert console(tail, b"get " + k.encode()) == b"get_success %s %s" % (k.encode(), old[k])

    # Connections to the tail's console opened before it stops, and one opened while it is
    # stopped (the kernel completes the handshake): their requests wait in its sockets.
    early = [socket.create_connection((tail.host, tail.console_port), timeout=10)
             for _ in range(2)]
    try:
        for s in early:
            assert s.makefile("rb").readline().startswith(b"chainstore")
        paused_at = time.monotonic()
        cluster.pause(cluster.pid_of(tail.name))
        late = socket.create_connection((tail.host, tail.console_port), timeout=10)
        early.append(late)
        # The shortened chain acknowledges the new value only once the ECS has failed the tail.
        agent.put({keys[0]: new[keys[0]]})
        put_seconds = time.monotonic() - paused_at
        status = cluster.status()
        members = {m["name"]: m for m in status["members"]}
        assert tail.name in status["dead"] or members[tail.name]["status"] == "failed", status
        assert agent.refresh() >= status["epoch"]
        agent.put({keys[1]: new[keys[1]]})
        assert agent.get(keys) == new
        for s in early:
            s.sendall(b"".join(b"get %s\r\n" % k.encode() for k in keys))

        os.kill(cluster.pid_of(tail.name), signal.SIGCONT)
        woke_at = time.monotonic()
        replies = []
        for s in early:
            f = s.makefile("rb")
            if s is late:
                f.readline()  # its greeting, written only now
            replies += [f.readline().rstrip(b"\r\n") for _ in keys]
        queued = len(replies)
        # And fresh requests for two seconds after it woke.
        for i in range(200):  # bounded by count and by time
            if time.monotonic() - woke_at > 2.0:
                break
            try:
                replies.append(console(tail, b"get " + keys[i % 2].encode(), timeout=2.0))
            except OSError as e:
                replies.append(f"connection: {e}".encode())
            time.sleep(POLL)
    finally:
        for s in early:
            s.close()
    fine = {b"server_not_responsible", b"server_stopped",
            *(b"get_success %s %s" % (k.encode(), new[k]) for k in keys)}
    stale = [r for r in replies if r in {b"get_success %s %s" % (k.encode(), old[k])
                                        for k in keys}]
    assert not stale, f"the woken tail answered an old value {len(stale)} times: {replies}"
    assert len(replies) > queued and all(r in fine for r in replies[:queued]), replies
    assert all(r in fine or r.startswith(b"connection:") for r in replies), replies
    assert agent.get(keys) == new
    with capsys.disabled():
        print(f"\nzombie tail: first put acknowledged {put_seconds:.2f}s after the pause; "
              f"{len(replies)} replies after waking: "
              f"{sorted({r.decode(errors='replace')[:40] for r in replies})}")


def test_a_failure_without_a_spare_serves_on_chains_of_two(cluster, capsys):
    status, agent, data, writers = three_under_writes(cluster, "deg")

    victim = ring_of(status).nodes[1].name
    report: dict[str, Any] = {}
    status = kill_and_repair(cluster, victim, "any", report)
    assert len(status["ring"]) == 2 and status["degraded"] and status["serving"], status
    shown = subprocess.run(
        [sys.executable, "-m", "ecs.shell", "--ecs", cluster.ecs_process.address, "status"],
        capture_output=True, timeout=30, cwd=cluster.workdir)
    assert shown.returncode == 0, shown.stderr.decode()
    assert "DEGRADED" in shown.stdout.decode(), shown.stdout.decode()
    wait_progress(writers, 20, 20.0, "on chains of two")

    # Nothing acknowledged before the failure is lost, and both reads and writes work.
    assert agent.get(list(data)) == data
    data = {k: v + b" again" for k, v in data.items()}
    agent.put(data)
    assert agent.get(list(data)) == data

    counts, replicas = stop_and_check(cluster, status, agent, data, writers, chain_length=2)
    with capsys.disabled():
        print(f"\ndegraded: {json.dumps({**report, 'counts': counts, 'replicas': replicas})}")


def test_with_replace_failed_a_killed_server_comes_back_empty_under_writes_and_nothing_is_lost(
        cluster, capsys):
    # replace-failed on and no free slot: after the repair the ECS launches the failed slot
    # again, and the server joins empty (its old files would hold a chain that went on without
    # it), filled by the join's copies while the writers go on.
    status, agent, data, writers = three_under_writes(cluster, "rep", replace_failed="on")

    victim = ring_of(status).nodes[1].name
    old_pid = cluster.pid_of(victim)
    killed_at, epoch = time.monotonic(), status["epoch"]
    os.kill(old_pid, signal.SIGKILL)
    # (the repair and the join are two ring changes; the state between them may not be seen)
    status = cluster.wait(lambda s: s["epoch"] >= epoch + 2 and len(s["ring"]) == REPLICATION
                          and victim in s["ring"] and not s["degraded"] and not s["dead"]
                          and s["operation"] is None and all_connected(s),
                          REPAIR_BOUND, f"{victim} replaced")
    assert cluster.pid_of(victim) != old_pid
    replaced_in = round(time.monotonic() - killed_at, 2)
    wait_progress(writers, 20, 20.0, "after the replacement")

    assert agent.get(list(data)) == data
    # Every replica of every range, the replaced server's three included, holds the same.
    counts, replicas = stop_and_check(cluster, status, agent, data, writers, REPLICATION)
    with capsys.disabled():
        report = {"seconds": replaced_in, "counts": counts, "replicas": replicas}
        print(f"\nreplaced: {json.dumps(report)}")
