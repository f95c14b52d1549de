"""The age v1 header: strict parsing, serialization and the header MAC (spec: docs/FORMAT.md §2).

Parsing is strict as the spec demands: LF only, canonical base64, exact line widths, no empty
arguments. Nothing here knows about keys beyond the MAC, which is keyed by the file key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pqfs.errors import FormatError, HeaderMacError
from pqfs.format.encoding import b64decode, b64encode

VERSION_LINE = b"age-encryption.org/v1\n"
VERSION_PREFIX = b"age-encryption.org/"
MAX_HEADER = 1 << 20  # far above any real header (one hybrid stanza is ~1.6 KiB)
_VCHAR = bytes(range(0x21, 0x7F))  # translate() deletes these: what is left is not VCHAR
_B64CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


@dataclass
class Stanza:
    args: list[str]
    body: bytes

    def encode(self) -> bytes:
        out = [b"-> " + " ".join(self.args).encode("ascii") + b"\n"]
        b64 = b64encode(self.body).encode("ascii")
        for i in range(0, len(b64), 64):
            out.append(b64[i : i + 64] + b"\n")
        if len(b64) % 64 == 0:
            out.append(b"\n")  # the body must end with a line shorter than 64 columns
        return b"".join(out)


@dataclass
class Header:
    stanzas: list[Stanza]
    mac: bytes = b""
    # The exact bytes the MAC covers ("age-encryption.org/v1\n ... ---") and the header's total
    # length on disk, kept from parsing so a MAC check never depends on re-serialization.
    mac_input: bytes = field(default=b"", repr=False)
    length: int = 0

    @staticmethod
    def build(stanzas: list[Stanza], file_key: bytes | bytearray) -> Header:
        mac_input = VERSION_LINE + b"".join(s.encode() for s in stanzas) + b"---"
        mac = header_mac(file_key, mac_input)
        h = Header(stanzas, mac, mac_input)
        h.length = len(h.encode())
        return h

    def encode(self) -> bytes:
        return self.mac_input + b" " + b64encode(self.mac).encode("ascii") + b"\n"

    def verify_mac(self, file_key: bytes | bytearray) -> None:
        h = _hmac(file_key)
        h.update(self.mac_input)
        try:
            h.verify(self.mac)
        except Exception:
            raise HeaderMacError("header MAC does not verify (header modified)") from None


def _hmac(file_key: bytes | bytearray) -> hmac.HMAC:
    """HMAC-SHA256 keyed by the header key derived from the file key; the derived key is wiped
    (the HMAC object holds the only copy, freed and cleared with it)."""
    key = bytearray(32)
    HKDF(hashes.SHA256(), 32, salt=None, info=b"header").derive_into(file_key, key)
    try:
        return hmac.HMAC(key, hashes.SHA256())
    finally:
        key[:] = bytes(32)


def header_mac(file_key: bytes | bytearray, mac_input: bytes) -> bytes:
    h = _hmac(file_key)
    h.update(mac_input)
    return h.finalize()


def _check_arg(a: bytes) -> str:
    if not a or a.translate(None, _VCHAR):  # C speed: a 1,500-byte share checked per open
        raise FormatError("malformed stanza argument in age header")
    return a.decode("ascii")


def parse_header(data: bytes) -> Header:
    """Parse a header from the start of `data`; `data` may hold payload bytes after it.

    Raises TruncatedHeader (a FormatError) when `data` ends before the header does.
    """
    pos = 0

    def line() -> bytes:
        nonlocal pos
        end = data.find(b"\n", pos)
        if end < 0:
            if len(data) >= MAX_HEADER:
                raise FormatError("age header too long")
            raise TruncatedHeader("age header is truncated")
        ln = data[pos:end]
        pos = end + 1
        return ln

    first = line()
    if first + b"\n" != VERSION_LINE:
        if first.startswith(VERSION_PREFIX):
            raise FormatError("unsupported age format version")
        raise FormatError("not an age file (bad version line)")
    stanzas: list[Stanza] = []
    while True:
        start = pos
        ln = line()
        if ln.startswith(b"---"):
            if not stanzas:
                raise FormatError("age header has no recipient stanza")
            if ln[3:4] != b" " or len(ln) != 4 + 43:
                raise FormatError("malformed header MAC line")
            mac = b64decode(ln[4:], "header MAC")
            mac_input = data[: start + 3]
            return Header(stanzas, mac, mac_input, pos)
        if not ln.startswith(b"-> "):
            raise FormatError("malformed age header line")
        args = [_check_arg(a) for a in ln[3:].split(b" ")]
        body_lines: list[bytes] = []
        while True:
            bl = line()
            if len(bl) > 64 or any(c not in _B64CHARS for c in bl):
                raise FormatError("malformed stanza body in age header")
            body_lines.append(bl)
            if len(bl) < 64:
                break
        stanzas.append(Stanza(args, b64decode(b"".join(body_lines), "stanza body")))


class TruncatedHeader(FormatError):
    """The buffer ended inside the header: read more and parse again (or the file is truncated)."""
