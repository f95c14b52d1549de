"""Work on a whole unlocked vault beyond adding to it: remove, share, verify, and reclaiming
space (gc, catalog compaction).

Order of writes, everywhere here: the catalog first, then the objects it no longer names. A
crash in between leaves garbage for `gc`, never an entry whose object is gone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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


def gc(v: Vault) -> tuple[int, int]:
    """Delete objects no catalog entry references; compact the catalog. (count, bytes)."""
    cat = v.catalog(reload=True)
    live = {object_key(e.object) for e in cat.files()}
    count = freed = 0
    for key, size in v.storage.list(OBJECTS):
        if key not in live:
            v.storage.delete(key)
            count += 1
            freed += size
    _compact(v, cat)
    return count, freed


def maybe_compact(v: Vault) -> None:
    cat = v.catalog()
    if cat.deltas_since_snapshot >= bounds.BOUNDS.compact_after:
        _compact(v, cat)


def _compact(v: Vault, cat: Catalog) -> None:
    cat_mod.compact(v.storage, v.recipients, cat)
    v.forget_catalog()  # its head is a segment compaction may have deleted
