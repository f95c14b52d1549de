"""The lines pqfs prints for its user besides a command's output, and its exit codes, by the
rules at the top of cli/main.py. Every command module prints through these; only main()
prints errors."""

from __future__ import annotations

import sys

from pqfs.errors import PqfsError

EXIT_ERROR = 1  # a user error: one `pqfs: error:` line said what
EXIT_USAGE = 2  # a command line argparse refused (as argparse itself exits)
EXIT_INTERNAL = 70  # a bug: EX_SOFTWARE of sysexits.h


class Hinted(PqfsError):
    """An error with a known fix: main() prints `hint` on a line of its own after it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def warn(msg: str) -> None:
    print(f"pqfs: warning: {msg}", file=sys.stderr)


def info(msg: str) -> None:
    print(msg, file=sys.stderr)
