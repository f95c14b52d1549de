"""Tamper detection through the core API (no subprocess).

Every test stores a few small multi-chunk files, damages the on-disk vault in one precise way,
and checks that:

* reading the damaged file raises a PqfsError instead of returning data;
* a read that succeeds anyway (allowed only for chunks the damage did not touch) returns exactly
  the original bytes: no unauthenticated byte is ever released;
* `maintenance.verify()` reports the damaged file, and only it;
* the other files of the same Vault object still read correctly (mount-style expectation);
* a fresh Vault instance (open + unlock) detects the same damage.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pqfs.errors import PayloadError, PqfsError, VaultError
from pqfs.format.agefile import AgeReader, encrypt_stream
from pqfs.format.stream import CHUNK, CT_CHUNK, NONCE_SIZE, TAG, chunk_count
from pqfs.vault.catalog import put_op
from pqfs.vault.maintenance import verify
from pqfs.vault.objects import object_key, open_reader
from pqfs.vault.schema import Entry
from pqfs.vault.vault import Vault
from tests.conftest import PASSPHRASE

SIZE = 4 * CHUNK + 1000  # five chunks: four full ones and a 1000-byte final one
NCHUNKS = chunk_count(SIZE)
LAST = NCHUNKS - 1
LAST_CT = SIZE - LAST * CHUNK + TAG  # ciphertext length of the final chunk


# ----------------------------------------------------------------------------- helpers ----


@dataclass
class Setup:
    vault: Vault
    root: Path
    data: dict[str, bytes] = field(default_factory=dict)

    def entry(self, name: str) -> Entry:
        return self.vault.entry(name)

    def obj(self, name: str) -> Path:
        return self.root / object_key(self.entry(name).object)

    def payload_start(self, name: str) -> int:
        return self.entry(name).hlen + NONCE_SIZE

    def chunk_pos(self, name: str, index: int) -> int:
        """File offset of the ciphertext of chunk `index`."""
        return self.payload_start(name) + index * CT_CHUNK

    def fresh(self) -> Vault:
        v = Vault.open(str(self.root))
        v.unlock(PASSPHRASE)
        return v

    def instances(self) -> Iterator[Vault]:
        """The long-lived Vault (file keys already cached) and a fresh one (keys unwrapped)."""
        yield self.vault
        yield self.fresh()


def flip(path: Path, pos: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        assert len(b) == 1, f"position {pos} is outside {path} ({path.stat().st_size} bytes)"
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def read_range(v: Vault, name: str, offset: int, length: int) -> bytes:
    with open_reader(v, name) as r:
        return r.read(offset, length)


def read_all(v: Vault, name: str) -> bytes:
    with open_reader(v, name) as r:
        return r.read(0, r.size)


def stream_until_error(v: Vault, name: str) -> tuple[bytes, PqfsError | None]:
    """What a streaming consumer (cat, get) would have seen before the error."""
    out = bytearray()
    with contextlib.ExitStack() as stack:
        try:
            r = stack.enter_context(open_reader(v, name))
        except PqfsError as e:
            return b"", e
        try:
            for piece in r.iter_range(0, r.size):
                out += piece
        except PqfsError as e:
            return bytes(out), e
    return bytes(out), None


def probe_ranges(size: int) -> list[tuple[int, int]]:
    """Reads that cover each chunk alone, each chunk boundary, and small pieces."""
    ranges = [(0, 1), (size - 1, 1)]
    for k in range(chunk_count(size)):
        lo = k * CHUNK
        ranges.append((lo, CHUNK))
        ranges.append((lo + 17, 100))
        if k:
            ranges.append((lo - 1, 2))
    return ranges


def chunks_of(offset: int, length: int, size: int) -> set[int]:
    end = min(size, offset + length)
    return set(range(offset // CHUNK, (end - 1) // CHUNK + 1)) if end > offset else set()


def assert_detected(
    s: Setup,
    bad: dict[str, set[int] | None],
    expect: type[PqfsError] = PqfsError,
    chunk: int | None = None,
) -> None:
    """`bad` maps each damaged file to the chunks that must fail (None: every read may fail).

    Checked on the long-lived Vault and on a fresh one."""
    for v in s.instances():
        for name, bad_chunks in bad.items():
            data = s.data[name]
            if v is not s.vault:
                v.key_cache.clear()
            with pytest.raises(expect) as ei:
                got = read_all(v, name)
                # Only reached when nothing was raised: show whether the data even differs.
                pytest.fail(f"{name}: damaged file read without error (same data: {got == data})")
            if chunk is not None:
                assert isinstance(ei.value, PayloadError), repr(ei.value)
                assert ei.value.chunk == chunk, (ei.value.chunk, str(ei.value))
            for off, length in probe_ranges(len(data)):
                try:
                    got = read_range(v, name, off, length)
                except PqfsError:
                    continue
                assert got == data[off : off + length], (
                    f"{name}: read({off}, {length}) released bytes that differ from the original"
                )
                if bad_chunks is not None:
                    assert not chunks_of(off, length, len(data)) & bad_chunks, (
                        f"{name}: read({off}, {length}) covers damaged chunk(s) {bad_chunks} "
                        "but succeeded"
                    )
            prefix, err = stream_until_error(v, name)
            assert err is not None, f"{name}: streaming the damaged file raised nothing"
            assert prefix == data[: len(prefix)], f"{name}: streaming released wrong bytes"
        # verify names exactly the damaged files
        results = {e.path: err for e, err in verify(v)}
        assert set(results) == set(s.data)
        for name in s.data:
            if name in bad:
                assert isinstance(results[name], PqfsError), f"verify missed damage to {name}"
                if chunk is not None:
                    err = results[name]
                    assert isinstance(err, PayloadError) and err.chunk == chunk, repr(err)
            else:
                assert results[name] is None, f"verify blamed untouched {name}: {results[name]}"
        # after the failures, the untouched files still read fine from the same object
        for name in s.data:
            if name not in bad:
                assert read_all(v, name) == s.data[name]


def assert_intact(s: Setup) -> None:
    for v in s.instances():
        for name, data in s.data.items():
            assert read_all(v, name) == data
        assert all(err is None for _, err in verify(v))


@pytest.fixture
def s(vault: Vault, tmp_path: Path) -> Setup:
    root = Path(vault.storage.root)  # type: ignore[attr-defined]
    setup = Setup(vault, root)
    sizes = {"a.bin": SIZE, "b.bin": SIZE, "dir/c.bin": 2 * CHUNK + 7}
    ops = []
    for name, size in sizes.items():
        data = os.urandom(size)
        src = tmp_path / name.replace("/", "_")
        src.write_bytes(data)
        ops.append(put_op(vault.add_file(str(src), name)))
        setup.data[name] = data
    vault.commit(ops)
    # Read everything once: the long-lived Vault now has every file key cached, as a mount would.
    for name, data in setup.data.items():
        assert read_all(vault, name) == data
    return setup


def test_untampered_vault_reads_and_verifies(s: Setup) -> None:
    assert s.entry("a.bin").size == SIZE
    assert s.obj("a.bin").stat().st_size == s.chunk_pos("a.bin", LAST) + LAST_CT
    assert_intact(s)


# ------------------------------------------------------------------------------ header ----


def test_flip_every_header_byte(s: Setup) -> None:
    """Each byte of the header, one at a time, XOR 0x01 and XOR 0xFF: never readable."""
    path = s.obj("a.bin")
    hlen = s.entry("a.bin").hlen
    assert hlen > 1000  # hybrid + X25519 stanzas
    fresh = s.fresh()
    undetected: list[tuple[int, int, str]] = []
    for pos in range(hlen):
        for mask in (0x01, 0xFF):
            flip(path, pos, mask)
            try:
                fresh.key_cache.clear()
                for v in (s.vault, fresh):
                    try:
                        got = read_all(v, "a.bin")
                    except PqfsError:
                        continue
                    undetected.append(
                        (pos, mask, "same data" if got == s.data["a.bin"] else "DIFF")
                    )
                if pos % 97 == 0:  # verify() too, on a sample of positions (it is slower)
                    res = {e.path: err for e, err in verify(s.vault)}
                    if res["a.bin"] is None:
                        undetected.append((pos, mask, "verify"))
            finally:
                flip(path, pos, mask)
    assert not undetected, f"header flips not detected (pos, mask, how): {undetected[:20]}"
    assert_intact(s)


def test_header_flip_full_checks(s: Setup) -> None:
    """A few header positions with the complete set of checks (chunk reads, verify, fresh)."""
    path = s.obj("a.bin")
    raw = path.read_bytes()
    hlen = s.entry("a.bin").hlen
    positions = [0, 5, 21, 25, raw.index(b"-> X25519") + 4, hlen - 44, hlen - 10, hlen - 1]
    for pos in positions:
        flip(path, pos)
        assert_detected(s, {"a.bin": None})
        flip(path, pos)
    assert_intact(s)


# ------------------------------------------------------------------------------ chunks ----


CHUNK_FLIPS = [
    # (chunk, offset inside its ciphertext)
    (0, 0),
    (0, 1),
    (0, CHUNK // 2),
    (0, CHUNK),  # first tag byte
    (0, CT_CHUNK - 1),  # last tag byte
    (2, 0),
    (2, 12345),
    (2, CHUNK - 1),
    (2, CHUNK + 7),  # inside the tag
    (LAST, 0),
    (LAST, 500),
    (LAST, LAST_CT - TAG - 1),  # last plaintext byte
    (LAST, LAST_CT - TAG),  # first tag byte
    (LAST, LAST_CT - 1),  # very last byte of the object
]


@pytest.mark.parametrize(("chunk", "offset"), CHUNK_FLIPS)
@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_flip_payload_byte(s: Setup, chunk: int, offset: int, mask: int) -> None:
    flip(s.obj("a.bin"), s.chunk_pos("a.bin", chunk) + offset, mask)
    assert_detected(s, {"a.bin": {chunk}}, PayloadError, chunk=chunk)


def test_flip_nonce_byte(s: Setup) -> None:
    hlen = s.entry("a.bin").hlen
    for i in (0, NONCE_SIZE // 2, NONCE_SIZE - 1):
        flip(s.obj("a.bin"), hlen + i)
        assert_detected(s, {"a.bin": None}, PayloadError)
        flip(s.obj("a.bin"), hlen + i)
    assert_intact(s)


def test_untouched_chunks_still_readable(s: Setup) -> None:
    """Damage to chunk 2 only: chunks 0, 1, 3, 4 read fine, anything touching 2 fails."""
    flip(s.obj("a.bin"), s.chunk_pos("a.bin", 2) + 100)
    data = s.data["a.bin"]
    for v in s.instances():
        assert read_range(v, "a.bin", 0, 2 * CHUNK) == data[: 2 * CHUNK]
        assert read_range(v, "a.bin", 3 * CHUNK, SIZE) == data[3 * CHUNK :]
        for off, length in [(2 * CHUNK, 1), (2 * CHUNK - 1, 2), (3 * CHUNK - 1, 1), (0, SIZE)]:
            with pytest.raises(PayloadError) as ei:
                read_range(v, "a.bin", off, length)
            assert ei.value.chunk == 2


# ------------------------------------------------------------------------- truncation ----


def _truncation_points(hlen: int) -> list[tuple[str, int]]:
    p = hlen + NONCE_SIZE
    pts = [
        ("empty file", 0),
        ("inside version line", 1),
        ("end of version line", 22),
        ("middle of header", hlen // 2),
        ("before the MAC line end", hlen - 1),
        ("right after the header", hlen),
        ("inside the nonce", hlen + 1),
        ("inside the nonce (last byte missing)", hlen + NONCE_SIZE - 1),
        ("inside chunk 0 (1 byte)", p + 1),
        ("inside chunk 0 (a tag's worth)", p + TAG),
        ("inside chunk 0 (tag missing)", p + CHUNK),
        ("inside chunk 1", p + CT_CHUNK + 1000),
        ("inside chunk 2 (last byte missing)", p + 3 * CT_CHUNK - 1),
        ("inside the last chunk (only a tag)", p + LAST * CT_CHUNK + TAG),
        ("inside the last chunk (short of a tag)", p + LAST * CT_CHUNK + TAG - 1),
        ("last byte missing", p + LAST * CT_CHUNK + LAST_CT - 1),
    ]
    pts += [(f"chunk boundary {k}", p + k * CT_CHUNK) for k in range(NCHUNKS)]
    return pts


def test_truncation(s: Setup) -> None:
    path = s.obj("a.bin")
    raw = path.read_bytes()
    hlen = s.entry("a.bin").hlen
    for label, cut in _truncation_points(hlen):
        assert 0 <= cut < len(raw), label
        path.write_bytes(raw[:cut])
        try:
            assert_detected(s, {"a.bin": None})
        except AssertionError as e:
            raise AssertionError(f"truncation {label} (at {cut}): {e}") from None
        path.write_bytes(raw)
    assert_intact(s)


def test_truncation_at_chunk_boundary_of_exact_multiple(vault: Vault, tmp_path: Path) -> None:
    """A file of exactly 3 full chunks, cut after 2: the new last chunk lacks the final flag."""
    data = os.urandom(3 * CHUNK)
    (tmp_path / "m").write_bytes(data)
    e = vault.add_file(str(tmp_path / "m"), "m")
    vault.commit([put_op(e)])
    path = Path(vault.storage.root) / object_key(e.object)  # type: ignore[attr-defined]
    raw = path.read_bytes()
    p = e.hlen + NONCE_SIZE
    for k in (1, 2):
        path.write_bytes(raw[: p + k * CT_CHUNK])
        with pytest.raises(PayloadError) as ei:
            read_all(vault, "m")
        assert ei.value.chunk == k - 1
    path.write_bytes(raw)
    assert read_all(vault, "m") == data


# ------------------------------------------------------------------ reorder and swap ----


@pytest.mark.parametrize(("i", "j"), [(0, 1), (1, 2), (1, 3), (0, 3)])
def test_swap_two_chunks(s: Setup, i: int, j: int) -> None:
    path = s.obj("a.bin")
    raw = bytearray(path.read_bytes())
    pi, pj = s.chunk_pos("a.bin", i), s.chunk_pos("a.bin", j)
    ci, cj = raw[pi : pi + CT_CHUNK], raw[pj : pj + CT_CHUNK]
    raw[pi : pi + CT_CHUNK], raw[pj : pj + CT_CHUNK] = cj, ci
    path.write_bytes(bytes(raw))
    assert_detected(s, {"a.bin": {i, j}}, PayloadError, chunk=min(i, j))


def test_swap_content_objects_between_entries(s: Setup) -> None:
    a, b = s.obj("a.bin"), s.obj("b.bin")
    tmp = a.with_name("swap.tmp")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)
    assert_detected(s, {"a.bin": None, "b.bin": None}, VaultError)
    # swap back: everything reads again
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)
    assert_intact(s)


def test_swap_payloads_keep_headers(s: Setup) -> None:
    """Headers stay (so they match the catalog), payloads are exchanged: AEAD must catch it."""
    a, b = s.obj("a.bin"), s.obj("b.bin")
    ra, rb = a.read_bytes(), b.read_bytes()
    ha, hb = s.entry("a.bin").hlen, s.entry("b.bin").hlen
    a.write_bytes(ra[:ha] + rb[hb:])
    b.write_bytes(rb[:hb] + ra[ha:])
    assert_detected(s, {"a.bin": None, "b.bin": None}, PayloadError)


def test_object_replaced_by_copy_of_another(s: Setup) -> None:
    s.obj("a.bin").write_bytes(s.obj("b.bin").read_bytes())
    assert_detected(s, {"a.bin": None}, VaultError)


def test_missing_content_object(s: Setup) -> None:
    s.obj("a.bin").unlink()
    assert_detected(s, {"a.bin": None}, VaultError)


# ------------------------------------------------------------------------------ append ----


@pytest.mark.parametrize(
    "what", ["1 byte", "16 bytes", "full chunk", "copy of last chunk", "copy of chunk 0"]
)
def test_append(s: Setup, what: str) -> None:
    path = s.obj("a.bin")
    raw = path.read_bytes()
    p0, plast = s.chunk_pos("a.bin", 0), s.chunk_pos("a.bin", LAST)
    extra = {
        "1 byte": b"\x00",
        "16 bytes": os.urandom(16),
        "full chunk": os.urandom(CT_CHUNK),
        "copy of last chunk": raw[plast:],
        "copy of chunk 0": raw[p0 : p0 + CT_CHUNK],
    }[what]
    path.write_bytes(raw + extra)
    assert_detected(s, {"a.bin": None}, PayloadError)


# ---------------------------------------------------------------- buffer wiping on failure ----


def _filled(n: int) -> bytearray:
    return bytearray(b"\xaa" * n)


def _assert_no_plaintext(buf: bytearray, data: bytes) -> None:
    stray = set(buf) - {0x00, 0xAA}
    assert not stray, "output buffer holds bytes that are neither wiped (0) nor untouched (0xAA)"
    for k in range(chunk_count(len(data))):
        piece = data[k * CHUNK : k * CHUNK + 64]
        assert piece not in buf, f"plaintext of chunk {k} left in the output buffer"


@pytest.mark.parametrize("with_ct_buf", [False, True])
def test_read_chunks_into_wipes_output_on_failure(s: Setup, with_ct_buf: bool) -> None:
    data = s.data["a.bin"]
    with open_reader(s.vault, "a.bin") as reader:  # opened while intact
        assert isinstance(reader, AgeReader)
        flip(s.obj("a.bin"), s.chunk_pos("a.bin", 2) + 4242)
        ct = memoryview(bytearray(NCHUNKS * CT_CHUNK)) if with_ct_buf else None
        # the failing chunk alone
        buf = _filled(NCHUNKS * CHUNK)
        with pytest.raises(PayloadError) as ei:
            reader.read_chunks_into(2, 1, memoryview(buf), ct)
        assert ei.value.chunk == 2
        _assert_no_plaintext(buf, data)
        # good chunks 0 and 1 are decrypted first, then chunk 2 fails: all of it must be wiped
        buf = _filled(NCHUNKS * CHUNK)
        with pytest.raises(PayloadError):
            reader.read_chunks_into(0, NCHUNKS, memoryview(buf), ct)
        _assert_no_plaintext(buf, data)
        assert buf[: 3 * CHUNK] == bytes(3 * CHUNK), "what the failed call wrote was not wiped"
        # good chunks before it in the same call, failing chunk in the middle of the output
        buf = _filled(NCHUNKS * CHUNK)
        with pytest.raises(PayloadError):
            reader.read_chunks_into(1, 3, memoryview(buf), ct)
        _assert_no_plaintext(buf, data)
        # a call that does not touch chunk 2 still works and yields the original
        buf = _filled(NCHUNKS * CHUNK)
        n = reader.read_chunks_into(3, 2, memoryview(buf), ct)
        assert bytes(buf[:n]) == data[3 * CHUNK :]


def test_read_chunks_into_wipes_output_on_failed_final_chunk(s: Setup) -> None:
    data = s.data["a.bin"]
    with open_reader(s.vault, "a.bin") as reader:
        flip(s.obj("a.bin"), s.chunk_pos("a.bin", LAST) + 10)
        buf = _filled(NCHUNKS * CHUNK)
        with pytest.raises(PayloadError) as ei:
            reader.read_chunks_into(LAST - 1, 2, memoryview(buf))
        assert ei.value.chunk == LAST
        _assert_no_plaintext(buf, data)
        assert buf[: CHUNK + 1000] == bytes(CHUNK + 1000)
        # read() goes through the same path and must raise, not return
        with pytest.raises(PayloadError):
            reader.read(LAST * CHUNK, 10)


# ----------------------------------------------------------------------------- catalog ----


SEG = "catalog/{:016d}.{}.age"


@pytest.fixture
def cs(s: Setup, tmp_path: Path) -> Setup:
    """`s` plus two more catalog deltas: snapshot 1, deltas 2 (a, b, c), 3 (d), 4 (e)."""
    for name in ("d.bin", "e.bin"):
        data = os.urandom(1000)
        (tmp_path / name).write_bytes(data)
        s.vault.commit([put_op(s.vault.add_file(str(tmp_path / name), name))])
        s.data[name] = data
    segs = sorted(p.name for p in (s.root / "catalog").iterdir())
    assert segs == [
        SEG.format(1, "snap")[8:],
        SEG.format(2, "delta")[8:],
        SEG.format(3, "delta")[8:],
        SEG.format(4, "delta")[8:],
    ]
    assert_intact(s)
    return s


def assert_catalog_rejected(s: Setup) -> None:
    with pytest.raises(VaultError):
        s.vault.catalog(reload=True)
    fresh = Vault.open(str(s.root))
    fresh.unlock(PASSPHRASE)
    with pytest.raises(VaultError):
        fresh.catalog()
    with pytest.raises(VaultError), open_reader(fresh, "a.bin"):
        pass
    with pytest.raises(VaultError):
        list(verify(fresh))


def _seg(s: Setup, seq: int, kind: str) -> Path:
    return s.root / SEG.format(seq, kind)


def test_catalog_delete_middle_delta(cs: Setup) -> None:
    _seg(cs, 3, "delta").unlink()
    assert_catalog_rejected(cs)


def test_catalog_delete_snapshot(cs: Setup) -> None:
    _seg(cs, 1, "snap").unlink()
    assert_catalog_rejected(cs)


@pytest.mark.parametrize(("seq", "kind"), [(1, "snap"), (3, "delta"), (4, "delta")])
@pytest.mark.parametrize("where", ["version line", "stanza", "mac", "nonce", "payload", "end"])
def test_catalog_flip_byte(cs: Setup, seq: int, kind: str, where: str) -> None:
    path = _seg(cs, seq, kind)
    raw = path.read_bytes()
    hlen = raw.index(b"\n---") + 1 + 4 + 43 + 1
    pos = {
        "version line": 3,
        "stanza": 40,
        "mac": hlen - 5,
        "nonce": hlen + 3,
        "payload": hlen + NONCE_SIZE + 5,
        "end": len(raw) - 1,
    }[where]
    flip(path, pos)
    assert_catalog_rejected(cs)


@pytest.mark.parametrize(("x", "y"), [((2, "delta"), (3, "delta")), ((1, "snap"), (2, "delta"))])
def test_catalog_swap_segments(cs: Setup, x: tuple[int, str], y: tuple[int, str]) -> None:
    px, py = _seg(cs, *x), _seg(cs, *y)
    bx, by = px.read_bytes(), py.read_bytes()
    px.write_bytes(by)
    py.write_bytes(bx)
    assert_catalog_rejected(cs)


def test_catalog_replace_middle_segment_by_copy_of_last(cs: Setup) -> None:
    _seg(cs, 3, "delta").write_bytes(_seg(cs, 4, "delta").read_bytes())
    assert_catalog_rejected(cs)


def test_catalog_replace_middle_segment_by_forged_one(cs: Setup) -> None:
    """Anyone can encrypt to the public recipients, so a well-formed segment 3 (right seq, right
    kind, right `prev`) can be forged; segment 4 then no longer follows it."""
    prev = hashlib.sha256(_seg(cs, 2, "delta").read_bytes()).hexdigest()
    doc = {
        "pqfs_catalog": 1,
        "seq": 3,
        "kind": "delta",
        "prev": prev,
        "ops": [{"op": "del", "path": "a.bin"}],
    }
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(json.dumps(doc).encode()), out.write, cs.vault.recipients)
    _seg(cs, 3, "delta").write_bytes(out.getvalue())
    assert_catalog_rejected(cs)


# ---------------------------------------------------------------------------- identity ----


@pytest.mark.parametrize("where", ["header", "payload"])
def test_identity_file_tamper(s: Setup, where: str) -> None:
    path = s.root / "identity.age"
    raw = path.read_bytes()
    hlen = raw.index(b"\n---") + 1 + 4 + 43 + 1
    flip(path, 30 if where == "header" else hlen + NONCE_SIZE + 10)
    v = Vault.open(str(s.root))
    with pytest.raises(PqfsError):
        v.unlock(PASSPHRASE)
    assert not v.unlocked
