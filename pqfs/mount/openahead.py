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
  * at most `open_ahead_parked` files are parked (the oldest closed first), none for longer
    than `open_ahead_ttl` seconds (closed at the next open, lock or unmount), and at most
    `open_ahead` ahead of the file last opened in a directory;
  * background opens run one batch at a time, on a limiter of their own: they never take the
    threads of the opens a reader waits for, and never queue in front of them;
  * `lock()` closes every parked file with no await in between; a batch that comes back after a
    lock closes what it opened;
  * with key_ttl 0 (a key only while its file is open) nothing is opened ahead: a parked file
    would hold a key no reader asked for.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections import OrderedDict
from collections.abc import Callable

import trio

from pqfs.mount.idlepoll import Unseen
from pqfs.mount.metrics import Counters
from pqfs.mount.openfile import Opener, OpenFile, run_bounded
from pqfs.mount.options import MountOptions
from pqfs.mount.tree import Node, Tree

SCAN_MEMORY = 2.0  # seconds: a scanner that just opened files in succession is still scanning


class _DirTrack:
    """What was opened in one directory: how many files in a row, how far was opened ahead."""

    __slots__ = ("front", "streak")

    def __init__(self) -> None:
        self.streak = 0
        self.front = -1  # index (in the directory's sorted names) scheduled up to


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
            self.opener.close_unopened(f)
            self.counters.opened_ahead_wasted += 1
            return None
        self.counters.opened_ahead_used += 1
        return f

    async def wait(self, node: Node) -> None:
        """If `node` is being opened ahead, until that batch is back (it is then parked, or
        its open failed and the caller opens it the ordinary way, which reports why)."""
        ev = self.pending.get(node.ino)
        if ev is not None:
            await ev.wait()

    def note_open(self, tree: Tree, node: Node) -> None:
        """After `node` was opened: open ahead in its directory once it is being scanned (a
        second file of it opened in a row, or any file of it while a scan is going on)."""
        if not self.enabled or self.nursery is None:
            return
        now = time.monotonic()
        self._sweep(now)
        parent = tree.parent(node)
        track = self._dirs.pop(parent.ino, None) or _DirTrack()
        self._dirs[parent.ino] = track  # most recent last
        while len(self._dirs) > self.options.open_ahead_dirs:
            self._dirs.popitem(last=False)
        track.streak += 1
        if track.streak >= 2:
            self._scanning_until = now + SCAN_MEMORY
        elif now >= self._scanning_until:
            return  # one file opened in a directory: a player, not a scan
        names = parent.names
        i = bisect.bisect_left(names, node.entry.path.rpartition("/")[2])
        start, end = max(i, track.front) + 1, min(len(names), i + 1 + self.options.open_ahead)
        if start >= end:
            return
        track.front = end - 1
        assert parent.children is not None
        batch: list[Node] = []
        for name in names[start:end]:
            ino = parent.children[name]
            n = tree.nodes[ino]
            if n.children is None and ino not in self.parked and ino not in self.pending:
                batch.append(n)
        step = self.options.open_ahead_batch
        for k in range(0, len(batch), step):
            part = batch[k : k + step]
            for n in part:
                self.pending[n.ino] = trio.Event()
            self.nursery.start_soon(self._open_batch, part, self._generation())

    # ------------------------------------------------------------------ background ----

    async def _open_batch(self, nodes: list[Node], gen: int) -> None:
        opened: list[tuple[int, OpenFile]] = []
        try:
            with self.unseen.wait():  # a thread works: the idle poll must not spin meanwhile
                opened = await run_bounded(
                    functools.partial(self._open_all, nodes),
                    self._timeout * len(nodes),
                    self._close_all,
                    self._limiter,
                )
        except Exception:
            opened = []  # given up (a storage not answering): the demand opens will say so
        finally:
            for n in nodes:
                ev = self.pending.pop(n.ino, None)
                if ev is not None:
                    ev.set()
        now = time.monotonic()
        for ino, f in opened:
            if gen != self._generation():
                self.opener.close_unopened(f)
                continue
            old = self.parked.pop(ino, None)
            if old is not None:
                self.opener.close_unopened(old[0])
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
            self.opener.close_unopened(f)

    # ------------------------------------------------------------------ bounds ----

    def _sweep(self, now: float) -> None:
        """Close parked files past their time, and the oldest past the count bound."""
        # (never fewer than one directory's window: a scan would close what it is about to take)
        ttl = self.options.open_ahead_ttl
        most = max(self.options.open_ahead_parked, self.options.open_ahead)
        while self.parked:
            ino, (f, _, at) = next(iter(self.parked.items()))
            if len(self.parked) <= most and now - at <= ttl:
                break
            del self.parked[ino]
            self.opener.close_unopened(f)
            self.counters.opened_ahead_wasted += 1

    def lock(self) -> None:
        """Close every parked file, forget every directory (a lock, or the unmount)."""
        for f, _, _ in self.parked.values():
            self.opener.close_unopened(f)
        self.parked.clear()
        self._dirs.clear()
        self._scanning_until = 0.0
