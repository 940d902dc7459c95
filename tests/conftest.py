"""Fixtures shared by every test layer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts.harness.servers import mlapi


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for pytest-xdist's ``--dist loadgroup`` (``make test`` runs two processes): the sandbox tests share
    hosts and an order (tests/e2e/conftest.py), so they all run in one process; every other module runs whole in
    one process, so that its module fixtures (servers, NGINX, built packages) start once."""
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group("sandbox" if path.startswith("tests/e2e/") else path))


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
