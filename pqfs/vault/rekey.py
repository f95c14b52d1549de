"""`pqfs rekey`: a new vault identity and owner key, without re-encrypting any content
(FORMAT.md §7.1).

Every content object gets a new header, wrapped to the new recipients only (the file key is
the same, so the payload is copied byte for byte: on S3 by the server, UploadPartCopy), under a
new id; the catalog becomes one snapshot, encrypted to the new recipients and signed by the new
owner key; then the old objects, the old segments and the old identity go.

Steps, each safe to interrupt (kill -9), a second run finishing the job. The state lives in
the store: `identity.age` holds the new identity before the old one while a rekey is under way.
1. identity.age := new identities, then the old ones (same passphrase);
2. every file's object is copied with a new header (its new id derived from the old one and
   the new identity, so a second run finds the copies the first made);
3. a snapshot naming the copies, signed by the new owner, after the tail (readers still on
   the old config ignore it: its signer is unknown to them);
4. pqfs.json := the new owner and recipients, the next generation, and a rotation signed by
   the old owner key, so hosts that pinned the old vault id follow to the new one;
5. until the catalog holds only files whose objects open with the new identity alone and no
   segment after the snapshot (a writer that appended meanwhile, to the old recipients): copy
   those, compact again;
6. delete every object and segment the new catalog does not name;
7. identity.age := the new identities only.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pqfs.errors import NoIdentityMatch, PqfsError, VaultError
from pqfs.format.agefile import read_header
from pqfs.format.encoding import b64encode
from pqfs.format.header import Header
from pqfs.format.keys import (
    HybridIdentity,
    Identity,
    Recipient,
    X25519Identity,
    parse_recipient,
    unwrap,
)
from pqfs.runtime.memory import wipe
from pqfs.runtime.pools import DaemonExecutor
from pqfs.vault import bounds
from pqfs.vault import catalog as cat_mod
from pqfs.vault.catalog import Catalog
from pqfs.vault.config import Rotation, VaultConfig
from pqfs.vault.objects import OBJECTS, checked_header, object_key
from pqfs.vault.schema import Entry
from pqfs.vault.signing import SigningKey
from pqfs.vault.vault import Vault

Idents = list[HybridIdentity | X25519Identity]
Progress = Callable[[int], None]  # bytes of objects done


@dataclass
class Rekeyed:
    files: int = 0  # objects copied with a new header
    payload_bytes: int = 0  # bytes of payload copied (server-side on S3)
    deleted: int = 0  # old objects and segments deleted
    resumed: bool = False


def split(idents: Idents) -> tuple[Idents, Idents]:
    """(new, old) of identity.age's identities: while a rekey is under way it holds two hybrid
    identities, the new first; else (all, [])."""
    starts = [i for i, x in enumerate(idents) if isinstance(x, HybridIdentity)]
    if len(starts) < 2:
        return idents, []
    return idents[: starts[1]], idents[starts[1] :]


def rekey(v: Vault, passphrase: bytes | bytearray, progress: Progress | None = None) -> Rekeyed:
    """Rekey `v`, unlocked with `passphrase` (which encrypts the new identity file)."""
    report = progress or (lambda n: None)
    if not v.config.signed:
        raise VaultError("rekey needs a version 2 vault (run: pqfs upgrade VAULT first)")
    done = Rekeyed()
    new, old = split(list(v.held_identities()))
    if old:
        done.resumed = True
    else:  # 1
        old = new
        new = [HybridIdentity.generate()]
        if any(isinstance(i, X25519Identity) for i in old):
            new.append(X25519Identity.generate())
        v.write_identities([*new, *old], passphrase)
    new_owner = SigningKey.owner_of(new[0])  # type: ignore[arg-type]
    mine = {i.recipient().encode() for i in old} | {i.recipient().encode() for i in new}
    extra = [r for r in v.config.recipients if r not in mine]
    recipients = [i.recipient() for i in new] + [
        r for r in v.config.recipient_objects() if r.encode() in extra
    ]
    made: set[str] = set()  # objects this run copied: wrapped to the new identity alone
    if v.config.owner is not None and v.config.owner.id != new_owner.id:
        cat = v.catalog(reload=True)  # under the old config: verified as it stands
        copies = _copy_all(v, cat, new, old, recipients, done, report)  # 2
        made = {e.object for e in copies.values()}
        _snapshot(v, cat, copies, recipients, new_owner)  # 3
        _switch_config(v, new_owner, recipients)  # 4
    else:
        new_owner.wipe()
    _settle(v, new, old, recipients, done, report, made)  # 5
    done.deleted = _sweep(v)  # 6
    v.write_identities(new, passphrase)  # 7
    v.forget_identities(old)
    return done


def _new_id(new: Idents, old_id: str) -> str:
    """The copy's id: a keyed hash of the old id under the new identity, so a second run finds
    what the first copied, and the store cannot tell which copy came from which object beyond
    what their sizes already say."""
    secret = new[0].derive_secret(b"pqfs.v2 rekey object ids")  # type: ignore[union-attr]
    try:
        return hmac.new(bytes(secret), old_id.encode(), hashlib.sha256).hexdigest()[:32]
    finally:
        wipe(secret)


def _opens_with_only(v: Vault, e: Entry, new: Idents, old: Idents) -> bool:
    """Whether `e`'s object is wrapped to the new identity and not to the old one."""
    src = v.storage.open_source(object_key(e.object))
    try:
        header = checked_header(e, src)
    finally:
        src.close()
    for idents, want in ((new, True), (old, False)):
        try:
            wipe(unwrap(header, idents))
            opened = True
        except NoIdentityMatch:
            opened = False
        if opened != want:
            return False
    return True


