"""The server's reactor stall probe (chainstore/reactor_lag.py), driven by a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from chainstore import reactor_lag
from chainstore.cache import make_cache
from chainstore.node import KVNode
from chainstore.reactor_lag import ReactorLag
from chainstore.ring import NodeInfo


def test_the_probe_notes_how_late_its_timer_runs_and_the_cpu_meanwhile():
    clock = Clock()
    cpu = [0.0]
    probe = ReactorLag(clock, cpu=lambda: cpu[0])
    probe.startService()
    for _ in range(50):  # on time: nothing noted
        clock.advance(reactor_lag.INTERVAL)
    assert probe.stats()["reactor_lag_max_ms"] == 0 and probe.stalls == type(probe.stalls)()
    # A handler holds the reactor for 250 ms, 200 of them on the CPU.
    cpu[0] += 0.2
    clock.advance(0.25)
    clock.advance(reactor_lag.INTERVAL)
    # a shorter one, below the recording threshold
    clock.advance(reactor_lag.INTERVAL + 0.005)
    stats = probe.stats()
    assert stats["reactor_lag_max_ms"] == 240.0
    assert stats["reactor_lag_max_cpu_ms"] == 200.0
    assert stats["reactor_stalls"] == [[round(clock.seconds() - 0.025, 3), 240.0, 200.0]]
    probe.stopService()
    assert not clock.getDelayedCalls()


def test_the_servers_stats_carry_the_probe():
    clock = Clock()
    node = KVNode(NodeInfo("s", "127.0.0.1", 1, 2), make_cache("LRU", 10), clock)
    assert "reactor_lag_max_ms" not in node.stats()
    node.reactor_lag = ReactorLag(clock, cpu=lambda: 0.0)
    node.reactor_lag.startService()
    clock.advance(0.5)
    assert node.stats()["reactor_lag_max_ms"] == 490.0
    node.reactor_lag.stopService()
