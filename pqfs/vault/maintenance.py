"""Work on a whole unlocked vault beyond adding to it: remove, share, verify, and reclaiming
space (gc, catalog compaction).

Order of writes, everywhere here: the catalog first, then the objects it no longer names. A
crash in between leaves garbage for `gc`, never an entry whose object is gone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

from pqfs.errors import NotFound, PqfsError, VaultError
from pqfs.format.encoding import b64encode
from pqfs.format.header import Header
from pqfs.format.keys import Recipient, parse_recipient
from pqfs.vault import bounds
from pqfs.vault import catalog as cat_mod
from pqfs.vault.catalog import Catalog, del_op, normpath, put_op, shown
from pqfs.vault.objects import (
    OBJECTS,
    PlaintextStream,
    checked_header,
    object_key,
    open_reader,
    write_object,
)
from pqfs.vault.schema import Entry
from pqfs.vault.vault import Vault


def share(v: Vault, path: str, recipients: Sequence[Recipient]) -> Entry:
    """Give more recipients access to one file without re-encrypting its content: its object
    gets a header with stanzas for them too (the payload copied unchanged, server-side on S3),
    and its entry records them (`shared`), so that unshare and rekey know them."""
    e = _file(v, path)
    header = _header(v, e)
    fk = v.file_key(e, header)
    new = Header.build(list(header.stanzas) + [r.wrap(fk) for r in recipients], fk)
    shared = tuple(dict.fromkeys([*e.shared, *(r.encode() for r in recipients)]))
    return _replace(v, e, new, header, shared)


@dataclass
class Unshared:
    entry: Entry
    reencrypted: bool
    unrecorded: list[str]  # recipients asked for that the entry did not record as shared


def unshare(
    v: Vault, path: str, recipients: Sequence[Recipient], reencrypt: bool = False
) -> Unshared:
    """Take recipients' access to one file away: its object is rebuilt with stanzas for the
    vault's recipients and the remaining shares only (any stanza the entry does not record
    goes too). Without `reencrypt` the file key and payload stay: whoever unwrapped the key
    before can still decrypt the object if they can read the store. With it, a new object
    under a new file key (the content decrypted and encrypted again)."""
    e = _file(v, path)
    gone = {r.encode() for r in recipients}
    mine = {r.encode() for r in v.recipients}
    if gone & mine:
        raise VaultError(
            "that is a vault recipient: every file is wrapped to it (to change the vault's own "
            "key, run pqfs rekey VAULT)"
        )
    keep = tuple(r for r in e.shared if r not in gone)
    unrecorded = sorted(gone - set(e.shared))
    targets = [*v.recipients, *(parse_recipient(r) for r in keep)]
    if reencrypt:
        with open_reader(v, e) as reader:
            plain = cast(BinaryIO, PlaintextStream(reader))
            object_id, header, size = write_object(v, plain, targets[len(v.recipients) :])
        if size != e.size:
            raise VaultError(f"{e.path}: content size changed while it was encrypted again")
        moved = Entry(
            e.path, "file", e.mode, e.mtime_ns, size, object_id, header.length,
            b64encode(header.mac), keep,
        )  # fmt: skip
        _commit_replacement(v, e, moved)
        return Unshared(moved, True, unrecorded)
    header = _header(v, e)
    fk = v.file_key(e, header)
    new = Header.build([r.wrap(fk) for r in targets], fk)
    return Unshared(_replace(v, e, new, header, keep), False, unrecorded)


def _file(v: Vault, path: str) -> Entry:
    e = v.entry(path)
    if e.type != "file":
        raise VaultError(f"not a file: {shown(e.path) or '/'}")
    return e


def _header(v: Vault, e: Entry) -> Header:
    src = v.storage.open_source(object_key(e.object))
    try:
        return checked_header(e, src)
    finally:
        src.close()


def _replace(v: Vault, e: Entry, new: Header, old: Header, shared: tuple[str, ...]) -> Entry:
    """A copy of `e`'s object with header `new` (payload unchanged), recorded in its place."""
    object_id = os.urandom(16).hex()
    src_key = object_key(e.object)
    size = _stored_size(v, src_key)
    v.storage.copy_with_header(object_key(object_id), new.encode(), src_key, old.length, size)
    moved = Entry(
        e.path, "file", e.mode, e.mtime_ns, e.size, object_id, new.length, b64encode(new.mac),
        shared,
    )  # fmt: skip
    _commit_replacement(v, e, moved)
    return moved


def _stored_size(v: Vault, key: str) -> int:
    src = v.storage.open_source(key)
    try:
        return src.size
    finally:
        src.close()


def _commit_replacement(v: Vault, old: Entry, new: Entry) -> None:
    # Catalog first, then the old object: a crash in between leaves garbage, never a dangling
    # entry.
    v.commit([put_op(new)])
    v.storage.delete(object_key(old.object))


def import_age(v: Vault, src: str, dest: str) -> Entry:
    """Store the age file `src` at `dest` as it is (rewrapped to the vault, content untouched)
    and record it in the catalog."""
    entry = v.import_age(src, dest)
    v.commit([put_op(entry)])
    return entry


