"""The mount's core (pqfs.mount.vfs and its parts) driven directly under trio: no FUSE."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from pqfs.errors import (
    IsADirectory,
    Locked,
    NotADirectory,
    NotFound,
    PayloadError,
    PqfsError,
    ReadOnly,
)
from pqfs.format.stream import CHUNK, CT_CHUNK
from pqfs.mount.options import MountOptions
from pqfs.mount.tree import ROOT_INO
from pqfs.mount.vfs import VaultFS
from pqfs.storage import pagecache
from pqfs.vault import bounds as bounds_mod
from pqfs.vault.catalog import put_op
from pqfs.vault.objects import object_key
from pqfs.vault.vault import Vault

from .conftest import PASSPHRASE

FILES = {
    "a/one.bin": 300 * 1024 + 17,
    "a/b/two.bin": 2 * CHUNK,
    "empty.txt": 0,
    "three.bin": 1,
    "big.bin": 4 * 1024 * 1024 + 5,
}


def _add(vault: Vault, tmp: Path, name: str, data: bytes) -> None:
    src = tmp / "src" / name.replace("/", "_")
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(data)
    vault.commit([put_op(vault.add_file(str(src), name))])


@pytest.fixture
def contents(vault: Vault, tmp_path: Path) -> dict[str, bytes]:
    rng = random.Random(7)
    out = {}
    for name, size in FILES.items():
        out[name] = rng.randbytes(size)
        _add(vault, tmp_path, name, out[name])
    return out


@asynccontextmanager
async def running(vault: Vault, **opts: object) -> AsyncIterator[VaultFS]:
    fs = VaultFS(vault, MountOptions.for_storage(vault.storage, **opts))
    try:
        async with trio.open_nursery() as nursery:
            await fs.start(nursery)
            yield fs
            nursery.cancel_scope.cancel()
    finally:
        fs.close()
        gc.unfreeze()  # the daemon freezes for its whole life; this test process goes on


def ino_of(fs: VaultFS, path: str) -> int:
    ino = ROOT_INO
    for part in path.split("/"):
        ino = fs.lookup(ino, part).ino
    return ino


async def test_tree_lookup_readdir_getattr(vault: Vault, contents: dict[str, bytes]) -> None:
    async with running(vault) as fs:
        assert [n for n, _, _ in fs.readdir(ROOT_INO, 0)] == [
            "a",
            "big.bin",
            "empty.txt",
            "three.bin",
        ]
        a = fs.lookup(ROOT_INO, "a")
        assert a.mode & 0o170000 == 0o040000
        assert [n for n, _, _ in fs.readdir(a.ino, 0)] == ["b", "one.bin"]
        assert [n for n, _, _ in fs.readdir(a.ino, 1)] == ["one.bin"]  # offsets resume listings
        for path, data in contents.items():
            attr = fs.getattr(ino_of(fs, path))
            assert attr.size == len(data)
            assert attr.mtime_ns == vault.entry(path).mtime_ns
        with pytest.raises(NotFound):
            fs.lookup(ROOT_INO, "missing")
        with pytest.raises(NotADirectory):
            fs.lookup(ino_of(fs, "three.bin"), "x")
        with pytest.raises(IsADirectory):
            await fs.open(a.ino, os.O_RDONLY)


async def test_a_read_only_mount_refuses_every_change(
    vault: Vault, contents: dict[str, bytes]
) -> None:
    async with running(vault, read_only=True) as fs:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(ReadOnly):
                await fs.open(ino_of(fs, "three.bin"), flags)
        with pytest.raises(ReadOnly):
            fs.mkdir(ROOT_INO, "d", 0o755)
        with pytest.raises(ReadOnly):
            fs.unlink(ROOT_INO, "three.bin")
        assert fs.getattr(ino_of(fs, "three.bin")).size == len(contents["three.bin"])


async def test_reads_match_at_any_offset(vault: Vault, contents: dict[str, bytes]) -> None:
    rng = random.Random(1)
    async with running(vault) as fs:
        for path, data in contents.items():
            fh = await fs.open(ino_of(fs, path), os.O_RDONLY)
            cases = [(0, len(data) + 10), (len(data), 10), (len(data) + 5, 1)]
            cases += [(rng.randrange(len(data) + 1), rng.randrange(1, 300_000)) for _ in range(40)]
            for off, size in cases:
                got = bytes(await fs.read(fh, off, size))
                assert got == data[off : off + size], (path, off, size)
            fs.release(fh)


async def test_concurrent_readers_get_their_own_bytes(
    vault: Vault, contents: dict[str, bytes]
) -> None:
    data = contents["big.bin"]
    async with running(vault, cache_size=4 << 20) as fs:  # small cache: eviction under readers
        results: dict[tuple[int, int], bytes] = {}

        async def reader(k: int) -> None:
            fh = await fs.open(ino_of(fs, "big.bin"), os.O_RDONLY)
            rng = random.Random(k)
            for _ in range(30):
                off, size = rng.randrange(len(data)), rng.choice([4096, 65536, 131072, 1 << 20])
                results[(k, off)] = bytes(await fs.read(fh, off, size))
                assert results[(k, off)] == data[off : off + size]
            fs.release(fh)

        async with trio.open_nursery() as n:
            for k in range(8):
                n.start_soon(reader, k)
        assert len(results) > 200
        assert len(fs.cache.buffers()) <= fs.cache.capacity


async def test_sequential_reader_is_prefetched(vault: Vault, contents: dict[str, bytes]) -> None:
    data = contents["big.bin"]
    async with running(vault) as fs:
        fh = await fs.open(ino_of(fs, "big.bin"), os.O_RDONLY)
        got = bytearray()
        for off in range(0, len(data), 128 * 1024):
            got += await fs.read(fh, off, 128 * 1024)
            await trio.sleep(0.001)  # a player consumes at its own pace
        assert got == data
        s = fs.stats()
        assert s["prefetch_chunks"] > 0 and s["prefetch_hits"] > 0
        assert s["reads_waited"] < s["reads"] // 2  # most reads were served from readahead
        assert s["bytes_decrypted"] >= len(data)


async def test_lock_wipes_keys_and_chunks_then_unlock(
    vault: Vault, contents: dict[str, bytes]
) -> None:
    async with running(vault) as fs:
        ino = ino_of(fs, "a/one.bin")
        fh = await fs.open(ino, os.O_RDONLY)
        assert bytes(await fs.read(fh, 0, 1000)) == contents["a/one.bin"][:1000]
        key = fs.keys.entries()[0]
        key_bytes = key.file_key
        chunk_bufs = fs.cache.buffers()
        identities = list(vault._identities)
        assert any(any(b) for b in chunk_bufs) and any(key_bytes)

        fs.lock()
        assert fs.keys.entries() == [] and len(fs.keys) == 0
        assert fs.cache.buffers() == [] and len(fs.cache) == 0
        assert key_bytes == bytearray(16) and key.aead is None
        assert all(b == bytearray(len(b)) for b in chunk_bufs)
        secrets = [getattr(i, "_seed", None) or i._secret for i in identities]
        assert secrets and all(s == bytearray(len(s)) for s in secrets)  # identities wiped too
        with pytest.raises(Locked):
            await fs.read(fh, 0, 10)
        with pytest.raises(Locked):
            await fs.open(ino, os.O_RDONLY)
        with pytest.raises(Locked):
            fs.lookup(ROOT_INO, "a")
        with pytest.raises(Locked):
            fs.readdir(ROOT_INO, 0)
        assert fs.getattr(ROOT_INO).ino == ROOT_INO  # the mountpoint itself still answers stat

        await fs.unlock(passphrase=PASSPHRASE)
        assert bytes(await fs.read(fh, 5, 100)) == contents["a/one.bin"][5:105]
        assert fs.lookup(ROOT_INO, "a").ino == fs.lookup(ROOT_INO, "a").ino


async def test_key_ttl_expiry_wipes_key_bytes(vault: Vault, contents: dict[str, bytes]) -> None:
    async with running(vault, key_ttl=0.2) as fs:
        fh = await fs.open(ino_of(fs, "three.bin"), os.O_RDONLY)
        assert bytes(await fs.read(fh, 0, 1)) == contents["three.bin"]
        (entry,) = fs.keys.entries()
        key_bytes = entry.file_key
        assert any(key_bytes)
        await trio.sleep(0.6)  # the sweeper runs every ttl/2
        assert len(fs.keys) == 0
        assert key_bytes == bytearray(16) and entry.aead is None
        misses = fs.keys.misses
        assert bytes(await fs.read(fh, 0, 1)) == contents["three.bin"]  # unwrapped again
        assert fs.keys.misses > misses and len(fs.keys) == 1


async def test_key_ttl_zero_keeps_key_only_while_open(
    vault: Vault, contents: dict[str, bytes]
) -> None:
    async with running(vault, key_ttl=0) as fs:
        fh = await fs.open(ino_of(fs, "a/b/two.bin"), os.O_RDONLY)
        assert (
            bytes(await fs.read(fh, CHUNK - 3, 6)) == contents["a/b/two.bin"][CHUNK - 3 : CHUNK + 3]
        )
        assert len(fs.keys) == 0
        own = fs.reader.file(fh).own_key
        assert own is not None and any(own.file_key)
        key_bytes = own.file_key
        fs.release(fh)
        assert key_bytes == bytearray(16)


@pytest.mark.parametrize("path", ["worker", "inline", "direct"])
async def test_tampered_chunk_fails_only_that_read(
    vault: Vault, contents: dict[str, bytes], caplog: pytest.LogCaptureFixture, path: str
) -> None:
    e = vault.entry("big.bin")
    obj = Path(vault.storage.describe()) / object_key(e.object)
    raw = bytearray(obj.read_bytes())
    raw[e.hlen + 16 + 2 * CT_CHUNK + 100] ^= 0x01  # one bit of chunk 2
    obj.write_bytes(raw)
    data = contents["big.bin"]
    opts = {"worker": {"inline_chunks": 0}, "inline": {}, "direct": {}}[path]
    async with running(vault, **opts) as fs:
        fh = await fs.open(ino_of(fs, "big.bin"), os.O_RDONLY)
        # just written, so in the page cache (inline, or a worker), unless dropped (direct)
        _page_cache(vault, "big.bin", keep=path != "direct")
        with pytest.raises(PayloadError):
            await fs.read(fh, 2 * CHUNK + 10, 100)
        s = fs.stats()
        assert (s["reads_waited"], s["reads_inline"], s["reads_direct"]) == {
            "worker": (1, 0, 0),
            "inline": (0, 1, 0),
            "direct": (1, 0, 1),
        }[path]
        with pytest.raises(PayloadError):
            await fs.read(fh, CHUNK, 3 * CHUNK)  # any read that covers chunk 2
        assert bytes(await fs.read(fh, 0, 2 * CHUNK)) == data[: 2 * CHUNK]
        assert bytes(await fs.read(fh, 3 * CHUNK, CHUNK)) == data[3 * CHUNK : 4 * CHUNK]
        other = await fs.open(ino_of(fs, "a/one.bin"), os.O_RDONLY)
        assert bytes(await fs.read(other, 0, 100)) == contents["a/one.bin"][:100]
        assert fs.stats()["auth_failures"] == 2
        assert ("big.bin: chunk 2 failed authentication") in caplog.text
        assert ("big.bin", 2) not in fs.cache  # nothing unauthenticated was cached


def _object_path(vault: Vault, path: str) -> Path:
    return Path(vault.storage.describe()) / object_key(vault.entry(path).object)


def _page_cache(vault: Vault, path: str, keep: bool) -> None:
    """Load a file's object into the page cache, or drop it from there."""
    fd = os.open(_object_path(vault, path), os.O_RDONLY)
    try:
        if keep:
            while os.read(fd, 1 << 20):
                pass
        else:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct_reads", [16, 0], ids=["direct", "no-direct"])
