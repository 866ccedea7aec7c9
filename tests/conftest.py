"""Shared fixtures: the reactor for pytest-twisted tests, and real server processes."""

from __future__ import annotations

import pytest

from harness.processes import ProcessGroup


@pytest.fixture
def reactor():
    """The global reactor, for the few tests that need real sockets (integration tests).

    Unit tests do not use it: they pass a twisted.internet.task.Clock and use iosim or
    StringTransport instead.
    """
    from twisted.internet import reactor as global_reactor

    return global_reactor


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory):
    """A PKI made once per test session: a CA and the certificates of admin, client, ecs and
    server1..server3 (for 127.0.0.1 and localhost)."""
    from chainstore import pki

    directory = tmp_path_factory.mktemp("pki")
    pki.ensure(str(directory), [("admin", "admin", []), ("client", "client", []),
                                ("ecs", "ecs", []),
                                *(("server", f"server{i}", []) for i in range(1, 4))])
    return directory


@pytest.fixture
def processes(tmp_path):
    """A L{ProcessGroup} in a fresh directory; every process it started is stopped after the test."""
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()
