"""Where vault objects live. The vault core only speaks this interface, so a backend for S3
(range GETs, multipart uploads) slots in without touching the format code.

Keys are relative POSIX paths ("objects/3f/3f...age"). Every write is atomic: a reader sees
either the old object, the whole new one, or nothing; an interrupted write leaves no visible
object (only a hidden temp file that the next write of the same kind can ignore).
"""

from __future__ import annotations

import builtins
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, BinaryIO, Protocol

from pqfs.errors import VaultError
from pqfs.format.agefile import RangeSource
from pqfs.runtime import pools

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

TMP_PREFIX = ".tmp-"
KiB, MiB = 1 << 10, 1 << 20
COPY_BUFFER = 4 * MiB  # copy_with_header's reads: large enough that a copy streams at disk speed


@dataclass(frozen=True)
class S3Bounds:
    """Every bound of the S3 backend, each with its reason (StorageOptions.s3)."""

    connections: int = 16  # concurrent requests (a mount's worker each) and pooled connections
    job_chunks: int = 64  # chunks per readahead GET (4 MiB): half the CPU of 1 MiB GETs, both ends
    open_fetch: int = 192 * KiB  # opening GET: header, nonce, a first 128 KiB read (3 cache blocks)
    head_reads: int = 4  # reads served from the opening GET before its memory is released
    part_size: int = 8 * MiB  # multipart upload part (S3's minimum is 5 MiB)
    delete_batch: int = 1000  # keys per DeleteObjects request (S3's maximum)
    uploads_in_flight: int = 3  # parts uploading at once while the next one is encrypted
    presigned_keys: int = 4096  # objects whose GET URL is kept (least recently used dropped)
    presign_ttl: int = 3600  # seconds a presigned GET URL is valid for the server
    # Seconds before a URL is signed again: it also dies with the temporary credentials it was
    # signed with (STS, SSO, instance roles), which botocore renews 10-15 minutes before expiry.
    presign_renew: float = 300.0
    backoff_base: float = 0.05  # seconds before a retry; doubled per attempt, full jitter
    backoff_cap: float = 2.0  # seconds between attempts at most: retries go on to the budget
    loop_request_timeout: float = 0.5  # seconds for a GET from the loop; then a worker's turn
    loop_connect_timeout: float = 2.0  # seconds to connect from the loop (kept once made)
    loop_pause: float = 10.0  # seconds without loop GETs after one timed out (a slow endpoint)


