"""Asynchronous O_DIRECT reads of local files (Linux native AIO), awaited from trio.

Why: a random read through the mount misses the page cache and needs its two chunks of
ciphertext (128 KiB) once. Sent from a worker thread it waits for the thread hop before the disk
starts, and a buffered read makes the kernel allocate, insert and copy out 33 page-cache pages.
Here the trio thread submits the read itself (io_submit returns at once: RWF_NOWAIT makes it
fail rather than block, and then the caller falls back to a worker), the disk writes straight
into an aligned buffer, and the kernel signals an eventfd that wakes the waiting task directly.
Measured on this project's VM, cold 128 KiB reads at random offsets, medians of 5 x 300: a
buffered pread took 0.176 ms, O_DIRECT 0.148 ms; submit + wait + decrypt on trio about 0.20 ms
against 0.29 ms for the worker path (hop, buffered read, decrypt, hop back).

Invariants (trio thread only; nothing here is shared with worker threads):
  * at most `depth` reads are in flight, each of at most `slot_bytes` (MountOptions: bounds
    are given, none is kept here); `submit` returns None rather than queue;
  * a slot (iocb, eventfd, buffer) goes back to the free list only after the kernel has
    completed its read and the completion was reaped: release() waits for that shielded from
    cancellation, so the kernel never writes into a buffer that was reused or unmapped;
  * close() runs only when no read is in flight (the mount closes after its nursery ends);
    io_destroy would wait for any that were.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform

import trio

ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: the largest logical block size
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 8)
_IOCB_CMD_PREAD = 0
_IOCB_FLAG_RESFD = 1

# (io_setup, io_destroy, io_getevents, io_submit)
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2), "riscv64": (0, 1, 4, 2)}


class _Iocb(ctypes.Structure):  # struct iocb, <linux/aio_abi.h>, little-endian layout
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Slot:
    __slots__ = ("buf", "efd", "index", "iocb", "iocbp")

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.iocb = _Iocb()
        self.iocb.data = index
        self.iocb.opcode = _IOCB_CMD_PREAD
        self.iocb.buf = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.iocb.flags = _IOCB_FLAG_RESFD
        self.iocb.resfd = self.efd
        self.iocb.rw_flags = _RWF_NOWAIT
        self.iocbp = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self.iocb))

    def close(self) -> None:
        os.close(self.efd)
        self.iocb.buf = 0
        # A view handed out may still be alive (say, in a traceback): then the mapping goes
        # with its last view. It only ever held ciphertext.
        with contextlib.suppress(BufferError):
            self.buf.close()


class Read:
    """One read in flight; `await result()` once, then `release()` (also after an error)."""

    def __init__(self, owner: DirectIO, slot: _Slot, lo: int, offset: int, length: int) -> None:
        self._owner, self._slot = owner, slot
        self._start = offset - lo
        self.length = length
        self._done = False

    async def result(self) -> memoryview:
        """The bytes read (fewer at the end of the file), valid until release(). Cancellable:
        release() then still waits for the kernel to finish with the buffer."""
        res = await self._owner._wait(self._slot)
        self._done = True
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        end = max(self._start, min(res, self._start + self.length))
        return memoryview(self._slot.buf)[self._start : end]

    async def release(self) -> None:
        if not self._done:  # never hand the buffer back while the kernel may still write it
            with trio.CancelScope(shield=True):
                await self._owner._wait(self._slot)
            self._done = True
        self._owner._free.append(self._slot)


class DirectIO:
    def __init__(self, depth: int, slot_bytes: int) -> None:
        """`depth` reads in flight at most, each of up to `slot_bytes` (aligned on both sides).
        Raises OSError where native AIO is not available (another architecture, ENOSYS, the
        system-wide fs.aio-max-nr reached)."""
        calls = _SYSCALLS.get(platform.machine())
        if calls is None:
            raise OSError(errno.ENOSYS, "native AIO: unknown system call numbers here")
        self._setup, self._destroy, self._getevents, self._submit = calls
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._ctx = ctypes.c_ulong(0)
        if self._libc.syscall(self._setup, depth, ctypes.byref(self._ctx)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_setup: {os.strerror(e)}")
        self.depth = depth
        self.slot_bytes = slot_bytes
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._results: dict[int, int] = {}  # slot index -> res, reaped for a task not yet awake
        self._events = (_Event * depth)()
        self._no_wait = (ctypes.c_int64 * 2)(0, 0)
        self.submitted = 0
        self.refused = 0  # io_submit said it would block (EAGAIN): read on a worker instead

    def submit(self, fd: int, offset: int, length: int) -> Read | None:
        """Start reading [offset, offset+length) of an O_DIRECT descriptor; None if every slot
        is busy, the span is too long, or the kernel would have to block to start it."""
        lo = offset // ALIGN * ALIGN
        hi = -(-(offset + length) // ALIGN) * ALIGN
        if hi - lo > self.slot_bytes:
            return None
        if self._free:
            slot = self._free.pop()
        elif len(self._slots) < self.depth:
            slot = _Slot(len(self._slots), self.slot_bytes)
            self._slots.append(slot)
        else:
            return None
        slot.iocb.fildes = fd
        slot.iocb.offset = lo
        slot.iocb.nbytes = hi - lo
        if self._libc.syscall(self._submit, self._ctx, 1, slot.iocbp) != 1:
            self._free.append(slot)  # nothing was queued: the slot is free again
            self.refused += 1
            return None
        self.submitted += 1
        return Read(self, slot, lo, offset, length)

    def inflight_fds(self) -> list[int]:
        """The eventfds of the reads in flight (readable once their read completes)."""
        if len(self._free) == len(self._slots):
            return []
        free = set(map(id, self._free))
        return [s.efd for s in self._slots if id(s) not in free]

    async def _wait(self, slot: _Slot) -> int:
        # Cancelled here, the completion stays with the kernel, or in _results once reaped for
        # another slot: release() waits for it, shielded (see the invariants).
        while slot.index not in self._results:
            await trio.lowlevel.wait_readable(slot.efd)
            with contextlib.suppress(BlockingIOError):  # woken with nothing to read
                os.eventfd_read(slot.efd)
            self._reap()
        return self._results.pop(slot.index)

    def _reap(self) -> None:
        n = self._libc.syscall(
            self._getevents, self._ctx, 0, self.depth, self._events, self._no_wait
        )
        for k in range(max(0, n)):
            ev = self._events[k]
            self._results[int(ev.data)] = int(ev.res)

    def close(self) -> None:
        if self._ctx.value:
            self._libc.syscall(self._destroy, self._ctx)  # waits for reads still in flight
            self._ctx.value = 0
        for slot in self._slots:
            slot.close()
        self._slots.clear()
        self._free.clear()
