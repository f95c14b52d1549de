"""age recipients and identities: mlkem768x25519 (hybrid, post-quantum), X25519, scrypt.

A recipient wraps a 16-byte file key into a stanza; an identity unwraps stanzas addressed to it.
`unwrap` implements the header rules of the age spec (scrypt stanzas stand alone, malformed
stanzas of a known type are header failures, unknown types are ignored) and checks the MAC.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from pqfs.errors import FormatError, NoIdentityMatch, PqfsError
from pqfs.format import kem
from pqfs.format.encoding import (
    b64decode,
    b64encode,
    bech32_decode,
    bech32_decode_secret,
    bech32_encode,
)
from pqfs.format.header import Header, Stanza
from pqfs.runtime.zeroize import wipe, wipe_bytes

FILE_KEY_SIZE = 16
HYBRID_INFO = b"age-encryption.org/mlkem768x25519"
X25519_INFO = b"age-encryption.org/v1/X25519"
SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
MAX_SCRYPT_LOG_N = 22
_ZERO_NONCE = bytes(12)
_DECIMAL = re.compile(r"[1-9][0-9]*")


def new_file_key() -> bytearray:
    return bytearray(os.urandom(FILE_KEY_SIZE))


class Recipient(Protocol):
    post_quantum: bool

    def wrap(self, file_key: bytes | bytearray) -> Stanza: ...

    def encode(self) -> str: ...


class Identity(Protocol):
    def unwrap_stanza(self, stanza: Stanza) -> bytearray | None:
        """The file key, None if the stanza is not for this identity; FormatError if it is of this
        identity's type but malformed."""
        ...

    def recipient(self) -> Recipient: ...


def _aead_wrap(key: bytes | bytearray, file_key: bytes | bytearray) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, file_key, None)


def _aead_unwrap(key: bytearray, body: bytes) -> bytearray | None:
    """The file key wrapped in `body`, or None; `key` (the wrapping key) is wiped."""
    fk = bytearray(len(body) - 16) if len(body) >= 16 else bytearray()
    try:
        ChaCha20Poly1305(key).decrypt_into(_ZERO_NONCE, body, None, fk)
        return fk
    except (InvalidTag, ValueError):
        wipe(fk)  # decrypt_into has written unauthenticated bytes
        return None
    finally:
        wipe(key)


def _hkdf(length: int, salt: bytes | None, info: bytes, ikm: bytes | bytearray) -> bytearray:
    out = bytearray(length)
    HKDF(hashes.SHA256(), length, salt, info).derive_into(ikm, out)
    return out


def _check_x25519_public(pk: bytes, what: str) -> None:
    """A low-order X25519 point makes every shared secret zero: such a recipient is invalid."""
    try:
        x25519.X25519PrivateKey.generate().exchange(x25519.X25519PublicKey.from_public_bytes(pk))
    except ValueError:
        raise FormatError(f"invalid {what} recipient (low-order X25519 key)") from None


# ---------------------------------------------------------------- mlkem768x25519 (hybrid) ----


class HybridRecipient:
    post_quantum = True

    def __init__(self, public_bytes: bytes, backend: str | None = None) -> None:
        if len(public_bytes) != kem.PK_SIZE:
            raise FormatError("malformed age1pq recipient (wrong length)")
        try:  # refuse at parse time a key that could never be encrypted to
            mlkem.MLKEM768PublicKey.from_public_bytes(public_bytes[: kem.MLKEM_PK])
        except ValueError:
            raise FormatError("invalid age1pq recipient (bad ML-KEM-768 key)") from None
        _check_x25519_public(public_bytes[kem.MLKEM_PK :], "age1pq")
        self.public_bytes = public_bytes
        self.backend = backend or kem.default_backend()
        self._native = (
            kem.native_public_key(public_bytes) if self.backend == "cryptography" else None
        )

    def wrap(self, file_key: bytes | bytearray) -> Stanza:
        sealed = kem.seal(self.public_bytes, file_key, HYBRID_INFO, self.backend, self._native)
        return Stanza(["mlkem768x25519", b64encode(sealed[: kem.ENC_SIZE])], sealed[kem.ENC_SIZE :])

    def encode(self) -> str:
        return bech32_encode("age1pq", self.public_bytes)


