"""The encrypted catalog: which vault path maps to which content object (docs/FORMAT.md §4).

The catalog is a chain of segments, each an age file encrypted to the vault recipients:
a snapshot (the whole tree) followed by deltas (ops appended by add/rm). Appending needs only
the public recipients, so `pqfs add` never needs the passphrase. Each segment names its
predecessor by the SHA-256 of its stored bytes; a missing, reordered or replaced segment after
the newest snapshot is detected on load.

In a version-2 vault every segment is signed (FORMAT.md §4.6) by the owner or a writer the
signed config authorizes, over its document and the vault id; a segment that is not (forged
with the public recipients, or written by a revoked writer) is ignored whole, with a warning,
so nothing it says is ever used, and the chain goes on through its bytes. A signed segment at
the wrong position, or whose `prev` breaks the chain, is damage, as in version 1.

Even a signed op is input, not trusted data (a writer host can be compromised too): every op is checked against the schema of FORMAT.md §4 (schema.py) before it is used,
and one that fails (or would put a file below a file) is ignored and reported as one warning
line per segment (`Catalog.warnings`), never raised: a bad op must not make the vault
unreadable.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pqfs.errors import CatalogDamaged, FormatError, NoIdentityMatch, PqfsError, VaultError
from pqfs.format.agefile import BytesSource, encrypt_stream, open_age
from pqfs.format.encoding import b64decode, b64encode
from pqfs.format.header import MAX_HEADER
from pqfs.format.keys import Identity, Recipient
from pqfs.format.stream import NONCE_SIZE, ciphertext_size
from pqfs.storage.base import Storage
from pqfs.vault import bounds
from pqfs.vault.config import VaultConfig
from pqfs.vault.schema import INT64, Entry, MalformedOp, del_path, parse_json, put_entry
from pqfs.vault.signing import SigningKey
from pqfs.vault.trust import Rollback

PREFIX = "catalog/"
SEGMENT = re.compile(r"catalog/(\d{16})\.(snap|delta)\.age")
FORMAT = 1  # pqfs_catalog of a version-1 vault's segments
SIGNED_FORMAT = 2  # and of a version-2 vault's (signed)
SEGMENT_PURPOSE = b"pqfs.v2 catalog segment"
MAX_SEQ = 10**16 - 1  # a key holds 16 digits: a reader ignores any longer name (SEGMENT)
# A segment's plaintext is read and parsed whole. A snapshot costs ~300 bytes per entry, so
# this holds ~900,000 entries (nine times the 100,000-file library pqfs is built for), while a
# forged segment can make a reader allocate no more than this (and its parse).
MAX_SEGMENT_BYTES = 256 << 20
MAX_STORED_SEGMENT = MAX_HEADER + NONCE_SIZE + ciphertext_size(MAX_SEGMENT_BYTES)
IS_A_DIRECTORY = "it is a directory in the vault"


class NoSignedSnapshot(CatalogDamaged):
    """A version-2 catalog without a snapshot the owner signed (forged, or an upgrade from
    version 1 that was interrupted before its first snapshot)."""


class ConflictingOp(VaultError):
    """A put that would make a file a directory or put something below a file (ignored)."""


@dataclass
class Segment:
    """A segment as listed: its number, "snap" or "delta", its key, its stored bytes."""

    seq: int
    kind: str
    key: str
    size: int = 0


def normpath(path: str) -> str:
    """Canonical vault path: relative, '/'-separated, no '.', '..' or empty parts; '' is the root.
    A backslash is an ordinary character of a name, as it is on Linux."""
    if "\x00" in path:
        raise VaultError("path contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise VaultError(f"path may not contain '..': {shown(path)}")
    return "/".join(parts)


_C_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\v": "\\v",
    "\f": "\\f",
    "\r": "\\r",
    "\\": "\\\\",
}


def shown(path: str) -> str:
    """`path` safe to print on a terminal or in a log (a name can carry an escape sequence):
    escaped as GNU `ls -b` does, with C escapes (\\n, \\t, ...), the backslash doubled, and
    every other non-printable character, and every byte that is not UTF-8, as octal \\ooo.
    Spaces stay as they are."""
    if path.isprintable() and "\\" not in path:
        return path
    out = []
    for ch in path:
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif "\udc80" <= ch <= "\udcff":  # a byte that is not UTF-8 (surrogate escape)
            out.append(f"\\{ord(ch) - 0xDC00:03o}")
        elif not ch.isprintable():
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append(ch)
    return "".join(out)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Catalog:
    """The tree as of the newest segment. Directories are explicit entries or implied by files.

    Invariants, kept by apply(): no entry is below a file, and `_kids` maps every directory
    that has something below it (explicit or implied) to the names directly below it, and
    nothing else. So an implied directory exists exactly while it is a key of `_kids`, and a
    lookup or a put costs O(path depth), whatever the size of the tree."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._kids: dict[str, set[str]] = {}
        self._newest: dict[str, int] = {}  # per directory, the newest mtime below it (memo)
        self.head_seq = 0
        self.head_digest = ""
        self.deltas_since_snapshot = 0
        self.warnings: list[str] = []  # one line per segment that had ops to ignore
        self.digests: dict[int, str] = {}  # stored-bytes SHA-256 of each segment loaded
        self.unverified: list[int] = []  # segments ignored whole: signed by no one authorized

    # ---------------------------------------------------------------- tree queries ----

    def get(self, path: str) -> Entry | None:
        return self._get(normpath(path))

    def _get(self, path: str) -> Entry | None:
        e = self.entries.get(path)
        if e is None and (path == "" or path in self._kids):
            return Entry(path, "dir", 0o755, self._implied_mtime(path))
        return e

    def _implied_mtime(self, path: str) -> int:
        """An implied directory is as new as the newest entry below it (0 for an empty root).
        Memoized per directory, from the directories below it (post-order, iterative): all
        of them cost O(tree) once, and after a change only the changed path's ancestors are
        computed again (apply drops just those)."""
        memo = self._newest
        stack = [(path, False)]
        while stack:
            p, children_done = stack.pop()
            if p in memo:
                continue
            below = [_join(p, n) for n in self._kids.get(p, ())]
            if not children_done:
                stack.append((p, True))
                stack.extend((c, False) for c in below if c in self._kids and c not in memo)
                continue
            newest = -INT64
            for c in below:
                e = self.entries.get(c)
                if e is not None:
                    newest = max(newest, e.mtime_ns)
                if c in self._kids:
                    newest = max(newest, memo[c])
            memo[p] = newest if below else 0  # only the root can have nothing below it
        return memo[path]

    def _changed(self, path: str, added: int | None = None) -> None:
        """Keep the memoized mtimes right after a change at `path`: a new entry (its mtime
        `added`) can only raise its ancestors'; anything else makes them unknown again."""
        memo = self._newest
        memo.pop(path, None)
        while path:
            path = path.rpartition("/")[0]
            if added is None or path not in memo:
                memo.pop(path, None)
            else:
                memo[path] = max(memo[path], added)

    def listdir(self, path: str) -> list[Entry]:
        return self._listdir(normpath(path))

    def _listdir(self, path: str) -> list[Entry]:
        out = []
        for name in sorted(self._kids.get(path, ())):
            e = self._get(_join(path, name))
            assert e is not None  # a name in _kids is an entry or an implied directory
            out.append(e)
        return out

    def walk(self, path: str) -> list[Entry]:
        """Every entry below `path`, implied directories included, depth-first in name order.
        Iterative: a path can be ~2000 levels deep, more than Python's recursion allows."""
        out: list[Entry] = []
        stack = [iter(self._listdir(normpath(path)))]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                continue
            out.append(child)
            if child.type == "dir":
                stack.append(iter(self._listdir(child.path)))
        return out

    def below(self, path: str) -> list[Entry]:
        """The explicit entries at and below `path`, in no particular order."""
        out, stack = [], [normpath(path)]
        while stack:
            p = stack.pop()
            e = self.entries.get(p)
            if e is not None:
                out.append(e)
            stack.extend(_join(p, n) for n in self._kids.get(p, ()))
        return out

    def files(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.type == "file"]

    def conflict(self, path: str, kind: str) -> str | None:
        """Why a put of a `kind` ("file" or "dir") at `path` would break the tree, or None:
        a file may not replace a directory, a directory may not replace a file, and nothing
        may be below a file. O(path depth)."""
        e = self.entries.get(path)
        if kind == "file" and (path in self._kids or (e is not None and e.type == "dir")):
            return IS_A_DIRECTORY
        if kind == "dir" and e is not None and e.type == "file":
            return "it is a file in the vault"
        p = path
        while p:
            p = p.rpartition("/")[0]
            if not p or p in self._kids:
                return None  # a directory: by the invariant, so is every ancestor of it
            e = self.entries.get(p)
            if e is not None:
                return None if e.type == "dir" else f"{shown(p)} is a file in the vault"
        return None

    # ---------------------------------------------------------------- applying ops ----

    def apply(self, op: object) -> None:
        """Apply one op. MalformedOp or ConflictingOp, with nothing changed, for an op to be
        ignored."""
        if not isinstance(op, dict):
            raise MalformedOp("op is not an object")
        kind = op.get("op")
        if kind == "put":
            e = put_entry(op)
            why = self.conflict(e.path, e.type)
            if why:
                raise ConflictingOp(f"{shown(e.path)}: {why}")
            replaced = self.entries.get(e.path)
            self.entries[e.path] = e  # a replaced file's object stays until `pqfs gc`
            self._link(e.path)
            self._changed(e.path, e.mtime_ns if replaced is None else None)
        elif kind == "del":
            path = del_path(op)
            self._delete(path)
            self._changed(path)
        else:
            raise MalformedOp('op is neither "put" nor "del"')

    def apply_segment(self, seq: int, doc: dict[str, Any], writer: bool = False) -> None:
        """Apply the ops of segment `seq`; the ones to ignore make one line in `warnings`.
        A writer's segment (`writer`) may only add (FORMAT.md §4.6): its deletes are
        malformed, a put over an existing file conflicts, and its shares are not recorded."""
        ops = doc.get("ops")
        if not isinstance(ops, list):
            what = "missing" if "ops" not in doc else "not a list"
            self.warnings.append(f"catalog segment {seq}: ops is {what}; no op of it applied")
            return
        malformed = conflicting = 0
        first = ""
        for i, op in enumerate(ops, 1):
            try:
                self.apply(_as_writer(op, self) if writer else op)
            except (MalformedOp, ConflictingOp) as e:
                if isinstance(e, MalformedOp):
                    malformed += 1
                else:
                    conflicting += 1
                first = first or f"op {i}: {e}"
        if malformed or conflicting:
            kinds = ((malformed, "malformed"), (conflicting, "conflicting"))
            counts = [f"{n} {what}" for n, what in kinds if n]
            self.warnings.append(
                f"catalog segment {seq}: {' and '.join(counts)} op(s) ignored ({first})"
            )

    def _link(self, path: str) -> None:
        while path:
            parent, _, name = path.rpartition("/")
            kids = self._kids.setdefault(parent, set())
            if name in kids:
                return  # linked before: so is every ancestor
            kids.add(name)
            path = parent

    def _delete(self, path: str) -> None:
        """Remove `path` and everything below it; O(what is removed + depth)."""
        stack = [path]
        while stack:
            p = stack.pop()
            self.entries.pop(p, None)
            stack.extend(_join(p, n) for n in self._kids.pop(p, ()))
        while path:  # unlink it; an implied directory vanishes with the last entry below it
            parent, _, name = path.rpartition("/")
            kids = self._kids.get(parent)
            if kids is None or name not in kids:
                return
            kids.discard(name)
            if kids:
                return
            del self._kids[parent]
            if parent in self.entries:
                return
            path = parent


