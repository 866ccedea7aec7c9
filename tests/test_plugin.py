"""The twistd plugin: found by Twisted's plugin system in the installed package, and usable from
the real ``twistd`` command line."""

from __future__ import annotations

import subprocess
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.plugins import __path__ as plugin_path

from chainstore import tap
from harness.processes import TWISTD

REPO = Path(__file__).resolve().parent.parent


def _makers() -> dict[str, IServiceMaker]:
    return {maker.tapname: maker for maker in getPlugins(IServiceMaker)}


def test_get_plugins_finds_kvserver():
    makers = _makers()
    assert "kvserver" in makers, sorted(makers)
    maker = makers["kvserver"]
    assert IServiceMaker.providedBy(maker)
    # The plugin module names chainstore.tap and loads it lazily; both ends agree.
    assert maker.options is tap.Options
    assert maker.makeService == tap.makeService
    assert maker.description


def test_the_plugin_directory_is_a_namespace_not_a_package():
    # A shipped twisted/__init__.py or twisted/plugins/__init__.py would shadow Twisted's own.
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()
    assert any(Path(p).resolve() == (REPO / "twisted" / "plugins") for p in plugin_path)


def test_twistd_kvserver_help_lists_the_options(tmp_path):
    result = subprocess.run(TWISTD + ["kvserver", "--help"], cwd=tmp_path,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    text = result.stdout.decode()
    for option in ("--config", "--name", "--listen", "--console", "--data-dir", "--cache-size",
                   "--cache-strategy", "--log-level", "FIFO, LRU or LFU", "127.0.0.1"):
        assert option in text, option


def test_twistd_lists_kvserver_among_its_commands(tmp_path):
    result = subprocess.run(TWISTD + ["--help"], cwd=tmp_path, capture_output=True, timeout=60)
    assert result.returncode == 0
    assert b"kvserver" in result.stdout


def test_twistd_kvserver_refuses_a_bad_option_with_a_message(tmp_path):
    result = subprocess.run(TWISTD + ["-n", "kvserver", "--cache-strategy", "MRU"],
                            cwd=tmp_path, capture_output=True, timeout=60)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert "FIFO, LRU, LFU" in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "data").exists()  # refused before anything was opened