class HybridIdentity:
    def __init__(self, seed: bytes | bytearray, backend: str | None = None) -> None:
        self._seed = bytearray(seed)
        self._key = kem.HybridKey(self._seed, backend or kem.default_backend())

    @staticmethod
    def generate() -> HybridIdentity:
        return HybridIdentity(os.urandom(32))

    def recipient(self) -> HybridRecipient:
        return HybridRecipient(self._key.public_bytes, self._key.backend)

    def encode(self) -> str:
        return bech32_encode("AGE-SECRET-KEY-PQ-", bytes(self._seed), upper=True)

    def derive_secret(self, info: bytes) -> bytearray:
        """32 bytes derived from the seed for another use (HKDF-SHA256, `info` naming the use):
        a key that comes with this identity, to wipe when done."""
        return _hkdf(32, None, info, self._seed)

    def unwrap_stanza(self, stanza: Stanza) -> bytearray | None:
        if not stanza.args or stanza.args[0] != "mlkem768x25519":
            return None
        if len(stanza.args) != 2:
            raise FormatError("malformed mlkem768x25519 stanza")
        enc = b64decode(stanza.args[1], "mlkem768x25519 share")
        if len(enc) != kem.ENC_SIZE:
            raise FormatError("malformed mlkem768x25519 stanza (share length)")
        if len(stanza.body) != FILE_KEY_SIZE + 16:
            raise FormatError("malformed mlkem768x25519 stanza (body length)")
        try:
            opened = self._key.open(enc, stanza.body, HYBRID_INFO)
        except kem.UnwrapFailed:
            return None
        except kem.LowOrderShare:
            raise FormatError("mlkem768x25519 stanza with a low-order X25519 share") from None
        fk = bytearray(opened)
        wipe_bytes(opened)  # the library's copy of the file key
        return fk

    def wipe(self) -> None:
        self._seed[:] = bytes(len(self._seed))
        del self._key


# ----------------------------------------------------------------------------- X25519 ----


class X25519Recipient:
    post_quantum = False

    def __init__(self, public_bytes: bytes) -> None:
        if len(public_bytes) != 32:
            raise FormatError("malformed age1 recipient (wrong length)")
        _check_x25519_public(public_bytes, "age1")
        self.public_bytes = public_bytes

    def wrap(self, file_key: bytes | bytearray) -> Stanza:
        eph = x25519.X25519PrivateKey.generate()
        share = eph.public_key().public_bytes_raw()
        shared = eph.exchange(x25519.X25519PublicKey.from_public_bytes(self.public_bytes))
        key = HKDF(hashes.SHA256(), 32, share + self.public_bytes, X25519_INFO).derive(shared)
        return Stanza(["X25519", b64encode(share)], _aead_wrap(key, file_key))

    def encode(self) -> str:
        return bech32_encode("age", self.public_bytes)


class X25519Identity:
    def __init__(self, secret: bytes | bytearray) -> None:
        self._sk = x25519.X25519PrivateKey.from_private_bytes(secret)
        self._secret = bytearray(secret)
        self._pk = self._sk.public_key().public_bytes_raw()

    @staticmethod
    def generate() -> X25519Identity:
        return X25519Identity(os.urandom(32))

    def recipient(self) -> X25519Recipient:
        return X25519Recipient(self._pk)

    def encode(self) -> str:
        return bech32_encode("AGE-SECRET-KEY-", bytes(self._secret), upper=True)

    def unwrap_stanza(self, stanza: Stanza) -> bytearray | None:
        if not stanza.args or stanza.args[0] != "X25519":
            return None
        if len(stanza.args) != 2:
            raise FormatError("malformed X25519 stanza")
        share = b64decode(stanza.args[1], "X25519 share")
        if len(share) != 32:
            raise FormatError("malformed X25519 stanza (share length)")
        if len(stanza.body) != FILE_KEY_SIZE + 16:
            raise FormatError("malformed X25519 stanza (body length)")
        try:
            shared = self._sk.exchange(x25519.X25519PublicKey.from_public_bytes(share))
        except ValueError:  # all-zero shared secret: low-order point
            raise FormatError("X25519 stanza with a low-order share") from None
        try:
            key = _hkdf(32, share + self._pk, X25519_INFO, shared)
        finally:
            wipe_bytes(shared)
        return _aead_unwrap(key, stanza.body)

    def wipe(self) -> None:
        self._secret[:] = bytes(len(self._secret))
        del self._sk


# ----------------------------------------------------------------------------- scrypt ----


class ScryptRecipient:
    post_quantum = True  # symmetric: not broken by a quantum computer

    def __init__(self, passphrase: bytes | bytearray, log_n: int) -> None:
        self.passphrase = passphrase  # the caller's buffer: the caller wipes it
        self.log_n = log_n

    def wrap(self, file_key: bytes | bytearray) -> Stanza:
        salt = os.urandom(16)
        key = bytearray(32)
        Scrypt(SCRYPT_LABEL + salt, 32, 1 << self.log_n, 8, 1).derive_into(self.passphrase, key)
        try:
            return Stanza(["scrypt", b64encode(salt), str(self.log_n)], _aead_wrap(key, file_key))
        finally:
            wipe(key)

    def encode(self) -> str:
        return "scrypt"


