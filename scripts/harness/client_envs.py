"""Virtual environments for the client libraries whose pins conflict with the service's own.

The KServe SDK pins older pandas and protobuf, MLServer an older FastAPI and Starlette, BentoML its own
Starlette and uvicorn: none can share the service's venv. Each gets a venv of its own, built from its pinned
requirements file in scripts/harness/client_envs/ and kept per machine (``$MLAPI_CLIENT_ENVS``, default
~/.cache/mlapi/client-envs), so a fresh clone reuses it; it is rebuilt when a requirement in that file or the base
interpreter changes (not a comment). The tests and the bench (MLServer and BentoML as contenders) run them in a
subprocess. `make venv` builds them too (``python -m scripts.harness.client_envs``), so a clean machine has them
before the first test.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "client_envs"
CACHE = Path(os.environ.get("MLAPI_CLIENT_ENVS") or Path.home() / ".cache" / "mlapi" / "client-envs")
NAMES = ("kserve", "mlserver", "bentoml")


def _base_python() -> str:
    """The interpreter the service's venv was made from (venv copies of it work too)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _requirements_bytes(requirements: Path) -> bytes:
    """The requirements of the file and of every file it includes with -r, so that a change to any of them
    rebuilds the venv; comments and blank lines are left out, so rewording one does not."""
    lines = [line.split(" #", 1)[0].strip() for line in requirements.read_text().splitlines()]
    data = "\n".join(line for line in lines if line and not line.startswith("#")).encode()
    for line in lines:
        if line.startswith("-r "):
            data += _requirements_bytes((requirements.parent / line[3:].strip()).resolve())
    return data


def find_python(minor: str) -> str:
    """An interpreter of Python ``minor`` (e.g. "3.11"): on PATH, under pyenv, or the system's."""
    candidates = [shutil.which(f"python{minor}") or "", f"/usr/bin/python{minor}"]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    candidates += sorted(str(p) for p in pyenv.glob(f"{minor}.*/bin/python{minor}"))
    for candidate in (c for c in candidates if c and os.access(c, os.X_OK)):
        probe = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                               capture_output=True, text=True, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(int(p) for p in minor.split("."))):
            return candidate
    raise RuntimeError(f"no Python {minor} with venv found (looked on PATH, in {pyenv} and /usr/bin): "
                       f"install python{minor} and python{minor}-venv, or a pyenv {minor}")


def packager_python(minor: str) -> Path:
    """A venv of Python ``minor`` that builds model packages as the service's own venv would."""
    return client_python(f"packager-{minor}", requirements=REQUIREMENTS / "packager.txt", base=find_python(minor))


def client_python(name: str, requirements: Path | None = None, base: str | None = None) -> Path:
    """The python of the client venv ``name``, built first if missing or out of date."""
    requirements = requirements or REQUIREMENTS / f"{name}.txt"
    base = base or _base_python()
    version = sys.version if base == _base_python() else base
    digest = hashlib.sha256(_requirements_bytes(requirements) + f"\0{base}\0{version}".encode()).hexdigest()[:16]
    target = CACHE / f"{name}-{digest}"
    python = target / "bin" / "python"
    marker = target / ".installed"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs never build the same venv at once
        if marker.exists():
            return python
        shutil.rmtree(target, ignore_errors=True)
        for stale in CACHE.glob(f"{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        subprocess.run([base, "-m", "venv", str(target)], check=True)
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(requirements)],
            check=False, capture_output=True, text=True, timeout=1800,
        )
        if result.returncode != 0:
            raise RuntimeError(f"installing {requirements} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        marker.touch()
    return python


def run_script(name: str, script: Path, *args: str) -> dict:
    """Run ``script`` with the python of client venv ``name``; the one JSON object it prints."""
    result = subprocess.run([str(client_python(name)), str(script), *args],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


if __name__ == "__main__":
    for env in sys.argv[1:] or NAMES:
        print(client_python(env))
