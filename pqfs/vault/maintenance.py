"""Work on a whole unlocked vault beyond adding to it: remove, share, verify, and reclaiming
space (gc, catalog compaction).

Order of writes, everywhere here: the catalog first, then the objects it no longer names. A
crash in between leaves garbage for `gc`, never an entry whose object is gone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pqfs.errors import NotFound, PqfsError, VaultError
from pqfs.format.encoding import b64encode
from pqfs.format.keys import Recipient, unwrap
from pqfs.runtime.memory import wipe
from pqfs.vault import bounds
from pqfs.vault import catalog as cat_mod
from pqfs.vault.catalog import Catalog, del_op, normpath, put_op
from pqfs.vault.objects import OBJECTS, checked_header, copy_rewrapped, object_key, open_reader
from pqfs.vault.schema import Entry
from pqfs.vault.vault import Vault


def share(v: Vault, path: str, recipients: Sequence[Recipient]) -> Entry:
    """Give more recipients access to one file without re-encrypting its content."""
    e = v.entry(path)
    if e.type != "file":
        raise VaultError(f"not a file: {e.path}")
    src = v.storage.open_source(object_key(e.object))
    try:
        header = checked_header(e, src)
        fk = unwrap(header, v.identities)
        try:
            object_id, new = copy_rewrapped(v.storage, src, header, fk, recipients)
        finally:
            wipe(fk)
    finally:
        src.close()
    new_entry = Entry(
        e.path, "file", e.mode, e.mtime_ns, e.size, object_id, new.length, b64encode(new.mac)
    )
    # Catalog first, then the old object: a crash in between leaves garbage, never a dangling
    # entry.
    v.commit([put_op(new_entry)])
    v.storage.delete(object_key(e.object))
    return new_entry


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


def unreferenced(v: Vault, cat: Catalog) -> tuple[list[tuple[str, int]], int]:
    """(the objects no entry of `cat` names, with their sizes; how many objects there are)."""
    live = {object_key(e.object) for e in cat.files()}
    stored = v.storage.list(OBJECTS)
    return [(k, s) for k, s in stored if k not in live], len(stored)


@dataclass
class Collected:
    """What gc deleted (or, on a dry run, would delete): object keys with their sizes."""

    doomed: list[tuple[str, int]]
    total: int  # objects in the vault
    mass: bool  # most of the vault: refused without force

    @property
    def freed(self) -> int:
        return sum(size for _key, size in self.doomed)


def gc(v: Vault, force: bool = False, dry_run: bool = False) -> Collected:
    """Delete the objects no catalog entry references, and compact the catalog (with
    `dry_run`, only say what would be deleted; nothing changes).

    Only a verified catalog decides (a version-2 vault: what the owner and its writers
    signed; a forged segment's ops are ignored, so no object is unreferenced by them), and
    deleting most of a vault at once needs `force` (bounds.gc_mass_*)."""
    cat = v.catalog(reload=True)
    doomed, total = unreferenced(v, cat)
    b = bounds.BOUNDS
    mass = len(doomed) >= b.gc_mass_objects and len(doomed) > b.gc_mass_fraction * total
    out = Collected(doomed, total, mass)
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
