"""Fixtures of the integration tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def service_models(demo_models: Path) -> Iterator[Path]:
    """A copy of the demo packages the service user can read (pytest's own temporary folders are root's only)."""
    base = Path(tempfile.mkdtemp(prefix="mlapi-models-"))
    base.chmod(0o755)
    models = base / "models"
    shutil.copytree(demo_models, models)
    models.chmod(0o755)  # copied from a folder only root may enter
    try:
        yield models
    finally:
        shutil.rmtree(base)
