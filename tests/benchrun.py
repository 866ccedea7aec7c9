"""Running a benchmark module (python -m bench, python -m bench.reconfig) as the user would, for
the integration tests: started from the checkout, its standard error kept in a file, and always
stopped (SIGINT, then SIGKILL) whatever the test does."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def start_module(module: str, args: list[str] | tuple[str, ...],
                 stderr_path: Path) -> subprocess.Popen[bytes]:
    with open(stderr_path, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=CHECKOUT,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt C{proc} if it still runs (it stops what it started), kill it if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout:
        proc.stdout.close()
