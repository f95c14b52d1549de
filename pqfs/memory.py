"""Buffers whose pages are faulted in by the kernel without Python's GIL held.

Why: on this project's VM the first touch of a page is slow when the host has taken the memory
back (free page reporting), and Python zeroes a new bytearray or memoryview under the GIL, so
every other thread, the mount's loop first, waits for those page faults. A worker allocating a
1 MiB buffer held the GIL for 13-26 ms; the loop stalled as long.
"""

from __future__ import annotations

import ctypes
import mmap

from .stream import CHUNK

_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls run without the GIL
LARGE = 256 << 10  # from this size on malloc maps fresh pages anyway (mount.bound_malloc)


def populated(size: int = CHUNK) -> memoryview:
    """A zeroed buffer whose pages are already faulted in: the mapping is made lazily and
    madvise(MADV_POPULATE_WRITE), called through ctypes, faults it in while other threads run.
    Where that fails (Linux < 5.14) the pages fault in on first write."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    _libc.madvise(
        ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), _MADV_POPULATE_WRITE
    )
    del anchor  # the mapping must not stay exported: the view below keeps it alive
    return memoryview(m)


def scratch(size: int) -> memoryview:
    """A zeroed buffer of `size` bytes for transient use: `populated` when large (its pages
    fault in without the GIL, and it is unmapped when dropped), a bytearray when small (the
    allocator reuses memory already touched)."""
    return populated(size) if size >= LARGE else memoryview(bytearray(size))
