"""A sandbox of the tests' own, from up to down: the caller's network never changes, a host's firewall
works inside its own namespace, a host survives a power cycle, and down leaves nothing behind.

These tests run first in the session (see conftest.py), before any test uses the shared sandbox."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import STATE_DIR, Sandbox

pytestmark = pytest.mark.e2e

OUR_NAMESPACES = ("mlapi-lab", "mlapi-sb")
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


def test_a_hosts_firewall_filters_its_own_namespace_only(own_sandbox: Sandbox) -> None:
    server, client = own_sandbox.hosts
    own_sandbox.ssh(server, f"systemd-run --unit=probe-listener python3 -m http.server {PROBE_PORT}", check=True)
    probe = f"curl -sS -o /dev/null -w '%{{http_code}}' -m 5 http://{server.private_ip}:{PROBE_PORT}/"
    assert own_sandbox.ssh(client, probe).stdout == "200"

    own_sandbox.ssh(server, "ufw allow 22/tcp && ufw --force enable", check=True)

    assert own_sandbox.ssh(client, probe).returncode == 28  # curl: timed out, the packets were dropped
    # SSH through the relay still answers: the rule for 22 holds.
    assert own_sandbox.ssh(server, "ufw status", check=True).stdout.startswith("Status: active")


def test_a_powered_off_host_keeps_its_disk_and_boots_again(own_sandbox: Sandbox) -> None:
    host = own_sandbox.hosts[1]
    own_sandbox.ssh(host, "echo kept > /root/marker", check=True)
    own_sandbox.power_off(host.name)
    assert own_sandbox.ssh(host, "true", timeout=60).returncode != 0
    own_sandbox.start(host.name)
    assert own_sandbox.ssh(host, "cat /root/marker", check=True).stdout.strip() == "kept"


def test_down_leaves_nothing_behind(own_sandbox: Sandbox, network_before: dict[str, str]) -> None:
    pids = own_sandbox.recorded_pids()
    assert set(pids) >= {"relay", "tinyproxy", "pebble", "challtestsrv", "mlapi-sb1", "mlapi-sb2"}
    assert all(alive(pid) for pid in pids.values())
    assert our_namespaces() and our_mounts()

    Sandbox.down()

    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert our_namespaces() == []
    assert our_mounts() == []
    assert caller_network() == network_before
    assert not STATE_DIR.exists()
