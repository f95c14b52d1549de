"""The mount's core: an unlocked vault seen as inodes, directories and plaintext reads.

It knows nothing of FUSE (the pyfuse3 adapter is `fuseops.py`), so it is tested directly under
trio. It raises PqfsError subclasses; the adapter is the one place that maps them to errno.

Concurrency model (all of it written down here, kept by this module):
  * Every method runs on the trio thread. Backend I/O that may wait runs only in worker threads
    (`workers.WorkerPool`, or `trio.to_thread` for opens and catalog loads), in jobs of
    `job_chunks` chunks (2 MiB), so one thread hop (~70 us) is small against the work it
    carries. The loop copies cached plaintext, and decrypts itself only what costs less than a
    hop: at most `inline_chunks` (2) chunks whose ciphertext is already in memory
    (`RangeSource.read_cached`, a pread with RWF_NOWAIT that fails rather than wait on a disk).
  * `_inflight` (trio thread only) maps a chunk to the Event of the job decrypting it, so two
    readers, or a reader and the prefetcher, never decrypt the same chunk twice at once.
  * Demand reads are urgent jobs of the worker pool and readahead is background work: readahead
    never queues in front of a read that a player is waiting for.
  * `generation` counts locks. Work that began before a lock checks it after every await and
    wipes what it produced instead of returning it; the chunk cache does the same for inserts.
  * An open file is closed only when no job still reads from it (`jobs` == 0), so a prefetch in
    flight never reads a closed, possibly reused, descriptor.
  * Before it sleeps, the loop may poll for up to `idle_poll` (`idlepoll.py`), only while
    `_may_poll()` holds: every wait the poll cannot see (trio.to_thread, S3 fetches on the
    loop) goes through `offload()` or `_unseen_wait()`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from pqfs.errors import (
    FormatError,
    HeaderMacError,
    IsADirectory,
    Locked,
    NoIdentityMatch,
    NotADirectory,
    NotFound,
    PayloadError,
    PqfsError,
    ReadOnly,
    Unavailable,
    Unreadable,
    VaultError,
)
from pqfs.format.agefile import RangeSource, decrypt_chunks, pread
from pqfs.format.header import Header
from pqfs.format.keys import HybridIdentity, X25519Identity, unwrap
from pqfs.format.stream import (
    CHUNK,
    CT_CHUNK,
    NONCE_SIZE,
    ciphertext_size,
    ciphertext_span,
    decrypt_read_chunks,
    payload_aead,
)
from pqfs.mount.aio import DirectIO, Read
from pqfs.mount.chunkcache import ChunkCache
from pqfs.mount.idlepoll import IdlePoll
from pqfs.mount.metrics import GcMeter, Latency, StallMeter
from pqfs.mount.onchange import ChangeHook
from pqfs.mount.options import MountOptions
from pqfs.mount.workers import WorkerPool
from pqfs.runtime import memory
from pqfs.runtime.memory import populated, scratch, wipe
from pqfs.storage.local import LocalStorage
from pqfs.vault import catalog as cat_mod
from pqfs.vault.catalog import Catalog, Entry, shown
from pqfs.vault.keycache import CachedKey, KeyCache
from pqfs.vault.vault import Vault, object_key

log = logging.getLogger("pqfs.mount")
T = TypeVar("T")

ROOT_INO = 1
REPLY_POOL = 16  # wiped max_read buffers kept for reads that wait on workers
REPLY_SPARES = 2  # of which workers keep this many faulted in ahead of need
HINT_CHUNKS = 64  # how far ahead of readahead the backend is asked to start fetching
# After a read of a file found its storage unavailable (its whole time budget spent), reads of
# that file fail at once for this long: the kernel retries a failed readahead page by page, and
# each retry would otherwise wait out the budget again.
UNAVAILABLE_HOLD = 2.0


@dataclass(frozen=True)
class Space:
    """What statfs reports (df, file managers), in blocks of `block` bytes: the tree's files as
    used, the store's free room as free; entries likewise."""

    block: int
    used_blocks: int
    free_blocks: int
    avail_blocks: int  # free to an unprivileged user
    entries: int
    free_entries: int


BLOCK = 4096
# A remote store has no free space to ask for: report a petabyte, as rclone does, so that df
# shows what the tree uses instead of a full disk, and no program refuses to copy from it.
REMOTE_FREE = 1 << 50
REMOTE_FREE_ENTRIES = 1 << 30


@dataclass
class Attr:
    ino: int
    mode: int
    size: int
    mtime_ns: int
    nlink: int


@dataclass
class Node:
    ino: int
    entry: Entry
    attr: Attr
    children: dict[str, int] | None = None  # directories: name -> inode
    names: list[str] = field(default_factory=list)  # directories: sorted, for readdir offsets


