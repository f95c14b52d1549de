"""Open-ahead: a library scan opens the files of a directory one after another (a media server
reading tags: open, head, tail, close). Each open on its own costs a thread hop, a backend read
of the object's header and final chunk, and a key unwrap, all waited for one file at a time.
Once files of one directory are opened in succession (`OpenAhead.note_open`), the next
`open_ahead` files of that directory in name order are opened in the background, by the same
`Opener.open_object` as any open, and parked: the scanner's open then takes its file on the
loop (`take`), with nothing left to wait for, while the next ones are opened on a thread.

Invariants (trio thread only):
  * a parked file was opened by `Opener.open_object`: every check an open makes has passed
    (openfile.py), nothing is served from it before it is taken;
  * a parked file is handed out at most once, only for a node of the same (object, MAC), and
    only in the lock generation that opened it; every other parked file is closed, exactly
    once (`Opener.close_unopened`: a key it holds is wiped);
  * at most `open_ahead_parked` files (and never fewer than `open_ahead`) are parked or being
    opened, the oldest parked closed first, none for longer than `open_ahead_ttl` seconds
    (closed at the next open, lock or unmount), and at most `open_ahead` ahead of the file
    last opened in a directory;
  * background opens run at most `open_ahead_threads` batches at once, none queued for a
    thread, on a limiter of their own: they never take the threads of the opens a reader
    waits for; a reader that waits for its file opened ahead waits one open's bound in all
    (ChunkReader.open), and a batch gets one open's bound, then its files are not parked;
  * a failure here never fails an open that worked (VaultFS.open), nor ends the mount;
  * `lock()` closes every parked file with no await in between; a batch that comes back after a
    lock closes what it opened;
  * with key_ttl 0 (a key only while its file is open) nothing is opened ahead: a parked file
    would hold a key no reader asked for.
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import trio

from pqfs.mount.idlepoll import Unseen
from pqfs.mount.metrics import Counters
from pqfs.mount.openfile import Opener, OpenFile, run_bounded
from pqfs.mount.options import MountOptions
from pqfs.mount.tree import Node, Tree

log = logging.getLogger("pqfs.mount")
SCAN_MEMORY = 2.0  # seconds: a scanner that just opened files in succession is still scanning


class _DirTrack:
    """What was opened in one directory of one tree: how many files in a row, the last one
    (its index in the directory's sorted names) and when, and how far was opened ahead."""

    __slots__ = ("at", "front", "i", "streak", "tree")

    def __init__(self, tree: Tree) -> None:
        self.tree = tree  # a refresh's new tree has new names lists: indexes start again
        self.streak = 0
        self.i = -1
        self.at = 0.0
        self.front = -1


class OpenAhead:
    def __init__(
        self,
        opener: Opener,
        options: MountOptions,
        *,
        counters: Counters,
        unseen: Unseen,
        generation: Callable[[], int],
        timeout: float,
    ) -> None:
        self.opener = opener
        self.options = options
        self.counters = counters
        self.unseen = unseen
        self._generation = generation
        self._timeout = timeout  # one file's open (storage timeout x open_timeouts)
        self.enabled = options.open_ahead > 0 and options.key_ttl > 0
        self.parked: OrderedDict[int, tuple[OpenFile, int, float]] = OrderedDict()
        self.pending: dict[int, trio.Event] = {}
        self._dirs: OrderedDict[int, _DirTrack] = OrderedDict()
        self._scanning_until = 0.0
        self._limiter = trio.CapacityLimiter(options.open_ahead_threads)
        self._batches = 0  # batches started and not back (at most open_ahead_threads)
        self.nursery: trio.Nursery | None = None  # VaultFS.start

    # ------------------------------------------------------------------ the reader's side ----

    def take(self, node: Node) -> OpenFile | None:
        """The parked file opened for `node`, if there is one that may be handed out."""
        got = self.parked.pop(node.ino, None)
        if got is None:
            return None
        f, gen, _ = got
        e = node.entry
        if gen != self._generation() or (f.entry.object, f.entry.mac) != (e.object, e.mac):
            self._close(f)
            return None
        self.counters.opened_ahead_used += 1
        return f

    async def wait(self, node: Node, bound: float) -> float:
        """If `node` is being opened ahead, until that batch is back (it is then parked, or
        its open failed and the caller opens it the ordinary way, which reports why), for
        `bound` seconds at most; how long it waited (the caller's open then has what is left
        of its own bound), 0.0 if it did not."""
        ev = self.pending.get(node.ino)
        if ev is None:
            return 0.0
        t0 = trio.current_time()
        with trio.move_on_after(bound):
            await ev.wait()
        return trio.current_time() - t0

    def note_open(self, tree: Tree, node: Node) -> None:
        """After `node` was opened: open ahead in its directory once it is being scanned (a
        second file of it opened in a row, or any file of it while a scan is going on)."""
        if not self.enabled or self.nursery is None:
            return
        now = time.monotonic()
        self._sweep(now)
        parent = tree.parent(node)
        if parent is None or parent.children is None:
            return  # (a refresh removed it meanwhile)
        i = bisect.bisect_left(parent.names, node.entry.path.rpartition("/")[2])
        track = self._dirs.pop(parent.ino, None)
        if track is None or track.tree is not tree or now - track.at > SCAN_MEMORY or i <= track.i:
            track = _DirTrack(tree)  # new, a new tree, idle, or read again from further back
        self._dirs[parent.ino] = track  # most recent last
        while len(self._dirs) > self.options.open_ahead_dirs:
            self._dirs.popitem(last=False)
        track.streak += 1
        track.at, track.i = now, i
        if track.streak >= 2:
            self._scanning_until = now + SCAN_MEMORY
        elif now >= self._scanning_until:
            return  # one file opened in a directory: a player, not a scan
        self._schedule(tree, parent, track)

    def _schedule(self, tree: Tree, parent: Node, track: _DirTrack) -> None:
        """Batches for the files after `track.i`, as far as `open_ahead`, while threads are
        free and the parked and pending files stay within their bound: no batch waits for a
        thread, so a reader waits for its file one batch's open at most."""
        assert self.nursery is not None and parent.children is not None
        names, opts = parent.names, self.options
        end = min(len(names), track.i + 1 + opts.open_ahead)
        room = self._most() - len(self.parked) - len(self.pending)
        k = max(track.i, track.front) + 1
        while k < end and room > 0 and self._batches < opts.open_ahead_threads:
            part: list[Node] = []
            while k < end and len(part) < min(room, opts.open_ahead_batch):
                ino = parent.children[names[k]]
                n = tree.nodes[ino]
                if n.children is None and ino not in self.parked and ino not in self.pending:
                    part.append(n)
                k += 1
            track.front = k - 1
            if not part:
                continue
            self.nursery.start_soon(self._open_batch, part, self._generation())
            self._batches += 1
            room -= len(part)
            for n in part:  # (after start_soon: had it raised, no Event would wait forever)
                self.pending[n.ino] = trio.Event()

    # ------------------------------------------------------------------ background ----

    async def _open_batch(self, nodes: list[Node], gen: int) -> None:
        opened: list[tuple[int, OpenFile]] = []
        try:
            with self.unseen.wait():  # a thread works: the idle poll must not spin meanwhile
                opened = await run_bounded(
                    functools.partial(self._open_all, nodes),
                    self._timeout,  # one open's: slower, they are not worth parking
                    self._close_all,
                    self._limiter,
                )
        except Exception:
            opened = []  # given up (a storage not answering): the demand opens will say so
        finally:
            self._batches -= 1
            for n in nodes:
                ev = self.pending.pop(n.ino, None)
                if ev is not None:
                    ev.set()
        now = time.monotonic()
        for ino, f in opened:
            if gen != self._generation():
                self._close(f)
                continue
            old = self.parked.pop(ino, None)
            if old is not None:
                self._close(old[0])
            self.parked[ino] = (f, gen, now)
            self.counters.opened_ahead += 1
        self._sweep(now)

    def _open_all(self, nodes: list[Node]) -> list[tuple[int, OpenFile]]:
        """Open thread: open each node's object; one that fails is left out (not logged: a
        reader that opens it gets the error, and its log line, then)."""
        out: list[tuple[int, OpenFile]] = []
        for n in nodes:
            try:
                out.append((n.ino, self.opener.open_object(n)))
            except Exception:  # reported by the demand open, if one comes
                continue
        return out

    def _close_all(self, files: list[tuple[int, OpenFile]]) -> None:
        for _, f in files:
            self._close(f)

    def _close(self, f: OpenFile) -> None:
        """Close a file opened ahead that no reader took (any thread)."""
        self.counters.opened_ahead_wasted += 1
        try:
            self.opener.close_unopened(f)
        except Exception:  # a failed close (EIO from a network file system) ends nothing
            log.debug("closing a file opened ahead failed", exc_info=True)

    # ------------------------------------------------------------------ bounds ----

    def _sweep(self, now: float) -> None:
        """Close parked files past their time, and the oldest past the count bound."""
        ttl, most = self.options.open_ahead_ttl, self._most()
        while self.parked:
            ino, (f, _, at) = next(iter(self.parked.items()))
            if len(self.parked) <= most and now - at <= ttl:
                break
            del self.parked[ino]
            self._close(f)

    def _most(self) -> int:
        """Files parked and pending at most: never fewer than one directory's window (a scan
        would close what it is about to take)."""
        return max(self.options.open_ahead_parked, self.options.open_ahead)

    def lock(self) -> None:
        """Close every parked file, forget every directory (a lock, or the unmount)."""
        parked, self.parked = self.parked, OrderedDict()
        for f, _, _ in parked.values():
            self._close(f)
        self._dirs.clear()
        self._scanning_until = 0.0
