"""bench.roles' reading of a process's activity from /proc."""

import os
import sys
import time

import pytest

from bench.roles import Activity, activity, parse_activity, per_put

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
