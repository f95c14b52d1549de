"""Which bytes of a local file are in the page cache, asked without starting a disk read.

Why: a read that misses the page cache is sent as an O_DIRECT read (`aio.py`), and the check
before it must not start a buffered read of the same bytes. preadv2 with RWF_NOWAIT does (on a
miss the kernel starts readahead, then fails with EAGAIN), so the check is cachestat(2), Linux
6.5+. Where cachestat is missing, `residency` says None and reads stay buffered.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform

PAGE = mmap.PAGESIZE

# cachestat is syscall 451 on every architecture with the unified syscall table.
_CACHESTAT = 451 if platform.machine() in ("x86_64", "aarch64", "riscv64") else None


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


_libc = ctypes.CDLL(None, use_errno=True) if _CACHESTAT is not None else None
_usable = _CACHESTAT is not None  # False after an ENOSYS or EPERM: never asked again


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of [offset, offset+length) of `fd` are in the page cache (length 0: to
    the end of the file); None if the kernel cannot tell without reading (no cachestat)."""
    global _usable
    if not _usable:
        return None
    assert _libc is not None
    rng, st = _Range(offset, length), _Stat()
    if _libc.syscall(_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):
            _usable = False  # an old kernel, or a seccomp filter: never ask again
        return None
    return int(st.cache)


def residency(fd: int, offset: int, length: int) -> bool | None:
    """Whether every page of [offset, offset+length) of `fd` is in the page cache; None if the
    kernel cannot tell without reading (no cachestat)."""
    cached = cached_pages(fd, offset, length)
    if cached is None:
        return None
    pages = (offset + length + PAGE - 1) // PAGE - offset // PAGE
    return cached >= pages


def checks() -> bool:
    """Whether `residency` can answer (so a failed cached read has started no disk read)."""
    return _usable


def open_direct(fd: int) -> int | None:
    """A second, O_DIRECT descriptor of the file open as `fd` (through /proc/self/fd, so the
    same inode even if its name is gone); None where the file system refuses O_DIRECT."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:  # EINVAL: no O_DIRECT on this file system; ENOENT: no /proc
        return None