def _as_writer(op: object, cat: Catalog) -> object:
    """`op` as a writer may make it: no delete, no replacing a file, no shares."""
    if not isinstance(op, dict):
        return op
    if op.get("op") == "del":
        raise MalformedOp("a writer may not delete (only the owner does)")
    if op.get("op") == "put":
        path = op.get("path")
        old = cat.entries.get(path) if isinstance(path, str) else None
        if old is not None and old.type == "file":
            raise ConflictingOp(f"{shown(old.path)}: a writer may not replace a file")
        if "shared" in op:
            op = {k: v for k, v in op.items() if k != "shared"}
    return op


def put_op(e: Entry) -> dict[str, Any]:
    return {"op": "put", **e.to_json()}


def del_op(path: str) -> dict[str, Any]:
    return {"op": "del", "path": normpath(path)}


def list_segments(storage: Storage) -> list[Segment]:
    segs = []
    for key, size in storage.list(PREFIX):
        m = SEGMENT.fullmatch(key)
        if m:
            segs.append(Segment(int(m.group(1)), m.group(2), key, size=size))
    segs.sort(key=lambda s: s.seq)
    return segs


# ------------------------------------------------------------------------- reading ----


def _is_int(value: object, expected: int) -> bool:
    return type(value) is int and value == expected


