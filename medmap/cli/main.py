"""The ``medmap`` command: one sub-command per module in :mod:`medmap.cli`.

Each command module defines ``register(subparsers)`` which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code. Errors
caused by user input (:class:`medmap.errors.MedMAPError`) are printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from medmap import __version__
from medmap.errors import MedMAPError

# Order here is the order in ``medmap --help``.
COMMAND_MODULES = [
    "medmap.cli.validate",
    "medmap.cli.split",
    "medmap.cli.import_data",
    "medmap.cli.synth",
    "medmap.cli.pretrain",
    "medmap.cli.finetune",
    "medmap.cli.evaluate",
    "medmap.cli.subgroups",
    "medmap.cli.predict",
    "medmap.cli.zeroshot",
    "medmap.cli.export",
    "medmap.cli.bench",
    "medmap.cli.experiment",
    "medmap.cli.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medmap",
        description="MedMAP: modality-aware vision-language models for multi-sequence 3D MRI.",
    )
    parser.add_argument("--version", action="version", version=f"medmap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # command not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MedMAPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
