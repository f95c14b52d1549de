"""Where a mount's daemon logs: a file (created 0600), stderr in the foreground, else the host's
syslog socket, and the warning when a background mount would log nowhere. It never logs itself,
and touches no vault, key or mount state: handlers and formats only.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import socket
import sys
from typing import cast


def syslog_socket() -> str:
    """Where a background mount without --log-file logs: the host's syslog socket.
    PQFS_SYSLOG_SOCKET names another one (a test hook; also for hosts that keep it elsewhere)."""
    return os.environ.get("PQFS_SYSLOG_SOCKET") or "/dev/log"


def _syslog_answers(path: str) -> bool:
    """Whether a syslog daemon listens at `path` (SysLogHandler itself ignores one that
    does not, and then drops every line)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(path)
                return True
            except OSError:
                continue
    return False


def _syslog_handler() -> logging.Handler | None:
    """A handler for the syslog socket, or None if nothing listens there (a container, a
    minimal host): then a background mount's log would go nowhere."""
    path = syslog_socket()
    if not _syslog_answers(path):
        return None
    handler = logging.handlers.SysLogHandler(path)
    handler.setFormatter(logging.Formatter("pqfs[%(process)d]: %(levelname)s: %(message)s"))
    return handler


def no_syslog_warning(foreground: bool, log_file: str | None) -> str | None:
    """The warning for a background mount whose log would be lost, else None."""
    if foreground or log_file or _syslog_answers(syslog_socket()):
        return None
    return (
        f"no syslog on this host ({syslog_socket()} does not answer): the mount logs nothing;"
        " use --log-file FILE"
    )


class _PrivateFileHandler(logging.FileHandler):
    """A log file created mode 0600: it names the files read through the mount (plaintext
    paths). A file that exists keeps its mode (logrotate's `create`, an administrator's)."""

    def _open(self) -> io.TextIOWrapper:
        def opener(path: str, flags: int) -> int:
            return os.open(path, flags | os.O_CLOEXEC, 0o600)

        stream = open(  # noqa: SIM115 - the handler owns and closes it
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=opener
        )
        return cast(io.TextIOWrapper, stream)  # text mode: always one


def setup_logging(foreground: bool, log_file: str | None, debug: bool = False) -> None:
    logger = logging.getLogger("pqfs")
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler | None
    if log_file:
        handler = _PrivateFileHandler(log_file)
        handler.setFormatter(
            logging.Formatter("%(asctime)s pqfs[%(process)d] %(levelname)s: %(message)s")
        )
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pqfs: %(levelname)s: %(message)s"))
    else:
        handler = _syslog_handler()  # None: the parent warned (no_syslog_warning)
    logger.handlers[:] = [handler or logging.NullHandler()]
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)
