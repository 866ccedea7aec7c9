"""The wheel ships the product and nothing else: built with pip (hatchling, the project's build
backend), it holds chainstore, client, ecs and the twistd plugins, never the harness, the
fault-injection harness, the benchmark or the tests; installed into a fresh virtualenv, its
console scripts and plugins work from there."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("chainstore-*.whl")
    return built


def test_the_wheel_holds_the_product_packages_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"chainstore", "client", "ecs", "twisted"}
    for package in ("chainstore", "client", "ecs"):
        assert f"{package}/__init__.py" in names
    assert sorted(n for n in names if n.startswith("twisted/")) == [
        "twisted/plugins/chainstore_ecs.py", "twisted/plugins/chainstore_kvserver.py"]
    # Twisted's own package files are never shipped (they would replace Twisted's).
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    for left_out in ("harness", "torture", "bench", "tests"):
        assert not any(n.startswith(f"{left_out}/") for n in names), left_out
    assert not any(n.startswith("chainstore/testing/") for n in names)


def test_the_installed_wheel_runs_its_console_scripts_and_plugins(wheel: Path,
                                                                   tmp_path: Path) -> None:
    # A virtualenv of its own, whose dependencies (Twisted, PyYAML, ...) come from this one's
    # site-packages through a .pth line: installing them again would need the network. A path
    # line adds no .pth of that directory, so this checkout's editable install stays out.
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    (purelib,) = (env / "lib").glob("python3*/site-packages")
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = env / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    def run(*argv: str) -> str:
        # From an empty directory: nothing of this checkout is importable by accident.
        result = subprocess.run(list(argv), cwd=tmp_path, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result.stdout

    where = run(str(python), "-c", "import chainstore, client, ecs; "
                "print(chainstore.__file__, client.__file__, ecs.__file__)")
    assert all(path.startswith(str(purelib)) for path in where.split()), where
    for absent in ("harness", "torture", "bench"):
        result = subprocess.run([str(python), "-c", f"import {absent}"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert "ModuleNotFoundError" in result.stderr, (absent, result.stderr)
    assert "--connect HOST:PORT" in run(str(env / "bin" / "kvclient"), "--help")
    assert "--ecs" in run(str(env / "bin" / "ecsclient"), "--help")
    pki_dir = tmp_path / "pki"
    run(str(env / "bin" / "chainstore-pki"), "--dir", str(pki_dir), "init")
    run(str(env / "bin" / "chainstore-pki"), "--dir", str(pki_dir), "issue", "client", "webapp")
    assert "webapp" in run(str(env / "bin" / "chainstore-pki"), "--dir", str(pki_dir), "list")
    # twistd finds both plugins in the installed package.
    plugins = run(str(python), "-c", "from twisted.plugin import getPlugins; "
                  "from twisted.application.service import IServiceMaker; "
                  "import twisted.plugins.chainstore_kvserver as k; print(k.__file__); "
                  "print(*sorted(p.tapname for p in getPlugins(IServiceMaker)))")
    assert plugins.splitlines()[0].startswith(str(purelib))
    assert {"kvserver", "ecs"} <= set(plugins.splitlines()[1].split())
    usage = run(str(python), "-c", "from twisted.scripts.twistd import run; run()",
                "kvserver", "--help")
    assert "--data-dir" in usage
