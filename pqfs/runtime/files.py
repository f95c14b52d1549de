"""Local files read for the vault: opened without blocking on what is not a regular file, read
and written whole at an offset."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Callable

from pqfs.errors import VaultError


def _inheritable_fds() -> frozenset[int]:
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return frozenset()
    found = set()
    for name in names:
        fd = int(name)
        try:
            if fd > 2 and not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                found.add(fd)
        except OSError:
            continue  # the listing's own descriptor, closed since
    return frozenset(found)


# The descriptors this process was started with beyond 0-2 (a shell's, a service manager's
# open files), taken when pqfs is first imported: before any command runs, so none is a
# descriptor pqfs or a library it calls opened (a daemon closes these, background.py).
INHERITED_FDS = _inheritable_fds()


def open_regular(path: str | os.PathLike[str], follow_symlinks: bool = True) -> int:
    """A read-only descriptor of the regular file at `path`; VaultError for anything else.

    Opened O_NONBLOCK, then checked: a FIFO (or a tape, a tty) in place of a file would block
    open() until a writer came, forever, holding the thread that called it. Without
    `follow_symlinks`, a symbolic link is refused too (vault objects never are one)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags if follow_symlinks else flags | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise VaultError(f"{os.fspath(path)}: is a symbolic link, not a regular file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise VaultError(f"{os.fspath(path)}: not a regular file ({_kind(mode)})")
        os.set_blocking(fd, True)  # no meaning for a regular file; nothing else relies on it
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a file"


def preadfull(fd: int, buf: memoryview, offset: int) -> int:
    total = 0
    while total < len(buf):
        n = os.preadv(fd, [buf[total:]], offset + total)
        if n == 0:
            break
        total += n
    return total


_libc: ctypes.CDLL | None = None

# A new object's bytes go to the disk as they are written, from this many at once (one
# system call each): the kernel starts writing back dirty pages only past
# dirty_background_ratio (10 % of memory: 2.3 GiB on a 23 GiB machine), so a 1 GiB object
# written whole was still all in memory at its make_durable, which then waited for the disk
# as long as the writing had taken (a 4 KiB edit of a 1 GiB file: ~1.3 s encrypting, then
# ~2.3 s syncfs, 2026-12-02). Written behind, the two overlap.
WRITE_BEHIND = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing the range's dirty pages to the
    disk, without waiting for them (it waits only while the disk's queue is full: the
    writer then goes at the disk's pace). Durability still comes from fsync or syncfs; on a
    filesystem or kernel without it, nothing happens (best effort)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.sync_file_range(
        fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE
    )


def fd_pwriter(fd: int, write_behind: bool = False) -> Callable[[memoryview | bytes, int], None]:
    """pwrite(data, offset) writing all of `data`. With `write_behind`, each write of at least
    WRITE_BEHIND bytes is sent to the disk as it lands (start_writeback)."""

    def pwrite(data: memoryview | bytes, offset: int) -> None:
        mv = memoryview(data)
        start, size = offset, len(mv)
        while mv:
            n = os.pwrite(fd, mv, offset)
            mv, offset = mv[n:], offset + n
        if write_behind and size >= WRITE_BEHIND:
            start_writeback(fd, start, size)

    return pwrite


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or create in directory `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:  # some filesystems refuse O_DIRECTORY opens; durability is best effort
        if e.errno in (errno.EACCES, errno.EINVAL):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(fd: int) -> None:
    """syncfs(2): flush the whole filesystem holding `fd` (Python 3.11 has no os.syncfs)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
