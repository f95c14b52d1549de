"""Open-ahead (pqfs.mount.openahead): a directory scanned file after file is opened ahead of the
scanner, and what is opened ahead is handed out only when it is still right. The mount's core
driven under trio, no FUSE."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from pqfs.errors import Locked, Unreadable
from pqfs.mount.vfs import VaultFS
from pqfs.vault.catalog import del_op, put_op
from pqfs.vault.keycache import KeyCache
from pqfs.vault.objects import object_key
from pqfs.vault.vault import Vault

from .conftest import PASSPHRASE
from .test_vfs import ino_of, running

FILES = 40
# A scan on a loaded machine must not see its parked files expire under it.
OPTS = {"open_ahead_ttl": 600.0}


def _library(vault: Vault, tmp: Path, n: int = FILES, where: str = "lib") -> dict[str, bytes]:
    rng = random.Random(3)
    out: dict[str, bytes] = {}
    ops = []
    for i in range(n):
        name = f"{where}/{i:03d}.nfo"
        data = rng.randbytes(rng.randrange(1, 100_000))
        src = tmp / "src" / name.replace("/", "_")
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(data)
        ops.append(put_op(vault.add_file(str(src), name)))
        out[name] = data
    vault.commit(ops)
    return out


async def _scan_one(fs: VaultFS, path: str, data: bytes) -> None:
    """What a tag scanner does: open, head, tail, close; the bytes checked."""
    fh = await fs.open(ino_of(fs, path), os.O_RDONLY)
    try:
        assert bytes(await fs.read(fh, 0, 4096)) == data[:4096]
        tail = max(0, len(data) - 4096)
        assert bytes(await fs.read(fh, tail, 4096)) == data[tail:]
    finally:
        fs.release(fh)


async def _settle(fs: VaultFS) -> None:
    """Until no batch is on a thread."""
    ahead, tree = fs.reader.ahead, fs.tree
    assert tree is not None
    while ahead.pending:
        await ahead.wait(tree.node(next(iter(ahead.pending))), 60.0)


async def test_a_scanned_directory_is_opened_ahead(vault: Vault, tmp_path: Path) -> None:
    files = _library(vault, tmp_path)
    async with running(vault, **OPTS) as fs:
        for path in sorted(files):
            await _scan_one(fs, path, files[path])
        s = fs.stats()
        # The first two opens of the directory are the reader's own; each later one finds its
        # file opened ahead (parked, or waited for while its batch was on a thread).
        assert s["opens"] == FILES
        assert s["opened_ahead_used"] == FILES - 2
        assert s["opened_ahead_wasted"] == 0
        assert fs.reader.ahead.parked == {} and fs.reader.ahead.pending == {}
        assert fs.reader.files == {}


async def test_one_file_opened_is_not_a_scan(vault: Vault, tmp_path: Path) -> None:
    files = _library(vault, tmp_path, n=10)
    async with running(vault, **OPTS) as fs:
        await _scan_one(fs, "lib/004.nfo", files["lib/004.nfo"])
        assert fs.stats()["opened_ahead"] == 0 and fs.reader.ahead.pending == {}
    vault.unlock(PASSPHRASE)  # the unmount locked it
    async with running(vault, key_ttl=0, **OPTS) as fs:  # a key only while its file is open
        for path in sorted(files):
            await _scan_one(fs, path, files[path])
        assert fs.stats()["opened_ahead"] == 0


async def test_a_parked_file_replaced_meanwhile_is_not_served(vault: Vault, tmp_path: Path) -> None:
    files = _library(vault, tmp_path, n=6)
    async with running(vault, **OPTS) as fs:
        await _scan_one(fs, "lib/000.nfo", files["lib/000.nfo"])
        await _scan_one(fs, "lib/001.nfo", files["lib/001.nfo"])  # files 2-5 opened ahead
        ahead = fs.reader.ahead
        await _settle(fs)
        assert len(ahead.parked) == 4
        new = b"replaced " * 1000
        src = tmp_path / "new.nfo"
        src.write_bytes(new)
        vault.commit([put_op(vault.add_file(str(src), "lib/003.nfo"))])
        assert await fs.refresh() == ["lib/003.nfo"]
        await _scan_one(fs, "lib/003.nfo", new)  # the new object, not the parked old one
        await _scan_one(fs, "lib/002.nfo", files["lib/002.nfo"])
        s = fs.stats()
        assert s["opened_ahead_used"] >= 1
        # The old lib/003.nfo, parked under its old inode, is never handed out: closed once its
        # time is up or the bound pushes it out, at the latest at lock or unmount.
        fs.lock()
        assert ahead.parked == {}


async def test_lock_closes_parked_files_and_wipes_their_keys(vault: Vault, tmp_path: Path) -> None:
    files = _library(vault, tmp_path, n=12)
    async with running(vault, **OPTS) as fs:
        await _scan_one(fs, "lib/000.nfo", files["lib/000.nfo"])
        await _scan_one(fs, "lib/001.nfo", files["lib/001.nfo"])
        ahead = fs.reader.ahead
        await _settle(fs)
        parked = [f for f, _, _ in ahead.parked.values()]
        assert len(parked) == fs.options.open_ahead_batch  # one batch on the one thread
        keys = [e.file_key for e in fs.keys.entries()]
        assert keys and all(any(k) for k in keys)
        fs.lock()
        assert ahead.parked == {}
        assert all(f.src.fd == -1 for f in parked)  # type: ignore[attr-defined]
        assert all(k == bytearray(len(k)) for k in keys)
        with pytest.raises(Locked):
            await fs.open(ino_of(fs, "lib/005.nfo"), os.O_RDONLY)
        await fs.unlock(passphrase=PASSPHRASE)
        for path in sorted(files)[2:]:  # opened again, and right, after the unlock
            await _scan_one(fs, path, files[path])


async def test_a_damaged_file_opened_ahead_still_fails_its_own_open(
    vault: Vault, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _library(vault, tmp_path, n=8)
    e = vault.entry("lib/005.nfo")
    obj = Path(vault.storage.describe()) / object_key(e.object)
    raw = bytearray(obj.read_bytes())
    raw[-5] ^= 0x01  # the final chunk's tag
    obj.write_bytes(raw)
    async with running(vault, **OPTS) as fs:
        for path in sorted(files):
            if path == "lib/005.nfo":
                with pytest.raises(Unreadable):
                    await fs.open(ino_of(fs, path), os.O_RDONLY)
            else:
                await _scan_one(fs, path, files[path])
        assert "lib/005.nfo: cannot open (EIO)" in caplog.text
        assert fs.stats()["auth_failures"] == 1
        assert fs.stats()["opened_ahead_used"] == 5  # 2-4 and 6-7


async def test_parked_files_are_bounded_in_number_and_time(vault: Vault, tmp_path: Path) -> None:
    files = _library(vault, tmp_path, n=30)
    async with running(vault, open_ahead=8, open_ahead_parked=8, open_ahead_ttl=0.05) as fs:
        ahead = fs.reader.ahead
        for path in sorted(files)[:3]:
            await _scan_one(fs, path, files[path])
            assert len(ahead.parked) + len(ahead.pending) <= 8
        await _settle(fs)
        assert 0 < len(ahead.parked) <= 8
        await trio.sleep(0.1)
        assert fs.tree is not None
        ahead.note_open(fs.tree, fs.tree.node(ino_of(fs, "lib/029.nfo")))  # sweeps
        assert ahead.parked == {}
        assert fs.stats()["opened_ahead_wasted"] > 0


async def test_a_node_of_a_tree_replaced_meanwhile_is_left_alone(
    vault: Vault, tmp_path: Path
) -> None:
    """A refresh during an open can remove the opened file's directory: following that
    directory then is skipped, never an error that would fail (and leak) the open."""
    files = _library(vault, tmp_path, n=3, where="gone")
    async with running(vault, **OPTS) as fs:
        assert fs.tree is not None
        node = fs.tree.node(ino_of(fs, "gone/001.nfo"))
        vault.commit([del_op("gone")])
        assert await fs.refresh()
        assert fs.tree.parent(node) is None
        fs.reader.ahead.note_open(fs.tree, node)  # nothing scheduled, nothing raised
        assert fs.reader.ahead.pending == {}
        assert files  # (the library was there before)


def test_a_key_unwrapped_across_a_clear_is_not_kept() -> None:
    """An unwrap that a lock overtook: its key is not stored, and comes back wiped."""
    cache = KeyCache()
    epoch = cache.epoch
    cache.clear()  # the lock
    fk = bytearray(b"k" * 16)
    entry = cache.put(("obj", "mac"), fk, aead=object(), epoch=epoch)
    assert len(cache) == 0 and entry.file_key == bytearray(16) and entry.aead is None
    assert cache.put(("obj", "mac"), fk, aead=object(), epoch=cache.epoch).aead is not None
    assert len(cache) == 1