class Tree:
    """The catalog as inodes. Built whole and swapped in one assignment, so a lookup never sees
    half a reload. Inode numbers are a keyed hash of (path, object): stable across lock/unlock
    and reloads, and a replaced file gets a new inode (the kernel's cached pages of the old
    content are never served for the new one). Every value comes from a loaded catalog, whose
    ops were checked on load (catalog.py): no wrong-typed value reaches a FUSE handler."""

    def __init__(self, cat: Catalog, salt: bytes) -> None:
        self.head = cat.head_seq
        self.warnings = tuple(cat.warnings)  # logged when the tree is swapped in
        self.nodes: dict[int, Node] = {}
        self._by_path: dict[str, int] = {}
        self._salt = salt
        # The root, explicit or implied (dated by the newest entry below it, as every implied
        # directory is: never 1970).
        root = cat.get("") or Entry("", "dir", 0o755, 0)
        self._add_node("", root, ROOT_INO)
        for path in sorted(cat.entries):  # a directory before what is below it
            if path:
                self._ensure(path, cat.entries[path], cat)
        for node in self.nodes.values():
            if node.children is not None:
                node.names = sorted(node.children)
                node.attr.nlink = 2 + sum(
                    1 for i in node.children.values() if self.nodes[i].children is not None
                )

    def _ino(self, path: str, e: Entry) -> int:
        n = 0
        while True:
            h = hashlib.blake2b(
                f"{path}\0{e.object}\0{n}".encode("utf-8", "surrogateescape"),
                key=self._salt,
                digest_size=8,
            ).digest()
            ino = int.from_bytes(h, "big") >> 1
            if ino > ROOT_INO and ino not in self.nodes:
                return ino
            n += 1

    def _add_node(self, path: str, e: Entry, ino: int) -> int:
        is_dir = e.type == "dir"
        # Permission bits only, whatever the entry says: nothing is served setuid or setgid.
        mode = (stat.S_IFDIR if is_dir else stat.S_IFREG) | (e.mode & 0o777 or 0o644)
        if is_dir:
            mode |= 0o700  # the owner can always list and control (xattrs) what they mounted
        attr = Attr(ino, mode, e.size if not is_dir else 0, e.mtime_ns, 2 if is_dir else 1)
        self.nodes[ino] = Node(ino, e, attr, {} if is_dir else None)
        self._by_path[path] = ino
        return ino

    def _ensure(self, path: str, e: Entry, cat: Catalog) -> None:
        """Add `path` and each implied directory above it not added yet (iteratively: a path
        can be deeper than Python's recursion allows). An entry below a file cannot come from
        a loaded catalog, which ignores such puts; should one come, it is skipped and logged,
        never a reason to refuse the whole tree."""
        missing = []
        p = path
        while p not in self._by_path:
            missing.append(p)
            p = p.rpartition("/")[0]
        for q in reversed(missing):
            parent_path, _, name = q.rpartition("/")
            parent = self.nodes[self._by_path[parent_path]]
            if parent.children is None:
                log.warning(
                    "catalog lists %s below the file %s: skipped", shown(path), shown(parent_path)
                )
                return
            entry = e if q == path else (cat.get(q) or Entry(q, "dir", 0o755, 0))
            parent.children[name] = self._add_node(q, entry, self._ino(q, entry))

    def signatures(self) -> dict[str, tuple[object, ...]]:
        """Per path, what a change of it is (changed_paths): a file's object, size, mode and
        mtime; for a directory only that it is one (its date follows what is below it)."""
        out: dict[str, tuple[object, ...]] = {}
        for path, ino in self._by_path.items():
            e = self.nodes[ino].entry
            file = (e.object, e.mac, e.size, e.mode, e.mtime_ns)
            out[path] = ("dir",) if e.type == "dir" else file
        return out


def changed_paths(old: Tree, new: Tree) -> list[str]:
    """The vault paths added, removed or replaced from `old` to `new`, sorted."""
    a, b = old.signatures(), new.signatures()
    return sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))


def _refresh_failure(e: Exception) -> str:
    """A failed refresh's cause, for the log: the message of an expected error (secret-free
    by contract), only the type of an unexpected one (its traceback goes with it)."""
    if isinstance(e, (PqfsError, OSError)):
        return str(e)
    return f"internal error {type(e).__name__}"


@dataclass
class OpenFile:
    fh: int
    ino: int
    entry: Entry
    src: RangeSource
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
    hinted: int = 0  # backend offset up to which will_need() was sent
    limiter: trio.Semaphore | None = None  # at most jobs_per_file worker jobs at once
    unavailable: tuple[float, Unavailable] | None = None  # when the storage last did not answer

    @property
    def key_id(self) -> tuple[str, str]:
        return (self.entry.object, self.entry.mac)


class Counters:
    def __init__(self) -> None:
        self.reads = 0
        self.slow_reads = 0  # reads that waited for a worker (not all their chunks were cached)
        self.inline_reads = 0  # reads that decrypted their missing chunks on the loop
        self.direct_reads = 0  # reads whose chunks came from one O_DIRECT read, not a worker
        self.bytes_read = 0
        self.bytes_decrypted = 0
        self.prefetch_chunks = 0
        self.auth_failures = 0
        self.read_errors = 0  # backend failures (unreachable store, missing object)
        self.opens = 0


@dataclass
class _Started:
    """A direct read begun for a read's missing chunks [first, first+count)."""

    first: int
    count: int
    req: Read
    taken: bool = False  # handed to _direct_job, which releases it