def segment_statement(vault_id: str, doc: bytes) -> bytes:
    """What a segment's signature covers (FORMAT.md §4.6): the vault, then the document's
    SHA-256 (the document names its position: seq, kind, prev)."""
    return vault_id.encode() + b"\x00" + hashlib.sha256(doc).digest()


def seal(doc: bytes, signer: SigningKey, vault_id: str) -> bytes:
    """A version-2 segment's plaintext: the document, LF, the signer's key id and signature."""
    sig = signer.sign(SEGMENT_PURPOSE, segment_statement(vault_id, doc))
    return doc + b"\n" + f"{signer.id} {b64encode(sig)}".encode()


class _Unverified(Exception):
    """A segment signed by no one the config authorizes: ignored whole (why: the message)."""


def open_segment(raw: bytes, identities: Sequence[Identity]) -> bytes:
    """A segment's plaintext (document and signature line); PqfsError if it does not open."""
    return _opened(raw, identities)


def tail_digest(storage: Storage) -> str:
    """SHA-256 of the stored bytes of the newest segment ("" if there is none)."""
    return _tail(storage, list_segments(storage))[1]


def _opened(raw: bytes, identities: Sequence[Identity]) -> bytes:
    reader = open_age(BytesSource(raw), identities)
    if reader.size > MAX_SEGMENT_BYTES + SIGNATURE_LINE:
        raise FormatError(f"larger than {MAX_SEGMENT_BYTES >> 20} MiB")
    return reader.read(0, reader.size)


