"""The service under real gunicorn behind the NGINX edge rendered by the nginx role, for the
fuzzing and resource-exhaustion tests. Both processes are children of the test, stopped by PID."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scripts.harness.nginx import SERVER_NAME, Edge, running_edge
from scripts.harness.servers import Gunicorn, gunicorn


@contextmanager
def service_behind_edge(prefix: Path, models: Path, service_env: dict[str, str] | None = None,
                        **nginx_overrides: object) -> Iterator[tuple[Edge, Gunicorn]]:
    """Two gunicorn workers serving the demo models, and NGINX in front of them on loopback."""
    env = {
        "MLAPI_MODELS_DIR": str(models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_STORAGE_URI": "memory://",
        **(service_env or {}),
    }
    with gunicorn(env, workers=2) as server:
        edge_generator = running_edge(prefix, [server.port], **nginx_overrides)
        edge = next(edge_generator)
        try:
            yield edge, server
        finally:
            edge_generator.close()


def service_access_lines(server: Gunicorn) -> list[dict]:
    """The service's JSON access log lines (gunicorn writes them to its stdout)."""
    lines = []
    for line in server.output().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "status" in entry and "path" in entry:
            lines.append(entry)
    return lines


__all__ = ["SERVER_NAME", "service_access_lines", "service_behind_edge"]
