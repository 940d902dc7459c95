"""Sandbox hosts: real Ubuntu and Debian systemd hosts under systemd-nspawn, each in its own network namespace.

  sandbox up [--hosts N] [--os NAME]
                            build (once per OS) and boot N hosts, a local ACME CA and an egress proxy
  sandbox down              stop everything it started and remove every namespace, interface and mount
  sandbox status            show what runs
  sandbox power-off HOST    stop one host (its network stays, as a powered-off machine's would)
  sandbox start HOST        boot a powered-off host again
  sandbox rebuild HOST      power a host off, throw its disk away and boot it fresh from the base root filesystem

Nothing is added to the caller's network namespace: the hosts live on a bridge in a "lab" namespace
and are reached through a relay listening on loopback addresses (127.0.0.0/8 is local on Linux).
The hosts are what a cloud gives: a login user (`ubuntu` on Ubuntu, `admin` on Debian, as on EC2)
with cloud-init's passwordless sudo drop-in, reached over SSH with the sandbox's key; Ansible connects as
that user and becomes root. Root's key is there too, for the sandbox's own checks.

Run as root. Settings (environment): MLAPI_SANDBOX_OS (default ubuntu-24.04; one of OSES below),
MLAPI_SANDBOX_CACHE (root filesystem cache directory, default /var/cache/mlapi-sandbox), MLAPI_SANDBOX_SUBNET
(default 10.77.0.0/24), MLAPI_SANDBOX_LOOPBACK (default 127.77.0.0/24), MLAPI_SANDBOX_DOMAIN (default mlapi.test),
MLAPI_SANDBOX_NAME (prefix of namespace and host names, default mlapi), MLAPI_SANDBOX_STATE (the state
directory, default .sandbox in the checkout).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import http.client
import ipaddress
import json
import lzma
import os
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RELAY = Path(__file__).resolve().parent / "relay.py"
STATE_DIR = Path(os.environ.get("MLAPI_SANDBOX_STATE", REPO / ".sandbox")).absolute()
# Names of namespaces and machines are machine-wide; a second sandbox on the same machine needs its own
# name, subnet, loopback range and state directory.
PREFIX = os.environ.get("MLAPI_SANDBOX_NAME", "mlapi")
LOCK_FILE = Path(f"/run/lock/{PREFIX}-sandbox.lock")
LAB_NS = f"{PREFIX}-lab"
BRIDGE = "br-lab"
HOST_IF = "eth0"
# Bump when the root filesystem recipe below changes, so cached copies are rebuilt.
ROOTFS_RECIPE = "6"
ROOTFS_PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "openssh-server", "sudo",
    "python3", "python3-apt", "python3-venv", "ca-certificates", "locales", "apt-utils", "gnupg",
    "iproute2", "iputils-ping", "curl", "bind9-dnsutils", "procps", "less", "iptables", "ufw",
]
UBUNTU_ARCHIVE = "http://archive.ubuntu.com/ubuntu"
UBUNTU_SECURITY = "http://security.ubuntu.com/ubuntu"
# The Ubuntu archive's signing keys (ubuntu-keyring's ubuntu-archive-keyring.gpg): the 2018 key signs
# every supported release, the 2012 key the older ones. A keyring holding any other key is refused.
UBUNTU_ARCHIVE_KEYS = {
    "F6ECB3762474EDA9D21B7022871920D1991BC93C": "Ubuntu Archive Automatic Signing Key (2018)",
    "790BC7277767219C42C86F933B4FE6ACC0B21F32": "Ubuntu Archive Automatic Signing Key (2012)",
    "843938DF228D22F7B3742BC0D94AA3F0EFE21092": "Ubuntu CD Image Automatic Signing Key (2012)",
}
UBUNTU_REQUIRED_KEY = "F6ECB3762474EDA9D21B7022871920D1991BC93C"


@dataclass(frozen=True)
class OperatingSystem:
    """One supported host OS, as its cloud image gives it."""

    name: str
    distribution: str  # "ubuntu" or "debian"
    suite: str
    login_user: str  # the user a cloud image's SSH key belongs to (EC2: ubuntu, admin)
    # Packages the cloud image ships that change how provisioning behaves.
    cloud_packages: tuple[str, ...]
    components: str = "main"

    @property
    def label(self) -> str:
        return f"{self.distribution.capitalize()} {self.name.split('-', 1)[1]} ({self.suite})"


OSES = {
    os_.name: os_ for os_ in (
        # needrestart restarts services after library upgrades, unattended-upgrades upgrades daily, ufw is
        # installed (inactive), as in Ubuntu's server cloud images; snapd is left out.
        OperatingSystem("ubuntu-24.04", "ubuntu", "noble", "ubuntu",
                        ("needrestart", "unattended-upgrades", "ufw"), "main universe"),
        OperatingSystem("ubuntu-22.04", "ubuntu", "jammy", "ubuntu",
                        ("needrestart", "unattended-upgrades", "ufw"), "main universe"),
        # Debian's cloud images enable unattended-upgrades too.
        OperatingSystem("debian-12", "debian", "bookworm", "admin", ("unattended-upgrades",)),
        OperatingSystem("debian-13", "debian", "trixie", "admin", ("unattended-upgrades",)),
    )
}
DEFAULT_OS = "ubuntu-24.04"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PROXY_PORT = 8888
# Not 8888 on the controller: a distribution's own tinyproxy service listens there on every address.
TINYPROXY_PORT = 18888
PEBBLE_PORT = 14000
PEBBLE_MANAGEMENT_PORT = 15000
CHALLTESTSRV_DNS_PORT = 8053
CHALLTESTSRV_MANAGEMENT_PORT = 8055
RELAYED_HOST_PORTS = (22, 80, 443)
# A service listening on a port on every address (sshd on *:22, say) holds that port on 127.77.0.N too;
# the relay then takes the port plus this offset, and .sandbox/env says so.
RELAY_FALLBACK_OFFSET = 10000
BOOT_TIMEOUT = 180
STOP_TIMEOUT = 30


def ssh_options(connect_timeout: int = 5) -> list[str]:
    """ssh's options for the sandbox hosts: their keys change with every rebuild, and nobody types a password."""
    return ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}"]


SSH_OPTIONS = ssh_options()
REQUIRED_COMMANDS = {
    "debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "ip": "iproute2",
    "pebble": "pebble", "pebble-challtestsrv": "pebble", "tinyproxy": "tinyproxy",
    "ssh": "openssh-client", "ssh-keygen": "openssh-client", "openssl": "openssl",
    "gpg": "gnupg", "dpkg-deb": "dpkg",
}


def host_name(index: int) -> str:
    """The name of the index-th host (1: the lb host), which is also its machine and namespace name."""
    return f"{PREFIX}-sb{index}"


class SandboxError(Exception):
    """A failure with a message that says what went wrong and what to do."""


