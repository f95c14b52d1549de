"""Buffers whose pages are faulted in by the kernel without Python's GIL held, kept out of core
dumps and, within RLIMIT_MEMLOCK, out of swap; and the process hardening that goes with them.

Why faulted in: on this project's VM the first touch of a page is slow when the host has taken
the memory back (free page reporting), and Python zeroes a new bytearray or memoryview under
the GIL, so every other thread, the mount's loop first, waits for those page faults. A worker
allocating a 1 MiB buffer held the GIL for 13-26 ms; the loop stalled as long.

Why out of dumps and swap: `populated` buffers hold plaintext (the chunk cache, the mount's
reply buffers). Every one is MADV_DONTDUMP (`dd` in /proc/PID/smaps), even in a process that
could dump core (harden_process makes the mount's not); `lock=True` buffers (the default: for
plaintext and secrets; ciphertext takes `lock=False`) are also mlock()ed while the locked
total stays within the soft RLIMIT_MEMLOCK (`ulimit -l`, systemd's LimitMEMLOCK=), which this
module applies to itself even where the kernel would not (root): the administrator sets how
much memory pqfs may pin. A buffer that cannot be locked is used anyway, and counted.
"""

from __future__ import annotations

import ctypes
import mmap
import resource
import threading
import weakref

_MADV_DONTDUMP = 16  # Linux 3.4+
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4
_libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls run without the GIL
LARGE = 256 << 10  # from this size on malloc maps fresh pages anyway (daemon.bound_malloc)


class _Pinned:
    """Bytes of live `lock=True` buffers, locked or not (updated as buffers are made and
    unmapped; unmapping unlocks)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.locked = 0
        self.unlocked = 0
        self.refused = 0  # mlock calls the kernel refused (the limit, or no permission)

    def budget(self) -> int | None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return None if soft == resource.RLIM_INFINITY else soft

    def take(self, size: int) -> bool:
        """Reserve `size` bytes of the budget for a buffer about to be locked."""
        budget = self.budget()
        with self.lock:
            if budget is not None and self.locked + size > budget:
                self.unlocked += size
                return False
            self.locked += size
            return True

    def refuse(self, size: int) -> None:
        with self.lock:
            self.locked -= size
            self.unlocked += size
            self.refused += 1

    def release(self, size: int, locked: bool) -> None:
        with self.lock:
            if locked:
                self.locked -= size
            else:
                self.unlocked -= size


_pinned = _Pinned()


def populated(size: int, lock: bool = True) -> memoryview:
    """A zeroed buffer whose pages are already faulted in: the mapping is made lazily and
    madvise(MADV_POPULATE_WRITE), called through ctypes, faults it in while other threads run.
    Where that fails (Linux < 5.14) the pages fault in on first write. Never in a core dump;
    with `lock` (plaintext, secrets), mlock()ed within the budget (see the module)."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    addr, length = ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size)
    del anchor  # the mapping must not stay exported: the view below keeps it alive
    _libc.madvise(addr, length, _MADV_DONTDUMP)  # before the first page holds anything
    _libc.madvise(addr, length, _MADV_POPULATE_WRITE)
    if lock:
        locked = _pinned.take(size)
        if locked and _libc.mlock(addr, length) != 0:
            _pinned.refuse(size)
            locked = False
        # munmap (when the mmap object is freed) unlocks the pages; the count follows it.
        weakref.finalize(m, _pinned.release, size, locked)
    return memoryview(m)


def scratch(size: int) -> memoryview:
    """A zeroed buffer of `size` bytes for transient ciphertext (not locked: nothing secret
    in it, and the locked budget is for plaintext): `populated` when large (its pages fault in
    without the GIL, and it is unmapped when dropped), a bytearray when small (the allocator
    reuses memory already touched)."""
    return populated(size, lock=False) if size >= LARGE else memoryview(bytearray(size))


# ------------------------------------------------------------------------- process ----


def harden_process(for_good: bool = True) -> None:
    """No core dump of this process: RLIMIT_CORE 0 and not dumpable (PR_SET_DUMPABLE 0, which
    also keeps other processes of the same user without CAP_SYS_PTRACE out of /proc/PID/mem).
    `for_good` (the mount) sets the hard limit to 0 too, so that nothing can raise it again;
    without it (every `pqfs` command, also run in-process by tests) the caller keeps its hard
    limit. Both survive fork; an exec'd helper (fusermount3) starts dumpable, holding no
    secret."""
    hard = 0 if for_good else resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def stats() -> dict[str, object]:
    """For `pqfs stats`: whether this process could dump core, and the plaintext buffers
    locked in memory or not (over the RLIMIT_MEMLOCK budget, or refused by the kernel)."""
    with _pinned.lock:
        locked, unlocked, refused = _pinned.locked, _pinned.unlocked, _pinned.refused
    return {
        "dumpable": _libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) != 0,
        "core_limit": resource.getrlimit(resource.RLIMIT_CORE)[0],
        "buffers_locked_bytes": locked,
        "buffers_unlocked_bytes": unlocked,
        "mlock_refused": refused,
        "memlock_budget": _pinned.budget(),
    }


_ZEROS = memoryview(bytes(1 << 20))


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite with zeros in place (from a shared zero page: no allocation, no page faults)."""
    mv = memoryview(buf).cast("B")
    step = len(_ZEROS)
    for i in range(0, len(mv), step):
        part = mv[i : i + step]
        part[:] = _ZEROS[: len(part)]
