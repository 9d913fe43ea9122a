"""The ``synthmed`` command line. Every command is reachable in-process as ``main(argv)``.

Commands take ``--config PROFILE`` (a name in configs/ or a YAML path) and dotted overrides
such as ``--train.lr=1e-4``; explicit flags of a command win over both.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import traceback
from importlib import metadata
from pathlib import Path

from generator.errors import SynthmedError, UserError

from . import commands
from .config import ConfigError

# Exceptions that report bad input, config, files or arguments: printed as one line, exit code 2.
# Any other OSError (a full disk, a vanished mount) is the machine's, not a bug of synthmed: one line too.
USER_ERRORS = (SynthmedError, ConfigError, OSError)
WORKSPACE_ENV = "SYNTHMED_HOME"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps description line breaks; shows a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthmed",
        description="synthmed: grounded, self-improving synthetic medical images.\n"
        "Run `synthmed COMMAND --help` for the options of each command.",
        formatter_class=_Formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--workspace", metavar="DIR", default=None,
                        help="the folder for writable state (data/, runs/, the knowledge base, traces), and the one relative "
                        "paths are read from, as if synthmed were started there (like git -C); created when missing "
                        f"(default: ${WORKSPACE_ENV}, else the current folder)")
    groups = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in commands.ALL:
        module.register(groups, _Formatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines say which CPU build loaded
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        with workspace(args.workspace or os.environ.get(WORKSPACE_ENV) or None):
            return int(args.handler(args, extra) or 0)
    except USER_ERRORS as exc:
        # Something the person can fix: one line, no traceback.
        print(f"synthmed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"synthmed {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001  (reported, not swallowed)
        # Anything else is a bug in synthmed, never disguised as bad input.
        traceback.print_exc(file=sys.stderr)
        print(internal_error_message(args.command, argv), file=sys.stderr)
        return 1


@contextlib.contextmanager
def workspace(folder: str | None):
    """Run inside ``folder`` (made when missing), as if synthmed were started there, and come back after: the
    shipped profiles and weights are found from the installed packages wherever this is, and everything a command
    writes under a relative path (data/, runs/, the knowledge base, traces) lands in it."""
    if not folder:
        yield
        return
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"workspace {path} is a file, not a folder: give --workspace (or ${WORKSPACE_ENV}) a folder")
    path.mkdir(parents=True, exist_ok=True)
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _version() -> str:
    try:
        return metadata.version("synthmed")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def internal_error_message(command: str, argv: list[str]) -> str:
    """What to say below the traceback of an unexpected exception."""
    return (
        f"synthmed {command}: internal error: this is a bug in synthmed, not a problem with your input. "
        f"Please report it with the command line (synthmed {shlex.join(argv)}), "
        f"the version (synthmed {_version()}) and the traceback above."
    )


if __name__ == "__main__":
    sys.exit(main())
