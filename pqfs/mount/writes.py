"""Writes through the mount: the namespace operations on the tree and written data staged per
inode (staging.py); the commit rounds that make them part of the vault are commits.py.

A commit writes each changed file as a new content object (as `pqfs add` does), makes the batch
durable, then appends one catalog delta (create-if-absent) holding, in order, every namespace
operation since the last commit and a `put` of each new object: the delta is the commit. A
crash before it leaves the old version of every file (the new objects are garbage for gc past
its grace); after it, the new one. Nothing else is ever changed in place.

When: fsync of a file (its reply waits for the delta), `pqfs sync` and unmount, lock and stop
(everything), a file closed and unchanged for `commit_delay` seconds, namespace operations
`group_commit` seconds after the first of them (about one delta a second however many
operations), and staging under pressure.

Invariants (kept here; trio thread only, except what runs in `offload`):
  * `Node.entry` is what the catalog holds (as of this mount's last delta): a namespace
    operation records its ops from it, and a file never committed has no object (""), so no op
    ever names an object that is not in the vault;
  * a Dirty is written to only under its node's `write_lock`, and never while a commit reads it
    (`Dirty.committing`); its new object becomes the node's entry only once the delta that names
    it is written, and the node keeps its inode throughout;
  * ops are queued in the order the operations happened, and a commit takes the queue and the
    put of every object it wrote in one step with no await in between: the delta is a prefix
    of what happened, never a reordering;
  * a failed commit keeps everything: the staged data, the queued ops (back in front of the
    queue); its objects are left to gc past its grace (its segment may have been stored); it
    is retried with a doubling delay, and an fsync that waited for it gets EIO.
"""

from __future__ import annotations

import dataclasses
import logging
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pqfs.errors import (
    Exists,
    Invalid,
    IsADirectory,
    Locked,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    PqfsError,
    ReadOnly,
)
from pqfs.format.stream import CHUNK
from pqfs.mount.commits import Commits, Stats, close_all, crash_point
from pqfs.mount.options import MountOptions
from pqfs.mount.staging import Dirty, SpillFile, StagingBudget, Streaming, open_base
from pqfs.mount.tree import Node, Tree
from pqfs.runtime.memory import wipe
from pqfs.vault.catalog import del_op, put_op, shown
from pqfs.vault.objects import CannotStream, OpenObject
from pqfs.vault.schema import Entry, path_problem
from pqfs.vault.vault import Vault

log = logging.getLogger("pqfs.mount")
Offload = Callable[..., Awaitable[Any]]

RENAME_NOREPLACE = 1  # renameat2's flags, as the kernel passes them
RENAME_EXCHANGE = 2


def _zeros(piece: memoryview) -> bool:
    """All zero bytes? (The first and last byte reject almost every real write at once; then
    one compare in C, of a copy that is wiped: `any()` would walk a 64 KiB piece of zeros in
    Python, ~0.5 ms.)"""
    if piece[0] or piece[-1]:
        return False
    copy = bytearray(piece)
    try:
        return copy == bytes(len(copy))
    finally:
        wipe(copy)


def _all_new(node: Node) -> bool:
    """A file whose content owes nothing to what the catalog holds of it (never committed, or
    truncated to nothing since)."""
    if node.children is not None:
        return False
    return not node.entry.object or (node.dirty is not None and node.dirty.base is None)


def _recorded(node: Node) -> Entry | None:
    """What the catalog holds as this node's version at its path, which a rename moves to
    the new path: a directory's entry; for a file renamed over another while its content was
    all new, the other's (`kept`: after a crash the target shows its old version, never the
    renamed file's stale one, nor nothing); else its committed entry, if it has one."""
    if node.children is not None:
        return node.entry
    if node.kept is not None:
        return node.kept
    return node.entry if node.entry.object else None


