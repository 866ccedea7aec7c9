"""Three ECS over a real etcd (Debian's etcd-server, which .ci/run installs), as processes on
loopback: one leads, a SIGKILLed leader is replaced and the ring goes on under a greater epoch,
servers follow the new leader, and ecsclient finds it from any address."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from harness.ha import HACluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("etcd") is None,
                       reason="etcd is not installed (Debian: apt-get install etcd-server; "
                              ".ci/run installs it)"),
]


@pytest.fixture
def cluster(tmp_path):
    ha = HACluster(tmp_path, ecs_count=3, etcd_members=1, slots=4, initial_nodes=3,
                   replication=3, heartbeat_interval=0.3, failure_timeout=1.5,
                   register_timeout=10)
    try:
        ha.start()
        yield ha
    finally:
        ha.stop()


def test_a_killed_leader_is_replaced_and_the_ring_goes_on(cluster):
    leader, status = cluster.wait_leader(ring_size=3)
    standbys = [e for e in cluster.ecs if e is not leader]
    assert status["leader"]["address"] == leader.address
    # the standbys announce themselves in etcd; the leader reads them every renewal
    deadline = time.monotonic() + 5
    while len(status["standbys"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        status = leader.status()
    assert sorted(s["address"] for s in status["standbys"]) == sorted(e.address for e in standbys)
    # a standby names the leader
    with pytest.raises(Exception, match=f"not the leader; the leader is {leader.address}"):
        standbys[0].status()
    server = next(m["amp"] for m in status["members"] if m["name"] in status["ring"])

    def kvclient(lines: list[str]) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "client.shell", "--connect", server,
             *leader.tls_args("client")],
            input="".join(line + "\n" for line in lines), capture_output=True, text=True,
            timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    assert kvclient([f"put k{i} v{i}" for i in range(20)]) == \
        [f"put_success k{i}" for i in range(20)]

    killed_at = time.monotonic()
    leader.kill()
    new_leader, new_status = cluster.wait_leader(ring_size=3, besides=leader, timeout=30)
    took = time.monotonic() - killed_at
    assert new_status["epoch"] > status["epoch"]
    assert new_status["ring"] == status["ring"] and new_status["serving"]
    assert took < 15, f"the ring was back under a new leader only after {took:.1f}s"

    assert kvclient([f"get k{i}" for i in range(20)] + ["put after failover", "get after"]) == \
        [f"get_success k{i} v{i}" for i in range(20)] + ["put_success after",
                                                         "get_success after failover"]

    # ecsclient with the whole list, the dead ECS first, reaches the leader
    addresses = ",".join(e.address for e in [leader, *standbys])
    done = subprocess.run(
        [sys.executable, "-m", "ecs.shell", "--ecs", addresses, *leader.tls_args("admin"),
         "--timeout", "5", "status", "--json"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["leader"]["address"] == new_leader.address
