"""Property tests (hypothesis) for the encodings, the age header and the STREAM payload.

* encoding: canonical unpadded base64 and Bech32 round trips, and the rejection of everything
  else (padding, set trailing bits, stray characters, a changed character, mixed case);
* header: Header.build -> encode -> parse_header is the identity, parse_header over any bytes
  raises nothing but FormatError (and accepts only canonical headers), any changed byte of a
  valid header is a FormatError or a MAC failure;
* stream / agefile: encrypt_stream to X25519 and hybrid recipients, then decrypt_stream,
  AgeReader.read and AgeReader.iter_range give the plaintext (or any slice of it) back, for sizes
  around the chunk and batch boundaries; a changed, truncated or extended file is refused, and
  the sequential reader only ever releases an authenticated prefix.
"""

from __future__ import annotations

import base64
import io
import os
import random
import string
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pqfs.errors import FormatError, HeaderMacError, PayloadError, PqfsError
from pqfs.format import agefile, kem, keys
from pqfs.format.encoding import b64decode, b64encode, bech32_decode, bech32_encode
from pqfs.format.header import VERSION_LINE, Header, Stanza, TruncatedHeader, parse_header
from pqfs.format.stream import CHUNK, CT_CHUNK, NONCE_SIZE, ciphertext_size
from pqfs.runtime import pools
from tests.conftest import examples

B64_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
VCHARS = "".join(chr(c) for c in range(0x21, 0x7F))
# Bech32 human-readable parts: printable ASCII, kept lower case (the encoder lower-cases it).
HRP_CHARS = "".join(c for c in VCHARS if not c.isupper())

