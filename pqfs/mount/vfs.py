"""The mount's core: an unlocked vault seen as inodes, directories and plaintext reads.

It knows nothing of FUSE (the pyfuse3 adapter is `fuseops.py`), so it is tested directly under
trio. It raises PqfsError subclasses; the adapter is the one place that maps them to errno.
`VaultFS` is the facade (lifecycle, lock and unlock, metadata, statfs, stats) over parts that
each keep their own invariants: the tree (tree.py), open files and their keys (openfile.py),
reads (reader.py) and the ciphertext sources they use (sources.py), readahead (readahead.py),
reply buffers (replies.py), the chunk cache, the worker pool, the idle poll.

Threads: everything runs on the trio thread except what a docstring marks "Worker thread" (the
pool, `workers.py`: decrypt jobs, a read's key unwrap, faulting in spare buffers) or "On a
thread" (`trio.to_thread`: opens with the object's checks, its unwrap and its final chunk;
catalog loads; statfs; the unlock's scrypt; kernel cache invalidation at lock).

Invariants (kept here):
  * `lock()` wipes the identity, every key (the key cache, and the keys open files hold), all
    cached and reply plaintext, and drops the tree, with no await in between; the reader's
    `generation` then tells work begun before it to wipe what it produced instead of using it;
  * a reloaded tree is swapped in only if no lock came while it loaded, and never half-built;
  * before it sleeps, the loop may poll for up to `idle_poll` (`idlepoll.py`), only while
    `may_poll()` holds: every wait the poll cannot see (trio.to_thread, S3 fetches on the
    loop) goes through `offload()` or `unseen.wait()`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from pqfs.errors import CatalogDamaged, IsADirectory, Locked, NotFound, PqfsError, VaultError
from pqfs.format.keys import HybridIdentity, X25519Identity
from pqfs.mount.chunkcache import ChunkCache
from pqfs.mount.idlepoll import IdlePoll, Unseen
from pqfs.mount.metrics import GcMeter, StallMeter
from pqfs.mount.onchange import ChangeHook
from pqfs.mount.options import MountOptions
from pqfs.mount.reader import ChunkReader
from pqfs.mount.replies import Replies
from pqfs.mount.tree import ROOT_INO, Attr, Node, Tree, changed_paths
from pqfs.mount.workers import WorkerPool
from pqfs.mount.writes import Writes
from pqfs.runtime import memory
from pqfs.storage.base import bounds_of
from pqfs.storage.local import LocalStorage
from pqfs.vault import bounds as vault_bounds
from pqfs.vault import catalog as cat_mod
from pqfs.vault.keycache import KeyCache
from pqfs.vault.vault import Vault

log = logging.getLogger("pqfs.mount")


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
class Handle:
    """An open file of the mount: its node (which an unlink does not take from it), whether
    it may write, and the reader's handle of the object it last read (reopened when a commit
    gave the node a new one)."""

    node: Node
    writable: bool
    rfh: int = 0
    robject: str = ""


def _refresh_failure(e: Exception) -> str:
    """A failed refresh's cause, for the log: the message of an expected error (secret-free
    by contract), only the type of an unexpected one (its traceback goes with it)."""
    if isinstance(e, (PqfsError, OSError)):
        return str(e)
    return f"internal error {type(e).__name__}"


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection while a catalog loads and its tree is built and frozen: loading
    20,000 entries made collections that stopped the loop for up to 31 ms (every thread stops
    for one), walking the very objects the freeze then takes out of its reach. Reference
    counting still frees what dies meanwhile. Nested or overlapping pauses (a refresh during an
    unlock's load) end with the last one; trio thread only. A store that hangs a load keeps
    the collector off that long (a remote store's load is bounded by its --timeout)."""
    global _pauses
    if _pauses == 0:
        _pauses_restore[0] = gc.isenabled()
    _pauses += 1
    gc.disable()
    try:
        yield
    finally:
        _pauses -= 1
        if _pauses == 0 and _pauses_restore[0]:
            gc.enable()


_pauses = 0  # collector_paused() contexts open
_pauses_restore = [True]  # whether the collector ran before the first of them


