"""The shared sandbox host: reachable only through the relay, egress only through the proxy, a working
ACME CA and challenge DNS, and outputs that Ansible reads. Other e2e tests may have provisioned it first,
so these tests assert only what provisioning leaves alone."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest

from scripts.harness.sandbox import ROOT, Sandbox
from scripts.sandbox.lab import host_name

pytestmark = pytest.mark.e2e

FIRST_HOST = host_name(1)  # the lb host, in every group


def test_ssh_through_the_relay_reaches_the_host_on_its_bridge_address(sandbox: Sandbox) -> None:
    result = sandbox.ssh(sandbox.ip, "hostname; ip -4 -o addr show dev eth0", check=True)
    hostname, address_line = result.stdout.splitlines()
    assert hostname == FIRST_HOST
    assert f" {sandbox.env['SANDBOX_INTERNAL_IP']}/" in address_line


def test_apt_reaches_the_mirror_through_the_proxy(sandbox: Sandbox) -> None:
    result = sandbox.ssh(FIRST_HOST, "apt-get update -q", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Err:" not in result.stdout and "W:" not in result.stderr, result.stdout + result.stderr


def test_without_the_proxy_the_host_has_no_way_out(sandbox: Sandbox) -> None:
    # The host has no resolver and its namespace no uplink: a direct fetch fails before sending anything.
    result = sandbox.ssh(FIRST_HOST, "apt-get -o Acquire::http::Proxy=false -o Acquire::Retries=0 update -q")
    assert "Temporary failure resolving" in result.stdout + result.stderr


def test_pip_downloads_through_the_proxy_trusting_the_controller_ca_bundle(sandbox: Sandbox) -> None:
    proxy = sandbox.env["SANDBOX_PROXY"]
    result = sandbox.ssh(
        FIRST_HOST,
        "rm -rf /tmp/pip-probe && python3 -m venv /tmp/pip-probe && "
        f"/tmp/pip-probe/bin/pip download --quiet --no-deps --proxy {proxy} "
        "--cert /etc/ssl/certs/ca-certificates.crt -d /tmp/pip-probe/dl six==1.17.0 && ls /tmp/pip-probe/dl",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "six-1.17.0-py2.py3-none-any.whl"


def test_acme_directory_answers_inside_the_sandbox_over_verified_https(sandbox: Sandbox) -> None:
    sandbox.copy_to(FIRST_HOST, sandbox.acme_tls_ca, "/tmp/acme-tls-ca.pem")
    directory_url = sandbox.env["SANDBOX_ACME_DIRECTORY"]
    result = sandbox.ssh(
        FIRST_HOST, f"curl -sS --noproxy '*' --cacert /tmp/acme-tls-ca.pem {directory_url}", check=True)
    assert {"newAccount", "newNonce", "newOrder"} <= set(json.loads(result.stdout))


def test_acme_https_is_refused_without_the_acme_tls_ca(sandbox: Sandbox) -> None:
    directory_url = sandbox.env["SANDBOX_ACME_DIRECTORY"]
    result = sandbox.ssh(FIRST_HOST, f"curl -sS --noproxy '*' {directory_url}")
    assert result.returncode == 60, result.stderr  # curl: peer certificate cannot be authenticated


def test_sandbox_ca_is_the_issuing_root_of_the_running_acme_server(sandbox: Sandbox) -> None:
    tls = ssl.create_default_context(cafile=str(sandbox.acme_tls_ca))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls))
    with opener.open(f"{sandbox.env['SANDBOX_ACME_MANAGEMENT']}/roots/0", timeout=10) as response:
        served_root = response.read().decode()
    assert served_root.strip() == sandbox.ca.read_text().strip()


@pytest.mark.parametrize(("record", "answers_lb"), [("A", True), ("AAAA", False)])
def test_the_domain_resolves_to_the_lb_host_through_the_challenge_dns(
    sandbox: Sandbox, record: str, answers_lb: bool
) -> None:
    # The DNS server and port the ACME server itself uses for validation.
    gateway = sandbox.env["SANDBOX_ACME_DIRECTORY"].split("//")[1].split(":")[0]
    result = sandbox.ssh(FIRST_HOST, f"dig +short +time=2 +tries=2 @{gateway} -p 8053 {record} {sandbox.domain}",
                         check=True)
    assert result.stdout.strip() == (sandbox.env["SANDBOX_INTERNAL_IP"] if answers_lb else "")


def test_env_file_and_inventory_point_at_existing_controller_files(sandbox: Sandbox) -> None:
    for name in ("SANDBOX_CA", "SANDBOX_SSH_KEY", "SANDBOX_ACME_TLS_CA", "SANDBOX_INVENTORY"):
        assert Path(sandbox.env[name]).is_file(), name
    inventory = sandbox.inventory.read_text()
    ansible = subprocess.run(
        [str(ROOT / ".venv/bin/ansible-inventory"), "-i", str(sandbox.inventory), "--list"],
        capture_output=True, text=True, check=True, env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
    )
    parsed = json.loads(ansible.stdout)
    assert parsed["lb"]["hosts"] == parsed["app"]["hosts"] == parsed["redis"]["hosts"] == [FIRST_HOST]
    host_vars = parsed["_meta"]["hostvars"][FIRST_HOST]
    assert host_vars["ansible_host"] == sandbox.ip
    assert host_vars["ansible_port"] == sandbox.ssh_port
    assert host_vars["private_ip"] == sandbox.env["SANDBOX_INTERNAL_IP"]
    assert host_vars["sandbox_domain"] == sandbox.domain
    assert "sandbox_acme_directory" in inventory


def test_the_host_runs_its_os_with_the_cloud_images_login_user_and_sudo_rule(sandbox: Sandbox) -> None:
    release = sandbox.ssh(FIRST_HOST, ". /etc/os-release && echo $ID-$VERSION_ID", check=True).stdout.strip()
    assert release == sandbox.os_name
    as_user = subprocess.run(sandbox.ssh_command(FIRST_HOST, "id -un && sudo -n id -u", user=sandbox.user),
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert as_user.stdout.split() == [sandbox.user, "0"], as_user.stderr
    sudoers = sandbox.ssh(FIRST_HOST, "stat -c %a /etc/sudoers.d/90-cloud-init-users && "
                          "cat /etc/sudoers.d/90-cloud-init-users", check=True).stdout
    assert sudoers.startswith("440\n") and f"{sandbox.user} ALL=(ALL) NOPASSWD:ALL" in sudoers
    # The packages of the cloud image that change how apt runs behave.
    expected = ["needrestart", "unattended-upgrades", "ufw"] if sandbox.os_name.startswith("ubuntu") \
        else ["unattended-upgrades"]
    installed = sandbox.ssh(
        FIRST_HOST, f"dpkg-query -W -f '${{Package}} ${{db:Status-Abbrev}}\\n' {' '.join(expected)}"
    )
    assert {line.split()[0] for line in installed.stdout.splitlines() if line.split()[1:] == ["ii"]} == set(expected), (
        installed.stdout
    )


def test_the_inventory_connects_as_the_login_user_and_becomes_root(sandbox: Sandbox) -> None:
    ansible = subprocess.run(
        [
            str(ROOT / ".venv/bin/ansible"),
            "-i",
            str(sandbox.inventory),
            FIRST_HOST,
            "-m",
            "ansible.builtin.command",
            "-a",
            "id -u",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "0"},
        stdin=subprocess.DEVNULL,
    )
    assert ansible.returncode == 0 and ansible.stdout.strip().endswith("0"), ansible.stdout + ansible.stderr
    host_vars = json.loads(
        subprocess.run(
            [str(ROOT / ".venv/bin/ansible-inventory"), "-i", str(sandbox.inventory), "--host", FIRST_HOST],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert (host_vars["ansible_user"], host_vars["ansible_become"]) == (sandbox.user, True)
