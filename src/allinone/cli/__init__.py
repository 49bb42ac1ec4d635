"""Command-line interface: one command per job: serve, classify, decide, extract, chat, eval,
calibrate, soak, listen, plan, deploy, tasks, models, doctor. Each command takes the flags of
what it builds (every setting is a flag of the commands that use it: see settings_flags)."""

from __future__ import annotations

import argparse
import logging
import sys

from allinone import __version__
from allinone.cli import catalog, deploy, evaluate, ops, run, serve
from allinone.cli.common import FlagGroups, load_settings

__all__ = ["build_parser", "load_settings", "main"]

# The command families, in the order `allinone --help` lists their commands.
_FAMILIES = (serve, run, evaluate, ops, deploy, catalog)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="allinone", description=__doc__)
    p.add_argument("--version", action="version", version=f"allinone {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    flags = FlagGroups.build()
    for family in _FAMILIES:
        family.add_commands(sub, flags)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``allinone`` command."""
    from allinone.backends.base import BackendError
    from allinone.models import ModelFetchError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ModelFetchError, BackendError, ValueError, OSError) as exc:  # InputError too
        print(f"allinone: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
