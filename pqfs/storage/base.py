"""Where vault objects live. The vault core only speaks this interface, so a backend for S3
(range GETs, multipart uploads) slots in without touching the format code.

Keys are relative POSIX paths ("objects/3f/3f...age"). Every write is atomic: a reader sees
either the old object, the whole new one, or nothing; an interrupted write leaves no visible
object (only a hidden temp file that the next write of the same kind can ignore).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import BinaryIO

from pqfs.format.agefile import RangeSource
from pqfs.runtime import pools

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class StorageOptions:
    """How to reach a remote vault (local directories ignore all of it)."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL, the AWS config, or AWS itself
    timeout: float = 30.0  # seconds for one storage operation, retries included
    disk_cache: str | None = None  # directory for the ciphertext block cache (mount only)
    disk_cache_size: int = 1 << 30


class Storage(ABC):
    # Threads the mount runs backend reads and decryption on, and how many of them one object
    # may hold at once (a slow object must not hold them all).
    io_workers: int = pools.WORKERS + 2
    jobs_per_object: int = pools.WORKERS + 2
    # Chunks per backend read of the mount's readahead: small enough to start decrypting soon
    # (local), large enough that per-job costs vanish (thread wake-ups, the read's syscalls;
    # S3: a GET costs ~2 ms of server time). Local, 1 GiB read sequentially through the mount
    # (5 mounts each): 8 chunks 0.87 GB/s, 16 chunks 1.01, 32 chunks 1.15.
    read_chunks: int = 32
    # Whether the mount keeps a ciphertext buffer per worker thread: worth it for cheap local
    # preads; a remote backend allocates per request (its threads are many, mostly waiting).
    reuse_read_buffers: bool = True
    # Seconds one operation may take, retries included (--timeout). The mount also bounds how
    # long opening a file may take by it (a hung disk or network filesystem, a stalled S3).
    timeout: float = StorageOptions.timeout

    @abstractmethod
    def open_source(self, key: str) -> RangeSource:
        """Random access to an object; raises FileNotFoundError when it is absent."""

    def open_source_with_tail(self, key: str, tail: int) -> RangeSource:
        """open_source, for a caller that reads [tail, end) next (the mount authenticates an
        object's final chunk at open): a remote store fetches it alongside the opening read.
        Locally nothing is gained: a pread of the end costs no round trip."""
        return self.open_source(key)

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def writer(
        self, key: str, exclusive: bool = False
    ) -> contextlib.AbstractContextManager[BinaryIO]:
        """Stream a new object; it appears at `key` only when the block exits without error.
        With `exclusive`, FileExistsError if `key` exists (atomic create-if-absent)."""

    def put_bytes(self, key: str, data: bytes, exclusive: bool = False) -> None:
        with self.writer(key, exclusive) as f:
            f.write(data)

    @abstractmethod
    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix`, temp files excluded."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def describe(self) -> str: ...

    def empty(self) -> bool:
        """True if nothing is stored at this location yet."""
        return not self.list("")

    def stats(self) -> dict[str, object]:
        """Request and cache counters, for `pqfs stats`."""
        return {}

    def abort_stale_uploads(self) -> int:
        """Clean up what interrupted writes left server-side; how many."""
        return 0

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release caches and connections (the mount calls it at unmount)."""


