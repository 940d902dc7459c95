"""A role's tasks run on the controller itself, as the tests render the roles' templates: ansible-playbook
against localhost with the role's own defaults, argument checks and validate: commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "ansible"
_PLAYBOOK = """\
- name: Render through the {role} role as it does on a host
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Run the role's {tasks_from} tasks
      ansible.builtin.include_role:
        name: {role}
        tasks_from: {tasks_from}
"""


def render_role(role: str, tasks_from: str, variables: dict[str, Any]) -> None:
    """Run `tasks_from` of `role` on localhost with `variables`; fails with Ansible's output if the role does."""
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix=f"mlapi-{role}-") as folder:
        work = Path(folder)
        (work / "render.yml").write_text(_PLAYBOOK.format(role=role, tasks_from=tasks_from))
        # Modules run in the controller's own Python (the venv), not whatever PATH finds.
        (work / "vars.json").write_text(json.dumps({**variables, "ansible_python_interpreter": sys.executable}))
        env = dict(os.environ, ANSIBLE_ROLES_PATH=str(ANSIBLE_DIR / "roles"),
                   ANSIBLE_FILTER_PLUGINS=str(ANSIBLE_DIR / "filter_plugins"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
                   PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
        result = subprocess.run(
            [str(bin_dir / "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e", f"@{work / 'vars.json'}",
             str(work / "render.yml")], env=env, capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 0, f"the {role} role failed ({tasks_from}):\n{result.stdout}\n{result.stderr}"
