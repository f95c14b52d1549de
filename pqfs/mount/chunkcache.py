"""One LRU of decrypted chunks for a whole mount, with a single byte budget.

Invariants (kept by this class alone, under its lock; workers and the trio thread share it):
  * every buffer is CHUNK bytes; cached + free + lent buffers never exceed `capacity`
    (= budget // CHUNK), whatever the number of open files, so plaintext memory is bounded by
    the budget plus the callers' own transient buffers;
  * a buffer is wiped before it is reused for another chunk, when it is evicted (by the lender,
    once it has left the map: then no reader can reach it), and on clear(): no plaintext
    survives in a buffer that no longer holds its chunk;
  * readers copy out while holding the lock, so a concurrent eviction by a worker thread never
    wipes or reuses a buffer under a reader;
  * `clear()` (lock, unmount) wipes and drops every buffer, cached and free, and starts a new
    generation: a worker that was still decrypting when clear() ran has its buffers wiped at
    insert() instead of cached, so nothing decrypted before a lock is readable after it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from pqfs.format.stream import CHUNK
from pqfs.runtime.memory import populated, wipe


class _Slot:
    __slots__ = ("buf", "length", "prefetched")

    def __init__(self, buf: memoryview, length: int, prefetched: bool) -> None:
        self.buf = buf
        self.length = length
        self.prefetched = prefetched


class ChunkCache:
    def __init__(self, budget: int) -> None:
        self.capacity = max(4, budget // CHUNK)
        self._slots: OrderedDict[Hashable, _Slot] = OrderedDict()
        self._free: list[memoryview] = []
        self._lent = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.prefetch_hits = 0
        self.evictions = 0
        self.generation = 0

    # ------------------------------------------------------------------ readers ----

    def copy_out(self, key: Hashable, lo: int, out: memoryview) -> bool:
        """Copy chunk bytes [lo, lo+len(out)) into `out`; False (a miss) if not cached or shorter."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or lo + len(out) > slot.length:
                self.misses += 1
                return False
            out[:] = memoryview(slot.buf)[lo : lo + len(out)]
            self._slots.move_to_end(key)
            self.hits += 1
            if slot.prefetched:
                slot.prefetched = False
                self.prefetch_hits += 1
            return True

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._slots

    # ------------------------------------------------------------------ writers ----

    def lend(self, count: int) -> list[memoryview]:
        """`count` wiped buffers for a worker to decrypt into, taken from the free list, newly
        allocated while under capacity, or evicted from the LRU end."""
        out: list[memoryview] = []
        evicted: list[memoryview] = []
        new = 0  # buffers to allocate: counted as lent at once, made after the lock is released
        with self._lock:
            for _ in range(count):
                if self._free:
                    out.append(self._free.pop())
                elif (
                    len(self._slots) + self._lent + len(out) + len(evicted) + new < self.capacity
                    or not self._slots
                ):
                    new += 1
                else:
                    _, slot = self._slots.popitem(last=False)
                    self.evictions += 1
                    evicted.append(slot.buf)
            self._lent += len(out) + len(evicted) + new
        # Outside the lock, which readers on the loop take for every chunk they copy: wiping
        # a job's evictions (2 MiB) under it made the loop wait, and then wait again for the
        # GIL. No reader can reach these buffers any more: they left the map under the lock.
        for b in evicted:
            wipe(b)
        out.extend(evicted)
        out.extend(populated(CHUNK) for _ in range(new))  # faulting pages: not under the lock
        return out

    def insert(
        self,
        keys: Sequence[Hashable],
        bufs: Sequence[memoryview],
        lengths: Sequence[int],
        generation: int,
        prefetched: bool = False,
    ) -> None:
        """Cache lent buffers holding authenticated plaintext; the cache owns them afterwards.
        `generation` is self.generation as read before the buffers were lent."""
        with self._lock:
            self._lent -= len(bufs)
            if generation != self.generation:
                for b in bufs:
                    wipe(b)
                return
            for key, buf, n in zip(keys, bufs, lengths, strict=True):
                old = self._slots.pop(key, None)
                if old is not None:  # decrypted twice (a race between readers): keep the newest
                    wipe(old.buf)
                    self._free.append(old.buf)
                self._slots[key] = _Slot(buf, n, prefetched)

    def top_up(self, spares: int) -> None:
        """Fault in new buffers ahead of need while under capacity, up to `spares` free ones
        (MountOptions.cache_spares), so that a read waiting on a job does not wait for page
        faults too (~30 us per buffer here). Called by a worker after its job is done and
        reported: off every read's path."""
        with self._lock:
            room = self.capacity - (len(self._slots) + self._lent + len(self._free))
            want = min(room, spares - len(self._free))
            if want <= 0:
                return
            self._lent += want  # counted at once: a concurrent lend cannot overshoot
        new = [populated(CHUNK) for _ in range(want)]
        with self._lock:
            self._lent -= want
            self._free.extend(new)

    def give_back(self, bufs: Sequence[memoryview]) -> None:
        """Return lent buffers unused (a failed decrypt): wiped, then kept for reuse."""
        for b in bufs:
            wipe(b)
        with self._lock:
            self._lent -= len(bufs)
            self._free.extend(bufs)

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            for slot in self._slots.values():
                wipe(slot.buf)
            for b in self._free:
                wipe(b)
            self._slots.clear()
            self._free.clear()

    # ------------------------------------------------------------------ inspection ----

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def buffers(self) -> list[memoryview]:
        """For tests: every buffer the cache holds (cached and free), no copies."""
        with self._lock:
            return [s.buf for s in self._slots.values()] + list(self._free)

    @property
    def bytes_cached(self) -> int:
        with self._lock:
            return sum(s.length for s in self._slots.values())