FAST = settings(max_examples=examples(150), deadline=None)
SLOW = settings(
    max_examples=examples(100),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------- base64 ----


@FAST
@given(st.binary(max_size=200))
def test_b64_round_trip(data: bytes) -> None:
    text = b64encode(data)
    assert "=" not in text
    assert len(text) == -(-len(data) * 4 // 3)
    assert b64decode(text) == data
    assert b64decode(text.encode("ascii")) == data


@FAST
@given(st.binary(min_size=1, max_size=100).filter(lambda d: len(d) % 3), st.data())
def test_b64_rejects_set_trailing_bits(data: bytes, draw: st.DataObject) -> None:
    text = b64encode(data)
    unused = 4 if len(data) % 3 == 1 else 2  # low bits of the last character that are zero
    last = B64_ALPHABET.index(text[-1])
    assert last % (1 << unused) == 0
    bits = draw.draw(st.integers(1, (1 << unused) - 1))
    bad = text[:-1] + B64_ALPHABET[last | bits]
    assert base64.b64decode(bad + "=" * (-len(bad) % 4)) == data  # a lax decoder accepts it
    with pytest.raises(FormatError):
        b64decode(bad)


@FAST
@given(st.binary(max_size=100), st.integers(1, 3))
def test_b64_rejects_padding(data: bytes, pad: int) -> None:
    with pytest.raises(FormatError):
        b64decode(b64encode(data) + "=" * pad)
    if len(data) % 3:
        with pytest.raises(FormatError):
            b64decode(base64.b64encode(data))  # standard, padded base64


@FAST
@given(st.binary(max_size=100), st.data())
def test_b64_rejects_stray_characters(data: bytes, draw: st.DataObject) -> None:
    text = b64encode(data)
    pos = draw.draw(st.integers(0, len(text)))
    ch = draw.draw(st.sampled_from(list("=-_ \t\n\r.,!\x00é\u00a0")))
    with pytest.raises(FormatError):
        b64decode(text[:pos] + ch + text[pos:])


@FAST
@given(st.text(alphabet=B64_ALPHABET, max_size=80).filter(lambda t: len(t) % 4 == 1))
def test_b64_rejects_impossible_length(text: str) -> None:
    with pytest.raises(FormatError):
        b64decode(text)


@FAST
@given(st.one_of(st.text(max_size=40), st.text(alphabet=B64_ALPHABET + "=", max_size=40)))
def test_b64_decode_any_text(text: str) -> None:
    """Only FormatError, and whatever is accepted is the canonical encoding of its value."""
    try:
        data = b64decode(text)
    except FormatError:
        return
    assert b64encode(data) == text


# ---------------------------------------------------------------------------- Bech32 ----

hrps = st.text(alphabet=HRP_CHARS, min_size=1, max_size=10)
# Short enough (<= 90 characters in all) that Bech32 guarantees detecting any changed character.
bech32_data = st.binary(max_size=40)


@FAST
@given(hrps, bech32_data)
def test_bech32_round_trip(hrp: str, data: bytes) -> None:
    lower = bech32_encode(hrp, data)
    upper = bech32_encode(hrp, data, upper=True)
    assert lower == lower.lower() and upper == lower.upper()
    assert lower.startswith(hrp + "1")
    assert bech32_decode(lower) == (hrp, data)
    assert bech32_decode(upper) == (hrp, data)
    # The encoder lower-cases the HRP: an upper-case HRP gives the same string.
    assert bech32_encode(hrp.upper(), data) == lower


@FAST
@given(hrps, bech32_data, st.data())
def test_bech32_changed_character_breaks_checksum(
    hrp: str, data: bytes, draw: st.DataObject
) -> None:
    text = bech32_encode(hrp, data)
    sep = len(hrp)
    assert text[sep] == "1"
    pos = draw.draw(st.integers(0, len(text) - 1).filter(lambda i: i != sep))
    pool = BECH32_CHARSET if pos > sep else HRP_CHARS
    ch = draw.draw(st.sampled_from([c for c in pool if c != text[pos]]))
    bad = text[:pos] + ch + text[pos + 1 :]
    with pytest.raises(FormatError):
        bech32_decode(bad)
    with pytest.raises(FormatError):
        bech32_decode(bad.upper())


@FAST
@given(hrps, bech32_data, st.data())
def test_bech32_rejects_mixed_case(hrp: str, data: bytes, draw: st.DataObject) -> None:
    text = bech32_encode(hrp, data)
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    assume(len(letters) >= 2)
    i = draw.draw(st.sampled_from(letters))
    with pytest.raises(FormatError):
        bech32_decode(text[:i] + text[i].upper() + text[i + 1 :])


@FAST
@given(st.one_of(st.text(max_size=60), st.text(alphabet=BECH32_CHARSET + "1aAgGeE-", max_size=60)))
def test_bech32_decode_any_text(text: str) -> None:
    try:
        hrp, data = bech32_decode(text)
    except FormatError:
        return
    assert bech32_encode(hrp, data) == text.lower()


# ---------------------------------------------------------------------------- header ----

args = st.lists(st.text(alphabet=VCHARS, min_size=1, max_size=16), min_size=1, max_size=4)
bodies = st.one_of(
    st.binary(max_size=160),
    # Around the 64-column body lines: 48 bytes are exactly one full line (then an empty one).
    st.sampled_from([0, 1, 2, 3, 47, 48, 49, 95, 96, 97]).flatmap(
        lambda n: st.binary(min_size=n, max_size=n)
    ),
)
stanzas = st.lists(st.builds(Stanza, args, bodies), min_size=1, max_size=4)
file_keys = st.binary(min_size=16, max_size=16)


@FAST
@given(stanzas, file_keys, st.binary(max_size=64))
def test_header_round_trip(stz: list[Stanza], key: bytes, payload: bytes) -> None:
    h = Header.build(stz, key)
    enc = h.encode()
    assert h.length == len(enc)
    assert enc.startswith(VERSION_LINE) and enc.endswith(b"\n")
    parsed = parse_header(enc + payload)
    assert parsed.stanzas == stz
    assert parsed.mac == h.mac and len(parsed.mac) == 32
    assert parsed.length == len(enc)
    assert parsed.mac_input == h.mac_input
    assert parsed.encode() == enc
    parsed.verify_mac(key)
    other = bytes([key[0] ^ 1]) + key[1:]
    with pytest.raises(HeaderMacError):
        parsed.verify_mac(other)


@FAST
@given(stanzas, file_keys, st.data())
def test_header_prefix_is_truncated(stz: list[Stanza], key: bytes, draw: st.DataObject) -> None:
    enc = Header.build(stz, key).encode()
    cut = draw.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(TruncatedHeader):
        parse_header(enc[:cut])


def check_parse(data: bytes) -> None:
    """parse_header raises only FormatError; a header it accepts is canonical: exactly the bytes
    pqfs itself would write for those stanzas and that MAC."""
    try:
        h = parse_header(data)
    except FormatError:
        return
    assert 0 < h.length <= len(data)
    assert h.stanzas
    assert h.mac_input == VERSION_LINE + b"".join(s.encode() for s in h.stanzas) + b"---"
    assert h.encode() == data[: h.length]


fragments = st.sampled_from(
    [
        b"age-encryption.org/v1\n",
        b"age-encryption.org/v2\n",
        b"-> ",
        b"->",
        b"X25519 ",
        b"scrypt",
        b" ",
        b"\n",
        b"\r\n",
        b"---",
        b"--- ",
        b"=",
        b"\x00",
        b"\xff",
        b"A" * 43,
        b"B" * 64,
        b"AAAA",
        b"AB",
    ]
)


@settings(max_examples=examples(300), deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=200).map(lambda b: VERSION_LINE + b),
        st.binary(max_size=200).map(lambda b: VERSION_LINE + b"-> " + b),
        st.lists(fragments, max_size=30).map(b"".join),
        st.lists(fragments, max_size=30).map(lambda f: VERSION_LINE + b"".join(f)),
    )
)
def test_parse_header_arbitrary_bytes(data: bytes) -> None:
    check_parse(data)


