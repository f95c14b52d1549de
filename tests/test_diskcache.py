"""The on-disk ciphertext cache on its own: bounds, LRU order, object ends, concurrent use."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from pqfs.errors import VaultError
from pqfs.storage.base import StorageOptions
from pqfs.storage.diskcache import DiskCache

BLOCK = StorageOptions.disk_cache_block  # the cache's default granularity


def test_hits_misses_and_partial_ranges(tmp_path: Path) -> None:
    dc = DiskCache(str(tmp_path), 8 * BLOCK)
    obj = os.urandom(3 * BLOCK + 100)  # a short last block
    buf = bytearray(1000)
    assert not dc.read("k", 0, memoryview(buf))
    dc.store("k", 0, memoryview(obj)[: 2 * BLOCK], len(obj))
    assert dc.size_of("k") == len(obj)
    assert dc.read("k", BLOCK - 500, memoryview(buf))
    assert buf == obj[BLOCK - 500 : BLOCK + 500]
    assert not dc.read("k", 2 * BLOCK - 10, memoryview(buf))  # block 2 is not cached yet
    dc.store("k", 2 * BLOCK, memoryview(obj)[2 * BLOCK :], len(obj))
    tail = bytearray(BLOCK + 100)
    assert dc.read("k", 2 * BLOCK, memoryview(tail))
    assert tail == obj[2 * BLOCK :]
    assert list(tmp_path.iterdir()) == []  # the cache file has no name


def test_partial_block_that_is_not_the_end_is_not_kept(tmp_path: Path) -> None:
    dc = DiskCache(str(tmp_path), 8 * BLOCK)
    obj = os.urandom(4 * BLOCK)
    dc.store("k", 0, memoryview(obj)[: BLOCK + 10], len(obj))  # 10 bytes of block 1
    assert dc.read("k", 0, memoryview(bytearray(BLOCK)))
    assert not dc.read("k", BLOCK, memoryview(bytearray(5)))
    with pytest.raises(ValueError):
        dc.store("k", 1, memoryview(obj), len(obj))


def test_budget_bounds_the_cache_in_lru_order(tmp_path: Path) -> None:
    dc = DiskCache(str(tmp_path), 4 * BLOCK)
    objs = {f"o{i}": os.urandom(BLOCK) for i in range(6)}
    for k in ("o0", "o1", "o2", "o3"):
        dc.store(k, 0, memoryview(objs[k]), BLOCK)
    assert dc.read("o0", 0, memoryview(bytearray(BLOCK)))  # o0 is now the most recent
    dc.store("o4", 0, memoryview(objs["o4"]), BLOCK)  # evicts o1, the least recent
    dc.store("o5", 0, memoryview(objs["o5"]), BLOCK)  # evicts o2
    assert dc.evictions == 2
    for k, present in (("o0", 1), ("o1", 0), ("o2", 0), ("o3", 1), ("o4", 1), ("o5", 1)):
        buf = bytearray(BLOCK)
        assert dc.read(k, 0, memoryview(buf)) == bool(present), k
        if present:
            assert buf == objs[k]
    assert dc.size_of("o1") is None  # forgotten with its last block
    assert os.fstat(dc._fd).st_size <= 4 * BLOCK
    assert dc.stats()["disk_cache_bytes"] == 4 * BLOCK


def test_concurrent_readers_never_see_another_objects_bytes(tmp_path: Path) -> None:
    """Many threads storing and reading through a cache much smaller than the data: every read
    that reports a hit returns exactly the right bytes (slots reused meanwhile count as misses)."""
    dc = DiskCache(str(tmp_path), 6 * BLOCK)
    objs = {f"o{i}": os.urandom(2 * BLOCK) for i in range(12)}
    wrong: list[str] = []
    hits = 0

    def worker(seed: int) -> None:
        nonlocal hits
        rng = random.Random(seed)
        for _ in range(300):
            k = rng.choice(list(objs))
            if rng.random() < 0.5:
                dc.store(k, 0, memoryview(objs[k]), len(objs[k]))
            else:
                off = rng.randrange(0, 2 * BLOCK - 100)
                buf = bytearray(rng.randrange(1, 2 * BLOCK - off))
                if dc.read(k, off, memoryview(buf)):
                    hits += 1
                    if buf != objs[k][off : off + len(buf)]:
                        wrong.append(k)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert hits > 0


def test_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(VaultError, match=r"cannot use .* for the disk cache: Not a directory"):
        DiskCache(str(tmp_path / "file" / "cache"), 1 << 30)
    DiskCache(str(tmp_path / "new" / "cache"), 1 << 20)  # a missing directory is created
    assert (tmp_path / "new" / "cache").is_dir()
    with pytest.raises(VaultError, match="at least 64K"):
        DiskCache(str(tmp_path), 1000)
