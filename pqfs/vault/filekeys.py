"""File keys that the vault's identity derives instead of drawing them at random (FORMAT.md
§2.2), so that its holder opens such an object without a KEM decapsulation: deriving the key
and checking the header MAC with it take ~10 us, the ML-KEM-768 + X25519 unwrap ~116 us, held
under the GIL (a library scan opens thousands of files). The object stays an ordinary age file:
its stanzas wrap the same key, and any age tool opens it with the identity.

Invariants (kept here):
  * a derived key is used to read only once the object's header MAC verifies with it; else the
    caller unwraps a stanza, as for any age file (objects written by a writer key, shares,
    rekeyed copies, imports: their keys are random or another object's);
  * the secret is derived from the identity (HKDF, its own `info`), never stored, and wiped
    with the identity (`wipe`); whoever holds the identity can unwrap every file key anyway,
    so deriving them gives nobody more than the identity already gives;
  * object ids are random (128 bits) and never reused, so no two objects get the same key.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pqfs.errors import HeaderMacError, Locked
from pqfs.format.header import Header
from pqfs.format.keys import FILE_KEY_SIZE, HybridIdentity
from pqfs.runtime.memory import wipe

SECRET_INFO = b"pqfs.v2 file keys"  # the identity's derived secret (HybridIdentity.derive_secret)
KEY_INFO = b"pqfs.v2 file key\x00"  # + the object id: one object's file key


class DerivedKeys:
    """The file keys of one hybrid identity's objects."""

    def __init__(self, identity: HybridIdentity) -> None:
        self.identity = identity
        self._secret = identity.derive_secret(SECRET_INFO)
        self.wiped = False

    def for_object(self, object_id: str) -> bytearray:
        """The file key of an object (the caller wipes it); Locked once wiped, also when the
        wipe came while it was being derived (a key from a half-wiped secret is never given)."""
        if self.wiped:
            raise Locked("the vault is locked")
        out = bytearray(FILE_KEY_SIZE)
        info = KEY_INFO + object_id.encode("utf-8", "surrogateescape")
        HKDF(hashes.SHA256(), FILE_KEY_SIZE, salt=None, info=info).derive_into(self._secret, out)
        if self.wiped:
            wipe(out)
            raise Locked("the vault is locked")
        return out

    def opening(self, object_id: str, header: Header) -> bytearray | None:
        """The object's file key if it is the derived one (its header MAC verifies), else None."""
        fk = self.for_object(object_id)
        try:
            header.verify_mac(fk)
        except HeaderMacError:
            wipe(fk)
            return None
        return fk

    def wipe(self) -> None:
        self.wiped = True
        wipe(self._secret)
