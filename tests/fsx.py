"""pqfs's own fsx: random file-system operations done twice, on a pqfs mount and on a plain
reference directory, and compared byte for byte (fsx, fsstress and xfstests are not packaged
here). `Exerciser` holds both sides and their open handles; `run_seeded` drives it from a
seed, reproducibly; tests/test_fsx.py also drives it from a Hypothesis state machine, which
shrinks a failing sequence.

Every op is applied to both sides and must give the same result: the same bytes for a read,
the same errno for a refusal. A mismatch raises AssertionError naming the op and its number,
so a failure can be replayed from its seed.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MAX_OFFSET = 400_000  # files stay small: many chunks, many ops
MAX_WRITE = 150_000
NAMES = ["a", "b", "c", "d.mkv", "e.nfo"]
DIRS = ["", "x", "x/y", "z"]


@dataclass
class Pair:
    """One open file on both sides."""

    mount_fd: int
    ref_fd: int
    path: str  # where it was opened (it may have been renamed or unlinked since)


@dataclass
class Exerciser:
    mount: Path
    ref: Path
    rng: random.Random
    ops: int = 0
    log: list[str] = field(default_factory=list)
    handles: list[Pair] = field(default_factory=list)
    on_remount: Callable[[], None] | None = None

    # ------------------------------------------------------------- helpers ----

    def _both(self, what: str, fn: Callable[[Path], object]) -> object:
        """Run `fn` on both roots; the same result or the same errno, else AssertionError."""
        self.ops += 1
        self.log.append(what)
        if len(self.log) > 50:
            del self.log[0]
        results = []
        for root in (self.ref, self.mount):
            try:
                results.append(("ok", fn(root)))
            except OSError as e:
                results.append(("err", e.errno))
        if results[0] != results[1]:
            raise AssertionError(
                f"op {self.ops} {what}: reference {_short(results[0])}, "
                f"mount {_short(results[1])}; last ops: {self.log[-10:]}"
            )
        return results[0][1]

    def files(self) -> list[str]:
        out = []
        for d in DIRS:
            base = self.ref / d
            if base.is_dir():
                out += [str((base / n).relative_to(self.ref)) for n in sorted(os.listdir(base))]
        return [p for p in out if (self.ref / p).is_file()]

    def _path(self) -> str:
        return os.path.join(self.rng.choice(DIRS), self.rng.choice(NAMES))

    def _data(self, n: int) -> bytes:
        kind = self.rng.random()
        if kind < 0.15:
            return bytes(n)  # zeros: holes must still read as written
        return self.rng.randbytes(n)

    # ------------------------------------------------------------- ops ----

    def open(self) -> None:
        path = self._path()
        flags = os.O_RDWR | os.O_CREAT
        if self.rng.random() < 0.2:
            flags |= os.O_TRUNC
        if self.rng.random() < 0.1:
            flags |= os.O_APPEND
        if len(self.handles) >= 8:
            self.close()
        fds: list[int] = []

        def op(root: Path) -> None:
            fds.append(os.open(root / path, flags, 0o644))

        try:
            self._both(f"open({path}, {flags:#o})", op)
        except AssertionError:
            for fd in fds:
                os.close(fd)
            raise
        if len(fds) == 2:
            self.handles.append(Pair(fds[1], fds[0], path))
        else:
            for fd in fds:
                os.close(fd)

    def _handle(self) -> Pair | None:
        return self.rng.choice(self.handles) if self.handles else None

    def write(self) -> None:
        h = self._handle()
        if h is None:
            return self.open()
        off = self.rng.randrange(MAX_OFFSET)
        if self.rng.random() < 0.4:
            off = os.fstat(h.ref_fd).st_size  # sequential: at the end
        data = self._data(self.rng.randrange(1, MAX_WRITE))
        self._fd_op(h, f"pwrite({h.path}, {off}, {len(data)})", lambda fd: os.pwrite(fd, data, off))
        return None

    def read(self) -> None:
        h = self._handle()
        if h is None:
            return self.open()
        size = os.fstat(h.ref_fd).st_size
        off = self.rng.randrange(size + 1) if size else 0
        n = self.rng.randrange(1, 300_000)
        self._fd_op(h, f"pread({h.path}, {off}, {n})", lambda fd: os.pread(fd, n, off))
        return None

    def truncate(self) -> None:
        h = self._handle()
        if h is None:
            return self.open()
        size = self.rng.randrange(MAX_OFFSET)
        self._fd_op(h, f"ftruncate({h.path}, {size})", lambda fd: os.ftruncate(fd, size))
        return None

    def stat_handle(self) -> None:
        h = self._handle()
        if h is None:
            return self.open()
        self._fd_op(h, f"fstat({h.path}).size", lambda fd: os.fstat(fd).st_size)
        return None

    def fsync(self) -> None:
        h = self._handle()
        if h is None:
            return self.open()
        self._fd_op(h, f"fsync({h.path})", os.fsync)
        return None

    def close(self) -> None:
        h = self._handle()
        if h is None:
            return
        self.handles.remove(h)
        self._fd_op(h, f"close({h.path})", os.close)

    def _fd_op(self, h: Pair, what: str, fn: Callable[[int], object]) -> None:
        def op(root: Path) -> object:
            return fn(h.ref_fd if root == self.ref else h.mount_fd)

        self._both(what, op)

    def rename(self) -> None:
        src, dst = self._path(), self._path()
        if self.rng.random() < 0.15:
            src, dst = self.rng.choice(DIRS[1:]), self.rng.choice(DIRS[1:]) + "2"
        self._both(f"rename({src}, {dst})", lambda r: os.rename(r / src, r / dst))

    def unlink(self) -> None:
        path = self._path()
        self._both(f"unlink({path})", lambda r: os.unlink(r / path))

    def mkdir(self) -> None:
        d = self.rng.choice(DIRS[1:])
        self._both(f"mkdir({d})", lambda r: os.mkdir(r / d))

    def rmdir(self) -> None:
        d = self.rng.choice(DIRS[1:] + [x + "2" for x in DIRS[1:]])
        self._both(f"rmdir({d})", lambda r: os.rmdir(r / d))

    def compare_tree(self) -> None:
        """Every name, type, size and byte, both sides."""
        self.ops += 1

        def listing(root: Path) -> dict[str, bytes | None]:
            out: dict[str, bytes | None] = {}
            for dirpath, dirs, files in os.walk(root):
                rel = os.path.relpath(dirpath, root)
                for d in dirs:
                    out[os.path.normpath(os.path.join(rel, d)) + "/"] = None
                for f in files:
                    out[os.path.normpath(os.path.join(rel, f))] = Path(dirpath, f).read_bytes()
            return out

        ref, mnt = listing(self.ref), listing(self.mount)
        if ref != mnt:
            diff = sorted(
                p for p in ref.keys() | mnt.keys() if ref.get(p, b"?") != mnt.get(p, b"?")
            )
            raise AssertionError(
                f"op {self.ops} tree differs at {diff[:5]}; last ops: {self.log[-10:]}"
            )

    def close_all(self) -> None:
        while self.handles:
            h = self.handles.pop()
            self._fd_op(h, f"close({h.path})", os.close)

    def remount(self) -> None:
        """Close everything, unmount (which commits), mount again, compare all."""
        if self.on_remount is None:
            return
        self.close_all()
        self.log.append("remount")
        self.on_remount()
        self.compare_tree()

    WEIGHTS: tuple[tuple[str, int], ...] = (
        ("open", 10),
        ("write", 25),
        ("read", 15),
        ("truncate", 4),
        ("stat_handle", 4),
        ("fsync", 3),
        ("close", 8),
        ("rename", 6),
        ("unlink", 4),
        ("mkdir", 3),
        ("rmdir", 2),
        ("compare_tree", 1),
    )

    def step(self) -> None:
        names, weights = zip(*self.WEIGHTS, strict=True)
        getattr(self, self.rng.choices(names, weights)[0])()


def _short(result: tuple[str, object]) -> str:
    kind, value = result
    if kind == "err":
        return errno.errorcode.get(value, str(value)) if isinstance(value, int) else str(value)
    if isinstance(value, bytes):
        return f"{len(value)} bytes, sha {hash(value) & 0xFFFF:04x}"
    return repr(value)


def run_seeded(ex: Exerciser, ops: int, remount_every: int = 0) -> None:
    """`ops` random steps; every `remount_every` a remount (0: never); a full compare at the
    end, and after closing everything."""
    for i in range(1, ops + 1):
        ex.step()
        if remount_every and i % remount_every == 0:
            ex.remount()
    ex.compare_tree()
    ex.close_all()
    ex.compare_tree()
