"""ASCII-armored age files (age -a): strict PEM, RFC 7468 section 3, label "AGE ENCRYPTED FILE".

Vaults store binary age files; armor matters where a user hands pqfs an age file made
elsewhere (`pqfs import`). Armored files are malleable unless parsed strictly, so, as the age
spec asks, everything but the following is rejected with ArmorError:
  * whitespace before the BEGIN line and after the END line (nothing else around the block);
  * LF or CRLF line endings, and no end of line after the END line;
  * base64 lines of exactly 64 columns, the last one 1 to 64, each canonical base64 with
    padding only at its end, and only on the last line (every line decodes on its own, as
    age's own reader does).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

from pqfs.errors import FormatError
from pqfs.runtime.files import open_regular

BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
END = b"-----END AGE ENCRYPTED FILE-----"
COLUMNS = 64
_SPACE = b" \t\r\n\v\f"
_PEEK = 4096


class ArmorError(FormatError):
    """An ASCII-armored age file that is not strictly canonical."""


def is_armored(head: bytes) -> bool:
    """Whether a file starting with `head` is meant as armor (binary age files start with
    "age-encryption.org/v1")."""
    return head.lstrip(_SPACE).startswith(b"-----BEGIN")


def decode_stream(src: BinaryIO, write: Callable[[bytes], object]) -> int:
    """Decode the armored file `src`, passing the binary age file to `write` line by line;
    returns its size. Raises ArmorError (after some output, which is then not to be used)."""
    line = src.readline(_PEEK)
    while line and not line.strip(_SPACE):  # blank lines before the block
        line = src.readline(_PEEK)
    first = line.lstrip(_SPACE)
    if _content(first) != BEGIN:
        raise ArmorError("not an ASCII-armored age file (no BEGIN AGE ENCRYPTED FILE line)")
    size = 0
    short = False  # a line shorter than COLUMNS was seen: only the END line may follow it
    while True:
        raw = src.readline(COLUMNS + 3)  # longer lines are cut here, and refused below
        if not raw:
            raise ArmorError("armored age file is truncated (no END AGE ENCRYPTED FILE line)")
        line = _content(raw)
        if line == END:
            while tail := src.read(1 << 16):
                if tail.strip(_SPACE):
                    raise ArmorError("data after the END AGE ENCRYPTED FILE line")
            return size
        if short:
            raise ArmorError("armored age file has a short line before its last one")
        if not line or len(line) > COLUMNS:
            raise ArmorError(f"armored age file has a line of {len(line)} columns")
        try:
            data = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise ArmorError("armored age file has a line that is not base64") from None
        if base64.b64encode(data) != line:
            raise ArmorError("armored age file is not canonical base64")
        short = len(line) < COLUMNS or line.endswith(b"=")  # padding ends the data
        write(data)
        size += len(data)


def _content(raw: bytes) -> bytes:
    """A line without its end of line (LF or CRLF; a lone CR is content, and invalid)."""
    if raw.endswith(b"\r\n"):
        return raw[:-2]
    return raw[:-1] if raw.endswith(b"\n") else raw


def decode(data: bytes) -> bytes:
    import io

    out = bytearray()
    decode_stream(io.BytesIO(data), out.extend)
    return bytes(out)


@contextlib.contextmanager
def binary_path(path: str) -> Iterator[str]:
    """`path` itself if it holds a binary age file, else the path of a temporary file holding
    its decoded armor (ciphertext only), removed afterwards."""
    with os.fdopen(open_regular(path), "rb") as f:  # a FIFO must not hang the import
        if not is_armored(f.read(_PEEK)):
            yield path
            return
        f.seek(0)
        fd, tmp = tempfile.mkstemp(prefix=".pqfs-dearmor-", suffix=".age")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    decode_stream(f, out.write)
                except ArmorError as e:
                    raise ArmorError(f"{path}: {e}") from None
            yield tmp
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
