"""An on-disk LRU of ciphertext blocks of remote objects: re-reading a range, or seeking back to
one, sends no request.

Only ciphertext is stored, byte for byte as the bucket holds it, so the cache file holds nothing
that is not already in the bucket. It is one unlinked file (O_TMPFILE) in the chosen directory:
it vanishes with the process, even after kill -9, and no other process can open it by name. The
index is in memory, so a new mount starts with an empty cache.

Invariants (kept under `_lock`; file I/O runs outside it, from many worker threads at once):
  * a slot is free, being written (taken, not yet in `_index`), or mapped by exactly one index
    entry; the index never holds more than `capacity` slots (the disk budget / `block`);
  * `_version[slot]` changes whenever a slot is taken for new content. A reader notes it under the
    lock, reads the slot outside it, then checks it is unchanged: if the slot was evicted and
    reused meanwhile, the read counts as a miss and the caller fetches from the bucket.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections import OrderedDict

from pqfs.errors import VaultError
from pqfs.storage.base import StorageOptions

Key = tuple[str, int]  # (object key, block index)


class DiskCache:
    """At most `size` bytes in `directory`, in slots of `block` bytes (a bucket read is widened
    to whole blocks: StorageOptions.disk_cache_block)."""

    def __init__(
        self, directory: str, size: int, block: int = StorageOptions.disk_cache_block
    ) -> None:
        if size < block:
            raise VaultError(f"disk cache size must be at least {block // 1024}K")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise VaultError(f"cannot use {directory} for the disk cache: {e.strerror}") from None
        try:
            self._fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:  # a filesystem without O_TMPFILE: create and unlink at once
            try:
                fd, name = tempfile.mkstemp(prefix=".pqfs-cache-", dir=directory)
            except OSError as e:
                raise VaultError(
                    f"cannot create a disk cache in {directory}: {e.strerror}"
                ) from None
            os.unlink(name)
            self._fd = fd
        self.block = block
        self.capacity = size // block
        self._lock = threading.Lock()
        self._index: OrderedDict[Key, tuple[int, int]] = OrderedDict()  # -> (slot, length)
        self._free: list[int] = []
        self._unused = 0  # slots never used yet: the file grows only as the cache fills
        self._version = [0] * self.capacity
        self._sizes: dict[str, int] = {}  # object sizes, for keys with blocks cached
        self._blocks: dict[str, int] = {}  # blocks cached per key (to forget sizes with them)
        self.hits = 0
        self.misses = 0
        self.bytes_hit = 0
        self.evictions = 0

    # ------------------------------------------------------------------ lookups ----

    def size_of(self, key: str) -> int | None:
        with self._lock:
            return self._sizes.get(key)

    def read(self, key: str, offset: int, buf: memoryview) -> bool:
        """Fill `buf` with bytes [offset, offset+len(buf)) of object `key` if every block of that
        range is cached; False (buf unspecified) otherwise."""
        n = len(buf)
        if n == 0:
            return True
        block = self.block
        blocks = range(offset // block, (offset + n - 1) // block + 1)
        with self._lock:
            found = []
            for b in blocks:
                hit = self._index.get((key, b))
                if hit is None:
                    self.misses += 1
                    return False
                self._index.move_to_end((key, b))
                found.append((b, *hit, self._version[hit[0]]))
        for b, slot, length, _version in found:
            lo = max(offset, b * block)
            hi = min(offset + n, b * block + length)
            if hi <= lo or hi < min(offset + n, (b + 1) * block):
                with self._lock:
                    self.misses += 1
                return False  # a short block that does not cover the range (object end)
            want = hi - lo
            got = os.preadv(
                self._fd, [buf[lo - offset : hi - offset]], slot * block + lo - b * block
            )
            if got != want:
                return False
        with self._lock:
            if any(self._version[slot] != v for _b, slot, _l, v in found):
                self.misses += 1
                return False
            self.hits += 1
            self.bytes_hit += n
        return True

    # ------------------------------------------------------------------ inserts ----

    def store(self, key: str, offset: int, data: memoryview, object_size: int) -> None:
        """Cache `data`, bytes [offset, ...) of object `key`; `offset` is block-aligned. Only whole
        blocks are kept (and the object's short last block)."""
        block = self.block
        if offset % block:
            raise ValueError("disk cache stores start on a block boundary")
        pos = 0
        while pos < len(data):
            length = min(block, len(data) - pos)
            b = (offset + pos) // block
            if length == block or offset + pos + length == object_size:
                self._store_block(key, b, data[pos : pos + length], object_size)
            pos += length

    def _store_block(self, key: str, b: int, data: memoryview, object_size: int) -> None:
        with self._lock:
            if (key, b) in self._index:
                self._index.move_to_end((key, b))
                return
            slot = self._take_slot()
            self._version[slot] += 1
        try:
            os.pwrite(self._fd, data, slot * self.block)
        except OSError:  # a full disk only makes the cache smaller: hand the slot back
            with self._lock:
                self._free.append(slot)
            return
        with self._lock:
            if (key, b) in self._index:  # another thread stored it meanwhile
                self._free.append(slot)
                return
            self._index[(key, b)] = (slot, len(data))
            self._sizes[key] = object_size
            self._blocks[key] = self._blocks.get(key, 0) + 1

    def _take_slot(self) -> int:
        """Under the lock: a free slot, evicting the least recently used block if need be."""
        if self._free:
            return self._free.pop()
        if self._unused < self.capacity:
            self._unused += 1
            return self._unused - 1
        (key, _b), (slot, _length) = self._index.popitem(last=False)
        self.evictions += 1
        self._blocks[key] -= 1
        if not self._blocks[key]:
            del self._blocks[key]
            self._sizes.pop(key, None)
        return slot

    # ------------------------------------------------------------------ admin ----

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "disk_cache_hits": self.hits,
                "disk_cache_misses": self.misses,
                "disk_cache_bytes_hit": self.bytes_hit,
                "disk_cache_bytes": sum(length for _s, length in self._index.values()),
                "disk_cache_budget": self.capacity * self.block,
                "disk_cache_evictions": self.evictions,
            }

    def close(self) -> None:
        with self._lock:
            self._index.clear()
            self._sizes.clear()
            self._blocks.clear()
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
