"""Command-line parsing shared by every `scalelm` command: a usage mistake is one line, --help works anywhere.

Torch-free and below every command module, so `scalelm.cli` and `scalelm.perf.cli` both use it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

HELP = ("-h", "--help")


class UsageError(Exception):
    """A mistake on the command line (option, argument or value), phrased for the person; exit code 2."""


def wants_help(argv: list[str]) -> bool:
    """-h or --help anywhere before a bare `--` (what follows `--` is passed on, not read)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in HELP:
            return True
    return False


class CliParser(argparse.ArgumentParser):
    """argparse for every subcommand: a usage mistake raises UsageError with argparse's message and where to read
    more, one line (not the usage block and exit), and -h/--help anywhere before `--` shows this command's help
    and exits 0, even after a bad value (argparse would stop at the value)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{' '.join(message.split())}; see `{self.prog} --help`")

    def parse_known_args(self, args: list[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        if wants_help(args) and not self._has_subcommand(args):
            self.print_help()
            self.exit(0)
        return super().parse_known_args(args, namespace)

    def _has_subcommand(self, args: list[str]) -> bool:
        """A sub-verb (`hw show`) among args: its own parser shows its help."""
        verbs = [a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        return any(arg in choices for choices in verbs for arg in args)


def is_number(text: str) -> bool:
    """Whether a command-line word is a number (`-1`, `1e-3`): a value, never an option."""
    try:
        float(text)
        return True
    except ValueError:
        return False
