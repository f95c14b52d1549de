"""The decrypted-chunk LRU: one byte budget, wiped buffers, generations."""

from __future__ import annotations

import mmap
import os
import random

import pytest

from pqfs.format.stream import CHUNK
from pqfs.mount.chunkcache import ChunkCache
from pqfs.runtime.memory import populated, scratch, wipe


def _fill(cache: ChunkCache, key: object, byte: int) -> memoryview:
    (buf,) = cache.lend(1)
    buf[:] = bytes([byte]) * CHUNK
    cache.insert([key], [buf], [CHUNK], cache.generation)
    return buf


def test_budget_bounds_buffers_and_evicts_lru_with_wipe() -> None:
    cache = ChunkCache(8 * CHUNK)
    bufs = [_fill(cache, ("f", i), i + 1) for i in range(8)]
    assert len(cache) == 8
    out = memoryview(bytearray(10))
    assert cache.copy_out(("f", 0), 5, out)  # chunk 0 becomes most recently used
    assert bytes(out) == b"\x01" * 10
    _fill(cache, ("f", 8), 9)  # over budget: the LRU entry (chunk 1) goes, and is reused
    assert len(cache) == 8
    assert ("f", 1) not in cache and ("f", 0) in cache
    assert len(cache.buffers()) <= cache.capacity
    assert cache.evictions == 1
    # The evicted buffer now holds chunk 8, never chunk 1's bytes beside it.
    assert bufs[1] == bytes([9]) * CHUNK


def test_evicted_buffers_are_lent_wiped_and_within_the_budget() -> None:
    cache = ChunkCache(4 * CHUNK)
    bufs = [_fill(cache, ("f", i), 0xAA) for i in range(4)]
    (lent,) = cache.lend(1)  # full: the LRU chunk is evicted for it
    assert ("f", 0) not in cache and cache.evictions == 1
    assert lent.obj is bufs[0].obj and not any(lent)
    cache.insert([("f", 9)], [lent], [CHUNK], cache.generation)
    more = cache.lend(3)  # a job's worth at once: three evictions, no new buffer
    assert cache.evictions == 4 and len(cache) == 1
    assert len(cache.buffers()) + len(more) <= cache.capacity
    assert {id(b.obj) for b in more} <= {id(b.obj) for b in bufs} and not any(map(any, more))


def test_many_files_share_one_budget() -> None:
    cache = ChunkCache(16 * CHUNK)
    for f in range(50):
        for i in range(4):
            _fill(cache, (f"file{f}", i), 7)
    assert len(cache) == 16
    assert len(cache.buffers()) <= 16


def test_clear_wipes_everything_and_drops_late_inserts() -> None:
    cache = ChunkCache(8 * CHUNK)
    kept = [_fill(cache, ("f", i), 0xAA) for i in range(4)]
    gen = cache.generation
    late = cache.lend(2)  # a worker still decrypting when the mount is locked
    for b in late:
        b[:] = os.urandom(CHUNK)
    cache.clear()
    assert len(cache) == 0 and cache.buffers() == []
    assert all(b == bytes(CHUNK) for b in kept)
    cache.insert([("f", 10), ("f", 11)], late, [CHUNK, CHUNK], gen)
    assert len(cache) == 0
    assert all(b == bytes(CHUNK) for b in late)


def test_give_back_wipes_and_reuses() -> None:
    cache = ChunkCache(4 * CHUNK)
    (buf,) = cache.lend(1)
    buf[:] = b"\xff" * CHUNK
    cache.give_back([buf])
    assert buf == bytes(CHUNK)
    assert cache.lend(1)[0] is buf