async def test_small_reads_decrypt_inline_only_from_memory(
    vault: Vault, contents: dict[str, bytes], direct_reads: int
) -> None:
    """A read missing at most `inline_chunks` chunks whose ciphertext is in the page cache is
    decrypted on the loop. One whose ciphertext is on disk only is read with O_DIRECT, from the
    loop without waiting on it, then decrypted there; or, without direct reads, by a worker.
    Bigger reads always go to workers."""
    data = contents["big.bin"]
    oid = vault.entry("big.bin").object
    async with running(vault, direct_reads=direct_reads) as fs:
        fh = await fs.open(ino_of(fs, "big.bin"), os.O_RDONLY)
        _page_cache(vault, "big.bin", keep=False)
        off = 5 * CHUNK + 100  # two chunks, on disk only
        assert bytes(await fs.read(fh, off, CHUNK)) == data[off : off + CHUNK]
        s = fs.stats()
        assert (s["reads_inline"], s["reads_waited"]) == (0, 1)
        assert s["reads_direct"] == (1 if direct_reads else 0)
        assert (oid, 5) in fs.cache and (oid, 6) in fs.cache
        ct_start = vault.entry("big.bin").hlen + 16 + 5 * CT_CHUNK
        fd = os.open(_object_path(vault, "big.bin"), os.O_RDONLY)
        try:  # a direct read leaves the page cache alone; a worker's read goes through it
            assert pagecache.residency(fd, ct_start, 2 * CT_CHUNK) is (direct_reads == 0)
        finally:
            os.close(fd)

        _page_cache(vault, "big.bin", keep=True)
        for k, off in enumerate([20 * CHUNK + 7, 30 * CHUNK, 40 * CHUNK - 1]):
            assert bytes(await fs.read(fh, off, CHUNK)) == data[off : off + CHUNK]
            assert fs.stats()["reads_inline"] == k + 1
        assert fs.stats()["reads_waited"] == 1
        assert (oid, 20) in fs.cache and (oid, 21) in fs.cache  # cached as well

        _page_cache(vault, "big.bin", keep=False)
        off = 50 * CHUNK + 1  # three chunks: more than inline_chunks, so a worker's
        assert bytes(await fs.read(fh, off, 2 * CHUNK)) == data[off : off + 2 * CHUNK]
        s = fs.stats()
        assert s["reads_waited"] == 2 and s["reads_direct"] == (1 if direct_reads else 0)


