"""Adding files to a vault: what to add (`plan`), adding it (`Ingest.run`), and committing the
new entries in batches (`Batch`, bounded by `VaultBounds`), through which `Ingest.run` commits.

`plan` walks the source, names each file's vault path, refuses before anything is encrypted
every destination the catalog could not hold, and marks the files the vault already holds
unchanged (same size and mtime). What it leaves out (symbolic links, special files) comes
back as data; nothing here prints. Whatever `run` completed is committed even when it fails
or is interrupted: nothing is lost, and a re-run with the identity available skips it.
"""

from __future__ import annotations

import functools
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pqfs.errors import IsADirectory, VaultError
from pqfs.format.keys import Recipient
from pqfs.vault import bounds
from pqfs.vault.catalog import check_appendable, normpath, put_op
from pqfs.vault.vault import Vault


@dataclass(frozen=True)
class Skip:
    """A source left out of a plan: `path` on disk, `kind` "symbolic link" or "special file"."""

    path: str
    kind: str


@dataclass(frozen=True)
class Item:
    """A directory or file to add: `src` on disk, `dest` in the vault."""

    src: str
    dest: str
    size: int = 0  # a file's bytes, as the walk saw them
    unchanged: bool = False  # the vault holds a file here of this size and mtime: skipped


@dataclass
class Plan:
    dirs: list[Item]
    files: list[Item]
    total: int  # bytes of every file, the unchanged ones included
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class Result:
    added: int = 0  # files encrypted into the vault
    unchanged: int = 0  # files skipped as already in it


def plan(
    v: Vault, src: str, dest: str | None, on_skip: Callable[[Skip], None] | None = None
) -> Plan:
    """What `pqfs add SRC [DEST]` adds: SRC's tree (or SRC itself) at DEST, by default the name
    of SRC; DEST ending in / puts a file into that directory. `on_skip` hears of each source
    left out as the walk finds it (a large tree takes a while). Raises, before anything is
    written, if the catalog cannot be appended to or a destination cannot be added. Names that
    are not UTF-8 come as os.fsdecode gives them (surrogate escapes) and are stored so."""
    check_appendable(v.storage)  # a tampered catalog is refused before any work
    v.signer()  # and a host that could not sign what it adds (version 2)
    known = {e.path: e for e in v.catalog().files()} if v.unlocked else {}
    skipped: list[Skip] = []

    def skip(s: Skip) -> None:
        skipped.append(s)
        if on_skip is not None:
            on_skip(s)

    base, files, dirs, total = _sources(src, dest, skip)
    _check_dests(v, base, files, dirs)
    file_items = []
    for full, rel, st in files:
        at = _under(base, rel)
        old = known.get(at)
        same = old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
        file_items.append(Item(full, at, st.st_size, same))
    dir_items = [Item(os.path.join(src, rel), _under(base, rel)) for rel in dirs]
    return Plan(dir_items, file_items, total, skipped)


_File = tuple[str, str, os.stat_result]  # path on disk, path relative to SRC, its stat


def _walk(src: str, skip: Callable[[Skip], None]) -> tuple[list[_File], list[str], int]:
    """(files, dirs as relative, total bytes) of a tree, sorted."""
    files: list[_File] = []
    dirs: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(src, onerror=_walk_error):
        dirnames.sort()
        rel = os.path.relpath(dirpath, src)
        dirs.append("" if rel == "." else rel)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                skip(Skip(full, "symbolic link"))
            elif not stat.S_ISREG(st.st_mode):
                skip(Skip(full, "special file"))
            else:
                files.append((full, os.path.relpath(full, src), st))
                total += st.st_size
    return files, dirs, total


def _walk_error(e: OSError) -> None:
    raise e


def _sources(
    src: str, dest: str | None, skip: Callable[[Skip], None]
) -> tuple[str, list[_File], list[str], int]:
    """(vault path of SRC, files, dirs, total bytes) for `pqfs add SRC [DEST]` (see _walk)."""
    if os.path.isdir(src):
        base = normpath(dest if dest is not None else os.path.basename(os.path.abspath(src)))
        files, dirs, total = _walk(src, skip)
    else:
        if dest is None:
            base = normpath(os.path.basename(src))
        elif dest.endswith("/"):
            base = normpath(dest + os.path.basename(src))
        else:
            base = normpath(dest)
        st = os.stat(src)
        files, dirs, total = [(src, "", st)], [], st.st_size
    if not base:
        raise VaultError("destination path is empty")
    return base, files, dirs, total


def _under(base: str, rel: str) -> str:
    return normpath(f"{base}/{rel}") if rel else base


def _check_dests(v: Vault, base: str, files: list[_File], dirs: list[str]) -> None:
    """Refuse, before anything is encrypted, every destination the catalog could not hold or
    (with the catalog known) that would put a file below a file or in place of a directory.
    The tree being added is itself consistent, so each is checked against the vault alone."""
    for rel in dirs:
        v.check_put(_under(base, rel), "dir")
    for _full, rel, _st in files:
        try:
            v.check_put(_under(base, rel), "file")
        except IsADirectory as e:
            hint = "" if rel else " (to add into it, end DEST with /)"
            raise IsADirectory(f"{e}{hint}") from None


class Batch:
    """Catalog ops committed in batches: a commit once `commit_every_files` ops are held or
    `commit_every_seconds` have passed (bounds.py), checked at `maybe_commit`. As a context manager it
    commits what it holds when the block exits, whatever the exit (an error, Ctrl-C).

    The objects its ops name were written without waiting for the disk (durable=False): a
    commit first makes them all durable at once (storage.make_durable, one syncfs), then
    appends the segment, so that a crash at any point leaves every object the catalog names
    whole (one that no segment names yet is garbage for gc)."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.ops: list[dict[str, Any]] = []
        self.last_commit = time.monotonic()

    def add(self, op: dict[str, Any]) -> None:
        self.ops.append(op)

    def maybe_commit(self) -> None:
        now = time.monotonic()
        b = bounds.BOUNDS
        if len(self.ops) >= b.commit_every_files or now - self.last_commit > b.commit_every_seconds:
            self._commit()
            self.last_commit = now

    def _commit(self) -> None:
        if self.ops:
            self.vault.storage.make_durable()
            self.vault.commit(self.ops)
        self.ops = []

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._commit()


class Ingest:
    """Adds what a plan holds, encrypting each file also to `recipients`."""

    def __init__(self, vault: Vault, plan: Plan, recipients: Sequence[Recipient] = ()) -> None:
        self.vault = vault
        self.plan = plan
        self.recipients = recipients

    def run(self, progress: Callable[[str, int], None] | None = None) -> Result:
        """Add the plan's directories, then its files; `progress(dest, n)` hears of n more
        bytes of the file at `dest` in the vault read (or skipped as unchanged)."""
        report = progress or _no_progress
        result = Result()
        v = self.vault
        with Batch(v) as batch:
            for d in self.plan.dirs:
                batch.add(put_op(v.dir_entry(d.src, d.dest)))
            for f in self.plan.files:
                if f.unchanged:
                    result.unchanged += 1
                    report(f.dest, f.size)
                    continue
                report(f.dest, 0)
                read = functools.partial(report, f.dest)
                entry = v.add_file(f.src, f.dest, self.recipients, read, durable=False)
                batch.add(put_op(entry))
                result.added += 1
                batch.maybe_commit()
        return result


def _no_progress(dest: str, n: int) -> None:
    pass