def log(message: str) -> None:
    print(f"sandbox: {message}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True, timeout: float | None = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SandboxError(f"command failed ({result.returncode}): {shlex.join(cmd)}\n{result.stderr.strip()}")
    return result


# --- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    name: str
    index: int  # 1-based
    private_ip: str
    relay_ip: str
    groups: tuple[str, ...]

    @property
    def netns(self) -> str:
        return self.name

    @property
    def lab_if(self) -> str:
        # Interface names are limited to 15 characters.
        return f"veth-sb{self.index}"


@dataclass(frozen=True)
class Config:
    cache_dir: Path
    subnet: ipaddress.IPv4Network
    loopback: ipaddress.IPv4Network
    domain: str
    host_count: int = 1
    os_name: str = DEFAULT_OS
    state_dir: Path = STATE_DIR

    @property
    def os(self) -> OperatingSystem:
        return OSES[self.os_name]

    @classmethod
    def from_env(cls, host_count: int = 1, os_name: str | None = None) -> Config:
        def network(var: str, default: str) -> ipaddress.IPv4Network:
            value = os.environ.get(var, default)
            try:
                net = ipaddress.IPv4Network(value)
            except ValueError as exc:
                raise SandboxError(f"{var}={value!r} is not an IPv4 network (e.g. {default})") from exc
            if net.num_addresses < 16:
                raise SandboxError(f"{var}={value!r} is too small: use a /28 or larger, e.g. {default}")
            return net

        loopback = network("MLAPI_SANDBOX_LOOPBACK", "127.77.0.0/24")
        if not loopback.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")):
            raise SandboxError(f"MLAPI_SANDBOX_LOOPBACK={loopback} must lie inside 127.0.0.0/8")
        subnet = network("MLAPI_SANDBOX_SUBNET", "10.77.0.0/24")
        if not subnet.is_private or subnet.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")):
            raise SandboxError(f"MLAPI_SANDBOX_SUBNET={subnet} must be a private range outside 127.0.0.0/8")
        domain = os.environ.get("MLAPI_SANDBOX_DOMAIN", "mlapi.test")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+", domain):
            raise SandboxError(f"MLAPI_SANDBOX_DOMAIN={domain!r} is not a lower-case DNS name such as mlapi.test")
        cache = Path(os.environ.get("MLAPI_SANDBOX_CACHE", "/var/cache/mlapi-sandbox"))
        os_name = os_name or os.environ.get("MLAPI_SANDBOX_OS") or DEFAULT_OS
        if os_name not in OSES:
            raise SandboxError(f"no sandbox OS named {os_name!r}; choose one of: {', '.join(OSES)}")
        return cls(cache_dir=cache, subnet=subnet, loopback=loopback, domain=domain, host_count=host_count,
                   os_name=os_name)

    @property
    def rootfs(self) -> Path:
        # One directory per OS and recipe: a rebuild never changes the files under hosts that still run.
        digest = hashlib.sha256(rootfs_stamp(self.os).encode()).hexdigest()[:12]
        return self.cache_dir / f"rootfs-{self.os.name}-{digest}"

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def services_relay_ip(self) -> str:
        """The loopback address where the lab's own services (proxy, ACME CA) are reachable."""
        return str(self.loopback.network_address + 1)

    @property
    def proxy_url(self) -> str:
        return f"http://{self.gateway}:{PROXY_PORT}"

    @property
    def acme_directory(self) -> str:
        return f"https://{self.gateway}:{PEBBLE_PORT}/dir"

    @property
    def hosts(self) -> list[Host]:
        hosts = []
        for index in range(1, self.host_count + 1):
            if self.host_count == 1:
                groups: tuple[str, ...] = ("lb", "app", "redis")
            elif index == 1:
                groups = ("lb", "redis")
            else:
                groups = ("app",)
            hosts.append(Host(
                name=host_name(index),
                index=index,
                private_ip=str(self.subnet.network_address + 1 + index),
                relay_ip=str(self.loopback.network_address + 1 + index),
                groups=groups,
            ))
        return hosts

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        names = ", ".join(h.name for h in self.hosts)
        raise SandboxError(f"no sandbox host named {name!r}; the hosts are: {names}")

    # Paths under the state directory.
    def path(self, *parts: str) -> Path:
        return self.state_dir.joinpath(*parts)

    @property
    def ssh_key(self) -> Path:
        return self.path("ssh", "id_ed25519")

    @property
    def pebble_tls_ca(self) -> Path:
        return self.path("pebble-tls-ca.pem")

    @property
    def pebble_root(self) -> Path:
        return self.path("pebble-root.pem")


# --- processes recorded by PID ---------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (start time) follows the parenthesised command, which may contain spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def record_pid(cfg: Config, name: str, pid: int) -> None:
    pid_dir = cfg.path("pids")
    pid_dir.mkdir(parents=True, exist_ok=True)
    # The start time guards against signalling an unrelated process that reused the PID.
    (pid_dir / f"{name}.pid").write_text(f"{pid} {_start_time(pid)}\n")


def recorded_pid(cfg: Config, name: str) -> int | None:
    """The recorded PID of name if that very process is still alive."""
    try:
        pid_text, started = cfg.path("pids", f"{name}.pid").read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_text)
    if _start_time(pid) != started or _is_zombie(pid):
        return None
    return pid


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _alive(pid: int, started: str | None) -> bool:
    return started is not None and _start_time(pid) == started and not _is_zombie(pid)


def stop_pid(pid: int, first_signal: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
    started = _start_time(pid)
    if started is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, first_signal)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not _alive(pid, started):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid, started):
        _reap(pid)
        time.sleep(0.1)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_recorded(cfg: Config, name: str, first_signal: int = signal.SIGTERM) -> None:
    pid = recorded_pid(cfg, name)
    if pid is not None:
        stop_pid(pid, first_signal)
    with contextlib.suppress(FileNotFoundError):
        cfg.path("pids", f"{name}.pid").unlink()


