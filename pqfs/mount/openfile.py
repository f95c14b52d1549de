"""Open files: `OpenFile` and the records reads pass around (`Run`, `Dest`); `Opener` opens an
object, checks it (FORMAT.md §4.1) before any byte of it is served, and unwraps its key. It
never serves a read, and never touches the tree or the reply buffers.

Invariants (kept by this module):
  * an object is served only once its header matched the catalog's, its file key opened it (the
    header MAC), its size matched the catalog's and its final chunk authenticated;
  * an open gets `open_timeouts` storage timeouts at most (`run_bounded`), then fails (EIO): its
    thread is abandoned, and what it opens after that is closed, exactly once;
  * with key_ttl == 0 a file key lives exactly while its file is open (`OpenFile.own_key`),
    otherwise in the key cache (keycache.py: its invariants);
  * `open_object` and its final-chunk check run on an open thread (trio.to_thread,
    `run_bounded`), `unwrap` there or on a worker: they touch only
    the new OpenFile (seen by no other thread until it is returned), the key cache and the chunk
    cache (each under its own lock).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from pqfs.errors import (
    FormatError,
    HeaderMacError,
    Locked,
    NoIdentityMatch,
    PayloadError,
    PqfsError,
    Unavailable,
    Unreadable,
    VaultError,
)
from pqfs.format.agefile import pread
from pqfs.format.header import Header
from pqfs.format.stream import (
    CHUNK,
    CT_CHUNK,
    NONCE_SIZE,
    ciphertext_size,
    ciphertext_span,
    payload_aead,
)
from pqfs.mount.chunkcache import ChunkCache
from pqfs.mount.metrics import Counters
from pqfs.mount.options import MountOptions
from pqfs.mount.tree import Node
from pqfs.runtime.memory import scratch, wipe
from pqfs.storage.base import ObjectSource
from pqfs.vault.catalog import shown
from pqfs.vault.keycache import CachedKey, KeyCache
from pqfs.vault.objects import checked_header, object_key
from pqfs.vault.schema import Entry
from pqfs.vault.vault import Vault

log = logging.getLogger("pqfs.mount")
T = TypeVar("T")


@dataclass
class OpenFile:
    """A file opened through the mount: its checked object, and the reader's state of it."""

    fh: int
    entry: Entry
    src: ObjectSource
    header: Header
    nonce: bytes
    payload_start: int
    chunks: int
    own_key: CachedKey | None = None  # with key_ttl == 0: the key lives exactly while open
    decrypted: int = 0  # plaintext bytes its open decrypted (the final chunk): counted by open
    jobs: int = 0
    released: bool = False
    last_end: int = 0  # sequential-access detection
    streak: int = 0
    window: int = 0
    ahead: int = -1  # highest chunk scheduled for prefetch
    grow_at: int = 0  # the window doubles once the reader reaches this chunk (it used it all)
    jumps: int = 0  # one more at every jump: prefetch scheduled before it is dropped
    # Backend offset up to which will_need() was sent. Written by worker threads (the prefetch
    # jobs' decrypt) without a lock: a lost update only sends a hint for a range again, and no
    # range past the jobs' own chunks is left unhinted.
    hinted: int = 0
    limiter: trio.Semaphore | None = None  # at most jobs_per_file worker jobs at once
    unavailable: tuple[float, Unavailable] | None = None  # when the storage last did not answer

    @property
    def key_id(self) -> tuple[str, str]:
        return (self.entry.object, self.entry.mac)


@dataclass(slots=True)
class Run:
    """Chunks [first, first+count) of one object: what one job decrypts."""

    first: int
    count: int


@dataclass(slots=True)
class Dest:
    """Where a read's plaintext goes: `out` holds bytes [off, end) of the file."""

    out: memoryview
    off: int
    end: int


def runs(indices: Iterable[int], limit: int) -> list[Run]:
    """Sorted chunk indices as runs of consecutive chunks, at most `limit` long."""
    out: list[Run] = []
    for i in indices:
        if out and out[-1].first + out[-1].count == i and out[-1].count < limit:
            out[-1].count += 1
        else:
            out.append(Run(i, 1))
    return out