SIGNATURE_LINE = 33 + 4500  # key id, a space, the base64 of a 3373-byte hybrid signature


def _verified(plain: bytes, config: VaultConfig, kind: str) -> tuple[bytes, str, int]:
    """(the document, who signed it, the generation it must be older than) of a version-2
    segment's plaintext; _Unverified unless its signature is of a key the config authorizes
    (a snapshot: the owner's) over this vault's id (or a former one's, for a writer)."""
    doc, lf, trailer = plain.partition(b"\n")
    if not lf:
        raise _Unverified("it is not signed")
    key_id, _, sig_text = trailer.partition(b" ")
    found = config.signer(key_id.decode("ascii", "replace"))
    if found is None:
        raise _Unverified("signed by a key the vault does not authorize")
    who, key = found
    if kind == "snap" and who != "owner":
        raise _Unverified(f"a snapshot signed by writer {who} (only the owner writes snapshots)")
    try:
        sig = b64decode(sig_text, "signature")
    except FormatError:
        raise _Unverified("its signature is malformed") from None
    # The owner signs for this vault id only; a writer's segment may be bound to a former one
    # (written before a rekey), if its generation is older than that rekey (checked below).
    ids = config.binding_ids() if who != "owner" else config.binding_ids()[:1]
    for vault_id, before in ids:
        if key.verify(SEGMENT_PURPOSE, segment_statement(vault_id, doc), sig):
            return doc, who, before
    raise _Unverified("its signature does not verify")