def spawn(cfg: Config, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Start cmd in the background, detached from the caller's session and output, and record its PID."""
    log_dir = cfg.path("logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, close_fds=True,
        )
    record_pid(cfg, name, proc.pid)
    return proc.pid


def note(cfg: Config, name: str, message: str) -> None:
    """Log message and append it to the log of process name (a host's console log), where it stays."""
    log(message)
    with open(cfg.path("logs", f"{name}.log"), "a") as out:
        out.write(f"sandbox: {message}\n")


def log_tail(cfg: Config, name: str, lines: int = 20) -> str:
    try:
        text = cfg.path("logs", f"{name}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_for(what: str, predicate, timeout: float, cfg: Config | None = None, process: str | None = None):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if cfg is not None and process is not None and recorded_pid(cfg, process) is None:
            raise SandboxError(f"{what}: {process} exited; its log ({cfg.path('logs', process + '.log')}) ends with:\n"
                               f"{log_tail(cfg, process)}")
        if time.monotonic() > deadline:
            detail = f"; see {cfg.path('logs', process + '.log')}" if cfg is not None and process else ""
            raise SandboxError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(0.2)


# --- root filesystem -------------------------------------------------------------------------------------------


def host_mirrors(os_: OperatingSystem) -> tuple[str, str]:
    """The archive and security mirrors for os_: for Debian, those the controller's own apt uses for that
    suite (deb.debian.org otherwise); for Ubuntu, Ubuntu's own."""
    if os_.distribution == "ubuntu":
        return UBUNTU_ARCHIVE, UBUNTU_SECURITY
    suite = os_.suite
    archive, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    entries: list[tuple[str, list[str]]] = []
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        try:
            text = source.read_text()
        except OSError:
            continue
        if source.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
                for uri in fields.get("URIs", "").split():
                    entries.append((uri, fields.get("Suites", "").split()))
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    entries.append((words[1], [words[2]]))
    found_archive = next((uri for uri, suites in entries if suite in suites), None)
    found_security = next((uri for uri, suites in entries if f"{suite}-security" in suites), None)
    return (found_archive or archive).rstrip("/"), (found_security or security).rstrip("/")


def _split_pem(text: str) -> list[str]:
    return re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.DOTALL)


def _normalise_pem(pem: str) -> str:
    return "".join(pem.split())


def rootfs_stamp(os_: OperatingSystem) -> str:
    archive, security = host_mirrors(os_)
    bundle = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b""
    return json.dumps({
        "recipe": ROOTFS_RECIPE, "os": os_.name, "suite": os_.suite, "archive": archive, "security": security,
        "packages": ROOTFS_PACKAGES + list(os_.cloud_packages), "login_user": os_.login_user,
        "host_ca_bundle_sha256": hashlib.sha256(bundle).hexdigest(),
    }, sort_keys=True)


STAMP_PATH = "etc/mlapi-sandbox-rootfs.json"


def ensure_rootfs(cfg: Config) -> None:
    """Build the cached root filesystem unless a copy made by the current recipe exists."""
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    stamp = rootfs_stamp(cfg.os)
    with open(cfg.cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cfg.rootfs / STAMP_PATH).exists():
            build_rootfs(cfg, stamp)
        remove_unused_rootfs(cfg)


def remove_unused_rootfs(cfg: Config) -> None:
    """Delete this OS's root filesystems of earlier recipes that no mounted host uses any more (and those
    named by suite, as recipes before 5 named them); other OSes keep theirs."""
    mounts = Path("/proc/mounts").read_text()
    for old in [*cfg.cache_dir.glob(f"rootfs-{cfg.os.name}-*"), *cfg.cache_dir.glob("rootfs-bookworm-*")]:
        if old == cfg.rootfs or not old.is_dir() or f"lowerdir={old}," in mounts or f"lowerdir={old}:" in mounts:
            continue
        log(f"removing {old}: built by an earlier recipe, host CA bundle or mirror")
        shutil.rmtree(old)


def ubuntu_keyring(cfg: Config) -> Path:
    """Ubuntu's archive keyring, taken from the ubuntu-keyring package of the suite being built and checked
    against the fingerprints pinned above (Debian has no package of it). Kept in the cache once checked."""
    os_ = cfg.os
    keyring = cfg.cache_dir / f"ubuntu-archive-keyring-{os_.suite}.gpg"
    if keyring.exists():
        check_ubuntu_keyring(keyring)
        return keyring
    index_url = f"{UBUNTU_ARCHIVE}/dists/{os_.suite}/main/binary-amd64/Packages.xz"
    try:
        with urllib.request.urlopen(index_url, timeout=60) as response:
            index = lzma.decompress(response.read()).decode()
    except (OSError, http.client.HTTPException, ValueError, lzma.LZMAError) as exc:
        raise SandboxError(f"cannot read {index_url} ({exc}); check that the Ubuntu archive is reachable") from None
    stanza = next((s for s in index.split("\n\n") if re.search(r"^Package: ubuntu-keyring$", s, re.MULTILINE)), "")
    filename = re.search(r"^Filename: (\S+)$", stanza, re.MULTILINE)
    if filename is None:
        raise SandboxError(f"{index_url} lists no ubuntu-keyring package")
    work = cfg.cache_dir / f".ubuntu-keyring-{os_.suite}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        deb = work / "ubuntu-keyring.deb"
        url = f"{UBUNTU_ARCHIVE}/{filename.group(1)}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                deb.write_bytes(response.read())
        except (OSError, http.client.HTTPException) as exc:
            raise SandboxError(f"cannot download {url} ({exc})") from None
        run("dpkg-deb", "-x", str(deb), str(work / "x"))
        extracted = work / "x/usr/share/keyrings/ubuntu-archive-keyring.gpg"
        if not extracted.exists():
            raise SandboxError(f"{url} holds no usr/share/keyrings/ubuntu-archive-keyring.gpg")
        check_ubuntu_keyring(extracted)
        tmp = keyring.with_name(keyring.name + ".tmp")
        shutil.copyfile(extracted, tmp)
        os.replace(tmp, keyring)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return keyring


def keyring_fingerprints(keyring: Path) -> list[str]:
    """The primary key fingerprints of an OpenPGP keyring file, read without any GnuPG home of the caller's."""
    home = tempfile.mkdtemp(prefix="mlapi-sandbox-gnupg-")
    try:
        result = run("gpg", "--homedir", home, "--batch", "--with-colons", "--show-keys", str(keyring))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    fingerprints, expect_fpr = [], False
    for line in result.stdout.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            expect_fpr = True
        elif fields[0] == "fpr" and expect_fpr:
            fingerprints.append(fields[9])
            expect_fpr = False
        elif fields[0] == "sub":
            expect_fpr = False
    return fingerprints


def check_ubuntu_keyring(keyring: Path) -> None:
    found = keyring_fingerprints(keyring)
    unknown = [f for f in found if f not in UBUNTU_ARCHIVE_KEYS]
    if unknown or UBUNTU_REQUIRED_KEY not in found:
        raise SandboxError(
            f"{keyring} holds keys {', '.join(found) or '(none)'}; expected only the pinned Ubuntu archive keys "
            f"({', '.join(UBUNTU_ARCHIVE_KEYS)}) including {UBUNTU_REQUIRED_KEY}. Delete the file to fetch it "
            "again, or update UBUNTU_ARCHIVE_KEYS in scripts/sandbox/lab.py after checking a new key")


def build_rootfs(cfg: Config, stamp: str) -> None:
    os_ = cfg.os
    archive, security = host_mirrors(os_)
    partial = cfg.rootfs.with_name(cfg.rootfs.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    packages = ",".join(ROOTFS_PACKAGES + list(os_.cloud_packages))
    debootstrap = ["debootstrap", "--variant=minbase", f"--include={packages}"]
    if os_.distribution == "ubuntu":
        keyring = ubuntu_keyring(cfg)
        debootstrap += [f"--keyring={keyring}", f"--components={os_.components.replace(' ', ',')}"]
        # Debian 12's debootstrap has no script by the name of newer Ubuntu suites; gutsy's serves them all.
        debootstrap += [os_.suite, str(partial), archive, "/usr/share/debootstrap/scripts/gutsy"]
        signed_by = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
    else:
        debootstrap += ["--keyring=/usr/share/keyrings/debian-archive-keyring.gpg", os_.suite, str(partial), archive]
        signed_by = "/usr/share/keyrings/debian-archive-keyring.gpg"
    log(f"building the {os_.label} root filesystem in {cfg.rootfs} from {archive} (a few minutes, once)")
    started = time.monotonic()
    result = subprocess.run(debootstrap, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise SandboxError(f"debootstrap failed; check that {archive} is reachable:\n{tail}")

    etc = partial / "etc"
    (etc / "apt" / "sources.list").unlink(missing_ok=True)
    for leftover in (etc / "apt" / "sources.list.d").glob("*"):
        leftover.unlink()
    (etc / "apt" / "sources.list.d" / f"{os_.distribution}.sources").write_text(
        f"Types: deb\nURIs: {archive}\nSuites: {os_.suite} {os_.suite}-updates\nComponents: {os_.components}\n"
        f"Signed-By: {signed_by}\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {os_.suite}-security\nComponents: {os_.components}\n"
        f"Signed-By: {signed_by}\n"
    )
    # Trust the certificates the controller trusts beyond the distribution's set (a TLS-intercepting proxy's
    # CA), as local CAs, so that update-ca-certificates keeps them on every later run inside the host.
    own = {_normalise_pem(p) for p in _split_pem((etc / "ssl/certs/ca-certificates.crt").read_text())}
    extra = [p for p in _split_pem(HOST_CA_BUNDLE.read_text()) if _normalise_pem(p) not in own]
    local_ca_dir = partial / "usr/local/share/ca-certificates"
    local_ca_dir.mkdir(parents=True, exist_ok=True)
    for number, pem in enumerate(extra, 1):
        (local_ca_dir / f"mlapi-sandbox-host-ca-{number}.crt").write_text(pem + "\n")
    run("chroot", str(partial), "update-ca-certificates", "--fresh")
    if os_.distribution == "ubuntu":
        run("chroot", str(partial), "locale-gen", "en_US.UTF-8")
    else:
        (etc / "locale.gen").write_text("en_US.UTF-8 UTF-8\n")
        run("chroot", str(partial), "locale-gen")
    (etc / "default" / "locale").write_text("LANG=C.UTF-8\n")
    # The cloud image's login user, with the sudo rule cloud-init writes for it.
    user = os_.login_user
    run("chroot", str(partial), "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "adm,sudo", user)
    run("chroot", str(partial), "passwd", "--lock", user)
    sudoers = etc / "sudoers.d" / "90-cloud-init-users"
    sudoers.write_text(f"# Created by cloud-init\n\n# User rules for {user}\n{user} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    run("chroot", str(partial), "visudo", "--check", "--quiet")
    # Per-host identity is written at boot: host keys, machine-id, hostname.
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    (etc / "machine-id").write_text("")
    (partial / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (etc / "hostname").write_text("localhost\n")
    # Nobody logs in on the container's console (its output goes to a log file).
    for unit in ("console-getty.service", "getty@tty1.service"):
        (etc / "systemd/system" / unit).unlink(missing_ok=True)
        (etc / "systemd/system" / unit).symlink_to("/dev/null")
    run("chroot", str(partial), "apt-get", "clean")
    # No package lists, as in a cloud image: the first apt run fetches them for every configured suite
    # (debootstrap's cover the release alone, not -updates or -security).
    for lists in (partial / "var/lib/apt/lists").glob("*"):
        if lists.is_file():
            lists.unlink()
    (partial / STAMP_PATH).write_text(stamp)
    if cfg.rootfs.exists():
        shutil.rmtree(cfg.rootfs)  # an unfinished copy: finished ones carry the stamp
    partial.rename(cfg.rootfs)
    log(f"root filesystem ready in {time.monotonic() - started:.0f}s")


# --- network namespaces ----------------------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def our_namespaces() -> list[str]:
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n == LAB_NS or re.fullmatch(rf"{PREFIX}-sb\d+", n))


def create_lab(cfg: Config) -> None:
    run("ip", "netns", "add", LAB_NS)
    lab = ("ip", "-n", LAB_NS)
    # First the routes that keep every packet for the sandbox range (and anything else) inside:
    # the lab has no uplink, and these stay in force even while the bridge is down or gone.
    run(*lab, "route", "add", "unreachable", str(cfg.subnet), "metric", "4294967295")
    run(*lab, "route", "add", "unreachable", "default")
    run(*lab, "link", "set", "lo", "up")
    run(*lab, "link", "add", BRIDGE, "type", "bridge")
    run(*lab, "addr", "add", f"{cfg.gateway}/{cfg.subnet.prefixlen}", "dev", BRIDGE)
    run(*lab, "link", "set", BRIDGE, "up")


def create_host_network(cfg: Config, host: Host) -> None:
    run("ip", "netns", "add", host.netns)
    ns = ("ip", "-n", host.netns)
    run(*ns, "route", "add", "unreachable", str(cfg.subnet), "metric", "4294967295")
    run(*ns, "link", "set", "lo", "up")
    # Both ends are created inside namespaces: the veth never appears in the caller's namespace.
    run("ip", "-n", LAB_NS, "link", "add", host.lab_if, "type", "veth", "peer", "name", HOST_IF, "netns", host.netns)
    run("ip", "-n", LAB_NS, "link", "set", host.lab_if, "master", BRIDGE, "up")
    run(*ns, "addr", "add", f"{host.private_ip}/{cfg.subnet.prefixlen}", "dev", HOST_IF)
    run(*ns, "link", "set", HOST_IF, "up")
    run(*ns, "route", "add", "default", "via", cfg.gateway, "dev", HOST_IF)


# --- TLS material for the ACME CA's own listener ---------------------------------------------------------------


def make_pebble_tls(cfg: Config) -> None:
    pebble_dir = cfg.path("pebble")
    pebble_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = pebble_dir / "tls-ca.key", cfg.pebble_tls_ca
    key, csr, cert = pebble_dir / "tls.key", pebble_dir / "tls.csr", pebble_dir / "tls.pem"
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "30", "-subj", "/CN=mlapi sandbox ACME TLS CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=mlapi sandbox ACME server")
    ext = pebble_dir / "tls.ext"
    ext.write_text(f"subjectAltName=IP:{cfg.gateway},IP:{cfg.services_relay_ip}\n"
                   "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "30", "-extfile", str(ext))


# --- services in the lab ---------------------------------------------------------------------------------------


def choose_relay_ports(cfg: Config) -> dict[int, int]:
    """For each relayed port of the hosts, the port the relay listens on: the same one if it is free."""
    chosen = {}
    for port in RELAYED_HOST_PORTS:
        for candidate in (port, port + RELAY_FALLBACK_OFFSET):
            if all(_can_listen(host.relay_ip, candidate) for host in cfg.hosts):
                chosen[port] = candidate
                break
        else:
            raise SandboxError(f"ports {port} and {port + RELAY_FALLBACK_OFFSET} are taken on {cfg.loopback}; "
                               "stop the service listening there on every address, or set MLAPI_SANDBOX_LOOPBACK")
        if chosen[port] != port:
            log(f"port {port} is taken on every address of this machine; the hosts' port {port} is relayed "
                f"from port {chosen[port]} (see .sandbox/env)")
    return chosen


def _can_listen(addr: str, port: int) -> bool:
    import socket
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((addr, port))
            probe.listen()
        except OSError:
            return False
    return True


def relay_ports(cfg: Config) -> dict[int, int]:
    try:
        saved = json.loads(cfg.path("state.json").read_text())["ports"]
    except (OSError, ValueError, KeyError):
        return {port: port for port in RELAYED_HOST_PORTS}
    return {int(port): int(relayed) for port, relayed in saved.items()}


def start_relay(cfg: Config) -> None:
    lab = f"/run/netns/{LAB_NS}"
    ports = relay_ports(cfg)
    rules = []
    for host in cfg.hosts:
        rules += [f"self,{host.relay_ip},{ports[port]},{lab},{host.private_ip},{port}" for port in RELAYED_HOST_PORTS]
    for port in (PEBBLE_PORT, PEBBLE_MANAGEMENT_PORT, CHALLTESTSRV_MANAGEMENT_PORT):
        rules.append(f"self,{cfg.services_relay_ip},{port},{lab},{cfg.gateway},{port}")
    # The hosts' only way out: the proxy address on the bridge leads to tinyproxy on the caller's loopback.
    rules.append(f"{lab},{cfg.gateway},{PROXY_PORT},self,{cfg.services_relay_ip},{TINYPROXY_PORT}")
    ready = cfg.path("relay.ready")
    ready.unlink(missing_ok=True)
    spawn(cfg, "relay", [sys.executable, str(RELAY), "--ready-file", str(ready), *rules])
    wait_for("the relay to listen", ready.exists, 15, cfg, "relay")


def start_tinyproxy(cfg: Config) -> None:
    proxy_dir = cfg.path("tinyproxy")
    proxy_dir.mkdir(parents=True, exist_ok=True)
    filter_file = proxy_dir / "filter"
    # Refuse address literals and local names: the proxy forwards only to registries named by DNS,
    # never to the sandbox range or any other private address.
    filter_file.write_text("^[0-9.]+$\n^\\[\n^localhost$\n\\.test$\n\\.local$\n\\.internal$\n")
    conf = proxy_dir / "tinyproxy.conf"
    conf.write_text(
        f"Port {TINYPROXY_PORT}\nListen {cfg.services_relay_ip}\nTimeout 600\nMaxClients 200\n"
        "User nobody\nGroup nogroup\nLogLevel Notice\nDisableViaHeader Yes\n"
        "Allow 127.0.0.0/8\nConnectPort 443\nConnectPort 80\n"
        f'Filter "{filter_file}"\nFilterType ere\nFilterURLs Off\nFilterDefaultDeny No\n'
    )
    spawn(cfg, "tinyproxy", ["tinyproxy", "-d", "-c", str(conf)])
    wait_for("tinyproxy to listen", lambda: _tcp_open(cfg.services_relay_ip, TINYPROXY_PORT), 15, cfg, "tinyproxy")


def _tcp_open(addr: str, port: int) -> bool:
    import socket
    with contextlib.suppress(OSError), socket.create_connection((addr, port), timeout=1):
        return True
    return False


def start_acme(cfg: Config) -> None:
    lb = next(h for h in cfg.hosts if "lb" in h.groups)
    spawn(cfg, "challtestsrv", [
        "ip", "netns", "exec", LAB_NS, "pebble-challtestsrv",
        "-dns01", f"{cfg.gateway}:{CHALLTESTSRV_DNS_PORT}",
        "-management", f"{cfg.gateway}:{CHALLTESTSRV_MANAGEMENT_PORT}",
        "-http01", "", "-https01", "", "-tlsalpn01", "",
        "-defaultIPv4", lb.private_ip, "-defaultIPv6", "",
    ])
    pebble_dir = cfg.path("pebble")
    config = pebble_dir / "pebble-config.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"{cfg.gateway}:{PEBBLE_PORT}",
        "managementListenAddress": f"{cfg.gateway}:{PEBBLE_MANAGEMENT_PORT}",
        "certificate": str(pebble_dir / "tls.pem"),
        "privateKey": str(pebble_dir / "tls.key"),
        # Validation connects where Let's Encrypt would: port 80 (HTTP-01) and 443 (TLS-ALPN-01).
        "httpPort": 80,
        "tlsPort": 443,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
        # Let's Encrypt's lifetime (Pebble's own default is five years), so that TLS scanners judge the
        # sandbox's certificates as they would a real one, and renewal timing behaves the same.
        "certificateValidityPeriod": 90 * 24 * 3600,
    }}, indent=2))
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
    spawn(cfg, "pebble", [
        "ip", "netns", "exec", LAB_NS, "pebble", "-config", str(config),
        "-dnsserver", f"{cfg.gateway}:{CHALLTESTSRV_DNS_PORT}",
    ], env=env)
    add_a = f"http://{cfg.services_relay_ip}:{CHALLTESTSRV_MANAGEMENT_PORT}/add-a"
    wait_for("challtestsrv's management API",
             lambda: _http_post(add_a, {"host": cfg.domain, "addresses": [lb.private_ip]}), 20, cfg, "challtestsrv")
    tls = ssl.create_default_context(cafile=str(cfg.pebble_tls_ca))
    management = f"https://{cfg.services_relay_ip}:{PEBBLE_MANAGEMENT_PORT}"
    root = wait_for("pebble's management API", lambda: _https_get(f"{management}/roots/0", tls), 30, cfg, "pebble")
    cfg.pebble_root.write_text(root)
    wait_for("pebble's ACME directory", lambda: _https_get(f"https://{cfg.services_relay_ip}:{PEBBLE_PORT}/dir", tls),
             30, cfg, "pebble")


# The relay's addresses are local: never send these requests through a proxy from the caller's environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_post(url: str, body: dict) -> bool:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with _DIRECT.open(request, timeout=5) as response:
            response.read()
            return True
    except (OSError, http.client.HTTPException):
        return False


def _https_get(url: str, tls: ssl.SSLContext) -> str | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls))
    try:
        with opener.open(url, timeout=5) as response:
            return response.read().decode()
    except (OSError, http.client.HTTPException):  # not listening yet: the relay closes the connection
        return None


