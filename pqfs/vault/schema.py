"""What a catalog op may hold (docs/FORMAT.md §4): the entry it describes, the paths a
catalog may hold, every field's type and range, and the bounds on parsing a segment's JSON.

An op is input, not trusted data (anyone who can write to the store can append a segment):
`put_entry` and `op_path` check every field a reader uses, and `parse_json` reads a forged
document within fixed bounds. The catalog (catalog.py) ignores an op they refuse; a writer
checks its own with `check_op` before writing it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from pqfs.errors import FormatError
from pqfs.format.header import MAX_HEADER

# Every value pqfs reads is at most 3 levels deep (segment, ops, op); Python's parser recurses
# once per level and fails near 1000. Values nested deeper than this are read as null.
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 20  # an int64 has at most 19 digits and a sign
INT64 = 1 << 63
NAME_MAX = 255  # bytes in one path component, as on Linux: the kernel refuses longer names
PATH_MAX = 4096  # bytes in a whole path, as on Linux
MODE_BITS = 0o777  # permissions only: nothing is ever served setuid, setgid or sticky
MAC_SIZE = 32
_OBJECT_ID = re.compile(r"[0-9a-f]{32}")
# The canonical unpadded base64 of 32 bytes (what encoding.b64decode accepts, checked against it
# in tests/test_catalog_input.py): 43 characters, 258 bits, so the last character's two low bits
# are zero. A regex, since every put has one and b64decode costs half of a put's check.
_MAC = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]")


class MalformedOp(FormatError):
    """A catalog op that does not follow the schema of FORMAT.md §4 (it is ignored)."""


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
    # Recipients the file was shared with (`pqfs share`), besides the vault's: what unshare
    # and rekey wrap the file key to again.
    shared: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mode"] = self.mode & MODE_BITS  # a setuid source file is stored without the bit
        if self.type == "dir":
            for k in ("size", "object", "hlen", "mac"):
                d.pop(k)
        if self.shared and self.type == "file":
            d["shared"] = list(self.shared)
        else:
            d.pop("shared")
        return d


def path_problem(path: str) -> str | None:
    """Why `path` is not a path a catalog may hold (FORMAT.md §4), or None. Names are bytes:
    one that is not UTF-8 is held with Python's surrogate escapes (PEP 383, os.fsdecode), and
    its escapes must not spell valid UTF-8, so that each name has exactly one spelling."""
    if not path:
        return None
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "path holds a surrogate that stands for no byte"
    if raw.decode("utf-8", "surrogateescape") != path:
        return "path escapes bytes that spell valid UTF-8 (not canonical)"
    if b"\0" in raw:
        return "path contains a NUL byte"
    if len(raw) >= PATH_MAX:
        return f"path is longer than {PATH_MAX - 1} bytes"
    for part in raw.split(b"/"):
        if part in (b"", b".", b".."):
            return "path is not canonical (an empty, '.' or '..' component)"
        if len(part) > NAME_MAX:
            return f"a name is longer than {NAME_MAX} bytes"
    return None


# ------------------------------------------------------------------------- op schema ----


def _field(op: dict[str, Any], key: str) -> Any:
    if key not in op:
        raise MalformedOp(f"{key} is missing")
    return op[key]


def _int(op: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """A whole number in [lo, hi). JSON true/false are not numbers, though Python's are."""
    v = _field(op, key)
    if type(v) is not int:
        raise MalformedOp(f"{key} is not a whole number")
    if not lo <= v < hi:
        raise MalformedOp(f"{key} is out of range")
    return v


def _str(op: dict[str, Any], key: str) -> str:
    v = _field(op, key)
    if not isinstance(v, str):
        raise MalformedOp(f"{key} is not a string")
    return v


def op_path(op: dict[str, Any]) -> str:
    path = _str(op, "path")
    problem = path_problem(path)
    if problem:
        raise MalformedOp(problem)
    return path


def del_path(op: dict[str, Any]) -> str:
    """The path a del op removes. Never the root: no writer deletes the whole tree in one op
    (`pqfs rm` refuses it), so such an op is malformed rather than an empty vault."""
    path = op_path(op)
    if not path:
        raise MalformedOp("a del of the root")
    return path


