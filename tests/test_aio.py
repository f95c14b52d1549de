"""The mount's low-level read machinery: O_DIRECT reads by native AIO (pqfs.mount.aio), the page-cache
check that starts no read (pqfs.storage.pagecache), and the worker pool's wake-ups (pqfs.mount.workers)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pqfs.errors import PqfsError
from pqfs.mount import aio
from pqfs.mount.options import MountOptions
from pqfs.mount.workers import WorkerPool
from pqfs.storage import pagecache
from pqfs.storage.local import FileSource

SLOT_BYTES = MountOptions.direct_slot_bytes  # the mount's bounds (the defaults)
SPARE_EVENTFDS = MountOptions.spare_eventfds


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * 65536 + 12345)  # not a multiple of the O_DIRECT alignment
    p = tmp_path / "data"
    p.write_bytes(data)
    drop_page_cache(p)
    return p, data


# ---------------------------------------------------------------- pagecache ----


def test_residency_tells_cached_from_not_cached_without_reading(
    data_file: tuple[Path, bytes],
) -> None:
    path, data = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        if not pagecache.checks():
            pytest.fail("cachestat(2) is expected on this kernel (Linux >= 6.5)")
        assert pagecache.residency(fd, 70000, 65536) is False
        assert pagecache.residency(fd, 70000, 65536) is False  # asking started no read
        os.pread(fd, 65536, 70000)
        assert pagecache.residency(fd, 70000, 65536) is True
        assert pagecache.residency(fd, 0, len(data)) is False  # only part of the file
    finally:
        os.close(fd)


def test_read_cached_never_starts_a_read_on_a_miss(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    src = FileSource(path)
    try:
        buf = memoryview(bytearray(65536))
        assert not src.read_cached(4096, buf)
        assert pagecache.residency(src.fd, 4096, 65536) is False  # still not cached
        src.preadinto(4096, buf)
        assert src.read_cached(4096, buf) and bytes(buf) == data[4096 : 4096 + 65536]
    finally:
        src.close()


# ---------------------------------------------------------------- aio ----


@contextlib.contextmanager
def direct(path: Path, depth: int) -> Iterator[tuple[FileSource, int, aio.DirectIO]]:
    """A file open with its O_DIRECT descriptor, and an AIO context of `depth` slots."""
    src = FileSource(path)
    dio = aio.DirectIO(depth, SLOT_BYTES)
    try:
        fd = src.direct_fd()
        assert fd is not None
        yield src, fd, dio
    finally:
        dio.close()
        src.close()


async def test_direct_reads_return_the_file_bytes(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with direct(path, 4) as (src, fd, dio):
        for off, n in [(0, 100), (1, 65552), (65536 + 7, 131104), (len(data) - 50, 50)]:
            req = dio.submit(fd, off, n)
            assert req is not None
            try:
                assert bytes(await req.result()) == data[off : off + n]
            finally:
                await req.release()
        req = dio.submit(fd, len(data) - 10, 100)  # past the end: what there is
        assert req is not None
        try:
            assert bytes(await req.result()) == data[-10:]
        finally:
            await req.release()
        # page cache untouched: the bytes came from the disk
        assert pagecache.residency(src.fd, 0, len(data)) is False


async def test_in_flight_reads_are_bounded_and_slots_reused(
    data_file: tuple[Path, bytes],
) -> None:
    path, data = data_file
    with direct(path, 2) as (_, fd, dio):
        a, b = dio.submit(fd, 0, 4096), dio.submit(fd, 8192, 4096)
        assert a is not None and b is not None
        assert dio.submit(fd, 0, 4096) is None  # both slots busy: the caller uses a worker
        assert dio.submit(fd, 0, SLOT_BYTES + 1) is None  # longer than a slot
        # released in the other order, each still gets its own bytes
        assert bytes(await b.result()) == data[8192:12288]
        await b.release()
        assert bytes(await a.result()) == data[:4096]
        await a.release()
        for _ in range(5):
            c = dio.submit(fd, 4096, 100)
            assert c is not None
            await c.release()  # released without asking for the result: waits for it first
        assert dio.submitted == 7


async def test_a_cancelled_reader_still_waits_for_the_disk(data_file: tuple[Path, bytes]) -> None:
    """The kernel writes into the slot's buffer until the read completes: a cancelled task must
    not hand the buffer back before that (release() waits, shielded), or the next read in the
    same slot would take the first one's completion and bytes for its own."""
    path, data = data_file
    got: list[bytes] = []
    with direct(path, 1) as (_, fd, dio):

        async def reader(offset: int) -> None:
            req = dio.submit(fd, offset, 65536)
            assert req is not None
            try:
                got.append(bytes(await req.result()))
            finally:
                await req.release()

        with trio.CancelScope() as scope:
            scope.cancel()
            await reader(0)
        assert got == []  # the wait for the result was cancelled
        assert scope.cancelled_caught
        await reader(65536)  # the one slot again
        assert got == [data[65536:131072]]
        assert not dio._results


