"""``mlapi serve``: the service under gunicorn, as on a host but in the foreground."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from app.cli.arguments import positive_int

GUNICORN_CONF = Path(__file__).resolve().parent.parent / "gunicorn_conf.py"
APP = "app.main:create_app()"

COMMAND = "serve"
SUMMARY = "run the prediction service under gunicorn in the foreground"
DESCRIPTION = f"""\
Run the prediction service under gunicorn with uvicorn workers, configured by
app/gunicorn_conf.py: the master loads and verifies the model packages before
forking the workers; SIGHUP reloads the packages and replaces the workers
gracefully; SIGTERM or Ctrl-C stops it. Logs are JSON lines (`2>&1 | jq .`).

Every setting is an MLAPI_* environment variable (docs/configuration.md, or
`make config-reference`); the options below set the most common ones for this
run. The command becomes the gunicorn master (same process), so signals reach
it directly. It runs: python -m gunicorn -c app/gunicorn_conf.py "{APP}\""""

EPILOG = """\
example:
  mlapi serve --models-dir models --workers 2 --grpc 127.0.0.1:8500
  MLAPI_DEFAULT_MODEL=iris mlapi serve --bind 0.0.0.0:8080 2>&1 | jq ."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bind", metavar="HOST:PORT",
                        help="address to listen on, host:port or unix:/path; sets MLAPI_BIND (default: 127.0.0.1:8000)")
    parser.add_argument("--grpc", metavar="HOST:PORT",
                        help="also serve the gRPC Open Inference Protocol there, from every worker; "
                             "sets MLAPI_GRPC_BIND (default: no gRPC)")
    parser.add_argument("--workers", type=positive_int, metavar="N",
                        help="worker processes; sets MLAPI_WORKERS (default: the CPU count)")
    parser.add_argument("--models-dir", type=Path, metavar="DIR",
                        help="folder of model packages; sets MLAPI_MODELS_DIR (default: models)")


def run(args: argparse.Namespace) -> int:
    for variable, value in (("MLAPI_BIND", args.bind), ("MLAPI_GRPC_BIND", args.grpc), ("MLAPI_WORKERS", args.workers),
                            ("MLAPI_MODELS_DIR", args.models_dir)):
        if value is not None:
            os.environ[variable] = str(value)
    argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), APP]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)  # the master in this process: SIGHUP and SIGTERM reach gunicorn itself
    return 0  # not reached
