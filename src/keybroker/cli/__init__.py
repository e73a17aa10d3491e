"""Command lines. They parse arguments and call the SDK or the server; nothing more."""

from __future__ import annotations

import argparse

from keybroker import __version__


def add_version(parser: argparse.ArgumentParser) -> None:
    """``-V``/``--version``, as upstream's commands (clap) offer it."""
    parser.add_argument(
        "-V", "--version", action="version", version=f"{parser.prog} (keybroker) {__version__}"
    )