def _decode_segment(
    raw: bytes, identities: Sequence[Identity], seg: Segment, config: VaultConfig | None
) -> tuple[dict[str, Any], str]:
    """(document, signer: "owner", a writer's name, or "" in a version-1 vault) of a segment
    with its header checked; FormatError (a message to follow the segment's name) if it
    cannot be used, which breaks the chain (unlike a bad op); _Unverified if it is signed by
    no one authorized: in a version-2 vault also one that does not open with the identity
    (it cannot be verified: a writer's under keys since rotated away, or a forgery), and a
    writer's that is not what it claims (another position, a newer config), since a writer
    host may be compromised and must not be able to make the vault unreadable."""
    signed = config is not None and config.signed
    try:
        plain = _opened(raw, identities)
    except NoIdentityMatch:
        # A well-formed age file for other keys (a writer's, encrypted to the recipients of
        # before a rekey; or anyone's): nothing in it can be verified, so nothing is used.
        # Anything else that does not open (a bad header, MAC or chunk) is damage.
        if signed:
            raise _Unverified("it does not open with this vault's identity") from None
        raise
    if config is None or not config.signed:
        return _checked_doc(plain, seg, FORMAT, None), ""
    plain, who, before = _verified(plain, config, seg.kind)
    try:
        doc = _checked_doc(plain, seg, SIGNED_FORMAT, config)
        if doc["generation"] >= before:
            raise FormatError("bound to a former vault id, written after its rekey")
        return doc, who
    except (FormatError, Rollback) as e:
        if who == "owner":
            raise
        raise _Unverified(f"signed by writer {who}, but {e}") from None


def _checked_doc(
    plain: bytes, seg: Segment, version: int, config: VaultConfig | None
) -> dict[str, Any]:
    """The document of a segment's plaintext, its header checked against its key (and its
    generation against `config`, in a version-2 vault)."""
    if len(plain) > MAX_SEGMENT_BYTES:
        raise FormatError(f"larger than {MAX_SEGMENT_BYTES >> 20} MiB")
    try:
        doc = parse_json(plain)
    except ValueError:
        raise FormatError("not valid JSON") from None
    if not isinstance(doc, dict):
        raise FormatError("not a JSON object")
    if not _is_int(doc.get("pqfs_catalog"), version) or not _is_int(doc.get("seq"), seg.seq):
        raise FormatError("wrong header (replaced or moved)")
    if doc.get("kind") != seg.kind:
        raise FormatError("wrong kind")
    if config is not None:
        gen = doc.get("generation")
        if type(gen) is not int or gen < 1:
            raise FormatError("no config generation")
        if gen > config.generation:
            raise Rollback(
                f"catalog segment {seg.seq} was written under config generation {gen}, but "
                f"pqfs.json is generation {config.generation}: the config was rolled back"
            )
    return doc


def _read_segment(
    storage: Storage, identities: Sequence[Identity], seg: Segment, config: VaultConfig | None
) -> tuple[bytes, dict[str, Any] | None, str]:
    """(stored bytes, document or None if unverified, signer or why it is unverified);
    CatalogDamaged naming the segment if it cannot be used."""
    if seg.size > MAX_STORED_SEGMENT:
        raise CatalogDamaged(f"catalog segment {seg.seq} ({seg.key}): larger than any valid one")
    raw = storage.read_bytes(seg.key)
    try:
        doc, who = _decode_segment(raw, identities, seg, config)
        return raw, doc, who
    except _Unverified as e:
        return raw, None, str(e)
    except Rollback:
        raise
    except PqfsError as e:
        raise CatalogDamaged(f"catalog segment {seg.seq} ({seg.key}): {e}") from None


_Read = tuple[bytes, dict[str, Any] | None, str]


def segment_ops(
    storage: Storage, identities: Sequence[Identity], seg: Segment, config: VaultConfig | None
) -> tuple[object, bool] | None:
    """(ops, whether a writer rather than the owner made them) of one segment, read and
    checked alone (not its place in the chain: load does that); None if it is signed by no
    one authorized (readers ignore it). FileNotFoundError if it is gone (compacted)."""
    _, doc, who = _read_segment(storage, identities, seg, config)
    if doc is None:
        return None
    return doc.get("ops"), who not in ("owner", "")


def _start(
    storage: Storage,
    identities: Sequence[Identity],
    segs: list[Segment],
    config: VaultConfig | None,
    cache: dict[int, _Read],
) -> int:
    """The sequence number the chain starts at: the newest snapshot (in a version-2 vault, the
    newest one the owner signed: a forged snapshot must not hide the tree)."""
    snaps = [s for s in segs if s.kind == "snap"]
    if config is None or not config.signed:
        return snaps[-1].seq if snaps else 1
    for s in reversed(snaps):
        got = cache[s.seq] = _read_segment(storage, identities, s, config)
        if got[1] is not None:
            return s.seq
    raise NoSignedSnapshot(
        "the catalog has no snapshot signed by the vault owner (damaged or forged)"
    )


