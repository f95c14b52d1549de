"""Text encodings used by age: canonical unpadded base64 and Bech32 (BIP 173, no length limit).

These are encodings, not cryptographic primitives; the age spec pins their exact rules
(canonical base64 only, Bech32 all-lower or all-upper with the checksum over the lower case).
"""

from __future__ import annotations

import base64
import binascii

from pqfs.errors import FormatError


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64decode(text: str | bytes, what: str = "base64 value") -> bytes:
    """Decode unpadded base64, rejecting padding, stray characters and non-canonical encodings."""
    if not isinstance(text, (str, bytes)):
        raise FormatError(f"malformed {what}")  # (bytes(n) of a number would allocate n bytes)
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    # translate() deletes the alphabet at C speed: anything left is a stray character
    if raw.translate(None, _B64_ALPHABET) or len(raw) % 4 == 1:
        raise FormatError(f"malformed {what}")
    try:
        data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except binascii.Error:
        raise FormatError(f"malformed {what}") from None
    # Canonical: re-encoding must give the same text (no non-zero trailing bits).
    if b64encode(data).encode("ascii") != raw:
        raise FormatError(f"non-canonical {what}")
    return data


_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= _GEN[i] if ((top >> i) & 1) else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(x) >> 5 for x in hrp] + [0] + [ord(x) & 31 for x in hrp]


def _convertbits(data: bytes | list[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = 0
    bits = 0
    ret: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            ret.append((acc >> bits) & maxv)
    if pad:
        if bits:
            ret.append((acc << (tobits - bits)) & maxv)
    elif bits >= frombits or ((acc << (tobits - bits)) & maxv):
        raise FormatError("invalid Bech32 padding")
    return ret


def bech32_encode(hrp: str, data: bytes, upper: bool = False) -> str:
    hrp_l = hrp.lower()
    values = _convertbits(data, 8, 5, True)
    checksum_in = _hrp_expand(hrp_l) + values
    polymod = _polymod([*checksum_in, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    out = hrp_l + "1" + "".join(_CHARSET[d] for d in values + checksum)
    return out.upper() if upper else out


def bech32_decode(text: str) -> tuple[str, bytes]:
    """Return (lower-case HRP, data). Raises FormatError on any defect."""
    if any(ord(c) < 33 or ord(c) > 126 for c in text):
        raise FormatError("invalid character in Bech32 string")
    hrp, data = bech32_decode_secret(text.encode("ascii"))
    return hrp, bytes(data)


_VALUE = {c: i for i, c in enumerate(_CHARSET.encode())}


def bech32_decode_secret(raw: bytes | bytearray | memoryview) -> tuple[str, bytearray]:
    """bech32_decode of the ASCII bytes `raw` into a bytearray, making no `str` or `bytes` copy
    of the data part: for identities, whose data is a secret key (only the HRP, public, becomes
    a str). The 5-bit groups are overwritten before their list is dropped."""
    mv = memoryview(raw).cast("B")
    if any(c < 33 or c > 126 for c in mv):
        raise FormatError("invalid character in Bech32 string")
    upper = any(0x41 <= c <= 0x5A for c in mv)
    if upper and any(0x61 <= c <= 0x7A for c in mv):
        raise FormatError("mixed-case Bech32 string")
    pos = max((i for i, c in enumerate(mv) if c == 0x31), default=-1)  # the last "1"
    if pos < 1 or pos + 7 > len(mv):
        raise FormatError("malformed Bech32 string")
    hrp = bytes(mv[:pos]).decode("ascii").lower()
    values = [_VALUE.get(c | 0x20 if upper else c, -1) for c in mv[pos + 1 :]]
    try:
        if -1 in values:
            raise FormatError("invalid character in Bech32 string")
        if _polymod(_hrp_expand(hrp) + values) != 1:
            raise FormatError("invalid Bech32 checksum")
        return hrp, _bits_to_bytes(values[:-6])
    finally:
        values[:] = [0] * len(values)


def _bits_to_bytes(values: list[int]) -> bytearray:
    """5-bit groups to bytes (no padding allowed beyond the last byte), into a bytearray."""
    out = bytearray(len(values) * 5 // 8)
    acc = bits = k = 0
    for v in values:
        acc = ((acc << 5) | v) & 0x1FFF  # at most 12 bits are ever pending
        bits += 5
        if bits >= 8:
            bits -= 8
            out[k] = (acc >> bits) & 0xFF
            k += 1
    if bits >= 5 or (acc << (8 - bits)) & 0xFF:
        raise FormatError("invalid Bech32 padding")
    return out
