"""Running the deployment playbooks against the sandbox, as a user would from the repository root:

    ANSIBLE_CONFIG=deploy/ansible/ansible.cfg ansible-playbook \\
      -i deploy/ansible/inventories/sandbox -i .sandbox/inventory/hosts.yml deploy/ansible/site.yml

The session provisions the sandbox once (site.yml twice: the second run must change nothing); every
deploy test module shares that through `provision()`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from app.cli.train_demo import DEMO_MODELS
from app.packages.gate import load_package
from app.packages.manifest import PackageError
from scripts.harness.load import ContinuousClient, HttpsClient
from scripts.harness.samples import IRIS
from scripts.harness.sandbox import Sandbox
from scripts.harness.servers import mlapi

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "deploy" / "ansible"
BIN = Path(sys.executable).parent
LOG_DIR = ROOT / ".cache" / "e2e"
MODELS = ROOT / "models"
PLAYBOOK_TIMEOUT = 1800
RECAP = re.compile(r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
                   r"\s+failed=(?P<failed>\d+)", re.M)


@dataclass(frozen=True)
class PlaybookRun:
    playbook: str
    returncode: int
    output: str
    log: Path

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        return {m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
                for m in RECAP.finditer(self.output)}

    @property
    def changed(self) -> int:
        return sum(host["changed"] for host in self.recap.values())

    def changed_tasks(self) -> list[str]:
        """Names of the tasks that reported a change (for a readable failure message)."""
        tasks, current = [], None
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                current = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed:") and current and current not in tasks:
                tasks.append(current)
        return tasks

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def run_playbook(sandbox: Sandbox, playbook: str, extra_vars: dict | None = None, label: str | None = None,
                 options: tuple[str, ...] = (), timeout: float = PLAYBOOK_TIMEOUT) -> PlaybookRun:
    """Run deploy/ansible/<playbook> against the sandbox; the output is also kept in .cache/e2e/<label>.log."""
    cmd = [str(BIN / "ansible-playbook"), "-i", str(ANSIBLE_DIR / "inventories" / "sandbox"),
           "-i", str(sandbox.inventory), "--vault-password-file", str(sandbox.vault_password_file), *options,
           str(ANSIBLE_DIR / playbook)]
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{label or Path(playbook).stem}.log"
    log.write_text(result.stdout)
    return PlaybookRun(playbook, result.returncode, result.stdout, log)


def ensure_demo_models() -> Path:
    """The demo packages in models/, as `make models` makes them: trained again unless each one passes the
    check in this interpreter (built with another Python, scikit-learn or numpy, the hosts refuse it too)."""
    def passes(name: str) -> bool:
        try:
            load_package(MODELS / name / "1")
        except PackageError:
            return False
        return True

    if not all(passes(name) for name in DEMO_MODELS):
        mlapi("train-demo", "--force", "--models-dir", MODELS, check=True, stdin=subprocess.DEVNULL)
    return MODELS


_site_runs: tuple[PlaybookRun, PlaybookRun | None] | None = None


def provision(sandbox: Sandbox) -> tuple[PlaybookRun, PlaybookRun | None]:
    """site.yml from the sandbox's fresh state, then once more; done once per session."""
    global _site_runs
    if _site_runs is None:
        ensure_demo_models()
        first = run_playbook(sandbox, "site.yml", label="site-first")
        second = run_playbook(sandbox, "site.yml", label="site-second") if first.returncode == 0 else None
        _site_runs = (first, second)
    return _site_runs


def require_provisioned(sandbox: Sandbox) -> None:
    first, _ = provision(sandbox)
    assert first.returncode == 0, f"site.yml failed (log: {first.log}):\n{first.tail()}"


def https(sandbox: Sandbox) -> HttpsClient:
    return HttpsClient(sandbox.ca, sandbox.ip, sandbox.domain)


def grpc_client(sandbox: Sandbox):
    """Triton's gRPC client for the domain at the lb host's address, port 443, trusting the sandbox's CA alone."""
    import tritonclient.grpc as triton

    return triton.InferenceServerClient(
        f"{sandbox.ip}:443", ssl=True, root_certificates=str(sandbox.ca),
        channel_args=[("grpc.ssl_target_name_override", sandbox.domain), ("grpc.default_authority", sandbox.domain)])


def continuous_client(sandbox: Sandbox, **kwargs) -> ContinuousClient:
    return ContinuousClient(sandbox.ca, sandbox.ip, sandbox.domain, **kwargs)


def app_host(sandbox: Sandbox):
    """The (single) host that runs the service."""
    return sandbox.host(sandbox.app_ips[0])


def wait_until_every_instance_serves(sandbox: Sandbox, instances: int = 2, timeout: float = 90) -> None:
    """Until NGINX sends requests to every instance again (it leaves a failed one out for its fail_timeout)."""
    host = sandbox.host(sandbox.ip)
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    with https(sandbox) as client:
        while time.monotonic() < deadline:
            marker = uuid.uuid4().hex
            for n in range(2 * instances):
                client.post("/v1/predict", json=IRIS, headers={"X-Request-ID": f"{marker}{n:02d}"})
            log = sandbox.ssh(host, f"grep -F {marker} /var/log/nginx/mlapi-access.log").stdout
            seen = {json.loads(line)["upstream_addr"] for line in log.splitlines()}
            if len(seen) >= instances and all("," not in addr for addr in seen):
                return
            time.sleep(2)
    raise AssertionError(f"NGINX did not use all {instances} instances within {timeout}s (upstreams seen: {seen})")


def renewal_command(domain: str, *options: str) -> str:
    """`certbot renew OPTIONS` for the domain as certbot.timer runs it: in a transient unit with the
    environment files of certbot.service (the ACME CA bundle and proxy), read by systemd."""
    environment_files = ("$(systemctl show certbot.service -p EnvironmentFiles --value"
                         " | sed 's/ (ignore_errors=.*)$//; s/^/--property=EnvironmentFile=/')")
    return (f"systemd-run --wait --pipe --collect --quiet {environment_files} "
            f"certbot renew {' '.join(options)} --cert-name {domain} --no-random-sleep-on-renew")


def forced_renewal_command(domain: str) -> str:
    """A forced renewal (renewal_command); the deploy hook reloads NGINX."""
    return renewal_command(domain, "--force-renewal")


def release_copy(destination: Path, *, broken: bool = False) -> Path:
    """A release folder (app/ and requirements.txt) copied from the checkout; `broken` makes the app fail at import."""
    shutil.copytree(ROOT / "app", destination / "app", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "requirements.txt", destination / "requirements.txt")
    marker = destination / "app" / "main.py"
    if broken:
        marker.write_text(marker.read_text() + '\nraise RuntimeError("deliberately broken release")\n')
    else:
        marker.write_text(marker.read_text() + f"\n# release built from a copy at {destination.name}\n")
    return destination