def _copy(
    v: Vault, e: Entry, new: Idents, both: Sequence[Identity], recipients: Sequence[Recipient]
) -> tuple[Entry, int]:
    """`e` pointing at a copy of its object with a header for `recipients` only; and the
    payload bytes copied (0 if a previous run made the copy)."""
    new_id = _new_id(new, e.object)
    key = object_key(new_id)
    src_key = object_key(e.object)
    src = v.storage.open_source(src_key)
    try:
        header = checked_header(e, src)
        fk = unwrap(header, both)
        try:
            targets = [*recipients, *(parse_recipient(r) for r in e.shared)]  # its shares stay
            fresh = Header.build([r.wrap(fk) for r in targets], fk)
            size = src.size
            try:
                v.storage.copy_with_header(
                    key, fresh.encode(), src_key, header.length, size, src, durable=False
                )
                copied = size - header.length
            except FileExistsError:  # a previous run's copy: check it, then take its binding
                copied = 0
                fresh = _earlier_copy(v, e, key, fk, size, new)
        finally:
            wipe(fk)
    finally:
        src.close()
    moved = Entry(
        e.path, "file", e.mode, e.mtime_ns, e.size, new_id, fresh.length, b64encode(fresh.mac),
        e.shared,
    )  # fmt: skip
    return moved, copied


def _earlier_copy(v: Vault, e: Entry, key: str, fk: bytearray, size: int, new: Idents) -> Header:
    """The header of the copy an interrupted run made at `key`, VaultError unless it is one:
    wrapped to the new identity, under the same file key (its MAC verified), of the same size
    (copies are written whole or not at all, so the payload is the source's)."""
    dst = v.storage.open_source(key)
    try:
        header = read_header(dst)
        theirs = unwrap(header, new)  # verifies the header MAC with the key it unwraps
        try:
            same = hmac.compare_digest(bytes(theirs), bytes(fk)) and dst.size == size
        finally:
            wipe(theirs)
    finally:
        dst.close()
    if not same:
        raise VaultError(f"{e.path}: {key} is not a copy of its object; delete it and run again")
    return header


def _copy_all(
    v: Vault,
    cat: Catalog,
    new: Idents,
    old: Idents,
    recipients: Sequence[Recipient],
    done: Rekeyed,
    report: Progress,
) -> dict[str, Entry]:
    return _copy_many(
        v, sorted(cat.files(), key=lambda x: x.path), new, [*old, *new], recipients, done, report
    )


