"""Rebasing a delta onto what other writers appended meanwhile (FORMAT.md §4.7).

A writer that keeps a view of the catalog (a mount) makes its ops against that view, as of
segment `base`. Another mount or a `pqfs add` elsewhere may append segments after `base` before
the delta is stored. Appended blindly, the delta would silently undo their work: a put over a
file they changed replaces it, a delete removes what they just wrote. `rebase` rewrites the delta
so that nothing of either side is lost:

  * a file this writer puts at a path the others changed (put a file or a directory there, or
    made a parent a file) goes to a conflict copy next to it (`NAME (conflict DATE HOST).EXT`);
    the other writer's version keeps the path;
  * a file put at a path the others deleted is put there all the same (an edit outlives a
    delete elsewhere);
  * a delete (of a file, or of a directory moved away) of a path at or below which the others
    put something is dropped: their version stays (a directory moved away then stays too,
    with what it held: duplicates, never a loss); what this writer then puts at or below that
    path goes below a conflict copy of it instead (`DIR (conflict DATE HOST)/...`), since
    whatever the delete was to clear is still there;
  * a directory put where the others made a file is dropped (readers would ignore it).

Each rewrite is reported in one line (`Rebased.notes`), which the mount logs. Pure: what the
others did comes in as `Foreign`, built from their segments in order.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pqfs.vault.catalog import shown
from pqfs.vault.schema import NAME_MAX, path_problem


def _ancestors(path: str) -> Iterable[str]:
    while "/" in path:
        path = path.rpartition("/")[0]
        yield path


@dataclass
class Foreign:
    """What other writers changed after a writer's base segment: the type of the last thing
    put at each path (that a delete since has not removed), and the paths deleted."""

    put: dict[str, str] = field(default_factory=dict)  # path -> "file" | "dir"
    deleted: set[str] = field(default_factory=set)
    segments: int = 0  # how many of their segments this holds

    def apply(self, ops: object, writer: bool, holds_file: Callable[[str], bool]) -> None:
        """The ops of one of their segments, in order. A writer's (an ingest host's) deletes
        and its puts over a file that readers ignore (FORMAT.md §4.6) change nothing, so they
        count for nothing here either: `holds_file(path)` says whether the catalog had a file
        there before (as far as this writer knows)."""
        self.segments += 1
        if not isinstance(ops, list):
            return
        for op in ops:
            if not isinstance(op, dict) or not isinstance(op.get("path"), str):
                continue
            path = op["path"]
            if op.get("op") == "put" and op.get("type") in ("file", "dir"):
                if writer and not self.deleted_at(path) and holds_file(path):
                    continue
                self.put[path] = op["type"]
                self.deleted.discard(path)
            elif op.get("op") == "del" and not writer:
                prefix = path + "/"
                for p in [p for p in self.put if p == path or p.startswith(prefix)]:
                    del self.put[p]
                self.deleted.add(path)

    def apply_snapshot(self, ops: object, differs: Callable[[str, str, str], bool]) -> None:
        """A snapshot of theirs (a compaction elsewhere) after segments this writer cannot read
        any more (it deleted them): what in it `differs(path, type, object)` from this writer's
        view counts as put by them (an approximation on the safe side: a conflict copy too
        many, never a loss)."""
        self.segments += 1
        if not isinstance(ops, list):
            return
        for op in ops:
            if isinstance(op, dict) and op.get("op") == "put" and isinstance(op.get("path"), str):
                kind, obj = op.get("type"), op.get("object", "")
                if kind in ("file", "dir") and differs(op["path"], kind, str(obj)):
                    self.put[op["path"]] = kind

    def deleted_at(self, path: str) -> bool:
        """Whether they deleted `path` or a directory holding it (and have not put it since)."""
        if path in self.put:
            return False
        return path in self.deleted or any(a in self.deleted for a in _ancestors(path))

    def put_below(self, path: str) -> bool:
        prefix = path + "/"
        return any(p.startswith(prefix) for p in self.put)

    def file_above(self, path: str) -> bool:
        return any(self.put.get(a) == "file" for a in _ancestors(path))

    def __bool__(self) -> bool:
        return bool(self.put or self.deleted)


@dataclass
class Rebased:
    ops: list[dict[str, Any]]
    moved: dict[str, str]  # a file's path in the delta as made -> its conflict copy's
    notes: list[str]  # one line per rewrite


def conflict_label(now: float | None = None) -> str:
    """What a conflict copy's name says: when and by which host (as Dropbox and Syncthing do:
    a person must be able to tell the two versions apart)."""
    stamp = time.strftime("%Y-%m-%d %H%M%S", time.localtime(now))
    host = socket.gethostname().split(".")[0] or "this host"
    return f"{stamp} {host}"


def conflict_path(path: str, label: str, taken: Callable[[str], bool], at_root: bool) -> str:
    """A free path for the conflict copy of `path`: next to it (at the root if a parent is now
    a file), `NAME (conflict LABEL).EXT`, numbered if that is taken; names cut to fit."""
    parent, _, name = path.rpartition("/")
    if at_root:
        parent = ""
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    for n in range(1, 10_000):
        mark = f" (conflict {label})" if n == 1 else f" (conflict {label} {n})"
        room = NAME_MAX - len((mark + ext).encode("utf-8", "surrogateescape"))
        cut = stem.encode("utf-8", "surrogateescape")[: max(1, room)]
        short = cut.decode("utf-8", "ignore") or "file"
        candidate = short + mark + ext
        full = f"{parent}/{candidate}" if parent else candidate
        if path_problem(full) is None and not taken(full):
            return full
    raise ValueError(f"no free conflict name for {shown(path)}")  # (10,000 copies: not real)


def rebase(
    ops: list[dict[str, Any]],
    foreign: Foreign,
    taken: Callable[[str], bool],
    label: str,
) -> Rebased:
    """`ops` rewritten so that applying them after the others' changes (`foreign`) loses
    nothing of theirs nor of `ops` (the module's rules). `taken(path)`: whether this writer's
    view holds something at `path` (a conflict copy must not land on it)."""
    out: list[dict[str, Any]] = []
    moved: dict[str, str] = {}
    notes: list[str] = []
    if not foreign:
        return Rebased(list(ops), moved, notes)

    rerooted: dict[str, str] = {}  # a path whose delete was dropped -> its conflict copy

    def occupied(p: str) -> bool:
        return taken(p) or p in foreign.put or p in moved.values() or p in rerooted.values()

    def under_kept(path: str) -> str | None:
        """`path` below the conflict copy of a kept path it is at or below, if any."""
        for a in [path, *_ancestors(path)]:
            if a in rerooted:
                return rerooted[a] + path[len(a) :]
        return None

    for op in ops:
        path = op.get("path")
        if not isinstance(path, str):
            out.append(op)
            continue
        again = under_kept(path)
        if again is not None:
            out.append({**op, "path": again})
            if op.get("op") == "put" and op.get("type") == "file":
                moved[path] = again
            continue
        if op.get("op") == "del":
            if path in foreign.put or foreign.put_below(path):
                rerooted[path] = conflict_path(path, label, occupied, at_root=False)
                notes.append(
                    f"{shown(path)} was changed by another writer meanwhile: it is kept there "
                    "(this mount's delete or move of it left the other writer's version; what "
                    f"this mount put there since is under {shown(rerooted[path])})"
                )
                continue
            out.append(op)
        elif op.get("type") == "dir":
            if foreign.put.get(path) == "file" or foreign.file_above(path):
                notes.append(
                    f"directory {shown(path)} not recorded: another writer put a file there"
                )
                continue
            out.append(op)
        else:
            above = foreign.file_above(path)
            if path in moved:  # (a rename's put and the content's, in one delta)
                out.append({**op, "path": moved[path]})
            elif above or path in foreign.put or foreign.put_below(path):
                new = conflict_path(path, label, occupied, at_root=above)
                moved[path] = new
                out.append({**op, "path": new})
                notes.append(
                    f"{shown(path)} was changed by another writer meanwhile: this mount's "
                    f"version is kept as {shown(new)}"
                )
            else:
                if foreign.deleted_at(path):
                    notes.append(
                        f"{shown(path)} was deleted by another writer meanwhile: this mount's "
                        "new version is kept"
                    )
                out.append(op)
    return Rebased(out, moved, notes)