def put_entry(op: dict[str, Any]) -> Entry:
    """The entry a put op describes, every field checked (unknown keys ignored, §6)."""
    path = op_path(op)
    kind = _field(op, "type")
    if kind not in ("file", "dir"):
        raise MalformedOp('type is neither "file" nor "dir"')
    mode = _int(op, "mode", 0, 1 << 32) & MODE_BITS
    mtime_ns = _int(op, "mtime_ns", -INT64, INT64)
    if kind == "dir":
        return Entry(path, "dir", mode, mtime_ns)
    if not path:
        raise MalformedOp("the root is not a file")
    size = _int(op, "size", 0, INT64)
    obj = _str(op, "object")
    if not _OBJECT_ID.fullmatch(obj):
        raise MalformedOp("object is not 32 lowercase hex digits")
    hlen = _int(op, "hlen", 1, MAX_HEADER + 1)
    mac = _str(op, "mac")
    if not _MAC.fullmatch(mac):
        raise MalformedOp(f"mac is not the canonical base64 of a {MAC_SIZE}-byte MAC")
    return Entry(path, "file", mode, mtime_ns, size, obj, hlen, mac, _shared(op))


MAX_SHARED = 64  # recipients one file is shared with: a bound on what a forged op makes us hold
_RECIPIENT = re.compile(r"age1[0-9a-z]{1,4000}")


def _shared(op: dict[str, Any]) -> tuple[str, ...]:
    v = op.get("shared", [])
    if (
        not isinstance(v, list)
        or len(v) > MAX_SHARED
        or not all(isinstance(r, str) and _RECIPIENT.fullmatch(r) for r in v)
    ):
        raise MalformedOp(f"shared is not a list of at most {MAX_SHARED} age recipients")
    return tuple(v)


def check_op(op: object) -> None:
    """MalformedOp if `op` does not follow the schema (what a writer checks before writing)."""
    if not isinstance(op, dict):
        raise MalformedOp("op is not an object")
    kind = op.get("op")
    if kind == "put":
        put_entry(op)
    elif kind == "del":
        del_path(op)
    else:
        raise MalformedOp('op is neither "put" nor "del"')


# ----------------------------------------------------------------------- JSON bounds ----

_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _prune_deep(text: str) -> str:
    """`text` with every value nested deeper than MAX_JSON_DEPTH replaced by null. ValueError
    for brackets that do not balance (no JSON document, then)."""
    out: list[str] = []
    depth = last = cut = 0
    for m in _TOKEN.finditer(text):
        c = m.group()
        if c in ("[", "{"):
            depth += 1
            if depth == MAX_JSON_DEPTH + 1:
                cut = m.start()
        elif c in ("]", "}"):
            if depth == MAX_JSON_DEPTH + 1:
                out += (text[last:cut], "null")
                last = m.end()
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced brackets")
    if depth:
        raise ValueError("unbalanced brackets")
    out.append(text[last:])
    return "".join(out)


def _bounded_int(text: str) -> int:
    """An integer literal; one longer than any int64 as 2**63 (or below -2**63), which every
    field refuses as out of range: Python would refuse to convert more than 4300 digits."""
    if len(text) <= MAX_INT_DIGITS:
        return int(text)
    return -INT64 - 1 if text.startswith("-") else INT64


def parse_json(body: bytes) -> Any:
    """The JSON document of a segment, in one C-speed call in the common case. A document that
    call refuses is parsed again the careful way, so that neither deep nesting (RecursionError)
    nor a number of thousands of digits makes a valid segment unreadable. ValueError if it is
    not JSON."""
    text = body.decode("utf-8")
    try:
        return json.loads(text)
    except (RecursionError, ValueError):
        pass
    try:
        return json.loads(_prune_deep(text), parse_int=_bounded_int)
    except RecursionError:  # cannot happen after pruning; never let it escape the loader
        raise ValueError("nested too deeply") from None