def _copy_many(
    v: Vault,
    entries: list[Entry],
    new: Idents,
    both: Sequence[Identity],
    recipients: Sequence[Recipient],
    done: Rekeyed,
    report: Progress,
) -> dict[str, Entry]:
    """_copy of each entry, `rekey_parallel` at once; {path: the entry of its copy}."""
    out: dict[str, Entry] = {}
    pool = DaemonExecutor(bounds.BOUNDS.rekey_parallel, "pqfs-rekey")
    try:
        jobs = [(e, pool.submit(_copy, v, e, new, both, recipients)) for e in entries]
        for e, job in jobs:
            moved, copied = job.result()
            out[e.path] = moved
            done.files += 1
            done.payload_bytes += copied
            report(e.size)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    v.storage.make_durable()  # the copies, at once, before the snapshot that names them
    return out


def _snapshot(
    v: Vault,
    cat: Catalog,
    copies: dict[str, Entry],
    recipients: Sequence[Recipient],
    owner: SigningKey,
) -> None:
    ops = [cat_mod.put_op(copies.get(e.path, e)) for e in cat.entries.values()]
    signer = cat_mod.Signer(owner, owner.id, v.config.generation + 1)
    for _ in range(bounds.BOUNDS.append_attempts):
        written = cat_mod.append(
            v.storage, recipients, ops, snapshot=True, expect_prev=cat.head_digest, signer=signer
        )
        if written is not None:
            return
        # A writer appended meanwhile: what it added is taken up in step 5; the snapshot
        # goes after it.
        cat.head_digest = cat_mod.tail_digest(v.storage)
    raise VaultError("could not write the new catalog (too many concurrent writers)")


def _switch_config(v: Vault, owner: SigningKey, recipients: Sequence[Recipient]) -> None:
    old = v.config
    assert old.owner is not None
    endorsement = v.sign_rotation(owner.id)
    config = VaultConfig(
        old.version,
        [r.encode() for r in recipients],
        owner=owner.verify_key,
        generation=old.generation + 1,
        writers=list(old.writers),
        kem_backend=old.kem_backend,
        extra=dict(old.extra),
        rotations=[*old.rotations, Rotation(old.owner, endorsement, old.generation + 1)],
    )
    v.adopt_config(config, owner)


def _settle(
    v: Vault,
    new: Idents,
    old: Idents,
    recipients: Sequence[Recipient],
    done: Rekeyed,
    report: Progress,
    made: set[str],
) -> None:
    """Step 5: repeat until the catalog is one snapshot naming only objects wrapped to the new
    identity alone (the first pass of a fresh rekey finds nothing to do: `made` are the
    objects this run copied, known to be)."""
    both = [*old, *new]  # what it copies is wrapped to the old identity: tried first
    for _ in range(bounds.BOUNDS.append_attempts):
        v.forget_catalog()
        cat = cat_mod.load(v.storage, both, v.config)
        todo = [
            e for e in cat.files() if e.object not in made and not _opens_with_only(v, e, new, old)
        ]
        segs = cat_mod.list_segments(v.storage)
        tail_is_snapshot = bool(segs) and segs[-1].kind == "snap" and not cat.unverified
        if not todo and tail_is_snapshot and _segments_open_with(v, segs[-1:], new):
            return
        copies = _copy_many(v, todo, new, both, recipients, done, report)
        made.update(e.object for e in copies.values())
        ops = [cat_mod.put_op(copies.get(e.path, e)) for e in cat.entries.values()]
        if v.append(ops, snapshot=True, expect_prev=cat.head_digest) is not None:
            cat_mod.delete_through(v.storage, cat.head_seq)
    raise VaultError("could not settle the new catalog (too many concurrent writers)")


def _segments_open_with(v: Vault, segs: list[cat_mod.Segment], idents: Idents) -> bool:
    try:
        for s in segs:
            cat_mod.open_segment(v.storage.read_bytes(s.key), idents)
    except PqfsError:
        return False
    return True


def _sweep(v: Vault) -> int:
    """Step 6: delete what the new catalog does not name (the old objects, old segments and
    anything a crash left): it is signed by the new owner and opens with the new identity."""
    cat = v.catalog(reload=True)
    live = {object_key(e.object) for e in cat.files()}
    doomed = [key for key, _size in v.storage.list(OBJECTS) if key not in live]
    segs = cat_mod.list_segments(v.storage)
    snaps = [s.seq for s in segs if s.kind == "snap"]
    doomed += [s.key for s in segs if snaps and s.seq < snaps[-1]]
    v.storage.delete_many(doomed)
    v.forget_catalog()
    return len(doomed)
