"""Fixtures shared by every test layer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts.harness.servers import mlapi


@pytest.hookimpl(optionalhook=True)  # a run with -p no:xdist has no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """How pytest-xdist shares the tests between its processes (``make test`` runs two): the sandbox tests share
    hosts and an order (tests/e2e/conftest.py), so all of them go to one process, in that order; every other module
    goes whole to one process, so its module fixtures (servers, NGINX, built packages) start once. xdist hands out
    the units with the most tests first, one per process: the sandbox tests, the largest or the second largest,
    start at once.

    A scheduler of our own rather than ``--dist loadgroup``: its marks rename a test's nodeid, which pytest 9 no
    longer lets a plugin do, so every test ended up in a group of its own."""
    from xdist.scheduler import LoadScopeScheduling

    class SandboxTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/e2e" if path.startswith("tests/e2e/") else path

    return SandboxTestsTogether(config, log)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model packages (iris, iris-logreg, diabetes, churn at version 1), built once per session."""
    models = tmp_path_factory.mktemp("models")
    mlapi("train-demo", "--models-dir", models, check=True)
    return models


@pytest.fixture
def models_copy(demo_models: Path, tmp_path: Path) -> Path:
    """A private copy of the demo packages that a test may change."""
    target = tmp_path / "models"
    shutil.copytree(demo_models, target)
    return target