async def test_refresh_sees_files_added_while_mounted(
    vault: Vault, contents: dict[str, bytes], tmp_path: Path
) -> None:
    async with running(vault) as fs:
        with pytest.raises(NotFound):
            fs.lookup(ROOT_INO, "new.bin")
        assert not await fs.refresh()
        _add(vault, tmp_path, "new.bin", b"fresh")
        assert await fs.refresh()
        fh = await fs.open(ino_of(fs, "new.bin"), os.O_RDONLY)
        assert bytes(await fs.read(fh, 0, 100)) == b"fresh"


async def test_long_lived_objects_are_out_of_the_collectors_reach(
    vault: Vault, contents: dict[str, bytes], tmp_path: Path
) -> None:
    """A full collection stops every thread, the loop's too: the tree (and on S3 the client)
    are frozen after they are built, so collections only walk short-lived objects."""

    def tracked(obj: object) -> bool:
        return any(o is obj for o in gc.get_objects())

    async with running(vault) as fs:
        assert fs.tree is not None and not tracked(fs.tree)
        assert not tracked(next(iter(fs.tree.nodes.values())))
        _add(vault, tmp_path, "new.bin", b"new")
        assert await fs.refresh()
        assert not tracked(fs.tree)  # a reloaded tree too
        before = fs.stats()["gc_collections"]
        gc.collect()
        s = fs.stats()
        assert s["gc_collections"] == before + 1
        assert isinstance(s["gc_pause_max_ms"], float) and s["gc_pause_max_ms"] > 0
        assert gc.isenabled()  # after every load the collector runs again


