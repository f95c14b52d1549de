"""ML-KEM-768 backends and the MLKEM768-X25519 (X-Wing) HPKE used by `mlkem768x25519` stanzas.

Two ways to seal/open the same HPKE:
  * "cryptography": pyca/cryptography's own `hpke.Suite` with KEM.MLKEM768_X25519 (the default:
    one native call per unwrap);
  * a composed HPKE built from library primitives (RFC 9180 base mode over the X-Wing combiner),
    with the ML-KEM-768 part taken from a pluggable backend: "liboqs" (liboqs-python) when it
    is installed, or "cryptography-mlkem" (pyca's ML-KEM), which exists to prove on every
    machine that the composition matches the native suite bit for bit.
Every backend must pass the same vectors (tests/test_vectors.py, X-Wing section).
"""

from __future__ import annotations

import ctypes.util
import hashlib
import os
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from pqfs.errors import PqfsError
from pqfs.runtime.zeroize import wipe_bytes

MLKEM_PK = 1184
MLKEM_CT = 1088
PK_SIZE = MLKEM_PK + 32  # ML-KEM-768 encapsulation key || X25519 public key
ENC_SIZE = MLKEM_CT + 32  # ML-KEM-768 ciphertext || X25519 ephemeral share
XWING_LABEL = b"\\.//^\\"
_SUITE_ID = b"HPKE" + bytes.fromhex("647a") + bytes.fromhex("0001") + bytes.fromhex("0003")
_NATIVE_SUITE = hpke.Suite(
    hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305
)


class LowOrderShare(Exception):
    """The X25519 share is a low-order point: the stanza is malformed (age: header failure)."""


class UnwrapFailed(Exception):
    """HPKE open failed: the stanza is not for this key (or was tampered with)."""


def expand_seed(seed: bytes | bytearray) -> bytearray:
    """X-Wing private key expansion: SHAKE256(seed, 96) = ML-KEM d||z (64) || X25519 sk (32)."""
    digest = hashlib.shake_256(seed).digest(96)
    out = bytearray(digest)
    wipe_bytes(digest)
    return out


class MLKEMBackend(Protocol):
    name: str

    def keypair_from_seed(self, seed64: memoryview) -> tuple[Any, bytes]:
        """Return (decapsulation handle, 1184-byte encapsulation key)."""
        ...

    def encapsulate(self, ek: bytes) -> tuple[bytes, bytes]:
        """Return (1088-byte ciphertext, 32-byte shared secret)."""
        ...

    def decapsulate(self, dk: Any, ct: bytes) -> bytes: ...


class CryptographyMLKEM:
    name = "cryptography-mlkem"

    def keypair_from_seed(self, seed64: memoryview) -> tuple[Any, bytes]:
        k = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed64)
        return k, k.public_key().public_bytes_raw()

    def encapsulate(self, ek: bytes) -> tuple[bytes, bytes]:
        ss, ct = mlkem.MLKEM768PublicKey.from_public_bytes(ek).encapsulate()
        return ct, ss

    def decapsulate(self, dk: Any, ct: bytes) -> bytes:
        return bytes(dk.decapsulate(ct))


class LiboqsMLKEM:
    """ML-KEM-768 from liboqs-python. Imported lazily: `import oqs` tries to build liboqs from the
    network when the shared library is missing, so we look for the library first."""

    name = "liboqs"

    def __init__(self) -> None:
        if not liboqs_available():
            raise PqfsError("the liboqs backend needs liboqs-python and the liboqs library")
        import oqs

        self._oqs = oqs

    def keypair_from_seed(self, seed64: memoryview) -> tuple[Any, bytes]:
        kem = self._oqs.KeyEncapsulation("ML-KEM-768")
        seed = bytes(seed64)  # liboqs-python takes bytes only: this copy is wiped below
        try:
            ek = kem.generate_keypair_seed(seed)
        finally:
            wipe_bytes(seed)
        return kem, bytes(ek)

    def encapsulate(self, ek: bytes) -> tuple[bytes, bytes]:
        with self._oqs.KeyEncapsulation("ML-KEM-768") as kem:
            ct, ss = kem.encap_secret(ek)
        return bytes(ct), bytes(ss)

    def decapsulate(self, dk: Any, ct: bytes) -> bytes:
        return bytes(dk.decap_secret(ct))


def liboqs_available() -> bool:
    try:
        import importlib.util

        if importlib.util.find_spec("oqs") is None:
            return False
    except (ImportError, ValueError):
        return False
    return ctypes.util.find_library("oqs") is not None or bool(os.environ.get("OQS_INSTALL_PATH"))


