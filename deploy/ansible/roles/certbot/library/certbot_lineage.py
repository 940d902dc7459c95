"""certbot_lineage: read a certificate's lineage and ACME account as a backup, or restore them from one.

A backup is a JSON document: the certificate name, its names, the ACME server and account, its serial and
expiry, and ``archive``: the base64 of a tar.gz of what certbot needs to keep renewing (accounts/,
archive/<name>/, live/<name>/ with its symlinks, renewal/<name>.conf), made deterministically so that an
unchanged lineage gives the same backup.

Given a backup (``backup``), the module first checks that it is for this certificate (name, names, ACME
server); then, when the host has no certificate of that name, checks the archive itself (member names, the
renewal configuration's paths, the certificate's names, its key) and only then moves it into place. A host
that has the certificate is never changed: its own lineage is returned (``backup`` in the result) and
``differs`` says whether it is not the one given.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: certbot_lineage
short_description: Back up or restore a certbot certificate lineage and its ACME account
description: See the module's docstring and the certbot role's README.
options:
  cert_name: {type: str, required: true, description: certbot's name of the certificate}
  domains: {type: list, elements: str, required: true, description: the names the certificate must hold}
  server: {type: str, required: true, description: the ACME directory the certificate must come from}
  config_dir: {type: path, default: /etc/letsencrypt, description: certbot's configuration folder}
  backup: {type: str, default: "", description: a backup made by this module (JSON); empty for none}
  backup_path: {type: str, default: "the backup", description: where the backup lives, for messages}
"""

LIVE_FILES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")
FORMAT = 1


class Refused(Exception):
    """The backup cannot be used; the message says why and what to do."""


def read_renewal_conf(text: str) -> dict[str, str]:
    """The top-level and [renewalparams] keys of a renewal configuration (configobj's `key = value`)."""
    values: dict[str, str] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        if sep and section in ("", "renewalparams"):
            values[key.strip() if not section else f"{section}.{key.strip()}"] = value.strip()
    return values


