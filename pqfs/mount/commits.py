"""Commit rounds of the mount's writes (writes.py holds the namespace and the data): which
files are due, their new objects, made durable at once, then the catalog deltas that name them.
`Commits` is the base of `writes.Writes`, which holds the state both use (its docstring: the
invariants); the split keeps each module to one concern.

Order of a round (each step safe to interrupt: tests/test_crash.py kills the daemon at each):
  1. under each due file's write lock, `committing` set (writes wait, renames too);
  2. on threads, each file's staged content encrypted into a new object (not durable yet);
  3. one make_durable for them all;
  4. on the loop, with no await, the queued ops and the puts of at most `commit_files` files
     become a delta, appended (create-if-absent); then the next puts; each node's entry
     becomes its new object only once its delta is written.

Other writers (a second mount, `pqfs add` elsewhere) may append segments after the tree's head
meanwhile: each append reads theirs (once: `_foreign_ops`) and rebases the delta onto them
(vault/rebase.py: a conflict copy, never an overwrite); a file put under a conflict name
moves there in the tree too. The tree shows their changes at its next reload (VaultFS.refresh,
once nothing is pending), which `forget_foreign` follows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from pqfs.errors import PqfsError, VaultError
from pqfs.format.encoding import b64encode
from pqfs.format.stream import CHUNK, chunk_count
from pqfs.mount.options import MountOptions
from pqfs.mount.staging import Dirty, DirtyStream, SpillFile, StagingBudget, Streaming, open_base
from pqfs.mount.tree import Node, Tree
from pqfs.runtime.memory import wipe
from pqfs.vault.catalog import Segment, put_op, shown
from pqfs.vault.objects import object_key, write_object
from pqfs.vault.rebase import Foreign, Rebased, conflict_label, rebase
from pqfs.vault.schema import Entry
from pqfs.vault.vault import Vault

log = logging.getLogger("pqfs.mount")
Offload = Callable[..., Awaitable[Any]]

SMALL_FILE = 1 << 20  # committed together, many to one thread hop

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
    files_streamed: int = 0  # committed by finishing the object they streamed into
    bytes_streamed: int = 0  # of those, what went into the object as it was written
    rebased: int = 0  # deltas rebased onto other writers' segments
    conflict_copies: int = 0  # files kept under a conflict name (rebase.py)


@dataclass
class Written:
    """One object a commit round wrote, before its delta."""

    node: Node
    dirty: Dirty
    entry: Entry


def close_all(spills: list[SpillFile | Streaming]) -> None:
    """On a thread: close spill files (their keys are already gone) and streams (an unfinished
    one's temp file removed)."""
    for s in spills:
        s.close()


class Commits:
    """Commit rounds (the module's docstring); the state is `writes.Writes`'s."""

    vault: Vault
    options: MountOptions
    offload: Offload
    budget: StagingBudget
    dirty: dict[int, Node]
    unlinked: dict[int, Node]
    ops: list[dict[str, Any]]
    ops_since: float
    ops_retry_at: float
    ops_failures: int
    stats: Stats
    last_failure: str
    mutations: int
    pressure: bool
    _round: trio.Lock
    _wake: trio.Event
    head_after: Callable[[int], None]
    after_round: Callable[[], None]
    _tree: Callable[[], Tree]
    appended: set[int]  # segments this mount appended after the tree's head
    _foreign_ops: dict[tuple[int, str], tuple[object, bool] | None]  # (seq, kind) -> theirs
    to_close: list[SpillFile | Streaming]  # of files dropped: closed on a thread (_drop)

    def _drop(self, node: Node) -> None:
        """A file removed (or given up) with nothing to commit: its staging wiped now, its
        spill file or stream closed by the committer on a thread (unlinking a large one frees
        its blocks there and then: tens of ms, too long for the loop)."""
        if node.dirty is not None and node.dirty.committing is None:
            node.dirty.wipe(self.to_close)
            node.dirty = None
            if self.to_close:
                self._wake.set()
        self.unlinked.pop(node.ino, None)

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
        scanned = 0.0
        while True:
            with trio.move_on_after(self.options.commit_tick):
                await self._wake.wait()
            # Woken by a close or an op: but looking costs O(pending files), and a copy of
            # many small files closes one every ~0.3 ms: at most one look per tick, unless
            # staging is full (a writer waits for it).
            early = scanned + self.options.commit_tick - time.monotonic()
            if early > 0 and not self.pressure:
                with trio.move_on_after(early):
                    while not self.pressure:
                        self._wake = trio.Event()
                        await self._wake.wait()
            self._wake = trio.Event()
            now = scanned = time.monotonic()
            if self.to_close:
                closing, self.to_close = self.to_close, []
                await self.offload(close_all, closing)
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
                written.append(Written(node, d, result))
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
        closing: list[SpillFile | Streaming] = []
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
                seq, rebased = await self.offload(self._append, delta, self._tree().head)
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
            if rebased is not None:
                puts = self._rebased(rebased, puts)
            self.appended.add(seq)
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
        self, puts: list[tuple[Written, Entry]], ops: int, closing: list[SpillFile | Streaming]
    ) -> None:
        """A delta holding `puts` is written: each node's entry is its new object, what it
        staged is wiped (its spill file closed later, on a thread: `closing`)."""
        self.mutations += 1
        s = self.stats
        s.commits += 1
        s.ops_committed += ops
        for w, put in puts:
            st = w.dirty.streaming
            if st is not None and st.clean:
                s.files_streamed += 1
                s.bytes_streamed += st.bytes
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

    def _clean_up(self, closing: list[SpillFile | Streaming], garbage: list[str]) -> None:
        """On a thread: close spill files (their keys are gone already) and delete objects no
        delta names (best effort: gc takes what is left, past its grace)."""
        close_all(closing)
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
        """On a thread: the Dirty's plaintext encrypted into a new object (not yet durable):
        its stream's, finished, if it is clean (staging.py's invariants), else a fresh one."""
        s = d.streaming
        if s is not None and s.clean:
            try:
                return self._finish_stream(d, s)
            except BaseException:
                s.clean = False  # (never finished again: a fresh object next time)
                raise
        if (
            d.base is not None
            and d.base_reader is None
            and any(d.stored(i) is None for i in range(-(-min(d.base_limit, d.base.size) // CHUNK)))
        ):
            d.base_reader = open_base(self.vault, d.base)
        stream = DirtyStream(d)  # (read at any offset: encrypted in parallel batches)
        try:
            object_id, header, size = write_object(
                self.vault,
                stream,  # type: ignore[arg-type]
                durable=False,
                in_place=d.size <= SMALL_FILE,  # (gc removes one a crash cut, past its grace)
            )
        finally:
            stream.close()
        if size != d.size:
            raise VaultError("staged data changed size while it was committed")
        return Entry("", "file", 0, 0, size, object_id, header.length, b64encode(header.mac))

    @staticmethod
    def _finish_stream(d: Dirty, s: Streaming) -> Entry:
        """On a thread: the chunks the stream has not taken (the head, and from `streamed` to
        the end, the last one final) put into its object, which is then complete."""
        chunks: list[tuple[int, bytearray]] = []
        try:
            for k in range(chunk_count(d.size)):
                if s.head <= k < s.streamed:
                    continue
                pt = bytearray(min(CHUNK, d.size - k * CHUNK))
                chunks.append((k, pt))
                d.read_at(memoryview(pt), k * CHUNK)
            s.obj.finish(chunks, d.size)
        finally:
            for _, pt in chunks:
                wipe(pt)
        h = s.obj.header
        return Entry("", "file", 0, 0, d.size, s.obj.object_id, h.length, b64encode(h.mac))

    def _append(self, ops: list[dict[str, Any]], base: int) -> tuple[int, Rebased | None]:
        """On a thread: one delta (Vault.commit checks every op first), rebased onto what
        other writers appended after segment `base` (the tree's head); the rebase, if it had
        to be (None if no other writer came between)."""
        label = conflict_label()
        done: list[Rebased | None] = [None]

        def onto(segs: list[Segment]) -> list[dict[str, Any]]:
            foreign = self._foreign(segs, base)
            if not foreign.segments:
                done[0] = None
                return ops
            done[0] = r = rebase(ops, foreign, self._taken, label)
            return r.ops

        written = self.vault.commit(ops, rebase=onto)
        return (-1 if written is None else written.seq), done[0]

    def _foreign(self, segs: list[Segment], base: int) -> Foreign:
        """On a thread: what other writers changed after segment `base`, from their segments
        in the listing `segs` (each read once: `_foreign_ops`)."""
        foreign = Foreign()
        expected = base + 1
        gap = False  # some of theirs were deleted (a compaction elsewhere) before we read them
        for seg in segs:
            if seg.seq <= base:
                continue
            gap = gap or seg.seq != expected
            expected = seg.seq + 1
            if seg.seq in self.appended:
                continue
            key = (seg.seq, seg.kind)
            if key not in self._foreign_ops:
                try:
                    self._foreign_ops[key] = self.vault.segment_ops(seg)
                except FileNotFoundError:
                    gap = True
                    continue
            got = self._foreign_ops[key]
            if got is None:
                continue  # signed by no one authorized: readers ignore it too
            ops, writer = got
            if seg.kind == "snap":
                # A compaction: the state after the segments before it, so nothing new,
                # unless some of those were gone before they could be read.
                if gap:
                    foreign.apply_snapshot(ops, self._differs)
                else:
                    foreign.segments += 1
                continue
            foreign.apply(ops, writer, self._holds_file)
        return foreign

    def _node_at(self, path: str) -> Node | None:
        """On a thread: the tree's node at `path`, if any (the loop may change the tree
        meanwhile: a lookup, never an iteration)."""
        try:
            return self._tree().by_path(path)
        except (KeyError, PqfsError):  # (removed meanwhile; locked)
            return None

    def _taken(self, path: str) -> bool:
        return self._node_at(path) is not None

    def _holds_file(self, path: str) -> bool:
        n = self._node_at(path)
        return n is not None and n.children is None and bool(n.entry.object)

    def _differs(self, path: str, kind: str, object_id: str) -> bool:
        n = self._node_at(path)
        if n is None:
            return True
        if n.children is not None:
            return kind != "dir"
        return kind != "file" or n.entry.object != object_id

    def _rebased(
        self, r: Rebased, puts: list[tuple[Written, Entry]]
    ) -> list[tuple[Written, Entry]]:
        """On the loop, after a rebased delta was appended: its rewrites logged, each file put
        under a conflict name moved there in the tree (before the user can change it again
        under the name another writer now holds), `puts` as they were written."""
        self.stats.rebased += 1
        self.stats.conflict_copies += len(r.moved)
        for note in r.notes:
            log.warning("%s", note)
        tree = self._tree()
        for old, new in r.moved.items():
            node = tree.by_path(old)
            parent = tree.by_path(old.rpartition("/")[0])
            new_parent = self._dir_at(tree, new.rpartition("/")[0])
            if node is None or parent is None or new_parent is None or node.children is not None:
                continue
            if tree.by_path(new) is not None:
                continue  # (created meanwhile: the next reload shows the copy)
            tree.move(node, parent, old.rpartition("/")[2], new_parent, new.rpartition("/")[2])
            self.mutations += 1
        return [(w, dataclasses.replace(p, path=r.moved.get(p.path, p.path))) for w, p in puts]

    @staticmethod
    def _dir_at(tree: Tree, path: str) -> Node | None:
        """The tree's directory at `path`, made (as the catalog implies it) if missing: a
        conflict copy's parent (`DIR (conflict ...)`) is new. None if a file is in the way."""
        node = tree.by_path(path)
        if node is not None or not path:
            return node if node is not None and node.children is not None else None
        parent = Commits._dir_at(tree, path.rpartition("/")[0])
        if parent is None:
            return None
        name = path.rpartition("/")[2]
        return tree.attach(parent, name, Entry(path, "dir", 0o755, time.time_ns()))

    def forget_foreign(self, head: int) -> None:
        """The tree was reloaded as of segment `head`: it holds every segment up to it."""
        self.appended = {s for s in self.appended if s > head}
        self._foreign_ops = {k: v for k, v in self._foreign_ops.items() if k[0] > head}

    def _delete_soon(self, object_id: str) -> None:
        """An object no delta names (its commit failed, or its file went meanwhile): deleted
        now if the store lets us; otherwise gc takes it once past its grace."""
        try:
            self.vault.storage.delete(object_key(object_id))
        except OSError as e:
            log.debug("leftover object kept for gc: %s", e.strerror)