def load(
    storage: Storage, identities: Sequence[Identity], config: VaultConfig | None = None
) -> Catalog:
    """The catalog as of its newest segment (`config`: a version-2 vault's, whose signatures it
    checks; None for version 1). A segment that cannot be read, or a break in the chain, is a
    CatalogDamaged naming the segment; an op that cannot be used, or a segment signed by no
    one authorized, is ignored and reported in `Catalog.warnings`."""
    cat = Catalog()
    segs = list_segments(storage)
    cache: dict[int, _Read] = {}
    start = _start(storage, identities, segs, config, cache) if segs else 1
    chain = [s for s in segs if s.seq >= start]
    prev_digest: str | None = None
    expected = start
    for seg in chain:
        if seg.seq != expected:
            raise CatalogDamaged(
                f"catalog segment {expected} is missing (vault damaged or tampered)"
            )
        got = cache.pop(seg.seq, None)
        raw, doc, who = got if got is not None else _read_segment(storage, identities, seg, config)
        if doc is not None and prev_digest is not None and doc.get("prev") != prev_digest:
            if who in ("owner", ""):
                raise CatalogDamaged(
                    f"catalog segment {seg.seq} does not follow segment {seg.seq - 1}"
                )
            doc, who = None, f"signed by writer {who}, but it does not follow segment {seg.seq - 1}"
        if doc is None:
            cat.unverified.append(seg.seq)
            cat.warnings.append(
                f"catalog segment {seg.seq} ignored: {who} (forged, or by a revoked writer; "
                "pqfs gc removes it)"
            )
        else:
            cat.apply_segment(seg.seq, doc, writer=who not in ("owner", ""))
        if seg.kind == "delta":
            cat.deltas_since_snapshot += 1
        prev_digest = hashlib.sha256(raw).hexdigest()
        cat.digests[seg.seq] = prev_digest
        expected += 1
    cat.head_seq = expected - 1
    cat.head_digest = prev_digest or ""
    return cat


# ------------------------------------------------------------------------- writing ----


class SegmentTooLarge(VaultError):
    """A segment readers would refuse (MAX_SEGMENT_BYTES): never written."""


def _tail(storage: Storage, segs: list[Segment]) -> tuple[int, str]:
    if not segs:
        return 0, ""
    last = segs[-1]
    return last.seq, hashlib.sha256(storage.read_bytes(last.key)).hexdigest()


def _exhausted(seq: int) -> VaultError:
    return VaultError(
        f"the catalog's sequence numbers are exhausted (segment {seq} exists; a vault that "
        "has been used takes centuries to get there): the vault looks tampered with"
    )


def check_appendable(storage: Storage) -> None:
    """VaultError now, before any work, if no segment can be appended (see append)."""
    segs = list_segments(storage)
    if segs and segs[-1].seq >= MAX_SEQ:
        raise _exhausted(segs[-1].seq)


def _encode(doc: dict[str, Any]) -> bytes:
    """The segment's JSON. A name that is not UTF-8 holds lone surrogates (PEP 383), which
    UTF-8 cannot encode; backslashreplace writes each as the JSON escape \\udcXX, which is
    exactly right since a lone surrogate can only occur inside a JSON string."""
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    body = text.encode("utf-8", "backslashreplace")
    if len(body) > MAX_SEGMENT_BYTES:
        raise SegmentTooLarge(
            f"a catalog segment of {len(body) >> 20} MiB would be larger than readers accept "
            f"({MAX_SEGMENT_BYTES >> 20} MiB)"
        )
    return body


@dataclass(frozen=True)
class Signer:
    """Who signs the segments a version-2 vault's writer appends: its key (the owner's or an
    authorized writer's), the vault they are bound to, and the config generation it read."""

    key: SigningKey
    vault_id: str
    generation: int


@dataclass(frozen=True)
class Written:
    seq: int
    digest: str  # SHA-256 of the stored bytes (what the next segment's prev will be)


TailCheck = Callable[[int, str], None]  # (tail seq, its digest): raises to refuse appending
Rebase = Callable[[list[Segment]], Sequence[dict[str, Any]]]  # the listing -> the ops to write


