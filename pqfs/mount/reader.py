"""Plaintext reads of open files: `ChunkReader` answers from the chunk cache, or decrypts what is
missing (its one decrypt path, `decrypt`) with ciphertext from a source (sources.py) or a worker.
It never touches the tree, and holds no key but what the opener unwrapped for its open files.

Invariants (kept here; on the trio thread, except what a docstring marks "Worker thread"):
  * Backend I/O that may wait runs only in worker threads (`workers.WorkerPool`; opens through
    `trio.to_thread`), in jobs of `job_chunks` chunks (2 MiB locally, 4 MiB on S3), so one thread hop (~70 us) is
    small against the work it carries. The loop copies cached plaintext, and decrypts itself
    only what costs less than a hop: at most `inline_chunks` (2) chunks whose ciphertext comes
    without a thread (sources.py).
  * `inflight` (trio thread only) maps a chunk to the Event of the job decrypting it, so two
    readers, or a reader and the prefetcher, never decrypt the same chunk twice at once.
  * Demand reads are urgent jobs of the worker pool and readahead is background work: readahead
    never queues in front of a read that a player is waiting for.
  * `generation` counts locks. Work that began before a lock checks it after every await and
    wipes what it produced instead of returning it; the chunk cache does the same for inserts.
  * An open file is closed only when no job still reads from it (`jobs` == 0), so a prefetch in
    flight never reads a closed, possibly reused, descriptor.
  * `decrypt` runs on workers as well as on the loop; besides the chunk cache (under its lock)
    it writes only its thread's ciphertext buffer and `OpenFile.hinted` (see there).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import trio

from pqfs.errors import Locked, PayloadError, PqfsError, Unavailable, VaultError
from pqfs.format.agefile import decrypt_chunks
from pqfs.format.stream import CHUNK, CT_CHUNK, decrypt_read_chunks
from pqfs.mount.chunkcache import ChunkCache
from pqfs.mount.idlepoll import IdlePoll, Unseen
from pqfs.mount.metrics import Counters, Latency
from pqfs.mount.openahead import OpenAhead
from pqfs.mount.openfile import Dest, Opener, OpenFile, Run, run_bounded, runs
from pqfs.mount.options import MountOptions
from pqfs.mount.readahead import Readahead
from pqfs.mount.replies import Replies
from pqfs.mount.sources import LoopRead, Sources
from pqfs.mount.tree import Node
from pqfs.mount.workers import WorkerPool
from pqfs.runtime.memory import populated, wipe
from pqfs.vault.catalog import shown
from pqfs.vault.keycache import KeyCache
from pqfs.vault.vault import Vault

log = logging.getLogger("pqfs.mount")


class ChunkReader:
    def __init__(
        self,
        vault: Vault,
        options: MountOptions,
        *,
        cache: ChunkCache,
        keys: KeyCache,
        pool: WorkerPool,
        replies: Replies,
        idle: IdlePoll,
        unseen: Unseen,
    ) -> None:
        self.vault = vault
        self.options = options
        self.cache = cache
        self.pool = pool
        self.idle = idle
        self.unseen = unseen
        self.counters = Counters()
        self.latency = Latency()
        self.generation = 0
        self.files: dict[int, OpenFile] = {}
        self._next_fh = 1
        self.inflight: dict[tuple[str, int], trio.Event] = {}
        self.prefetching = 0  # chunks in prefetch jobs not yet finished
        self.opener = Opener(
            vault, options, keys=keys, cache=cache, counters=self.counters, decrypt=self.decrypt
        )
        self.sources = Sources(options, idle=idle, unseen=unseen, counters=self.counters)
        self.readahead = Readahead(self, options, cache)
        self._streaming = self.readahead.streams
        self._note_access = self.readahead.note_access
        self._reply = replies.shared
        self._replies = replies
        self._wipe_sent = replies.wipe_sent
        self._tls = threading.local()
        self._reuse_ct = vault.storage.profile().reuse_read_buffers
        self._open_threads = trio.CapacityLimiter(options.open_threads)
        self._open_bound = vault.storage.timeout * options.open_timeouts
        self.ahead = OpenAhead(
            self.opener,
            options,
            counters=self.counters,
            unseen=unseen,
            generation=lambda: self.generation,
            timeout=self._open_bound,
        )

    # ------------------------------------------------------------------ open files ----

    async def open(self, node: Node) -> int:
        """Open the object of a file's node (checked, its key unwrapped: Opener); its handle.
        A file opened ahead (openahead.py) is taken as it is: no thread, no wait."""
        gen = self.generation
        opener = self.opener
        waited = await self.ahead.wait(node, self._open_bound)
        f = self.ahead.take(node) if gen == self.generation else None
        if f is None:
            # what is left of the bound after a wait for an open ahead; the whole bound if
            # there was none (and so the whole bound in the error: "within 6 s")
            left = max(0.001, self._open_bound - waited) if waited else self._open_bound
            try:
                with self.unseen.wait():  # as VaultFS.offload() does
                    f = await run_bounded(
                        functools.partial(opener.open_object, node),
                        left,  # with what a wait for an open ahead took: one bound in all
                        opener.close_unopened,
                        self._open_threads,
                    )
            except Exception as err:
                raise opener.failed(node.entry, err, relocked=gen != self.generation) from None
            if gen != self.generation:
                opener.close_unopened(f)
                raise Locked("the vault was locked while the file was being opened")
        f.fh = self._next_fh
        f.limiter = trio.Semaphore(self.options.jobs_per_file)
        self._next_fh += 1
        self.files[f.fh] = f
        self.counters.opens += 1
        self.counters.bytes_decrypted += f.decrypted
        return f.fh

    def release(self, fh: int) -> None:
        f = self.files.pop(fh, None)
        self._streaming.discard(fh)
        if f is not None:
            f.released = True
            self._maybe_close(f)

    def _maybe_close(self, f: OpenFile) -> None:
        if f.released and f.jobs == 0:
            f.src.close()
            if f.own_key is not None:
                f.own_key.wipe()
                f.own_key = None

    def file(self, fh: int) -> OpenFile:
        f = self.files.get(fh)
        if f is None:
            raise VaultError(f"bad file handle {fh}")
        return f

    def lock(self) -> None:
        """A lock begins (VaultFS.lock): work begun before it sees the generation change, and
        the keys held by open files (key_ttl 0) are wiped."""
        self.generation += 1
        self.ahead.lock()
        for f in self.files.values():
            if f.own_key is not None:
                f.own_key.wipe()
                f.own_key = None

    def close(self) -> None:
        """Unmount: close every open file (no job is left: the mount's nursery has ended)."""
        self.ahead.lock()
        for f in list(self.files.values()):
            f.released = True
            self._maybe_close(f)
        self.files.clear()

    async def _aead(self, f: OpenFile) -> Any:
        if not self.vault.unlocked:
            raise Locked("the vault is locked (pqfs unlock MOUNTPOINT)")
        aead = self.opener.cached_aead(f)
        if aead is not None:
            return aead
        gen = self.generation
        aead = await self.pool.run(functools.partial(self.opener.unwrap, f))
        if gen != self.generation:
            raise Locked("the vault was locked during the read")
        return aead

    # ------------------------------------------------------------------ reads ----

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        """Plaintext [off, off+size) of an open file, clipped at its end.

        The returned view is valid until the next call on this loop (the adapter hands it to the
        kernel at once); the buffer behind it is wiped by that next call or by lock()."""
        t0 = time.perf_counter()
        try:
            f = self.file(fh)
            aead = await self._aead(f)
            end = min(off + size, f.entry.size)
            n = end - off
            # A cold read starts its disk read in here, before the bookkeeping of this call.
            now = self._read_now(f, aead, off, end) if 0 < n <= len(self._reply) else None
        except BaseException:
            self._wipe_sent()
            raise
        if n <= 0:
            self._wipe_sent()
            return memoryview(b"")
        last = (end - 1) // CHUNK
        if isinstance(now, memoryview):
            self._wipe_sent()
            out = now
        else:
            self.counters.slow_reads += 1
            out = await self._read_waiting(f, aead, off, end, now)
        self._note_access(f, aead, off, end, last)
        c = self.counters
        c.reads += 1
        c.bytes_read += n
        self.latency.add(time.perf_counter() - t0)
        if fh not in self._streaming:
            # A seeking player's next request follows the reply within microseconds. A stream's
            # next one is the kernel's readahead: no one waits on it, and polling would take
            # CPU from the reader and the decrypting workers (measured: 4% less throughput).
            self.idle.arm()
        return out

    def _read_now(self, f: OpenFile, aead: Any, off: int, end: int) -> memoryview | LoopRead | None:
        """The read answered without waiting, into the shared reply buffer: every chunk cached,
        or the few missing ones decrypted here from ciphertext already in memory. Otherwise
        nothing was decrypted, and the result is either None or, when the few missing chunks
        can be read from the loop, that read, already begun (a local disk works while the
        caller sets up the wait)."""
        oid = f.entry.object
        chunks = range(off // CHUNK, (end - 1) // CHUNK + 1)
        # Check before copying: a read that must wait copies into a private buffer, and copying
        # its cached part twice measurably costs CPU on sequential streams.
        missing = [i for i in chunks if (oid, i) not in self.cache]
        ct: memoryview | None = None
        if missing:
            got = self._ciphertext_now(f, missing)
            if not isinstance(got, memoryview):
                return got
            ct = got
        out = memoryview(self._reply)[: end - off]
        cached = chunks if not missing else [i for i in chunks if i not in missing]
        if self._copy_cached(f, off, end, cached, out):
            return None  # evicted under us by a worker: take the slow path
        if ct is not None:
            self.counters.inline_reads += 1  # counted whether or not it authenticates
            try:
                n = self.decrypt(
                    f,
                    aead,
                    missing[0],
                    len(missing),
                    Dest(out, off, end),
                    generation=self.cache.generation,
                    read=ct,
                )
            except PayloadError as e:
                wipe(out)
                self._report(f, off, e)
                raise
            self.counters.bytes_decrypted += n
        return out

    def _ciphertext_now(self, f: OpenFile, missing: list[int]) -> memoryview | LoopRead | None:
        """The ciphertext of the chunks `missing` if it can be had without a thread (a few
        consecutive chunks, no job decrypting them already; Sources.begin): the bytes if they
        are in memory, else their read from the loop, begun."""
        count = len(missing)
        if count > self.options.inline_chunks or missing[-1] - missing[0] != count - 1:
            return None
        oid = f.entry.object
        if any((oid, i) in self.inflight for i in missing):
            return None
        return self.sources.begin(f, missing[0], count, memory=True)

    def _report(self, f: OpenFile, off: int, err: BaseException) -> None:
        """Count and log a failed read (never with key material or plaintext), and mark the
        error logged: the adapter does not log it again."""
        if isinstance(err, PayloadError):  # "chunk N failed authentication", or truncated
            self.counters.auth_failures += 1
            log.error("%s: %s; read at offset %d refused (EIO)", shown(f.entry.path), err, off)
        else:
            self.counters.read_errors += 1
            log.error("%s: read at offset %d failed (EIO): %s", shown(f.entry.path), off, err)
        if isinstance(err, PqfsError):
            err.logged = True

    def _copy_cached(
        self, f: OpenFile, off: int, end: int, chunks: Iterable[int], out: memoryview
    ) -> set[int]:
        """Copy the cached chunks among `chunks` into `out` (which holds [off, end)); returns the
        chunks that were not cached."""
        missing = set()
        oid = f.entry.object
        for i in chunks:
            lo, hi = max(off, i * CHUNK), min(end, (i + 1) * CHUNK)
            if not self.cache.copy_out((oid, i), lo - i * CHUNK, out[lo - off : hi - off]):
                missing.add(i)
        return missing

    async def _read_waiting(
        self, f: OpenFile, aead: Any, off: int, end: int, started: LoopRead | None
    ) -> memoryview:
        """The read that waits, into a private buffer. `started`: the loop read of its missing
        chunks, begun by _read_now (released here whatever happens); there is no checkpoint
        between that and its claim in _loop_job, so no other reader can start the same chunks
        in between."""
        try:
            self._wipe_sent()
            # A private buffer: other reads reuse the shared one while this read waits.
            buf = self._replies.take(end - off)
            out = memoryview(buf)[: end - off]
            gen = self.generation
            pending = self._copy_cached(
                f, off, end, range(off // CHUNK, (end - 1) // CHUNK + 1), out
            )
            if pending and f.unavailable is not None:
                since, cause = f.unavailable
                if time.monotonic() - since < self.options.unavailable_hold:
                    wipe(buf)
                    raise cause
                f.unavailable = None
            attempt = 0
            while pending:
                oid = f.entry.object
                # First try: share chunks another job is already decrypting. After that, decrypt
                # all that is still missing ourselves (the shared copy failed or was evicted).
                waits = [self.inflight[(oid, i)] for i in pending if (oid, i) in self.inflight]
                if attempt > 0:
                    waits = []
                mine = sorted(i for i in pending if attempt > 0 or (oid, i) not in self.inflight)
                errors: list[BaseException] = []
                todo = runs(mine, self.options.job_chunks)
                dest = Dest(out, off, end)
                if len(todo) == 1 and not waits:  # the common case: no nursery to set up
                    run = todo[0]
                    loop: LoopRead | None = None
                    if started is not None and (started.first, started.count) == (
                        run.first,
                        run.count,
                    ):
                        loop, started = started, None  # handed over: never again from here
                    elif attempt == 0:
                        loop = self.sources.begin(f, run.first, run.count, memory=False)
                    read = False
                    if loop is not None:
                        try:
                            read = await self._loop_job(f, aead, loop, dest, errors)
                        finally:
                            await loop.release()
                    if not read:
                        await self._job(f, aead, run, dest, errors)
                else:
                    async with trio.open_nursery() as nursery:
                        for run in todo:
                            nursery.start_soon(self._job, f, aead, run, dest, errors)
                        for ev in waits:
                            nursery.start_soon(ev.wait)
                if gen != self.generation:
                    wipe(buf)
                    raise Locked("the vault was locked during the read")
                if errors:
                    wipe(buf)
                    err = errors[0]
                    self._report(f, off, err)
                    if isinstance(err, Unavailable):
                        f.unavailable = (time.monotonic(), err)
                    raise err
                done = set(mine)
                pending = self._copy_cached(f, off, end, sorted(pending - done), out)
                attempt += 1
            # Only now: an earlier wipe_sent() must not wipe it mid-read.
            self._replies.sending(buf, end - off)
            return out[: end - off]
        finally:
            if started is not None:  # an error before its job took it
                await started.release()

    # ------------------------------------------------------------------ jobs ----

    @contextlib.contextmanager
    def _claim(self, f: OpenFile, first: int, count: int) -> Iterator[None]:
        """Mark chunks [first, first+count) as being decrypted (readers of them wait for this
        instead of decrypting them again) and the file as read from (it is not closed under
        the read); both undone, and waiters woken, whatever happens."""
        events = []
        for i in range(first, first + count):
            k = (f.entry.object, i)
            if k not in self.inflight:
                ev = self.inflight[k] = trio.Event()
                events.append((k, ev))
        f.jobs += 1
        try:
            yield
        finally:
            f.jobs -= 1
            for k, ev in events:
                if self.inflight.get(k) is ev:
                    del self.inflight[k]
                ev.set()
            self._maybe_close(f)

    async def prefetch(self, f: OpenFile, aead: Any, run: Run, jumps: int) -> None:
        """Readahead's job (readahead.py): `run` decrypted on a worker, in the background;
        dropped if `f` jumps before a worker takes it (the reader went elsewhere)."""
        await self._job(f, aead, run, None, [], prefetch=True, jumps=jumps)

    async def _job(
        self,
        f: OpenFile,
        aead: Any,
        run: Run,
        dest: Dest | None,
        errors: list[BaseException],
        *,
        prefetch: bool = False,
        jumps: int | None = None,
    ) -> None:
        """Decrypt chunks `run` on a worker thread into the cache (and `dest`); a prefetch
        (`jumps`: the handle's count when it was scheduled) only if `f` has not jumped since."""
        first, count = run.first, run.count
        if prefetch:
            # Between start_soon and now a reader may have begun reading the first of these
            # chunks itself (it found them neither cached nor claimed): don't fetch them twice.
            oid = f.entry.object
            while count and ((oid, first) in self.inflight or (oid, first) in self.cache):
                first, count = first + 1, count - 1
            if not count:
                return
            self.prefetching += count
        try:
            with self._claim(f, first, count):
                job = functools.partial(
                    self.decrypt,
                    f,
                    aead,
                    first,
                    count,
                    dest,
                    generation=self.cache.generation,
                    prefetch=prefetch,
                    jumps=jumps,
                )
                assert f.limiter is not None
                await trio.lowlevel.checkpoint_if_cancelled()  # pool.run's wait is shielded
                try:  # no scheduler round trip when a slot is free (the usual case)
                    f.limiter.acquire_nowait()
                except trio.WouldBlock:
                    await f.limiter.acquire()
                try:
                    n = (
                        0
                        if jumps not in (None, f.jumps)
                        else await self.pool.run(job, urgent=not prefetch)
                    )
                finally:
                    f.limiter.release()
            self.counters.bytes_decrypted += n
            if prefetch and n:
                self.counters.prefetch_chunks += count
            elif prefetch:
                self.counters.prefetch_dropped += count
        except (PqfsError, OSError) as e:
            if prefetch:  # the read that needs the chunk will decrypt it again and report it
                log.debug("prefetch of %s chunks %d+%d failed: %s", f.entry.path, first, count, e)
            else:
                errors.append(e if isinstance(e, PqfsError) else VaultError(str(e)))
        finally:
            if prefetch:
                self.prefetching -= count

    async def _loop_job(
        self,
        f: OpenFile,
        aead: Any,
        loop: LoopRead,
        dest: Dest,
        errors: list[BaseException],
    ) -> bool:
        """The chunks of `loop`, whose ciphertext it gets without a thread, decrypted on this
        loop into the cache and `dest` (two chunks cost less than a thread hop). An error lands
        in `errors`. False, with nothing decrypted, when the source could not after all: the
        caller then sends a worker job."""
        first, count = loop.first, loop.count
        with self._claim(f, first, count):
            generation = self.cache.generation
            bufs = self.cache.lend(count)  # while the read is in flight: new buffers fault pages
            try:
                ct = await loop.ciphertext()
                if ct is None:
                    return False
                self.counters.bytes_decrypted += self.decrypt(
                    f, aead, first, count, dest, generation=generation, read=ct, lent=bufs
                )
            except PqfsError as e:
                errors.append(e)
            finally:
                if bufs:  # not taken over by decrypt (which gives back or inserts them)
                    self.cache.give_back(bufs)
        return True

    def decrypt(
        self,
        f: OpenFile,
        aead: Any,
        first: int,
        count: int,
        dest: Dest | None,
        *,
        generation: int,
        prefetch: bool = False,
        read: memoryview | None = None,
        lent: list[memoryview] | None = None,
        jumps: int | None = None,
    ) -> int:
        """Worker thread: one backend read, `count` chunk decryptions into lent cache buffers.
        With `read` (the chunks' ciphertext, already read) it runs on the loop, or on the open's
        thread. `lent`: buffers already lent by the cache; this call takes them over (the list
        is emptied). `generation`: the cache's, read before the buffers were lent. `jumps`: a
        prefetch's handle count; if the handle jumped while the job queued, nothing is done."""
        if jumps is not None and jumps != f.jumps:
            return 0  # (read from another thread: a stale value only costs one job's work)
        ct: memoryview | None = None
        if self._reuse_ct and read is None:
            ct = getattr(self._tls, "ct", None)
            if ct is None or len(ct) < count * CT_CHUNK:
                ct = self._tls.ct = populated(
                    max(count, self.options.job_chunks) * CT_CHUNK, lock=False
                )  # ciphertext: not worth the mlock budget
        if prefetch:  # keep the backend a window ahead of the decrypt jobs
            lo = max(f.hinted, f.payload_start + (first + count) * CT_CHUNK)
            hi = f.payload_start + (first + count + self.options.hint_chunks) * CT_CHUNK
            if lo < hi:
                f.hinted = hi
                f.src.will_need(lo, hi - lo)
        if lent:
            bufs = lent[:]
            lent.clear()
        else:
            bufs = self.cache.lend(count)
        outs = [memoryview(b) for b in bufs]
        try:
            if read is not None:
                lens = decrypt_read_chunks(aead, read, f.chunks, first, outs)
            else:
                lens = decrypt_chunks(
                    aead,
                    f.src,
                    f.payload_start,
                    f.chunks,
                    first,
                    outs,
                    ct_buf=ct,
                )
        except BaseException:
            self.cache.give_back(bufs)
            raise
        if dest is not None:
            out, off, end = dest.out, dest.off, dest.end
            for k, buf in enumerate(bufs):
                base = (first + k) * CHUNK
                lo, hi = max(off, base), min(end, base + lens[k])
                if lo < hi:
                    out[lo - off : hi - off] = memoryview(buf)[lo - base : hi - base]
        keys = [(f.entry.object, first + k) for k in range(count)]
        self.cache.insert(keys, bufs, lens, generation, prefetched=prefetch)
        return sum(lens)
