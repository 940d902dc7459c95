"""The playbooks and roles pass the linters the field uses, at the strictest profile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "deploy" / "ansible"
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "ANSIBLE_NOCOLOR": "1", "NO_COLOR": "1"}
    return subprocess.run(
        [str(BIN / tool), *args], cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=600
    )


def test_lint_ansible_lint_production_profile_is_clean():
    result = _run("ansible-lint", "--profile", "production")
    assert result.returncode == 0, (
        "ansible-lint found problems in deploy/ansible; fix each rule it names:\n" + result.stdout + result.stderr
    )


def test_lint_yamllint_is_clean():
    result = _run("yamllint", "--strict", ".")
    assert result.returncode == 0, "yamllint found problems in deploy/ansible:\n" + result.stdout + result.stderr


def test_lint_playbooks_pass_syntax_check():
    for playbook in ("site.yml", "deploy-release.yml", "deploy-model.yml", "rollback.yml"):
        result = _run(
            "ansible-playbook", "--syntax-check", "-i", "inventories/ec2", playbook
        )
        assert result.returncode == 0, f"{playbook}: {result.stdout}{result.stderr}"
