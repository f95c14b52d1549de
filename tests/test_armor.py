"""ASCII armor (pqfs/format/armor.py): round trips, and strictness as properties over random inputs.

The age testkit's armor vectors run in test_vectors.py; these add what a fixed list cannot: no
two different armor texts decode to the same file, except for whitespace around the block and
LF/CRLF line endings (the only freedom the age spec leaves)."""

from __future__ import annotations

import base64
import io
import random

import pytest

from pqfs.format import armor
from pqfs.format.armor import ArmorError

B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def encode(data: bytes, eol: bytes = b"\n") -> bytes:
    """What `age -a` writes (test-side encoder: pqfs itself only reads armor)."""
    b64 = base64.b64encode(data)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return armor.BEGIN + eol + b"".join(line + eol for line in lines) + armor.END + eol


SIZES = [0, 1, 2, 3, 47, 48, 49, 95, 96, 97, 1000, 4096]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_round_trip(size: int, eol: bytes) -> None:
    data = random.Random(size).randbytes(size)
    text = encode(data, eol)
    assert armor.is_armored(text)
    assert armor.decode(text) == data
    assert armor.decode(b" \r\n\t\n" + text + b"\n \t\r\n") == data  # whitespace outside
    assert armor.decode(text.rstrip(b"\r\n")) == data  # no end of line after END


def test_streamed_decode_reports_the_size() -> None:
    data = random.Random(1).randbytes(5000)
    out = bytearray()
    assert armor.decode_stream(io.BytesIO(encode(data)), out.extend) == len(data)
    assert out == data


def _body_positions(text: bytes) -> list[int]:
    """Offsets of the base64 characters (not line ends, not the BEGIN/END lines)."""
    start = len(armor.BEGIN) + 1
    stop = text.rindex(armor.END)
    return [i for i in range(start, stop) if text[i : i + 1] not in (b"\n", b"\r")]


@pytest.mark.parametrize("size", [1, 2, 3, 48, 100, 200])
def test_no_other_text_decodes_to_the_same_file(size: int) -> None:
    """Every one-character substitution inside the block is refused or changes the output."""
    rng = random.Random(size)
    data = rng.randbytes(size)
    text = encode(data)
    for pos in _body_positions(text):
        for c in rng.sample(B64, 12):
            if c == text[pos]:
                continue
            mutated = text[:pos] + bytes([c]) + text[pos + 1 :]
            try:
                got = armor.decode(mutated)
            except ArmorError:
                continue
            assert got != data, f"{mutated!r} decodes to the same file"


@pytest.mark.parametrize("size", [0, 5, 48, 150])
def test_anything_inserted_inside_the_block_is_refused(size: int) -> None:
    """Whitespace, padding, dashes, NUL: anywhere from the BEGIN line to the END line."""
    rng = random.Random(100 + size)
    text = encode(rng.randbytes(size))
    inside = range(len(armor.BEGIN), text.rindex(armor.END) + len(armor.END))
    for pos in rng.sample(inside, min(40, len(inside))):
        for junk in (b" ", b"\t", b"\n", b"\r", b"=", b"-", b"\x00"):
            if junk == b"\r" and text[pos : pos + 1] == b"\n":
                continue  # LF -> CRLF: line endings may be either, line by line
            mutated = text[:pos] + junk + text[pos:]
            with pytest.raises(ArmorError):
                armor.decode(mutated)


def test_padding_ends_the_data() -> None:
    """A full 64-column line may end in padding only as the last line: otherwise the same
    bytes could be spelled as padded pieces, one more way to write the same file."""
    first = base64.b64encode(bytes(47))  # 64 columns, ending in "="
    assert len(first) == 64 and first.endswith(b"=")
    text = armor.BEGIN + b"\n" + first + b"\n" + base64.b64encode(b"more") + b"\n" + armor.END
    with pytest.raises(ArmorError):
        armor.decode(text)
    assert armor.decode(armor.BEGIN + b"\n" + first + b"\n" + armor.END) == bytes(47)


def test_overlong_lines_and_tails_are_read_in_bounded_pieces() -> None:
    with pytest.raises(ArmorError, match="columns"):
        armor.decode(armor.BEGIN + b"\n" + b"A" * 10_000_000 + b"\n" + armor.END)
    tail = encode(b"x") + b" " * 300_000 + b"!"
    with pytest.raises(ArmorError, match="after the END"):
        armor.decode(tail)
    assert armor.decode(encode(b"x") + b" \n" * 200_000) == b"x"


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"age-encryption.org/v1\n",
        b"garbage\n" + encode(b"x"),
        encode(b"x") + b"garbage\n",
        encode(b"x").replace(armor.END, b""),
        encode(b"x").replace(b"AGE ENCRYPTED FILE", b"age encrypted file"),
        armor.BEGIN,
    ],
    ids=["empty", "binary", "leading", "trailing", "no-end", "lowercase", "begin-only"],
)
def test_malformed_armor_gets_an_armor_error(text: bytes) -> None:
    with pytest.raises(ArmorError):
        armor.decode(text)
