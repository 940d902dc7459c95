"""The client venvs' requirements (scripts/harness/client_envs/) against the service's own pins."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[name.split("[", 1)[0].strip().lower()] = version.strip()
    return found


@pytest.mark.parametrize("peer", ["mlserver", "bentoml"])
def test_a_peer_loads_the_model_with_the_versions_that_built_it(peer):
    """The bench's peers unpickle the same model.joblib: scikit-learn, numpy and joblib as requirements.txt."""
    service = pins(ROOT / "requirements.txt")
    theirs = pins(ROOT / "scripts" / "harness" / "client_envs" / f"{peer}.txt")
    for name in ("scikit-learn", "numpy", "joblib"):
        assert theirs[name] == service[name], (
            f"scripts/harness/client_envs/{peer}.txt pins {name} apart from requirements.txt"
        )


def test_every_client_env_is_pinned():
    def check(requirements: Path) -> None:
        lines = [ln.split("#", 1)[0].strip() for ln in requirements.read_text().splitlines()]
        for line in filter(None, lines):
            if line.startswith("-r "):  # the packager venv takes the service's own pins
                check((requirements.parent / line[3:].strip()).resolve())
            else:
                assert "==" in line, f"{requirements.name}: every requirement needs an exact pin, not {line!r}"

    for requirements in (ROOT / "scripts" / "harness" / "client_envs").glob("*.txt"):
        check(requirements)