def test_a_local_file_has_one_direct_descriptor_closed_with_it(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10)
    src = FileSource(p)
    fd = src.direct_fd()
    assert fd is not None and src.direct_fd() == fd  # opened once
    src.close()
    with pytest.raises(OSError):
        os.fstat(fd)


# ---------------------------------------------------------------- workers ----


async def test_worker_pool_results_errors_and_eventfd_reuse() -> None:
    pool = WorkerPool(2, "t", spare_eventfds=SPARE_EVENTFDS)
    try:
        assert await pool.run(lambda: 6 * 7) == 42
        with pytest.raises(PqfsError, match="boom"):
            await pool.run(_boom)
        results: list[int] = []
        async with trio.open_nursery() as nursery:
            for k in range(SPARE_EVENTFDS + 20):  # more at once than are kept for reuse
                nursery.start_soon(_collect, pool, k, results)
        assert sorted(results) == list(range(SPARE_EVENTFDS + 20))
        assert len(pool._eventfds) <= SPARE_EVENTFDS
    finally:
        pool.close()
    assert pool._eventfds == []
    with pytest.raises(PqfsError):
        await pool.run(lambda: 1)


def _boom() -> None:
    raise PqfsError("boom")


async def test_worker_pool_is_idle_only_once_its_after_job_is_done() -> None:
    """`idle` (the idle poll's rule) is false while a job is waited on and while a worker still
    runs the job's after_job: the loop must not take the GIL from either."""
    release = threading.Event()
    started = threading.Event()

    def after_job() -> None:
        started.set()
        release.wait(10)

    pool = WorkerPool(1, "t", after_job=after_job, spare_eventfds=SPARE_EVENTFDS)
    try:
        assert pool.idle
        assert await pool.run(lambda: 5) == 5
        await trio.to_thread.run_sync(started.wait, 10)
        assert pool.pending == 0 and not pool.idle  # the worker is in after_job
        release.set()
        with trio.fail_after(10):
            while not pool.idle:
                await trio.sleep(0.001)
    finally:
        release.set()
        pool.close()


def _slow(k: int) -> int:
    time.sleep(0.001)
    return k


async def _collect(pool: WorkerPool, k: int, out: list[int]) -> None:
    out.append(await pool.run(functools.partial(_slow, k)))


async def test_a_started_job_runs_to_completion_when_its_task_is_cancelled() -> None:
    pool = WorkerPool(1, "t", spare_eventfds=SPARE_EVENTFDS)
    gate, finished = threading.Event(), threading.Event()

    def job() -> int:
        gate.wait(10)
        finished.set()
        return 1

    try:
        with trio.move_on_after(0.05) as scope:
            threading.Timer(0.3, gate.set).start()
            assert await pool.run(job) == 1  # the wait is not cut short by the timeout
        assert finished.is_set() and scope.cancelled_caught is False
    finally:
        pool.close()
