"""app/ is in layers (docs/architecture.md): each module imports only from its own layer or those it may use."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"
SHARED = {"app.settings", "app.logs", "app.metrics", "app.errors", "app.responses"}
ENTRY = {"app.main", "app.gunicorn_conf"}
# The layers each layer may import from, besides its own. rpc/, server/ and api/ are siblings under the entry points.
MAY_USE = {
    "entry": {"rpc", "server", "api", "serving", "packages", "shared"},
    # The gRPC transport turns each RPC into the REST call of the same meaning (app/rpc/server.py).
    "rpc": {"api", "shared"},
    "cli": {"serving", "packages", "shared"},
    "server": {"shared"},
    "api": {"serving", "packages", "shared"},
    "serving": {"packages", "shared"},
    "packages": {"shared"},
    "shared": set(),
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if module in ENTRY:
        return "entry"
    if module in SHARED:
        return "shared"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in MAY_USE:
        return parts[1]
    raise AssertionError(f"{module} is in no layer: put it in a layer folder of app/, or add it to SHARED here and "
                         "to docs/architecture.md")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "app":
                found += [(node.lineno, f"app.{a.name}") for a in node.names if a.name != "__version__"]
            elif node.module.startswith("app."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("app.")]
    return found


SOURCES = sorted(p for p in APP.rglob("*.py"))


def test_every_module_of_app_is_in_a_layer():
    assert len(SOURCES) >= 40
    for path in SOURCES:
        if path != APP / "__init__.py":
            _layer(_module(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_the_layers_below_it(path: Path):
    if path == APP / "__init__.py":
        return
    layer = _layer(_module(path))
    wrong = [f"line {line}: {imported} ({_layer(imported)})" for line, imported in _imports(path)
             if _layer(imported) != layer and _layer(imported) not in MAY_USE[layer]]
    assert wrong == [], (f"{path.relative_to(ROOT)} is in the {layer} layer, which may use "
                         f"{sorted(MAY_USE[layer]) or 'nothing else'}, but imports {wrong}")


def test_the_service_does_not_import_the_package_builder_or_grpc():
    """A release runs the service without skl2onnx; building (app/packages/build.py) is the controller's.
    The master that forks the workers never loads gRPC: each worker starts its own (app/main.py's lifespan)."""
    probe = ("import json, sys; import app.gunicorn_conf, app.main; app.main.create_app(); "
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('app.', 'skl2onnx', 'onnx.', 'grpc')))))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "MLAPI_MODELS_DIR": str(ROOT / "no-models-here"),
                              "MLAPI_GRPC_BIND": "127.0.0.1:8501"})
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert "app.api.predict" in loaded and "app.packages.gate" in loaded, loaded  # the probe did load the service
    assert [m for m in loaded if m == "app.packages.build" or not m.startswith("app.")] == []
