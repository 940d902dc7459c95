"""A sandbox of the tests' own, from up to down: the caller's network never changes, the hosts boot
systemd to "running", a host's firewall works inside its own namespace, the ACME CA validates HTTP-01
on the lb host, a host survives a power cycle, and down leaves nothing behind.

These tests run first in the session (see conftest.py), before any test uses the shared sandbox."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.harness.sandbox import Sandbox
from scripts.sandbox.lab import LAB_NS, PREFIX, STATE_DIR, host_name, load_config, retry_failed_units

pytestmark = pytest.mark.e2e

OUR_NAMESPACES = (LAB_NS, f"{PREFIX}-sb")
PROBE_PORT = 8080


def caller_network() -> dict[str, str]:
    """What the caller's network namespace looks like: it must never change."""
    commands = {
        "links": ["-br", "link"],
        "addresses": ["-br", "addr"],
        "routes": ["route", "show", "table", "all"],
        "routes6": ["-6", "route", "show", "table", "all"],
    }
    return {what: subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
            for what, args in commands.items()}


def our_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(OUR_NAMESPACES)]


def our_mounts() -> list[str]:
    lines = Path("/proc/mounts").read_text().splitlines()
    return [line for line in lines if str(STATE_DIR) in line or "nspawn" in line]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def network_before() -> dict[str, str]:
    return caller_network()


@pytest.fixture(scope="module")
def own_sandbox(network_before: dict[str, str]) -> Iterator[Sandbox]:
    box = Sandbox.up(hosts=2)
    yield box
    Sandbox.down()  # a no-op once test_down_leaves_nothing_behind has run


def test_up_leaves_the_callers_network_unchanged(own_sandbox: Sandbox, network_before: dict[str, str]) -> None:
    assert caller_network() == network_before


@pytest.mark.parametrize("host", [host_name(1), host_name(2)])
def test_each_host_boots_systemd_as_pid_1_to_running(own_sandbox: Sandbox, host: str) -> None:
    result = own_sandbox.ssh(host, "ps -o comm= -p 1; systemctl is-system-running --wait; systemctl --failed --plain;"
                                   " journalctl -b -p warning --no-pager -n 40")
    assert result.stdout.split()[:2] == ["systemd", "running"], result.stdout


FAILS_ONCE = """[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'test -e /run/fails-once || { touch /run/fails-once; echo the first start fails; exit 1; }'
"""


def test_a_unit_that_failed_on_a_fresh_host_is_started_once_more_and_its_journal_kept(own_sandbox: Sandbox) -> None:
    host = own_sandbox.hosts[1]
    cfg = load_config()
    assert cfg is not None
    own_sandbox.ssh(host, "cat > /etc/systemd/system/fails-once.service", input=FAILS_ONCE, check=True)
    own_sandbox.ssh(host, "cat > /etc/systemd/system/fails-always.service; systemctl daemon-reload",
                    input="[Service]\nType=oneshot\nExecStart=/bin/false\n", check=True)
    try:
        assert own_sandbox.ssh(host, "systemctl start fails-once.service").returncode != 0
        assert own_sandbox.ssh(host, "systemctl is-system-running").stdout.strip() == "degraded"

        assert retry_failed_units(cfg, cfg.host(host.name)) == "running"
        log = cfg.path("logs", f"{host.name}.log").read_text(errors="replace")
        assert f"{host.name} booted degraded; failed units: fails-once.service" in log
        assert "the first start fails" in log  # the unit's journal is kept in the host's log
        assert f"{host.name}: started fails-once.service again; systemd is running" in log

        assert own_sandbox.ssh(host, "systemctl start fails-always.service").returncode != 0
        assert retry_failed_units(cfg, cfg.host(host.name)) == "degraded"
    finally:
        own_sandbox.ssh(host, "systemctl stop fails-once.service; rm -f /etc/systemd/system/fails-*.service"
                              " /run/fails-once; systemctl daemon-reload; systemctl reset-failed", check=True)
    assert own_sandbox.ssh(host, "systemctl is-system-running").stdout.strip() == "running"


def test_a_hosts_firewall_filters_its_own_namespace_only(own_sandbox: Sandbox) -> None:
    client, server = own_sandbox.hosts  # the lb host stays open for the ACME test
    own_sandbox.ssh(server, f"systemd-run --unit=probe-listener python3 -m http.server {PROBE_PORT}", check=True)
    probe = f"curl -sS -o /dev/null -w '%{{http_code}}' -m 5 http://{server.private_ip}:{PROBE_PORT}/"
    assert own_sandbox.ssh(client, probe).stdout == "200"

    own_sandbox.ssh(server, "ufw allow 22/tcp && ufw --force enable", check=True)

    assert own_sandbox.ssh(client, probe).returncode == 28  # curl: timed out, the packets were dropped
    # SSH through the relay still answers: the rule for 22 holds.
    assert own_sandbox.ssh(server, "ufw status", check=True).stdout.startswith("Status: active")


def test_the_acme_ca_validates_http_01_on_the_lb_host_and_issues_under_sandbox_ca(
    own_sandbox: Sandbox, tmp_path: Path
) -> None:
    lb = own_sandbox.hosts[0]
    own_sandbox.copy_to(lb, own_sandbox.acme_tls_ca, "/root/acme-tls-ca.pem")
    # The image carries no package lists, as a freshly booted cloud host may not: refresh them first.
    install = own_sandbox.ssh(
        lb, "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q certbot", timeout=600
    )
    assert install.returncode == 0, install.stderr
    # certbot's own web server answers the challenge on port 80, where Pebble fetches it.
    issue = own_sandbox.ssh(
        lb,
        "REQUESTS_CA_BUNDLE=/root/acme-tls-ca.pem certbot certonly --non-interactive --agree-tos "
        f"--email ops@{own_sandbox.domain} --standalone -d {own_sandbox.domain} "
        f"--server {own_sandbox.env['SANDBOX_ACME_DIRECTORY']}",
        timeout=300,
    )
    assert issue.returncode == 0, issue.stdout + issue.stderr
    live = f"/etc/letsencrypt/live/{own_sandbox.domain}"
    for name in ("cert.pem", "chain.pem"):
        (tmp_path / name).write_text(own_sandbox.ssh(lb, f"cat {live}/{name}", check=True).stdout)
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(own_sandbox.ca), "-untrusted", str(tmp_path / "chain.pem"),
         "-verify_hostname", own_sandbox.domain, str(tmp_path / "cert.pem")],
        capture_output=True, text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_powered_off_host_keeps_its_disk_and_boots_again(own_sandbox: Sandbox) -> None:
    host = own_sandbox.hosts[1]
    own_sandbox.ssh(host, "echo kept > /root/marker", check=True)
    own_sandbox.power_off(host.name)
    assert own_sandbox.ssh(host, "true", timeout=60).returncode != 0
    own_sandbox.start(host.name)
    assert own_sandbox.ssh(host, "cat /root/marker", check=True).stdout.strip() == "kept"


def test_down_leaves_nothing_behind(own_sandbox: Sandbox, network_before: dict[str, str]) -> None:
    pids = own_sandbox.recorded_pids()
    assert set(pids) >= {"relay", "tinyproxy", "pebble", "challtestsrv", host_name(1), host_name(2)}
    assert all(alive(pid) for pid in pids.values())
    assert our_namespaces() and our_mounts()

    Sandbox.down()

    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert our_namespaces() == []
    assert our_mounts() == []
    assert caller_network() == network_before
    assert not STATE_DIR.exists()