def append(
    storage: Storage,
    recipients: Sequence[Recipient],
    ops: Iterable[dict[str, Any]],
    snapshot: bool = False,
    expect_prev: str | None = None,
    signer: Signer | None = None,
    check_tail: TailCheck | None = None,
    rebase: Rebase | None = None,
) -> Written | None:
    """Write a new segment after the current tail; returns its number and digest.

    Needs no identity. Concurrent writers race on an exclusive create; the loser re-reads the
    tail and retries, so no segment is ever overwritten. With `expect_prev`, nothing is written
    (None is returned) unless the tail is still that segment: a snapshot must not hide a delta
    that another writer appended after the snapshot's state was read. Never writes a name
    readers would not read (more than 16 digits). With `signer` the segment is a version-2
    one, signed; `check_tail` sees each tail before anything is chained to it (rollback).
    With `rebase`, the ops written are what it makes of the listing each attempt sees (a
    writer with a view of the catalog rewrites them around what others appended: rebase.py);
    nothing is written (None) if it leaves none.
    """
    ops = list(ops)
    kind = "snap" if snapshot else "delta"
    last: tuple[int, str] | None = None
    stuck = lost = 0
    for _ in range(bounds.BOUNDS.append_attempts):
        if lost:
            _back_off(lost)
        segs = list_segments(storage)
        tail = _tail(storage, segs)
        seq, digest = tail
        if expect_prev is not None and digest != expect_prev:
            return None
        if seq >= MAX_SEQ:
            raise _exhausted(seq)
        if check_tail is not None:
            check_tail(seq, digest)
        stuck = stuck + 1 if tail == last else 0
        if stuck >= bounds.BOUNDS.stuck_attempts:
            raise VaultError(
                f"cannot append catalog segment {seq + 1}: its key exists but is not listed as "
                "a segment (vault damaged or tampered)"
            )
        last = tail
        if rebase is not None:
            ops = list(rebase(segs))
            if not ops:
                return None
        stored = _segment_bytes(recipients, seq + 1, kind, digest, ops, signer)
        key = f"{PREFIX}{seq + 1:016d}.{kind}.age"
        try:
            storage.put_bytes(key, stored, exclusive=True)
        except FileExistsError:
            lost += 1
            continue
        if _twin(storage, seq + 1, kind):
            # Create-if-absent is per key, and the key names the kind: a snapshot and a delta
            # of one number can both be created. Whoever finds the other after writing takes
            # its own back and tries again, so a reader never sees two for long.
            storage.delete(key)
            lost += 1
            continue
        return Written(seq + 1, hashlib.sha256(stored).hexdigest())
    raise VaultError("could not append to the catalog (too many concurrent writers)")


def _back_off(lost: int) -> None:
    """After `lost` races lost in a row: a random wait, growing (bounds.append_backoff_*)."""
    b = bounds.BOUNDS
    _pause(random.uniform(0, min(b.append_backoff_max, b.append_backoff_first * 2**lost)))


_pause = time.sleep  # (a test records the waits here)


def _twin(storage: Storage, seq: int, kind: str) -> bool:
    """Whether segment `seq` also exists as the other kind."""
    return any(s.seq == seq and s.kind != kind for s in list_segments(storage))


def _segment_bytes(
    recipients: Sequence[Recipient],
    seq: int,
    kind: str,
    prev: str,
    ops: list[dict[str, Any]],
    signer: Signer | None,
) -> bytes:
    if signer is None:
        doc = {"pqfs_catalog": FORMAT, "seq": seq, "kind": kind, "prev": prev, "ops": ops}
        plain = _encode(doc)
    else:
        doc = {
            "pqfs_catalog": SIGNED_FORMAT,
            "seq": seq,
            "kind": kind,
            "prev": prev,
            "generation": signer.generation,
            "ops": ops,
        }
        plain = seal(_encode(doc), signer.key, signer.vault_id)
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plain), out.write, recipients)
    return out.getvalue()


def snapshot_ops(cat: Catalog) -> list[dict[str, Any]]:
    """The ops of a snapshot of `cat` (what compaction writes)."""
    return [put_op(e) for e in cat.entries.values()]


def delete_through(storage: Storage, seq: int) -> None:
    """Delete the segments up to `seq` (after a snapshot at seq + 1 superseded them)."""
    for seg in list_segments(storage):
        if seg.seq <= seq:
            storage.delete(seg.key)
