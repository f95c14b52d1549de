"""Known-answer tests against vectors written by others (copied unchanged into tests/vectors/):

* the C2SP age testkit (every file, once per KEM backend, through the sequential reader
  `decrypt_stream` and the random-access `AgeReader`);
* the X-Wing (MLKEM768-X25519) draft vectors, for every KEM backend, plus seal/open across
  every pair of backends (the composed HPKE must equal pyca's native suite bit for bit);
* Wycheproof: ChaCha20-Poly1305, X25519, HKDF-SHA256 and ML-KEM-768 (keygen from seed,
  encapsulation, decapsulation, semi-expanded decapsulation) through every ML-KEM backend.

A missing vector folder is a failure, never a skip: the parametrizations below then hold one
"MISSING" case that fails with the path it looked for.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from pqfs.errors import FormatError, HeaderMacError, NoIdentityMatch, PayloadError, PqfsError
from pqfs.format import agefile, armor, kem, keys, stream
from pqfs.format.encoding import b64encode, bech32_encode
from pqfs.format.header import Stanza

VECTORS = Path(__file__).resolve().parent / "vectors"  # sources and licenses: its README.md
AGE_TESTKIT = VECTORS / "age-testkit"
XWING_FILE = VECTORS / "xwing" / "test-vectors.json"
WYCHEPROOF = VECTORS / "wycheproof"

LIBOQS_REASON = "liboqs-python / liboqs not installed"

# Every KEM backend of this machine ("cryptography" = pyca's native HPKE suite, then the composed
# HPKE over each ML-KEM backend). "liboqs" only appears when it is installed.
BACKENDS = kem.available_backends()
# The ML-KEM-768 backends proper (kem.mlkem_backend names): everything but the native suite.
MLKEM_BACKENDS = [b for b in BACKENDS if b != "cryptography"]

ZERO32 = bytes(32)


class Missing:
    """Stands in for the cases of a vector file that is not there, so that the test fails."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"Missing({self.path})"


def need(case: Any) -> Any:
    if isinstance(case, Missing):
        pytest.fail(f"test vectors not found: {case.path} (expected in tests/vectors/)")
    return case


def missing_param(path: Path) -> Any:
    return pytest.param(Missing(path), id="MISSING")


# ------------------------------------------------------------------------ age testkit ----


@dataclass
class AgeVector:
    name: str
    fields: dict[str, list[str]]
    body: bytes

    def one(self, key: str) -> str | None:
        values = self.fields.get(key)
        return values[0] if values else None

    @property
    def expect(self) -> str:
        value = self.one("expect")
        assert value is not None, f"{self.name}: no expect line"
        return value

    @property
    def armored(self) -> bool:
        return self.one("armored") == "yes"


def age_vector_names() -> list[Any]:
    if not AGE_TESTKIT.is_dir():
        return [missing_param(AGE_TESTKIT)]
    names = sorted(p.name for p in AGE_TESTKIT.iterdir() if p.is_file())
    return [pytest.param(n, id=n) for n in names] or [missing_param(AGE_TESTKIT)]


@functools.lru_cache(maxsize=8)
def load_age_vector(name: str) -> AgeVector:
    raw = (AGE_TESTKIT / name).read_bytes()
    head, sep, body = raw.partition(b"\n\n")
    assert sep, f"{name}: no blank line after the header"
    fields: dict[str, list[str]] = {}
    for line in head.decode("utf-8").split("\n"):
        key, colon, value = line.partition(": ")
        assert colon, f"{name}: malformed header line {line!r}"
        fields.setdefault(key, []).append(value)
    compressed = fields.get("compressed", [None])[0]
    if compressed == "zlib":
        body = zlib.decompress(body)
    else:
        assert compressed is None, f"{name}: unknown compression {compressed!r}"
    return AgeVector(name, fields, body)


def age_identities(vec: AgeVector, backend: str) -> list[keys.Identity]:
    """Identities as a user would give them: parse_identity picks the backend from
    PQFS_KEM_BACKEND (set by the caller); checked here so the backend parameter really counts."""
    out: list[keys.Identity] = []
    for text in vec.fields.get("identity", []):
        ident = keys.parse_identity(text)
        if isinstance(ident, keys.HybridIdentity):
            assert ident.recipient().backend == backend
        out.append(ident)
    out += [keys.ScryptIdentity(p.encode()) for p in vec.fields.get("passphrase", [])]
    return out


