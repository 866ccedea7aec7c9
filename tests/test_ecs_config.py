"""ECS configuration: YAML parsing, defaults that match etc/ecs.yaml, and a clear message for
every mistake (in the loader, in ``ecs.tap.Options`` and through ``twistd ecs`` itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from ecs.config import ECSConfig, ECSConfigError, NodeSlot, build_config, load_yaml
from ecs.tap import Options

REPO = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """Run in an empty directory, so the repository's etc/ecs.yaml is never picked up by chance."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def config_from(tmp_path: Path, text: str) -> ECSConfig:
    return build_config(load_yaml(write(tmp_path / "ecs.yaml", text)), {})


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ECSConfigError) as info:
        config_from(tmp_path, text)
    return str(info.value)


POOL = ("nodes:\n"
        "  - {name: a, host: 127.0.0.1, console-port: 6001, amp-port: 7001}\n"
        "  - {name: b, host: 127.0.0.1, console-port: 6002, amp-port: 7002, data-dir: /d/b}\n")


def test_defaults_equal_the_shipped_etc_ecs_yaml():
    shipped = build_config(load_yaml(str(REPO / "etc" / "ecs.yaml")), {})
    assert shipped == ECSConfig().validated()
    # and the pool really is the eight classic slots
    assert [s.name for s in shipped.nodes] == [f"server{i}" for i in range(1, 9)]
    assert shipped.nodes[0] == NodeSlot("server1", "127.0.0.1", 50001, 51001, "data/server1")


def test_yaml_sets_scalars_and_the_pool(tmp_path):
    config = config_from(tmp_path, "heartbeat-interval: 0.25\nfailure-timeout: 1\n"
                                   "replication: 3\ninitial-nodes: 2\ncache-strategy: lfu\n"
                                   "log-level: DEBUG\n" + POOL)
    assert (config.heartbeat_interval, config.failure_timeout) == (0.25, 1.0)
    assert (config.replication, config.initial_nodes) == (3, 2)
    assert (config.cache_strategy, config.log_level) == ("LFU", "debug")  # normalised
    assert config.nodes == (NodeSlot("a", "127.0.0.1", 6001, 7001, "data/a"),
                            NodeSlot("b", "127.0.0.1", 6002, 7002, "/d/b"))
    assert config.slot("b").data_dir == "/d/b"
    assert config.slot("zz") is None


def test_flags_override_yaml_and_none_flags_do_not(tmp_path):
    yaml_options = load_yaml(write(tmp_path / "e.yaml", "failure-timeout: 9\nreplication: 2\n"))
    config = build_config(yaml_options, {"failure-timeout": "4.5", "replication": None})
    assert config.failure_timeout == 4.5
    assert config.replication == 2


def test_an_empty_file_means_defaults(tmp_path):
    assert config_from(tmp_path, "") == ECSConfig().validated()


@pytest.mark.parametrize("entry, words", [
    ("- just-a-string", ["nodes[0]", "mapping"]),
    ("- {name: a, console-port: 6001}", ["nodes[0]", "amp-port"]),
    ("- {name: a, amp-port: 7001}", ["nodes[0]", "console-port"]),
    ("- {console-port: 6001, amp-port: 7001}", ["nodes[0]", "name"]),
    ("- {name: a, console-port: six, amp-port: 7001}", ["nodes[0]", "whole numbers"]),
    ("- {name: a, console-port: 0, amp-port: 7001}", ["nodes[0]", "1-65535"]),
    ("- {name: a, console-port: 6001, amp-port: 70000}", ["nodes[0]", "1-65535"]),
    ("- {name: 'a b', console-port: 6001, amp-port: 7001}", ["nodes[0]", "name"]),
])
def test_bad_pool_entries_are_named(tmp_path, entry, words):
    message = error_of(tmp_path, "initial-nodes: 0\nnodes:\n  " + entry + "\n")
    for word in words:
        assert word in message


