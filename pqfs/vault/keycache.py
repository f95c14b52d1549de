"""Zeroizing TTL cache of unwrapped file keys.

Invariants (kept by this class alone, under its lock):
  * an entry lives at most `ttl` seconds after its last use; expired entries are wiped on the next
    access or `sweep()`, whichever comes first;
  * wiping an entry zeroes its file-key bytearray and drops the payload AEAD (the only object
    holding the derived payload key), so nothing readable outlives it;
  * `clear()` (lock, unmount) wipes every entry; ttl == 0 disables caching entirely;
  * the cache holds at most `max_entries` keys (least recently used evicted and wiped first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pqfs.runtime.memory import wipe


@dataclass
class CachedKey:
    file_key: bytearray
    aead: Any = None  # payload ChaCha20Poly1305, derived on first use
    expires: float = 0.0

    def wipe(self) -> None:
        wipe(self.file_key)
        self.aead = None


class KeyCache:
    def __init__(
        self,
        ttl: float = 300.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[Any, CachedKey] = OrderedDict()
        self._lock = threading.Lock()
        self.epoch = 0  # clears so far (put's `epoch`)
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> CachedKey | None:
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            if entry.expires <= now:
                del self._entries[key]
                entry.wipe()
                self.misses += 1
                return None
            entry.expires = now + self.ttl
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(
        self, key: Any, file_key: bytearray, aead: Any = None, epoch: int | None = None
    ) -> CachedKey:
        """Store a copy of `file_key` (the caller keeps, and wipes, its own). With `epoch`
        (read before the key was unwrapped): if the cache was cleared since (a lock), the
        key is not stored and comes back wiped, so no unwrap that a lock overtook leaves a key
        behind it."""
        entry = CachedKey(bytearray(file_key), aead, self.clock() + self.ttl)
        if self.ttl <= 0:
            return entry  # caching disabled: the caller uses it once and it is dropped
        with self._lock:
            if epoch is not None and epoch != self.epoch:
                entry.wipe()
                return entry
            old = self._entries.pop(key, None)
            if old is not None:
                old.wipe()
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                _, evicted = self._entries.popitem(last=False)
                evicted.wipe()
        return entry

    def sweep(self) -> int:
        now = self.clock()
        with self._lock:
            dead = [k for k, e in self._entries.items() if e.expires <= now]
            for k in dead:
                self._entries.pop(k).wipe()
        return len(dead)

    def clear(self) -> None:
        with self._lock:
            self.epoch += 1
            for e in self._entries.values():
                e.wipe()
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def entries(self) -> list[CachedKey]:
        """For tests and stats: the live entries (no copies)."""
        with self._lock:
            return list(self._entries.values())