def certificate_facts(cert_pem: bytes, key_pem: bytes | None = None) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        domains = sorted(str(n) for n in names.get_values_for_type(x509.DNSName))
        domains += sorted(str(n) for n in names.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        domains = []
    facts = {"domains": domains, "serial": format(cert.serial_number, "X"),
             # not_valid_after_utc from cryptography 42; Debian 12 has 38.
             "not_after": getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after}
    facts["not_after"] = facts["not_after"].strftime("%Y-%m-%dT%H:%M:%SZ")
    if key_pem is not None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        facts["key_matches"] = key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    return facts


def lineage_paths(cert_name: str) -> tuple[str, str, str]:
    return f"archive/{cert_name}", f"live/{cert_name}", f"renewal/{cert_name}.conf"


def host_state(config_dir: str, cert_name: str) -> str:
    """complete (live fullchain exists), partial (some of the lineage without it) or absent."""
    if os.path.exists(os.path.join(config_dir, "live", cert_name, "fullchain.pem")):
        return "complete"
    if any(os.path.lexists(os.path.join(config_dir, p)) for p in lineage_paths(cert_name)):
        return "partial"
    return "absent"


def make_backup(config_dir: str, cert_name: str) -> dict:
    archive_dir, live_dir, renewal = lineage_paths(cert_name)
    conf = read_renewal_conf(Path(config_dir, renewal).read_text(encoding="utf-8"))
    buffer = io.BytesIO()
    # gzip's header carries no name and mtime 0, members go in sorted order: the same lineage, the same bytes.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for top in ("accounts", archive_dir, live_dir, renewal):
            for path in _walk(config_dir, top):
                info = tar.gettarinfo(os.path.join(config_dir, path), arcname=path)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                # Whole seconds survive a restore exactly; a symlink's own time does not survive it at all
                # (extraction makes it anew) and means nothing to certbot.
                info.mtime = 0 if info.issym() else int(info.mtime)
                if info.isreg():
                    with open(os.path.join(config_dir, path), "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    facts = certificate_facts(Path(config_dir, live_dir, "cert.pem").read_bytes())
    return {"format": FORMAT, "cert_name": cert_name, "domains": facts["domains"], "serial": facts["serial"],
            "not_after": facts["not_after"], "server": conf.get("renewalparams.server", ""),
            "account": conf.get("renewalparams.account", ""),
            "archive": base64.b64encode(buffer.getvalue()).decode()}


def _walk(config_dir: str, top: str) -> list[str]:
    """top and everything under it (symlinks not followed), parents before children."""
    full = os.path.join(config_dir, top)
    if not os.path.lexists(full):
        return []
    found = [top]
    if os.path.isdir(full) and not os.path.islink(full):
        for root, dirs, files in os.walk(full):
            rel = os.path.relpath(root, config_dir)
            found += [os.path.join(rel, name) for name in dirs + files]
    return sorted(found)


def parse_backup(text: str, where: str) -> dict:
    try:
        backup = json.loads(text)
    except ValueError:
        backup = None
    if not isinstance(backup, dict) or backup.get("format") != FORMAT or not isinstance(backup.get("archive"), str):
        raise Refused(f"{where} is not a certificate backup made by the certbot role (format {FORMAT}); "
                      "move it away and run again (the host's certificate, or a new one, is then saved)")
    return backup


def check_backup_is_for(backup: dict, cert_name: str, domains: list[str], server: str, where: str) -> None:
    if backup.get("cert_name") != cert_name or sorted(backup.get("domains", [])) != sorted(domains):
        raise Refused(f"{where} holds the certificate {backup.get('cert_name')!r} for {backup.get('domains')}, "
                      f"not {cert_name!r} for {sorted(domains)} (certbot_domains): point certbot_backup_dir at "
                      "this site's backups, or move the file away to have the CA issue a new certificate")
    if backup.get("server") != server:
        raise Refused(f"{where} holds a certificate from the ACME server {backup.get('server')}, not "
                      f"{server} (certbot_acme_server): set certbot_acme_server to the backup's server, or move "
                      "the file away to have the CA issue a new certificate")


def check_archive(tar: tarfile.TarFile, config_dir: str, cert_name: str, domains: list[str], server: str,
                  where: str) -> None:
    archive_dir, live_dir, renewal = lineage_paths(cert_name)
    listed = tar.getmembers()
    members = {m.name: m for m in listed}
    if len(members) != len(listed):
        # A name twice: the check below would see only the last member, the extraction writes both.
        twice = sorted({m.name for m in listed if sum(1 for o in listed if o.name == m.name) > 1})
        raise Refused(f"{where} holds {twice} more than once: it is refused; move the file away")
    for name, member in members.items():
        parts = name.split("/")
        inside = (parts[0] == "accounts" or name == renewal or name in (archive_dir, live_dir)
                  or name.startswith((archive_dir + "/", live_dir + "/")))
        if name.startswith("/") or ".." in parts or not inside:
            raise Refused(f"{where} holds {name!r}, which is not part of the lineage {cert_name!r}: "
                          "it is refused; move the file away")
        if not (member.isfile() or member.isdir() or member.issym()):
            raise Refused(f"{where} holds {name!r}, neither a file, a folder nor a symlink: it is refused")
        if member.issym() and not (name.startswith(live_dir + "/")
                                   and member.linkname.startswith(f"../../{archive_dir}/")
                                   and ".." not in member.linkname.split("/")[3:]):
            raise Refused(f"{where} holds the symlink {name!r} -> {member.linkname!r}, which does not point into "
                          f"{archive_dir}/: it is refused")
    if renewal not in members or not members[renewal].isfile():
        raise Refused(f"{where} has no file {renewal}: certbot could not renew it; move the file away")
    conf = read_renewal_conf(tar.extractfile(members[renewal]).read().decode("utf-8"))
    expected = {"archive_dir": os.path.join(config_dir, archive_dir),
                **{name[:-4]: os.path.join(config_dir, live_dir, name) for name in LIVE_FILES}}
    wrong = {key: conf.get(key) for key, value in expected.items() if conf.get(key) != value}
    if wrong:
        raise Refused(f"{where}: {renewal} points elsewhere than {config_dir} ({wrong}); certbot would not "
                      "find the restored files: move the file away")
    if conf.get("renewalparams.server") != server:
        raise Refused(f"{where}: {renewal} renews from {conf.get('renewalparams.server')}, not {server}")
    account = conf.get("renewalparams.account", "")
    if not account or not any(n.startswith("accounts/") and n.rsplit("/", 1)[-1] == account for n in members):
        raise Refused(f"{where} lacks the ACME account {account!r} its renewal configuration names")

    def live_file(name: str) -> bytes:
        member = members.get(f"{live_dir}/{name}")
        target = members.get(os.path.normpath(os.path.join(live_dir, member.linkname))) if member else None
        if member is None or target is None or not target.isfile():
            raise Refused(f"{where}: {live_dir}/{name} does not lead to a file of {archive_dir}/")
        return tar.extractfile(target).read()

    contents = {name: live_file(name) for name in LIVE_FILES}
    try:
        facts = certificate_facts(contents["cert.pem"], contents["privkey.pem"])
    except ValueError as exc:
        raise Refused(f"{where}: the certificate or its key cannot be read ({exc}); move the file away") from None
    if sorted(facts["domains"]) != sorted(domains):
        raise Refused(f"{where}: the certificate is for {facts['domains']}, not {sorted(domains)}: move it away")
    if not facts["key_matches"]:
        raise Refused(f"{where}: privkey.pem is not the key of cert.pem: move the file away")


def restore(config_dir: str, cert_name: str, domains: list[str], server: str, backup: dict, where: str,
            check_mode: bool) -> None:
    try:
        data = base64.b64decode(backup["archive"], validate=True)
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")  # noqa: SIM115 (closed by the with below)
    except (binascii.Error, tarfile.TarError, OSError, EOFError) as exc:
        raise Refused(f"{where}: its archive cannot be read ({exc}); move the file away") from None
    with tar:
        check_archive(tar, config_dir, cert_name, domains, server, where)
        if check_mode:
            return
        os.makedirs(config_dir, mode=0o755, exist_ok=True)
        # Unpacked beside the target on the same file system, then moved into place, so a failure leaves
        # nothing half-written where certbot looks.
        staging = tempfile.mkdtemp(prefix=".mlapi-restore-", dir=config_dir)
        try:
            # The members were checked above; the standard filter too where this Python has it (3.11.4+).
            tar.extractall(staging, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
            for top in ("archive", "live", "renewal"):
                os.makedirs(os.path.join(config_dir, top), mode=0o700 if top != "renewal" else 0o755, exist_ok=True)
            for path in lineage_paths(cert_name):
                os.rename(os.path.join(staging, path), os.path.join(config_dir, path))
            _merge(os.path.join(staging, "accounts"), os.path.join(config_dir, "accounts"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _merge(source: str, target: str) -> None:
    """Move the accounts of the backup in; an account the host already has is kept as it is."""
    if not os.path.isdir(source):
        return
    if not os.path.exists(target):
        os.rename(source, target)
        return
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src) and os.path.isdir(dst):
            _merge(src, dst)
        elif not os.path.lexists(dst):
            os.rename(src, dst)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "cert_name": {"type": "str", "required": True},
            "domains": {"type": "list", "elements": "str", "required": True},
            "server": {"type": "str", "required": True},
            "config_dir": {"type": "path", "default": "/etc/letsencrypt"},
            "backup": {"type": "str", "default": "", "no_log": True},
            "backup_path": {"type": "str", "default": "the backup"},
        },
        supports_check_mode=True,
    )
    p = module.params
    where = p["backup_path"]
    try:
        given = parse_backup(p["backup"], where) if p["backup"] else None
        if given is not None:
            check_backup_is_for(given, p["cert_name"], p["domains"], p["server"], where)
        state = host_state(p["config_dir"], p["cert_name"])
        if state == "partial":
            raise Refused(f"{p['config_dir']} holds part of the lineage {p['cert_name']!r} but no live certificate "
                          "(an interrupted issuance?); certbot would start a second lineage beside it: remove "
                          f"{', '.join(lineage_paths(p['cert_name']))} under {p['config_dir']} and run again")
        restored = False
        if state == "absent" and given is not None:
            restore(p["config_dir"], p["cert_name"], p["domains"], p["server"], given, where, module.check_mode)
            restored = True
            if module.check_mode:
                module.exit_json(changed=True, restored=True, exists=True, backup="", differs=False,
                                 serial=given.get("serial"))
        if host_state(p["config_dir"], p["cert_name"]) != "complete":
            module.exit_json(changed=False, restored=False, exists=False, backup="", differs=given is not None)
        current = make_backup(p["config_dir"], p["cert_name"])
    except Refused as exc:
        module.fail_json(msg=f"{exc}. Nothing on the host was changed.", refused=True)
    differs = current != given
    module.exit_json(changed=restored, restored=restored, exists=True, backup=json.dumps(current, sort_keys=True),
                     differs=differs, serial=current["serial"], not_after=current["not_after"])


if __name__ == "__main__":
    main()
