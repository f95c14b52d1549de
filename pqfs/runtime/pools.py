"""Bounded worker pipeline for bulk encryption/decryption outside the FUSE mount.

Bounds live here, in one place: WORKERS threads, DEPTH jobs in flight, BATCH chunks per job.
A job is sized so that the thread hop (~70 us) is small against its crypto work (~0.4 ms for
2 MiB at ~4.7 GB/s); pyca/cryptography releases the GIL for AEAD calls, so jobs really run in
parallel. Results come back in submission order.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from pqfs.runtime.memory import wipe

T = TypeVar("T")

WORKERS = max(2, min(8, os.cpu_count() or 2))
DEPTH = WORKERS * 2
BATCH = 32  # chunks per job: 2 MiB of plaintext

_executor: DaemonExecutor | None = None
_lock = threading.Lock()

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonExecutor(Executor):
    """A fixed set of daemon threads running submitted calls.

    Not ThreadPoolExecutor: its threads are joined at interpreter exit, and a thread it starts
    just as Ctrl-C arrives (after start(), before it is registered for the exit) is never told
    to stop, so an interrupted `pqfs add` hung at exit (reproduced, 1 run in ~6 under load).
    Daemon threads cannot hold up the exit; callers wait for the work they care about
    (`ordered` and the uploads wait for their jobs in flight before returning)."""

    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(threads)
        ]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("the executor is shut down")
        f: Future[T] = Future()
        self._queue.put((f, fn, args, kwargs))
        return f

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            f, fn, args, kwargs = item
            if not f.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:
                f.set_exception(e)
            else:
                f.set_result(result)
            del item, f, fn, args, kwargs  # no reference to the last job's data while idle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._queue.get_nowait()
                    if item is not None:
                        item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()


def executor() -> DaemonExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = DaemonExecutor(WORKERS, "pqfs-crypto")
        return _executor


def ordered(jobs: Iterable[Callable[[], T]], depth: int = DEPTH) -> Iterator[T]:
    """Run jobs on the pool with at most `depth` in flight; yield results in order.

    If the consumer stops early or a job fails, the jobs still in flight are waited for, so no
    worker keeps writing into a buffer the caller is about to reuse or wipe.
    """
    pool = executor()
    pending: deque[Future[T]] = deque()
    it = iter(jobs)
    try:
        for job in it:
            pending.append(pool.submit(job))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        for f in pending:
            if not f.cancelled():
                with contextlib.suppress(Exception):
                    f.result()


class BufferPool:
    """A free list of equal-sized bytearrays. Buffers are wiped when handed back and on close,
    so plaintext never outlives its use."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def get(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(self.size)

    def put(self, buf: bytearray, dirty: bool = True) -> None:
        """Hand `buf` back; `dirty=False` defers its wiping to reuse or close, but a buffer
        the free list has no room for is wiped now (it is never freed holding plaintext)."""
        if dirty:
            wipe(buf)
        with self._lock:
            if len(self._free) < self.limit:
                self._free.append(buf)
                return
        if not dirty:
            wipe(buf)

    def close(self) -> None:
        with self._lock:
            for b in self._free:
                wipe(b)
            self._free.clear()
