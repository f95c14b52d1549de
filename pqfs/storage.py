"""Where vault objects live. The vault core only speaks this interface, so a backend for S3
(range GETs, multipart uploads) slots in without touching the format code.

Keys are relative POSIX paths ("objects/3f/3f...age"). Every write is atomic: a reader sees
either the old object, the whole new one, or nothing; an interrupted write leaves no visible
object (only a hidden temp file that the next write of the same kind can ignore).
"""

from __future__ import annotations

import contextlib
import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import parallel
from .agefile import FileSource, RangeSource, open_regular
from .errors import VaultError

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
    io_workers: int = parallel.WORKERS + 2
    jobs_per_object: int = parallel.WORKERS + 2
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


class LocalStorage(Storage):
    """A vault directory. It is private to its owner: the directories pqfs makes in it are
    mode 0700 (the vault directory too, at init) and every file 0600, so other local users
    see neither the object names, sizes and times, nor identity.age, which a passphrase
    guess would open. Objects are opened without blocking or following a symbolic link, and
    must be regular files (open_regular): a FIFO put in place of one fails the read that
    needs it instead of hanging a thread forever."""

    def __init__(
        self, root: str | os.PathLike[str], timeout: float = StorageOptions.timeout
    ) -> None:
        self.root = Path(root).absolute()  # a daemon changes directory to /
        self.timeout = timeout

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise VaultError(f"invalid object key {key!r}")
        return self.root / key

    def open_source(self, key: str) -> RangeSource:
        return FileSource(self._path(key), follow_symlinks=False)

    def read_bytes(self, key: str) -> bytes:
        with open(open_regular(self._path(key), follow_symlinks=False), "rb") as f:
            return f.read()

    def make_private(self) -> None:
        """Create the vault directory if missing; mode 0700 (best effort: FAT and exFAT
        have no modes)."""
        self._mkdirs(self.root)
        with contextlib.suppress(OSError):
            os.chmod(self.root, 0o700)

    def _mkdirs(self, path: Path) -> None:
        """`path` (the root or a directory in it) and its missing parents; mode 0700 from the
        root down, the root's own parents as `mkdir -p` makes them."""
        if path.is_dir():
            return
        if path == self.root:
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._mkdirs(path.parent)
        with contextlib.suppress(FileExistsError):  # a concurrent writer made it
            path.mkdir(mode=0o700)

    @contextlib.contextmanager
    def writer(self, key: str, exclusive: bool = False) -> Iterator[BinaryIO]:
        final = self._path(key)
        self._mkdirs(final.parent)
        tmp = final.parent / f"{TMP_PREFIX}{os.urandom(8).hex()}"
        f: BinaryIO | None = None
        try:
            # Inside the try: a Ctrl-C landing as open() returns, before `f` is bound, must
            # still remove the file (the same race lost an S3 upload in CI).
            f = open(tmp, "xb", opener=_private)  # noqa: SIM115 - closed below on every path
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            if exclusive:
                os.link(tmp, final)  # fails with EEXIST: atomic create-if-absent
                os.unlink(tmp)
            else:
                os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException as e:
            if f is not None:
                f.close()
            if f is not None or not isinstance(e, FileExistsError):  # never another's file
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise

    def list(self, prefix: str) -> list[tuple[str, int]]:
        base = self._path(prefix) if prefix else self.root
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                full = os.path.join(dirpath, name)
                try:
                    size = os.stat(full).st_size
                except FileNotFoundError:
                    continue
                out.append((os.path.relpath(full, self.root).replace(os.sep, "/"), size))
        return out

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())

    def describe(self) -> str:
        return str(self.root)


def _private(path: str, flags: int) -> int:
    """open()'s opener for a new vault file: mode 0600 (see LocalStorage)."""
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:  # some filesystems refuse O_DIRECTORY opens; durability is best effort
        if e.errno in (errno.EACCES, errno.EINVAL):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_storage(location: str, options: StorageOptions | None = None) -> Storage:
    opts = options or StorageOptions()
    if location.startswith("s3://"):
        from .s3 import S3Storage

        return S3Storage(location, opts)
    if "://" in location:
        raise VaultError(
            f"unsupported vault location {location!r} (a directory or s3://bucket/prefix)"
        )
    if opts.disk_cache:
        raise VaultError(
            "--disk-cache is for s3:// vaults (a local vault is read from disk already)"
        )
    return LocalStorage(location, opts.timeout)
