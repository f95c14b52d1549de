"""Every bound of a mount, in one place, each with its reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pqfs.format.stream import CHUNK
from pqfs.runtime import pools
from pqfs.storage import Storage

MiB = 1 << 20


@dataclass(frozen=True)
class MountOptions:
    """Every bound of a mount, in one place."""

    cache_size: int = 64 * MiB  # decrypted-chunk LRU, whatever the number of open files
    key_ttl: float = 300.0  # seconds after last use; 0 keeps a key only while its file is open
    # Decrypt threads; two more than the cores, so that backend reads overlap decryption.
    # Reads that a caller waits on always run before readahead.
    workers: int = pools.WORKERS + 2  # S3: one per connection (threads wait on the network)
    jobs_per_file: int = pools.WORKERS + 2  # S3: half the workers; a slow object holds no more
    job_chunks: int = 32  # chunks per worker job (2 MiB); S3: 4 MiB. See Storage.read_chunks
    # A read missing at most this many chunks whose ciphertext is already in memory (page
    # cache) is decrypted on the loop itself: 2 chunks take ~30 us, less than a thread hop.
    inline_chunks: int = 2
    # Such a read whose ciphertext is not in memory (local disk): one O_DIRECT read submitted
    # from the loop (`aio.py`), then decrypted there; this many in flight at most (0: never).
    direct_reads: int = 16
    prefetch_start: int = 8  # chunks ahead once a reader is seen to be sequential
    prefetch_max: int = 256  # chunks ahead at most, per open file (16 MiB)
    max_read: int = 1 * MiB  # largest request the kernel sends; the shared reply buffer
    # Reads bypass the kernel's page cache (FOPEN_DIRECT_IO): plaintext lives only in pqfs's
    # own budgeted, wiped cache, never in kernel pages that outlive a read, and a reply is
    # copied into the reader's own buffer. With the page cache, the reply's write fills fresh
    # page-cache pages on the loop thread: on this project's VM that took up to 24 ms of the
    # loop's CPU in one step, and stalls of 10-45 ms came in 5 of 11 benchmark runs; none in
    # 15 sequential mounts without it. The cost (`pqfs mount --page-cache` keeps the page
    # cache): MAP_SHARED mmap gets ENODEV (libfuse 3.14 cannot ask for
    # FUSE_DIRECT_IO_ALLOW_MMAP; MAP_PRIVATE works), and small reads are not merged by the
    # kernel's readahead (pqfs's own readahead still decrypts ahead of them).
    direct_io: bool = True
    # After answering a read, or while a direct read is in flight, the loop polls this long
    # (seconds) before sleeping: the wake-up of an idle CPU costs more (`idlepoll.py`). 0: never.
    idle_poll: float = 200e-6
    stall_detail: bool = False  # count sleeps, preemptions, faults in the longest loop step
    catalog_poll: float = 10.0  # seconds between checks for catalog changes (pqfs add)
    # Run after a refresh that changed the tree, with the changed vault paths appended
    # (`onchange.py`): FUSE raises no inotify events for changes made elsewhere. (): none.
    on_change: tuple[str, ...] = ()
    attr_timeout: float = 1.0  # kernel caching of names and attributes (bounds lock latency)

    @classmethod
    def for_storage(cls, storage: Storage, **settings: Any) -> MountOptions:
        """The bounds that depend on the backend (worker threads, jobs per file, request size)
        taken from it; the rest from `settings` or the defaults."""
        return cls(
            workers=storage.io_workers,
            jobs_per_file=storage.jobs_per_object,
            job_chunks=storage.read_chunks,
            **settings,
        )

    @property
    def prefetch_inflight(self) -> int:
        """Chunks being prefetched at once for the whole mount: a quarter of the cache."""
        return max(self.job_chunks, self.cache_size // CHUNK // 4)
