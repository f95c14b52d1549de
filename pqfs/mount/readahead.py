"""Readahead: detects a file read sequentially and schedules prefetch jobs ahead of its reader
(`Readahead.note_access`), within budgets shared by every stream. It never reads or decrypts
itself (the reader's background jobs do) and never touches the reply buffers or any key.

Invariants (trio thread only):
  * prefetch jobs are background work of the worker pool: they never queue in front of a read
    that a player is waiting for (demand reads are urgent jobs, reader.py);
  * the chunks being prefetched at once stay within `prefetch_inflight` (a quarter of the
    cache), and the windows of all streams together within half the cache, so that one stream's
    prefetched chunks are not evicted by another's before they are read;
  * a chunk that is cached, or claimed by a job (`inflight`), is not scheduled again; the job
    checks once more when it starts, since a reader may have claimed it in between;
  * the window follows the reader: after a jump it is the size of the read, and it doubles
    only once the reader has reached the end of what was prefetched (it used it), so a seek
    never throws away more than the reader had just consumed; prefetch a handle scheduled
    before a jump is dropped (`OpenFile.jumps`) unless a worker is already decrypting it.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from pqfs.format.stream import CHUNK
from pqfs.mount.chunkcache import ChunkCache
from pqfs.mount.openfile import OpenFile, Run, runs
from pqfs.mount.options import MountOptions


class Prefetcher(Protocol):
    """What readahead needs of the reader (reader.ChunkReader)."""

    inflight: dict[tuple[str, int], trio.Event]  # chunks being decrypted, and their events
    prefetching: int  # chunks in prefetch jobs not yet finished

    async def prefetch(self, f: OpenFile, aead: Any, run: Run, jumps: int) -> None:
        """Decrypt `run` on a worker, in the background, into the cache, unless `f` jumped
        since (`f.jumps` is no longer `jumps`)."""


class Readahead:
    def __init__(self, reader: Prefetcher, options: MountOptions, cache: ChunkCache) -> None:
        self._reader = reader
        self._inflight = reader.inflight
        self.options = options
        self.cache = cache
        self.streams: set[int] = set()  # handles being read sequentially (sharing readahead)
        self.nursery: trio.Nursery | None = None  # where prefetch jobs run: VaultFS.start

    def note_access(self, f: OpenFile, aead: Any, off: int, end: int, last: int) -> None:
        """After a read of [off, end) of `f` (`last`: its last chunk): sequential-access
        detection, and readahead scheduled for it."""
        opts = self.options
        slack = opts.max_read * 2  # the kernel's own readahead arrives a little out of order
        if (f.last_end - slack <= off <= f.last_end + slack and off > 0) or off == f.last_end:
            f.streak += 1
            f.last_end = max(f.last_end, end)
        else:
            f.streak = 0
            f.last_end = end
            f.window = max(1, -(-(end - off) // CHUNK))  # about the read: grown as it is used
            f.ahead = f.grow_at = last
            f.jumps += 1
            self.streams.discard(f.fh)
            return
        if f.streak < 2 or self.nursery is None:
            return
        self.streams.add(f.fh)
        # Readahead of all streams together stays within half the cache, so that one stream's
        # prefetched chunks are not evicted by another's before they are read.
        fair = self.cache.capacity // (2 * len(self.streams))
        limit = max(opts.prefetch_start, min(opts.prefetch_max, fair))
        if last >= f.grow_at:
            f.window = max(1, min(limit, f.window * 2))
        target = min(f.chunks - 1, last + f.window)
        start = max(f.ahead, last) + 1
        oid = f.entry.object
        todo = [
            i
            for i in range(start, target + 1)
            if (oid, i) not in self._inflight and (oid, i) not in self.cache
        ]
        budget = opts.prefetch_inflight - self._reader.prefetching
        todo = todo[: max(0, budget)]
        if not todo:
            return
        behind = f.ahead - last >= opts.job_chunks
        if len(todo) < opts.job_chunks and todo[-1] < f.chunks - 1 and behind:
            # Less than a job is due and the reader is still a job behind what is prefetched:
            # wait and send whole jobs (on S3 one job is one GET, and small GETs cost the
            # server and this daemon twice the CPU per byte).
            return
        f.ahead = f.grow_at = todo[-1]
        for run in runs(todo, opts.job_chunks):
            self.nursery.start_soon(self._reader.prefetch, f, aead, run, f.jumps)
