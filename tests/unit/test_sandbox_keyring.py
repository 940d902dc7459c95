"""The sandbox trusts an Ubuntu archive keyring only when it holds the pinned keys and no other.

Real GnuPG makes a key of its own; the check in scripts/sandbox/lab.py must refuse a keyring holding it,
and name its fingerprint.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scripts.sandbox import lab


def _new_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A fresh signing key exported as a binary keyring file, and its fingerprint."""
    home = tmp_path / f"gnupg-{name}"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", f"{name} <{name}@example.test>", "ed25519", "sign", "1d"],
                   check=True, capture_output=True)
    listing = subprocess.run([*gpg, "--with-colons", "--list-keys"], check=True, capture_output=True, text=True)
    fingerprint = next(line.split(":")[9] for line in listing.stdout.splitlines() if line.startswith("fpr:"))
    keyring = tmp_path / f"{name}.gpg"
    keyring.write_bytes(subprocess.run([*gpg, "--export"], check=True, capture_output=True).stdout)
    # Generating the key started a gpg-agent for this home: it would outlive the test.
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=True, capture_output=True)
    return keyring, fingerprint


def test_the_fingerprints_of_a_keyring_are_read_from_its_primary_keys(tmp_path: Path):
    first, first_fpr = _new_key(tmp_path, "first")
    second, second_fpr = _new_key(tmp_path, "second")
    both = tmp_path / "both.gpg"
    both.write_bytes(first.read_bytes() + second.read_bytes())
    assert lab.keyring_fingerprints(both) == [first_fpr, second_fpr]


def test_a_keyring_with_a_key_that_is_not_pinned_is_refused_by_fingerprint(tmp_path: Path):
    keyring, fingerprint = _new_key(tmp_path, "intruder")
    with pytest.raises(lab.SandboxError) as refused:
        lab.check_ubuntu_keyring(keyring)
    message = str(refused.value)
    assert fingerprint in message and lab.UBUNTU_REQUIRED_KEY in message
