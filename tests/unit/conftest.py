from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.app_client import TestClient, app_client

ClientFactory = Callable[..., "contextmanager[TestClient]"]


@pytest.fixture
def make_client() -> ClientFactory:
    return app_client


@pytest.fixture(scope="module")
def client(demo_models: Path) -> Iterator[TestClient]:
    """One app per test module for tests that only read; tests that change settings use make_client."""
    with app_client(demo_models) as c:
        yield c
