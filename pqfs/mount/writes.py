"""Writes through the mount: the namespace operations on the tree, written data staged per inode
(staging.py), and the commits that make it part of the vault.

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
  * a failed commit keeps everything: the staged data (its object is deleted), the queued ops
    (back in front of the queue); it is retried with a doubling delay, and an fsync that waited
    for it gets EIO.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

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
    VaultError,
)
from pqfs.format.encoding import b64encode
from pqfs.format.stream import CHUNK
from pqfs.mount.options import MountOptions
from pqfs.mount.staging import Dirty, DirtyStream, SpillFile, StagingBudget, open_base
from pqfs.mount.tree import Node, Tree
from pqfs.runtime.memory import wipe
from pqfs.vault.catalog import del_op, put_op, shown
from pqfs.vault.objects import object_key, write_object
from pqfs.vault.schema import Entry, path_problem
from pqfs.vault.vault import Vault

log = logging.getLogger("pqfs.mount")
T = TypeVar("T")
Offload = Callable[..., Awaitable[Any]]

SMALL_FILE = 1 << 20  # committed together, many to one thread hop
RENAME_NOREPLACE = 1  # renameat2's flags, as the kernel passes them
RENAME_EXCHANGE = 2

# The crash test (tests/test_crash.py) kills the daemon at a named point of a commit, the
# Nth time it passes it: PQFS_TEST_CRASH_AT=point:N. Unset, this costs one comparison.
_CRASH_AT, _, _CRASH_N = os.environ.get("PQFS_TEST_CRASH_AT", "").partition(":")
_crash_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    if name == _CRASH_AT:
        _crash_seen[name] = n = _crash_seen.get(name, 0) + 1
        if n >= int(_CRASH_N or 1):
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Stats:
    commits: int = 0  # deltas written
    files_committed: int = 0
    bytes_committed: int = 0
    commit_failures: int = 0
    ops_committed: int = 0


@dataclass
class Written:
    """One object a commit round wrote, before its delta."""

    node: Node
    dirty: Dirty
    entry: Entry
    version: int


def _close_all(spills: list[SpillFile]) -> None:
    """On a thread: close spill files (their keys are already gone)."""
    for s in spills:
        s.close()


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


class Writes:
    """The write side of the mount (the module's invariants)."""

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

    def _drop(self, node: Node) -> None:
        if node.dirty is not None and node.dirty.committing is None:
            node.dirty.wipe()
            node.dirty = None
        self.unlinked.pop(node.ino, None)

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

    def link(self) -> None:
        raise NotPermitted("hard links are not supported (a copy works)")

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

    async def _base_chunks(self, d: Dirty, first: int, count: int) -> list[bytearray]:
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
                    pos = await self._write_blocks(d, mv, off, pos, end)
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
        base_needed = [
            i for i in range(first, last + 1) if d.stored(i) is None and d.base_covers(i)
        ]
        base: dict[int, bytearray] = {}
        if base_needed:
            lo, hi = base_needed[0], base_needed[-1]
            try:
                got = await self._base_chunks(d, lo, hi - lo + 1)
            except Exception:
                if node.dirty is not d:
                    return None  # committed meanwhile (its base reader closed under this read)
                raise
            for k, c in enumerate(got):
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

    # ------------------------------------------------------------------ commits ----

    @property
    def pending(self) -> bool:
        return bool(self.dirty or self.ops or self._round.locked())

    def _ready(self, node: Node, now: float, everything: bool) -> bool:
        d = node.dirty
        if d is None or d.committing is not None:
            return False
        if everything:
            return True
        if now < d.retry_at:
            return False
        return node.writers == 0 and now - d.changed_at >= self.options.commit_delay

    async def run(self) -> None:
        """The committer: a round whenever something is due; never raises (a failed round is
        logged and retried)."""
        while True:
            with trio.move_on_after(self.options.commit_tick):
                await self._wake.wait()
            self._wake = trio.Event()
            now = time.monotonic()
            due = [n for n in self.dirty.values() if self._ready(n, now, False)]
            forced: list[Node] = []
            if self.pressure:
                self.pressure = False
                forced = self._pressure_choice(due)
            ops_due = (
                self.ops
                and now - self.ops_since >= self.options.group_commit
                and now >= self.ops_retry_at
            )
            if due or forced or ops_due:
                try:
                    await self.commit(due + forced, forced=forced)
                except Exception as e:  # logged by commit; the next round retries
                    log.debug("commit round failed: %s", type(e).__name__)

    def _pressure_choice(self, due: list[Node]) -> list[Node]:
        """Staging is full: also commit the file holding the most, open or not (the one
        case where a file still being written is committed: a crash may then leave the part
        written so far, which README says)."""
        now = time.monotonic()
        idle = [
            n
            for n in self.dirty.values()
            if n.dirty is not None and n.dirty.committing is None and now >= n.dirty.retry_at
        ]
        if idle:
            biggest = max(idle, key=lambda n: n.dirty.staged_bytes if n.dirty else 0)
            if biggest not in due:
                return [biggest]
        return []

    async def sync(self, nodes: list[Node] | None = None) -> None:
        """Commit `nodes` (None: everything pending) and every queued op now, waiting for a
        round already running first; raises if any of them could not be committed."""
        if nodes is None:
            nodes = list(self.dirty.values())
        for n in nodes:  # a commit reading one now: wait for it, then commit what is left
            if n.dirty is not None and n.dirty.committing is not None:
                await n.dirty.committing.wait()
        todo = [n for n in nodes if n.dirty is not None and n.linked]
        failed = await self.commit(todo, everything=True)
        if failed:
            raise failed

    async def commit(
        self, nodes: list[Node], everything: bool = False, forced: list[Node] | None = None
    ) -> PqfsError | None:
        """One round: write the objects of `nodes` that are still due when it starts (all
        of them with `everything`, and those in `forced`), make them durable at once, then
        append the queued ops and their puts, in deltas of at most `commit_files` files.
        Returns the error of a node that failed (None)."""
        async with self._round:
            return await self._commit(nodes, everything, forced or [])

    async def _commit(
        self, nodes: list[Node], everything: bool, forced: list[Node]
    ) -> PqfsError | None:
        now = time.monotonic()
        written: list[Written] = []
        failed: PqfsError | None = None
        taken: list[tuple[Node, Dirty]] = []
        for node in nodes:
            async with node.write_lock():  # never a write half done
                d = node.dirty
                # (due when chosen, but a round may have run before this one: a file reopened
                # for writing meanwhile is no longer due)
                due = self._ready(node, now, everything or node in forced)
                if d is None or not due or not node.linked:
                    continue
                d.committing = trio.Event()
            taken.append((node, d))
        # Small files go to a thread together (a thread hop each cost more than their
        # encryption), large ones one by one.
        # Up to commit_threads batches at once (a large file's encryption is parallel in
        # itself; small files' wraps and temp files are not).
        small = [(n, d) for n, d in taken if d.size <= SMALL_FILE]
        per = max(1, min(self.options.commit_files, -(-len(small) // self.options.commit_threads)))
        batches = [small[i : i + per] for i in range(0, len(small), per)]
        batches += [[(n, d)] for n, d in taken if d.size > SMALL_FILE]
        results: dict[int, list[Entry | Exception]] = {}

        async def run(k: int) -> None:
            results[k] = await self.offload(self._write_objects, [d for _, d in batches[k]])

        limit = trio.CapacityLimiter(self.options.commit_threads)

        async def bounded(k: int) -> None:
            async with limit:
                await run(k)

        async with trio.open_nursery() as nursery:
            for k in range(len(batches)):
                nursery.start_soon(bounded, k)
        for k, batch in enumerate(batches):
            for (node, d), result in zip(batch, results[k], strict=True):
                if isinstance(result, Exception):
                    failed = self._failed(node, d, result)
                    continue
                written.append(Written(node, d, result, d.version))
                crash_point("object-written")
        if written:
            try:  # every object of the round durable at once (one syncfs), before any delta
                await self.offload(self.vault.storage.make_durable)
            except Exception as e:
                for w in written:
                    failed = self._failed(w.node, w.dirty, e)
                return failed
            crash_point("durable")
        # The deltas: the first holds every op queued until now, each the puts of at most
        # commit_files of the new objects, at their paths now (no await from taking the queue
        # to the append's start: the module's invariants; the paths of files being committed
        # do not move meanwhile, since renames wait for their commits).
        step = self.options.commit_files
        closing: list[SpillFile] = []
        committed = False
        for i in range(0, max(1, len(written)), step):
            ops: list[dict[str, Any]] = []
            if i == 0:
                ops, self.ops = self.ops, []
            # (a file unlinked during an earlier slice's append is left out: garbage below)
            puts = [(w, self._put_of(w)) for w in written[i : i + step] if w.node.linked]
            delta = ops + [put_op(p) for _, p in puts]
            if not delta:
                continue
            try:
                seq = await self.offload(self._append, delta)
            except Exception as e:
                # Everything kept: the ops back in front of the queue (their order kept), the
                # staged data. The new objects are left to gc past its grace, not deleted: an
                # append that failed after its segment was stored (a timeout, the state disk)
                # names them.
                self.ops = ops + self.ops
                for w in written[i:]:
                    if w.dirty.committing is not None and w.node.linked:
                        failed = self._failed(w.node, w.dirty, e)
                if not puts:  # only namespace ops: their failure is one too
                    failed = self._ops_failed(e)
                break
            crash_point("appended")
            self.head_after(seq)
            if i == 0:
                self.ops_retry_at = 0.0
                self.ops_failures = 0
            self._committed(puts, len(delta), closing)
            committed = True
        garbage = []
        for w in written:  # unlinked during the commit: its object is garbage now
            if w.dirty.committing is not None and not w.node.linked:
                garbage.append(w.entry.object)
                ev, w.dirty.committing = w.dirty.committing, None
                ev.set()
                if not w.node.handles:  # (open handles keep reading and writing it)
                    self._drop(w.node)
        self.last_failure = "" if failed is None else str(failed)
        if closing or garbage:
            await self.offload(self._clean_up, closing, garbage)
        if committed:
            self.after_round()
        return failed

    @staticmethod
    def _put_of(w: Written) -> Entry:
        return dataclasses.replace(
            w.entry,
            path=w.node.entry.path,
            mode=w.node.attr.mode & 0o777,
            mtime_ns=w.node.attr.mtime_ns,
        )

    def _committed(
        self, puts: list[tuple[Written, Entry]], ops: int, closing: list[SpillFile]
    ) -> None:
        """A delta holding `puts` is written: each node's entry is its new object, what it
        staged is wiped (its spill file closed later, on a thread: `closing`)."""
        self.mutations += 1
        s = self.stats
        s.commits += 1
        s.ops_committed += ops
        for w, put in puts:
            w.node.entry = put
            w.node.kept = None
            w.node.dirty = None
            self.dirty.pop(w.node.ino, None)
            w.dirty.wipe(closing)
            ev, w.dirty.committing = w.dirty.committing, None
            assert ev is not None
            ev.set()
            s.files_committed += 1
            s.bytes_committed += put.size

    def _clean_up(self, closing: list[SpillFile], garbage: list[str]) -> None:
        """On a thread: close spill files (their keys are gone already) and delete objects no
        delta names (best effort: gc takes what is left, past its grace)."""
        _close_all(closing)
        for object_id in garbage:
            self._delete_soon(object_id)

    def _ops_failed(self, e: Exception) -> PqfsError:
        self.stats.commit_failures += 1
        self.ops_failures += 1
        delay = min(300.0, self.options.group_commit * 2**self.ops_failures)
        self.ops_retry_at = time.monotonic() + delay
        why = (
            str(e) if isinstance(e, (PqfsError, OSError)) else f"internal error {type(e).__name__}"
        )
        log.error(
            "could not commit %d operation(s) (kept; retried in %.0f s): %s",
            len(self.ops),
            delay,
            why,
            exc_info=not isinstance(e, (PqfsError, OSError)),
        )
        err = VaultError(f"could not commit {len(self.ops)} operation(s): {why}")
        err.logged = True
        self.last_failure = str(err)
        return err

    def _failed(self, node: Node, d: Dirty, e: Exception) -> PqfsError:
        self.stats.commit_failures += 1
        d.failures += 1
        d.retry_at = time.monotonic() + min(300.0, self.options.commit_delay * 2**d.failures)
        ev, d.committing = d.committing, None
        if ev is not None:
            ev.set()
        if not node.linked and not node.handles:
            self._drop(node)  # unlinked meanwhile: nothing left to commit it for
        why = (
            str(e) if isinstance(e, (PqfsError, OSError)) else f"internal error {type(e).__name__}"
        )
        log.error(
            "could not commit %s (kept; retried in %.0f s): %s",
            shown(node.entry.path),
            d.retry_at - time.monotonic(),
            why,
            exc_info=not isinstance(e, (PqfsError, OSError)),
        )
        err = VaultError(f"could not commit {shown(node.entry.path)}: {why}")
        err.logged = True
        return err

    def _write_objects(self, ds: list[Dirty]) -> list[Entry | Exception]:
        """On a thread: each Dirty's object (_write_object), or the error it failed with."""
        out: list[Entry | Exception] = []
        for d in ds:
            try:
                out.append(self._write_object(d))
            except Exception as e:
                out.append(e)
        return out

    def _write_object(self, d: Dirty) -> Entry:
        """On a thread: the Dirty's plaintext encrypted into a new object (not yet durable)."""
        if (
            d.base is not None
            and d.base_reader is None
            and any(d.stored(i) is None for i in range(-(-min(d.base_limit, d.base.size) // CHUNK)))
        ):
            d.base_reader = open_base(self.vault, d.base)
        stream = DirtyStream(d)  # (read at any offset: encrypted in parallel batches)
        try:
            object_id, header, size = write_object(self.vault, stream, durable=False)  # type: ignore[arg-type]
        finally:
            stream.close()
        if size != d.size:
            raise VaultError("staged data changed size while it was committed")
        return Entry("", "file", 0, 0, size, object_id, header.length, b64encode(header.mac))

    def _append(self, ops: list[dict[str, Any]]) -> int:
        """On a thread: one delta (Vault.commit checks every op first)."""
        written = self.vault.commit(ops)
        return -1 if written is None else written.seq

    def _delete_soon(self, object_id: str) -> None:
        """An object no delta names (its commit failed, or its file went meanwhile): deleted
        now if the store lets us; otherwise gc takes it once past its grace."""
        try:
            self.vault.storage.delete(object_key(object_id))
        except OSError as e:
            log.debug("leftover object kept for gc: %s", e.strerror)

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
            "commit_failures": s.commit_failures,
            "last_commit_failure": self.last_failure or None,
        }
