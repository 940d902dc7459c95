"""Certificate continuity: the lb host is rebuilt from nothing and site.yml brings back the same certificate
from the controller's vault-encrypted backup, without a new order at the CA; a renewal afterwards works.

The rebuild throws the shared host's disk away, so this module runs after every other single-host test
(tests/e2e/conftest.py), and it provisions the host again before it ends: what follows finds it as
site.yml leaves a fresh host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from test_deploy_tls_renewal import serial_after_renewal, served_serial

from scripts.harness.deploy import PlaybookRun, forced_renewal_command, require_provisioned, run_playbook
from scripts.harness.sandbox import Sandbox
from scripts.sandbox.lab import STATE_DIR

pytestmark = pytest.mark.e2e

# Pebble logs every ACME request it handles; a new order is a POST to its new-order endpoint.
NEW_ORDER = re.compile(r"POST /order-plz\b")
SAVE_TASK = "certbot : Save the certificate and ACME account on the controller, encrypted with the vault"
RESTORE_TASK = "certbot : Restore the certificate and ACME account from the backup, before asking the CA"


def pebble_orders() -> int:
    return len(NEW_ORDER.findall((STATE_DIR / "logs" / "pebble.log").read_text(errors="replace")))


def backup_file(sandbox: Sandbox):
    # certbot_backup_dir's default: secret/certbot next to the inventory's folder (.sandbox/inventory).
    return STATE_DIR / "secret" / "certbot" / f"{sandbox.domain}.json.vault"


def require_ok(run: PlaybookRun) -> PlaybookRun:
    assert run.returncode == 0, f"{run.playbook} failed (log: {run.log}):\n{run.tail()}"
    return run


@dataclass(frozen=True)
class Rebuild:
    serial_saved: str  # served, and saved on the controller, before the rebuild
    refresh: PlaybookRun  # the site.yml run after a renewal on the host, which refreshes the backup
    orders_before: int
    fresh_host: str  # what the rebuilt host had under /etc before site.yml
    site: PlaybookRun  # site.yml on the rebuilt host
    orders_after: int
    serial_after: str


@pytest.fixture(scope="module")
def rebuilt(sandbox: Sandbox) -> Rebuild:
    require_provisioned(sandbox)
    lb = sandbox.host(sandbox.ip)
    # A renewal on the host (as certbot.timer makes them) leaves the controller's copy behind until the next
    # run of the playbook, which saves the new lineage.
    before = served_serial(sandbox)
    renewal = sandbox.ssh(lb, forced_renewal_command(sandbox.domain), timeout=300)
    assert renewal.returncode == 0, f"certbot renew failed:\n{renewal.stdout}\n{renewal.stderr}"
    serial = serial_after_renewal(sandbox, before)
    refresh = require_ok(run_playbook(sandbox, "site.yml", options=("--tags", "certbot"),
                                      label="rebuild-refresh-backup"))
    orders_before = pebble_orders()

    sandbox.rebuild(lb.name)
    fresh = sandbox.ssh(lb, "ls -d /etc/letsencrypt /etc/nginx /opt/mlapi 2>&1; true").stdout
    # The renewal dry run at the end of site.yml is an order of its own (a test certificate); the renewal
    # below proves the restored lineage renews, for real.
    site = require_ok(run_playbook(sandbox, "site.yml", {"certbot_renew_dry_run": False}, label="rebuild-site"))
    return Rebuild(serial, refresh, orders_before, fresh, site, pebble_orders(), served_serial(sandbox))


def test_a_renewal_on_the_host_is_saved_by_the_next_run(rebuilt: Rebuild) -> None:
    assert SAVE_TASK in rebuilt.refresh.changed_tasks(), (
        f"the run after a renewal did not save the new lineage: {rebuilt.refresh.changed_tasks()} "
        f"(log: {rebuilt.refresh.log})")


def test_the_backup_is_vault_encrypted_and_readable_by_its_owner_only(sandbox: Sandbox, rebuilt: Rebuild) -> None:
    path = backup_file(sandbox)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text()
    assert text.startswith("$ANSIBLE_VAULT;"), text[:80]
    assert "PRIVATE KEY" not in text and sandbox.domain not in text


def test_the_rebuilt_host_started_from_nothing(rebuilt: Rebuild) -> None:
    assert rebuilt.fresh_host.count("No such file or directory") == 3, rebuilt.fresh_host


def test_the_rebuilt_host_restores_the_backup_instead_of_asking_the_ca(rebuilt: Rebuild) -> None:
    assert RESTORE_TASK in rebuilt.site.changed_tasks(), (
        f"site.yml did not restore the certificate: {rebuilt.site.changed_tasks()} (log: {rebuilt.site.log})")
    assert SAVE_TASK not in rebuilt.site.changed_tasks(), "the restored lineage differs from the backup it came from"
    assert rebuilt.orders_after == rebuilt.orders_before, (
        f"Pebble received {rebuilt.orders_after - rebuilt.orders_before} new order(s) during site.yml on the "
        f"rebuilt host (log: {rebuilt.site.log})")


def test_the_rebuilt_host_serves_the_same_certificate(rebuilt: Rebuild) -> None:
    assert rebuilt.serial_after == rebuilt.serial_saved


def test_the_restored_certificate_renews_and_nginx_serves_the_new_one(sandbox: Sandbox, rebuilt: Rebuild) -> None:
    lb = sandbox.host(sandbox.ip)
    timer = sandbox.ssh(lb, "systemctl is-enabled certbot.timer; systemctl is-active certbot.timer")
    assert timer.stdout.split() == ["enabled", "active"], timer.stdout + timer.stderr
    renewal = sandbox.ssh(lb, forced_renewal_command(sandbox.domain), timeout=300)
    assert renewal.returncode == 0, f"certbot renew failed:\n{renewal.stdout}\n{renewal.stderr}"
    assert pebble_orders() == rebuilt.orders_after + 1
    after = serial_after_renewal(sandbox, rebuilt.serial_after)
    assert after != rebuilt.serial_after, "NGINX still serves the restored certificate: the deploy hook did not run"


def test_nothing_but_the_encrypted_backup_is_left_in_the_backup_folder(sandbox: Sandbox, rebuilt: Rebuild) -> None:
    folder = backup_file(sandbox).parent
    assert sorted(p.name for p in folder.iterdir()) == [backup_file(sandbox).name]
    assert oct(folder.stat().st_mode & 0o777) == "0o700"


def test_an_acme_profile_on_a_certbot_before_4_is_refused_naming_the_version(sandbox: Sandbox) -> None:
    require_provisioned(sandbox)
    lb = sandbox.host(sandbox.ip)
    installed = sandbox.ssh(lb, "certbot --version", check=True).stdout.split()[-1]
    before = served_serial(sandbox)
    run = run_playbook(sandbox, "site.yml", {"certbot_acme_profile": "tlsserver"}, options=("--tags", "certbot"),
                       label="rebuild-profile-refused")
    assert run.returncode != 0, f"certbot {installed} was given an ACME profile (log: {run.log})"
    assert f"this host has certbot {installed}" in run.output and "certbot_acme_profile" in run.output, run.tail()
    assert run.changed == 0, run.changed_tasks()
    assert served_serial(sandbox) == before
