"""Fixtures shared by every test layer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model packages (iris, iris-logreg, diabetes at version 1), built once per session."""
    models = tmp_path_factory.mktemp("models")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_model.py"), "--models-dir", str(models)],
        check=True,
        capture_output=True,
        text=True,
    )
    return models


@pytest.fixture
def models_copy(demo_models: Path, tmp_path: Path) -> Path:
    """A private copy of the demo packages that a test may change."""
    target = tmp_path / "models"
    shutil.copytree(demo_models, target)
    return target
