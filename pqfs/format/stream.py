"""age STREAM payload: 64 KiB ChaCha20-Poly1305 chunks with a counter nonce and a final flag.

Random access is arithmetic: plaintext offset -> chunk index -> ciphertext offset. Every decrypt
goes into a caller-supplied buffer (decrypt_into); on a failed tag the buffer already holds
unauthenticated bytes, so it is wiped before the error propagates.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pqfs.errors import FormatError, PayloadError
from pqfs.runtime.memory import wipe

CHUNK = 64 * 1024
TAG = 16
CT_CHUNK = CHUNK + TAG
NONCE_SIZE = 16
_MAX_COUNTER = 1 << 88


def payload_aead(file_key: bytes | bytearray, nonce: bytes) -> ChaCha20Poly1305:
    """The payload AEAD. The derived key is wiped here; the AEAD object holds the only copy."""
    key = bytearray(32)
    HKDF(hashes.SHA256(), 32, salt=nonce, info=b"payload").derive_into(file_key, key)
    try:
        return ChaCha20Poly1305(key)
    finally:
        wipe(key)


def chunk_nonce(index: int, last: bool) -> bytes:
    if index >= _MAX_COUNTER:
        raise FormatError("payload too large")
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def chunk_count(plain_size: int) -> int:
    """Number of chunks for a plaintext size; an empty payload still has one (empty) chunk."""
    return max(1, -(-plain_size // CHUNK))


def ciphertext_size(plain_size: int) -> int:
    """Payload size after the nonce."""
    return plain_size + TAG * chunk_count(plain_size)


def plaintext_size(ct_size: int) -> int:
    """Inverse of ciphertext_size; raises PayloadError for impossible sizes (truncation)."""
    full, rem = divmod(ct_size, CT_CHUNK)
    if rem == 0:
        if full == 0:
            raise PayloadError("payload has no chunks (truncated)", 0)
        return full * CHUNK
    if rem < TAG or (rem == TAG and full > 0):
        raise PayloadError("payload is truncated inside a chunk", full)
    return full * CHUNK + rem - TAG


def decrypt_chunk_into(
    aead: ChaCha20Poly1305, index: int, last: bool, ct: bytes | memoryview, out: memoryview
) -> int:
    """Decrypt one chunk into `out` (len >= len(ct) - TAG); returns the plaintext length."""
    n = len(ct) - TAG
    if n < 0 or n > CHUNK or (n == 0 and (not last or index != 0)):
        raise PayloadError(f"chunk {index} has an invalid length", index)
    dst = out[:n]
    try:
        aead.decrypt_into(chunk_nonce(index, last), ct, None, dst)
    except InvalidTag:
        wipe(dst)
        raise PayloadError(f"chunk {index} failed authentication", index) from None
    return n


def encrypt_chunk_into(
    aead: ChaCha20Poly1305, index: int, last: bool, pt: bytes | memoryview, out: memoryview
) -> int:
    n = len(pt) + TAG
    aead.encrypt_into(chunk_nonce(index, last), pt, None, out[:n])
    return n


def ciphertext_span(payload_start: int, size: int, chunks: int, first: int, count: int) -> int:
    """Bytes of ciphertext that chunks [first, first+count) take in an object of `size` bytes."""
    if first < 0 or first + count > chunks:
        raise PayloadError(f"chunk {first + count - 1} is past the end of the payload", first)
    ct_start = payload_start + first * CT_CHUNK
    ct_len = min(size, payload_start + (first + count) * CT_CHUNK) - ct_start
    if ct_len <= 0:
        raise PayloadError(f"chunk {first} is missing (truncated object)", first)
    return ct_len


def decrypt_read_chunks(
    aead: ChaCha20Poly1305, ct: memoryview, chunks: int, first: int, outs: Sequence[memoryview]
) -> list[int]:
    """Decrypt the ciphertext `ct` of chunks first, first+1, ... (already read) into `outs`;
    the plaintext length of each. On failure every output written so far is wiped."""
    pos = 0
    lens: list[int] = []
    try:
        for k in range(len(outs)):
            i = first + k
            clen = min(CT_CHUNK, len(ct) - pos)
            lens.append(decrypt_chunk_into(aead, i, i == chunks - 1, ct[pos : pos + clen], outs[k]))
            pos += clen
    except PayloadError:
        for k in range(len(lens)):
            wipe(outs[k][: lens[k]])
        raise
    return lens
