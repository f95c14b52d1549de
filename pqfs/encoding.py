"""Text encodings used by age: canonical unpadded base64 and Bech32 (BIP 173, no length limit).

These are encodings, not cryptographic primitives; the age spec pins their exact rules
(canonical base64 only, Bech32 all-lower or all-upper with the checksum over the lower case).
"""

from __future__ import annotations

import base64
import binascii

from .errors import FormatError


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def b64decode(text: str | bytes, what: str = "base64 value") -> bytes:
    """Decode unpadded base64, rejecting padding, stray characters and non-canonical encodings."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    if not raw.isascii() or any(c not in _B64_ALPHABET for c in raw) or len(raw) % 4 == 1:
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
    if text.lower() != text and text.upper() != text:
        raise FormatError("mixed-case Bech32 string")
    if any(ord(c) < 33 or ord(c) > 126 for c in text):
        raise FormatError("invalid character in Bech32 string")
    s = text.lower()
    pos = s.rfind("1")
    if pos < 1 or pos + 7 > len(s):
        raise FormatError("malformed Bech32 string")
    hrp = s[:pos]
    try:
        values = [_CHARSET.index(c) for c in s[pos + 1 :]]
    except ValueError:
        raise FormatError("invalid character in Bech32 string") from None
    if _polymod(_hrp_expand(hrp) + values) != 1:
        raise FormatError("invalid Bech32 checksum")
    return hrp, bytes(_convertbits(values[:-6], 5, 8, False))
