"""Written data before its commit: one `Dirty` per inode (shared by all its handles), its blocks
in memory under a global budget or in an encrypted, unlinked spill file (`SpillFile`), and the
plaintext stream a commit encrypts into the new object (`DirtyStream`).

A file changed through the mount is copy-on-write: the object it had (`base`, the catalog's) is
never modified, since age forbids changing a payload without a fresh nonce (FORMAT.md §2). Its
new content is the base's chunks, limited to `base_limit` bytes by truncations, overlaid with
the 64 KiB blocks written since (aligned with age's chunks), and zeros everywhere else (holes).

Invariants (kept here):
  * no plaintext at rest: blocks live in memory (`StagingBudget.memory`, wiped when dropped)
    or in a spill file that is unlinked from its creation (O_TMPFILE) and holds each block
    sealed with ChaCha20-Poly1305 under a random key kept only in this process's memory; its
    nonce is a counter that never repeats for that key, and the block's index is its
    associated data, so a block read back from another slot or an older write fails;
  * a block in memory is a bytearray of at most CHUNK bytes: bytes past its end, up to the
    file's size, are zeros, and so is every byte of the base at or past `base_limit`;
  * a Dirty is changed only on the trio thread, never while `committing` is set: a commit's
    thread then reads it (`DirtyStream`) while readers on the loop may too, and nothing moves;
  * budgets are reserved before a byte is stored and released when it is dropped: the memory
    of every Dirty together never exceeds `memory`, their spill files never `spill` bytes;
  * a file written from nothing, in order (`Dirty.sequential`), streams into its new object
    as it is written (`Streaming`, on a local store): its first `head` chunks and everything
    from `streamed` on stay staged, chunks [head, streamed) are only in the object, put once
    each (vault/objects.OpenObject). Changing one of those, or cutting into them, makes the
    stream unclean: from then on nothing more is streamed, and the commit writes a fresh object
    (those chunks read back from the stream's) instead of finishing this one.
"""

from __future__ import annotations

import os
import time
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pqfs.errors import NoSpace, PayloadError
from pqfs.format.agefile import AgeReader
from pqfs.format.stream import CHUNK, CT_CHUNK
from pqfs.runtime.memory import wipe
from pqfs.storage.base import ObjectSource
from pqfs.vault.objects import OpenObject
from pqfs.vault.schema import Entry

TAG = 16
SLOT = CHUNK + TAG  # one sealed block in a spill file


class StagingBudget:
    """What all uncommitted data may take: `memory` bytes of plaintext blocks, `spill` bytes
    of spill files. A writer that finds no room waits (backpressure) for commits to free some,
    `timeout` seconds at most, then gets ENOSPC."""

    def __init__(self, memory: int, spill: int, per_file_memory: int, timeout: float) -> None:
        self.memory = memory
        self.spill = spill
        self.per_file_memory = per_file_memory  # past this, a file's blocks go to its spill
        self.timeout = timeout
        self.memory_used = 0
        self.spill_used = 0
        self.waits = 0  # writers that waited for room
        self._room = trio.Event()

    def take_memory(self, n: int) -> bool:
        if self.memory_used + n > self.memory:
            return False
        self.memory_used += n
        return True

    def give_memory(self, n: int) -> None:
        self.memory_used -= n
        self._freed()

    def take_spill(self, n: int) -> bool:
        if self.spill_used + n > self.spill:
            return False
        self.spill_used += n
        return True

    def give_spill(self, n: int) -> None:
        self.spill_used -= n
        self._freed()

    def _freed(self) -> None:
        self._room.set()
        self._room = trio.Event()

    async def wait_for_room(self, deadline: float) -> None:
        """Until something is freed; NoSpace once `deadline` (trio time) passes."""
        self.waits += 1
        with trio.move_on_at(deadline):
            await self._room.wait()
            return
        raise NoSpace("staging is full and no commit freed room in time (--write-cache-size)")