def _labeled_extract(salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return HKDF.extract(hashes.SHA256(), salt, b"HPKE-v1" + _SUITE_ID + label + ikm)


def _labeled_expand(prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    li = length.to_bytes(2, "big") + b"HPKE-v1" + _SUITE_ID + label + info
    return HKDFExpand(hashes.SHA256(), length, li).derive(prk)


def _hpke_base_aead(shared_secret: bytes, info: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    """RFC 9180 §5.1 KeySchedule, mode_base, no PSK; returns (AEAD, nonce for sequence 0)."""
    psk_id_hash = _labeled_extract(b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash
    secret = _labeled_extract(shared_secret, b"secret", b"")
    key = _labeled_expand(secret, b"key", context, 32)
    nonce = _labeled_expand(secret, b"base_nonce", context, 12)
    return ChaCha20Poly1305(key), nonce


def _xwing_combine(ss_m: bytes, ss_x: bytes, ct_x: bytes, pk_x: bytes) -> bytes:
    return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest()


class HybridKey:
    """An MLKEM768-X25519 private key, from its 32-byte seed, bound to one backend."""

    def __init__(self, seed: bytes | bytearray, backend: str = "cryptography") -> None:
        if len(seed) != 32:
            raise PqfsError("a hybrid identity seed must be 32 bytes")
        self.backend = backend
        expanded = expand_seed(seed)
        try:
            self._x = x25519.X25519PrivateKey.from_private_bytes(memoryview(expanded)[64:])
            pk_x = self._x.public_key().public_bytes_raw()
            if backend == "cryptography":
                m = mlkem.MLKEM768PrivateKey.from_seed_bytes(memoryview(expanded)[:64])
                self._native: hpke.MLKEM768X25519PrivateKey | None = hpke.MLKEM768X25519PrivateKey(
                    m, self._x
                )
                pk_m = m.public_key().public_bytes_raw()
                self._mlkem: MLKEMBackend | None = None
                self._dk: Any = None
            else:
                self._native = None
                self._mlkem = mlkem_backend(backend)
                self._dk, pk_m = self._mlkem.keypair_from_seed(memoryview(expanded)[:64])
        finally:
            expanded[:] = bytes(96)
        self.public_bytes = pk_m + pk_x

    def _check_share(self, share: bytes) -> None:
        try:
            self._x.exchange(x25519.X25519PublicKey.from_public_bytes(share))
        except ValueError:
            raise LowOrderShare from None

    def open(self, enc: bytes, ct: bytes, info: bytes) -> bytes:
        """HPKE OpenBase; raises UnwrapFailed when the stanza is not for this key."""
        if self._native is not None:
            try:
                return _NATIVE_SUITE.decrypt(enc + ct, self._native, info=info)
            except (InvalidTag, ValueError):
                # Only on failure (keeps the success path to one native call): a low-order
                # X25519 share is a malformed stanza, not merely someone else's.
                self._check_share(enc[MLKEM_CT:])
                raise UnwrapFailed from None
        assert self._mlkem is not None
        ct_m, ct_x = enc[:MLKEM_CT], enc[MLKEM_CT:]
        self._check_share(ct_x)
        ss_x = self._x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
        try:
            ss_m = self._mlkem.decapsulate(self._dk, ct_m)
        except ValueError:
            raise UnwrapFailed from None
        pk_x = self.public_bytes[MLKEM_PK:]
        aead, nonce = _hpke_base_aead(_xwing_combine(ss_m, ss_x, ct_x, pk_x), info)
        try:
            return aead.decrypt(nonce, ct, b"")
        except InvalidTag:
            raise UnwrapFailed from None


def native_public_key(public_bytes: bytes) -> hpke.MLKEM768X25519PublicKey:
    """The library's key object for an MLKEM768-X25519 public key (parsing one costs ~25 us,
    a tenth of a seal: a recipient keeps its own)."""
    if len(public_bytes) != PK_SIZE:
        raise PqfsError("an MLKEM768-X25519 public key must be 1216 bytes")
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(public_bytes[:MLKEM_PK]),
        x25519.X25519PublicKey.from_public_bytes(public_bytes[MLKEM_PK:]),
    )


def seal(
    public_bytes: bytes,
    plaintext: bytes | bytearray,
    info: bytes,
    backend: str = "cryptography",
    native: hpke.MLKEM768X25519PublicKey | None = None,
) -> bytes:
    """HPKE SealBase to an MLKEM768-X25519 public key (`native`: its key object, if the caller
    has it already); returns enc || ciphertext."""
    if len(public_bytes) != PK_SIZE:
        raise PqfsError("an MLKEM768-X25519 public key must be 1216 bytes")
    pk_m, pk_x = public_bytes[:MLKEM_PK], public_bytes[MLKEM_PK:]
    if backend == "cryptography":
        pub = native if native is not None else native_public_key(public_bytes)
        return _NATIVE_SUITE.encrypt(plaintext, pub, info=info)
    ct_m, ss_m = mlkem_backend(backend).encapsulate(pk_m)
    eph = x25519.X25519PrivateKey.generate()
    ct_x = eph.public_key().public_bytes_raw()
    ss_x = eph.exchange(x25519.X25519PublicKey.from_public_bytes(pk_x))
    aead, nonce = _hpke_base_aead(_xwing_combine(ss_m, ss_x, ct_x, pk_x), info)
    return ct_m + ct_x + aead.encrypt(nonce, plaintext, b"")


def mlkem_backend(name: str) -> MLKEMBackend:
    if name == "liboqs":
        return LiboqsMLKEM()
    if name == "cryptography-mlkem":
        return CryptographyMLKEM()
    raise PqfsError(f"unknown ML-KEM backend {name!r} (choose cryptography, liboqs)")


def available_backends() -> list[str]:
    names = ["cryptography", "cryptography-mlkem"]
    if liboqs_available():
        names.append("liboqs")
    return names


_configured: str | None = None


def set_default_backend(name: str) -> None:
    """Choose the backend from a vault config ("auto", "cryptography", "liboqs")."""
    global _configured
    if name != "auto" and name not in available_backends():
        raise PqfsError(f"ML-KEM backend {name!r} is not available on this machine")
    _configured = None if name == "auto" else name


def default_backend() -> str:
    """`PQFS_KEM_BACKEND`, else the vault config's `kem_backend`, else auto-detection: the
    native suite of pyca/cryptography, or liboqs where cryptography lacks ML-KEM."""
    env = os.environ.get("PQFS_KEM_BACKEND")
    if env:
        return env
    if _configured:
        return _configured
    return (
        "cryptography" if _native_mlkem() else ("liboqs" if liboqs_available() else "cryptography")
    )


def _native_mlkem() -> bool:
    try:
        mlkem.MLKEM768PrivateKey.generate()
    except Exception:  # built against an OpenSSL without ML-KEM
        return False
    return True
