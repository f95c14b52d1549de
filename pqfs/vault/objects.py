"""Content objects (docs/FORMAT.md §3): one age file per vault file, stored under a random id
and bound to its catalog entry by its header's length and MAC, so that a swapped or replaced
object is refused before a byte of it is used.

What makes, copies and opens one; the vault (vault.py), its maintenance and the mount build
on these. Nothing here reads the catalog: a caller passes the entry.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO, Protocol

from pqfs.errors import PayloadError, VaultError
from pqfs.format.agefile import AgeReader, RangeSource, encrypt_stream, read_header
from pqfs.format.encoding import b64encode
from pqfs.format.header import Header
from pqfs.format.keys import Recipient
from pqfs.runtime.files import fd_pwriter
from pqfs.runtime.memory import wipe
from pqfs.storage.base import ObjectSource, Storage
from pqfs.vault.schema import Entry

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

OBJECTS = "objects/"


class VaultLike(Protocol):
    """What the object operations need of a Vault (vault.py imports this module, not the
    reverse): where objects live, whom they are encrypted to, and the key of an entry."""

    @property
    def storage(self) -> Storage: ...

    @property
    def recipients(self) -> Sequence[Recipient]: ...

    def entry(self, path: str) -> Entry: ...

    def file_key(self, e: Entry, header: Header) -> bytearray: ...

    def new_file_key(self, object_id: str) -> bytearray | None: ...


def object_key(object_id: str) -> str:
    return f"{OBJECTS}{object_id[:2]}/{object_id}.age"


def write_object(
    v: VaultLike,
    src: BinaryIO,
    recipients: Sequence[Recipient] = (),
    progress: Callable[[int], None] | None = None,
    durable: bool = True,
) -> tuple[str, Header, int]:
    """Encrypt a stream into a new content object, to the vault's recipients and `recipients`;
    returns (object id, header, size). Without `durable` the caller makes the batch durable
    (storage.make_durable) before a catalog segment names the object."""
    object_id = os.urandom(16).hex()
    fk = v.new_file_key(object_id)  # derived where the identity is held (FORMAT.md §2.2)
    try:
        with v.storage.writer(object_key(object_id), exclusive=True, durable=durable) as f:
            pw = fd_pwriter(f.fileno()) if hasattr(f, "fileno") else None
            header, size = encrypt_stream(
                src, f.write, [*v.recipients, *recipients], progress, pwrite=pw, file_key=fk
            )
    finally:
        if fk is not None:
            wipe(fk)  # (encrypt_stream wipes it too, once it has used it)
    return object_id, header, size


class PlaintextStream(io.RawIOBase):
    """An AgeReader's plaintext as a stream (to encrypt it again: unshare --reencrypt); every
    chunk authenticated before a byte of it is returned."""

    def __init__(self, reader: AgeReader) -> None:
        super().__init__()
        self._pieces = reader.iter_range(0, reader.size)
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        out = memoryview(b).cast("B")
        while not self._left:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._left = piece
        n = min(len(out), len(self._left))
        out[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def copy_rewrapped(
    storage: Storage,
    src: RangeSource,
    header: Header,
    fk: bytearray,
    extra: Sequence[Recipient],
) -> tuple[str, Header]:
    """A new object: the header with stanzas for `extra` added (new MAC), then the payload
    copied byte for byte. The payload is not re-encrypted; the old object is untouched."""
    new = Header.build(list(header.stanzas) + [r.wrap(fk) for r in extra], fk)
    object_id = os.urandom(16).hex()
    buf = bytearray(4 << 20)
    mv = memoryview(buf)
    with storage.writer(object_key(object_id), exclusive=True) as f:
        f.write(new.encode())
        pos = header.length
        while pos < src.size:
            n = src.preadinto(pos, mv[: min(len(buf), src.size - pos)])
            if n <= 0:
                raise PayloadError("object shrank while copying")
            f.write(mv[:n])
            pos += n
    return object_id, new


def checked_header(e: Entry, src: RangeSource) -> Header:
    """The header of `e`'s object, VaultError unless it is the one the catalog names."""
    header = read_header(src, hint=max(e.hlen, 64))
    if header.length != e.hlen or b64encode(header.mac) != e.mac:
        raise VaultError(
            f"{e.path}: content object does not match the catalog (swapped or replaced)"
        )
    return header


@contextlib.contextmanager
def open_reader(v: VaultLike, path_or_entry: str | Entry) -> Iterator[AgeReader]:
    """A reader of a file's plaintext, checked against its entry; its object is closed when
    the block exits."""
    e = path_or_entry if isinstance(path_or_entry, Entry) else v.entry(path_or_entry)
    src, reader = open_checked(v, e)
    try:
        yield reader
    finally:
        src.close()


def open_checked(v: VaultLike, e: Entry) -> tuple[ObjectSource, AgeReader]:
    """The object of `e` and a reader of its plaintext, checked against the entry (FORMAT.md
    §4.1); the caller closes the source."""
    if e.type != "file":
        raise VaultError(f"is a directory: {e.path or '/'}")
    try:
        src = v.storage.open_source(object_key(e.object))
    except FileNotFoundError:
        raise VaultError(f"{e.path}: content object is missing") from None
    try:
        header = checked_header(e, src)
        cached = v.file_key(e, header)
        reader = AgeReader(src, file_key=cached, header=header)
        if reader.size != e.size:
            raise VaultError(f"{e.path}: content size does not match the catalog")
    except BaseException:
        src.close()
        raise
    return src, reader
