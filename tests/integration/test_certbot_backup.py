"""The certbot role's backup and restore, run by ansible-playbook on this machine against certbot's folder
layout in a temporary directory: a backup restores the same lineage on an empty host; a backup of another
domain, one encrypted with another password or a corrupt vault file is refused with a message that says
what to do, and the host's certificate stays as it was.

The lineages are made the way certbot lays them out (accounts/, archive/ with numbered files, live/ symlinks,
renewal/<name>.conf); the sandbox tests (tests/e2e/test_deploy_tls_rebuild.py) use real certbot and Pebble.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER = "https://acme.test/dir"
ACCOUNT = "0f4c2e1d9a8b7c6d5e4f3a2b1c0d9e8f"
PLAYBOOK = """
- name: The certbot role's restore and save, on this machine
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Restore
      ansible.builtin.include_role:
        name: certbot
        tasks_from: restore.yml
    - name: Save
      ansible.builtin.include_role:
        name: certbot
        tasks_from: save.yml
      when: __certbot_saved.vault_secret
"""


def make_lineage(config: Path, name: str) -> None:
    """A certificate for name with its key, an ACME account and the renewal configuration, as certbot leaves them."""
    archive, live = config / "archive" / name, config / "live" / name
    account = config / "accounts" / "acme.test" / "dir" / ACCOUNT
    for folder in (archive, live, account, config / "renewal"):
        folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "90", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(archive / "privkey1.pem"), "-out", str(archive / "cert1.pem")],
                   check=True, capture_output=True)
    (archive / "chain1.pem").write_text((archive / "cert1.pem").read_text())
    (archive / "fullchain1.pem").write_text((archive / "cert1.pem").read_text() * 2)
    for kind in ("cert", "chain", "fullchain", "privkey"):
        (live / f"{kind}.pem").symlink_to(f"../../archive/{name}/{kind}1.pem")
    for part in ("meta", "private_key", "regr"):
        (account / f"{part}.json").write_text(json.dumps({"part": part}))
    (config / "renewal" / f"{name}.conf").write_text(
        f"version = 2.1.0\narchive_dir = {archive}\n"
        + "".join(f"{kind} = {live}/{kind}.pem\n" for kind in ("cert", "privkey", "chain", "fullchain"))
        + f"\n[renewalparams]\naccount = {ACCOUNT}\nauthenticator = webroot\nwebroot_path = /var/www/acme,\n"
        f"server = {SERVER}\nkey_type = ecdsa\n[[webroot_map]]\n{name} = /var/www/acme\n")


def tree(config: Path) -> dict[str, str]:
    """Every file's sha256 and every symlink's target under config."""
    found = {}
    for path in sorted(config.rglob("*")):
        rel = str(path.relative_to(config))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@dataclass
class Run:
    returncode: int
    output: str


@dataclass
class Site:
    root: Path

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    def password_file(self, password: str = "the-vault-password") -> Path:
        path = self.root / f"vault-password-{hashlib.sha256(password.encode()).hexdigest()[:8]}"
        path.write_text(password + "\n")
        path.chmod(0o600)
        return path

    def run(self, config: Path, name: str, *, password: str | None = "the-vault-password") -> Run:
        playbook = self.root / "playbook.yml"
        playbook.write_text(PLAYBOOK)
        variables = {"certbot_domains": [name], "certbot_acme_server": SERVER, "certbot_backup_dir": str(self.backups),
                     "__certbot_config_dir": str(config), "ansible_python_interpreter": sys.executable}
        cmd = [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e", json.dumps(variables),
               str(playbook)]
        if password is not None:
            cmd[1:1] = ["--vault-password-file", str(self.password_file(password))]
        env = dict(os.environ, ANSIBLE_ROLES_PATH=str(REPO / "deploy" / "ansible" / "roles"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
        env.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        return Run(result.returncode, result.stdout + result.stderr)

    def backup_of(self, name: str) -> Path:
        return self.backups / f"{name}.json.vault"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


@pytest.fixture
def saved(site: Site) -> tuple[Site, Path]:
    """A host with the certificate of api.test, saved on the controller by the role."""
    host = site.root / "host-a"
    make_lineage(host, "api.test")
    run = site.run(host, "api.test")
    assert run.returncode == 0, run.output
    return site, host


def test_the_backup_is_an_owner_only_vault_file_without_plain_key(saved: tuple[Site, Path]) -> None:
    site, _ = saved
    path = site.backup_of("api.test")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text()
    assert text.startswith("$ANSIBLE_VAULT;1.1;AES256\n")
    assert "PRIVATE KEY" not in text
    assert sorted(p.name for p in site.backups.iterdir()) == [path.name]  # no plain temporary file left


def test_a_second_run_with_an_unchanged_lineage_changes_nothing(saved: tuple[Site, Path]) -> None:
    site, host = saved
    before = site.backup_of("api.test").read_bytes()
    run = site.run(host, "api.test")
    assert run.returncode == 0, run.output
    assert "changed=0" in run.output, run.output
    assert site.backup_of("api.test").read_bytes() == before


def rebuild(host: Path) -> Path:
    """The host's folder emptied, as on a rebuilt host; the old one is kept beside it to compare."""
    old = host.with_name(host.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    host.rename(old)
    return old


def test_a_fresh_host_gets_the_same_lineage_back(saved: tuple[Site, Path]) -> None:
    site, host = saved
    old = rebuild(host)
    run = site.run(host, "api.test")
    assert run.returncode == 0, run.output
    assert "Restored api.test" in run.output
    assert tree(host) == tree(old)
    again = site.run(host, "api.test")
    assert again.returncode == 0 and "changed=0" in again.output, again.output


def test_a_renewed_lineage_replaces_the_saved_one(saved: tuple[Site, Path]) -> None:
    site, host = saved
    before = site.backup_of("api.test").read_bytes()
    archive, live = host / "archive" / "api.test", host / "live" / "api.test"
    (archive / "cert2.pem").write_text((archive / "cert1.pem").read_text())
    (live / "cert.pem").unlink()
    (live / "cert.pem").symlink_to("../../archive/api.test/cert2.pem")
    run = site.run(host, "api.test")
    assert run.returncode == 0, run.output
    assert site.backup_of("api.test").read_bytes() != before
    rebuild(host)
    assert site.run(host, "api.test").returncode == 0
    assert os.readlink(host / "live" / "api.test" / "cert.pem") == "../../archive/api.test/cert2.pem"


@pytest.mark.parametrize("host_state", ["with its certificate", "fresh"])
@pytest.mark.parametrize("case", ["another domain", "another password", "corrupt vault"])
def test_an_unusable_backup_is_refused_and_the_host_keeps_its_certificate(site: Site, case: str,
                                                                          host_state: str) -> None:
    host = site.root / "host"
    if host_state == "with its certificate":
        make_lineage(host, "api.test")
    backup = site.backup_of("api.test")
    if case == "another domain":
        other = site.root / "other-host"
        make_lineage(other, "other.test")
        assert site.run(other, "other.test").returncode == 0
        site.backup_of("other.test").rename(backup)
        expected = "holds the certificate 'other.test'"
    else:
        make_lineage(site.root / "source", "api.test")
        assert site.run(site.root / "source", "api.test", password="another-password").returncode == 0
        if case == "corrupt vault":
            lines = backup.read_text().splitlines()
            backup.write_text("\n".join([*lines[:3], "00" * 40, *lines[4:]]) + "\n")
        expected = "cannot decrypt"
    saved_backup = backup.read_bytes()
    before = tree(host) if host.exists() else {}

    run = site.run(host, "api.test")

    assert run.returncode != 0, run.output
    assert expected in run.output and "move the file away" in run.output, run.output
    assert (tree(host) if host.exists() else {}) == before
    assert backup.read_bytes() == saved_backup


def test_without_a_vault_secret_nothing_is_saved_and_the_run_says_so(site: Site) -> None:
    host = site.root / "host"
    make_lineage(host, "api.test")
    run = site.run(host, "api.test", password=None)
    assert run.returncode == 0, run.output
    assert "This run has no vault secret" in run.output
    assert not site.backup_of("api.test").exists()


def test_without_a_vault_secret_an_existing_backup_stops_the_run(saved: tuple[Site, Path]) -> None:
    site, host = saved
    rebuild(host)
    run = site.run(host, "api.test", password=None)
    assert run.returncode != 0
    assert "no vault secret to decrypt it" in run.output, run.output
    assert not host.exists()