# --- hosts -----------------------------------------------------------------------------------------------------


def host_dir(cfg: Config, host: Host) -> Path:
    return cfg.path("hosts", host.name)


def prepare_host(cfg: Config, host: Host) -> None:
    """Mount an overlay of the cached root filesystem and give it this host's identity."""
    base = host_dir(cfg, host)
    upper, work, root = base / "upper", base / "work", base / "root"
    for d in (upper, work, root):
        d.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={cfg.rootfs},upperdir={upper},workdir={work}", str(root))
    etc = root / "etc"
    (etc / "hostname").write_text(f"{host.name}\n")
    hosts_lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{host.name}", "::1\tlocalhost ip6-localhost ip6-loopback"]
    hosts_lines += [f"{h.private_ip}\t{h.name}" for h in cfg.hosts if h != host]
    (etc / "hosts").write_text("\n".join(hosts_lines) + "\n")
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    (etc / "resolv.conf").unlink(missing_ok=True)
    # No resolver: the hosts reach the registries only through the proxy, which resolves names itself.
    (etc / "resolv.conf").write_text("# sandbox host: no DNS; package registries are reached through the HTTP proxy\n")
    (etc / "apt/apt.conf.d/80mlapi-sandbox-proxy").write_text(
        f'Acquire::http::Proxy "{cfg.proxy_url}";\nAcquire::https::Proxy "{cfg.proxy_url}";\n')
    # The key cloud-init would install for the login user; root's is for the sandbox's own checks.
    user = cfg.os.login_user
    passwd = {line.split(":")[0]: line.split(":") for line in (etc / "passwd").read_text().splitlines()}
    for home, uid, gid in (("root", 0, 0), (f"home/{user}", int(passwd[user][2]), int(passwd[user][3]))):
        ssh_dir = root / home / ".ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        authorized.write_text(cfg.ssh_key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        for path in (ssh_dir, authorized):
            os.chown(path, uid, gid)
    run("ssh-keygen", "-A", "-f", str(root))


