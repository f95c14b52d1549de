"""Signatures (FORMAT.md §5.1): the published vectors for both halves of pqfs's hybrid
signature (Wycheproof ML-DSA-65, sign from seed and verify, and Ed25519), the composition's
own rules (both halves must verify, purposes never mix), pqfs's key-derivation vector, and a
property: no change to a signed pqfs.json is accepted."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from hypothesis import given, settings
from hypothesis import strategies as st

from pqfs.format.keys import HybridIdentity
from pqfs.vault.config import ConfigError, VaultConfig, Writer, parse
from pqfs.vault.signing import MLDSA_SIG, SigningKey, VerifyKey

from .conftest import examples

WYCHEPROOF = Path(__file__).resolve().parent / "vectors" / "wycheproof"  # sources: its README


@functools.cache
def groups(name: str) -> list[dict[str, Any]]:
    path = WYCHEPROOF / name
    if not path.is_file():
        pytest.fail(f"test vectors not found: {path}")
    data = json.loads(path.read_text())
    assert sum(len(g["tests"]) for g in data["testGroups"]) == data["numberOfTests"]
    return list(data["testGroups"])


def cases(name: str) -> list[Any]:
    return [
        pytest.param(g, t, id=f"tc{t['tcId']}-{t['result']}")
        for g in groups(name)
        for t in g["tests"]
    ]


def _ctx(t: dict[str, Any]) -> bytes | None:
    return bytes.fromhex(t["ctx"]) if "ctx" in t else None


# ------------------------------------------------------------------ ML-DSA-65 ----


@pytest.mark.parametrize(("group", "t"), cases("mldsa_65_sign_seed_test.json"))
def test_wycheproof_mldsa65_sign_from_seed(group: dict[str, Any], t: dict[str, Any]) -> None:
    """The key made from the vector's seed is the vector's; its signature verifies; a
    signature of ours over the same message verifies (ML-DSA signing is hedged, so ours is not
    byte-equal to the deterministic one); an invalid seed or context is refused."""
    seed = bytes.fromhex(group["privateSeed"])
    if "IncorrectPrivateKeyLength" in t["flags"]:
        assert t["result"] == "invalid"
        with pytest.raises(ValueError):
            mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
        return
    key = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
    public = key.public_key()
    assert public.public_bytes_raw() == bytes.fromhex(group["publicKey"])
    if "msg" not in t:  # an Internal (mu-only) vector: for Sign_internal, which pqfs never uses
        assert "Internal" in t["flags"]
        return
    msg, ctx = bytes.fromhex(t["msg"]), _ctx(t)
    if t["result"] == "invalid":
        assert "InvalidContext" in t["flags"]
        with pytest.raises(ValueError):
            key.sign(msg, ctx)
        return
    public.verify(bytes.fromhex(t["sig"]), msg, ctx)
    public.verify(key.sign(msg, ctx), msg, ctx)


@pytest.mark.parametrize(("group", "t"), cases("mldsa_65_verify_test.json"))
def test_wycheproof_mldsa65_verify(group: dict[str, Any], t: dict[str, Any]) -> None:
    raw = bytes.fromhex(group["publicKey"])
    msg, sig, ctx = bytes.fromhex(t["msg"]), bytes.fromhex(t["sig"]), _ctx(t)
    try:
        mldsa.MLDSA65PublicKey.from_public_bytes(raw).verify(sig, msg, ctx)
        ok = True
    except (InvalidSignature, ValueError):
        ok = False
    assert ok == (t["result"] == "valid"), t["comment"]
    # pqfs's VerifyKey takes only keys of the right length, as the library does.
    if len(raw) != 1952:
        with pytest.raises(Exception, match="signing key is"):
            VerifyKey(raw + bytes(32))


# ------------------------------------------------------------------ Ed25519 ----


@pytest.mark.parametrize(("group", "t"), cases("ed25519_test.json"))
def test_wycheproof_ed25519_verify(group: dict[str, Any], t: dict[str, Any]) -> None:
    public = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(group["publicKey"]["pk"]))
    try:
        public.verify(bytes.fromhex(t["sig"]), bytes.fromhex(t["msg"]))
        ok = True
    except InvalidSignature:
        ok = False
    assert ok == (t["result"] == "valid"), t["comment"]


# ------------------------------------------------------------------ the hybrid ----


def test_both_halves_must_verify() -> None:
    key = SigningKey.generate()
    other = SigningKey.generate()
    sig = key.sign(b"pqfs test", b"data")
    mine = key.verify_key
    assert mine.verify(b"pqfs test", b"data", sig)
    theirs = other.sign(b"pqfs test", b"data")
    # One half of each: neither key's signature.
    assert not mine.verify(b"pqfs test", b"data", sig[:MLDSA_SIG] + theirs[MLDSA_SIG:])
    assert not mine.verify(b"pqfs test", b"data", theirs[:MLDSA_SIG] + sig[MLDSA_SIG:])
    assert not mine.verify(b"pqfs test", b"data", sig[:-1])
    assert not mine.verify(b"pqfs other", b"data", sig)  # another purpose
    assert not mine.verify(b"pqfs test", b"data!", sig)


def test_purposes_cannot_run_into_the_data() -> None:
    key = SigningKey.generate()
    """What is signed is purpose || 0x00 || data: a purpose holding a NUL could claim another's
    signature as its own, so none may."""
    sig = key.sign(b"a", b"b\x00c")
    assert key.verify_key.verify(b"a", b"b\x00c", sig)
    with pytest.raises(ValueError):
        key.sign(b"a\x00b", b"c")
    with pytest.raises(ValueError):
        key.verify_key.verify(b"a\x00b", b"c", sig)


def test_owner_key_derivation_vector() -> None:
    """FORMAT.md §5.1's vector: the owner key of the all-zero identity seed."""
    owner = SigningKey.owner_of(HybridIdentity(bytes(32)))
    assert owner.id == "dc5c9f876d99e8521d8480e9986f3dbb"
    again = SigningKey.owner_of(HybridIdentity(bytes(32)))
    assert again.verify_key.public == owner.verify_key.public