async def test_a_catalog_load_runs_no_collection(vault: Vault, tmp_path: Path) -> None:
    """Loading a catalog and building its tree allocates many objects at once; a collection
    then would stop the loop (every thread) walking what the freeze takes out of reach."""
    ops = []
    for i in range(3000):
        src = tmp_path / f"f{i}"
        src.write_bytes(b"x")
        ops.append(put_op(vault.add_file(str(src), f"d{i % 50}/f{i}")))
    vault.commit(ops)
    gc.collect()
    async with running(vault) as fs:
        assert fs.stats()["gc_collections"] == 0  # the load ran none
        _add(vault, tmp_path, "one more", b"1")
        assert await fs.refresh()
        assert fs.stats()["gc_collections"] == 0  # nor a refresh
        assert gc.isenabled()


async def test_idle_poll_rule_and_descriptors(vault: Vault, contents: dict[str, bytes]) -> None:
    """The idle poll (idlepoll.py) may run only while nothing it cannot see is outstanding:
    no offloaded thread (open, catalog load), no worker job. It watches the FUSE device and the
    direct reads in flight, and a read, or a direct read's submission, arms it."""
    token = trio.lowlevel.current_trio_token()
    async with running(vault) as fs:
        assert fs.may_poll()
        seen: list[bool] = []

        def probe() -> int:
            seen.append(trio.from_thread.run_sync(fs.may_poll, trio_token=token))
            return 7

        assert await fs.offload(probe) == 7
        assert await fs.pool.run(probe) == 7
        assert seen == [False, False]
        with trio.fail_after(10):  # the worker finishes its after_job, then counts itself idle
            while not fs.may_poll():
                await trio.sleep(0.001)

        fs.fuse_fds = [123]
        assert fs.idle_fds() == [123]
        fh = await fs.open(ino_of(fs, "big.bin"), os.O_RDONLY)
        _page_cache(vault, "big.bin", keep=False)
        assert fs.sources.dio is not None
        f = fs.reader.file(fh)
        req = fs.sources.direct(f, 3, 2)
        assert req is not None
        try:
            assert fs.idle_fds() == [123, req._slot.efd]
            assert fs.idle._until > 0  # armed by the submission
        finally:
            await req.release()
        assert fs.idle_fds() == [123]
        data = contents["big.bin"]
        off, far = 9 * CHUNK, 60 * CHUNK
        assert bytes(await fs.read(fh, off, 100)) == data[off : off + 100]
        assert bytes(await fs.read(fh, far, 100)) == data[far : far + 100]  # a seek away
        fs.idle._until = 0.0
        assert bytes(await fs.read(fh, off + 5, 100)) == data[off + 5 : off + 105]  # and back
        assert fs.stats()["cache_hits"] >= 1
        assert fs.idle._until > 0  # armed by the answer alone (a cache hit: nothing submitted)


