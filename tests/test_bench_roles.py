"""bench.roles' reading of a process's activity from /proc."""

import os
import sys
import time

import pytest

from bench.roles import (Activity, activity, layer_of, parse_activity, per_put, python_per_put,
                         python_table, top_functions)

STAT = ("4242 (python -c run()) S 1 4242 4242 0 -1 4194560 3000 0 0 0 "
        "250 32 0 0 20 0 3 0 100 0 0")
STATUS = """Name:\tpython
State:\tS (sleeping)
voluntary_ctxt_switches:\t3302
nonvoluntary_ctxt_switches:\t2335
"""


def test_parse_activity_reads_cpu_and_switches_past_a_command_with_spaces():
    tick = os.sysconf("SC_CLK_TCK")
    got = parse_activity(STAT, STATUS)
    assert got == Activity((250 + 32) / tick, 32 / tick, 3302, 2335)


def test_activities_subtract_and_print_per_put():
    spent = Activity(0.5, 0.05, 300, 100) - Activity(0.1, 0.01, 100, 50)
    assert spent == pytest.approx(Activity(0.4, 0.04, 200, 50))
    assert per_put(spent, 1000).split() == ["400", "10%", "0.200", "0.050"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_activity_of_this_process_counts_its_own_sleeps():
    before = activity(os.getpid())
    time.sleep(0.01)  # the process sleeps: one voluntary switch at least
    after = activity(os.getpid()) - before
    assert after.wakeups >= 1 and after.cpu >= 0


MODULE = "<module> (<string>:1)"
RAW = "".join(f"{MODULE};{stack} {n}\n" for stack, n in [
    ("EPollReactor.doPoll (twisted/internet/epollreactor.py:244);"
     "Connection.recv (OpenSSL/SSL.py:2356)", 30),
    ("BinaryBoxProtocol.proto_key (twisted/protocols/amp.py:2415);"
     "ChainReplicator.relayed (chainstore/chain.py:546)", 20),
    ("Deferred._runCallbacks (twisted/internet/defer.py:1082)", 40),
    ("SQLiteDBM._put (chainstore/storage/sqlitedbm.py:251)", 10),
    ("something (/usr/lib/python3.11/json/encoder.py:1)", 5),
])


def test_a_sample_counts_for_the_layer_of_its_innermost_frame():
    assert layer_of("Connection.recv (OpenSSL/SSL.py:2356)") == "TLS"
    assert layer_of("BoundedAMP.stringReceived (chainstore/bounds.py:258)") == "AMP"
    assert layer_of("Deferred.callback (twisted/internet/defer.py:1)") == "Deferreds"
    assert layer_of("callWithLogger (twisted/python/log.py:98)") == "reactor"
    assert layer_of("ChainReplicator.relayed (chainstore/chain.py:546)") == "chain"
    assert layer_of("KVNode.get (chainstore/node.py:202)") == "node"
    assert layer_of("home (chainstore/storage/sqlitedbm.py:119)") == "storage"
    assert layer_of("dumps (/usr/lib/python3.11/json/__init__.py:1)") == "other"


def test_samples_become_microseconds_of_python_per_put(tmp_path):
    raw = tmp_path / "100-head.txt"
    raw.write_text(RAW)
    # 105 samples at 100 a second: 1.05 s of Python over 1,000 puts
    got = python_per_put(raw, rate=100, puts=1000)
    assert got["all"] == pytest.approx(1050.0)
    assert got["TLS"] == pytest.approx(300.0)
    assert got["chain"] == pytest.approx(200.0)  # the innermost frame, not proto_key above it
    assert got["AMP"] == 0.0
    assert got["Deferreds"] == pytest.approx(400.0)
    assert got["storage"] == pytest.approx(100.0)
    assert got["other"] == pytest.approx(50.0)
    assert top_functions(raw, 1) == [
        (40 / 105, "Deferred._runCallbacks (twisted/internet/defer.py:1082)")]


def test_the_python_table_adds_the_roles_up_beside_the_single_server(tmp_path):
    for role in ("head", "middle", "tail", "single"):
        (tmp_path / f"100-{role}.txt").write_text(RAW)
    lines = python_table(tmp_path, 100, rate=100, puts=1000, single_puts=2000)
    assert lines[1].split() == ["layer", "head", "middle", "tail", "chain", "single"]
    tls = next(line for line in lines if line.split()[0] == "TLS").split()
    assert tls[1:] == ["300.0", "300.0", "300.0", "900.0", "150.0"]
    total = next(line for line in lines if line.split()[0] == "all").split()
    assert total[1:] == ["1050.0", "1050.0", "1050.0", "3150.0", "525.0"]


def test_the_python_table_says_which_processes_py_spy_could_not_sample(tmp_path):
    for role in ("head", "middle", "single"):
        (tmp_path / f"100-{role}.txt").write_text(RAW)
    assert python_table(tmp_path, 100, rate=100, puts=1000, single_puts=2000) == [
        "  py-spy, 100 B: no samples of tail"]
