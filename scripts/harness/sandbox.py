"""The sandbox hosts seen from tests: bring them up, run commands on them over SSH, take them down.

A thin wrapper over scripts/sandbox/sandbox, which does the work and writes .sandbox/env and
.sandbox/inventory/hosts.yml; this module reads those files so that tests see exactly what a user sees. The
names (state folder, prefix, hosts) come from the script's own module, scripts.sandbox.lab.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scripts.sandbox.lab import STATE_DIR, ssh_options

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "sandbox" / "sandbox"
ENV_FILE = STATE_DIR / "env"
UP_TIMEOUT = 1800  # a cold start builds the root filesystem first
# Longer than the script's own: tests connect while the machine is busy with a whole suite.
SSH_OPTIONS = ssh_options(connect_timeout=10)


class SandboxCommandError(RuntimeError):
    """scripts/sandbox/sandbox failed; the message carries its output."""


def run_script(*args: str, timeout: float = UP_TIMEOUT, settings: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """scripts/sandbox/sandbox with args; settings are MLAPI_SANDBOX_* variables of a sandbox of its own."""
    result = subprocess.run([str(SCRIPT), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(settings or {})})
    if result.returncode != 0:
        raise SandboxCommandError(
            f"sandbox {' '.join(args)} exited {result.returncode}:\n{result.stderr}{result.stdout}")
    return result


def read_env(path: Path = ENV_FILE) -> dict[str, str]:
    """The variables of .sandbox/env (lines `export NAME=value`, shell-quoted)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


@dataclass(frozen=True)
class SandboxHost:
    name: str
    ip: str  # the relay address on the controller's loopback: what SSH, curl and Ansible connect to
    private_ip: str  # the address on the sandbox bridge: what the hosts use between themselves


class Sandbox:
    """A running sandbox, as described by .sandbox/env."""

    def __init__(self, env: dict[str, str], settings: dict[str, str] | None = None) -> None:
        self.env = env
        self.settings = settings or {}
        self.hosts = [
            SandboxHost(name, ip, private_ip)
            for name, ip, private_ip in zip(
                env["SANDBOX_HOSTS"].split(),
                env["SANDBOX_HOST_IPS"].split(),
                env["SANDBOX_HOST_PRIVATE_IPS"].split(),
                strict=True,
            )
        ]

    # --- lifecycle -----------------------------------------------------------------------------------------

    @classmethod
    def up(cls, hosts: int = 1, os_name: str | None = None, settings: dict[str, str] | None = None) -> Sandbox:
        """Bring up `hosts` hosts (1: one host in every group; 3: lb plus two app hosts), reusing a matching sandbox.

        os_name: the hosts' OS (the script's default otherwise); settings: the MLAPI_SANDBOX_* variables of a
        sandbox beside the shared one (its own name, subnet, loopback range and MLAPI_SANDBOX_STATE)."""
        run_script("up", "--hosts", str(hosts), *(("--os", os_name) if os_name else ()), settings=settings)
        state = Path(settings["MLAPI_SANDBOX_STATE"]) if settings and "MLAPI_SANDBOX_STATE" in settings else STATE_DIR
        return cls(read_env(state / "env"), settings)

    @classmethod
    def current(cls) -> Sandbox | None:
        return cls(read_env()) if ENV_FILE.exists() else None

    @staticmethod
    def down(settings: dict[str, str] | None = None) -> None:
        run_script("down", timeout=300, settings=settings)

    def power_off(self, host: str) -> None:
        """Stop one host as a power cut would; its address stops answering."""
        run_script("power-off", self.host(host).name, timeout=120, settings=self.settings)

    def start(self, host: str) -> None:
        """Boot a powered-off host again and wait until systemd reports it running."""
        run_script("start", self.host(host).name, timeout=300, settings=self.settings)

    def rebuild(self, host: str) -> None:
        """Re-create a host from the base root filesystem, as a VM re-created from its image: same name and
        addresses, nothing that was installed or written on it; returns once it has booted."""
        run_script("rebuild", self.host(host).name, timeout=300, settings=self.settings)

    # --- what tests use ------------------------------------------------------------------------------------

    @property
    def domain(self) -> str:
        return self.env["SANDBOX_DOMAIN"]

    @property
    def ip(self) -> str:
        """The lb host's relay address: HTTPS for the domain goes here (curl --resolve DOMAIN:443:IP)."""
        return self.env["SANDBOX_IP"]

    @property
    def ssh_port(self) -> int:
        """The relay ports: 22, 80 and 443, unless a service on this machine holds one on every address."""
        return int(self.env["SANDBOX_SSH_PORT"])

    @property
    def http_port(self) -> int:
        return int(self.env["SANDBOX_HTTP_PORT"])

    @property
    def https_port(self) -> int:
        return int(self.env["SANDBOX_HTTPS_PORT"])

    @property
    def ca(self) -> Path:
        """Pebble's root: what a client needs to trust certificates issued in the sandbox."""
        return Path(self.env["SANDBOX_CA"])

    @property
    def acme_tls_ca(self) -> Path:
        """The CA of the ACME server's own HTTPS listener."""
        return Path(self.env["SANDBOX_ACME_TLS_CA"])

    @property
    def os_name(self) -> str:
        """The hosts' OS, e.g. ubuntu-24.04."""
        return self.env["SANDBOX_OS"]

    @property
    def user(self) -> str:
        """The cloud image's login user (ubuntu, admin), whom Ansible connects as."""
        return self.env["SANDBOX_USER"]

    @property
    def ssh_key(self) -> Path:
        return Path(self.env["SANDBOX_SSH_KEY"])

    @property
    def inventory(self) -> Path:
        return Path(self.env["SANDBOX_INVENTORY"])

    @property
    def vault_password_file(self) -> Path:
        """The sandbox's Ansible Vault password (mode 0600), what the playbooks run with."""
        return Path(self.env["SANDBOX_VAULT_PASSWORD_FILE"])

    @property
    def app_ips(self) -> list[str]:
        return self.env["SANDBOX_APP_IPS"].split()

    def host(self, host: str | SandboxHost) -> SandboxHost:
        """A host by name (mlapi-sb2), relay address or private address."""
        if isinstance(host, SandboxHost):
            return host
        for candidate in self.hosts:
            if host in (candidate.name, candidate.ip, candidate.private_ip):
                return candidate
        raise KeyError(f"no sandbox host {host!r}; hosts: {[h.name for h in self.hosts]}")

    def ssh_command(self, host: str | SandboxHost, command: str, user: str = "root") -> list[str]:
        return ["ssh", "-i", str(self.ssh_key), "-p", str(self.ssh_port), *SSH_OPTIONS, f"{user}@{self.host(host).ip}",
                command]

    def ssh(self, host: str | SandboxHost, command: str, *, check: bool = False, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a shell command as root on a host; returns the completed process (text stdout/stderr)."""
        return subprocess.run(self.ssh_command(host, command), input=input, capture_output=True, text=True,
                              timeout=timeout, check=check, stdin=None if input is not None else subprocess.DEVNULL)

    def copy_to(self, host: str | SandboxHost, source: Path, destination: str) -> None:
        """Copy a controller file to a path on a host."""
        self.ssh(host, f"cat > {shlex.quote(destination)}", input=source.read_text(), check=True)

    def recorded_pids(self) -> dict[str, int]:
        """Every process the sandbox recorded as started (name -> PID)."""
        pids = {}
        for pid_file in (STATE_DIR / "pids").glob("*.pid"):
            pids[pid_file.stem] = int(pid_file.read_text().split()[0])
        return pids

