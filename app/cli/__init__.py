"""The ``mlapi`` command: package, verify, score, train-demo and serve.

Installed as the ``mlapi`` entry point (``make venv``); ``python -m app.cli``
runs the same command from a checkout or a release folder.
"""

from __future__ import annotations

import argparse
from types import ModuleType

from app.cli import package, score, serve, train_demo, verify

DESCRIPTION = """\
Deployment kit for scikit-learn prediction APIs: build and check model
packages, score files offline, and run the service."""

EPILOG = """\
example:
  mlapi train-demo --models-dir models
  mlapi verify models/iris/1
  mlapi score --package models/iris/1 --input rows.csv --output scored.csv
  mlapi serve --models-dir models

`mlapi COMMAND --help` describes each command, its options and an example."""


def add_command(commands: argparse._SubParsersAction, module: ModuleType) -> None:
    """One subcommand from its module: COMMAND, SUMMARY, DESCRIPTION, EPILOG (the example), add_arguments, run."""
    parser = commands.add_parser(
        module.COMMAND,
        help=module.SUMMARY,
        description=module.DESCRIPTION,
        epilog=module.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    parser.set_defaults(run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlapi", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (package, verify, score, train_demo, serve):
        add_command(commands, module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)