def test_the_pool_must_be_a_non_empty_list(tmp_path):
    assert "non-empty list" in error_of(tmp_path, "nodes: []\n")
    assert "non-empty list" in error_of(tmp_path, "nodes: {name: a}\n")


def test_duplicate_slot_names_are_refused(tmp_path):
    message = error_of(tmp_path, "initial-nodes: 1\nnodes:\n"
                                 "  - {name: a, console-port: 6001, amp-port: 7001}\n"
                                 "  - {name: a, console-port: 6002, amp-port: 7002}\n")
    assert "share a name" in message


def test_duplicate_console_addresses_are_refused(tmp_path):
    message = error_of(tmp_path, "initial-nodes: 1\nnodes:\n"
                                 "  - {name: a, console-port: 6001, amp-port: 7001}\n"
                                 "  - {name: b, console-port: 6001, amp-port: 7002}\n")
    assert "console address" in message


def test_the_same_console_port_on_two_hosts_is_fine(tmp_path):
    config = config_from(tmp_path, "initial-nodes: 1\nnodes:\n"
                                   "  - {name: a, host: 10.0.0.1, console-port: 6001, amp-port: 7001}\n"
                                   "  - {name: b, host: 10.0.0.2, console-port: 6001, amp-port: 7001}\n")
    assert len(config.nodes) == 2


def test_a_port_used_twice_on_one_host_is_refused(tmp_path):
    # Two servers cannot both listen there: the second launch would fail at run time.
    amp_clash = error_of(tmp_path, "initial-nodes: 1\nnodes:\n"
                                   "  - {name: a, console-port: 6001, amp-port: 7001}\n"
                                   "  - {name: b, console-port: 6002, amp-port: 7001}\n")
    assert "127.0.0.1:7001" in amp_clash
    cross = error_of(tmp_path, "initial-nodes: 1\nnodes:\n"
                               "  - {name: a, console-port: 6001, amp-port: 7001}\n"
                               "  - {name: b, console-port: 7001, amp-port: 7002}\n")
    assert "127.0.0.1:7001" in cross
    same = error_of(tmp_path, "initial-nodes: 1\nnodes:\n"
                              "  - {name: a, console-port: 6001, amp-port: 6001}\n")
    assert "console-port and amp-port are both 6001" in same


@pytest.mark.parametrize("text", [
    "heartbeat-interval: 2\nfailure-timeout: 2\n",
    "heartbeat-interval: 2\nfailure-timeout: 1\n",
])
def test_failure_timeout_must_exceed_the_heartbeat_interval(tmp_path, text):
    message = error_of(tmp_path, text)
    assert "failure-timeout" in message and "heartbeat-interval" in message


def test_failure_timeout_leaves_room_for_the_lease_bound(tmp_path):
    message = error_of(tmp_path, "heartbeat-interval: 0.1\nfailure-timeout: 0.5\n")
    assert "failure-timeout (0.5s) must be at least 1.0s" in message


@pytest.mark.parametrize("text, word", [
    ("heartbeat-interval: 0\n", "heartbeat-interval"),
    ("replication: 0\n", "replication"),
    ("initial-nodes: -1\n", "initial-nodes"),
    ("initial-nodes: 9\n", "initial-nodes"),
    ("cache-strategy: MRU\n", "cache-strategy"),
    ("cache-size: -1\n", "cache-size"),
    ("launcher: docker\n", "launcher"),
    ("log-level: chatty\n", "log-level"),
    ("register-timeout: 0\n", "register-timeout"),
    ("heartbeat-interval: fast\n", "heartbeat-interval"),
    ("replication: two\n", "replication"),
])
def test_bad_scalar_values_name_the_option(tmp_path, text, word):
    assert word in error_of(tmp_path, text)


def test_unknown_options_are_listed(tmp_path):
    message = error_of(tmp_path, "heartbeat: 1\nreplicas: 2\n")
    assert "unknown option(s) heartbeat, replicas" in message
    assert "heartbeat-interval" in message  # the known ones are listed