def category(exc: PqfsError) -> str:
    """The testkit's name (`expect`) for a pqfs error."""
    if isinstance(exc, armor.ArmorError):
        return "armor failure"
    if isinstance(exc, NoIdentityMatch):
        return "no match"
    if isinstance(exc, HeaderMacError):
        return "HMAC failure"
    if isinstance(exc, PayloadError):
        return "payload failure"
    if isinstance(exc, FormatError):
        return "header failure"
    return f"other pqfs error ({type(exc).__name__})"


def classify(action: Callable[[], object]) -> str:
    """Run `action`; name its outcome the way the testkit's `expect` does. Any exception that is
    not a pqfs error propagates (and fails the test)."""
    try:
        action()
    except PqfsError as e:
        return category(e)
    return "success"


@pytest.mark.parametrize("name", age_vector_names())
@pytest.mark.parametrize("backend", BACKENDS)
def test_age_testkit(name: Any, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    vec = load_age_vector(need(name))
    monkeypatch.setenv("PQFS_KEM_BACKEND", backend)
    identities = age_identities(vec, backend)
    body = vec.body
    if vec.armored:
        decoded: list[bytes] = []
        outcome = classify(lambda: decoded.append(armor.decode(vec.body)))
        if outcome != "success":
            assert outcome == vec.expect, vec.one("comment")
            return
        body = decoded[0]
        assert armor.is_armored(vec.body)
    else:
        assert not armor.is_armored(vec.body)

    # Sequential reader: age's own semantics, the authenticated prefix is released.
    out: list[bytes] = []
    sizes: list[int] = []
    outcome = classify(
        lambda: sizes.append(agefile.decrypt_stream(io.BytesIO(body), identities, out.append))
    )
    released = b"".join(out)
    assert outcome == vec.expect, vec.one("comment")
    payload = vec.one("payload")
    if payload is not None:
        assert hashlib.sha256(released).hexdigest() == payload
    elif vec.expect != "success":
        assert released == b""

    # Random-access reader: stricter, it authenticates the final chunk before releasing anything.
    if vec.expect == "success":
        assert sizes == [len(released)]
        reader = agefile.AgeReader(agefile.BytesSource(body), identities=identities)
        assert reader.size == len(released)
        assert reader.read(0, reader.size) == released
        assert reader.read(0, reader.size + 1) == released
        assert b"".join(bytes(v) for v in reader.iter_range(0, reader.size)) == released
    else:
        with pytest.raises(PqfsError) as excinfo:
            reader = agefile.AgeReader(agefile.BytesSource(body), identities=identities)
            reader.read(0, reader.size)
        got = category(excinfo.value)
        if vec.expect == "payload failure":
            assert got in ("payload failure", "header failure")
        else:  # the header stage is shared with decrypt_stream: the same verdict
            assert got == vec.expect


def test_vector_folders_are_complete() -> None:
    assert AGE_TESTKIT.is_dir(), f"missing {AGE_TESTKIT}"
    names = [p.name for p in AGE_TESTKIT.iterdir() if p.is_file()]
    assert len(names) == 143
    heads = [(AGE_TESTKIT / n).read_bytes().partition(b"\n\n")[0] for n in names]
    hybrid = [h for h in heads if b"identity: AGE-SECRET-KEY-PQ-1" in h]
    assert len(hybrid) >= 15  # the backend parametrization has something to bite on
    assert XWING_FILE.is_file(), f"missing {XWING_FILE}"
    for name in WYCHEPROOF_FILES:
        assert (WYCHEPROOF / name).is_file(), f"missing {WYCHEPROOF / name}"


# ------------------------------------------------------------------------------ X-Wing ----


def xwing_cases() -> list[Any]:
    if not XWING_FILE.is_file():
        return [missing_param(XWING_FILE)]
    vectors = json.loads(XWING_FILE.read_text())
    return [
        pytest.param({k: bytes.fromhex(v) for k, v in vec.items()}, id=f"xwing{i}")
        for i, vec in enumerate(vectors)
    ]


XWING_CASES = xwing_cases()


@pytest.mark.parametrize("vec", XWING_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_xwing_public_key(vec: Any, backend: str) -> None:
    v = need(vec)
    assert v["sk"] == v["seed"] and len(v["seed"]) == 32
    assert len(v["pk"]) == kem.PK_SIZE and len(v["ct"]) == kem.ENC_SIZE
    assert kem.HybridKey(v["seed"], backend).public_bytes == v["pk"]
    ident = keys.HybridIdentity(v["seed"], backend=backend)
    rcpt = ident.recipient()
    assert rcpt.public_bytes == v["pk"]
    assert rcpt.backend == backend
    # The text forms round-trip to the same key.
    assert keys.parse_recipient(rcpt.encode()).public_bytes == v["pk"]  # type: ignore[attr-defined]
    assert keys.parse_identity(ident.encode()).recipient().public_bytes == v["pk"]


@pytest.mark.parametrize("vec", XWING_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_xwing_decapsulation(vec: Any, backend: str) -> None:
    v = need(vec)
    seed, pk, ct, ss = v["seed"], v["pk"], v["ct"], v["ss"]
    ct_m, ct_x = ct[: kem.MLKEM_CT], ct[kem.MLKEM_CT :]
    pk_m, pk_x = pk[: kem.MLKEM_PK], pk[kem.MLKEM_PK :]
    expanded = bytes(kem.expand_seed(seed))
    assert len(expanded) == 96

    # The ML-KEM half through the backend (the native suite is built on pyca's ML-KEM key).
    if backend == "cryptography":
        dk = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
        ek = dk.public_key().public_bytes_raw()
        ss_m = dk.decapsulate(ct_m)
    else:
        be = kem.mlkem_backend(backend)
        handle, ek = be.keypair_from_seed(expanded[:64])
        ss_m = be.decapsulate(handle, ct_m)
    assert ek == pk_m
    # The X25519 half.
    sk_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    assert sk_x.public_key().public_bytes_raw() == pk_x
    ss_x = sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    assert kem._xwing_combine(ss_m, ss_x, ct_x, pk_x) == ss

    # End to end through HybridKey.open with the vector's ct as the HPKE enc: it only opens if
    # the backend's whole decapsulation (native or composed) yields exactly the vector's ss.
    info = b"age-encryption.org/mlkem768x25519"
    aead, nonce = kem._hpke_base_aead(ss, info)
    sealed = aead.encrypt(nonce, b"sixteen byte key", b"")
    key = kem.HybridKey(seed, backend)
    assert key.open(ct, sealed, info) == b"sixteen byte key"
    with pytest.raises(kem.UnwrapFailed):
        key.open(ct, sealed, info + b"!")


@pytest.mark.parametrize("vec", XWING_CASES)
@pytest.mark.parametrize(("sealer", "opener"), list(itertools.product(BACKENDS, BACKENDS)))
def test_xwing_seal_open_across_backends(vec: Any, sealer: str, opener: str) -> None:
    v = need(vec)
    msg = b"file key 16 byte"
    info = keys.HYBRID_INFO
    sealed = kem.seal(v["pk"], msg, info, backend=sealer)
    assert len(sealed) == kem.ENC_SIZE + len(msg) + 16
    key = kem.HybridKey(v["seed"], backend=opener)
    assert key.open(sealed[: kem.ENC_SIZE], sealed[kem.ENC_SIZE :], info) == msg
    # Through the age layer too: a stanza wrapped with one backend unwraps with the other.
    stanza = keys.HybridRecipient(v["pk"], backend=sealer).wrap(msg)
    assert keys.HybridIdentity(v["seed"], backend=opener).unwrap_stanza(stanza) == msg


# -------------------------------------------------------------------------- Wycheproof ----

WYCHEPROOF_FILES = [
    "chacha20_poly1305_test.json",
    "x25519_test.json",
    "hkdf_sha256_test.json",
    "mlkem_768_keygen_seed_test.json",
    "mlkem_768_encaps_test.json",
    "mlkem_768_semi_expanded_decaps_test.json",
    "mlkem_768_test.json",
    "mldsa_65_sign_seed_test.json",  # these three: test_signing.py
    "mldsa_65_verify_test.json",
    "ed25519_test.json",
]


@functools.cache
def wycheproof_tests(name: str) -> list[dict[str, Any]] | None:
    """All tests of a Wycheproof file (testGroups[].tests[]), or None if the file is missing."""
    path = WYCHEPROOF / name
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    out = []
    for group in data["testGroups"]:
        for test in group["tests"]:
            assert test["result"] in ("valid", "invalid", "acceptable")
            out.append(test)
    assert len(out) == data["numberOfTests"]
    return out


def wycheproof_required(name: str) -> list[dict[str, Any]]:
    tests = wycheproof_tests(name)
    if tests is None:
        pytest.fail(f"test vectors not found: {WYCHEPROOF / name} (expected in tests/vectors/)")
    return tests


def wycheproof_cases(name: str) -> list[Any]:
    tests = wycheproof_tests(name)
    if tests is None:
        return [missing_param(WYCHEPROOF / name)]
    return [pytest.param(t, id=f"tc{t['tcId']}-{t['result']}") for t in tests]


def hx(t: dict[str, Any], key: str) -> bytes:
    return bytes.fromhex(t[key])


# ----------------------------------------------------------- ChaCha20-Poly1305 ----


class VectorNonceAEAD:
    """Stands in for the payload AEAD given to pqfs.format.stream's chunk functions.

    Those derive the nonce from the chunk position (11-byte counter || final flag) and use no
    associated data, so no Wycheproof vector fits them as is. This adapter checks that pqfs asks
    for exactly stream.chunk_nonce(index, last) with no AAD, and substitutes the vector's nonce
    and AAD; everything else (buffers, lengths, tag failure handling, wiping) is pqfs's own code
    running on pyca's real ChaCha20-Poly1305.
    """

    def __init__(self, key: bytes, nonce: bytes, aad: bytes, index: int, last: bool) -> None:
        self.aead = ChaCha20Poly1305(key)
        self.nonce, self.aad = nonce, aad
        self.expected_nonce = index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")
        self.calls = 0

    def _check(self, nonce: bytes, aad: object) -> None:
        assert nonce == self.expected_nonce and len(nonce) == 12
        assert aad is None
        self.calls += 1

    def decrypt_into(self, nonce: bytes, data: Any, aad: object, buf: Any) -> None:
        self._check(nonce, aad)
        self.aead.decrypt_into(self.nonce, data, self.aad, buf)

    def encrypt_into(self, nonce: bytes, data: Any, aad: object, buf: Any) -> None:
        self._check(nonce, aad)
        self.aead.encrypt_into(self.nonce, data, self.aad, buf)


@pytest.mark.parametrize("case", wycheproof_cases("chacha20_poly1305_test.json"))
def test_wycheproof_chacha20_poly1305(case: Any) -> None:
    t = need(case)
    key, nonce, aad = hx(t, "key"), hx(t, "iv"), hx(t, "aad")
    msg, ct, tag = hx(t, "msg"), hx(t, "ct"), hx(t, "tag")
    sealed = ct + tag
    aead = ChaCha20Poly1305(key)

    # 1. pyca directly, with the *_into calls pqfs uses.
    if len(nonce) != 12:
        assert t["result"] == "invalid"
        with pytest.raises(ValueError):
            aead.decrypt_into(nonce, sealed, aad, bytearray(len(msg)))
        with pytest.raises(ValueError):
            aead.encrypt_into(nonce, msg, aad, bytearray(len(msg) + 16))
    else:
        enc = bytearray(len(msg) + 16)
        aead.encrypt_into(nonce, msg, aad, enc)
        dec = bytearray(len(msg))
        if t["result"] == "valid":
            assert bytes(enc) == sealed
            aead.decrypt_into(nonce, sealed, aad, dec)
            assert bytes(dec) == msg
        else:  # a modified tag: the ciphertext is right, the tag is not
            assert bytes(enc[: len(ct)]) == ct and bytes(enc[len(ct) :]) != tag
            with pytest.raises(InvalidTag):
                aead.decrypt_into(nonce, sealed, aad, dec)

    # 2. pqfs.format.stream.decrypt_chunk_into / encrypt_chunk_into. An empty chunk is only allowed as
    # the final chunk 0 (an empty file), so empty messages go there; others take a large,
    # vector-dependent chunk index to exercise the counter bytes of the nonce.
    assert len(msg) <= stream.CHUNK
    index, last = (0, True) if not msg else (t["tcId"] * 7919 + (1 << 40), t["tcId"] % 2 == 0)
    adapter = VectorNonceAEAD(key, nonce, aad, index, last)
    out = bytearray(b"\xaa" * (len(msg) + 8))
    mv = memoryview(out)
    if len(nonce) != 12:
        with pytest.raises((ValueError, PayloadError)):
            stream.decrypt_chunk_into(adapter, index, last, sealed, mv)  # type: ignore[arg-type]
        return
    if t["result"] == "valid":
        n = stream.decrypt_chunk_into(adapter, index, last, sealed, mv)  # type: ignore[arg-type]
        assert n == len(msg)
        assert bytes(out[:n]) == msg
        assert bytes(out[n:]) == b"\xaa" * 8  # nothing written past the chunk
        enc_out = bytearray(len(sealed) + 4)
        m = stream.encrypt_chunk_into(adapter, index, last, msg, memoryview(enc_out))  # type: ignore[arg-type]
        assert m == len(sealed) and bytes(enc_out[:m]) == sealed
        assert adapter.calls == 2
    else:
        with pytest.raises(PayloadError) as excinfo:
            stream.decrypt_chunk_into(adapter, index, last, sealed, mv)  # type: ignore[arg-type]
        assert excinfo.value.chunk == index
        assert adapter.calls == 1
        # No unauthenticated plaintext is left behind in the caller's buffer.
        assert bytes(out[: len(msg)]) == bytes(len(msg))
        assert bytes(out[len(msg) :]) == b"\xaa" * 8


def test_chunk_nonce_is_a_12_byte_chacha_nonce() -> None:
    for index in (0, 1, 255, 256, (1 << 88) - 1):
        for last in (False, True):
            n = stream.chunk_nonce(index, last)
            assert len(n) == 12
            assert n[:11] == index.to_bytes(11, "big") and n[11] == int(last)
    with pytest.raises(FormatError):
        stream.chunk_nonce(1 << 88, False)


# ------------------------------------------------------------------------ X25519 ----


@pytest.mark.parametrize("case", wycheproof_cases("x25519_test.json"))
def test_wycheproof_x25519(case: Any) -> None:
    t = need(case)
    priv, pub, shared = hx(t, "private"), hx(t, "public"), hx(t, "shared")
    sk = x25519.X25519PrivateKey.from_private_bytes(priv)
    peer = x25519.X25519PublicKey.from_public_bytes(pub)
    if shared == ZERO32:
        # age (and pqfs) must refuse the all-zero shared secret of a low-order point.
        with pytest.raises(ValueError):
            sk.exchange(peer)
    else:
        assert sk.exchange(peer) == shared

    # Through pqfs's X25519 identity: a stanza whose share is the vector's public key.
    ident = keys.X25519Identity(priv)
    ident_pk = sk.public_key().public_bytes_raw()
    assert ident.recipient().public_bytes == ident_pk
    file_key = hashlib.sha256(b"file key %d" % t["tcId"]).digest()[:16]
    if shared == ZERO32:
        stanza = Stanza(["X25519", b64encode(pub)], bytes(32))
        with pytest.raises(FormatError):
            ident.unwrap_stanza(stanza)
        return
    # Wrap the file key the way age does, from the vector's expected shared secret: pqfs only
    # unwraps it if its own X25519 computation yields exactly `shared`.
    wrap_key = HKDF(hashes.SHA256(), 32, pub + ident_pk, keys.X25519_INFO).derive(shared)
    body = ChaCha20Poly1305(wrap_key).encrypt(bytes(12), file_key, None)
    assert ident.unwrap_stanza(Stanza(["X25519", b64encode(pub)], body)) == file_key
    # And a wrong body is "not for me" (None), not an error.
    assert ident.unwrap_stanza(Stanza(["X25519", b64encode(pub)], bytes(32))) is None


def low_order_points() -> list[bytes]:
    tests = wycheproof_required("x25519_test.json")
    return sorted({hx(t, "public") for t in tests if hx(t, "shared") == ZERO32})


def test_x25519_recipient_rejects_low_order_points() -> None:
    """A recipient that is a low-order point can never be wrapped to (the shared secret is all
    zero). Every error a user can cause must be a PqfsError (pqfs/errors.py), so wrapping to such
    an `age1...` recipient must fail with one, at parse or at wrap time."""
    points = low_order_points()
    assert len(points) >= 10
    wrong = []
    for point in points:
        try:
            keys.parse_recipient(keys.X25519Recipient(point).encode()).wrap(bytes(16))
        except PqfsError:
            continue
        except Exception as e:
            wrong.append(f"{point.hex()}: {type(e).__name__}: {e}")
        else:
            wrong.append(f"{point.hex()}: wrapped to a low-order point")
    assert not wrong, "low-order X25519 recipients not rejected with a PqfsError:\n" + "\n".join(
        wrong
    )


# -------------------------------------------------------------------------- HKDF ----


@pytest.mark.parametrize("case", wycheproof_cases("hkdf_sha256_test.json"))
def test_wycheproof_hkdf_sha256(case: Any) -> None:
    t = need(case)
    ikm, salt, info, size = hx(t, "ikm"), hx(t, "salt"), hx(t, "info"), t["size"]
    # pqfs passes salt=None for the header MAC key; RFC 5869 makes that the empty salt.
    salt_arg = salt or None
    if t["result"] == "invalid":  # SizeTooLarge: more than 255 * 32 bytes
        assert size > 255 * 32
        with pytest.raises(ValueError):
            HKDF(hashes.SHA256(), size, salt_arg, info)
        with pytest.raises(ValueError):
            HKDFExpand(hashes.SHA256(), size, info)
        return
    okm = hx(t, "okm")
    assert HKDF(hashes.SHA256(), size, salt_arg, info).derive(ikm) == okm
    assert HKDF(hashes.SHA256(), size, salt, info).derive(ikm) == okm
    # derive_into, as stream.payload_aead uses it.
    buf = bytearray(size)
    HKDF(hashes.SHA256(), size, salt_arg, info).derive_into(ikm, buf)
    assert bytes(buf) == okm
    # Extract then Expand, as the HPKE key schedule in pqfs.format.kem composes them.
    prk = HKDF.extract(hashes.SHA256(), salt, ikm)
    assert HKDFExpand(hashes.SHA256(), size, info).derive(prk) == okm


# ---------------------------------------------------------------------- ML-KEM-768 ----


def seeds_by_ek() -> dict[bytes, bytes]:
    """ek -> 64-byte seed, from the vectors that carry both (to decapsulate encaps vectors)."""
    out = {}
    for name in ("mlkem_768_keygen_seed_test.json", "mlkem_768_test.json"):
        for t in wycheproof_tests(name) or []:
            if t["result"] == "valid" and t.get("ek") and len(t.get("seed", "")) == 128:
                out[hx(t, "ek")] = hx(t, "seed")
    return out


SEEDS_BY_EK = seeds_by_ek()


def ephemeral_roundtrip(be: kem.MLKEMBackend, handle: Any, ek: bytes) -> None:
    ct, ss = be.encapsulate(ek)
    assert len(ct) == kem.MLKEM_CT and len(ss) == 32
    assert be.decapsulate(handle, ct) == ss


@pytest.mark.parametrize("case", wycheproof_cases("mlkem_768_keygen_seed_test.json"))
@pytest.mark.parametrize("backend", MLKEM_BACKENDS)
def test_wycheproof_mlkem768_keygen_from_seed(case: Any, backend: str) -> None:
    t = need(case)
    seed, ek, dk = hx(t, "seed"), hx(t, "ek"), hx(t, "dk")
    be = kem.mlkem_backend(backend)
    handle, got_ek = be.keypair_from_seed(seed)
    assert got_ek == ek
    # dk = dk_pke (1152) || ek (1184) || H(ek) (32) || z (32). pyca exports only the seed, so
    # the expanded dk is compared whole only where the backend can export it (liboqs); the
    # embedded ek must be the backend's ek, and z is checked through implicit rejection:
    # a corrupted ciphertext must decapsulate to J(z || c) = SHAKE256(z || c)[:32].
    assert len(dk) == 2400 and dk[1152:2336] == got_ek
    if backend == "liboqs":
        assert bytes(handle.export_secret_key()) == dk
    ephemeral_roundtrip(be, handle, got_ek)
    ct, _ = be.encapsulate(got_ek)
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    assert be.decapsulate(handle, bad) == hashlib.shake_256(dk[-32:] + bad).digest(32)


@pytest.mark.parametrize("case", wycheproof_cases("mlkem_768_test.json"))
@pytest.mark.parametrize("backend", MLKEM_BACKENDS)
def test_wycheproof_mlkem768_decaps(case: Any, backend: str) -> None:
    t = need(case)
    seed, c = hx(t, "seed"), hx(t, "c")
    be = kem.mlkem_backend(backend)
    if t["result"] == "valid":
        handle, ek = be.keypair_from_seed(seed)
        if t.get("ek"):
            assert ek == hx(t, "ek")
        assert be.decapsulate(handle, c) == hx(t, "K")
        return
    if backend == "liboqs":
        pytest.skip(
            "liboqs-python copies inputs into fixed-size buffers instead of validating lengths; "
            "pqfs only ever passes it 64-byte seeds and 1088-byte ciphertexts (checked upstream)"
        )
    # Invalid: a seed of the wrong length, or a ciphertext of the wrong length.
    if len(seed) != 64:
        with pytest.raises(ValueError):
            be.keypair_from_seed(seed)
    else:
        assert len(c) != kem.MLKEM_CT
        handle, _ = be.keypair_from_seed(seed)
        with pytest.raises(ValueError):
            be.decapsulate(handle, c)


@pytest.mark.parametrize("case", wycheproof_cases("mlkem_768_encaps_test.json"))
@pytest.mark.parametrize("backend", MLKEM_BACKENDS)
def test_wycheproof_mlkem768_encaps(case: Any, backend: str) -> None:
    # The vectors fix the encapsulation randomness m, which no backend API takes. What is tested
    # instead: the expected ciphertext decapsulates to the expected K with the decapsulation key
    # (from the seed of the same key in the keygen/decaps files, for 130 of the 133 valid
    # vectors), encapsulation to a valid key round-trips, and an invalid key is refused.
    t = need(case)
    ek = hx(t, "ek")
    be = kem.mlkem_backend(backend)
    if t["result"] == "valid":
        c, k = hx(t, "c"), hx(t, "K")
        seed = SEEDS_BY_EK.get(ek)
        if seed is not None:
            handle, got_ek = be.keypair_from_seed(seed)
            assert got_ek == ek
            assert be.decapsulate(handle, c) == k
            ephemeral_roundtrip(be, handle, ek)
        else:
            # No decapsulation key anywhere: encapsulation must accept the key, and K must be
            # the first half of G(m || H(ek)) (FIPS 203, Algorithm 17), K being what a
            # decapsulation with the right key would return.
            ct, ss = be.encapsulate(ek)
            assert len(ct) == kem.MLKEM_CT and len(ss) == 32
            g = hashlib.sha3_512(hx(t, "m") + hashlib.sha3_256(ek).digest()).digest()
            assert g[:32] == k
        # The whole hybrid seal to this ML-KEM key (with some X25519 key) works.
        pk = ek + x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
        assert len(kem.seal(pk, bytes(16), keys.HYBRID_INFO, backend=backend)) == kem.ENC_SIZE + 32
        return
    if backend == "liboqs":
        pytest.skip("liboqs-python's encap_secret does not report a refused key consistently")
    with pytest.raises(ValueError):
        be.encapsulate(ek)


def invalid_mlkem_keys() -> list[bytes]:
    tests = wycheproof_required("mlkem_768_encaps_test.json")
    return [hx(t, "ek") for t in tests if t["result"] == "invalid"]


def test_classic_recipient_whose_data_begins_with_pq_is_classic() -> None:
    """Recipient types go by the bech32 HRP, not by a prefix: an X25519 key whose encoding
    begins "age1pq" (its data starts with "pq", 1 key in 1024) is a classic recipient, and a
    hybrid one begins "age1pq1". The first 10 bits 00001 00000 encode as "pq"."""
    public = (
        bytes([0x08, 0x00]) + x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()[2:]
    )
    text = bech32_encode("age", public)
    assert text.startswith("age1pq") and not text.startswith("age1pq1")
    rcpt = keys.parse_recipient(text)
    assert isinstance(rcpt, keys.X25519Recipient) and not rcpt.post_quantum
    assert rcpt.public_bytes == public and rcpt.encode() == text


@pytest.mark.parametrize("backend", BACKENDS)
def test_hybrid_recipient_rejects_invalid_keys(backend: str) -> None:
    """An `age1pq1...` recipient whose ML-KEM-768 half fails the FIPS 203 encapsulation-key
    checks (wrong length, coefficients not reduced mod q), or whose X25519 half is a low-order
    point, can never be wrapped to. Every error a user can cause must be a PqfsError
    (pqfs/errors.py): wrapping must fail with one, at parse or at wrap time."""
    good_x = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    assert SEEDS_BY_EK, "no ML-KEM-768 keygen vectors"
    good_m = next(iter(SEEDS_BY_EK))
    candidates = [(f"ek[{len(ek)}]={ek[:8].hex()}..", ek + good_x) for ek in invalid_mlkem_keys()]
    candidates += [(f"x25519={p.hex()}", good_m + p) for p in low_order_points()]
    assert len(candidates) > 100
    wrong = []
    for label, pk in candidates:
        try:
            rcpt = keys.parse_recipient(bech32_encode("age1pq", pk))
            keys.HybridRecipient(rcpt.public_bytes, backend=backend).wrap(bytes(16))  # type: ignore[attr-defined]
        except PqfsError:
            continue
        except Exception as e:
            wrong.append(f"{label}: {type(e).__name__}: {e}")
        else:
            wrong.append(f"{label}: wrapped")
    bad_ek = [w for w in wrong if w.startswith("ek[")]
    bad_x = [w for w in wrong if w.startswith("x25519=")]
    assert not wrong, (
        f"{len(wrong)} of {len(candidates)} invalid hybrid recipients not rejected with a "
        f"PqfsError ({len(bad_ek)} bad ML-KEM keys, {len(bad_x)} low-order X25519 halves):\n"
        + "\n".join(bad_ek[:3] + bad_x[:3])
    )


def _semi_expanded_length_cases() -> list[Any]:
    # pyca/cryptography loads ML-KEM keys only from their 64-byte seed, so the vectors that need
    # an expanded 2400-byte decapsulation key are exercised by the liboqs test below; here, the
    # ciphertext-length checks, which do not depend on the key.
    return [
        c
        for c in wycheproof_cases("mlkem_768_semi_expanded_decaps_test.json")
        if not isinstance(getattr(c, "values", [None])[0], dict)
        or "IncorrectCiphertextLength" in c.values[0].get("flags", [])
    ]


@pytest.mark.parametrize("case", _semi_expanded_length_cases())
@pytest.mark.parametrize("backend", [b for b in MLKEM_BACKENDS if b != "liboqs"])
def test_wycheproof_mlkem768_semi_expanded_decaps(case: Any, backend: str) -> None:
    t = need(case)
    c = hx(t, "c")
    be = kem.mlkem_backend(backend)
    assert "IncorrectCiphertextLength" in t.get("flags", [])
    handle, _ = be.keypair_from_seed(bytes(64))
    with pytest.raises(ValueError):
        be.decapsulate(handle, c)


def test_liboqs_backend_against_vectors() -> None:
    """pqfs.format.kem.LiboqsMLKEM against every vector shape it can take (the only liboqs test that
    exists when liboqs is missing)."""
    if not kem.liboqs_available():
        pytest.skip(LIBOQS_REASON)
    import oqs

    be = kem.LiboqsMLKEM()
    assert be.name == "liboqs" and "liboqs" in BACKENDS
    failures: list[str] = []

    def check(label: str, ok: bool) -> None:
        if not ok:
            failures.append(label)

    for t in wycheproof_required("mlkem_768_keygen_seed_test.json"):
        handle, ek = be.keypair_from_seed(hx(t, "seed"))
        check(f"keygen tc{t['tcId']} ek", ek == hx(t, "ek"))
        check(f"keygen tc{t['tcId']} dk", bytes(handle.export_secret_key()) == hx(t, "dk"))
    for t in wycheproof_required("mlkem_768_test.json"):
        if t["result"] == "valid":
            handle, _ = be.keypair_from_seed(hx(t, "seed"))
            check(f"decaps tc{t['tcId']}", be.decapsulate(handle, hx(t, "c")) == hx(t, "K"))
    for t in wycheproof_required("mlkem_768_encaps_test.json"):
        seed = SEEDS_BY_EK.get(hx(t, "ek"))
        if t["result"] == "valid" and seed is not None:
            handle, _ = be.keypair_from_seed(seed)
            check(f"encaps tc{t['tcId']}", be.decapsulate(handle, hx(t, "c")) == hx(t, "K"))
            ct, ss = be.encapsulate(hx(t, "ek"))
            check(f"encaps tc{t['tcId']} roundtrip", be.decapsulate(handle, ct) == ss)
    for t in wycheproof_required("mlkem_768_semi_expanded_decaps_test.json"):
        if t["result"] == "valid":
            handle = oqs.KeyEncapsulation("ML-KEM-768", secret_key=hx(t, "dk"))
            check(f"semi-expanded tc{t['tcId']}", be.decapsulate(handle, hx(t, "c")) == hx(t, "K"))
    for i, case in enumerate(XWING_CASES):
        v = need(case.values[0])
        key = kem.HybridKey(v["seed"], backend="liboqs")
        check(f"xwing{i} pk", key.public_bytes == v["pk"])
        aead, nonce = kem._hpke_base_aead(v["ss"], keys.HYBRID_INFO)
        sealed = aead.encrypt(nonce, b"0123456789abcdef", b"")
        check(f"xwing{i} open", key.open(v["ct"], sealed, keys.HYBRID_INFO) == b"0123456789abcdef")
    assert not failures, failures