def boot_host(cfg: Config, host: Host) -> None:
    root = host_dir(cfg, host) / "root"
    # --register=no/--keep-unit: the controller need not run systemd; nspawn runs as a plain process.
    # nspawn grants CAP_NET_ADMIN and a writable /proc/sys/net only for networks it creates itself; the
    # namespace here is private to the host all the same, and its firewall (ufw) needs both.
    spawn(cfg, host.name, [
        "systemd-nspawn", "--boot", "--register=no", "--keep-unit", f"--directory={root}",
        f"--machine={host.name}", f"--hostname={host.name}",
        f"--network-namespace-path=/run/netns/{host.netns}", "--capability=CAP_NET_ADMIN",
        "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=read-only",
    ], env=dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network"))


def ssh_command(cfg: Config, host: Host, command: str) -> list[str]:
    return ["ssh", "-i", str(cfg.ssh_key), "-p", str(relay_ports(cfg)[22]), *SSH_OPTIONS, f"root@{host.relay_ip}",
            command]


def wait_host_ready(cfg: Config, host: Host, fresh: bool = False) -> str:
    """Wait until host has booted and return systemd's state; fresh: its disk is the base root filesystem's."""
    def system_state() -> str | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            result = subprocess.run(ssh_command(cfg, host, "systemctl is-system-running --wait"),
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return state
        time.sleep(0.5)
        return None

    state = wait_for(f"{host.name} to boot and answer SSH", system_state, BOOT_TIMEOUT, cfg, host.name)
    if state == "degraded" and fresh:
        return retry_failed_units(cfg, host)
    if state == "degraded":
        report_failed_units(cfg, host)
    return state


def _host_ssh(cfg: Config, host: Host, command: str) -> str:
    return subprocess.run(ssh_command(cfg, host, command), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60).stdout.strip()


def report_failed_units(cfg: Config, host: Host) -> list[str]:
    """Log a degraded host's failed units with their journal, to stderr and the host's log; return the units."""
    units = [line.split()[0] for line in _host_ssh(cfg, host, "systemctl --failed --no-legend --plain").splitlines()
             if line.strip()]
    journal = (_host_ssh(cfg, host, "journalctl -b --no-pager -o short-monotonic " + " ".join(f"-u {u}" for u in units))
               if units else "")
    note(cfg, host.name, f"{host.name} booted degraded; failed units: {' '.join(units) or '(none listed)'}\n{journal}")
    return units


def retry_failed_units(cfg: Config, host: Host) -> str:
    """Report why units of a freshly booted host failed, start them once more, and return the state after that.

    Only for hosts booted from the base root filesystem, with nothing of the playbooks on them: a failed unit
    there is one of the distribution's own (seen: systemd-update-utmp and systemd-user-sessions, once in many
    boots on a loaded machine), not the kit's. A second failure leaves the host degraded. A host booted again
    after a power cut is reported (report_failed_units) and left as it comes up."""
    units = report_failed_units(cfg, host)
    if not units:
        return "degraded"
    _host_ssh(cfg, host, "systemctl start " + " ".join(units))
    state = _host_ssh(cfg, host, "systemctl is-system-running") or "unreachable"
    note(cfg, host.name, f"{host.name}: started {' '.join(units)} again; systemd is {state}")
    return state


def stop_host(cfg: Config, host: Host) -> None:
    # SIGTERM makes systemd-nspawn power the container off cleanly; a stuck one is killed after the timeout.
    pid = recorded_pid(cfg, host.name)
    if pid is not None:
        leader = _container_leader(pid)
        stop_pid(pid)
        if leader is not None and _start_time(leader[0]) == leader[1]:
            stop_pid(leader[0], signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        cfg.path("pids", f"{host.name}.pid").unlink()


def _container_leader(nspawn_pid: int) -> tuple[int, str | None] | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
        pid = int(children[0])
        return pid, _start_time(pid)
    return None


# --- outputs ---------------------------------------------------------------------------------------------------


def write_outputs(cfg: Config) -> dict[str, str]:
    hosts = cfg.hosts
    lb = next(h for h in hosts if "lb" in h.groups)
    apps = [h for h in hosts if "app" in h.groups]
    ports = relay_ports(cfg)
    no_proxy = ",".join(["localhost", "127.0.0.1", cfg.gateway, cfg.domain,
                         *(h.private_ip for h in hosts), *(h.name for h in hosts)])
    env = {
        "SANDBOX_OS": cfg.os.name,
        "SANDBOX_USER": cfg.os.login_user,
        "SANDBOX_DOMAIN": cfg.domain,
        "SANDBOX_IP": lb.relay_ip,
        "SANDBOX_SSH_PORT": str(ports[22]),
        "SANDBOX_HTTP_PORT": str(ports[80]),
        "SANDBOX_HTTPS_PORT": str(ports[443]),
        "SANDBOX_INTERNAL_IP": lb.private_ip,
        "SANDBOX_APP_IPS": " ".join(h.relay_ip for h in apps),
        "SANDBOX_HOSTS": " ".join(h.name for h in hosts),
        "SANDBOX_HOST_IPS": " ".join(h.relay_ip for h in hosts),
        "SANDBOX_HOST_PRIVATE_IPS": " ".join(h.private_ip for h in hosts),
        "SANDBOX_CA": str(cfg.pebble_root),
        "SANDBOX_SSH_KEY": str(cfg.ssh_key),
        "SANDBOX_INVENTORY": str(cfg.path("inventory", "hosts.yml")),
        "SANDBOX_VAULT_PASSWORD_FILE": str(vault_password_file(cfg)),
        "SANDBOX_ACME_DIRECTORY": cfg.acme_directory,
        "SANDBOX_ACME_TLS_CA": str(cfg.pebble_tls_ca),
        "SANDBOX_ACME_MANAGEMENT": f"https://{cfg.services_relay_ip}:{PEBBLE_MANAGEMENT_PORT}",
        "SANDBOX_DNS_MANAGEMENT": f"http://{cfg.services_relay_ip}:{CHALLTESTSRV_MANAGEMENT_PORT}",
        "SANDBOX_PROXY": cfg.proxy_url,
        "SANDBOX_NO_PROXY": no_proxy,
    }
    lines = ["# Written by scripts/sandbox/sandbox up; removed by `sandbox down`."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    _write_atomic(cfg.path("env"), "\n".join(lines) + "\n")

    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid YAML scalar

    inv = [
        "# Sandbox hosts, written by scripts/sandbox/sandbox up. Use together with deploy/ansible/inventories/sandbox.",
        "all:",
        "  vars:",
        f"    ansible_user: {q(cfg.os.login_user)}",
        "    ansible_become: true",
        f"    ansible_ssh_private_key_file: {q(str(cfg.ssh_key))}",
        f"    ansible_ssh_common_args: {q('-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null')}",
        "    ansible_python_interpreter: /usr/bin/python3",
        f"    sandbox_domain: {q(cfg.domain)}",
        f"    sandbox_acme_directory: {q(cfg.acme_directory)}",
        f"    sandbox_acme_tls_ca: {q(str(cfg.pebble_tls_ca))}",
        f"    sandbox_proxy: {q(cfg.proxy_url)}",
        f"    sandbox_no_proxy: {q(no_proxy)}",
        f"    sandbox_host_ca_bundle: {q(str(HOST_CA_BUNDLE))}",
        # The secret a real deployment keeps in its vault (inventories/ec2/group_vars/all/vault.yml).
        f"    vault_redis_password: {q(redis_password(cfg))}",
        "  children:",
    ]
    for group in ("lb", "app", "redis"):
        inv += [f"    {group}:", "      hosts:"]
        for h in hosts:
            if group in h.groups:
                inv += [f"        {h.name}:",
                        f"          ansible_host: {h.relay_ip}",
                        f"          ansible_port: {ports[22]}",
                        f"          private_ip: {h.private_ip}"]
    inv_path = cfg.path("inventory", "hosts.yml")
    inv_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(inv_path, "\n".join(inv) + "\n", mode=0o600)
    return env


def redis_password(cfg: Config) -> str:
    """The sandbox's Redis password: made once, kept while the sandbox is up (its hosts hold it)."""
    path = cfg.path("redis-password")
    if not path.exists():
        _write_atomic(path, secrets.token_hex(24) + "\n", mode=0o600)
    return path.read_text().strip()


def vault_password_file(cfg: Config) -> Path:
    """The sandbox's Ansible Vault password (what encrypts the certificate backup): made once, mode 0600."""
    path = cfg.path("vault-password")
    if not path.exists():
        _write_atomic(path, secrets.token_urlsafe(32) + "\n", mode=0o600)
    return path


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def save_state(cfg: Config, ports: dict[int, int]) -> None:
    _write_atomic(cfg.path("state.json"), json.dumps({
        "hosts": cfg.host_count, "os": cfg.os_name, "subnet": str(cfg.subnet), "loopback": str(cfg.loopback),
        "domain": cfg.domain, "cache_dir": str(cfg.cache_dir), "ports": ports,
    }, indent=2) + "\n")


def load_config() -> Config | None:
    """The configuration the running sandbox was brought up with, if any."""
    try:
        state = json.loads(STATE_DIR.joinpath("state.json").read_text())
    except (OSError, ValueError):
        return None
    return Config(cache_dir=Path(state["cache_dir"]), subnet=ipaddress.IPv4Network(state["subnet"]),
                  loopback=ipaddress.IPv4Network(state["loopback"]), domain=state["domain"],
                  host_count=int(state["hosts"]), os_name=state.get("os", "debian-12"))


# --- commands --------------------------------------------------------------------------------------------------


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise SandboxError("run as root: the sandbox creates network namespaces, mounts and containers")
    missing = sorted({pkg for cmd, pkg in REQUIRED_COMMANDS.items() if shutil.which(cmd) is None})
    if missing:
        raise SandboxError(f"missing packages: {' '.join(missing)}; install them with scripts/setup-host.sh")


def is_up(cfg: Config) -> bool:
    """Whether the sandbox's network, services and host disks are all in place (hosts may be powered off)."""
    mounts = _our_mounts(cfg)
    return (all(recorded_pid(cfg, n) is not None for n in ("relay", "tinyproxy", "challtestsrv", "pebble"))
            and all(netns_exists(ns) for ns in [LAB_NS, *(h.netns for h in cfg.hosts)])
            and all(str(host_dir(cfg, h) / "root") in mounts for h in cfg.hosts)
            and cfg.path("env").exists() and cfg.pebble_root.exists())


def cmd_up(host_count: int, os_name: str | None = None) -> dict[str, str]:
    check_prerequisites()
    cfg = Config.from_env(host_count, os_name)
    # Both ranges hold the network address, the lab's own address and the broadcast address besides the hosts.
    most = min(cfg.subnet.num_addresses, cfg.loopback.num_addresses) - 3
    if not 1 <= host_count <= most:
        raise SandboxError(f"--hosts {host_count}: choose between 1 and {most}")
    running = load_config()
    if running == cfg and is_up(cfg):
        # Already up as asked: boot any host that was powered off, check every host answers, and hand
        # back the same environment. The hosts keep their disks: a provisioned host stays provisioned.
        with concurrent.futures.ThreadPoolExecutor(len(cfg.hosts)) as pool:
            list(pool.map(lambda h: start_host(cfg, h), cfg.hosts))
        return write_outputs(cfg)
    cmd_down(quiet=True)
    started = time.monotonic()
    ensure_rootfs(cfg)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / STATE_MARKER).touch()
    save_state(cfg, choose_relay_ports(cfg))
    key = cfg.ssh_key
    key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mlapi-sandbox", "-f", str(key))
    make_pebble_tls(cfg)
    create_lab(cfg)
    for host in cfg.hosts:
        create_host_network(cfg, host)
    start_tinyproxy(cfg)
    start_relay(cfg)
    start_acme(cfg)
    for host in cfg.hosts:
        prepare_host(cfg, host)
        boot_host(cfg, host)
    with concurrent.futures.ThreadPoolExecutor(len(cfg.hosts)) as pool:
        list(pool.map(lambda h: wait_host_ready(cfg, h, fresh=True), cfg.hosts))
    env = write_outputs(cfg)
    log(f"{len(cfg.hosts)} host(s) up in {time.monotonic() - started:.0f}s")
    return env


STATE_MARKER = ".mlapi-sandbox"


def check_state_dir(state_dir: Path) -> None:
    """down kills what runs with the state directory's files, unmounts and deletes it: only ever a directory the
    sandbox made (its marker), the checkout's own .sandbox, or a new or empty one."""
    if state_dir == Path("/") or REPO.is_relative_to(state_dir):
        raise SandboxError(f"MLAPI_SANDBOX_STATE={state_dir} would hold the checkout: choose a directory of its own")
    if (not state_dir.exists() or state_dir == REPO / ".sandbox" or (state_dir / STATE_MARKER).exists()
            or not any(state_dir.iterdir())):
        return
    raise SandboxError(f"{state_dir} holds files that no sandbox wrote (no {STATE_MARKER}): choose another "
                       "MLAPI_SANDBOX_STATE, since down would delete that directory")


def cmd_down(quiet: bool = False) -> None:
    check_prerequisites()
    check_state_dir(STATE_DIR)
    cfg = load_config() or Config.from_env()
    hosts = _hosts_on_disk(cfg)
    with concurrent.futures.ThreadPoolExecutor(max(1, len(hosts))) as pool:
        list(pool.map(lambda h: stop_host(cfg, h), hosts))
    for name in ("pebble", "challtestsrv", "relay", "tinyproxy"):
        stop_recorded(cfg, name)
    # A crash may have lost records: what still runs with this sandbox's files on its command line,
    # or inside its namespaces, was started by it.
    for pid in _processes_using(cfg.state_dir):
        stop_pid(pid)
    for ns in our_namespaces():
        result = run("ip", "netns", "pids", ns, check=False)
        for pid in (int(p) for p in result.stdout.split()):
            stop_pid(pid, signal.SIGKILL)
    for mount_point in _our_mounts(cfg):
        if run("umount", mount_point, check=False).returncode != 0:
            run("umount", "--lazy", mount_point)
    for ns in our_namespaces():
        run("ip", "netns", "delete", ns)
    for host in hosts:
        with contextlib.suppress(OSError):
            Path("/run/systemd/nspawn/propagate", host.name).rmdir()
    if cfg.state_dir.exists():
        shutil.rmtree(cfg.state_dir)
    if not quiet:
        log("sandbox removed")


def _hosts_on_disk(cfg: Config) -> list[Host]:
    """Every host with a record, a directory or a namespace, so a partial start is cleaned too."""
    names = {p.stem for p in cfg.path("pids").glob(f"{PREFIX}-sb*.pid")}
    names |= {p.name for p in cfg.path("hosts").glob(f"{PREFIX}-sb*")}
    names |= {ns for ns in our_namespaces() if ns != LAB_NS}
    count = max([int(n.rsplit("sb", 1)[1]) for n in names] + [cfg.host_count])
    return Config(cfg.cache_dir, cfg.subnet, cfg.loopback, cfg.domain, count, cfg.os_name).hosts


def _processes_using(state_dir: Path) -> list[int]:
    prefix = str(state_dir).encode() + b"/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(prefix in arg for arg in argv):
            found.append(int(entry.name))
    return found


def _our_mounts(cfg: Config) -> list[str]:
    prefix = str(cfg.state_dir) + "/"
    points = []
    for line in Path("/proc/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def cmd_status() -> int:
    cfg = load_config()
    if cfg is None:
        print("sandbox: down")
        return 3
    print(f"sandbox: {cfg.host_count} {cfg.os.label} host(s), domain {cfg.domain}, subnet {cfg.subnet}")
    for name in ("relay", "tinyproxy", "challtestsrv", "pebble"):
        pid = recorded_pid(cfg, name)
        print(f"  {name:<14} {'running pid ' + str(pid) if pid else 'stopped'}")
    for host in cfg.hosts:
        pid = recorded_pid(cfg, host.name)
        state = "stopped"
        if pid:
            result = subprocess.run(ssh_command(cfg, host, "systemctl is-system-running"), stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=30)
            state = f"pid {pid}, systemd {result.stdout.strip() or 'unreachable'}"
        print(f"  {host.name:<14} {','.join(host.groups):<14} {host.relay_ip:<14} {host.private_ip:<12} {state}")
    return 0 if is_up(cfg) else 1


def cmd_power_off(name: str) -> None:
    cfg = _running_config()
    host = cfg.host(name)
    # Its port on the bridge goes dark too, as a dead machine's would: peers see connection timeouts
    # and unanswered ARP, not the instant refusals of a live kernel with no listener.
    run("ip", "-n", LAB_NS, "link", "set", host.lab_if, "down")
    stop_host(cfg, host)


def cmd_start(name: str) -> None:
    cfg = _running_config()
    start_host(cfg, cfg.host(name))


def start_host(cfg: Config, host: Host, fresh: bool = False) -> None:
    """Boot host unless it runs, plug it back into the bridge, and wait until it is ready."""
    if recorded_pid(cfg, host.name) is None:
        boot_host(cfg, host)
    run("ip", "-n", LAB_NS, "link", "set", host.lab_if, "up")
    wait_host_ready(cfg, host, fresh)


def cmd_rebuild(name: str) -> None:
    """Replace a host's disk with a fresh copy of the base root filesystem, as re-creating a VM from its image
    does: same name and addresses, new machine-id and SSH host keys, nothing the playbooks installed."""
    cfg = _running_config()
    host = cfg.host(name)
    run("ip", "-n", LAB_NS, "link", "set", host.lab_if, "down")
    stop_host(cfg, host)
    base = host_dir(cfg, host)
    root = base / "root"
    if str(root) in _our_mounts(cfg):
        run("umount", str(root))
    for part in ("upper", "work"):
        shutil.rmtree(base / part, ignore_errors=True)
    prepare_host(cfg, host)
    start_host(cfg, host, fresh=True)


def _running_config() -> Config:
    check_prerequisites()
    cfg = load_config()
    if cfg is None:
        raise SandboxError("the sandbox is not up; run `scripts/sandbox/sandbox up` first")
    return cfg


def main(argv: list[str] | None = None) -> int:
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", PREFIX):
        log(f"error: MLAPI_SANDBOX_NAME={PREFIX!r} must be 1-8 lower-case letters or digits, starting with a letter")
        return 2
    parser = argparse.ArgumentParser(prog="sandbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build and boot the sandbox hosts (idempotent)")
    up.add_argument("--hosts", type=int, default=1, help="number of hosts: 1 = all roles on one, 3 = lb + 2 app")
    up.add_argument("--os", choices=list(OSES), default=None,
                    help=f"the hosts' OS (default: $MLAPI_SANDBOX_OS, else {DEFAULT_OS})")
    sub.add_parser("down", help="remove the sandbox completely")
    sub.add_parser("status", help="show what runs")
    for name, text in (("power-off", "stop one host"), ("start", "boot a stopped host"),
                       ("rebuild", "re-create one host from the base root filesystem and boot it")):
        p = sub.add_parser(name, help=text)
        p.add_argument("host", help="host name, e.g. mlapi-sb2")
    args = parser.parse_args(argv)
    try:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK_FILE, "w") as lock:
            # One sandbox operation at a time: namespace names are machine-wide.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if args.command == "up":
                env = cmd_up(args.hosts, args.os)
                for key, value in env.items():
                    print(f"{key}={shlex.quote(value)}")
            elif args.command == "down":
                cmd_down()
            elif args.command == "status":
                return cmd_status()
            elif args.command == "power-off":
                cmd_power_off(args.host)
            elif args.command == "start":
                cmd_start(args.host)
            elif args.command == "rebuild":
                cmd_rebuild(args.host)
    except SandboxError as exc:
        log(f"error: {exc}")
        return 1
    return 0

