"""Where the ciphertext of a read's few missing chunks comes from without a worker thread: memory,
an O_DIRECT read sent from the loop, or a GET sent from the loop; `Sources.begin` is the one
place that chooses. It never decrypts, and never touches plaintext, keys or the chunk cache.

The sources, cheapest first (each for at most `inline_chunks` chunks, two costing less than a
thread hop to decrypt):
  * memory: bytes already in the page cache or an opening GET (`ObjectSource.read_cached`, which
    fails rather than wait), decrypted on the loop at once;
  * direct: a local disk's bytes by one O_DIRECT read submitted from the loop (`aio.py`);
  * fetch: an S3 object's bytes by one GET from the loop (`s3async`);
  * otherwise a worker's job reads and decrypts them (reader.py), as it does every larger read.

Invariants (trio thread only):
  * memory is asked only before a read waits (its own check, `memory=True`); a source offers at
    most one loop read (a local file: direct; S3: fetch);
  * a begun `LoopRead` is released exactly once, by the reader, also after an error: a direct
    read's buffer goes back only once the kernel has finished with it (aio.py);
  * a chunk span that does not fit the object (truncated) is never read here: the worker path,
    which reads it the ordinary way, reports it;
  * a GET's wait is counted by `unseen`: its socket is not among the idle poll's descriptors.
"""

from __future__ import annotations

import errno
import logging
from typing import Literal, Protocol, overload

from pqfs.errors import PayloadError, VaultError
from pqfs.format.stream import CT_CHUNK, ciphertext_span
from pqfs.mount.aio import DirectIO, Read
from pqfs.mount.idlepoll import IdlePoll, Unseen
from pqfs.mount.metrics import Counters
from pqfs.mount.openfile import OpenFile
from pqfs.mount.options import MountOptions
from pqfs.runtime.memory import scratch

log = logging.getLogger("pqfs.mount")


class LoopRead(Protocol):
    """The ciphertext of chunks [first, first+count), being read from the loop."""

    first: int
    count: int

    async def ciphertext(self) -> memoryview | None:
        """The bytes, valid until release(); None where the source could not after all (the
        caller then sends a worker job)."""

    async def release(self) -> None: ...


class DirectRead:
    """An O_DIRECT read begun (`Sources.begin`)."""

    __slots__ = ("_sources", "count", "first", "req")

    def __init__(self, sources: Sources, first: int, count: int, req: Read) -> None:
        self._sources = sources
        self.first = first
        self.count = count
        self.req = req

    async def ciphertext(self) -> memoryview | None:
        """None if the kernel refused the read at completion (it would have blocked)."""
        first, req = self.first, self.req
        try:
            ct = await req.result()
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise VaultError(str(e)) from None
            dio = self._sources.dio
            if dio is not None:  # RWF_NOWAIT said so at completion, not at submit
                dio.refused += 1
            return None
        self._sources.counters.direct_reads += 1  # counted whether or not it authenticates
        if len(ct) != req.length:
            raise PayloadError(f"chunk {first} could not be read in full (truncated object)", first)
        return ct

    async def release(self) -> None:
        await self.req.release()  # its buffer holds the ciphertext until decrypted


class LoopFetch:
    """A GET of a few chunks sent from the loop by the source itself (S3: `s3async`), when
    awaited; one attempt."""

    __slots__ = ("_ct", "_f", "_sources", "count", "first")

    def __init__(self, sources: Sources, f: OpenFile, first: int, count: int, n: int) -> None:
        self._sources = sources
        self._f = f
        self.first = first
        self.count = count
        self._ct = scratch(n)  # ciphertext: not secret

    async def ciphertext(self) -> memoryview | None:
        f = self._f
        with self._sources.unseen.wait():  # its socket is not among the idle poll's descriptors
            got = await f.src.fetch(f.payload_start + self.first * CT_CHUNK, self._ct)
        return self._ct if got else None

    async def release(self) -> None:
        pass  # ordinary memory


class Sources:
    def __init__(
        self, options: MountOptions, *, idle: IdlePoll, unseen: Unseen, counters: Counters
    ) -> None:
        self.options = options
        self.idle = idle
        self.unseen = unseen
        self.counters = counters
        self.dio: DirectIO | None = None  # open_direct(): after the daemon has forked
        self._inline_ct = bytearray(options.inline_chunks * CT_CHUNK)  # ciphertext: not secret

    def open_direct(self) -> None:
        """Set up direct reads (native AIO), where the options and the system allow them."""
        if self.options.direct_reads > 0:
            try:
                self.dio = DirectIO(self.options.direct_reads, self.options.direct_slot_bytes)
            except OSError as e:
                log.info("reads that miss the page cache go through worker threads: %s", e)

    def close(self) -> None:
        """Once no read is in flight (the mount's nursery has ended)."""
        if self.dio is not None:
            self.dio.close()
            self.dio = None

    def inflight_fds(self) -> list[int]:
        """The eventfds of the direct reads in flight, for the idle poll."""
        return [] if self.dio is None else self.dio.inflight_fds()

    @overload
    def begin(
        self, f: OpenFile, first: int, count: int, *, memory: Literal[False]
    ) -> LoopRead | None: ...

    @overload
    def begin(
        self, f: OpenFile, first: int, count: int, *, memory: bool
    ) -> memoryview | LoopRead | None: ...

    def begin(
        self, f: OpenFile, first: int, count: int, *, memory: bool
    ) -> memoryview | LoopRead | None:
        """The ciphertext of chunks [first, first+count) without a worker thread, from the
        cheapest source that has it (see the module docstring): the bytes themselves from
        memory (only if `memory`), or a direct read already started, or a GET to send. None
        when there is none: the caller sends a worker job."""
        if count > self.options.inline_chunks:
            return None
        n = span(f, first, count)
        if n is None:
            return None
        if memory:
            ct = memoryview(self._inline_ct)[:n]
            if f.src.read_cached(f.payload_start + first * CT_CHUNK, ct):
                return ct
        req = self._submit(f, first, n)
        if req is not None:
            return DirectRead(self, first, count, req)
        if f.src.fetches:
            return LoopFetch(self, f, first, count, n)
        return None

    def direct(self, f: OpenFile, first: int, count: int) -> Read | None:
        """Start one O_DIRECT read of the ciphertext of chunks [first, first+count) (as
        `begin` does when that is the source). For tests."""
        n = span(f, first, count) if count <= self.options.inline_chunks else None
        return None if n is None else self._submit(f, first, n)

    def _submit(self, f: OpenFile, first: int, n: int) -> Read | None:
        """One O_DIRECT read of `n` bytes of ciphertext on a local disk, submitted from here (as
        inline reads are decrypted here: less work than a thread hop). None, with nothing
        started, where that is not possible or the kernel would block to start it."""
        dio = self.dio
        if dio is None:
            return None
        fd = f.src.direct_fd()
        if fd is None:
            return None
        req = dio.submit(fd, f.payload_start + first * CT_CHUNK, n)
        if req is not None:
            self.idle.arm()  # the disk answers in ~0.1-0.2 ms
        return req


def span(f: OpenFile, first: int, count: int) -> int | None:
    """Ciphertext bytes of chunks [first, first+count); None for a truncated object (the
    worker path, which reads it the ordinary way, reports that)."""
    try:
        return ciphertext_span(f.payload_start, f.src.size, f.chunks, first, count)
    except PayloadError:
        return None