def test_writer_key_text_round_trip() -> None:
    key = SigningKey.generate()
    text = key.encode()
    assert text.startswith("PQFS-WRITER-KEY-1")
    assert SigningKey.decode(text.encode()).id == key.id
    with pytest.raises(Exception, match="not a pqfs writer key"):
        SigningKey.decode(HybridIdentity.generate().encode().encode())


# ------------------------------------------------------------------ the config ----


def _config() -> tuple[bytes, VaultConfig]:
    owner = SigningKey.owner_of(HybridIdentity(bytes(range(32))))
    writer = SigningKey(bytes(32))
    cfg = VaultConfig(
        2,
        [HybridIdentity(bytes(32)).recipient().encode()],
        owner=owner.verify_key,
        generation=3,
        writers=[Writer("ingest-1", writer.verify_key)],
    )
    return cfg.to_bytes(owner), cfg


@settings(max_examples=examples(300), deadline=None)
@given(pos=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_no_change_to_a_signed_config_is_accepted(pos: int, value: int) -> None:
    raw, cfg = _config()
    pos %= len(raw)
    changed = bytearray(raw)
    changed[pos] = value
    try:
        got = parse(bytes(changed), "v")
    except ConfigError:
        return
    # Accepted only if it means the same (whitespace, or a byte set to what it was).
    assert got.body() == cfg.body()


def test_a_config_signed_by_no_one_it_names_is_refused() -> None:
    raw, cfg = _config()
    doc = json.loads(raw)
    doc["generation"] = 4  # a newer generation, unsigned
    with pytest.raises(ConfigError, match="signature does not verify"):
        parse(json.dumps(doc).encode(), "v")
    doc = json.loads(raw)
    doc["writers"] = []
    with pytest.raises(ConfigError, match="signature does not verify"):
        parse(json.dumps(doc).encode(), "v")
    doc = json.loads(raw)
    del doc["signature"]
    with pytest.raises(ConfigError, match="not signed"):
        parse(json.dumps(doc).encode(), "v")
    dup = raw.replace(b'"generation": 3', b'"generation": 3, "generation": 9')
    with pytest.raises(ConfigError, match="not a pqfs vault config"):
        parse(dup, "v")
    assert parse(raw, "v").body() == cfg.body()