def remove(v: Vault, path: str) -> list[Entry]:
    """Remove `path` and everything below it; returns the entries removed."""
    v.entry(path)  # NotFound for an unknown path
    cat = v.catalog()
    p = normpath(path)
    if not p:
        raise VaultError("refusing to remove the vault root")
    gone = cat.below(p)
    v.commit([del_op(p)])
    for x in gone:
        if x.type == "file":
            v.storage.delete(object_key(x.object))
    return gone


def verify(v: Vault, path: str = "") -> Iterator[tuple[Entry, PqfsError | None]]:
    """Authenticate every chunk of every file under `path`; yields (entry, error or None)."""
    cat = v.catalog()
    p = normpath(path)
    targets = [e for e in cat.below(p) if e.type == "file"]  # the path's subtree, not a scan
    if p and not targets and cat.get(p) is None:
        raise NotFound(f"no such file in the vault: {p}")
    for e in sorted(targets, key=lambda x: x.path):
        try:
            with open_reader(v, e) as reader:
                for _ in reader.iter_range(0, reader.size):
                    pass
            yield e, None
        except PqfsError as err:
            yield e, err


class MassDeletion(VaultError):
    """gc would delete most of the vault: refused without `force`."""


def unreferenced(
    v: Vault, cat: Catalog, grace: float = 0.0
) -> tuple[list[tuple[str, int]], int, int]:
    """(the objects no entry of `cat` names, with their sizes, written at least `grace`
    seconds ago; how many more are unreferenced but younger; how many objects there are)."""
    live = {object_key(e.object) for e in cat.files()}
    stored = v.storage.list_dated(OBJECTS)
    since = time.time() - grace
    old = [(k, s) for k, s, t in stored if k not in live and t <= since]
    young = sum(1 for k, _, t in stored if k not in live and t > since)
    return old, young, len(stored)


@dataclass
class Collected:
    """What gc deleted (or, on a dry run, would delete): object keys with their sizes."""

    doomed: list[tuple[str, int]]
    total: int  # objects in the vault
    mass: bool  # most of the vault: refused without force
    young: int = 0  # unreferenced, but within the grace period: kept
    grace: float = 0.0  # that period, seconds

    @property
    def freed(self) -> int:
        return sum(size for _key, size in self.doomed)


def gc(
    v: Vault, force: bool = False, dry_run: bool = False, grace: float | None = None
) -> Collected:
    """Delete the objects no catalog entry references, written at least `grace` seconds ago
    (default bounds.gc_grace: another writer's object may not be recorded yet), and compact
    the catalog (with `dry_run`, only say what would be deleted; nothing changes).

    Only a verified catalog decides (a version-2 vault: what the owner and its writers
    signed; a forged segment's ops are ignored, so no object is unreferenced by them), and
    deleting most of a vault at once needs `force` (bounds.gc_mass_*)."""
    b = bounds.BOUNDS
    cat = v.catalog(reload=True)
    doomed, young, total = unreferenced(v, cat, b.gc_grace if grace is None else grace)
    mass = len(doomed) >= b.gc_mass_objects and len(doomed) > b.gc_mass_fraction * total
    out = Collected(doomed, total, mass, young, b.gc_grace if grace is None else grace)
    if dry_run:
        return out
    if mass and not force:
        raise MassDeletion(
            f"gc would delete {len(doomed)} of the vault's {total} objects; refusing to delete "
            "most of a vault (see them with --dry-run; if that is right, run gc --force)"
        )
    for key, _size in doomed:
        v.storage.delete(key)
    _compact(v, cat)
    return out


def maybe_compact(v: Vault) -> None:
    cat = v.catalog()
    if cat.deltas_since_snapshot >= bounds.BOUNDS.compact_after:
        _compact(v, cat)


def compact_now(v: Vault, cat: Catalog) -> None:
    """Compact the catalog `cat` (loaded just before) now, until it is done: another writer's
    append meanwhile is a reason to reload and try again, not to give up."""
    for _ in range(bounds.BOUNDS.append_attempts):
        if _compact(v, cat, too_large_is_fine=False):
            return
        cat = v.catalog(reload=True)
    raise VaultError("could not compact the catalog (too many concurrent writers)")


def _compact(v: Vault, cat: Catalog, too_large_is_fine: bool = True) -> bool:
    """Replace the chain by one snapshot (signed by the owner in a version-2 vault), then delete
    the segments it supersedes, the ignored ones among them. A tree too large for one segment
    keeps its chain (each delta is small); a tail that moved meanwhile (another writer) keeps
    it too, to be compacted another time."""
    try:
        written = v.append(cat_mod.snapshot_ops(cat), snapshot=True, expect_prev=cat.head_digest)
    except cat_mod.SegmentTooLarge:
        if not too_large_is_fine:
            raise
        written = None
    if written is not None:
        cat_mod.delete_through(v.storage, cat.head_seq)
    v.forget_catalog()  # its head is a segment compaction may have deleted
    return written is not None
