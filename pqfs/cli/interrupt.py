"""Ctrl-C before `main()` (cli/main.py) takes over: `pqfs: interrupted`, exit 130, never a traceback.

Loading pqfs's modules (cryptography, the KEM backends) takes a few hundred milliseconds, and
a SIGINT then raises KeyboardInterrupt outside any handler of ours: Python would print a
traceback. cli/main.py imports this module before any other of pqfs's, so the hook is in
place for all of that time; from then on `main()` reports an interrupt the same way itself.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program that SIGINT stopped


def _hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if not issubclass(kind, KeyboardInterrupt):
        _previous(kind, value, tb)
        return
    try:
        sys.stdout.flush()
        print("pqfs: interrupted", file=sys.stderr, flush=True)
    finally:
        os._exit(EXIT_INTERRUPTED)


_previous = sys.excepthook
sys.excepthook = _hook