@dataclass(frozen=True)
class StorageOptions:
    """How to reach a vault's storage, and every bound of the storage layer, each with its reason
    (a local directory uses only `timeout`). Storage.stats() shows the bounds (`pqfs stats`)."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL, the AWS config, or AWS itself
    # Seconds one storage operation may take, retries included (--timeout). The mount also
    # bounds how long opening a file may take by it (a hung disk or network filesystem, an S3).
    timeout: float = 30.0
    disk_cache: str | None = None  # directory for the ciphertext block cache (mount only)
    disk_cache_size: int = 1 << 30  # its disk budget (--disk-cache-size)
    disk_cache_block: int = 64 * KiB  # its granularity: a bucket read is widened to whole blocks
    # gc cleans up what interrupted writes left (temp files, multipart uploads) once this old:
    # a write (an add, a mount's commit) may be running now
    stale_upload_age: float = 24 * 3600.0
    s3: S3Bounds = field(default_factory=S3Bounds)  # the S3 backend's own bounds


def checked_key(key: str) -> str:
    """`key`, if it names an object inside the vault (relative, no ".." part)."""
    if key.startswith("/") or ".." in key.split("/"):
        raise VaultError(f"invalid object key {key!r}")
    return key


def bounds_of(options: DataclassInstance) -> dict[str, int | float]:
    """The bounds among the fields of `options` by name, for `pqfs stats --json`: its numbers
    (the rest are places). Generated, so that a new bound is shown without being listed again."""
    out: dict[str, int | float] = {}
    for f in fields(options):
        value = getattr(options, f.name)
        if type(value) in (int, float):  # not bool, a subclass of int
            out[f.name] = value
    return out


@dataclass(frozen=True)
class StorageProfile:
    """How a mount uses a backend: the bounds that depend on where the bytes come from, under
    MountOptions' names (MountOptions.for_storage). The defaults are a local disk's; there, 1 GiB
    read sequentially through the mount (5 mounts each) ran at 0.87 GB/s with 8-chunk jobs, 1.01
    with 16, 1.15 with 32."""

    workers: int = pools.WORKERS + 2  # read and decrypt threads: 2 more than cores, reads overlap
    jobs_per_file: int = pools.WORKERS + 2  # workers one file may hold: a slow one holds no more
    job_chunks: int = 32  # chunks per backend read: decrypting starts soon, per-job costs vanish
    reuse_read_buffers: bool = True  # a ciphertext buffer per worker: worth it for cheap preads
    # Open-ahead (the mount's openahead.py): on a local disk one thread opening 4 files per hop
    # keeps ahead of a scanner; a remote store's opens each wait on a GET, so several at once.
    open_ahead_threads: int = 1
    open_ahead_batch: int = 4


class ObjectSource(RangeSource, Protocol):
    """A stored object as a mount reads it: a RangeSource, plus the ways to reach its bytes
    without a thread where the backend has one (the mount's sources.py picks among them)."""

    def read_cached(self, offset: int, buf: memoryview) -> bool:
        """Fill `buf` from [offset, ...) only if all of it is in memory already (never waits on
        a disk or the network); False if it is not (nothing to rely on in `buf` then)."""

    def direct_fd(self) -> int | None:
        """An O_DIRECT descriptor of a local file, for reads that `read_cached` has found not
        in memory without starting a read of its own (the mount's aio.py); None where there is
        none."""

    @property
    def fetches(self) -> bool:
        """Whether `fetch` can read at all (so that callers skip setting it up where not)."""

    async def fetch(self, offset: int, buf: memoryview) -> bool:
        """Fill `buf` from [offset, ...) without a thread, awaited on the trio loop, where the
        source can (S3: s3async.py); False where it cannot or that one attempt failed (nothing
        to rely on in `buf` then): the caller reads on a worker instead."""


class PartWriter(Protocol):
    """An object sent as numbered parts (Storage.part_writer): every part but the last of
    `part_size` bytes; nothing visible at its key before finish(), which puts the parts in
    order (or, if write() was used and no part, one PUT); abort() gives it up. Thread-safe
    against nothing: one caller at a time."""

    part_size: int

    def put_part(self, number: int, data: bytes) -> None:
        """Part `number` (from 1), sent in the background; waits while too many are."""

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class Storage(ABC):
    # The storage layer's bounds, set by every backend's constructor.
    options: StorageOptions

    @property
    def timeout(self) -> float:
        """Seconds one operation may take, retries included (StorageOptions.timeout)."""
        return self.options.timeout

    def profile(self) -> StorageProfile:
        """How the mount should use this backend (worker threads, job sizes, buffers)."""
        return StorageProfile()

    @abstractmethod
    def open_source(self, key: str) -> ObjectSource:
        """Random access to an object; raises FileNotFoundError when it is absent."""

    def open_source_with_tail(self, key: str, tail: int) -> ObjectSource:
        """open_source, for a caller that reads [tail, end) next (the mount authenticates an
        object's final chunk at open): a remote store fetches it alongside the opening read.
        Locally nothing is gained: a pread of the end costs no round trip."""
        return self.open_source(key)

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def writer(
        self, key: str, exclusive: bool = False, durable: bool = True, fresh: bool = False
    ) -> contextlib.AbstractContextManager[BinaryIO]:
        """Stream a new object; it appears at `key` only when the block exits without error.
        With `exclusive`, FileExistsError if `key` exists (atomic create-if-absent). Without
        `durable`, the block may end before the bytes are on stable storage: for a batch of
        objects that make_durable() flushes before anything names them (ingest).
        `fresh` (implies `exclusive`): `key` is new and nothing names it until the caller's
        catalog segment does (a content object's random ID, FORMAT.md §3), so a store may
        write it in place, where a reader could see it partly written and a crash may leave it
        cut short: garbage that gc deletes past its grace. On error the store removes it."""

    def part_writer(self, key: str, exclusive: bool = False) -> PartWriter | None:
        """A new object sent in numbered parts, in any order (an S3 multipart upload), or None
        if this store writes objects as one stream (then `writer`: a local file takes writes
        at any offset anyway)."""
        return None

    def make_durable(self) -> None:  # noqa: B027 - most backends make every write durable
        """Everything written with durable=False is on stable storage when this returns."""

    def put_bytes(self, key: str, data: bytes, exclusive: bool = False) -> None:
        with self.writer(key, exclusive) as f:
            f.write(data)

    def copy_with_header(
        self,
        key: str,
        header: bytes,
        src_key: str,
        payload_from: int,
        src_size: int,
        opened: ObjectSource | None = None,
        durable: bool = True,
    ) -> None:
        """A new object `key` (create-if-absent: FileExistsError if it exists): `header`, then
        bytes [payload_from, src_size) of `src_key` unchanged (a rewrapped age file: same
        payload, new header), read through `opened` if the caller has it open; `durable` as
        for writer(). Here the bytes pass through this host; S3 copies them server-side."""
        src = opened or self.open_source(src_key)
        buf = bytearray(min(COPY_BUFFER, max(1, src_size - payload_from)))
        mv = memoryview(buf)
        try:
            with self.writer(key, exclusive=True, durable=durable) as f:
                f.write(header)
                pos = payload_from
                while pos < src_size:
                    n = src.preadinto(pos, mv[: min(len(buf), src_size - pos)])
                    if n <= 0:
                        raise FileNotFoundError(f"{src_key} shrank while it was copied")
                    f.write(mv[:n])
                    pos += n
        finally:
            if opened is None:
                src.close()

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete `keys` (those already gone are no error)."""
        for key in keys:
            self.delete(key)

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix`, temp files excluded."""
        return [(key, size) for key, size, _ in self.list_dated(prefix)]

    @abstractmethod
    def list_dated(self, prefix: str) -> builtins.list[tuple[str, int, float]]:
        """(key, size, when it was written: seconds since the epoch) of every object under
        `prefix`, temp files excluded."""

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
        """Request and cache counters, and the bounds (`storage_bounds`), for `pqfs stats`."""
        return {"storage_bounds": bounds_of(self.options)}

    def abort_stale_uploads(self, older_than: float | None = None) -> int:
        """Clean up what interrupted writes left (begun more than `older_than` seconds ago;
        default: `stale_upload_age`, since a write may be running now); how many."""
        return 0

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release caches and connections (the mount calls it at unmount)."""
