"""Staging (pqfs/mount/staging.py) on its own: the spill file seals every block (no plaintext,
a fresh nonce per write, a block moved to another slot or rolled back fails), and the budgets
come back to zero whatever was stored, cut or wiped."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pqfs.errors import PayloadError
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