def test_bad_yaml_and_non_mapping_and_missing_file(tmp_path):
    assert "not valid YAML" in error_of(tmp_path, "nodes: [unclosed\n")
    assert "mapping of option" in error_of(tmp_path, "- a\n- b\n")
    with pytest.raises(ECSConfigError, match="cannot read config file"):
        load_yaml(str(tmp_path / "missing.yaml"))


def test_tap_options_read_the_file_then_the_flags(tmp_path):
    path = write(tmp_path / "e.yaml", "heartbeat-interval: 0.5\nfailure-timeout: 2\n" + POOL
                 .replace("nodes:", "initial-nodes: 1\nnodes:"))
    options = Options()
    options.parseOptions(["--config", path, "--failure-timeout", "5", "--replication", "2"])
    config = options.config
    assert (config.heartbeat_interval, config.failure_timeout, config.replication) == (
        0.5, 5.0, 2)
    assert [s.name for s in config.nodes] == ["a", "b"]


def test_tap_options_pick_up_etc_ecs_yaml_in_the_working_directory(tmp_path):
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc" / "ecs.yaml", "failure-timeout: 7\n")
    options = Options()
    options.parseOptions([])
    assert options.config.failure_timeout == 7.0


@pytest.mark.parametrize("argv, words", [
    (["--heartbeat-interval", "2", "--failure-timeout", "1"], ["failure-timeout"]),
    (["--replication", "x"], ["replication", "int"]),
    (["--launcher", "k8s"], ["launcher", "local, ssh or none"]),
])
def test_tap_options_turn_errors_into_usage_errors(argv, words):
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(argv)
    for word in words:
        assert word in str(info.value)


def test_tap_options_report_a_broken_file(tmp_path):
    path = write(tmp_path / "e.yaml", "foo: 1\n")
    with pytest.raises(usage.UsageError, match="unknown option"):
        Options().parseOptions(["--config", path])


def test_twistd_ecs_help_lists_the_options(tmp_path):
    result = subprocess.run(TWISTD + ["ecs", "--help"], cwd=tmp_path, capture_output=True,
                            timeout=60)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    for option in ("--heartbeat-interval", "--failure-timeout", "--replication", "--launcher",
                   "--state-file"):
        assert option in out


