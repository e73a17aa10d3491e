"""Command lines. They parse arguments and call the SDK or the server; nothing more."""

from __future__ import annotations

import argparse
import sys

from keybroker import __version__

# The modules the grpc extra brings: a command that needs them names the extra instead of a
# traceback when they are missing.
_GRPC_MODULES = ("grpc", "grpc_tools", "google")


# stands for "no help text" in an option that has a default to show (argparse prints no line
# at all for an option whose help is empty)
_NO_HELP = "\x00"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none or already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = "" if action.help == _NO_HELP else (action.help or "")
        if (
            not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or "default" in text
        ):
            return action.help
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """Every command's parser (and, through ``add_subparsers``, its sub-commands')."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def add_argument(self, *args: object, **kwargs: object) -> argparse.Action:
        # argparse prints no line at all for an option without help, so no default either
        if kwargs.get("help") is None and kwargs.get("default") not in (None, False):
            kwargs["help"] = _NO_HELP
        return super().add_argument(*args, **kwargs)  # type: ignore[arg-type]


def missing_grpc_extra(command: str, error: ModuleNotFoundError) -> int:
    """``command: error: ... pip install 'keybroker[grpc]'`` when ``error`` is the grpc extra
    missing (exit status 1); any other missing module is a real bug and is raised again."""
    if (error.name or "").split(".")[0] not in _GRPC_MODULES:
        raise error
    print(
        f"{command}: error: {command} needs the grpc extra: pip install 'keybroker[grpc]'",
        file=sys.stderr,
    )
    return 1


def add_version(parser: argparse.ArgumentParser) -> None:
    """``-V``/``--version``, as upstream's commands (clap) offer it."""
    parser.add_argument(
        "-V", "--version", action="version", version=f"{parser.prog} (keybroker) {__version__}"
    )
