"""Secrets kept where they can be wiped: passphrases, identities and keys as bytearrays.

Python makes immutable copies of whatever passes through `str` and `bytes`, and frees them
without clearing, so a secret that once was a `str` or `bytes` object can outlive `pqfs lock`
in the daemon's memory. The rules this module serves (measured by tests/test_secrets.py,
which scans the daemon's memory after lock):
  * secrets are read straight into bytearrays (`read_fd`, `take_env`, `prompt`): no file
    object, no text decoding, no intermediate buffer;
  * a secret that a library hands back as `bytes` (an HPKE or AEAD result, a digest) is copied
    into a bytearray and the `bytes` object is wiped in place at once (`wipe_bytes`);
  * a passphrase taken from the environment is removed from it, and the strings the process
    started with are overwritten, so it is not inherited by the daemon or its children.
What Python keeps on its own (a short-lived integer, a list of small-int pointers during a
Bech32 decode) is out of reach; README's security section says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import termios

from pqfs.errors import PqfsError
from pqfs.runtime.memory import wipe

ENV_PASSPHRASE = "PQFS_PASSPHRASE"
ENV_NEW_PASSPHRASE = "PQFS_NEW_PASSPHRASE"
SECRET_ENV = (ENV_PASSPHRASE, ENV_NEW_PASSPHRASE)  # never handed on to a child process
# Nor is where systemd put the passphrase credential (LoadCredential=): a hook has no use for it.
CHILD_ENV_DROPPED = (*SECRET_ENV, "CREDENTIALS_DIRECTORY")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getenv.restype = ctypes.c_void_p
_libc.getenv.argtypes = [ctypes.c_char_p]
_libc.strlen.restype = ctypes.c_size_t
_libc.strlen.argtypes = [ctypes.c_void_p]
# Where CPython keeps the bytes of a bytes object: right after its fixed-size header.
_BYTES_DATA = bytes.__basicsize__ - 1
_CPYTHON = sys.implementation.name == "cpython"

__all__ = ["discard_env", "prompt", "read_fd", "take_env", "wipe", "wipe_bytes"]


def wipe_bytes(data: object) -> None:
    """Zero the buffer of an immutable `bytes` object that holds a secret, in place.

    Only for a `bytes` object this code owns alone (a fresh result of a library call, never a
    literal, a dict key or a 0/1-byte singleton). Elsewhere than CPython it does nothing.
    """
    if not _CPYTHON or type(data) is not bytes or len(data) < 2:
        return
    ctypes.memset(id(data) + _BYTES_DATA, 0, len(data))


def read_fd(fd: int, limit: int) -> bytearray:
    """Everything readable from `fd` (at most `limit` bytes), read straight into a bytearray
    of exactly that length; the larger read buffer is wiped."""
    buf = bytearray(limit + 1)
    got = 0
    try:
        while got <= limit:
            n = os.readv(fd, [memoryview(buf)[got:]])
            if n == 0:
                break
            got += n
        out = bytearray(min(got, limit))
        memoryview(out)[:] = memoryview(buf)[: len(out)]
        return out
    finally:
        wipe(buf)


def strip_newline(secret: bytearray) -> bytearray:
    """`secret` without its trailing CR/LF, as a new bytearray; the old one is wiped."""
    n = len(secret)
    while n and secret[n - 1] in (0x0A, 0x0D):
        n -= 1
    out = bytearray(n)
    memoryview(out)[:] = memoryview(secret)[:n]
    wipe(secret)
    return out


def take_env(name: str) -> bytearray | None:
    """The value of environment variable `name` as a bytearray, removed from the environment:
    the bytes object Python made of it at start-up and the C string the process was started
    with are overwritten, so neither this process nor its children keep a copy."""
    key = os.fsencode(name)
    value = os.environb.get(key)
    if value is None:
        return None
    out = bytearray(value)
    ptr = _libc.getenv(key)
    if ptr:
        ctypes.memset(ptr, 0, _libc.strlen(ptr))
    wipe_bytes(value)
    del value
    os.environb.pop(key, None)  # unsetenv(): the process's environ no longer points at it
    return out


def discard_env() -> None:
    """Take every passphrase variable (SECRET_ENV) out of the environment and wipe it, whatever
    unlocked the vault: a daemon unlocked from an identity file must not keep one either."""
    for name in SECRET_ENV:
        value = take_env(name)
        if value is not None:
            wipe(value)


def prompt(text: str) -> bytearray:
    """Ask on the terminal without echo; the answer, without its newline, as a bytearray.
    Unlike getpass, nothing passes through a `str` or a buffered file."""
    fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        old = termios.tcgetattr(fd)
        new = termios.tcgetattr(fd)
        new[3] &= ~termios.ECHO
        os.write(fd, f"{text}: ".encode())
        termios.tcsetattr(fd, termios.TCSAFLUSH, new)
        try:
            answer = read_line(fd)
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, old)
            with contextlib.suppress(OSError):
                os.write(fd, b"\n")
        return answer
    finally:
        os.close(fd)


def read_line(fd: int, limit: int = 1024) -> bytearray:
    """One line from a terminal in canonical mode (a read returns at most one line).
    PqfsError for a line of `limit` bytes or more: the rest would be left for the shell to
    read as commands, and a passphrase cut short would not be the one typed."""
    buf = bytearray(limit)
    try:
        n = os.readv(fd, [buf])
        if n == limit and buf[n - 1] != 0x0A:
            while os.readv(fd, [buf]) == limit and buf[limit - 1] != 0x0A:
                pass  # the rest of the line, read and dropped
            raise PqfsError(f"the answer is longer than {limit - 1} bytes")
        return strip_newline(_head(buf, n))
    finally:
        wipe(buf)


def _head(buf: bytearray, n: int) -> bytearray:
    out = bytearray(n)
    memoryview(out)[:] = memoryview(buf)[:n]
    return out
