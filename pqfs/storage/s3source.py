"""Random access to one object of an S3 vault by Range GETs (S3Source), through the requests of
s3requests.py; with a disk cache, reads are widened to whole cache blocks and kept there."""

from __future__ import annotations

from concurrent.futures import Future

from pqfs.format.stream import CT_CHUNK
from pqfs.runtime.memory import scratch
from pqfs.storage.s3async import Fallback
from pqfs.storage.s3requests import S3Requests

# What the second GET of an opening fetches from the final chunk's start (S3Source `tail`): a
# final chunk is at most CT_CHUNK bytes, and fewer come back at the object's end.
TAIL_FETCH = CT_CHUNK


class S3Source:
    """Random access to one object by Range GETs (an ObjectSource). Thread-safe: the mount reads
    one object from several workers at once.

    Opening fetches the object's first `open_fetch` bytes (header, nonce, the first chunks) in
    one GET, which also tells the size. They stay in memory only until the reading starts in
    earnest (a read past them, or `head_reads` reads from them), so memory does not grow with
    open files.

    With `tail` (the mount: where the final chunk starts, from the catalog), the bytes from
    there to the end are fetched by a second GET sent alongside the first, when the first does
    not reach them: the mount authenticates the final chunk at open, and two GETs in parallel
    cost one round trip. They are kept for one read.
    """

    def __init__(self, storage: S3Requests, key: str, tail: int | None = None) -> None:
        self.storage = storage
        self.key = key
        self._head_reads = 0
        self._max_head_reads = storage.bounds.head_reads
        open_fetch = storage.bounds.open_fetch
        # (start, length, its GET) of the tail, until it is read
        self._tail: tuple[int, int, Future[tuple[memoryview, int]]] | None = None
        dc = storage.disk_cache
        size = dc.size_of(key) if dc is not None else None
        if size is not None and dc is not None:
            head = bytearray(min(open_fetch, size))
            if dc.read(key, 0, memoryview(head)):
                self.size, self._head = size, head
                return  # no GET to overlap: a later read of the tail finds it as any other
        if tail is not None and tail + TAIL_FETCH > open_fetch:
            # Whole cache blocks with a disk cache (stored, so that the next open finds them).
            lo = tail // dc.block * dc.block if dc is not None else tail
            length = tail + TAIL_FETCH - lo
            self._tail = (lo, length, storage.get_soon(key, lo, length))
        head = bytearray(open_fetch)
        n, self.size = storage.get_range(key, 0, memoryview(head))
        del head[n:]
        self._head = head
        if dc is not None:
            dc.store(key, 0, memoryview(head), self.size)

    def preadinto(self, offset: int, buf: memoryview) -> int:
        n = max(0, min(len(buf), self.size - offset))
        if n == 0:
            return 0
        if self._tail is not None and self._from_tail(offset, buf[:n]):
            return n  # before the head: a read of the tail must not release the head
        end = offset + n
        head = self._head  # one read of the attribute: another thread may release it
        skip = 0
        if offset < len(head):
            skip = min(end, len(head)) - offset
            buf[:skip] = head[offset : offset + skip]
            self._head_reads += 1
        if end > len(head) or self._head_reads >= self._max_head_reads:
            self._head = bytearray()  # reading goes on past the opening: memory back
        if skip < n:
            self._fetch(offset + skip, buf[skip:n])
        return n

    def _from_tail(self, offset: int, buf: memoryview) -> bool:
        """Fill `buf` from the tail fetched at open (waiting for its GET), if it holds all of
        it; then let it go. False otherwise: an error of that GET is met again, with its
        own retries, by the ordinary read that follows."""
        tail = self._tail  # one read of the attribute: another thread may release it
        if tail is None:
            return False
        lo, length, future = tail
        if not lo <= offset <= offset + len(buf) <= lo + length:
            return False  # the header's reads, before it: they do not wait for its GET
        try:
            data, size = future.result()
        except Exception:
            self._tail = None
            return False
        if not lo <= offset <= offset + len(buf) <= lo + len(data):
            return False
        self._tail = None
        dc = self.storage.disk_cache
        if dc is not None and size == self.size:
            dc.store(self.key, lo, data, size)
        buf[:] = data[offset - lo : offset - lo + len(buf)]
        return True

    def _fetch(self, offset: int, buf: memoryview) -> None:
        dc = self.storage.disk_cache
        if dc is None:
            self.storage.get_range(self.key, offset, buf)
            return
        if dc.read(self.key, offset, buf):
            return
        end = offset + len(buf)
        block = dc.block
        lo = offset // block * block  # whole blocks, so that the next reader finds them
        hi = min(self.size, -(-end // block) * block)
        span = scratch(hi - lo)
        self.storage.get_range(self.key, lo, span)
        dc.store(self.key, lo, span, self.size)
        buf[:] = span[offset - lo : end - lo]

    def will_need(self, offset: int, length: int) -> None:
        pass  # the mount's readahead jobs already keep several range requests in flight

    @property
    def fetches(self) -> bool:
        # With a disk cache the read goes through a file (it may wait): a worker's job.
        return self.storage.disk_cache is None and self.storage._loop_gets is not None

    async def fetch(self, offset: int, buf: memoryview) -> bool:
        if not self.fetches or offset + len(buf) > self.size:
            return False
        try:
            got, _ = await self.storage.aget_range(self.key, offset, buf)
        except Fallback:
            self.storage._count("s3_loop_fallbacks")
            return False
        return got == len(buf)

    def direct_fd(self) -> int | None:
        return None

    def read_cached(self, offset: int, buf: memoryview) -> bool:
        # Only the opening fetch is in memory (the disk cache is a file: it may wait on I/O).
        head = self._head  # one read of the attribute: another thread may release it
        if offset + len(buf) > len(head):
            return False
        buf[:] = head[offset : offset + len(buf)]
        self._head_reads += 1
        if self._head_reads >= self._max_head_reads:
            self._head = bytearray()
        return True

    def close(self) -> None:
        self._head = bytearray()
        self._tail = None
