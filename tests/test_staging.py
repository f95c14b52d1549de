"""Staging (pqfs/mount/staging.py) on its own: the spill file seals every block (no plaintext,
a fresh nonce per write, a block moved to another slot or rolled back fails), and the budgets
come back to zero whatever was stored, cut or wiped."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import pytest

from pqfs.errors import PayloadError, VaultError
from pqfs.format.stream import CHUNK
from pqfs.mount.staging import SLOT, Dirty, DirtyStream, SpillFile, StagingBudget


def _spill_bytes(f: SpillFile) -> bytes:
    return os.pread(f.fd, 1 << 24, 0)


def test_spill_file_holds_no_plaintext_and_never_reuses_a_nonce(tmp_path: Path) -> None:
    f = SpillFile(str(tmp_path))
    assert os.listdir(tmp_path) == []  # it has no name
    marker = b"PLAINTEXT-MARKER" * 100
    nonces = set()
    for i in range(5):
        f.put(i % 2, marker)  # the same data, the same slots: a new nonce every time
        nonces.add(f.slots[i % 2][0])
        assert marker[:16] not in _spill_bytes(f)
    assert len(nonces) == 5
    assert f.get(0) == marker and f.get(1) == marker
    f.close()


def test_a_moved_or_rolled_back_block_fails_authentication(tmp_path: Path) -> None:
    f = SpillFile(str(tmp_path))
    f.put(0, b"a" * 1000)
    f.put(1, b"b" * 1000)
    # the slot of block 1 copied over block 0's: another index in the associated data
    os.pwrite(f.fd, os.pread(f.fd, SLOT, SLOT), 0)
    with pytest.raises(PayloadError):
        f.get(0)
    # an older write of block 1 put back: its nonce is not the one recorded
    old = os.pread(f.fd, 1000 + 16, SLOT)
    f.put(1, b"c" * 1000)
    os.pwrite(f.fd, old, SLOT)
    with pytest.raises(PayloadError):
        f.get(1)
    f.close()


def test_budgets_return_to_zero(tmp_path: Path) -> None:
    budget = StagingBudget(memory=4 * CHUNK, spill=8 * SLOT, per_file_memory=2 * CHUNK, timeout=1)
    d = Dirty(None, 0, budget, str(tmp_path))
    rng = random.Random(1)
    for i in range(6):  # 2 in memory (per-file bound), 4 spilled
        assert d.store(i, bytearray(rng.randbytes(CHUNK)))
    d.size = 6 * CHUNK
    assert budget.memory_used == 2 * CHUNK and budget.spill_used == 4 * SLOT
    d.truncate(CHUNK + 10)  # keeps block 0 and 10 bytes of block 1
    assert budget.memory_used == CHUNK + 10 and budget.spill_used == 0
    d.truncate(5 * CHUNK)  # growing: zeros, nothing stored
    assert budget.memory_used == CHUNK + 10
    s = DirtyStream(d)
    assert s.size == 5 * CHUNK
    out = bytearray(5 * CHUNK + 100)
    assert s.read_at(memoryview(out), 0) == 5 * CHUNK  # clipped at the size
    assert out[CHUNK + 10 :] == bytes(len(out) - CHUNK - 10)  # what was cut reads as zeros
    part = bytearray(CHUNK)
    assert s.read_at(memoryview(part), 2 * CHUNK) == CHUNK  # any offset
    assert part == bytes(CHUNK)
    d.wipe()
    assert budget.memory_used == 0 and budget.spill_used == 0
    # a full spill refuses, it does not grow past its bound
    e = Dirty(None, 0, budget, str(tmp_path))
    results = [e.store(i, bytearray(CHUNK)) for i in range(20)]
    assert results.count(True) == 2 + 8 and budget.spill_used == 8 * SLOT
    e.wipe()
    assert budget.memory_used == 0 and budget.spill_used == 0


# ------------------------------------------------------------------ the stream tier ----


def _write_in_order(d: Dirty, data: bytes, vault: object, head: int) -> None:
    """What Writes.write does for a file written in order: blocks staged, the stream started
    once past the head, each write's whole chunks streamed out."""
    from pqfs.mount.staging import Streaming
    from pqfs.vault.objects import OpenObject

    step = 2 * CHUNK  # one 128 KiB write at a time, as cp does
    for off in range(0, len(data), step):
        piece = data[off : off + step]
        for k in range(0, len(piece), CHUNK):
            assert d.store((off + k) // CHUNK, bytearray(piece[k : k + CHUNK]))
        d.size = off + len(piece)
        if d.streaming is None and d.size > (head + 1) * CHUNK:
            d.streaming = Streaming(OpenObject(vault), head)  # type: ignore[arg-type]
        d.stream_out()
        assert d.budget.memory_used <= (head + 3) * CHUNK  # the head, the chunks in flight


def test_a_file_written_in_order_streams_into_its_object(tmp_path: Path, vault: Any) -> None:
    from pqfs.mount.commits import Commits
    from pqfs.vault.objects import open_checked

    budget = StagingBudget(memory=64 * CHUNK, spill=0, per_file_memory=16 * CHUNK, timeout=1)
    d = Dirty(None, 0, budget, str(tmp_path))
    marker = b"PLAINTEXT-MARKER-0123456789"
    data = bytearray((marker * (40 * CHUNK // len(marker) + 1))[: 40 * CHUNK + 1234])
    _write_in_order(d, bytes(data), vault, head=4)
    s = d.streaming
    assert s is not None and s.clean and s.streamed == 40  # all but the head and the last
    # a header patch (the head stays staged) and a read of streamed chunks change nothing
    d.store(0, bytearray(b"HEAD" + data[4:CHUNK]))
    data[:4] = b"HEAD"
    back = bytearray(len(data))
    DirtyStream(d).read_at(memoryview(back), 0)
    assert back == data and s.clean
    # the temp object holds ciphertext only
    raw = os.pread(s.obj.fd, 50 * CHUNK, 0)
    assert marker not in raw and len(raw) > 30 * CHUNK
    e = Commits._finish_stream(d, s)
    vault.storage.make_durable()
    src, reader = open_checked(vault, dataclasses.replace(e, path="f"))
    try:
        assert reader.read(0, reader.size) == bytes(data)
    finally:
        src.close()
    d.wipe()
    assert budget.memory_used == 0


def test_a_streamed_chunk_changed_makes_a_fresh_object(tmp_path: Path, vault: Any) -> None:
    from pqfs.vault.objects import object_key, write_object

    budget = StagingBudget(memory=64 * CHUNK, spill=0, per_file_memory=16 * CHUNK, timeout=1)
    d = Dirty(None, 0, budget, str(tmp_path))
    data = bytearray(random.Random(2).randbytes(20 * CHUNK + 5))
    _write_in_order(d, bytes(data), vault, head=2)
    s = d.streaming
    assert s is not None and s.streamed == 20
    # a chunk put already, changed (as ffmpeg's +faststart moves the whole file): not clean;
    # it is staged over the stream, and what was streamed still reads back
    blk = bytearray(CHUNK)
    assert s.obj.get_into(7, memoryview(blk)) == CHUNK and blk == data[7 * CHUNK : 8 * CHUNK]
    blk[100:110] = b"0123456789"
    d.store(7, blk)
    data[7 * CHUNK + 100 : 7 * CHUNK + 110] = b"0123456789"
    assert not s.clean
    d.stream_out()  # streams nothing more
    assert s.streamed == 20
    object_id, _h, size = write_object(vault, DirtyStream(d), durable=True)  # type: ignore[arg-type]
    assert size == len(data)
    temp = s.obj
    d.wipe()  # the stream given up: its temp file removed
    assert temp.fd == -1
    assert not [p for p in Path(vault.storage.root).rglob(".tmp-*")]
    assert vault.storage.exists(object_key(object_id))
    # a chunk is never encrypted twice under one key
    budget2 = StagingBudget(memory=64 * CHUNK, spill=0, per_file_memory=16 * CHUNK, timeout=1)
    d2 = Dirty(None, 0, budget2, str(tmp_path))
    _write_in_order(d2, bytes(10 * CHUNK), vault, head=2)
    assert d2.streaming is not None
    with pytest.raises(VaultError, match="twice"):
        d2.streaming.obj.put(3, bytes(CHUNK))
    # a truncation into (or to the end of) what was streamed: not clean either
    d2.truncate(d2.streaming.streamed * CHUNK)
    assert not d2.streaming.clean
    d2.wipe()


def test_a_spilled_block_stored_again_in_memory_leaves_no_stale_copy(tmp_path: Path) -> None:
    """Room in memory can come back (a commit, the stream tier dropping what it put): a block
    spilled before then lands in memory, and its sealed copy must go, or it would be read once
    the memory block is dropped."""
    budget = StagingBudget(memory=4 * CHUNK, spill=4 * SLOT, per_file_memory=CHUNK, timeout=1)
    d = Dirty(None, 0, budget, str(tmp_path))
    assert d.store(0, bytearray(b"a" * CHUNK))  # in memory: the file's share is full now
    assert d.store(1, bytearray(b"b" * 100))  # spilled
    assert d.spill is not None and 1 in d.spill.slots and budget.spill_used == SLOT
    d.truncate(CHUNK + 100)  # (nothing changes: the same size)
    d.store(0, bytearray(b"a" * 10))  # block 0 shrinks: room for block 1 in memory
    assert d.store(1, bytearray(b"c" * 1000))
    assert 1 in d.blocks and 1 not in d.spill.slots and budget.spill_used == 0
    d.wipe()