def test_twistd_ecs_refuses_a_bad_config_with_its_message(tmp_path):
    result = subprocess.run(TWISTD + ["-n", "ecs", "--heartbeat-interval", "3",
                                      "--failure-timeout", "2"],
                            cwd=tmp_path, capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"failure-timeout (2.0s) must be longer than heartbeat-interval (3.0s)" in (
        result.stdout + result.stderr)


def test_a_slot_may_name_its_own_ecs_endpoint_and_peer_routes():
    slot = {"name": "s1", "host": "127.0.0.1", "console-port": 6001, "amp-port": 7001,
            "ecs": "tcp:127.0.0.1:9999", "peer-routes": "routes/s1.yaml"}
    config = build_config({"nodes": [slot]}, {"initial-nodes": 1})
    assert config.nodes[0].ecs == "tcp:127.0.0.1:9999"
    assert config.nodes[0].peer_routes == "routes/s1.yaml"
    from ecs.launcher import LocalLauncher
    argv = LocalLauncher(None, config).argv(config.nodes[0], "LRU", 10)
    assert argv[argv.index("--ecs") + 1] == "tcp:127.0.0.1:9999"
    assert argv[argv.index("--peer-routes") + 1] == "routes/s1.yaml"
    plain = build_config({"nodes": [{**slot, "ecs": None, "peer-routes": None}]},
                         {"initial-nodes": 1})
    argv = LocalLauncher(None, plain).argv(plain.nodes[0], "LRU", 10)
    assert argv[argv.index("--ecs") + 1] == plain.advertise and "--peer-routes" not in argv
    with pytest.raises(ECSConfigError, match="unknown key"):
        build_config({"nodes": [{**slot, "bogus": 1}]}, {})


def test_placement_is_balanced_by_default_settable_and_checked(tmp_path):
    pool = POOL + "initial-nodes: 2\n"
    assert config_from(tmp_path, pool).placement == "balanced"
    assert config_from(tmp_path, pool + "placement: hash\n").placement == "hash"
    assert build_config(load_yaml(write(tmp_path / "e.yaml", pool)),
                        {"placement": "hash"}).placement == "hash"
    assert "placement 'random': choose balanced or hash" in \
        error_of(tmp_path, pool + "placement: random\n")


# -- etcd: the state is the ring, so it is reached over https beyond loopback ------------------

ETCD = "state: etcd\nlease-ttl: 2\n"


def test_plain_http_to_etcd_beyond_loopback_is_refused_with_tls_on(tmp_path):
    message = error_of(tmp_path, ETCD + "etcd-endpoints: [http://127.0.0.1:2379, "
                       "http://10.1.2.3:2379]\n")
    assert "http://10.1.2.3:2379" in message and "https://" in message
    assert "etcd-tls-ca" in message and "tls: off" in message
    # on loopback, or on a network the operator calls trusted (tls off), it stays allowed
    assert config_from(tmp_path, ETCD + "etcd-endpoints: http://127.0.0.1:2379\n"
                       ).etcd_tls_files is None
    assert config_from(tmp_path, ETCD + "tls: off\netcd-endpoints: http://10.1.2.3:2379\n"
                       ).etcd_endpoints == ("http://10.1.2.3:2379",)


def test_https_to_etcd_needs_its_ca_and_a_client_certificate(tmp_path):
    message = error_of(tmp_path, ETCD + "etcd-endpoints: https://10.1.2.3:2379\n")
    assert "etcd-tls-ca" in message and "etcd-tls-cert" in message
    assert "etcd-tls-key" in message
    files = ("etcd-tls-ca: /p/ca.crt\netcd-tls-cert: /p/ecs.crt\netcd-tls-key: /p/ecs.key\n")
    config = config_from(tmp_path, ETCD + "etcd-endpoints: https://10.1.2.3:2379\n" + files)
    assert config.etcd_tls_files is not None
    assert (config.etcd_tls_files.ca, config.etcd_tls_files.cert) == ("/p/ca.crt", "/p/ecs.crt")
    assert "are for https://" in error_of(
        tmp_path, ETCD + "etcd-endpoints: http://127.0.0.1:2379\n" + files)
    assert "is not http://HOST:PORT or https://HOST:PORT" in error_of(
        tmp_path, ETCD + "etcd-endpoints: ftp://10.1.2.3:2379\n")


def test_unreadable_etcd_tls_files_are_one_usage_error(tmp_path):
    with pytest.raises(usage.UsageError, match="etcd-tls-"):
        Options().parseOptions(["--state", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379",
                                "--etcd-tls-ca", str(tmp_path / "none.crt"),
                                "--etcd-tls-cert", str(tmp_path / "none.crt"),
                                "--etcd-tls-key", str(tmp_path / "none.key"),
                                "--pki-dir", str(tmp_path / "pki")])


def test_replace_failed_is_on_or_off_and_needs_a_launcher(tmp_path):
    assert config_from(tmp_path, "replace-failed: on\n").replace_failed == "on"
    assert config_from(tmp_path, "replace-failed: off\n").replace_failed == "off"
    assert "replace-failed" in error_of(tmp_path, "replace-failed: maybe\n")
    assert "needs a launcher" in error_of(tmp_path, "replace-failed: on\nlauncher: none\n")
    options = Options()
    options.parseOptions(["--replace-failed", "on"])
    assert options.config.replace_failed == "on"


def test_copies_beside_moves_is_on_or_off(tmp_path):
    assert config_from(tmp_path, "").copies_beside_moves == "on"
    assert config_from(tmp_path, "copies-beside-moves: off\n").copies_beside_moves == "off"
    assert "copies-beside-moves" in error_of(tmp_path, "copies-beside-moves: fast\n")
    options = Options()
    options.parseOptions(["--copies-beside-moves", "off"])
    assert options.config.copies_beside_moves == "off"
