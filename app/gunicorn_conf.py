"""gunicorn configuration: ``gunicorn -c app/gunicorn_conf.py "app.main:create_app()"``.

Every value comes from app.settings (MLAPI_* variables). The master preloads
the app and loads the models before forking, then freezes the garbage
collector so the workers share the model's memory copy-on-write. SIGHUP
(``systemctl reload``) reloads the model packages in the master, verified
before they replace anything, builds the app again from what loaded (so the
routes and request schemas follow the serving versions), then replaces the
workers gracefully.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

# `import app` below works because gunicorn puts its working directory (--chdir, by default the one it was
# started in: the release's src/ on a host, the checkout here) on sys.path before it reads this file; an
# installed kit (`pip install .`) imports from anywhere.
from app.settings import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as exc:
    print(exc, file=sys.stderr)
    raise SystemExit(78) from None  # EX_CONFIG: systemd's start limit stops the loop

# Metrics from every worker land in one private directory; it must be empty at start
# and set before prometheus_client is first imported.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if not _metrics_dir:
    _metrics_dir = tempfile.mkdtemp(prefix="mlapi-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
Path(_metrics_dir).mkdir(parents=True, exist_ok=True)
# gunicorn re-reads this file on SIGHUP; only a fresh master empties the directory.
if not os.environ.get("MLAPI_MASTER_STARTED"):
    for _entry in Path(_metrics_dir).iterdir():
        if _entry.is_dir():
            shutil.rmtree(_entry, ignore_errors=True)
        else:
            _entry.unlink(missing_ok=True)

from app.logs import get_logger, logging_config  # noqa: E402

bind = [_settings.bind]
workers = _settings.workers
worker_class = "app.server.workers.GracefulWorker"
preload_app = True
max_requests = _settings.max_requests
max_requests_jitter = _settings.max_requests_jitter
timeout = _settings.timeout
graceful_timeout = _settings.graceful_timeout
# Longer than NGINX's upstream keepalive_timeout, so NGINX closes idle connections first
# and never reuses one that the service is closing.
keepalive = _settings.keepalive
forwarded_allow_ips = ",".join(_settings.trusted_proxies)
logconfig_dict = logging_config(_settings.log_level)
accesslog = None
proc_name = "mlapi"
# systemd signals manage the service; a per-user control socket would be shared by every instance.
control_socket_disable = True


def _load_and_rebuild(server) -> None:  # type: ignore[no-untyped-def]
    """Load the model packages in the master, then build the app the next workers fork with from what loaded:
    its routes, request schemas and /openapi.json show the versions the gate let through (app/main.py)."""
    # Imported here, not with this file: a configuration that extends it without preloading (the benchmark's
    # bench/gunicorn_no_preload.py) keeps a master that never imports the app.
    from app.main import create_app

    app = server.app.wsgi()
    registry = app.state.registry
    # What the last freeze kept is collectable again: the app and the models a reload replaces are freed.
    gc.unfreeze()
    registry.load()
    server.app.callable = create_app(app.state.settings, registry)
    del app
    gc.collect()
    gc.freeze()


def on_starting(server) -> None:  # type: ignore[no-untyped-def]
    """Load and verify the models in the master, before the first worker forks."""
    os.environ["MLAPI_MASTER_STARTED"] = "1"
    _load_and_rebuild(server)


def on_reload(server) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP: load new model packages; a package that fails the gate leaves the old one serving. The workers
    that replace the old ones serve the routes of what is loaded now: a new model gets its routes."""
    _load_and_rebuild(server)
    get_logger("gunicorn").info("reloaded model packages; replacing workers")


# prctl(2): PR_SET_PDEATHSIG.
_PR_SET_PDEATHSIG = 1


def post_fork(server, worker) -> None:  # type: ignore[no-untyped-def]
    """A worker stops gracefully (SIGTERM: it finishes its requests) when its master dies.

    Uvicorn workers never check for their master, so after a `kill -9` of the master they would go on
    holding the port, and the master systemd starts next could not bind it. The kernel tells them instead.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        get_logger("gunicorn").warning("worker cannot follow its master's death",
                                       extra={"errno": ctypes.get_errno()})
    if os.getppid() != server.pid:  # the master died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def child_exit(server, worker) -> None:  # type: ignore[no-untyped-def]
    """Fold the dead worker's metrics into the archive files, so the folder stays bounded, and remove its
    gRPC markers."""
    from app.metrics import archive_dead_processes, check_folder

    archive_dead_processes()
    # Its gRPC hand-over markers (app/rpc/server.py, Listener), which a killed worker leaves behind.
    for marker in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"], "grpc").glob(f"{worker.pid}.*"):
        marker.unlink(missing_ok=True)
    # During a reload the old workers and their replacements run side by side, with the master.
    check_folder(processes=2 * _settings.workers + 1, min_free_bytes=_settings.metrics_dir_min_free_bytes)
