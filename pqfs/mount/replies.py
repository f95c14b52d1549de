"""Reply buffers: the shared one that a read answered at once is copied into, and the pool of
private ones that reads which wait answer from (`Replies`). It never decrypts, reads storage or
holds keys: it hands out wiped buffers, and wipes them again once their reply has been sent.

Invariants (kept by this class):
  * a buffer is faulted in before use, never by a first write on the loop: on this project's VM
    a page's first touch can cost ~0.1 ms (the host backs it only then), so a fresh 1 MiB buffer
    stalled the loop, or a worker holding the GIL, for 10-25 ms;
  * a private buffer is wiped once its reply has been sent (at the next read, or at lock), and
    only then reused; at most `reply_pool` are kept, and workers keep `reply_spares` of them
    faulted in ahead of need (after each job);
  * the loop pops and returns buffers; workers only append new zeroed ones (`fault_in_spares`,
    one topper at a time), so a list (atomic append/pop) is enough.
"""

from __future__ import annotations

import threading

from pqfs.mount.chunkcache import ChunkCache
from pqfs.mount.options import MountOptions
from pqfs.runtime.memory import populated, wipe


class Replies:
    def __init__(self, options: MountOptions, cache: ChunkCache) -> None:
        self._max_read = options.max_read
        self._pool = options.reply_pool
        self._spares = options.reply_spares
        self._cache_spares = options.cache_spares
        self._cache = cache
        self.shared = populated(options.max_read)  # for reads answered without waiting
        self._sent: list[tuple[memoryview, int]] = []  # private buffers sent to the kernel
        self._free: list[memoryview] = []  # wiped private buffers, for reuse
        self._spares_lock = threading.Lock()  # fault_in_spares only

    def take(self, size: int) -> memoryview:
        """A private buffer of at least `size` bytes, zeroed: other reads reuse the shared one
        while the read it is for waits."""
        buf = self._free.pop() if self._free and size <= self._max_read else None
        if buf is None:
            buf = populated(max(size, self._max_read))
        return buf

    def sending(self, buf: memoryview, used: int) -> None:
        """`buf` holds a reply of `used` bytes about to be sent: wiped by the next wipe_sent()."""
        self._sent.append((buf, used))

    def wipe_sent(self) -> None:
        """Wipe the private reply buffers of earlier reads: their replies have been sent."""
        for b, used in self._sent:
            wipe(memoryview(b)[:used])  # the rest was never written: pooled buffers are zero
            if len(self._free) < self._pool:
                self._free.append(b)
        self._sent.clear()

    def fault_in_spares(self) -> None:
        """Fault in buffers the next reads will need (cache buffers, private reply buffers),
        off the loop and without the GIL: by a worker after each job, before the mount
        serves, and after an unlock."""
        self._cache.top_up(self._cache_spares)
        # One topper at a time: workers finishing together would each see the shortfall and
        # overshoot the bound by a 1 MiB buffer apiece. The others skip; the next job tops up.
        if not self._spares_lock.acquire(blocking=False):
            return
        try:
            while len(self._free) < self._spares:
                self._free.append(populated(self._max_read))
        finally:
            self._spares_lock.release()

    def wipe(self) -> None:
        """At lock: wipe the shared buffer and the sent ones, and drop the spares (an unlock
        faults them in again)."""
        wipe(self.shared)
        self.wipe_sent()
        self._free.clear()

    # ------------------------------------------------------------------ inspection ----

    def free(self) -> list[memoryview]:
        """For tests: the wiped private buffers kept for reuse, no copies."""
        return list(self._free)

    def sent(self) -> list[memoryview]:
        """For tests: the private buffers whose replies are being sent, no copies."""
        return [b for b, _ in self._sent]
