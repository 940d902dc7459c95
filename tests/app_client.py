"""The service in process, through FastAPI's test client: the app that create_app builds from settings, with
its lifespan (the registry loads, the limits start) run by the client's context.

    with app_client(models_dir, default_model="churn") as client:
        client.post("/v1/predict", json=...)

tests/unit/conftest.py makes fixtures of it (client, make_client); modules that need an app of their own for a
whole module, or a second client on the same app (another peer address), import it from here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette prefers httpx2 for its test client; httpx works
    from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

__all__ = ["TestClient", "app_client"]


@contextmanager
def app_client(models_dir: Path, **overrides: object) -> Iterator[TestClient]:
    """A client of a new app serving models_dir (default model iris unless overridden by a setting)."""
    settings = Settings(models_dir=models_dir, **{"default_model": "iris", **overrides})
    with TestClient(create_app(settings)) as client:
        yield client