@settings(max_examples=examples(300), deadline=None)
@given(stanzas, file_keys, st.binary(max_size=16), st.data())
def test_header_mutation_is_detected(
    stz: list[Stanza], key: bytes, payload: bytes, draw: st.DataObject
) -> None:
    enc = Header.build(stz, key).encode()
    pos = draw.draw(st.integers(0, len(enc) - 1))
    value = draw.draw(
        st.one_of(
            st.integers(0, 255),
            st.sampled_from(b"\n -=+/Aa0"),
            st.integers(0, 7).map(lambda bit: enc[pos] ^ (1 << bit)),
        )
    )
    assume(value != enc[pos])  # a no-op mutation
    bad = enc[:pos] + bytes([value]) + enc[pos + 1 :] + payload
    check_parse(bad)
    try:
        h = parse_header(bad)
    except FormatError:
        return
    with pytest.raises(HeaderMacError):
        h.verify_mac(key)


def test_header_without_stanza_is_refused() -> None:
    with pytest.raises(FormatError):
        parse_header(Header.build([], bytes(16)).encode())


# ------------------------------------------------------------ stream and agefile ----

X25519_ID = keys.X25519Identity.generate()
HYBRID_SEED = os.urandom(32)
BACKENDS = kem.available_backends()

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK, 3 * CHUNK + 1]
sizes = st.one_of(st.sampled_from(SIZES), st.integers(0, 300_000))
# pools.BATCH chunks per job: small batches put job boundaries inside these small files.
batches = st.sampled_from([1, 2, 3, pools.BATCH])