async def test_streams_do_not_arm_the_idle_poll(vault: Vault, contents: dict[str, bytes]) -> None:
    """A file read sequentially is the kernel's readahead, which no one waits on: its answers do
    not arm the idle poll (it would take CPU from the reader). A seek's answer does."""
    data = contents["big.bin"]
    async with running(vault) as fs:
        fh = await fs.open(ino_of(fs, "big.bin"), os.O_RDONLY)
        for k in range(4):
            fs.idle._until = 0.0
            off = k * 2 * CHUNK
            assert bytes(await fs.read(fh, off, 2 * CHUNK)) == data[off : off + 2 * CHUNK]
        assert fs.idle._until == 0.0  # streaming by now
        off = 40 * CHUNK + 5
        assert bytes(await fs.read(fh, off, 1000)) == data[off : off + 1000]
        assert fs.idle._until > 0


async def test_spare_buffers_are_ready_before_the_first_read(
    vault: Vault, contents: dict[str, bytes]
) -> None:
    """A mount faults in its spare reply and cache buffers before it serves, and again after an
    unlock (lock drops them): the first read that waits never faults in a 1 MiB buffer on the
    loop."""
    async with running(vault) as fs:
        spares = fs.options.reply_spares
        assert len(fs.replies.free()) == spares and len(fs.cache._free) == fs.options.cache_spares
        fs.lock()
        assert fs.replies.free() == []
        await fs.unlock(passphrase=PASSPHRASE)
        assert len(fs.replies.free()) == spares
        fh = await fs.open(ino_of(fs, "big.bin"), os.O_RDONLY)
        spare = fs.replies.free()[-1]
        data = contents["big.bin"]
        assert bytes(await fs.read(fh, 0, 10 * CHUNK)) == data[: 10 * CHUNK]  # waits on workers
        assert any(b is spare for b in fs.replies.sent())  # the read used a spare, made no buffer


