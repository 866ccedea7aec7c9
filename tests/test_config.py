"""``twistd kvserver`` options: embedded defaults, then the YAML file, then the command line, and
a clear UsageError for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from chainstore.config import ServerConfig, build_config, endpoint_port, load_yaml
from chainstore.tap import Options

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """Run every test in an empty directory, so no etc/kvserver.yaml is picked up by accident."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parse(*argv: str) -> ServerConfig:
    options = Options()
    options.parseOptions(list(argv))
    return options.config


def refused(*argv: str) -> str:
    with pytest.raises(usage.UsageError) as info:
        parse(*argv)
    return str(info.value)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_defaults_bind_loopback():
    config = parse()
    assert config == ServerConfig()
    assert config.listen == "tcp:51000:interface=127.0.0.1"
    assert config.console == "tcp:50000:interface=127.0.0.1"
    assert (config.advertised_host, config.console_port, config.amp_port) == (
        "127.0.0.1", 50000, 51000)
    assert (config.cache_size, config.cache_strategy, config.log_level) == (1000, "LRU", "info")
    assert config.data_dir == "data/kvserver"


def test_yaml_overrides_defaults(elsewhere):
    path = write(elsewhere / "my.yaml", "name: n1\ncache-size: 5\ncache-strategy: lfu\n"
                                        "console: tcp:6000:interface=127.0.0.1\n"
                                        "data-dir: /tmp/somewhere\nlog-level: DEBUG\n")
    config = parse("--config", path)
    assert config.name == "n1"
    assert config.cache_size == 5
    assert config.cache_strategy == "LFU"  # normalised
    assert config.log_level == "debug"
    assert config.console_port == 6000
    assert config.data_dir == "/tmp/somewhere"
    assert config.listen == ServerConfig().listen  # untouched options keep their defaults


def test_flags_override_yaml(elsewhere):
    path = write(elsewhere / "my.yaml", "name: n1\ncache-size: 5\ncache-strategy: LFU\n")
    config = parse("-c", path, "--name", "n2", "--cache-size", "7",
                   "--listen", "tcp:7001:interface=127.0.0.1", "--host", "10.0.0.9")
    assert (config.name, config.cache_size, config.cache_strategy) == ("n2", 7, "LFU")
    assert config.amp_port == 7001
    assert config.advertised_host == "10.0.0.9"


def test_the_default_file_in_etc_is_read_when_present(elsewhere):
    write(elsewhere / "etc" / "kvserver.yaml", "cache-size: 42\n")
    assert parse().cache_size == 42
    assert parse("--cache-size", "3").cache_size == 3


def test_a_broken_default_file_is_a_usage_error_too(elsewhere):
    write(elsewhere / "etc" / "kvserver.yaml", "cache-sise: 42\n")
    message = refused()
    assert "cache-sise" in message and "kvserver.yaml" in message


def test_empty_yaml_values_keep_the_defaults(elsewhere):
    path = write(elsewhere / "my.yaml", "host:\nname: n1\ncache-size:\n")
    config = parse("--config", path)
    assert (config.host, config.name, config.cache_size) == (None, "n1", 1000)


def test_an_empty_yaml_file_is_all_defaults(elsewhere):
    assert parse("--config", write(elsewhere / "e.yaml", "# nothing\n")) == ServerConfig()


def test_the_shipped_file_parses_and_equals_the_embedded_defaults():
    shipped = load_yaml(str(REPO / "etc" / "kvserver.yaml"))
    assert build_config(shipped, {}) == ServerConfig().validated() == ServerConfig()
    # And through the options, as twistd run from the repository would read it.
    assert parse("--config", str(REPO / "etc" / "kvserver.yaml")) == ServerConfig()


@pytest.mark.parametrize(("text", "words"), [
    ("cache-sise: 5\n", ["unknown option", "cache-sise", "known:"]),
    ("data_dir: x\n", ["unknown option", "data_dir"]),
    ("name: [unclosed\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["mapping"]),
    ("cache-size: lots\n", ["cache-size", "whole number"]),
    ("cache-size: true\n", ["cache-size", "whole number"]),
    ("cache-size: 2.5\n", ["cache-size", "whole number"]),
    ("cache-size: -1\n", ["cache-size", "0 or more"]),
    ("cache-strategy: MRU\n", ["MRU", "FIFO, LRU, LFU"]),
    ("log-level: loud\n", ["loud", "debug"]),
    ("listen: tcp:99999\n", ["listen", "1-65535"]),
    ("name: {a: b}\n", ["name", "single value"]),
])
def test_bad_yaml_is_a_usage_error_that_says_what_is_wrong(elsewhere, text, words):
    path = write(elsewhere / "bad.yaml", text)
    message = refused("--config", path)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(("argv", "words"), [
    (["--cache-strategy", "random"], ["random", "FIFO, LRU, LFU"]),
    (["--cache-size", "ten"], ["cache-size", "whole number"]),
    (["--log-level", "chatty"], ["chatty", "critical"]),
    (["--listen", "tcp:0"], ["listen", "1-65535"]),
    (["--listen", "tcp:65536"], ["listen", "1-65535"]),
    (["--console", "tcp:http"], ["console", "1-65535"]),
    (["--console", "unix:/tmp/x.sock"], ["console", "tcp:"]),
    (["--name", "has space"], ["name", "letters"]),
    (["--backend", "paper"], ["backend", "sqlite"]),
    (["--durability", "eternal"], ["durability", "crash"]),
    (["--config", "/nonexistent/kv.yaml"], ["cannot read", "/nonexistent/kv.yaml"]),
])
def test_bad_flags_are_usage_errors(argv, words):
    message = refused(*argv)
    for word in words:
        assert word in message, message


def test_the_dumb_backend_is_refused_under_an_ecs(elsewhere):
    # Its chain serial lives only in memory: unsafe for a replica.
    message = refused("--backend", "dumb", "--ecs", "tcp:127.0.0.1:5000", "--tls", "off")
    for word in ("backend 'dumb'", "ECS", "sqlite"):
        assert word in message, message
    config = write(elsewhere / "kv.yaml", "backend: dumb\necs: tcp:127.0.0.1:5000\ntls: off\n")
    assert "backend 'dumb'" in refused("--config", config)
    # Standalone it stays available, and sqlite under an ECS is fine.
    assert parse("--backend", "dumb").backend == "dumb"
    assert parse("--ecs", "tcp:127.0.0.1:5000", "--tls", "off").backend == "sqlite"


def test_unknown_flag_is_refused():
    refused("--cache-sise", "3")


def test_endpoint_ports():
    assert endpoint_port("tcp:5000", "x") == 5000
    assert endpoint_port("tcp:port=5001:interface=127.0.0.1", "x") == 5001
    assert endpoint_port("ssl:5002:privateKey=k.pem", "x") == 5002
    assert endpoint_port(r"tcp:5003:interface=\:\:1", "x") == 5003


def test_console_interface_fixes_the_advertised_host():
    assert parse("--console", "tcp:6000:interface=127.0.0.5").advertised_host == "127.0.0.5"
    # Listening on every interface: clients are told loopback unless --host says otherwise.
    assert parse("--console", "tcp:6000").advertised_host == "127.0.0.1"
    assert parse("--console", "tcp:6000:interface=0.0.0.0",
                 "--host", "192.0.2.1").advertised_host == "192.0.2.1"
