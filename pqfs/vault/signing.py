"""Hybrid signatures: ML-DSA-65 and Ed25519 together (docs/FORMAT.md §5.1).

A signature is valid only if both halves verify, so forging one needs breaking ML-DSA-65 (a
post-quantum lattice scheme) and Ed25519 (the classic one, in case ML-DSA falls to
cryptanalysis). Both are pyca/cryptography's; nothing here is a primitive of its own, only
their composition and the derivation of both keys from one 32-byte secret with HKDF-SHA256.

A signing key is a 32-byte secret: the vault owner's is derived from the vault's hybrid
identity (so the identity stays the one thing to keep), a writer's is random and kept in its
own file. What is signed is always `purpose || 0x00 || data`, so a signature made for one
purpose (a config, a catalog segment) can never be taken for another.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pqfs.errors import FormatError
from pqfs.format.encoding import b64decode, b64encode, bech32_decode_secret, bech32_encode
from pqfs.format.keys import HybridIdentity
from pqfs.runtime.memory import wipe

MLDSA_PK = 1952
ED_PK = 32
PUBLIC_SIZE = MLDSA_PK + ED_PK
MLDSA_SIG = 3309
ED_SIG = 64
SIGNATURE_SIZE = MLDSA_SIG + ED_SIG
SECRET_SIZE = 32
OWNER_INFO = b"pqfs.v2 owner signing key"
WRITER_HRP = "PQFS-WRITER-KEY-"


def _hkdf(secret: bytes | bytearray, info: bytes) -> bytearray:
    out = bytearray(32)
    HKDF(hashes.SHA256(), 32, salt=None, info=info).derive_into(secret, out)
    return out


def key_id(public: bytes) -> str:
    """32 hex digits naming a public signing key: the first 16 bytes of SHA-256 over it."""
    return hashlib.sha256(b"pqfs.v2 key id\x00" + public).hexdigest()[:32]


def _message(purpose: bytes, data: bytes) -> bytes:
    if b"\x00" in purpose:
        raise ValueError("a purpose holds no NUL")
    return purpose + b"\x00" + data


class VerifyKey:
    """A public hybrid key: 1952 bytes of ML-DSA-65 then 32 of Ed25519."""

    def __init__(self, public: bytes) -> None:
        if len(public) != PUBLIC_SIZE:
            raise FormatError(f"a signing key is {PUBLIC_SIZE} bytes, not {len(public)}")
        try:
            self._mldsa = mldsa.MLDSA65PublicKey.from_public_bytes(public[:MLDSA_PK])
            self._ed = ed25519.Ed25519PublicKey.from_public_bytes(public[MLDSA_PK:])
        except ValueError:
            raise FormatError("invalid signing key") from None
        self.public = public
        self.id = key_id(public)

    @classmethod
    def decode(cls, text: str) -> VerifyKey:
        return cls(b64decode(text, "signing key"))

    def encode(self) -> str:
        return b64encode(self.public)

    def verify(self, purpose: bytes, data: bytes, signature: bytes) -> bool:
        """Whether `signature` is this key's over (purpose, data): both halves must verify."""
        if len(signature) != SIGNATURE_SIZE:
            return False
        msg = _message(purpose, data)
        try:
            self._mldsa.verify(signature[:MLDSA_SIG], msg)
            self._ed.verify(signature[MLDSA_SIG:], msg)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """A hybrid signing key, derived from a 32-byte secret (kept here, wiped by wipe())."""

    def __init__(self, secret: bytes | bytearray) -> None:
        if len(secret) != SECRET_SIZE:
            raise FormatError(f"a signing secret is {SECRET_SIZE} bytes")
        self._secret = bytearray(secret)
        seed_m = _hkdf(self._secret, b"pqfs.v2 ml-dsa-65")
        seed_e = _hkdf(self._secret, b"pqfs.v2 ed25519")
        try:
            # The bytearrays themselves (wiped below), never a bytes copy that could not be.
            self._mldsa = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed_m)
            self._ed = ed25519.Ed25519PrivateKey.from_private_bytes(seed_e)
        finally:
            wipe(seed_m)
            wipe(seed_e)
        self.verify_key = VerifyKey(
            self._mldsa.public_key().public_bytes_raw() + self._ed.public_key().public_bytes_raw()
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(SECRET_SIZE))

    @classmethod
    def owner_of(cls, identity: HybridIdentity) -> SigningKey:
        """The vault owner's key, derived from the vault's hybrid identity."""
        secret = identity.derive_secret(OWNER_INFO)
        try:
            return cls(secret)
        finally:
            wipe(secret)

    @property
    def id(self) -> str:
        return self.verify_key.id

    def sign(self, purpose: bytes, data: bytes) -> bytes:
        msg = _message(purpose, data)
        return self._mldsa.sign(msg) + self._ed.sign(msg)

    def encode(self) -> str:
        """The writer key file's line: Bech32, as age writes its identities."""
        return bech32_encode(WRITER_HRP, bytes(self._secret), upper=True)

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> SigningKey:
        hrp, data = bech32_decode_secret(raw)
        try:
            if hrp != WRITER_HRP.lower() or len(data) != SECRET_SIZE:
                raise FormatError("not a pqfs writer key")
            return cls(data)
        finally:
            wipe(data)

    def wipe(self) -> None:
        """Wipe the secret this key was made from (the library's own key objects cannot be
        wiped from Python; they go when this object does)."""
        wipe(self._secret)
