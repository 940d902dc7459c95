"""The GitHub Actions example (deploy/github/workflows/release-model.yml) is valid and runs what exists.

actionlint checks the workflow itself, with shellcheck on every `run:` script; the commands the
scripts call are then checked against the kit: each `make` target exists, each `mlapi` command line
parses with the real command's parser, and the `ansible-playbook` line passes a syntax check with the
flags it is given. A workflow that only GitHub could find wrong is found wrong here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "deploy" / "github" / "workflows" / "release-model.yml"
BIN = Path(sys.executable).parent


def _actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("shellcheck"), "shellcheck is not installed: run scripts/setup-host.sh"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    return subprocess.run([str(BIN / "actionlint"), "-no-color", "-verbose", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps() -> list[tuple[str, dict]]:
    return [(job, step) for job, spec in _workflow()["jobs"].items() for step in spec["steps"]]


def _run_scripts() -> list[tuple[str, dict]]:
    return [(job, step) for job, step in _steps() if "run" in step]


def _commands(script: str) -> list[list[str]]:
    """The script's simple commands, continuation lines joined, `${{ ... }}` and `$VAR` left as text."""
    joined = re.sub(r"\\\n\s*", " ", script)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line, comments=True))
    return commands


def test_actionlint_with_shellcheck_finds_nothing():
    result = _actionlint(WORKFLOW)
    assert result.returncode == 0, f"actionlint found problems in {WORKFLOW.name}:\n{result.stdout}{result.stderr}"
    assert 'Rule "shellcheck" was disabled' not in result.stderr, result.stderr


def test_actionlint_fails_a_broken_copy(tmp_path: Path):
    """The check can fail: a job that needs a missing job, and an unquoted expansion shellcheck flags."""
    text = WORKFLOW.read_text()
    broken = text.replace("needs: package", "needs: packaging").replace(
        'test -n "$SSH_PRIVATE_KEY"', "test -n $SSH_PRIVATE_KEY")
    assert broken != text
    copy = tmp_path / "release-model.yml"
    copy.write_text(broken)
    result = _actionlint(copy)
    assert result.returncode != 0
    assert 'needs job "packaging" which does not exist' in result.stdout, result.stdout
    assert "SC2086" in result.stdout, result.stdout


def test_inputs_and_secrets_reach_scripts_only_through_the_environment():
    """`${{ inputs.x }}` spliced into a script is a script injection; secrets there end up in the log's
    command echo. Each goes through `env:` and the script quotes the variable."""
    for job, step in _run_scripts():
        spliced = re.findall(r"\$\{\{\s*(inputs|secrets|github\.event|vars)\.[^}]*\}\}", step["run"])
        assert not spliced, f"job {job}, step {step.get('name')!r}: {spliced} inside run:, move it to env:"


def test_every_action_is_pinned_to_a_full_commit():
    for job, step in _steps():
        if "uses" in step:
            ref = step["uses"].partition("@")[2]
            assert re.fullmatch(r"[0-9a-f]{40}", ref), f"job {job}: {step['uses']} is not pinned to a commit"


def test_make_targets_exist():
    targets = {cmd[cmd.index("make") + 1] for _, step in _run_scripts() for cmd in _commands(step["run"])
               if "make" in cmd}
    assert {"venv", "test-fast"} <= targets, targets
    for target in targets:
        result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "PYTHON": sys.executable})
        assert result.returncode == 0, f"make {target}: {result.stderr}"


def test_setup_host_option_exists():
    calls = [cmd for _, step in _run_scripts() for cmd in _commands(step["run"]) if "scripts/setup-host.sh" in cmd]
    assert calls
    for cmd in calls:
        options = cmd[cmd.index("scripts/setup-host.sh") + 1:]
        usage = subprocess.run(["bash", str(ROOT / "scripts" / "setup-host.sh"), "--help"], capture_output=True,
                               text=True, check=True).stdout
        for option in options:
            assert option in usage, f"scripts/setup-host.sh has no option {option}"


def test_mlapi_command_lines_parse(tmp_path: Path):
    """Each `mlapi` line, with its variables given values, is accepted by the real parser."""
    values = {"$MODEL": "model.joblib", "$NAME": "churn", "$VERSION": "4", "$SAMPLE": "validation.csv"}
    lines = [cmd for _, step in _run_scripts() for cmd in _commands(step["run"])
             if cmd and cmd[0].endswith("/mlapi")]
    assert {cmd[1] for cmd in lines} == {"package", "verify"}
    for cmd in lines:
        argv = []
        for word in cmd[1:]:
            for name, value in values.items():
                word = word.replace(name, value)
            argv.append(word)
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"mlapi {' '.join(argv)}: rejected by the parser (exit {exc.code})")


def test_ansible_playbook_line_passes_a_syntax_check(tmp_path: Path):
    """The rollout's ansible-playbook line, run with --syntax-check against the EC2 example inventory."""
    (lines,) = [[cmd for cmd in _commands(step["run"]) if cmd and cmd[0].endswith("/ansible-playbook")]
                for _, step in _run_scripts() if "ansible-playbook" in step["run"]]
    (cmd,) = lines
    vault_file = tmp_path / "vault-password"
    vault_file.write_text("not-used-by-a-syntax-check")
    values = {"$INVENTORY": "ec2", "$GITHUB_WORKSPACE": str(tmp_path), "$HOME": str(tmp_path),
              '"$vault_file"': str(vault_file), "$vault_file": str(vault_file)}
    argv = []
    for word in cmd[1:]:
        for name, value in values.items():
            word = word.replace(name, value)
        argv.append(word)
    assert "deploy/ansible/deploy-model.yml" in argv
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_CONFIG": str(ROOT / "deploy" / "ansible" / "ansible.cfg")}
    result = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", *argv], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"


def test_the_rollout_needs_the_tests_and_the_package():
    jobs = _workflow()["jobs"]
    assert jobs["package"]["needs"] == "test"
    assert jobs["deploy"]["needs"] == "package"
    assert jobs["deploy"]["environment"] == "production"
    assert _workflow()["permissions"] == {"contents": "read"}
