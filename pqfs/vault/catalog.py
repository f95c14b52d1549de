"""The encrypted catalog: which vault path maps to which content object (docs/FORMAT.md §4).

The catalog is a chain of segments, each an age file encrypted to the vault recipients:
a snapshot (the whole tree) followed by deltas (ops appended by add/rm). Appending needs only
the public recipients, so `pqfs add` never needs the passphrase. Each segment names its
predecessor by the SHA-256 of its stored bytes; a missing, reordered or replaced segment after
the newest snapshot is detected on load.

Because anyone who can write to the store can append a segment, an op is input, not trusted
data: every op is checked against the schema of FORMAT.md §4 (schema.py) before it is used,
and one that fails (or would put a file below a file) is ignored and reported as one warning
line per segment (`Catalog.warnings`), never raised: a bad op must not make the vault
unreadable.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pqfs.errors import CatalogDamaged, FormatError, PqfsError, VaultError
from pqfs.format.agefile import BytesSource, encrypt_stream, open_age
from pqfs.format.header import MAX_HEADER
from pqfs.format.keys import Identity, Recipient
from pqfs.format.stream import NONCE_SIZE, ciphertext_size
from pqfs.storage.base import Storage
from pqfs.vault import bounds
from pqfs.vault.schema import INT64, Entry, MalformedOp, del_path, parse_json, put_entry

PREFIX = "catalog/"
SEGMENT = re.compile(r"catalog/(\d{16})\.(snap|delta)\.age")
FORMAT = 1
MAX_SEQ = 10**16 - 1  # a key holds 16 digits: a reader ignores any longer name (SEGMENT)
# A segment's plaintext is read and parsed whole. A snapshot costs ~300 bytes per entry, so
# this holds ~900,000 entries (nine times the 100,000-file library pqfs is built for), while a
# forged segment can make a reader allocate no more than this (and its parse).
MAX_SEGMENT_BYTES = 256 << 20
MAX_STORED_SEGMENT = MAX_HEADER + NONCE_SIZE + ciphertext_size(MAX_SEGMENT_BYTES)
IS_A_DIRECTORY = "it is a directory in the vault"


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

    def apply_segment(self, seq: int, doc: dict[str, Any]) -> None:
        """Apply the ops of segment `seq`; the ones to ignore make one line in `warnings`."""
        ops = doc.get("ops")
        if not isinstance(ops, list):
            what = "missing" if "ops" not in doc else "not a list"
            self.warnings.append(f"catalog segment {seq}: ops is {what}; no op of it applied")
            return
        malformed = conflicting = 0
        first = ""
        for i, op in enumerate(ops, 1):
            try:
                self.apply(op)
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


def _decode_segment(raw: bytes, identities: Sequence[Identity], seg: Segment) -> dict[str, Any]:
    """The segment's document with its header checked; FormatError (a message to follow the
    segment's name) if it cannot be used: such a segment breaks the chain, unlike a bad op."""
    reader = open_age(BytesSource(raw), identities)
    if reader.size > MAX_SEGMENT_BYTES:
        raise FormatError(f"larger than {MAX_SEGMENT_BYTES >> 20} MiB")
    try:
        doc = parse_json(reader.read(0, reader.size))
    except ValueError:
        raise FormatError("not valid JSON") from None
    if not isinstance(doc, dict):
        raise FormatError("not a JSON object")
    if not _is_int(doc.get("pqfs_catalog"), FORMAT) or not _is_int(doc.get("seq"), seg.seq):
        raise FormatError("wrong header (replaced or moved)")
    if doc.get("kind") != seg.kind:
        raise FormatError("wrong kind")
    return doc


def _read_segment(
    storage: Storage, identities: Sequence[Identity], seg: Segment
) -> tuple[bytes, dict[str, Any]]:
    """(stored bytes, document); VaultError naming the segment if it cannot be used."""
    if seg.size > MAX_STORED_SEGMENT:
        raise CatalogDamaged(f"catalog segment {seg.seq} ({seg.key}): larger than any valid one")
    raw = storage.read_bytes(seg.key)
    try:
        return raw, _decode_segment(raw, identities, seg)
    except PqfsError as e:
        raise CatalogDamaged(f"catalog segment {seg.seq} ({seg.key}): {e}") from None