def plaintext(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def identities_for(kind: str, backend: str) -> list[keys.Identity]:
    hybrid = keys.HybridIdentity(HYBRID_SEED, backend=backend)
    return {"x25519": [X25519_ID], "hybrid": [hybrid], "both": [hybrid]}[kind]


def recipients_for(kind: str, backend: str) -> list[keys.Recipient]:
    hybrid = keys.HybridIdentity(HYBRID_SEED, backend=backend).recipient()
    x = X25519_ID.recipient()
    return {"x25519": [x], "hybrid": [hybrid], "both": [x, hybrid]}[kind]


def encrypt(pt: bytes, recipients: list[keys.Recipient], batch: int) -> tuple[Header, bytes]:
    out = io.BytesIO()  # copies each write: encrypt_stream reuses its buffers
    with mock.patch.object(pools, "BATCH", batch):
        header, total = agefile.encrypt_stream(io.BytesIO(pt), out.write, recipients)
    assert total == len(pt)
    return header, out.getvalue()


def sequential(data: bytes, identities: list[keys.Identity]) -> tuple[bytes, PqfsError | None]:
    """decrypt_stream's released bytes, and its error if any (non-pqfs errors propagate)."""
    out: list[bytes] = []
    try:
        n = agefile.decrypt_stream(io.BytesIO(data), identities, out.append)
    except PqfsError as e:
        return b"".join(out), e
    assert n == sum(map(len, out))
    return b"".join(out), None


def joined(reader: agefile.AgeReader, offset: int, length: int) -> bytes:
    return b"".join(bytes(v) for v in reader.iter_range(offset, length))


def boundary_offsets(size: int) -> st.SearchStrategy[int]:
    near = {0, 1, size - 1, size, size + 1}
    for k in range(1, size // CHUNK + 2):
        near |= {k * CHUNK - 1, k * CHUNK, k * CHUNK + 1}
    return st.one_of(
        st.sampled_from(sorted(x for x in near if x >= 0)), st.integers(0, size + CHUNK)
    )


lengths = st.one_of(
    st.sampled_from([0, 1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, 10**9]),
    st.integers(0, 200_000),
)


@SLOW
@given(
    sizes,
    st.integers(0, 2**32),
    st.sampled_from(["x25519", "hybrid", "both"]),
    st.sampled_from(BACKENDS),
    st.sampled_from(BACKENDS),
    batches,
    st.data(),
)
def test_encrypt_decrypt_round_trip(
    size: int,
    seed: int,
    kind: str,
    sealer: str,
    opener: str,
    batch: int,
    draw: st.DataObject,
) -> None:
    pt = plaintext(size, seed)
    header, data = encrypt(pt, recipients_for(kind, sealer), batch)
    assert len(data) == header.length + NONCE_SIZE + ciphertext_size(size)
    idents = identities_for(kind, opener)
    if kind == "both":
        idents = [X25519_ID] if draw.draw(st.booleans()) else idents

    released, err = sequential(data, idents)
    assert err is None
    assert released == pt

    with mock.patch.object(pools, "BATCH", batch):
        reader = agefile.AgeReader(agefile.BytesSource(data), identities=idents)
        assert reader.size == size
        assert reader.read(0, size) == pt
        assert joined(reader, 0, size) == pt
        for _ in range(draw.draw(st.integers(1, 6))):
            offset = draw.draw(boundary_offsets(size))
            length = draw.draw(lengths)
            want = pt[offset : offset + length]
            assert reader.read(offset, length) == want, (offset, length)
            assert joined(reader, offset, length) == want, (offset, length)
        with pytest.raises(ValueError):
            reader.read(-1, 1)


@SLOW
@given(sizes, st.integers(0, 2**32), st.sampled_from(["x25519", "hybrid", "both"]), st.data())
def test_changed_byte_is_refused(size: int, seed: int, kind: str, draw: st.DataObject) -> None:
    backend = draw.draw(st.sampled_from(BACKENDS))
    pt = plaintext(size, seed)
    header, data = encrypt(pt, recipients_for(kind, backend), pools.BATCH)
    idents = identities_for(kind, backend)
    payload_start = header.length + NONCE_SIZE
    pos = draw.draw(
        st.one_of(
            st.integers(0, len(data) - 1),
            st.integers(payload_start, len(data) - 1),
            st.integers(max(0, len(data) - 20), len(data) - 1),
        )
    )
    bit = draw.draw(st.integers(0, 7))
    bad = data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]

    # Sequential reader: an error, after releasing only whole authenticated chunks before it.
    released, err = sequential(bad, idents)
    assert isinstance(err, PqfsError)
    assert released == pt[: len(released)]
    assert len(released) % CHUNK == 0 and (len(released) < size or size == 0)
    if pos < payload_start:
        assert released == b""  # a header or nonce error releases nothing
    else:
        assert isinstance(err, PayloadError)
        assert len(released) == (pos - payload_start) // CT_CHUNK * CHUNK

    # Random-access reader: refuses on open (header, nonce, final chunk), or the chunk at fault.
    try:
        reader = agefile.AgeReader(agefile.BytesSource(bad), identities=idents)
    except PqfsError:
        return
    assert pos >= payload_start
    bad_chunk = (pos - payload_start) // CT_CHUNK
    assert bad_chunk < reader.chunks - 1
    with pytest.raises(PayloadError) as excinfo:
        reader.read(bad_chunk * CHUNK, 1)
    assert excinfo.value.chunk == bad_chunk
    with pytest.raises(PayloadError):
        joined(reader, 0, size)
    for chunk in {0, bad_chunk - 1, bad_chunk + 1, reader.chunks - 1} - {bad_chunk}:
        if 0 <= chunk < reader.chunks:
            assert reader.read(chunk * CHUNK, CHUNK) == pt[chunk * CHUNK : (chunk + 1) * CHUNK]


@SLOW
@given(sizes, st.integers(0, 2**32), st.data())
def test_truncated_or_extended_file_is_refused(size: int, seed: int, draw: st.DataObject) -> None:
    pt = plaintext(size, seed)
    header, data = encrypt(pt, [X25519_ID.recipient()], pools.BATCH)
    if draw.draw(st.booleans()):
        cut = draw.draw(
            st.one_of(
                st.integers(0, len(data) - 1),
                st.sampled_from(
                    [header.length, header.length + NONCE_SIZE]
                    + [header.length + NONCE_SIZE + k * CT_CHUNK for k in range(1, 6)]
                ).filter(lambda n: n < len(data)),
            )
        )
        bad = data[:cut]
    else:
        bad = data + draw.draw(st.binary(min_size=1, max_size=40))
    released, err = sequential(bad, [X25519_ID])
    assert isinstance(err, PqfsError)
    assert released == pt[: len(released)]
    assert len(released) % CHUNK == 0 or released == pt  # trailing data: all of pt, then error
    with pytest.raises(PqfsError):
        reader = agefile.AgeReader(agefile.BytesSource(bad), identities=[X25519_ID])
        reader.read(0, reader.size)
