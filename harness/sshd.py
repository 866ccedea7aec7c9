"""OpenSSH servers in network namespaces, for end-to-end tests of the ECS's ssh launcher.

One ``sshd`` per namespace, listening only on that namespace's address (never on this
namespace's interfaces), accepting only the key this module generates (no password, no
keyboard-interactive, no PAM), with a host key of its own that the matching ``known_hosts``
pins. Every sshd is tracked by PID; L{SshHosts.stop} ends them and every process left in their
namespaces (sessions and what they started). Needs root, Debian's ``openssh-server`` and
``openssh-client`` and iproute2's ``ip``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

from harness.processes import stop_pids

SSHD = "/usr/sbin/sshd"


def missing() -> str | None:
    """Why sshd cannot run in namespaces here, or None if it can."""
    if os.geteuid() != 0:
        return "sshd in network namespaces needs root"
    for tool, package in (("ip", "iproute2"), ("ssh", "openssh-client"),
                          ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return f"no {tool} (Debian package {package})"
    if not os.access(SSHD, os.X_OK):
        return f"no {SSHD} (Debian package openssh-server)"
    return None


def namespace_pids(namespace: str) -> list[int]:
    """The processes in network namespace C{namespace} (iproute2's C{ip netns pids})."""
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(word) for word in done.stdout.split()] if done.returncode == 0 else []


def _keygen(path: Path) -> str:
    """An ed25519 key pair at C{path} and C{path}.pub (mode 0600, as ssh wants); the public
    key's line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name,
                    "-f", str(path)], check=True, capture_output=True)
    return path.with_name(path.name + ".pub").read_text().strip()


class SshHosts:
    """sshd in each of a set of namespaces, reachable as root with one generated key.

        hosts = SshHosts(tmp_path / "ssh")
        try:
            hosts.start({"ns1": "10.200.1.2", "ns2": "10.200.2.2"})
            config["ssh-command"] = hosts.ssh_command()
            ...
        finally:
            hosts.stop()
    """

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir).resolve()
        self.client_key = self.workdir / "client_key"
        self.known_hosts = self.workdir / "known_hosts"
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, str] = {}

    def ssh_command(self) -> str:
        """An ECS ssh-command template that logs in as root with the generated key and trusts
        only the pinned host key."""
        return " ".join([
            "ssh", "-F", "/dev/null", "-i", shlex.quote(str(self.client_key)),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", f"UserKnownHostsFile={shlex.quote(str(self.known_hosts))}",
            "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5",
            "-l", "root", "{host}", "{command}"])

    def start(self, addresses: dict[str, str], timeout: float = 10.0) -> SshHosts:
        """Start an sshd in each namespace of C{addresses} (namespace -> its address) and
        wait until each greets on port 22."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        host_key = self.workdir / "host_key"
        public_host_key = _keygen(host_key)
        authorized = self.workdir / "authorized_keys"
        authorized.write_text(_keygen(self.client_key) + "\n")
        authorized.chmod(0o600)
        self.known_hosts.write_text("".join(
            f"{address} {' '.join(public_host_key.split()[:2])}\n"
            for address in addresses.values()))
        # sshd refuses to start without its privilege separation directory, which the
        # package's service unit creates at boot (nothing here runs that unit).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for namespace, address in addresses.items():
            config = self.workdir / f"sshd_{namespace}.conf"
            config.write_text("\n".join([
                f"ListenAddress {address}:22", f"HostKey {host_key}", "PidFile none",
                f"AuthorizedKeysFile {authorized}", "AuthenticationMethods publickey",
                "PubkeyAuthentication yes", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
                "UsePAM no", "X11Forwarding no", "AllowTcpForwarding no",
                # the test's files live under /tmp, which is world-writable
                "StrictModes no", ""]))
            log = self.workdir / f"sshd_{namespace}.log"
            # ip netns exec execs sshd: the PID is sshd's; -D keeps it in the foreground.
            self.daemons[namespace] = subprocess.Popen(
                ["ip", "netns", "exec", namespace, SSHD, "-D", "-f", str(config),
                 "-E", str(log)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
            self.addresses[namespace] = address
        for namespace, address in addresses.items():
            self._wait_greeting(namespace, address, timeout)
        return self

    def _wait_greeting(self, namespace: str, address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        daemon = self.daemons[namespace]
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                err = daemon.stderr.read().decode(errors="replace") if daemon.stderr else ""
                log = self.workdir / f"sshd_{namespace}.log"
                raise RuntimeError(f"sshd in {namespace} exited ({daemon.returncode}): {err}"
                                   f"{log.read_text() if log.exists() else ''}")
            try:
                with socket.create_connection((address, 22), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"sshd in {namespace} did not greet on {address}:22 in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """End every sshd and every process left in their namespaces (their sessions and what
        those started): SIGTERM, SIGKILL after C{timeout}."""
        pids = [d.pid for d in self.daemons.values() if d.poll() is None]
        pids += [pid for namespace in self.daemons for pid in namespace_pids(namespace)]
        stop_pids(sorted(set(pids)), timeout)
        for daemon in self.daemons.values():
            if daemon.stderr:
                daemon.stderr.close()
            try:
                daemon.wait(1)
            except subprocess.TimeoutExpired:
                pass
        self.daemons.clear()