class ScryptIdentity:
    """A passphrase. It is the caller's buffer, not a copy: the caller wipes it."""

    def __init__(self, passphrase: bytes | bytearray, max_log_n: int = MAX_SCRYPT_LOG_N) -> None:
        self.passphrase = passphrase
        self.max_log_n = max_log_n

    def recipient(self) -> Recipient:
        raise PqfsError("a passphrase identity has no public recipient")

    def unwrap_stanza(self, stanza: Stanza) -> bytearray | None:
        if not stanza.args or stanza.args[0] != "scrypt":
            return None
        if len(stanza.args) != 3:
            raise FormatError("malformed scrypt stanza")
        salt = b64decode(stanza.args[1], "scrypt salt")
        if len(salt) != 16:
            raise FormatError("malformed scrypt stanza (salt length)")
        if not _DECIMAL.fullmatch(stanza.args[2]):
            raise FormatError("malformed scrypt stanza (work factor)")
        log_n = int(stanza.args[2])
        if log_n > self.max_log_n:
            raise FormatError(f"scrypt work factor {log_n} is above the limit {self.max_log_n}")
        if len(stanza.body) != FILE_KEY_SIZE + 16:
            raise FormatError("malformed scrypt stanza (body length)")
        key = bytearray(32)
        Scrypt(SCRYPT_LABEL + salt, 32, 1 << log_n, 8, 1).derive_into(self.passphrase, key)
        return _aead_unwrap(key, stanza.body)


# ------------------------------------------------------------------------ unwrapping ----


def unwrap(header: Header, identities: Sequence[Identity]) -> bytearray:
    """The file key of `header`, MAC verified. FormatError / NoIdentityMatch / HeaderMacError."""
    if any(s.args and s.args[0] == "scrypt" for s in header.stanzas) and len(header.stanzas) != 1:
        raise FormatError("an scrypt stanza must be the only stanza in the header")
    for stanza in header.stanzas:
        for ident in identities:
            fk = ident.unwrap_stanza(stanza)
            if fk is None:
                continue
            if len(fk) != FILE_KEY_SIZE:
                raise FormatError("wrapped file key has the wrong length")
            try:
                header.verify_mac(fk)
            except Exception:
                fk[:] = bytes(len(fk))
                raise
            return fk
    raise NoIdentityMatch("no identity matches any recipient of this file")


def wrap_all(file_key: bytes | bytearray, recipients: Iterable[Recipient]) -> list[Stanza]:
    return [r.wrap(file_key) for r in recipients]


# ---------------------------------------------------------------- text encodings ----


def parse_recipient(text: str) -> Recipient:
    text = text.strip()
    try:
        hrp, data = bech32_decode(text)
    except FormatError:
        raise FormatError(f"not an age recipient: {_short(text)}") from None
    if text != text.lower():
        raise FormatError(f"age recipients are lower case: {_short(text)}")
    if hrp == "age1pq":
        return HybridRecipient(data)
    if hrp == "age":
        return X25519Recipient(data)
    raise FormatError(f"unsupported recipient type {hrp!r}")


def parse_identity(text: str | bytes | bytearray | memoryview) -> HybridIdentity | X25519Identity:
    """One identity line. Given as bytes (a bytearray the caller wipes), no `str` or `bytes`
    copy of the secret is made."""
    raw = memoryview(text.encode("ascii", "replace") if isinstance(text, str) else text)
    lo, hi = _strip(raw, 0, len(raw))
    line = raw[lo:hi]
    try:
        hrp, data = bech32_decode_secret(line)
    except FormatError:
        raise FormatError("malformed age identity") from None
    try:
        if any(0x61 <= c <= 0x7A for c in line):
            raise FormatError("age identities are upper case")
        if hrp == "age-secret-key-pq-" and len(data) == 32:
            return HybridIdentity(data)
        if hrp == "age-secret-key-" and len(data) == 32:
            return X25519Identity(data)
        raise FormatError("unsupported or malformed age identity")
    finally:
        wipe(data)


def _strip(buf: memoryview, lo: int, hi: int) -> tuple[int, int]:
    """Bounds of buf[lo:hi] without the ASCII whitespace at either end."""
    while lo < hi and buf[lo] in b" \t\r\n\v\f":
        lo += 1
    while hi > lo and buf[hi - 1] in b" \t\r\n\v\f":
        hi -= 1
    return lo, hi


def parse_identity_file(
    text: str | bytes | bytearray | memoryview,
) -> list[HybridIdentity | X25519Identity]:
    """age-keygen format: one identity per line, '#' comments and blank lines ignored. Given as
    bytes, it is parsed in place, with no copy of any line."""
    raw = memoryview(text.encode("ascii", "replace") if isinstance(text, str) else text)
    out = []
    start = 0
    while start < len(raw):
        end = start
        while end < len(raw) and raw[end] != 0x0A:
            end += 1
        lo, hi = _strip(raw, start, end)
        if hi > lo and raw[lo] != 0x23:  # "#"
            out.append(parse_identity(raw[lo:hi]))
        start = end + 1
    if not out:
        raise FormatError("no identity found in identity file")
    return out


def identity_file_text(identities: Sequence[HybridIdentity | X25519Identity]) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = []
    for ident in identities:
        lines += [
            f"# created: {now}",
            f"# public key: {ident.recipient().encode()}",
            ident.encode(),
        ]
    return "\n".join(lines) + "\n"


def _short(text: str) -> str:
    return text if len(text) <= 24 else text[:20] + "..."
