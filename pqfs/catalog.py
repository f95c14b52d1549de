"""The encrypted catalog: which vault path maps to which content object (docs/FORMAT.md §4).

The catalog is a chain of segments, each an age file encrypted to the vault recipients:
a snapshot (the whole tree) followed by deltas (ops appended by add/rm). Appending needs only
the public recipients, so `pqfs add` never needs the passphrase. Each segment names its
predecessor by the SHA-256 of its stored bytes; a missing, reordered or replaced segment after
the newest snapshot is detected on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .agefile import BytesSource, encrypt_stream, open_age
from .errors import FormatError, PqfsError, VaultError
from .keys import Identity, Recipient
from .storage import Storage

PREFIX = "catalog/"
SEGMENT = re.compile(r"catalog/(\d{16})\.(snap|delta)\.age")
FORMAT = 1


@dataclass
class Entry:
    path: str
    type: str  # "file" or "dir"
    mode: int
    mtime_ns: int
    size: int = 0
    object: str = ""  # content object id (files)
    hlen: int = 0  # header length of the content object
    mac: str = ""  # header MAC (base64): binds this entry to exactly one object

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.type == "dir":
            for k in ("size", "object", "hlen", "mac"):
                d.pop(k)
        return d


@dataclass
class Segment:
    seq: int
    kind: str
    key: str
    digest: str = ""
    ops: list[dict[str, Any]] = field(default_factory=list)


def normpath(path: str) -> str:
    """Canonical vault path: relative, '/'-separated, no '.', '..' or empty parts; '' is the root."""
    if "\x00" in path:
        raise VaultError("path contains a NUL byte")
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise VaultError(f"path may not contain '..': {path}")
    return "/".join(parts)


class Catalog:
    """The tree as of the newest segment. Directories are explicit entries or implied by files."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.head_seq = 0
        self.head_digest = ""
        self.deltas_since_snapshot = 0

    # ---------------------------------------------------------------- tree queries ----

    def get(self, path: str) -> Entry | None:
        path = normpath(path)
        e = self.entries.get(path)
        if e is None and (path == "" or self._is_implied_dir(path)):
            return Entry(path, "dir", 0o755, 0)
        return e

    def _is_implied_dir(self, path: str) -> bool:
        prefix = path + "/"
        return any(p.startswith(prefix) for p in self.entries)

    def listdir(self, path: str) -> list[Entry]:
        path = normpath(path)
        prefix = path + "/" if path else ""
        children: dict[str, Entry] = {}
        for p, e in self.entries.items():
            if not p.startswith(prefix) or p == path:
                continue
            rest = p[len(prefix) :]
            name = rest.split("/", 1)[0]
            full = prefix + name
            if "/" in rest:
                children.setdefault(full, self.entries.get(full) or Entry(full, "dir", 0o755, 0))
            else:
                children[full] = e
        return [children[k] for k in sorted(children)]

    def walk(self, path: str) -> list[Entry]:
        """Every entry below `path`, implied directories included, depth-first in name order."""
        out: list[Entry] = []
        for child in self.listdir(path):
            out.append(child)
            if child.type == "dir":
                out.extend(self.walk(child.path))
        return out

    def files(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.type == "file"]

    # ---------------------------------------------------------------- applying ops ----

    def apply(self, op: dict[str, Any]) -> None:
        kind = op.get("op")
        if kind == "put":
            e = Entry(**{k: v for k, v in op.items() if k != "op"})
            e.path = normpath(e.path)
            self.entries[e.path] = e  # a replaced file's object stays until `pqfs gc`
        elif kind == "del":
            path = normpath(op["path"])
            self.entries.pop(path, None)
            prefix = path + "/"
            for p in [p for p in self.entries if p.startswith(prefix)]:
                del self.entries[p]
        else:
            raise FormatError(f"unknown catalog op {kind!r}")


def put_op(e: Entry) -> dict[str, Any]:
    return {"op": "put", **e.to_json()}


def del_op(path: str) -> dict[str, Any]:
    return {"op": "del", "path": normpath(path)}


def list_segments(storage: Storage) -> list[Segment]:
    segs = []
    for key, _size in storage.list(PREFIX):
        m = SEGMENT.fullmatch(key)
        if m:
            segs.append(Segment(int(m.group(1)), m.group(2), key))
    segs.sort(key=lambda s: s.seq)
    return segs


def _decode_segment(raw: bytes, identities: Sequence[Identity], seg: Segment) -> dict[str, Any]:
    reader = open_age(BytesSource(raw), identities)
    try:
        doc = json.loads(reader.read(0, reader.size))
    except ValueError:
        raise FormatError(f"catalog segment {seg.seq} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("pqfs_catalog") != FORMAT or doc.get("seq") != seg.seq:
        raise FormatError(f"catalog segment {seg.seq} has a wrong header (replaced or moved)")
    if (doc.get("kind") or "") != seg.kind:
        raise FormatError(f"catalog segment {seg.seq} has the wrong kind")
    return doc


def load(storage: Storage, identities: Sequence[Identity]) -> Catalog:
    cat = Catalog()
    segs = list_segments(storage)
    snaps = [s for s in segs if s.kind == "snap"]
    start = snaps[-1].seq if snaps else 1
    chain = [s for s in segs if s.seq >= start]
    prev_digest: str | None = None
    expected = start
    for seg in chain:
        if seg.seq != expected:
            raise VaultError(f"catalog segment {expected} is missing (vault damaged or tampered)")
        raw = storage.read_bytes(seg.key)
        try:
            doc = _decode_segment(raw, identities, seg)
        except PqfsError as e:
            raise VaultError(f"catalog segment {seg.seq}: {e}") from None
        if prev_digest is not None and doc.get("prev") != prev_digest:
            raise VaultError(f"catalog segment {seg.seq} does not follow segment {seg.seq - 1}")
        for op in doc.get("ops", []):
            cat.apply(op)
        if seg.kind == "delta":
            cat.deltas_since_snapshot += 1
        prev_digest = hashlib.sha256(raw).hexdigest()
        expected += 1
    cat.head_seq = expected - 1
    cat.head_digest = prev_digest or ""
    return cat


def _tail(storage: Storage) -> tuple[int, str]:
    segs = list_segments(storage)
    if not segs:
        return 0, ""
    last = segs[-1]
    return last.seq, hashlib.sha256(storage.read_bytes(last.key)).hexdigest()


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
    that another writer appended after the snapshot's state was read.
    """
    ops = list(ops)
    kind = "snap" if snapshot else "delta"
    for _ in range(100):
        seq, digest = _tail(storage)
        if expect_prev is not None and digest != expect_prev:
            return None
        seq += 1
        doc = {"pqfs_catalog": FORMAT, "seq": seq, "kind": kind, "prev": digest, "ops": ops}
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        out = io.BytesIO()
        encrypt_stream(io.BytesIO(body), out.write, recipients)
        try:
            storage.put_bytes(f"{PREFIX}{seq:016d}.{kind}.age", out.getvalue(), exclusive=True)
            return seq
        except FileExistsError:
            continue
    raise VaultError("could not append to the catalog (too many concurrent writers)")


def compact(storage: Storage, recipients: Sequence[Recipient], cat: Catalog) -> None:
    """Replace the chain by one snapshot, then delete the segments it supersedes."""
    ops = [put_op(e) for e in cat.entries.values()]
    if append(storage, recipients, ops, snapshot=True, expect_prev=cat.head_digest) is None:
        return  # another writer appended meanwhile: keep the chain, compact another time
    for seg in list_segments(storage):
        if seg.seq <= cat.head_seq:
            storage.delete(seg.key)