class SpillFile:
    """Blocks of one Dirty on local disk, sealed (see the module's invariants). Block k sits in
    slot k, so a file's spill is never larger than its ciphertext would be."""

    def __init__(self, directory: str) -> None:
        self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        key = bytearray(os.urandom(32))
        try:
            self._aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(key)  # (no bytes copy)
        finally:
            wipe(key)
        self._counter = 0
        self.slots: dict[int, tuple[int, int]] = {}  # block -> (nonce counter, plaintext length)
        self._ct = memoryview(bytearray(SLOT))  # ciphertext only, for put()

    def put(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Seal block `index` into its slot (no copy of the plaintext is made). Trio thread."""
        assert self._aead is not None
        self._counter += 1  # never repeats under this key: a fresh nonce for every write
        ct = self._ct[: len(data) + TAG]
        self._aead.encrypt_into(self._nonce(self._counter), data, _aad(index), ct)
        n = os.pwrite(self.fd, ct, index * SLOT)
        if n != len(ct):
            raise OSError(28, "short write to the write cache")
        self.slots[index] = (self._counter, len(data))

    def get(self, index: int) -> bytearray:
        """Block `index`, authenticated (a bytearray the caller wipes). Any thread."""
        assert self._aead is not None
        counter, length = self.slots[index]
        ct = os.pread(self.fd, length + TAG, index * SLOT)
        out = bytearray(length)
        try:
            self._aead.decrypt_into(self._nonce(counter), ct, _aad(index), out)
        except InvalidTag:
            wipe(out)  # (it holds unauthenticated bytes)
            raise PayloadError(
                "a staged block failed authentication (write cache damaged)"
            ) from None
        return out

    def cut(self, blocks: int) -> None:
        """Forget every block from `blocks` on, and give their disk space back."""
        for k in [k for k in self.slots if k >= blocks]:
            del self.slots[k]
        os.ftruncate(self.fd, blocks * SLOT)

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return counter.to_bytes(12, "big")

    def forget(self) -> None:
        """Drop the key and the block map: nothing in the file can be read any more."""
        self._aead = None  # OpenSSL clears its context when it is freed
        self.slots.clear()

    def close(self) -> None:
        self.forget()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _aad(index: int) -> bytes:
    return index.to_bytes(8, "big")


class BaseReader:
    """The committed object a Dirty overlays, opened and checked (FORMAT.md §4.1) on first use,
    on a thread; thread-safe (AgeReader)."""

    def __init__(self, src: ObjectSource, reader: AgeReader) -> None:
        self.src = src
        self.reader = reader

    def chunks(self, first: int, count: int, limit: int) -> list[bytearray]:
        """Plaintext of chunks [first, first+count), each cut at `limit` bytes of the file
        (the base past a truncation reads as zeros). On a thread."""
        buf = bytearray(count * CHUNK)
        try:
            n = self.reader.read_chunks_into(first, count, memoryview(buf))
            out = []
            for k in range(count):
                lo = k * CHUNK
                hi = min(n, lo + CHUNK, max(lo, limit - first * CHUNK))
                out.append(bytearray(memoryview(buf)[lo:hi]) if hi > lo else bytearray())
            return out
        finally:
            wipe(buf)

    def close(self) -> None:
        self.src.close()


class Streaming:
    """A Dirty's new object while it is written in order (the module's invariants): the stream
    tier. Also what reads chunks [head, streamed) back (BaseReader's interface)."""

    def __init__(self, obj: OpenObject, head: int) -> None:
        self.obj = obj
        self.head = head  # chunks [0, head) stay staged until the commit (a header patch)
        self.streamed = head  # chunks [head, streamed) are in `obj` only
        self.limit = 1 << 62  # bytes of them still part of the file (a truncation cuts it)
        self.clean = True  # nothing streamed was changed or cut: the commit finishes `obj`
        self.bytes = 0  # streamed so far (stats)
        self.mirrored = 0  # bytes of ciphertext in the write cache (a store sent in parts)

    def covers(self, index: int) -> bool:
        return self.head <= index < self.streamed and index * CHUNK < self.limit

    def chunks(self, first: int, count: int, limit: int) -> list[bytearray]:
        """Plaintext of chunks [first, first+count) as streamed, cut at `limit`. Any thread."""
        out = []
        for k in range(first, first + count):
            buf = bytearray(CHUNK)
            try:
                self.obj.get_into(k, memoryview(buf))
            except BaseException:
                wipe(buf)
                raise
            keep = max(0, min(CHUNK, limit - k * CHUNK))
            wipe(memoryview(buf)[keep:])
            del buf[keep:]
            out.append(buf)
        return out

    def close(self) -> None:
        self.obj.close()


class Dirty:
    """The uncommitted content of one inode (see the module's invariants)."""

    def __init__(
        self, base: Entry | None, size: int, budget: StagingBudget, spill_dir: str
    ) -> None:
        self.base = base if base is not None and base.object else None
        self.base_limit = size if self.base is not None else 0
        self.size = size
        self.budget = budget
        self.spill_dir = spill_dir
        self.blocks: dict[int, bytearray] = {}
        self._reserved: dict[int, int] = {}  # per block in memory: its bytes in the budget
        self.memory = 0  # bytes of `blocks`, reserved in the budget
        self.spill: SpillFile | None = None
        self.base_reader: BaseReader | None = None
        self.writers = 0  # open handles that may write
        self.changed_at = time.monotonic()  # last write or truncate
        self.created = time.monotonic()
        self.committing: trio.Event | None = None  # set while a commit reads it
        self.failures = 0  # commits that failed in a row (their backoff)
        self.retry_at = 0.0
        self.sequential = self.base is None and size == 0  # may stream (module invariants)
        self.streaming: Streaming | None = None

    # ------------------------------------------------------------ blocks ----

    def stored(self, index: int) -> bytearray | None:
        """Block `index` as written, or None if it was not (base or hole)."""
        b = self.blocks.get(index)
        if b is not None:
            return b
        if self.spill is not None and index in self.spill.slots:
            return self.spill.get(index)
        return None

    def base_covers(self, index: int) -> bool:
        """Whether chunk `index` (not staged) comes from beneath: the base, or the stream."""
        if self.streaming is not None:
            return self.streaming.covers(index)
        return self.base is not None and index * CHUNK < min(self.base_limit, self.base.size)

    @property
    def under(self) -> tuple[BaseReader | Streaming | None, int]:
        """What reads the chunks beneath the staged ones, and the bytes of it still valid."""
        if self.streaming is not None:
            return self.streaming, self.streaming.limit
        return self.base_reader, self.base_limit

    def stream_out(self) -> None:
        """Put into the stream every staged chunk it can take: from `streamed` on, each that a
        byte of the file follows (the last one's nonce is the final one's: the commit puts it),
        dropped from staging once put (a hole goes as zeros). Trio thread, under the file's
        lock."""
        s = self.streaming
        if s is None or not s.clean:
            return
        while (s.streamed + 1) * CHUNK < self.size:
            k = s.streamed
            if s.obj.parts is not None:  # its ciphertext kept in the write cache: budgeted
                if not self.budget.take_spill(CT_CHUNK):
                    return  # (staged meanwhile; the commit puts what is left)
                s.mirrored += CT_CHUNK
            blk = self.blocks.get(k)
            from_spill = blk is None and self.spill is not None and k in self.spill.slots
            if from_spill:
                assert self.spill is not None
                blk = self.spill.get(k)
            full = blk if blk is not None and len(blk) == CHUNK else None
            if full is None:
                full = bytearray(CHUNK)
                if blk is not None:
                    full[: len(blk)] = blk
            try:
                s.obj.put(k, full)
            finally:
                if full is not blk:
                    wipe(full)
                if from_spill and blk is not None:
                    wipe(blk)
            s.streamed += 1
            s.bytes += CHUNK
            if k in self.blocks:
                self._drop_memory(k)
            elif self.spill is not None and self.spill.slots.pop(k, None) is not None:
                self.budget.give_spill(SLOT)

    def store(self, index: int, data: bytearray) -> bool:
        """Keep block `index` (taking `data`, which may be the block itself, changed in
        place); False if neither memory nor spill had room."""
        if self.streaming is not None and self.streaming.covers(index):
            self.streaming.clean = False  # a streamed chunk changes: a fresh object at commit
        old = self.blocks.get(index)
        grow = len(data) - self._reserved.get(index, 0)
        in_memory = old is not None or self.memory + max(grow, 0) <= self.budget.per_file_memory
        if in_memory and self.budget.take_memory(max(grow, 0)):
            if grow < 0:
                self.budget.give_memory(-grow)
            self.memory += grow
            self._reserved[index] = len(data)
            if old is not None and old is not data:
                wipe(old)
            self.blocks[index] = data
            if self.spill is not None and self.spill.slots.pop(index, None) is not None:
                # spilled before, in memory now (room came back): the sealed copy is stale
                self.budget.give_spill(SLOT)
            return True
        if self.spill is None:
            try:
                self.spill = SpillFile(self.spill_dir)
            except OSError:
                return False  # no write cache here: wait for memory
        fresh = index not in self.spill.slots
        if fresh and not self.budget.take_spill(SLOT):
            return False
        try:
            self.spill.put(index, data)
        except BaseException:
            # (nothing wiped: a block in memory holds data already written, the caller's
            # buffer is the caller's)
            if fresh:
                self.budget.give_spill(SLOT)
            raise
        if old is not None:
            self._drop_memory(index)  # (wiped: it may be `data` itself)
        if old is not data:
            wipe(data)
        return True

    def _drop_memory(self, index: int) -> None:
        b = self.blocks.pop(index)
        n = self._reserved.pop(index)
        self.memory -= n
        self.budget.give_memory(n)
        wipe(b)

    def truncate(self, size: int) -> None:
        """A new size: what lies past it is gone (and reads as zeros if the file grows again)."""
        self.sequential = False
        s = self.streaming
        if s is not None and size <= s.streamed * CHUNK:
            # (at the boundary too: the chunk before it was streamed as not the last)
            s.limit = min(s.limit, size)
            s.clean = False
        if size < self.size:
            keep = -(-size // CHUNK)
            for k in [k for k in self.blocks if k >= keep]:
                self._drop_memory(k)
            if self.spill is not None:
                before = len(self.spill.slots)
                self.spill.cut(keep)
                self.budget.give_spill((before - len(self.spill.slots)) * SLOT)
            tail = size - (keep - 1) * CHUNK if keep else 0
            last = keep - 1
            b = self.blocks.get(last)
            if b is not None and len(b) > tail:
                wipe(memoryview(b)[tail:])
                del b[tail:]
                self.store(last, b)  # (its reservation shrinks: always room)
            elif self.spill is not None and last in self.spill.slots:
                blk = self.spill.get(last)
                del blk[tail:]
                self.spill.put(last, blk)
                wipe(blk)
            self.base_limit = min(self.base_limit, size)
        self.size = size
        self.touch()

    def touch(self) -> None:
        self.changed_at = time.monotonic()

    def has(self, index: int) -> bool:
        """Whether block `index` is staged (in memory or spilled)."""
        return index in self.blocks or (self.spill is not None and index in self.spill.slots)

    def read_at(self, buf: memoryview, offset: int) -> int:
        """Plaintext [offset, offset + len(buf)) into `buf`, clipped at the size; how many
        bytes. What a commit encrypts: encrypt_stream's workers call it at once, each for its
        own batch, while the Dirty does not change (`committing`); the base is read in runs of
        chunks, decrypted there."""
        end = min(self.size, offset + len(buf))
        if end <= offset:
            return 0
        first, last = offset // CHUNK, (end - 1) // CHUNK
        i = first
        while i <= last:
            if not self.has(i) and self.base_covers(i):
                j = i
                while j < last and not self.has(j + 1) and self.base_covers(j + 1):
                    j += 1
                reader, limit = self.under
                assert reader is not None
                pieces = reader.chunks(i, j - i + 1, limit)
                for k, piece in enumerate(pieces):
                    self._copy(buf, offset, end, i + k, piece)
                    wipe(piece)
                i = j + 1
                continue
            blk = self.blocks.get(i)
            if blk is not None:
                self._copy(buf, offset, end, i, blk)
            elif self.spill is not None and i in self.spill.slots:
                blk = self.spill.get(i)
                self._copy(buf, offset, end, i, blk)
                wipe(blk)
            else:
                self._copy(buf, offset, end, i, b"")  # a hole
            i += 1
        return end - offset

    @staticmethod
    def _copy(buf: memoryview, offset: int, end: int, index: int, data: bytes | bytearray) -> None:
        """Chunk `index`'s part of [offset, end) into `buf`: `data`, then zeros past it."""
        b0 = index * CHUNK
        lo, hi = max(offset, b0), min(end, b0 + CHUNK)
        m = max(0, min(hi, b0 + len(data)) - lo)
        dst = buf[lo - offset : hi - offset]
        if m:
            dst[:m] = memoryview(data)[lo - b0 : lo - b0 + m]
        if m < len(dst):
            dst[m:] = bytes(len(dst) - m)

    @property
    def staged_bytes(self) -> int:
        return self.memory + (0 if self.spill is None else len(self.spill.slots) * CHUNK)

    def wipe(self, closing: list[SpillFile | Streaming] | None = None) -> None:
        """Drop everything staged (after its commit, at unlink, at lock): memory wiped, the
        spill file forgotten (it was never linked: its blocks go with its descriptor) and
        closed, or put in `closing` for the caller to close on a thread (closing the last
        descriptor of a large unlinked file frees its blocks there and then: 80 ms for
        256 MiB, too long for the loop)."""
        for k in list(self.blocks):
            self._drop_memory(k)
        if self.spill is not None:
            self.budget.give_spill(len(self.spill.slots) * SLOT)
            self.spill.forget()
            if closing is None:
                self.spill.close()
            else:
                closing.append(self.spill)
            self.spill = None
        if self.base_reader is not None:
            self.base_reader.close()
            self.base_reader = None
        if self.streaming is not None:
            self.budget.give_spill(self.streaming.mirrored)
            self.streaming.mirrored = 0
            if closing is None:
                self.streaming.close()
            else:
                closing.append(self.streaming)
            self.streaming = None


class DirtyStream:
    """A Dirty's whole plaintext as what a commit encrypts (objects.write_object): its size and
    `read_at`, which encrypt_stream's workers call at once, each for its own batch
    (agefile._positional); the Dirty does not change meanwhile (`committing`)."""

    def __init__(self, d: Dirty) -> None:
        self.size = d.size
        self.read_at = d.read_at

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass  # (read_at wipes what it decrypts; the buffers are encrypt_stream's)


def open_base(v: Any, e: Entry) -> BaseReader:
    """On a thread: the object of `e`, checked against it as every open is (objects.py)."""
    from pqfs.vault.objects import open_checked

    src, reader = open_checked(v, e)
    return BaseReader(src, reader)
