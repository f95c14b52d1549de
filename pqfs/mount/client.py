"""The client's end of a running mount (what `pqfs sync`, `stats`, `lock` and `umount` need):
whether a path is a pqfs mount, and one request to its daemon's control socket
(control.py is the daemon's end). No trio, no pyfuse3: these commands start in a fraction of
the time a mount's imports take (~125 ms of ~300), which a script polling `pqfs stats`, or a
benchmark timing `pqfs sync`, would pay every time."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from pqfs.errors import PqfsError

FSTYPE = "fuse.pqfs"
XATTR_CONTROL = b"user.pqfs.control"
XATTR_STATS = b"user.pqfs.stats"  # the mount's statistics, as JSON (pqfs stats)
ANSWER_TIMEOUT = 120.0  # the client's wait: an unlock runs scrypt and loads the catalog


@dataclass
class Answer:
    """What a request's handler answers: 0, or an errno and a one-line message."""

    code: int = 0
    message: str = ""


def mount_type(path: str) -> str | None:
    """The filesystem type mounted exactly at `path` (from /proc/self/mountinfo), or None."""
    target = os.path.realpath(path)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                mp = fields[4].encode().decode("unicode_escape")
                if mp == target:
                    found = right.split()[0]  # the last mount on a path is the visible one
    except OSError:
        return None
    return found


def request(address: bytes, command: str, secret: bytes | bytearray = b"") -> Answer:
    """The client's end: send one request to the daemon whose socket is `address` (as read
    from the mount's XATTR_CONTROL) and return its answer. A sync or a lock waits for commits
    (gigabytes to a remote store, each bounded by its --timeout): as long as they take."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(None if command in ("sync", "lock") else ANSWER_TIMEOUT)
        try:
            s.connect(b"\0" + address)
            try:
                s.sendall(command.encode() + b"\n")
                if secret:
                    s.sendall(secret)
                s.shutdown(socket.SHUT_WR)
            except BrokenPipeError:
                pass  # it answered before reading all of it (a refusal): read why
            reply = b""
            try:
                while chunk := s.recv(4096):
                    reply += chunk
            except ConnectionResetError:
                # A refusal is sent before the request is read, and closing a socket with
                # unread data resets it: the answer, one whole line, has arrived all the same.
                if not reply.endswith(b"\n"):
                    raise
        except OSError as e:
            raise PqfsError(f"the mount's daemon did not answer: {e.strerror or e}") from None
    code, _, message = reply.decode("utf-8", "replace").strip().partition(" ")
    if not code.isdigit():
        raise PqfsError("the mount's daemon gave no answer")
    return Answer(int(code), message)