class Writes(Commits):
    """The write side of the mount (the module's invariants; its commit rounds: commits.py)."""

    def __init__(
        self,
        vault: Vault,
        options: MountOptions,
        offload: Offload,
        tree: Callable[[], Tree],
        owner: tuple[int, int],
    ) -> None:
        self.vault = vault
        self.options = options
        self.offload = offload
        self._tree = tree
        self.owner = owner  # (uid, gid) the mount reports: chown to anything else is EPERM
        self.budget = StagingBudget(
            options.write_buffer,
            options.write_cache_size,
            options.write_buffer_file,
            options.write_timeout,
        )
        self.dirty: dict[int, Node] = {}  # inode -> node with staged content
        self.unlinked: dict[int, Node] = {}  # removed while open: served to their handles
        self.ops: list[dict[str, Any]] = []  # namespace ops not yet in a delta
        self.ops_since = 0.0  # when the first of them was queued
        self.ops_retry_at = 0.0  # after a failed round of ops only: not before
        self.ops_failures = 0
        self.active = 0  # write handlers between their start and their end (VaultFS.refresh)
        self.closing = False  # a lock is draining: no new changes until it is done
        # One more at every change to the tree or to staged content: a catalog reload that
        # ran meanwhile is thrown away (VaultFS.refresh), since it cannot hold the change.
        self.mutations = 0
        self.stats = Stats()
        self.appended: set[int] = set()
        self.can_stream = True  # the store takes positional writes (OpenObject), as far as known
        self.to_close: list[SpillFile | Streaming] = []
        self._foreign_ops: dict[tuple[int, str], tuple[object, bool] | None] = {}
        self.last_failure = ""
        self._round = self.round_lock = trio.Lock()  # one commit round (or reload) at a time
        self._wake = trio.Event()
        self.head_after: Callable[[int], None] = lambda seq: None  # our delta's seq (VaultFS)
        # After a round that committed: VaultFS.settle (gc.freeze). Without it the nodes and
        # entries of thousands of new files stay in the collector's reach, and its full
        # collections stopped the loop for 40-90 ms while 10,000 small files were written.
        self.after_round: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ checks ----

    def check_writable(self) -> None:
        self._writable()

    def _writable(self) -> Tree:
        if self.options.read_only:
            raise ReadOnly("the mount is read-only (mounted with --read-only)")
        if not self.vault.unlocked or self.closing:
            raise Locked("the vault is locked (pqfs unlock MOUNTPOINT)")
        return self._tree()

    @staticmethod
    def _dir(tree: Tree, ino: int) -> Node:
        node = tree.node(ino)
        if node.children is None:
            raise NotADirectory(f"not a directory: {shown(node.entry.path)}")
        return node

    @staticmethod
    def _child(tree: Tree, parent: Node, name: str) -> Node | None:
        assert parent.children is not None
        ino = parent.children.get(name)
        return None if ino is None else tree.nodes[ino]

    @staticmethod
    def _new_path(tree: Tree, parent: Node, name: str) -> str:
        if name in (".", "..") or "/" in name:
            raise Invalid(f"not a name: {name}")
        path = tree.path_of(parent, name)
        problem = path_problem(path)
        if problem:
            raise Invalid(f"{shown(path)}: {problem}")
        return path

    def _queue(self, op: dict[str, Any]) -> None:
        self.mutations += 1
        if not self.ops:
            self.ops_since = time.monotonic()
        self.ops.append(op)
        self._wake.set()

    # ------------------------------------------------------------------ namespace ----

    def create(self, parent_ino: int, name: str, mode: int) -> Node:
        """A new empty file: on this mount only until its first commit."""
        node = self._new_node(parent_ino, name, "file", mode)
        self.mutations += 1
        node.dirty = self._new_dirty(None, 0)
        self.dirty[node.ino] = node
        return node

    def mkdir(self, parent_ino: int, name: str, mode: int) -> Node:
        """A new directory, recorded as one (it stays when empty)."""
        node = self._new_node(parent_ino, name, "dir", mode)
        self._queue(put_op(node.entry))
        return node

    def _new_node(self, parent_ino: int, name: str, kind: str, mode: int) -> Node:
        tree = self._writable()
        parent = self._dir(tree, parent_ino)
        if self._child(tree, parent, name) is not None:
            raise Exists(f"exists: {name}")
        path = self._new_path(tree, parent, name)
        now = time.time_ns()
        node = tree.attach(parent, name, Entry(path, kind, mode & 0o777, now))
        self._touch_dir(parent, now)
        return node

    def unlink(self, parent_ino: int, name: str) -> None:
        tree = self._writable()
        parent = self._dir(tree, parent_ino)
        node = self._child(tree, parent, name)
        if node is None:
            raise NotFound(f"no such file: {name}")
        if node.children is not None:
            raise IsADirectory(f"is a directory: {shown(node.entry.path)}")
        self._remove(tree, parent, name, node)

    def rmdir(self, parent_ino: int, name: str) -> None:
        tree = self._writable()
        parent = self._dir(tree, parent_ino)
        node = self._child(tree, parent, name)
        if node is None:
            raise NotFound(f"no such directory: {name}")
        if node.children is None:
            raise NotADirectory(f"not a directory: {shown(node.entry.path)}")
        if node.children:
            raise NotEmpty(f"directory not empty: {shown(node.entry.path)}")
        self._remove(tree, parent, name, node)

    def _remove(self, tree: Tree, parent: Node, name: str, node: Node, record: bool = True) -> None:
        """Unlink `node` from the tree and (`record`) the catalog; its staged data goes once
        no handle holds it (an open handle keeps reading and writing it: it is never
        committed)."""
        path = node.entry.path
        tree.detach(parent, name)
        if record:
            self._queue(del_op(path))  # (a del of a path never committed changes nothing)
        if node.dirty is not None:
            self.dirty.pop(node.ino, None)
            if node.handles:
                self.unlinked[node.ino] = node
            else:
                self._drop(node)
        elif node.handles:
            self.unlinked[node.ino] = node
        self._keep_dir(parent)
        self._touch_dir(parent, time.time_ns())

    def _keep_dir(self, parent: Node) -> None:
        """A directory left empty stays (FORMAT.md §4.2: an implied one would vanish)."""
        if parent.entry.path and not parent.children:
            self._queue(put_op(parent.entry))

    @staticmethod
    def _committing(nodes: list[Node]) -> trio.Event | None:
        """The commit in flight of one of `nodes`, if any: an op that records a node's entry
        waits for it, since the entry is about to become the new object's (the delta in
        flight puts it at the path it had when that delta was made)."""
        for n in nodes:
            if n.dirty is not None and n.dirty.committing is not None:
                return n.dirty.committing
        return None

    async def rename(
        self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int
    ) -> None:
        self.active += 1
        try:
            await self._rename(old_parent, old_name, new_parent, new_name, flags)
        finally:
            self.active -= 1

    async def _rename(
        self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int
    ) -> None:
        while True:
            tree = self._writable()
            src_dir = self._dir(tree, old_parent)
            node = self._child(tree, src_dir, old_name)
            busy = None if node is None else self._committing(tree.below(node))
            if busy is None:
                break
            await busy.wait()
        # From here on no await: the rename is one step of the tree and of the op queue.
        if flags & RENAME_EXCHANGE:
            raise Invalid("RENAME_EXCHANGE is not supported")
        dst_dir = self._dir(tree, new_parent)
        if node is None:
            raise NotFound(f"no such file: {old_name}")
        target = self._child(tree, dst_dir, new_name)
        if target is node:
            return
        if target is not None and flags & RENAME_NOREPLACE:
            raise Exists(f"exists: {new_name}")
        new_path = self._new_path(tree, dst_dir, new_name)
        if node.children is not None and (
            new_path == node.entry.path or new_path.startswith(node.entry.path + "/")
        ):
            raise Invalid("cannot move a directory into itself")
        if target is not None:
            if node.children is not None and target.children is None:
                raise NotADirectory(f"not a directory: {shown(target.entry.path)}")
            if node.children is None and target.children is not None:
                raise IsADirectory(f"is a directory: {shown(target.entry.path)}")
            if target.children:
                raise NotEmpty(f"directory not empty: {shown(target.entry.path)}")
            # A file whose content is all new replaces its target only when its own commit
            # puts it there: until then the catalog keeps the target (after a crash: the old
            # version, never no file at all), and the file carries it (`kept`) wherever it
            # is renamed before that commit. Its unlink deletes it.
            keep = node.children is None and _all_new(node)
            if keep:
                node.kept = _recorded(target)
            self._remove(tree, dst_dir, new_name, target, record=not keep)
        old_path = node.entry.path
        # What the catalog holds of the subtree, under the new prefix (in tree order: a
        # directory before what it holds); what was never committed follows its node.
        for n in tree.below(node):
            p = new_path + n.entry.path[len(old_path) :]
            recorded = _recorded(n)
            if recorded is not None:
                self._queue(put_op(dataclasses.replace(recorded, path=p)))
        self._queue(del_op(old_path))
        tree.move(node, src_dir, old_name, dst_dir, new_name)
        self._keep_dir(src_dir)
        now = time.time_ns()
        self._touch_dir(src_dir, now)
        self._touch_dir(dst_dir, now)

    @staticmethod
    def _touch_dir(d: Node, now: int) -> None:
        d.attr.mtime_ns = max(d.attr.mtime_ns, now)

    # ------------------------------------------------------------------ attributes ----

    async def setattr(
        self,
        node: Node,
        *,
        size: int | None = None,
        mode: int | None = None,
        mtime_ns: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        self.active += 1
        try:
            await self._setattr(node, size, mode, mtime_ns, uid, gid)
        finally:
            self.active -= 1

    async def _setattr(
        self,
        node: Node,
        size: int | None,
        mode: int | None,
        mtime_ns: int | None,
        uid: int | None,
        gid: int | None,
    ) -> None:
        self._writable()
        if (uid is not None and uid != self.owner[0]) or (gid is not None and gid != self.owner[1]):
            raise NotPermitted("the vault holds no owner: files belong to whoever mounted it")
        if size is not None:
            if node.children is not None:
                raise IsADirectory(f"is a directory: {shown(node.entry.path)}")
            await self.truncate(node, size)
        while mode is not None or mtime_ns is not None:
            busy = self._committing([node])  # (see _committing)
            if busy is None:
                break
            await busy.wait()
        changed = False
        if mode is not None:
            kind = stat.S_IFDIR if node.children is not None else stat.S_IFREG
            node.attr.mode = kind | (mode & 0o777) | (0o700 if node.children is not None else 0)
            changed = True
        if mtime_ns is not None:
            node.attr.mtime_ns = mtime_ns
            changed = True
        if changed:
            self._meta_changed(node)

    def _meta_changed(self, node: Node) -> None:
        """Mode or date of `node` changed: recorded at once if its content is in the catalog
        (no re-encryption), else by the commit of its content."""
        if node.children is None and node.dirty is not None:
            # A file with staged content: its commit records the mode and date with the
            # content (recorded now, they would go with the old content: a crash in between
            # would show the old bytes with the new date, which rsync takes as up to date).
            return
        entry = dataclasses.replace(
            node.entry, mode=node.attr.mode & 0o777, mtime_ns=node.attr.mtime_ns
        )
        node.entry = entry
        if node.linked and (node.children is not None or entry.object):
            self._queue(put_op(entry))

    # ------------------------------------------------------------------ data ----

    def _new_dirty(self, base: Entry | None, size: int) -> Dirty:
        return Dirty(base, size, self.budget, self.options.write_cache)

    async def _dirty(self, node: Node) -> Dirty:
        """The node's Dirty, made if it has none (its base: the committed object); waits for a
        commit reading it to end first. Under node.write_lock."""
        while True:
            d = node.dirty
            if d is None:
                self.mutations += 1
                d = node.dirty = self._new_dirty(node.entry, node.entry.size)
                if node.linked:
                    self.dirty[node.ino] = node
                return d
            if d.committing is None:
                return d
            await d.committing.wait()

    async def truncate(self, node: Node, size: int) -> None:
        self.active += 1
        try:
            await self._truncate(node, size)
        finally:
            self.active -= 1

    async def _truncate(self, node: Node, size: int) -> None:
        async with node.write_lock():
            self._writable()
            d = node.dirty
            if size == 0 and (d is None or d.committing is None):
                # O_TRUNC and Jellyfin's rewrites: a new empty file, nothing of the old read
                if d is not None:
                    d.wipe()
                node.dirty = d = self._new_dirty(None, 0)
                if node.linked:
                    self.dirty[node.ino] = node
            else:
                # (growing needs nothing: past the old size, blocks hold nothing and the base
                # is cut at base_limit <= size, so the new bytes read as zeros)
                d = await self._dirty(node)
                d.truncate(size)
            d.touch()
            node.attr.size = size
            node.attr.mtime_ns = time.time_ns()
            self._tree().changed()

    async def _stream(self, node: Node, d: Dirty) -> None:
        """The stream tier (staging.py's invariants): a file written in order from nothing
        starts streaming into its new object once it is past the staged head, then each
        write's whole chunks go there. Under the node's write lock. A failure only ends the
        stream: what it could not take stays staged."""
        head = self.options.stream_head // CHUNK
        if d.streaming is None:
            if not (head and d.sequential and self.can_stream and d.size > (head + 1) * CHUNK):
                return
            try:
                obj = await self.offload(OpenObject, self.vault, self.options.write_cache)
            except CannotStream:
                self.can_stream = False
                return
            except OSError as e:
                d.sequential = False
                log.warning("could not stream %s into the vault: %s", shown(node.entry.path), e)
                return
            if node.dirty is not d or d.streaming is not None:
                await self.offload(obj.close)
                return
            d.streaming = Streaming(obj, head)
        obj = d.streaming.obj
        try:
            d.stream_out()
            if obj.parts_ready():  # (S3: the parts written whole go out, off the loop)
                await self.offload(obj.send_parts)
                crash_point("part-sent")
            elif obj.behind():  # (local: to the disk as it comes, not all at the commit)
                await self.offload(obj.write_behind)
        except Exception as e:
            if d.streaming is not None:
                d.streaming.clean = False
            why = str(e) if isinstance(e, (PqfsError, OSError)) else type(e).__name__
            log.warning("streaming %s stopped (staged instead): %s", shown(node.entry.path), why)

    async def _base_chunks(self, d: Dirty, first: int, count: int) -> list[bytearray]:
        if d.streaming is not None:
            s = d.streaming
            return await self.offload(s.chunks, first, count, s.limit)  # type: ignore[no-any-return]
        if d.base_reader is None:
            assert d.base is not None
            reader = await self.offload(open_base, self.vault, d.base)
            if d.base_reader is None:
                d.base_reader = reader
            else:
                reader.close()
        base_reader = d.base_reader
        return await self.offload(base_reader.chunks, first, count, d.base_limit)  # type: ignore[no-any-return]

    pressure = False  # a writer found staging full: the next round commits the biggest

    async def write(self, node: Node, off: int, data: bytes | memoryview) -> int:
        """Write `data` at `off`, block by block under the node's write lock. A writer that
        finds staging full lets go of the lock while it waits for room (so that a commit,
        which takes the lock, can free its own file's blocks), then goes on where it was."""
        mv = memoryview(data).cast("B")
        end = off + len(mv)
        pos = off
        deadline: float | None = None
        self.active += 1
        try:
            while True:
                self._writable()  # (again after a wait: a lock may have come meanwhile)
                async with node.write_lock():
                    d = await self._dirty(node)
                    if pos > d.size:
                        d.sequential = False  # (a hole first: not a file written in order)
                    pos = await self._write_blocks(d, mv, off, pos, end)
                    await self._stream(node, d)
                    d.touch()
                    node.attr.size = d.size
                    node.attr.mtime_ns = time.time_ns()
                    self._tree().changed()
                if pos >= end:
                    return len(mv)
                if deadline is None:
                    deadline = trio.current_time() + self.budget.timeout
                self.pressure = True
                self._wake.set()
                await self.budget.wait_for_room(deadline)
        finally:
            self.active -= 1

    async def _write_blocks(self, d: Dirty, mv: memoryview, off: int, pos: int, end: int) -> int:
        """Store [pos, end) of the write (`mv` holds [off, end)); where it stopped for room."""
        while pos < end:
            index = pos // CHUNK
            lo = pos - index * CHUNK
            hi = min(end - index * CHUNK, CHUNK)
            piece = mv[pos - off : pos - off + hi - lo]
            blk = d.stored(index)
            if blk is None:
                if d.base_covers(index):
                    blk = (await self._base_chunks(d, index, 1))[0]
                elif _zeros(piece):
                    # a zero write into a hole stores nothing (glibc's posix_fallocate writes
                    # one zero byte every 4 KiB)
                    pos += hi - lo
                    d.size = max(d.size, pos)
                    continue
                elif lo == 0:
                    blk = bytearray(piece)  # a new block, from its start: nothing to merge
                else:
                    blk = bytearray()
            if len(blk) < hi:
                blk.extend(bytes(hi - len(blk)))
            memoryview(blk)[lo:hi] = piece  # (a bytearray target would copy `piece` first)
            try:
                stored = d.store(index, blk)
            except BaseException:
                if blk is not d.blocks.get(index):
                    wipe(blk)
                raise
            if not stored:
                if blk is not d.blocks.get(index):
                    wipe(blk)
                return pos  # no room: the caller waits (a block kept in memory keeps the
                # patch, which the retry writes again: the same bytes)
            pos += hi - lo
            d.size = max(d.size, pos)
        return pos

    async def read(self, node: Node, off: int, size: int) -> bytearray | bytes | None:
        """Plaintext [off, off+size) of a file with staged content, clipped at its size; None
        if its content was committed or replaced meanwhile (the caller reads again)."""
        d = node.dirty
        if d is None:
            return None
        end = min(off + size, d.size)
        if end <= off:
            return b""
        first, last = off // CHUNK, (end - 1) // CHUNK
        self.wipe_reply()
        out = self._reply = bytearray(end - off)
        base: dict[int, bytearray] = {}
        while True:
            # Again after each await: a write may have streamed staged chunks out meanwhile
            # (they then come from beneath too), never the other way (it holds the lock).
            needed = [
                i
                for i in range(first, last + 1)
                if i not in base and not d.has(i) and d.base_covers(i)
            ]
            if not needed:
                break
            lo, hi = needed[0], needed[-1]
            try:
                got = await self._base_chunks(d, lo, hi - lo + 1)
            except Exception:
                if node.dirty is not d:
                    return None  # committed meanwhile (its base reader closed under this read)
                for c in base.values():
                    wipe(c)
                raise
            for k, c in enumerate(got):
                old = base.pop(lo + k, None)
                if old is not None:
                    wipe(old)
                base[lo + k] = c
            if node.dirty is not d:
                for c in base.values():
                    wipe(c)
                return None
        for i in range(first, last + 1):
            blk = d.stored(i)
            own = blk is not None and blk is not d.blocks.get(i)
            if blk is None:
                blk = base.get(i) if d.base_covers(i) else None
            if blk is None:
                continue
            b0 = i * CHUNK
            lo, hi = max(off, b0), min(end, b0 + len(blk))
            if hi > lo:
                memoryview(out)[lo - off : hi - off] = memoryview(blk)[lo - b0 : hi - b0]
            if own:
                wipe(blk)
        for c in base.values():
            wipe(c)
        return out  # (wiped by the next read or by lock: the adapter has sent it by then)

    _reply: bytearray | None = None

    def wipe_reply(self) -> None:
        if self._reply is not None:
            wipe(self._reply)
            self._reply = None

    def opened(self, node: Node, writable: bool) -> None:
        node.handles += 1
        if writable:
            node.writers += 1

    def released(self, node: Node, writable: bool) -> None:
        node.handles -= 1
        if writable:
            node.writers -= 1
            if node.dirty is not None:
                node.dirty.changed_at = time.monotonic()  # the delay runs from the last close
                self._wake.set()
        if node.handles == 0 and not node.linked:
            self._drop(node)

    # ------------------------------------------------------------------ lock ----

    def wipe(self) -> None:
        """Lock or unmount after a drain that failed: what could not be committed is lost;
        wiped either way."""
        self.wipe_reply()
        for node in list(self.dirty.values()) + list(self.unlinked.values()):
            if node.dirty is not None:
                node.dirty.wipe()
                node.dirty = None
        self.dirty.clear()
        self.unlinked.clear()
        self.ops.clear()
        closing, self.to_close = self.to_close, []
        close_all(closing)  # (their keys are gone already)

    def stats_dict(self) -> dict[str, object]:
        now = time.monotonic()
        staged = [n.dirty for n in self.dirty.values() if n.dirty is not None]
        s = self.stats
        return {
            "read_only": self.options.read_only,
            "pending_files": len(staged),
            "pending_bytes": sum(d.size for d in staged),
            "pending_ops": len(self.ops),
            "oldest_pending_s": round(now - min(d.created for d in staged), 1) if staged else None,
            "staged_memory": self.budget.memory_used,
            "staged_spill": self.budget.spill_used,
            "staging_waits": self.budget.waits,
            "commits": s.commits,
            "files_committed": s.files_committed,
            "bytes_committed": s.bytes_committed,
            "ops_committed": s.ops_committed,
            "files_streamed": s.files_streamed,
            "bytes_streamed": s.bytes_streamed,
            "commits_rebased": s.rebased,
            "conflict_copies": s.conflict_copies,
            "commit_failures": s.commit_failures,
            "last_commit_failure": self.last_failure or None,
        }
