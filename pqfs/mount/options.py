"""Every bound of a mount, in one place, each with its reason, checked when the options are made.

The components of the mount keep no bound of their own: they are given these (a pause before
retrying accept() and a first buffer's size stay beside their code in control.py: they bound
nothing). `pqfs stats --json` shows them all (`bounds`, generated from the fields by
`MountOptions.bounds`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from pqfs.errors import PqfsError
from pqfs.format.stream import CHUNK
from pqfs.runtime.memory import LARGE
from pqfs.storage import Storage

MiB = 1 << 20


@dataclass(frozen=True)
class MountOptions:
    """Every bound of a mount, in one place. The numbers are its bounds (`bounds()`)."""

    cache_size: int = 64 * MiB  # decrypted-chunk LRU, whatever the number of open files
    key_ttl: float = 300.0  # seconds after last use; 0 keeps a key only while its file is open
    # Decrypt threads, workers one file may hold, chunks per worker job: they depend on the
    # backend, so they have no default here (for_storage takes them from its StorageProfile).
    # Reads that a caller waits on always run before readahead.
    workers: int = field(kw_only=True)
    jobs_per_file: int = field(kw_only=True)
    job_chunks: int = field(kw_only=True)
    # A read missing at most this many chunks whose ciphertext is already in memory (page
    # cache) is decrypted on the loop itself: 2 chunks take ~30 us, less than a thread hop.
    inline_chunks: int = 2
    # Such a read whose ciphertext is not in memory (local disk): one O_DIRECT read submitted
    # from the loop (`aio.py`), then decrypted there; this many in flight at most (0: never).
    direct_reads: int = 16
    prefetch_start: int = 8  # chunks ahead once a reader is seen to be sequential
    prefetch_max: int = 256  # chunks ahead at most, per open file (16 MiB)
    max_read: int = 1 * MiB  # largest request the kernel sends; the shared reply buffer
    # st_blksize: what cp, and Python's buffered files, read at a time. max_read for files of
    # at least this size (films: a cp ~1.3x faster with 1 MiB reads); 128 KiB below, since a
    # tag scan's buffered small reads would each decrypt a whole MiB (and on S3 need a GET
    # past the opening one).
    large_blksize_from: int = 64 * MiB
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
    # Reply buffers (replies.py): a read that waits on workers answers from a private one.
    reply_pool: int = 16  # wiped max_read buffers kept for reads that wait on workers
    reply_spares: int = 2  # of which workers keep this many faulted in ahead of need
    cache_spares: int = 4  # chunk buffers kept faulted in ahead of need while under the budget
    hint_chunks: int = 64  # how far ahead of readahead the backend is asked to start fetching
    # After a read of a file found its storage unavailable (its whole time budget spent), reads
    # of that file fail at once for this long (seconds): the kernel retries a failed readahead
    # page by page, and each retry would otherwise wait out the budget again.
    unavailable_hold: float = 2.0
    # How long opening a file may take, in storage timeouts (Storage.timeout, --timeout): an
    # open is up to two storage operations (the object's opening bytes, its final chunk).
    open_timeouts: float = 2.0
    # Threads opening objects at once. They have a limiter of their own: an open given up on a
    # hung store keeps its thread, and must not use up the threads unlock, lock and catalog
    # loads run on (trio's default limiter).
    open_threads: int = 16
    # Open-ahead (openahead.py): once files of a directory are opened in succession (a library
    # scan), the next ones are opened on a thread before the scanner asks, so that its opens
    # wait for nothing (on this VM a thread hop alone is ~180 us, a scan's open ~600 us). How
    # many files ahead of the last one opened (0: never), how many per background thread hop and
    # how many such threads at once, how many may wait parked (each an open descriptor and, in the chunk cache, its final
    # chunk), for how long (seconds), and in how many directories at once a scan is followed.
    open_ahead: int = 16
    open_ahead_batch: int = 4  # (these two from the backend's profile, for_storage)
    open_ahead_threads: int = 1
    open_ahead_parked: int = 64
    open_ahead_ttl: float = 5.0
    open_ahead_dirs: int = 16
    # Writes (writes.py, staging.py). Written data waits for its commit in memory (plaintext,
    # wiped) up to `write_buffer` for all files and `write_buffer_file` for one (a .nfo, a
    # poster, a subtitle stay there), else sealed in an unlinked spill file in `write_cache`,
    # up to `write_cache_size` in all (the CLI's default: min(20 GiB, half the free space
    # there)). A writer that finds staging full waits for commits to free room, at most
    # `write_timeout` seconds, then gets ENOSPC.
    read_only: bool = False
    # Who the files belong to, as the kernel checks them with --allow-other (a media server's
    # account): the mounting user's by default (-1); permission bits in `umask` are cleared
    # from every mode shown (-1: none).
    uid: int = -1
    gid: int = -1
    umask: int = -1
    write_buffer: int = 64 * MiB
    write_buffer_file: int = 1 * MiB
    write_cache: str = "/var/tmp"
    write_cache_size: int = 20 << 30
    write_timeout: float = 60.0
    # A file written from nothing, in order (cp, rsync, an import, a muxer), goes into its new
    # object as it is written, on a local store (staging.Streaming): only its first
    # `stream_head` bytes stay staged until its commit, where muxers patch their header (MP4's
    # mdat size, MKV's seek head, FLAC's STREAMINFO, MP3's Xing frame); half of
    # write_buffer_file, so that the chunk being written stays in memory too. 0: no streaming.
    stream_head: int = 512 << 10
    # A closed file is committed once nothing wrote to it for `commit_delay` seconds (a
    # reopen, a rename after close, a second save are absorbed); namespace operations
    # `group_commit` seconds after the first (one delta a second, however many); the
    # committer looks every `commit_tick` seconds.
    commit_delay: float = 2.0
    group_commit: float = 1.0
    commit_tick: float = 0.25
    # Files in one commit round (one delta): what the loop does for a round, without an await
    # between taking the op queue and appending, grows with it (~20 us a file).
    commit_files: int = 256
    commit_threads: int = 1  # threads writing a round's objects at once (2 lost to the GIL)
    # Seconds the loop's thread keeps the GIL while a worker waits for it (sys.setswitchinterval;
    # Python's default is 5 ms). A commit thread takes the GIL back after each of its system
    # calls (~6 for a small file): behind a loop busy with a copy of small files, it waited
    # ~5 ms each time. At 1 ms the copy's writing loop was ~20 % faster and reads no slower
    # (10,000 files; a 1 GiB cat and random 64 KiB preads, 2026-12-02).
    switch_interval: float = 0.001
    key_cache_entries: int = 4096  # unwrapped file keys cached (least recently used wiped first)
    spare_eventfds: int = 64  # idle worker wake-up eventfds kept for reuse; more are closed
    direct_slot_bytes: int = 256 << 10  # one O_DIRECT read: up to 3 chunks, aligned both sides
    # The kernel's side of the mount, set once it answers (root only; daemon._set_readahead):
    read_ahead_kb: int = 1024  # the kernel's readahead: larger reads, fewer trips through FUSE
    # Asynchronous requests the kernel queues (its default: 12): readahead waiting on a slow
    # object would otherwise fill the queue, and reads of every other file wait behind it.
    max_background: int = 64
    # glibc's malloc (daemon.bound_malloc): it raises its mmap threshold to the largest block
    # freed, after which multi-MiB ciphertext buffers come from per-thread arenas that keep
    # their peak forever (with 16 S3 workers the daemon grew ~50 MiB past its cache budget).
    mmap_threshold: int = LARGE  # a buffer this large gets fresh pages: see memory.scratch
    arena_max: int = 2  # fewer arenas bound what small allocations retain
    # The --on-change hook (onchange.py), run after a refresh that changed the tree:
    # Linux takes up to 2 MiB of arguments and 128 KiB per argument; a rescan request needs no
    # more than this (about 1000 typical paths). Past it the hook gets no path: "rescan all".
    hook_path_bytes: int = 64 << 10
    hook_timeout: float = 300.0  # seconds: a rescan request that takes longer is stuck: killed
    hook_output_bytes: int = 4096  # of its output (stdout and stderr) logged
    hook_drain: float = 1.0  # seconds to read its output once it exited (a child may keep it)
    # The control socket (control.py), which anyone who can see the mount can connect to:
    control_request_bytes: int = (1 << 20) + 64  # an identity file (up to 1 MiB), its command
    control_timeout: float = 10.0  # seconds to send a request: a stalled client frees its slot
    control_connections: int = 4  # requests served at once; a flood by another user stays small

    SETTINGS: ClassVar[tuple[str, ...]] = ("uid", "gid", "umask")  # numbers that bound nothing
    MIN_CACHE: ClassVar[int] = 4 * MiB  # 64 chunks: two 2 MiB worker jobs' worth
    # Bounds below 1 that would stop the mount (no worker, no key kept, an empty request...).
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (
        "workers",
        "jobs_per_file",
        "job_chunks",
        "prefetch_start",
        "prefetch_max",
        "max_read",
        "key_cache_entries",
        "direct_slot_bytes",
        "max_background",
        "open_ahead_batch",
        "open_ahead_threads",
        "open_ahead_dirs",
        "arena_max",
        "control_request_bytes",
        "control_connections",
        "write_buffer",
        "write_buffer_file",
        "commit_files",
        "commit_threads",
    )
    # Times that must pass before something happens at all (an open, a poll, a request).
    MORE_THAN_ZERO: ClassVar[tuple[str, ...]] = (
        "open_timeouts",
        "open_ahead_ttl",
        "catalog_poll",
        "control_timeout",
        "hook_timeout",
        "write_timeout",
        "commit_tick",
        "switch_interval",
    )

    def __post_init__(self) -> None:
        if self.cache_size < self.MIN_CACHE:
            raise PqfsError(f"--cache-size must be at least {self.MIN_CACHE // MiB}M")
        for name, value in self.bounds().items():
            least = 1 if name in self.AT_LEAST_ONE else 0
            if value < least:
                raise PqfsError(f"mount option {name} must be at least {least}: {value}")
        for name in self.MORE_THAN_ZERO:
            if getattr(self, name) <= 0:
                raise PqfsError(f"mount option {name} must be more than 0")

    def bounds(self) -> dict[str, int | float]:
        """Every bound by name, for `pqfs stats --json`: the numbers among the fields (the
        switches and the hook's command are settings, not bounds), and the prefetch in flight
        they imply. Generated, so that a new bound is shown without being listed again."""
        out: dict[str, int | float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.SETTINGS:
                continue
            if type(value) in (int, float):  # not bool, a subclass of int
                out[f.name] = value
        out["prefetch_inflight"] = self.prefetch_inflight
        return out

    @classmethod
    def for_storage(cls, storage: Storage, **settings: Any) -> MountOptions:
        """The bounds that depend on the backend (worker threads, jobs per file, request size)
        taken from its profile (Storage.profile); the rest from `settings` or the defaults."""
        profile = storage.profile()
        return cls(
            workers=profile.workers,
            jobs_per_file=profile.jobs_per_file,
            job_chunks=profile.job_chunks,
            open_ahead_threads=profile.open_ahead_threads,
            open_ahead_batch=profile.open_ahead_batch,
            **settings,
        )

    @property
    def prefetch_inflight(self) -> int:
        """Chunks being prefetched at once for the whole mount: a quarter of the cache."""
        return max(self.job_chunks, self.cache_size // CHUNK // 4)