class VaultFS:
    def __init__(self, vault: Vault, options: MountOptions | None = None) -> None:
        self.vault = vault
        self.options = opts = options or MountOptions()
        vault.key_cache = self.keys = KeyCache(ttl=opts.key_ttl)
        self.cache = ChunkCache(opts.cache_size)
        self.stall = StallMeter(detail=opts.stall_detail)
        self.idle = IdlePoll(opts.idle_poll, self._idle_fds, self._may_poll)
        self._unseen = 0  # waits the idle poll cannot see, in progress (_unseen_wait)
        self.fuse_fds: list[int] = []  # the FUSE device, set by the adapter once mounted
        self.gc = GcMeter()
        self.latency = Latency()
        self.counters = Counters()
        self.generation = 0
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.tree: Tree | None = None
        # _tree_usage of a tree, which it does not keep alive (lock drops the tree's names)
        self._usage: tuple[weakref.ref[Tree], int, int] | None = None
        self._salt = os.urandom(16)
        self._files: dict[int, OpenFile] = {}
        self._next_fh = 1
        self._inflight: dict[tuple[str, int], trio.Event] = {}
        self._prefetching = 0  # chunks in prefetch jobs not yet finished
        self._streaming: set[int] = set()  # handles being read sequentially (sharing readahead)
        self.pool = WorkerPool(opts.workers, after_job=self._fault_in_spares)
        self._dio: DirectIO | None = None  # created in start(): after the daemon has forked
        # Reply buffers are faulted in before use, never by a first write on the loop: on this
        # project's VM a page's first touch can cost ~0.1 ms (the host backs it only then), so
        # a fresh 1 MiB buffer stalled the loop, or a worker holding the GIL, for 10-25 ms.
        self._reply = populated(opts.max_read)
        self._inline_ct = bytearray(opts.inline_chunks * CT_CHUNK)  # ciphertext: not secret
        self._sent: list[tuple[memoryview, int]] = []  # private reply buffers sent to the kernel
        # Wiped private reply buffers, for reuse. The loop pops and returns them; workers only
        # append new zeroed ones (_fault_in_spares), so a list (atomic append/pop) is enough.
        self._replies: list[memoryview] = []
        self._spares_lock = threading.Lock()  # _fault_in_spares only
        # Before the first read, not inside it: the first read that waits would otherwise fault
        # in a 1 MiB reply buffer on the loop, 256 first touches inside one step (each can cost
        # tens of us on a VM whose host has taken back freed memory).
        self._fault_in_spares()
        self._tls = threading.local()
        self._reuse_ct = vault.storage.reuse_read_buffers
        self._nursery: trio.Nursery | None = None
        self.opened_inodes: set[int] = set()
        self.on_lock: Callable[[Iterable[int]], None] | None = (
            None  # the adapter drops kernel caches
        )
        self.mounted_at = time.time()

    # ------------------------------------------------------------------ lifecycle ----

    async def start(self, nursery: trio.Nursery) -> None:
        """Load the tree and start the background tasks (key expiry, catalog polling)."""
        self._nursery = nursery
        if self.options.direct_reads > 0:
            try:
                self._dio = DirectIO(self.options.direct_reads)
            except OSError as e:
                log.info("reads that miss the page cache go through worker threads: %s", e)
        self.gc.install()
        if self.vault.unlocked:
            await self._load_tree()
        self.settle()
        nursery.start_soon(self._sweep_keys)
        nursery.start_soon(self._poll_catalog)

    def close(self) -> None:
        """Unmount: wipe every key, identity and plaintext buffer."""
        self.lock()
        self.gc.remove()
        self.pool.close()
        for f in list(self._files.values()):
            f.released = True
            self._maybe_close(f)
        self._files.clear()
        if self._dio is not None:
            self._dio.close()
            self._dio = None
        self.vault.storage.close()

    async def _load_tree(self) -> None:
        tree, _ = await self.offload(self._build_tree, None)
        self._swap_tree(tree, None)

    def _build_tree(self, old: Tree | None) -> tuple[Tree, list[str]]:
        """Worker thread: load the catalog and build its tree (a new object, which no other
        thread sees until it is swapped in), and what changed from `old`."""
        tree = Tree(cat_mod.load(self.vault.storage, self.vault.identities), self._salt)
        return tree, [] if old is None else changed_paths(old, tree)

    def _swap_tree(self, new: Tree, old: Tree | None) -> None:
        """Serve `new`; log its catalog warnings (ops ignored), each once per mount's tree."""
        seen = set(old.warnings) if old is not None else set()
        for w in new.warnings:
            if w not in seen:
                log.warning("%s", w)
        self.tree = new
        self.settle()

    @staticmethod
    def settle() -> None:
        """Move every object alive now out of the cyclic collector's reach (gc.freeze): the
        S3 client's models and the tree are long-lived, and a full collection over them would
        stop the loop for tens of ms. They are still freed by reference counting (a replaced
        tree has no cycles); only cyclic garbage among them would stay. No collection first:
        that would be the very pause this avoids (freezing itself is O(1))."""
        gc.freeze()

    async def _sweep_keys(self) -> None:
        period = 1.0 if self.options.key_ttl <= 0 else min(1.0, self.options.key_ttl / 2)
        while True:
            await trio.sleep(period)
            self.keys.sweep()

    async def _poll_catalog(self) -> None:
        """Every catalog_poll seconds, reload the tree if the catalog changed, and run the
        on-change hook for what changed. A running mount never ends because of catalog input:
        an exception here would end the mount's nursery, so a failed refresh, for whatever
        reason, is logged (once until it changes) and the last good tree stays served."""
        hook = None
        if self.options.on_change and self._nursery is not None:
            hook = ChangeHook(self.options.on_change, self._nursery)
        failed: str | None = None
        while True:
            await trio.sleep(self.options.catalog_poll)
            gen = self.generation
            try:
                changed = await self.refresh()
            except Exception as e:
                if gen != self.generation:
                    continue  # locked meanwhile: that explains it, and there is no tree to keep
                why = _refresh_failure(e)
                if why != failed:
                    tree = self.tree
                    head = "none" if tree is None else f"segment {tree.head}"
                    log.warning(
                        "catalog refresh failed (still serving the catalog as of %s): %s",
                        head,
                        why,
                        exc_info=not isinstance(e, (PqfsError, OSError)),
                    )
                failed = why
                continue
            if failed is not None:
                log.info("catalog refresh works again")
                failed = None
            if changed and hook is not None:
                hook.notify(changed)

    async def refresh(self) -> list[str]:
        """Reload the tree if the catalog changed (files added or removed by `pqfs add`/`rm`).
        Returns the vault paths added, removed or replaced (changed_paths), [] if nothing was
        reloaded. Raises if the catalog cannot be loaded: the tree served stays as it was."""
        tree, gen = self.tree, self.generation
        if tree is None or not self.vault.unlocked:
            return []
        segs = await self.offload(cat_mod.list_segments, self.vault.storage)
        head = segs[-1].seq if segs else 0
        if head == tree.head:
            return []
        new, changed = await self.offload(self._build_tree, tree)
        if gen != self.generation or not self.vault.unlocked:
            return []
        self._swap_tree(new, tree)
        return changed

    # ------------------------------------------------------------------ lock / unlock ----

    def lock(self) -> set[int]:
        """Wipe identity, keys and plaintext. Returns the inodes whose pages the kernel may still
        cache: the adapter must drop them before confirming the lock."""
        self.generation += 1
        self.vault.lock()  # wipes identities and the key cache, drops the catalog
        self.keys.clear()
        for f in self._files.values():
            if f.own_key is not None:
                f.own_key.wipe()
                f.own_key = None
        self.cache.clear()
        wipe(self._reply)
        self._wipe_sent()
        self._replies.clear()
        self.tree = None
        opened, self.opened_inodes = self.opened_inodes, set()
        return opened

    async def unlock(
        self,
        passphrase: bytes | bytearray | None = None,
        identities: list[HybridIdentity | X25519Identity] | None = None,
    ) -> None:
        """Unlock with a passphrase (the caller's buffer: the caller wipes it) or identities."""
        if identities is not None:
            self.vault.unlock_with(identities)
        elif passphrase is not None:
            await self.offload(self.vault.unlock, passphrase)
        if self.vault.unlocked:
            await self._load_tree()
            await self.offload(self._fault_in_spares)  # lock() dropped the spare reply buffers

    @property
    def locked(self) -> bool:
        return not self.vault.unlocked

    def _tree(self) -> Tree:
        if self.tree is None:
            raise Locked("the vault is locked (pqfs unlock MOUNTPOINT)")
        return self.tree

    # ------------------------------------------------------------------ metadata ----

    def _node(self, ino: int) -> Node:
        node = self._tree().nodes.get(ino)
        if node is None:
            raise NotFound(f"no inode {ino}")
        return node

    def _dir(self, ino: int) -> tuple[Tree, Node, dict[str, int]]:
        node = self._node(ino)
        if node.children is None:
            raise NotADirectory(f"not a directory: {node.entry.path}")
        return self._tree(), node, node.children

    def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INO and self.tree is None:
            return Attr(ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 2)
        return self._node(ino).attr

    def lookup(self, parent: int, name: str) -> Attr:
        tree, node, children = self._dir(parent)
        if name == ".":
            return node.attr
        if name == "..":
            parent_path = node.entry.path.rpartition("/")[0]
            return self.getattr(ROOT_INO if not parent_path else tree._by_path[parent_path])
        ino = children.get(name)
        if ino is None:
            raise NotFound(f"no such file: {name}")
        return tree.nodes[ino].attr

    def readdir(self, ino: int, start: int) -> list[tuple[str, Attr, int]]:
        """Entries from offset `start`: (name, attributes, offset of the next entry)."""
        tree, node, children = self._dir(ino)
        return [
            (name, tree.nodes[children[name]].attr, i + 1)
            for i, name in enumerate(node.names[start:], start)
        ]

    async def statfs(self) -> Space:
        """The tree's size against the store's free room: a local vault's file system, asked on
        a thread (a network file system may be slow to answer); a remote store's is unknown
        (REMOTE_FREE). A locked vault shows no files, and still the free room."""
        used, entries = self._tree_usage()
        storage = self.vault.storage
        if isinstance(storage, LocalStorage):
            st = await self.offload(os.statvfs, storage.root)
            free, avail = st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize
            free_entries = st.f_favail
        else:
            free = avail = REMOTE_FREE
            free_entries = REMOTE_FREE_ENTRIES
        return Space(BLOCK, used, free // BLOCK, avail // BLOCK, entries, free_entries)

    def _tree_usage(self) -> tuple[int, int]:
        """(blocks of the tree's files, entries): counted once per tree (it never changes; a
        reload builds a new one), not on every statfs of a file manager."""
        tree = self.tree
        if tree is None:
            return 0, 0
        if self._usage is None or self._usage[0]() is not tree:
            blocks = sum(-(-n.attr.size // BLOCK) for n in tree.nodes.values())
            self._usage = (weakref.ref(tree), blocks, len(tree.nodes))
        return self._usage[1], self._usage[2]

    # ------------------------------------------------------------------ open / release ----

    async def open(self, ino: int, flags: int) -> int:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise ReadOnly("the mount is read-only")
        node = self._node(ino)
        if node.children is not None:
            raise IsADirectory(f"is a directory: {node.entry.path}")
        gen = self.generation
        bound = self.vault.storage.timeout * OPEN_TIMEOUTS
        try:
            with self._unseen_wait():  # as offload() does
                f = await run_bounded(
                    functools.partial(self._open_object, node), bound, self._close_unopened
                )
        except Exception as err:
            raise self._open_failed(node.entry, err, gen) from None
        if gen != self.generation:
            self._close_unopened(f)
            raise Locked("the vault was locked while the file was being opened")
        f.fh = self._next_fh
        f.limiter = trio.Semaphore(self.options.jobs_per_file)
        self._next_fh += 1
        self._files[f.fh] = f
        self.opened_inodes.add(ino)
        self.counters.opens += 1
        self.counters.bytes_decrypted += f.decrypted
        return f.fh

    def _open_object(self, node: Node) -> OpenFile:
        """Worker thread: open the object and check it as FORMAT.md §4.1 asks before any byte
        of it is served: the header against the catalog, the file key (header MAC), the object
        size against the catalog's, and the final chunk, authenticated (a truncated or extended
        object fails here, not after its first chunks were played). The final chunk stays in
        the chunk cache: tag readers and demuxers read the end of a file first."""
        e = node.entry
        generation = self.cache.generation  # before anything is decrypted: see ChunkCache.insert
        chunks = -(-e.size // CHUNK) or 1
        start = e.hlen + NONCE_SIZE  # the catalog's; the header check below confirms it
        # The final chunk's place is known before the header is read: a remote store fetches it
        # alongside the opening read, so that checking it adds no round trip (s3.py), and a
        # local disk starts reading it while the header is read. Not if it is cached already.
        tail = start + (chunks - 1) * CT_CHUNK
        fetch_tail = (e.object, chunks - 1) not in self.cache
        key = object_key(e.object)
        try:
            storage = self.vault.storage
            src = storage.open_source_with_tail(key, tail) if fetch_tail else storage.open_source(key)
        except FileNotFoundError:
            raise VaultError("content object is missing") from None
        f: OpenFile | None = None
        try:
            if fetch_tail:
                src.will_need(tail, start + ciphertext_size(e.size) - tail)
            header = self.vault._checked_header(e, src)  # its length is hlen: `start` holds
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
            f = OpenFile(0, node.ino, e, src, header, nonce, start, chunks)
            aead = self._cached_aead(f)
            if aead is None:  # unwrap now: the first read costs only decryption
                aead = self._unwrap(f)
            self._authenticate_final_chunk(f, aead, generation)
            return f
        except BaseException:
            if f is not None:
                self._close_unopened(f)
            else:
                src.close()
            raise

    def _authenticate_final_chunk(self, f: OpenFile, aead: Any, generation: int) -> None:
        """Worker thread: decrypt the final chunk (nonce flag 0x01) into the chunk cache; only
        then is the plaintext size trusted. One that is cached was authenticated when cached."""
        last = f.chunks - 1
        if (f.entry.object, last) in self.cache:
            return
        n = ciphertext_span(f.payload_start, f.src.size, f.chunks, last, 1)
        ct = scratch(n)  # ciphertext: not secret
        if f.src.preadinto(f.payload_start + last * CT_CHUNK, ct) != n:
            raise PayloadError(f"chunk {last} could not be read in full (truncated object)", last)
        f.decrypted = self._decrypt(f, aead, last, 1, None, generation, False, ct)

    @staticmethod
    def _close_unopened(f: OpenFile) -> None:
        """Close an object whose open failed or was overtaken by a lock (no job reads it)."""
        f.src.close()
        if f.own_key is not None:
            f.own_key.wipe()
            f.own_key = None

    def _open_failed(self, e: Entry, err: Exception, generation: int) -> Exception:
        """What an open that raised `err` fails with: Locked if the vault was locked meanwhile
        (its key may have been wiped under the unwrap), an unexpected exception as it is (the
        adapter logs it as a bug), anything else Unreadable (EIO), after one log line naming
        the file and what is wrong with its object."""
        if isinstance(err, Locked) or generation != self.generation:
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

    def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        self._streaming.discard(fh)
        if f is not None:
            f.released = True
            self._maybe_close(f)

    def _maybe_close(self, f: OpenFile) -> None:
        if f.released and f.jobs == 0:
            f.src.close()
            if f.own_key is not None:
                f.own_key.wipe()
                f.own_key = None

    def _file(self, fh: int) -> OpenFile:
        f = self._files.get(fh)
        if f is None:
            raise VaultError(f"bad file handle {fh}")
        return f

    # ------------------------------------------------------------------ keys ----

    def _cached_aead(self, f: OpenFile) -> Any:
        """The payload AEAD of an open file if its key is held (any thread), else None."""
        if f.own_key is not None:
            return f.own_key.aead
        hit = self.keys.get(f.key_id)
        return None if hit is None else hit.aead

    def _unwrap(self, f: OpenFile) -> Any:
        """Unwrap the file key (worker thread), cache it, and return the payload AEAD."""
        fk = unwrap(f.header, self.vault.identities)  # raises Locked
        try:
            entry = self.keys.put(f.key_id, fk, payload_aead(fk, f.nonce))
        finally:
            wipe(fk)
        if self.options.key_ttl <= 0:
            f.own_key = entry
        return entry.aead

    async def _aead(self, f: OpenFile) -> Any:
        if self.locked:
            raise Locked("the vault is locked (pqfs unlock MOUNTPOINT)")
        aead = self._cached_aead(f)
        if aead is not None:
            return aead
        gen = self.generation
        aead = await self.pool.run(functools.partial(self._unwrap, f))
        if gen != self.generation:
            raise Locked("the vault was locked during the read")
        return aead

    # ------------------------------------------------------------------ reads ----

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        """Plaintext [off, off+size) of an open file, clipped at its end.

        The returned view is valid until the next call on this loop (the adapter hands it to the
        kernel at once); the buffer behind it is wiped by that next call or by lock()."""
        t0 = time.perf_counter()
        try:
            f = self._file(fh)
            aead = await self._aead(f)
            end = min(off + size, f.entry.size)
            n = end - off
            # A cold read starts its disk read in here, before the bookkeeping of this call.
            now = self._read_now(f, aead, off, end) if 0 < n <= len(self._reply) else None
        except BaseException:
            self._wipe_sent()
            raise
        if n <= 0:
            self._wipe_sent()
            return memoryview(b"")
        last = (end - 1) // CHUNK
        if isinstance(now, memoryview):
            self._wipe_sent()
            out = now
        else:
            self.counters.slow_reads += 1
            out = await self._read_slow(f, aead, off, end, now)
        self._note_access(f, aead, off, end, last)
        c = self.counters
        c.reads += 1
        c.bytes_read += n
        self.latency.add(time.perf_counter() - t0)
        if fh not in self._streaming:
            # A seeking player's next request follows the reply within microseconds. A stream's
            # next one is the kernel's readahead: no one waits on it, and polling would take
            # CPU from the reader and the decrypting workers (measured: 4% less throughput).
            self.idle.arm()
        return out

    def _read_now(self, f: OpenFile, aead: Any, off: int, end: int) -> memoryview | _Started | None:
        """The read answered without waiting, into the shared reply buffer: every chunk cached,
        or the few missing ones decrypted here from ciphertext already in memory. Otherwise
        nothing was decrypted, and the result is either None or, when the few missing chunks
        are on a local disk and not in the page cache, their direct read, already started:
        the disk works while the caller sets up the wait."""
        oid = f.entry.object
        chunks = range(off // CHUNK, (end - 1) // CHUNK + 1)
        # Check before copying: a read that must wait copies into a private buffer, and copying
        # its cached part twice measurably costs CPU on sequential streams.
        missing = [i for i in chunks if (oid, i) not in self.cache]
        ct: memoryview | None = None
        if missing:
            got = self._ciphertext_now(f, missing)
            if not isinstance(got, memoryview):
                return got
            ct = got
        out = memoryview(self._reply)[: end - off]
        cached = chunks if not missing else [i for i in chunks if i not in missing]
        if self._copy_cached(f, off, end, cached, out):
            return None  # evicted under us by a worker: take the slow path
        if ct is not None:
            self.counters.inline_reads += 1  # counted whether or not it authenticates
            try:
                n = self._decrypt(
                    f,
                    aead,
                    missing[0],
                    len(missing),
                    (out, off, end),
                    self.cache.generation,
                    False,
                    ct,
                )
            except PayloadError as e:
                wipe(out)
                self._report(f, off, e)
                raise
            self.counters.bytes_decrypted += n
        return out

    def _ciphertext_now(self, f: OpenFile, missing: list[int]) -> memoryview | _Started | None:
        """The ciphertext of the chunks `missing` if it can be had without waiting: a few
        consecutive chunks, no job decrypting them already, bytes already in memory. If the
        bytes are on a local disk instead, their direct read is started and returned."""
        count = len(missing)
        if count > self.options.inline_chunks or missing[-1] - missing[0] != count - 1:
            return None
        oid = f.entry.object
        if any((oid, i) in self._inflight for i in missing):
            return None
        n = self._span(f, missing[0], count)
        if n is None:
            return None
        ct = memoryview(self._inline_ct)[:n]
        start = f.payload_start + missing[0] * CT_CHUNK
        if f.src.read_cached(start, ct):
            return ct
        req = self._direct_start(f, missing[0], count)
        return None if req is None else _Started(missing[0], count, req)

    def _report(self, f: OpenFile, off: int, err: BaseException) -> None:
        """Count and log a failed read (never with key material or plaintext), and mark the
        error logged: the adapter does not log it again."""
        if isinstance(err, PayloadError):  # "chunk N failed authentication", or truncated
            self.counters.auth_failures += 1
            log.error("%s: %s; read at offset %d refused (EIO)", shown(f.entry.path), err, off)
        else:
            self.counters.read_errors += 1
            log.error("%s: read at offset %d failed (EIO): %s", shown(f.entry.path), off, err)
        if isinstance(err, PqfsError):
            err.logged = True

    def _copy_cached(
        self, f: OpenFile, off: int, end: int, chunks: Iterable[int], out: memoryview
    ) -> set[int]:
        """Copy the cached chunks among `chunks` into `out` (which holds [off, end)); returns the
        chunks that were not cached."""
        missing = set()
        oid = f.entry.object
        for i in chunks:
            lo, hi = max(off, i * CHUNK), min(end, (i + 1) * CHUNK)
            if not self.cache.copy_out((oid, i), lo - i * CHUNK, out[lo - off : hi - off]):
                missing.add(i)
        return missing

    async def _read_slow(
        self, f: OpenFile, aead: Any, off: int, end: int, started: _Started | None = None
    ) -> memoryview:
        """The read that waits, into a private buffer. `started`: the direct read of its missing
        chunks, begun by _read_now; there is no checkpoint between that and its claim in
        _direct_job, so no other reader can start the same chunks in between."""
        try:
            return await self._read_waiting(f, aead, off, end, started)
        finally:
            if started is not None and not started.taken:  # an error before the job took it
                await started.req.release()

    async def _read_waiting(
        self, f: OpenFile, aead: Any, off: int, end: int, started: _Started | None
    ) -> memoryview:
        self._wipe_sent()
        # A private buffer: other reads reuse the shared one while this read waits.
        buf = self._replies.pop() if self._replies and end - off <= self.options.max_read else None
        if buf is None:
            buf = populated(max(end - off, self.options.max_read))
        out = memoryview(buf)[: end - off]
        gen = self.generation
        pending = self._copy_cached(f, off, end, range(off // CHUNK, (end - 1) // CHUNK + 1), out)
        if pending and f.unavailable is not None:
            since, cause = f.unavailable
            if time.monotonic() - since < UNAVAILABLE_HOLD:
                wipe(buf)
                raise cause
            f.unavailable = None
        attempt = 0
        while pending:
            oid = f.entry.object
            # First try: share chunks another job is already decrypting. After that, decrypt all
            # that is still missing ourselves (the shared copy failed or was evicted).
            waits = [self._inflight[(oid, i)] for i in pending if (oid, i) in self._inflight]
            if attempt > 0:
                waits = []
            mine = sorted(i for i in pending if attempt > 0 or (oid, i) not in self._inflight)
            errors: list[BaseException] = []
            runs = _runs(mine, self.options.job_chunks)
            if len(runs) == 1 and not waits:  # the common case: no nursery to set up
                first, count = runs[0]
                req = None
                if started is not None and (started.first, started.count) == (first, count):
                    started.taken, req = True, started.req
                    started = None  # handed over: never again from here
                elif attempt == 0:
                    req = self._direct_start(f, first, count)
                dest = (out, off, end)
                read = req is not None and await self._direct_job(
                    f, aead, first, count, dest, errors, req
                )
                if not read and attempt == 0:  # S3: one GET from this loop (s3async)
                    read = await self._fetch_job(f, aead, first, count, dest, errors)
                if not read:
                    await self._job(f, aead, first, count, False, dest, errors)
            else:
                async with trio.open_nursery() as nursery:
                    for first, count in runs:
                        nursery.start_soon(
                            self._job, f, aead, first, count, False, (out, off, end), errors
                        )
                    for ev in waits:
                        nursery.start_soon(ev.wait)
            if gen != self.generation:
                wipe(buf)
                raise Locked("the vault was locked during the read")
            if errors:
                wipe(buf)
                err = errors[0]
                self._report(f, off, err)
                if isinstance(err, Unavailable):
                    f.unavailable = (time.monotonic(), err)
                raise err
            done = set(mine)
            pending = self._copy_cached(f, off, end, sorted(pending - done), out)
            attempt += 1
        self._sent.append(
            (buf, end - off)
        )  # only now: an earlier _wipe_sent() must not wipe it mid-read
        return out[: end - off]

    @contextlib.contextmanager
    def _claim(self, f: OpenFile, first: int, count: int) -> Iterator[None]:
        """Mark chunks [first, first+count) as being decrypted (readers of them wait for this
        instead of decrypting them again) and the file as read from (it is not closed under
        the read); both undone, and waiters woken, whatever happens."""
        events = []
        for i in range(first, first + count):
            k = (f.entry.object, i)
            if k not in self._inflight:
                ev = self._inflight[k] = trio.Event()
                events.append((k, ev))
        f.jobs += 1
        try:
            yield
        finally:
            f.jobs -= 1
            for k, ev in events:
                if self._inflight.get(k) is ev:
                    del self._inflight[k]
                ev.set()
            self._maybe_close(f)

    async def _job(
        self,
        f: OpenFile,
        aead: Any,
        first: int,
        count: int,
        prefetch: bool,
        dest: tuple[memoryview, int, int] | None,
        errors: list[BaseException],
    ) -> None:
        """Decrypt chunks [first, first+count) on a worker thread into the cache (and `dest`)."""
        if prefetch:
            # Between start_soon and now a reader may have begun reading the first of these
            # chunks itself (it found them neither cached nor claimed): don't fetch them twice.
            oid = f.entry.object
            while count and ((oid, first) in self._inflight or (oid, first) in self.cache):
                first, count = first + 1, count - 1
            if not count:
                return
            self._prefetching += count
        try:
            with self._claim(f, first, count):
                job = functools.partial(
                    self._decrypt, f, aead, first, count, dest, self.cache.generation, prefetch
                )
                assert f.limiter is not None
                await trio.lowlevel.checkpoint_if_cancelled()  # pool.run's wait is shielded
                try:  # no scheduler round trip when a slot is free (the usual case)
                    f.limiter.acquire_nowait()
                except trio.WouldBlock:
                    await f.limiter.acquire()
                try:
                    n = await self.pool.run(job, urgent=not prefetch)
                finally:
                    f.limiter.release()
            self.counters.bytes_decrypted += n
            if prefetch:
                self.counters.prefetch_chunks += count
        except (PqfsError, OSError) as e:
            if prefetch:  # the read that needs the chunk will decrypt it again and report it
                log.debug("prefetch of %s chunks %d+%d failed: %s", f.entry.path, first, count, e)
            else:
                errors.append(e if isinstance(e, PqfsError) else VaultError(str(e)))
        finally:
            if prefetch:
                self._prefetching -= count

    def _direct_start(self, f: OpenFile, first: int, count: int) -> Read | None:
        """Start one O_DIRECT read of the ciphertext of a few chunks on a local disk, submitted
        from here (as inline reads are decrypted here: less work than a thread hop). None, with
        nothing started, where that is not possible or the kernel would block to start it: the
        caller sends a worker job instead."""
        dio = self._dio
        if dio is None or count > self.options.inline_chunks:
            return None
        fd = f.src.direct_fd()
        n = None if fd is None else self._span(f, first, count)
        if fd is None or n is None:
            return None
        req = dio.submit(fd, f.payload_start + first * CT_CHUNK, n)
        if req is not None:
            self.idle.arm()  # the disk answers in ~0.1-0.2 ms
        return req

    @staticmethod
    def _span(f: OpenFile, first: int, count: int) -> int | None:
        """Ciphertext bytes of chunks [first, first+count); None for a truncated object (the
        worker path, which reads it the ordinary way, reports that)."""
        try:
            return ciphertext_span(f.payload_start, f.src.size, f.chunks, first, count)
        except PayloadError:
            return None

    async def _direct_job(
        self,
        f: OpenFile,
        aead: Any,
        first: int,
        count: int,
        dest: tuple[memoryview, int, int],
        errors: list[BaseException],
        req: Read,
    ) -> bool:
        """Finish a direct read (`_direct_start`) with `_loop_job`. False if the kernel refused
        it at completion (it would have blocked): the caller sends a worker job instead.
        Releases `req` in any case (its buffer holds the ciphertext until decrypted)."""

        async def ciphertext() -> memoryview | None:
            try:
                ct = await req.result()
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise VaultError(str(e)) from None
                if self._dio is not None:  # RWF_NOWAIT said so at completion, not at submit
                    self._dio.refused += 1
                return None
            self.counters.direct_reads += 1  # counted whether or not it authenticates
            if len(ct) != req.length:
                raise PayloadError(
                    f"chunk {first} could not be read in full (truncated object)", first
                )
            return ct

        try:
            return await self._loop_job(f, aead, first, count, dest, errors, ciphertext)
        finally:
            await req.release()

    async def _fetch_job(
        self,
        f: OpenFile,
        aead: Any,
        first: int,
        count: int,
        dest: tuple[memoryview, int, int],
        errors: list[BaseException],
    ) -> bool:
        """A few chunks fetched by the source itself on this loop (S3: one GET, `s3async`),
        with `_loop_job`. False, with nothing done, where the source cannot or its one attempt
        failed: the caller sends a worker job."""
        n = self._span(f, first, count) if f.src.fetches else None
        if count > self.options.inline_chunks or n is None:
            return False
        ct = scratch(n)  # ciphertext: not secret

        async def ciphertext() -> memoryview | None:
            with self._unseen_wait():  # its socket is not among the idle poll's descriptors
                got = await f.src.fetch(f.payload_start + first * CT_CHUNK, ct)
            return ct if got else None

        return await self._loop_job(f, aead, first, count, dest, errors, ciphertext)

    async def _loop_job(
        self,
        f: OpenFile,
        aead: Any,
        first: int,
        count: int,
        dest: tuple[memoryview, int, int],
        errors: list[BaseException],
        ciphertext: Callable[[], Awaitable[memoryview | None]],
    ) -> bool:
        """Chunks [first, first+count) whose ciphertext `ciphertext()` gets without a thread,
        decrypted on this loop into the cache and `dest` (two chunks cost less than a thread
        hop). An error lands in `errors`. False, with nothing decrypted, when `ciphertext()`
        gives None: the caller then sends a worker job."""
        with self._claim(f, first, count):
            generation = self.cache.generation
            bufs = self.cache.lend(count)  # while the read is in flight: new buffers fault pages
            try:
                ct = await ciphertext()
                if ct is None:
                    return False
                self.counters.bytes_decrypted += self._decrypt(
                    f, aead, first, count, dest, generation, False, ct, bufs
                )
            except PqfsError as e:
                errors.append(e)
            finally:
                if bufs:  # not taken over by _decrypt (which gives back or inserts them)
                    self.cache.give_back(bufs)
        return True

    def _decrypt(
        self,
        f: OpenFile,
        aead: Any,
        first: int,
        count: int,
        dest: tuple[memoryview, int, int] | None,
        generation: int,
        prefetch: bool,
        read: memoryview | None = None,
        lent: list[memoryview] | None = None,
    ) -> int:
        """Worker thread: one backend read, `count` chunk decryptions into lent cache buffers.
        With `read` (the chunks' ciphertext, already read) it runs on the loop. `lent`: buffers
        already lent by the cache; this call takes them over (the list is emptied)."""
        ct: memoryview | None = None
        if self._reuse_ct and read is None:
            ct = getattr(self._tls, "ct", None)
            if ct is None or len(ct) < count * CT_CHUNK:
                ct = self._tls.ct = populated(
                    max(count, self.options.job_chunks) * CT_CHUNK, lock=False
                )  # ciphertext: not worth the mlock budget
        if prefetch:  # keep the backend a window ahead of the decrypt jobs
            lo = max(f.hinted, f.payload_start + (first + count) * CT_CHUNK)
            hi = f.payload_start + (first + count + HINT_CHUNKS) * CT_CHUNK
            if lo < hi:
                f.hinted = hi
                f.src.will_need(lo, hi - lo)
        if lent:
            bufs = lent[:]
            lent.clear()
        else:
            bufs = self.cache.lend(count)
        outs = [memoryview(b) for b in bufs]
        try:
            if read is not None:
                lens = decrypt_read_chunks(aead, read, f.chunks, first, outs)
            else:
                lens = decrypt_chunks(
                    aead,
                    f.src,
                    f.payload_start,
                    f.chunks,
                    first,
                    outs,
                    ct,
                )
        except BaseException:
            self.cache.give_back(bufs)
            raise
        if dest is not None:
            out, off, end = dest
            for k, buf in enumerate(bufs):
                base = (first + k) * CHUNK
                lo, hi = max(off, base), min(end, base + lens[k])
                if lo < hi:
                    out[lo - off : hi - off] = memoryview(buf)[lo - base : hi - base]
        keys = [(f.entry.object, first + k) for k in range(count)]
        self.cache.insert(keys, bufs, lens, generation, prefetched=prefetch)
        return sum(lens)

    # ------------------------------------------------------------------ prefetch ----

    def _note_access(self, f: OpenFile, aead: Any, off: int, end: int, last: int) -> None:
        """Sequential-access detection and readahead scheduling for one open file."""
        opts = self.options
        slack = opts.max_read * 2  # the kernel's own readahead arrives a little out of order
        if (f.last_end - slack <= off <= f.last_end + slack and off > 0) or off == f.last_end:
            f.streak += 1
            f.last_end = max(f.last_end, end)
        else:
            f.streak = 0
            f.last_end = end
            f.window = opts.prefetch_start
            f.ahead = last
            self._streaming.discard(f.fh)
            return
        if f.streak < 2 or self._nursery is None:
            return
        self._streaming.add(f.fh)
        # Readahead of all streams together stays within half the cache, so that one stream's
        # prefetched chunks are not evicted by another's before they are read.
        fair = self.cache.capacity // (2 * len(self._streaming))
        limit = max(opts.prefetch_start, min(opts.prefetch_max, fair))
        f.window = max(opts.prefetch_start, min(limit, f.window * 2))
        target = min(f.chunks - 1, last + f.window)
        start = max(f.ahead, last) + 1
        oid = f.entry.object
        todo = [
            i
            for i in range(start, target + 1)
            if (oid, i) not in self._inflight and (oid, i) not in self.cache
        ]
        budget = opts.prefetch_inflight - self._prefetching
        todo = todo[: max(0, budget)]
        if not todo:
            return
        behind = f.ahead - last >= opts.job_chunks
        if len(todo) < opts.job_chunks and todo[-1] < f.chunks - 1 and behind:
            # Less than a job is due and the reader is still a job behind what is prefetched:
            # wait and send whole jobs (on S3 one job is one GET, and small GETs cost the
            # server and this daemon twice the CPU per byte).
            return
        f.ahead = todo[-1]
        for first, count in _runs(todo, opts.job_chunks):
            self._nursery.start_soon(self._job, f, aead, first, count, True, None, [])

    # ------------------------------------------------------------------ reply buffers ----

    def _fault_in_spares(self) -> None:
        """Fault in buffers the next reads will need (cache buffers, private reply buffers),
        off the loop and without the GIL: by a worker after each job, before the mount
        serves, and after an unlock."""
        self.cache.top_up()
        # One topper at a time: workers finishing together would each see the shortfall and
        # overshoot the bound by a 1 MiB buffer apiece. The others skip; the next job tops up.
        if not self._spares_lock.acquire(blocking=False):
            return
        try:
            while len(self._replies) < REPLY_SPARES:
                self._replies.append(populated(self.options.max_read))
        finally:
            self._spares_lock.release()

    def _wipe_sent(self) -> None:
        """Wipe the private reply buffers of earlier reads: their replies have been sent."""
        for b, used in self._sent:
            wipe(memoryview(b)[:used])  # the rest was never written: pooled buffers are zero
            if len(self._replies) < REPLY_POOL:
                self._replies.append(b)
        self._sent.clear()

    @contextlib.contextmanager
    def _unseen_wait(self) -> Iterator[None]:
        """Around a wait whose end the idle poll cannot see (a thread, a socket): the loop
        does not poll meanwhile."""
        self._unseen += 1
        try:
            yield
        finally:
            self._unseen -= 1

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """trio.to_thread.run_sync, counted: the loop does not poll while such a thread runs
        (its completion is not among the descriptors polled, and polling holds the GIL)."""
        with self._unseen_wait():
            return await trio.to_thread.run_sync(fn, *args)

    def _may_poll(self) -> bool:
        """The idle poll's rule: nothing outstanding that it cannot see, no worker that it
        would take CPU time or the GIL from."""
        return self._unseen == 0 and self.pool.idle

    def _idle_fds(self) -> list[int]:
        """What the idle poll waits for: a FUSE request, or a direct read completing."""
        return self.fuse_fds + ([] if self._dio is None else self._dio.inflight_fds())

    # ------------------------------------------------------------------ stats ----

    def stats(self) -> dict[str, object]:
        c, cache = self.counters, self.cache
        looked = cache.hits + cache.misses
        p50, p99 = self.latency.percentile(50), self.latency.percentile(99)
        return {
            "vault": self.vault.storage.describe(),
            "locked": self.locked,
            "uptime_s": round(time.time() - self.mounted_at, 1),
            "open_files": len(self._files),
            "reads": c.reads,
            "reads_waited": c.slow_reads,
            "reads_inline": c.inline_reads,
            "reads_direct": c.direct_reads,
            "reads_direct_refused": 0 if self._dio is None else self._dio.refused,
            "read_p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "read_p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "bytes_read": c.bytes_read,
            "bytes_decrypted": c.bytes_decrypted,
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "cache_hit_rate": round(cache.hits / looked, 4) if looked else None,
            "cache_bytes": cache.bytes_cached,
            "cache_budget": self.options.cache_size,
            "cache_evictions": cache.evictions,
            "prefetch_chunks": c.prefetch_chunks,
            "prefetch_hits": cache.prefetch_hits,
            "key_entries": len(self.keys),
            "key_hits": self.keys.hits,
            "key_misses": self.keys.misses,
            "key_ttl_s": self.options.key_ttl,
            "auth_failures": c.auth_failures,
            "read_errors": c.read_errors,
            "loop_stall_max_ms": round(self.stall.longest * 1000, 3),
            "loop_stall_max_cpu_ms": round(self.stall.longest_cpu * 1000, 3),
            "loop_step_cpu_max_ms": round(self.stall.busiest * 1000, 3),
            "loop_stall_task": self.stall.longest_task,
            "loop_stalls_over_10ms": self.stall.over_10ms,
            **self.stall.detail_stats(),
            "gc_pause_max_ms": round(self.gc.longest * 1000, 3),
            "idle_polls": self.idle.polls,
            "idle_poll_hits": self.idle.hits,
            "idle_poll_ms": round(self.idle.spent * 1000, 3),
            "gc_collections": self.gc.collections,
            **memory.stats(),  # core dumps and locked buffers (memory.py)
            **self.vault.storage.stats(),
        }


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


# How long opening a file may take, in storage timeouts (Storage.timeout, --timeout): an
# open is up to two storage operations (the object's opening bytes, its final chunk).
OPEN_TIMEOUTS = 2


async def run_bounded(fn: Callable[[], T], timeout: float, discard: Callable[[T], None]) -> T:
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
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except BaseException:  # fn failed, or a cancellation from outside (unmount) abandoned it
        abandon()
        raise
    abandon()
    raise VaultError(f"content object did not open within {timeout:g} s (storage not answering)")


def _runs(indices: Iterable[int], limit: int) -> list[tuple[int, int]]:
    """Sorted chunk indices as (first, count) runs of consecutive chunks, at most `limit` long."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] < limit:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs
