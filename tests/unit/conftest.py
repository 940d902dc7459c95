from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette prefers httpx2 for its test client; httpx works
    from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

IRIS_ROW = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


@contextmanager
def _client(models_dir: Path, **overrides: object) -> Iterator[TestClient]:
    settings = Settings(models_dir=models_dir, **{"default_model": "iris", **overrides})
    with TestClient(create_app(settings)) as client:
        yield client


ClientFactory = Callable[..., "contextmanager[TestClient]"]


@pytest.fixture
def make_client() -> ClientFactory:
    return _client


@pytest.fixture(scope="module")
def client(demo_models: Path) -> Iterator[TestClient]:
    """One app per test module for tests that only read; tests that change settings use make_client."""
    with _client(demo_models) as c:
        yield c