def load(storage: Storage, identities: Sequence[Identity]) -> Catalog:
    """The catalog as of its newest segment. A segment that cannot be read, or a break in the
    chain, is a VaultError naming the segment; an op that cannot be used is ignored, reported
    in `Catalog.warnings`."""
    cat = Catalog()
    segs = list_segments(storage)
    snaps = [s for s in segs if s.kind == "snap"]
    start = snaps[-1].seq if snaps else 1
    chain = [s for s in segs if s.seq >= start]
    prev_digest: str | None = None
    expected = start
    for seg in chain:
        if seg.seq != expected:
            raise CatalogDamaged(
                f"catalog segment {expected} is missing (vault damaged or tampered)"
            )
        raw, doc = _read_segment(storage, identities, seg)
        if prev_digest is not None and doc.get("prev") != prev_digest:
            raise CatalogDamaged(f"catalog segment {seg.seq} does not follow segment {seg.seq - 1}")
        cat.apply_segment(seg.seq, doc)
        if seg.kind == "delta":
            cat.deltas_since_snapshot += 1
        prev_digest = hashlib.sha256(raw).hexdigest()
        expected += 1
    cat.head_seq = expected - 1
    cat.head_digest = prev_digest or ""
    return cat


# ------------------------------------------------------------------------- writing ----


class SegmentTooLarge(VaultError):
    """A segment readers would refuse (MAX_SEGMENT_BYTES): never written."""


def _tail(storage: Storage) -> tuple[int, str]:
    segs = list_segments(storage)
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


def append(
    storage: Storage,
    recipients: Sequence[Recipient],
    ops: Iterable[dict[str, Any]],
    snapshot: bool = False,
    expect_prev: str | None = None,
) -> int | None:
    """Write a new segment after the current tail; returns its sequence number.

    Needs no identity. Concurrent writers race on an exclusive create; the loser re-reads the
    tail and retries, so no segment is ever overwritten. With `expect_prev`, nothing is written
    (None is returned) unless the tail is still that segment: a snapshot must not hide a delta
    that another writer appended after the snapshot's state was read. Never writes a name
    readers would not read (more than 16 digits).
    """
    ops = list(ops)
    kind = "snap" if snapshot else "delta"
    last: tuple[int, str] | None = None
    stuck = 0
    for _ in range(bounds.BOUNDS.append_attempts):
        tail = _tail(storage)
        seq, digest = tail
        if expect_prev is not None and digest != expect_prev:
            return None
        if seq >= MAX_SEQ:
            raise _exhausted(seq)
        stuck = stuck + 1 if tail == last else 0
        if stuck >= bounds.BOUNDS.stuck_attempts:
            raise VaultError(
                f"cannot append catalog segment {seq + 1}: its key exists but is not listed as "
                "a segment (vault damaged or tampered)"
            )
        last = tail
        doc = {"pqfs_catalog": FORMAT, "seq": seq + 1, "kind": kind, "prev": digest, "ops": ops}
        out = io.BytesIO()
        encrypt_stream(io.BytesIO(_encode(doc)), out.write, recipients)
        try:
            storage.put_bytes(f"{PREFIX}{seq + 1:016d}.{kind}.age", out.getvalue(), exclusive=True)
            return seq + 1
        except FileExistsError:
            continue
    raise VaultError("could not append to the catalog (too many concurrent writers)")


def compact(storage: Storage, recipients: Sequence[Recipient], cat: Catalog) -> None:
    """Replace the chain by one snapshot, then delete the segments it supersedes. A tree too
    large for one segment keeps its chain (each delta is small)."""
    ops = [put_op(e) for e in cat.entries.values()]
    try:
        written = append(storage, recipients, ops, snapshot=True, expect_prev=cat.head_digest)
    except SegmentTooLarge:
        return
    if written is None:
        return  # another writer appended meanwhile: keep the chain, compact another time
    for seg in list_segments(storage):
        if seg.seq <= cat.head_seq:
            storage.delete(seg.key)