async def test_every_bound_is_an_option_the_parts_get_and_stats_show(
    vault: Vault, contents: dict[str, bytes]
) -> None:
    """The mount's bounds are MountOptions fields (none a module constant of a part): each
    part runs with the value given, and `pqfs stats --json` shows every one of them."""
    given = {
        "reply_spares": 3,
        "cache_spares": 5,
        "key_cache_entries": 2,
        "spare_eventfds": 1,
        "direct_slot_bytes": 512 << 10,
        "hint_chunks": 7,
        "unavailable_hold": 0.5,
        "open_timeouts": 3.0,
    }
    async with running(vault, **given) as fs:
        bounds = json.loads(json.dumps(fs.stats()))["bounds"]  # as the xattr carries them
        assert bounds == fs.options.bounds()
        assert {k: bounds[k] for k in given} == given
        for name in ("cache_size", "workers", "job_chunks", "reply_pool", "max_background"):
            assert bounds[name] == getattr(fs.options, name)
        assert "direct_io" not in bounds and "on_change" not in bounds  # settings, not bounds
        assert bounds["prefetch_inflight"] == fs.options.prefetch_inflight
        vault_bounds = json.loads(json.dumps(fs.stats()))["vault_bounds"]
        assert vault_bounds == dataclasses.asdict(bounds_mod.BOUNDS)  # every field a number
        assert len(fs.replies.free()) == 3 and len(fs.cache._free) == 5
        assert fs.keys.max_entries == 2
        assert fs.sources.dio is not None and fs.sources.dio.slot_bytes == 512 << 10
        for path in ("a/one.bin", "three.bin", "big.bin"):  # more files than keys kept
            fh = await fs.open(ino_of(fs, path), os.O_RDONLY)
            assert bytes(await fs.read(fh, 0, 100)) == contents[path][:100]
            fs.release(fh)
        assert len(fs.keys) == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cache_size": (4 << 20) - 1}, "--cache-size must be at least 4M"),
        ({"workers": 0}, "mount option workers must be at least 1: 0"),
        ({"key_cache_entries": 0}, "mount option key_cache_entries must be at least 1: 0"),
        ({"reply_pool": -1}, "mount option reply_pool must be at least 0: -1"),
        ({"control_timeout": 0.0}, "mount option control_timeout must be more than 0"),
    ],
)
def test_bounds_are_checked_when_the_options_are_made(
    settings: dict[str, object], message: str
) -> None:
    storage_bounds = {"workers": 2, "jobs_per_file": 2, "job_chunks": 32}  # from a profile
    MountOptions(**storage_bounds)  # type: ignore[arg-type]
    with pytest.raises(PqfsError) as e:
        MountOptions(**{**storage_bounds, **settings})  # type: ignore[arg-type]
    assert str(e.value) == message


async def test_readahead_follows_a_seeking_reader(tmp_path: Path, vault: Vault) -> None:
    """A player seeks, reads a little, seeks again: what readahead decrypts stays near what
    is read (the window after a jump is about the read, and grows only as it is used), the
    bytes are right, and prefetch scheduled before a jump is dropped, no buffer kept."""
    rng = random.Random(11)
    data = rng.randbytes(48 * 1024 * 1024)
    _add(vault, tmp_path, "film.mkv", data)
    async with running(vault) as fs:
        fh = await fs.open(ino_of(fs, "film.mkv"), os.O_RDONLY)
        for _ in range(25):  # a seek, then a few frames' worth of sequential 128 KiB reads
            off = rng.randrange(0, len(data) - (4 << 20)) // CHUNK * CHUNK
            for k in range(rng.randrange(2, 10)):
                at = off + k * 128 * 1024
                assert bytes(await fs.read(fh, at, 128 * 1024)) == data[at : at + 128 * 1024]
                await trio.sleep(0.002)  # decoding the frames
        await trio.sleep(0.2)  # let whatever prefetch is still queued run or be dropped
        s = fs.stats()
        assert s["decrypted_per_byte_read"] <= 1.5, s
        fs.release(fh)
        # Released: every buffer is the cache's (none held by a dropped job), and within it.
        assert len(fs.cache.buffers()) <= fs.cache.capacity
        assert fs.reader.prefetching == 0 and not fs.reader.inflight
