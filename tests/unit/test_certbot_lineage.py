"""The certbot role's lineage module refuses archives that would write outside the lineage, before writing
anything (deploy/ansible/roles/certbot/library/certbot_lineage.py)."""

from __future__ import annotations

import base64
import datetime
import importlib.util
import io
import os
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MODULE = Path(__file__).resolve().parents[2] / "deploy/ansible/roles/certbot/library/certbot_lineage.py"
_spec = importlib.util.spec_from_file_location("certbot_lineage", MODULE)
lineage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lineage)

NAME = "api.test"
SERVER = "https://acme.test/dir"
ACCOUNT = "abc123"


def certificate(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def make_lineage(config: Path) -> None:
    cert, key = certificate(NAME)
    archive, live = config / "archive" / NAME, config / "live" / NAME
    account = config / "accounts" / "acme.test" / "dir" / ACCOUNT
    for folder in (archive, live, account, config / "renewal"):
        folder.mkdir(parents=True)
    for kind, data in (("cert", cert), ("chain", cert), ("fullchain", cert), ("privkey", key)):
        (archive / f"{kind}1.pem").write_bytes(data)
        (live / f"{kind}.pem").symlink_to(f"../../archive/{NAME}/{kind}1.pem")
        # Made long before any restore, as on a host that has renewed for months.
        os.utime(live / f"{kind}.pem", (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    (account / "meta.json").write_text("{}")
    (config / "renewal" / f"{NAME}.conf").write_text(
        f"archive_dir = {archive}\n"
        + "".join(f"{k} = {live}/{k}.pem\n" for k in ("cert", "privkey", "chain", "fullchain"))
        + f"[renewalparams]\naccount = {ACCOUNT}\nserver = {SERVER}\n"
    )


def with_extra_member(backup: dict, info: tarfile.TarInfo, data: bytes = b"", first: bool = False) -> dict:
    """The backup with one more member in its archive, after the others (or before them)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(backup["archive"])), mode="r:gz") as source, \
            tarfile.open(fileobj=out, mode="w:gz") as tar:
        info.size = len(data)
        if first:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member) if member.isfile() else None)
        if not first:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return {**backup, "archive": base64.b64encode(out.getvalue()).decode()}


@pytest.fixture
def backup(tmp_path: Path) -> dict:
    """The backup of a lineage in tmp_path/le, which is then moved to tmp_path/old (a host rebuilt empty)."""
    make_lineage(tmp_path / "le")
    made = lineage.make_backup(str(tmp_path / "le"), NAME)
    (tmp_path / "le").rename(tmp_path / "old")
    return made


def restore(tmp_path: Path, backup: dict) -> Path:
    target = tmp_path / "le"
    lineage.restore(str(target), NAME, [NAME], SERVER, backup, "the backup", check_mode=False)
    return target


def test_a_restored_lineage_gives_the_same_backup(tmp_path: Path, backup: dict) -> None:
    target = restore(tmp_path, backup)
    assert lineage.make_backup(str(target), NAME) == backup
    key = Path("live", NAME, "privkey.pem")
    assert (target / key).read_bytes() == (tmp_path / "old" / key).read_bytes()


def hook(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o755
    return info


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("member", "refusal"),
    [
        (hook("renewal-hooks/deploy/evil.sh"), "not part of the lineage"),
        (hook("../etc/cron.d/evil"), "not part of the lineage"),
        (hook("/etc/cron.d/evil"), "not part of the lineage"),
        (hook("archive/other.test/cert1.pem"), "not part of the lineage"),
        (symlink(f"live/{NAME}/extra.pem", "/etc/shadow"), "does not point into"),
        (symlink(f"live/{NAME}/up.pem", f"../../archive/{NAME}/../../../etc/shadow"), "does not point into"),
    ],
    ids=["hook", "dot-dot", "absolute", "other-lineage", "absolute-symlink", "escaping-symlink"],
)
def test_an_archive_that_writes_outside_the_lineage_is_refused_before_anything_is_written(
    tmp_path: Path, backup: dict, member: tarfile.TarInfo, refusal: str
) -> None:
    with pytest.raises(lineage.Refused, match=refusal):
        restore(tmp_path, with_extra_member(backup, member, b"#!/bin/sh\n"))
    assert not (tmp_path / "le").exists()


def test_a_name_twice_is_refused_though_its_last_member_passes(tmp_path: Path, backup: dict) -> None:
    """An escaping symlink first, the lineage's own file of the same name after it: a check of the last member
    alone passes, and the extraction would write through the symlink."""
    outside = tmp_path / "outside.pem"  # a file of the test's own: nothing else may be written if this fails
    evil = with_extra_member(backup, symlink(f"archive/{NAME}/cert1.pem", str(outside)), first=True)
    with pytest.raises(lineage.Refused, match="more than once"):
        restore(tmp_path, evil)
    assert not (tmp_path / "le").exists()
    assert not outside.exists()


def test_a_certificate_for_other_names_is_refused(tmp_path: Path, backup: dict) -> None:
    with pytest.raises(lineage.Refused, match="the certificate is for"):
        lineage.restore(
            str(tmp_path / "le"), NAME, [NAME, "www.api.test"], SERVER, backup, "the backup", check_mode=False
        )


def test_a_backup_from_another_acme_server_is_refused(backup: dict) -> None:
    with pytest.raises(lineage.Refused, match="certbot_acme_server"):
        lineage.check_backup_is_for(backup, NAME, [NAME], "https://acme-v02.api.letsencrypt.org/directory", "x")