class Decrypt(Protocol):
    """The reader's one decrypt path (reader.ChunkReader.decrypt), as the final chunk's check
    calls it: `count` chunks from `first`, their ciphertext `read` already, into the cache."""

    def __call__(
        self,
        f: OpenFile,
        aead: Any,
        first: int,
        count: int,
        dest: None,
        *,
        generation: int,
        read: memoryview,
    ) -> int: ...


class Opener:
    """Opens content objects for reads, and holds their keys (the key cache, or the file)."""

    def __init__(
        self,
        vault: Vault,
        options: MountOptions,
        *,
        keys: KeyCache,
        cache: ChunkCache,
        counters: Counters,
        decrypt: Decrypt,
    ) -> None:
        self.vault = vault
        self.options = options
        self.keys = keys
        self.cache = cache
        self.counters = counters
        self._decrypt = decrypt

    def open_object(self, node: Node) -> OpenFile:
        """Open thread: open the object and check it as FORMAT.md §4.1 asks before any byte
        of it is served: the header against the catalog, the file key (header MAC), the object
        size against the catalog's, and the final chunk, authenticated (a truncated or extended
        object fails here, not after its first chunks were played). The final chunk stays in
        the chunk cache: tag readers and demuxers read the end of a file first."""
        e = node.entry
        generation = self.cache.generation  # before anything is decrypted: see ChunkCache.insert
        chunks = -(-e.size // CHUNK) or 1
        start = e.hlen + NONCE_SIZE  # the catalog's; the header check below confirms it
        # The final chunk's place is known before the header is read: a remote store fetches it
        # alongside the opening read, so that checking it adds no round trip (s3source.py), and a
        # local disk starts reading it while the header is read. Not if it is cached already.
        tail = start + (chunks - 1) * CT_CHUNK
        fetch_tail = (e.object, chunks - 1) not in self.cache
        key = object_key(e.object)
        try:
            storage = self.vault.storage
            src = (
                storage.open_source_with_tail(key, tail) if fetch_tail else storage.open_source(key)
            )
        except FileNotFoundError:
            raise VaultError("content object is missing") from None
        f: OpenFile | None = None
        try:
            if fetch_tail:
                src.will_need(tail, start + ciphertext_size(e.size) - tail)
            header = checked_header(e, src)  # its length is hlen: `start` holds
            nonce = pread(src, header.length, NONCE_SIZE)
            if len(nonce) != NONCE_SIZE:
                raise PayloadError("payload nonce is missing (truncated object)", 0)
            want = start + ciphertext_size(e.size)
            if src.size != want:
                how = "truncated" if src.size < want else "extended"
                raise PayloadError(
                    f"object is {src.size} bytes, the catalog's size needs {want} ({how})",
                    chunks - 1,
                )
            f = OpenFile(0, e, src, header, nonce, start, chunks)
            aead = self.cached_aead(f)
            if aead is None:  # unwrap now: the first read costs only decryption
                aead = self.unwrap(f)
            self._authenticate_final_chunk(f, aead, generation)
            return f
        except BaseException:
            if f is not None:
                self.close_unopened(f)
            else:
                src.close()
            raise

    def _authenticate_final_chunk(self, f: OpenFile, aead: Any, generation: int) -> None:
        """Open thread: decrypt the final chunk (nonce flag 0x01) into the chunk cache; only
        then is the plaintext size trusted. One that is cached was authenticated when cached."""
        last = f.chunks - 1
        if (f.entry.object, last) in self.cache:
            return
        # Read here, into one chunk's scratch, not through decrypt()'s own read: that keeps a
        # job-sized ciphertext buffer per thread (2-4 MiB), right for the few workers, not for
        # up to `open_threads` open threads.
        n = ciphertext_span(f.payload_start, f.src.size, f.chunks, last, 1)
        ct = scratch(n)  # ciphertext: not secret
        if f.src.preadinto(f.payload_start + last * CT_CHUNK, ct) != n:
            raise PayloadError(f"chunk {last} could not be read in full (truncated object)", last)
        f.decrypted = self._decrypt(f, aead, last, 1, None, generation=generation, read=ct)

    @staticmethod
    def close_unopened(f: OpenFile) -> None:
        """Close an object whose open failed or was overtaken by a lock (no job reads it)."""
        f.src.close()
        if f.own_key is not None:
            f.own_key.wipe()
            f.own_key = None

    def failed(self, e: Entry, err: Exception, *, relocked: bool) -> Exception:
        """What an open that raised `err` fails with: Locked if the vault was locked meanwhile
        (`relocked`: its key may have been wiped under the unwrap), an unexpected exception as
        it is (the adapter logs it as a bug), anything else Unreadable (EIO), after one log line
        naming the file and what is wrong with its object."""
        if isinstance(err, Locked) or relocked:
            return Locked("the vault was locked while the file was being opened")
        if not isinstance(err, PqfsError | OSError):
            return err
        what = _damage(e, err)
        if isinstance(err, PayloadError | HeaderMacError):
            self.counters.auth_failures += 1
        else:
            self.counters.read_errors += 1
        log.error("%s: cannot open (EIO): %s", shown(e.path), what)
        return Unreadable(f"{e.path}: {what}")

    def cached_aead(self, f: OpenFile) -> Any:
        """The payload AEAD of an open file if its key is held (any thread), else None."""
        if f.own_key is not None:
            return f.own_key.aead
        hit = self.keys.get(f.key_id)
        return None if hit is None else hit.aead

    def unwrap(self, f: OpenFile) -> Any:
        """Unwrap the file key (worker thread), cache it, and return the payload AEAD."""
        epoch = self.keys.epoch  # a lock from here on: the key is not kept (KeyCache.put)
        fk = self.vault.unwrap_key(f.entry.object, f.header)  # raises Locked
        try:
            entry = self.keys.put(f.key_id, fk, payload_aead(fk, f.nonce), epoch=epoch)
        finally:
            wipe(fk)
        if entry.aead is None:
            raise Locked("the vault was locked while the file was being opened")
        if self.options.key_ttl <= 0:
            f.own_key = entry
        return entry.aead


def _damage(e: Entry, err: PqfsError | OSError) -> str:
    """What is wrong with the object of `e`, from the error its open raised (one line)."""
    if isinstance(err, FileNotFoundError):
        return "content object is missing"
    if isinstance(err, OSError):
        return f"content object cannot be read: {err.strerror or type(err).__name__}"
    msg = str(err).removeprefix(f"{e.path}: ")
    if isinstance(err, NoIdentityMatch):
        return "damaged header: no stanza opens with the vault identity"
    if isinstance(err, FormatError | HeaderMacError):
        return f"damaged header: {msg}"
    if isinstance(err, PayloadError):
        return f"damaged payload: {msg}"
    return msg


async def run_bounded(
    fn: Callable[[], T],
    timeout: float,
    discard: Callable[[T], None],
    limiter: trio.CapacityLimiter,
) -> T:
    """fn() on a thread, given up after `timeout` seconds with VaultError (EIO). The thread is
    then abandoned, not waited for: it may be stuck for good in a system call (a hung disk or
    network filesystem), and a read must not wait with it. What it returns after that goes to
    `discard` (an open object is closed), exactly once, whichever side comes second."""
    lock = threading.Lock()
    abandoned = False
    returned: list[T] = []

    def work() -> T:
        result = fn()
        with lock:
            late = abandoned
            if not late:
                returned.append(result)
        if late:
            discard(result)
        return result

    def abandon() -> None:
        nonlocal abandoned
        with lock:
            abandoned = True
            lost = list(returned)  # returned as the wait ended: trio drops it, so it is ours
        for result in lost:
            discard(result)

    try:
        with trio.move_on_after(timeout):
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=limiter)
    except BaseException:  # fn failed, or a cancellation from outside (unmount) abandoned it
        abandon()
        raise
    abandon()
    raise VaultError(f"content object did not open within {timeout:g} s (storage not answering)")