def test_short_chunk_and_prefetch_hits() -> None:
    cache = ChunkCache(4 * CHUNK)
    (buf,) = cache.lend(1)
    buf[:100] = b"x" * 100
    cache.insert([("f", 0)], [buf], [100], cache.generation, prefetched=True)
    assert not cache.copy_out(("f", 0), 90, memoryview(bytearray(20)))  # past the chunk's end
    assert cache.copy_out(("f", 0), 90, memoryview(bytearray(10)))
    assert cache.copy_out(("f", 0), 0, memoryview(bytearray(10)))
    assert cache.prefetch_hits == 1  # counted once per prefetched chunk
    assert cache.hits == 2 and cache.misses == 1


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_new_buffers_come_faulted_in_and_zeroed() -> None:
    """Their pages are in memory before anyone writes them (faulted by madvise, without the
    GIL), so a copy into them under the GIL never waits on page faults."""
    before = _rss_kib()
    bufs = [populated(1 << 20) for _ in range(8)]
    assert _rss_kib() - before >= 7 * 1024  # 8 MiB resident without a byte written
    assert all(len(b) == 1 << 20 and not any(b) for b in bufs)
    bufs[0][:3] = b"abc"
    assert bytes(bufs[0][:4]) == b"abc\0"
    (buf,) = ChunkCache(4 * CHUNK).lend(1)
    assert isinstance(buf, memoryview) and len(buf) == CHUNK and not any(buf)


def test_scratch_buffers_are_zeroed_and_large_ones_faulted_in() -> None:
    """Transient buffers (worker ciphertext): a large one is mapped and faulted in without the
    GIL, like `populated`; a small one comes from the allocator."""
    before = _rss_kib()
    big = scratch(4 << 20)
    assert _rss_kib() - before >= 3 * 1024  # resident without a byte written
    assert isinstance(big.obj, mmap.mmap) and len(big) == 4 << 20 and not any(big)
    small = scratch(1000)
    assert isinstance(small.obj, bytearray) and len(small) == 1000 and not any(small)
    big[-1:] = b"z"
    assert bytes(big[-2:]) == b"\0z"


def test_top_up_keeps_spares_within_the_budget() -> None:
    """Workers fault in a few buffers ahead of need; never past the budget, and lend takes
    them first (no new buffer while spares remain)."""
    cache = ChunkCache(8 * CHUNK)
    cache.top_up(3)
    spares = cache.buffers()
    assert len(spares) == 3 and all(len(b) == CHUNK and not any(b) for b in spares)
    lent = cache.lend(2)
    assert all(any(b is s for s in spares) for b in lent)  # the spares, not new buffers
    cache.insert([("o", 0), ("o", 1)], lent, [CHUNK, CHUNK], cache.generation)
    cache.top_up(3)
    assert len(cache.buffers()) == 5  # 2 cached + 3 spares
    more = cache.lend(3)
    cache.insert([("o", i) for i in range(2, 5)], more, [CHUNK] * 3, cache.generation)
    cache.top_up(10)
    assert len(cache.buffers()) == 8  # 5 cached + 3 spares: the budget, not 5 + 10
    cache.top_up(10)
    assert len(cache.buffers()) == 8


def test_wipe_zeroes_exactly_its_buffer() -> None:
    """wipe() zeroes all of the buffer it is given and nothing around it, for bytearrays,
    slices of them, mmap-backed views and sizes either side of its 1 MiB zero page; a read-only
    buffer is refused, not written."""
    rng = random.Random(4)
    for size in [
        0,
        1,
        31,
        4096,
        CHUNK - 1,
        CHUNK,
        (1 << 20) - 1,
        1 << 20,
        (1 << 20) + 3 * CHUNK + 5,
    ]:
        whole = bytearray(b"\xa5" * (size + 64))
        lo = rng.randrange(0, 33)
        wipe(memoryview(whole)[lo : lo + size])
        assert whole == b"\xa5" * lo + bytes(size) + b"\xa5" * (64 - lo)
        own = bytearray(os.urandom(size))
        wipe(own)
        assert own == bytes(size)
        view = populated(max(size, 1))
        view[:] = b"\x5a" * len(view)
        wipe(view)
        assert bytes(view) == bytes(len(view))
    wide = memoryview(bytearray(b"\xff" * 8192)).cast("Q")  # another item size: bytes counted
    wipe(wide)
    assert bytes(wide) == bytes(8192)
    for size in (16, 8192):
        with pytest.raises(TypeError):
            wipe(memoryview(b"\x01" * size))