class VaultFS:
    def __init__(self, vault: Vault, options: MountOptions | None = None) -> None:
        self.vault = vault
        self.options = opts = options or MountOptions.for_storage(vault.storage)
        self.keys = KeyCache(ttl=opts.key_ttl, max_entries=opts.key_cache_entries)
        vault.key_cache = self.keys
        self.cache = ChunkCache(opts.cache_size)
        self.stall = StallMeter(detail=opts.stall_detail)
        self.unseen = Unseen()
        self.offload = self.unseen.offload
        self.idle = IdlePoll(opts.idle_poll, self.idle_fds, self.may_poll)
        self.fuse_fds: list[int] = []  # the FUSE device, set by the adapter once mounted
        self.gc = GcMeter()
        self.uid = opts.uid if opts.uid >= 0 else os.getuid()
        self.gid = opts.gid if opts.gid >= 0 else os.getgid()
        self.mode_mask = ~opts.umask & 0o7777 if opts.umask >= 0 else 0o7777
        self.tree: Tree | None = None
        self._unloadable = -1  # the catalog head whose load failed: retried once it changes
        self._salt = os.urandom(16)
        self.replies = Replies(opts, self.cache)
        self.pool = WorkerPool(
            opts.workers,
            after_job=self.replies.fault_in_spares,
            spare_eventfds=opts.spare_eventfds,
        )
        # Before the first read, not inside it: the first read that waits would otherwise fault
        # in a 1 MiB reply buffer on the loop, 256 first touches inside one step (each can cost
        # tens of us on a VM whose host has taken back freed memory).
        self.replies.fault_in_spares()
        self.reader = reader = ChunkReader(
            vault,
            opts,
            cache=self.cache,
            keys=self.keys,
            pool=self.pool,
            replies=self.replies,
            idle=self.idle,
            unseen=self.unseen,
        )
        self.sources, self.readahead = reader.sources, reader.readahead
        self.counters, self.latency = reader.counters, reader.latency
        self.handles: dict[int, Handle] = {}
        self._next_handle = 1
        self.writes = Writes(vault, opts, self.offload, self._tree, (self.uid, self.gid))
        self.writes.head_after = self._own_delta
        self.writes.after_round = self.settle
        self._nursery: trio.Nursery | None = None
        self.opened_inodes: set[int] = set()
        self.mounted_at = time.time()

    # ------------------------------------------------------------------ lifecycle ----

    async def start(self, nursery: trio.Nursery) -> None:
        """Load the tree and start the background tasks (key expiry, catalog polling)."""
        self._nursery = self.readahead.nursery = self.reader.ahead.nursery = nursery
        self.sources.open_direct()  # after the daemon has forked
        self.gc.install()
        if self.vault.unlocked:
            await self._load_tree()
        self.settle()
        nursery.start_soon(self._sweep_keys)
        nursery.start_soon(self._poll_catalog)
        if not self.options.read_only:
            nursery.start_soon(self.writes.run)

    async def drain(self, locking: bool = False) -> None:
        """Commit everything written (unmount, stop, lock, `pqfs sync`); raises if something
        could not be committed (it stays staged). `locking`: no new change is taken meanwhile
        (EACCES, as once locked), and what a write in progress adds is committed too, so the
        lock that follows wipes nothing."""
        w = self.writes
        w.closing = locking
        try:
            for _ in range(100):
                if not (w.pending or w.active) or not self.vault.unlocked:
                    return
                await w.sync()
                if not locking:
                    return
                if w.active:
                    await trio.sleep(0.01)  # a write still finishing: commit it too
            raise VaultError("writes kept coming while the mount was being locked")
        except BaseException:
            w.closing = False
            raise

    def close(self) -> None:
        """Unmount (after drain()): wipe every key, identity and plaintext buffer."""
        if self.writes.dirty or self.writes.ops:
            log.error(
                "unmounted with %d file(s) and %d operation(s) not committed: they are lost",
                len(self.writes.dirty),
                len(self.writes.ops),
            )
        self.lock()
        self.gc.remove()
        self.pool.close()
        self.reader.close()
        self.sources.close()
        self.vault.storage.close()

    async def _load_tree(self) -> None:
        gen = self.generation
        with collector_paused():
            tree, _ = await self.offload(self._build_tree, None)
            if gen == self.generation and self.vault.unlocked:  # a lock meanwhile: no tree
                self._swap_tree(tree, None)

    def _build_tree(self, old: Tree | None) -> tuple[Tree, list[str]]:
        """On a thread (`offload`): load the catalog and build its tree (a new object, which no other
        thread sees until it is swapped in), and what changed from `old`."""
        if old is not None:
            self.vault.refresh_config()  # the catalog changed: the config may have too
        tree = Tree(self.vault.read_catalog(), self._salt, previous=old)
        return tree, [] if old is None else changed_paths(old, tree)

    def _swap_tree(self, new: Tree, old: Tree | None) -> None:
        """Serve `new`; log its catalog warnings (ops ignored), each once per mount's tree."""
        seen = set(old.warnings) if old is not None else set()
        for w in new.warnings:
            if w not in seen:
                log.warning("%s", w)
        self.tree = new
        self.writes.forget_foreign(new.head)
        for h in self.handles.values():  # open files follow their file into the new tree
            old_node = h.node
            n = new.nodes.get(old_node.ino)
            if n is None or n.entry.path != old_node.entry.path:
                # its inode is not kept (a tree loaded at unlock inherits none): the same file
                # at the same path takes its inode back, the one the kernel knows
                n = new.by_path(old_node.entry.path)
                if n is not None and n.entry.object == old_node.entry.object and n.children is None:
                    new.reinode(n, old_node.ino)
                else:
                    n = None
            if n is None:
                old_node.linked = False
            elif n is not old_node:
                n.handles, n.writers = old_node.handles, old_node.writers
                h.node = n
        self.settle()

    def _own_delta(self, seq: int) -> None:
        """This mount appended segment `seq`: if it follows the tree's head, the tree already
        holds it (nothing to reload); else another writer's came between, and the next
        refresh loads both."""
        tree = self.tree
        if tree is not None and seq == tree.head + 1:
            tree.head = seq

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
            hook = ChangeHook(self.options.on_change, self._nursery, self.options)
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
            if failed is not None and self._unloadable < 0:
                log.info("catalog refresh works again")
                failed = None
            if changed and hook is not None:
                hook.notify(changed)

    async def refresh(self) -> list[str]:
        """Reload the tree if the catalog changed (files added or removed by `pqfs add`/`rm`).
        Returns the vault paths added, removed or replaced (changed_paths), [] if nothing was
        reloaded. Raises if the catalog cannot be loaded: the tree served stays as it was."""
        tree, gen = self.tree, self.generation
        if tree is None or not self.vault.unlocked or self.writes.pending:
            return []  # (what this mount has not committed yet: the next poll, once it has)
        mutations = self.writes.mutations
        segs = await self.offload(cat_mod.list_segments, self.vault.storage)
        head = segs[-1].seq if segs else 0
        if head in (tree.head, self._unloadable):
            return []  # unchanged, or the head whose load failed (the poll logged it)
        # No commit round meanwhile: its append would move the head this host has pinned past
        # the catalog being loaded, which would then look rolled back (trust.Rollback).
        async with self.writes.round_lock:
            return await self._reload(tree, gen, head, mutations)

    async def _reload(self, tree: Tree, gen: int, head: int, mutations: int) -> list[str]:
        with collector_paused():
            try:
                new, changed = await self.offload(self._build_tree, tree)
            except CatalogDamaged:  # the catalog itself is bad: wait for a new head
                self._unloadable = head
                raise  # any other error (the store refused, timed out): the next poll tries
            self._unloadable = -1
            if gen != self.generation or not self.vault.unlocked:
                return []
            w = self.writes
            if w.mutations != mutations or w.dirty or w.ops or w.active:
                return []  # written meanwhile: the new tree lacks it (the next poll reloads)
            self._swap_tree(new, tree)  # (frozen before the collector runs again)
        return changed

    # ------------------------------------------------------------------ lock / unlock ----

    def lock(self) -> set[int]:
        """Wipe identity, keys and plaintext (after drain(): what is still staged is wiped
        too). Returns the inodes whose pages the kernel may still cache: the adapter must drop
        them before confirming the lock."""
        self.writes.wipe()
        self.writes.closing = False  # (locked now: writes are refused as such)
        self.reader.lock()  # a new generation; the keys that open files hold wiped
        self.vault.lock()  # wipes identities and the key cache, drops the catalog
        self.keys.clear()
        self.cache.clear()
        self.replies.wipe()
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
            await self.offload(self.replies.fault_in_spares)  # lock() dropped the spares

    @property
    def locked(self) -> bool:
        return not self.vault.unlocked

    @property
    def generation(self) -> int:
        """How many times the mount was locked (the reader's count: see reader.py)."""
        return self.reader.generation

    def _tree(self) -> Tree:
        if self.tree is None:
            raise Locked("the vault is locked (pqfs unlock MOUNTPOINT)")
        return self.tree

    # ------------------------------------------------------------------ metadata ----

    def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INO and self.tree is None:
            return Attr(ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 2)
        return self.node(ino).attr

    def node(self, ino: int) -> Node:
        """The node of `ino`: in the tree, or unlinked and still open."""
        tree = self._tree()
        node = tree.nodes.get(ino)
        if node is None:
            node = self.writes.unlinked.get(ino)
            if node is None:
                raise NotFound(f"no inode {ino}")
        return node

    def lookup(self, parent: int, name: str) -> Attr:
        return self._tree().lookup(parent, name)

    def opendir(self, ino: int) -> None:
        """A listing begins (readdir's offsets stay valid while entries come and go)."""
        tree = self.tree
        node = None if tree is None else tree.nodes.get(ino)
        if tree is not None and node is not None and node.children is not None:
            tree.opened_dir(node)

    def releasedir(self, ino: int) -> None:
        node = None if self.tree is None else self.tree.nodes.get(ino)
        if node is not None:
            Tree.released_dir(node)

    def readdir(self, ino: int, start: int) -> list[tuple[str, Attr, int]]:
        """Entries from offset `start`: (name, attributes, offset of the next entry)."""
        return self._tree().readdir(ino, start)

    async def statfs(self) -> Space:
        """The tree's size against the store's free room: a local vault's file system, asked on
        a thread (a network file system may be slow to answer); a remote store's is unknown:
        the write cache's room when writable, else REMOTE_FREE. A locked vault shows no files,
        and still the free room."""
        used, entries = (0, 0) if self.tree is None else self.tree.usage(BLOCK)
        storage = self.vault.storage
        if isinstance(storage, LocalStorage):
            st = await self.offload(os.statvfs, storage.root)
            free, avail = st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize
            free_entries = st.f_favail
        elif not self.options.read_only:
            # A remote store has no free space to ask for; what a writer can put here at once
            # is what staging has room for (Sonarr and Radarr check it before an import).
            st = await self.offload(os.statvfs, self.options.write_cache)
            room = self.options.write_cache_size - self.writes.budget.spill_used
            free = avail = max(0, min(st.f_bavail * st.f_frsize, room))
            free_entries = REMOTE_FREE_ENTRIES
        else:
            free = avail = REMOTE_FREE
            free_entries = REMOTE_FREE_ENTRIES
        return Space(BLOCK, used, free // BLOCK, avail // BLOCK, entries, free_entries)

    async def open(self, ino: int, flags: int) -> int:
        tree = self._tree()
        node = self.node(ino)
        if node.children is not None:
            raise IsADirectory(f"is a directory: {node.entry.path}")
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        h = Handle(node, writable)
        if writable or flags & os.O_TRUNC:
            self.writes.check_writable()
            if flags & os.O_TRUNC:
                await self.writes.truncate(node, 0)
        elif node.dirty is None:
            h.rfh = await self.reader.open(node)
            h.robject = node.entry.object
            self.opened_inodes.add(ino)
            if self.tree is tree:  # not after a lock or a refresh during the open
                try:
                    self.reader.ahead.note_open(tree, node)
                except Exception:  # open-ahead is a help: it never fails an open that worked
                    log.warning("open-ahead failed (internal error)", exc_info=True)
        return self._handle(h)

    def _handle(self, h: Handle) -> int:
        fh = self._next_handle
        self._next_handle += 1
        self.handles[fh] = h
        self.writes.opened(h.node, h.writable)
        return fh

    def _handle_of(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise VaultError(f"bad file handle {fh}")
        return h

    async def create(self, parent: int, name: str, mode: int, flags: int) -> tuple[int, Attr]:
        node = self.writes.create(parent, name, mode)
        return self._handle(Handle(node, True)), node.attr

    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes | bytearray:
        h = self._handle_of(fh)
        node = h.node
        while node.dirty is not None:  # written and not yet committed: from staging
            data = await self.writes.read(node, off, size)
            if data is not None:
                return data
        if h.robject != node.entry.object:  # committed since this handle last read
            want = node.entry.object
            rfh = await self.reader.open(node)
            if h.robject == want:  # another read of this handle reopened it meanwhile
                self.reader.release(rfh)
            else:
                if h.rfh:
                    self.reader.release(h.rfh)
                h.rfh, h.robject = rfh, want
            self.opened_inodes.add(node.ino)
        return await self.reader.read(h.rfh, off, size)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await self.writes.write(self._handle_of(fh).node, off, data)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.rfh:
            self.reader.release(h.rfh)
        self.writes.released(h.node, h.writable)

    async def fsync(self, fh: int) -> None:
        """Commit the file now (and every operation before): the reply waits for the delta."""
        node = self._handle_of(fh).node
        w = self.writes
        if node.dirty is not None or w.ops or w.round_lock.locked():
            await w.sync([node])  # (after a round in flight: it may hold ops of before)

    async def sync_namespace(self) -> None:
        """fsyncdir: the queued namespace operations committed now (and a round in flight
        waited for: it may hold some of them)."""
        w = self.writes
        if w.ops or w.round_lock.locked():
            await w.sync([])

    async def setattr(self, ino: int, **changes: int | None) -> Attr:
        node = self.node(ino)
        await self.writes.setattr(node, **changes)
        return node.attr

    def mkdir(self, parent: int, name: str, mode: int) -> Attr:
        return self.writes.mkdir(parent, name, mode).attr

    def unlink(self, parent: int, name: str) -> None:
        self.writes.unlink(parent, name)

    def rmdir(self, parent: int, name: str) -> None:
        self.writes.rmdir(parent, name)

    async def rename(
        self, old_parent: int, old: str, new_parent: int, new: str, flags: int
    ) -> None:
        await self.writes.rename(old_parent, old, new_parent, new, flags)

    # ------------------------------------------------------------------ idle poll ----

    def may_poll(self) -> bool:
        """The idle poll's rule: nothing outstanding that it cannot see, no worker that it
        would take CPU time or the GIL from."""
        return self.unseen.count == 0 and self.pool.idle

    def idle_fds(self) -> list[int]:
        """What the idle poll waits for: a FUSE request, or a direct read completing."""
        return self.fuse_fds + self.sources.inflight_fds()

    # ------------------------------------------------------------------ stats ----

    def stats(self) -> dict[str, object]:
        c, cache = self.counters, self.cache
        looked = cache.hits + cache.misses
        p50, p99 = self.latency.percentile(50), self.latency.percentile(99)
        dio = self.sources.dio
        return {
            "vault": self.vault.storage.describe(),
            "locked": self.locked,
            "uptime_s": round(time.time() - self.mounted_at, 1),
            "open_files": len(self.reader.files),
            "reads": c.reads,
            "reads_waited": c.slow_reads,
            "reads_inline": c.inline_reads,
            "reads_direct": c.direct_reads,
            "reads_direct_refused": 0 if dio is None else dio.refused,
            "read_p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "read_p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "opens": c.opens,
            "opened_ahead": c.opened_ahead,
            "opened_ahead_used": c.opened_ahead_used,
            "opened_ahead_wasted": c.opened_ahead_wasted,
            "bytes_read": c.bytes_read,
            "bytes_decrypted": c.bytes_decrypted,
            # what readahead costs: 1.0 is every decrypted byte read once; a seek that throws
            # away its prefetch shows here
            "decrypted_per_byte_read": round(c.bytes_decrypted / c.bytes_read, 3)
            if c.bytes_read
            else None,
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "cache_hit_rate": round(cache.hits / looked, 4) if looked else None,
            "cache_bytes": cache.bytes_cached,
            "cache_budget": self.options.cache_size,
            "cache_evictions": cache.evictions,
            "prefetch_chunks": c.prefetch_chunks,
            "prefetch_dropped": c.prefetch_dropped,
            "prefetch_hits": cache.prefetch_hits,
            "key_entries": len(self.keys),
            "key_hits": self.keys.hits,
            "key_misses": self.keys.misses,
            "keys_derived": self.vault.keys_derived,  # of the misses: no KEM (FORMAT.md §2.2)
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
            **self.writes.stats_dict(),
            "bounds": self.options.bounds(),  # every bound of the mount (options.py)
            "vault_bounds": bounds_of(vault_bounds.BOUNDS),  # and of the vault (vault/bounds.py)
        }
