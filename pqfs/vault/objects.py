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
from pqfs.format.keys import Recipient, new_file_key, wrap_all
from pqfs.format.stream import (
    CT_CHUNK,
    NONCE_SIZE,
    TAG,
    decrypt_chunk_into,
    encrypt_chunk_into,
    payload_aead,
)
from pqfs.runtime.files import fd_pwriter, preadfull, start_writeback
from pqfs.runtime.memory import wipe
from pqfs.storage.base import ObjectSource, PartWriter, Storage
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
    in_place: bool = False,
) -> tuple[str, Header, int]:
    """Encrypt a stream into a new content object, to the vault's recipients and `recipients`;
    returns (object id, header, size). Without `durable` the caller makes the batch durable
    (storage.make_durable) before a catalog segment names the object. `in_place`: written
    straight under its key (Storage.writer's `fresh`; FORMAT.md §3), for a caller whose
    objects are small and many (the mount's commit of a copy of small files), where a
    crash may then leave a cut object that gc removes past its grace; else it appears only
    whole (a `pqfs add` killed mid-file leaves nothing to see)."""
    object_id = os.urandom(16).hex()
    fk = v.new_file_key(object_id)  # derived where the identity is held (FORMAT.md §2.2)
    try:
        with v.storage.writer(
            object_key(object_id), exclusive=True, durable=durable, fresh=in_place
        ) as f:
            pw = fd_pwriter(f.fileno(), write_behind=True) if hasattr(f, "fileno") else None
            header, size = encrypt_stream(
                src, f.write, [*v.recipients, *recipients], progress, pwrite=pw, file_key=fk
            )
    finally:
        if fk is not None:
            wipe(fk)  # (encrypt_stream wipes it too, once it has used it)
    return object_id, header, size


class CannotStream(VaultError):
    """The store takes no writes at any offset (S3): an OpenObject cannot be made there."""


# A stream's ciphertext goes to the disk in steps this large (OpenObject.write_behind, one
# thread hop each, awaited by the writer: a copy then goes no faster than the disk takes it).
STREAM_WRITE_BEHIND = 8 << 20


class OpenObject:
    """A new content object written chunk by chunk while its plaintext is still being produced
    (a file written in order through the mount: mount/staging.py), then finished.

    Invariants (kept here): a chunk is encrypted at most once under the object's key (a second
    encryption of another plaintext under its nonce would give away the XOR of the two), so
    `put` refuses an index it has seen, and whoever wants to change a chunk put already makes a
    new object; the last chunk (its nonce's flag) is put only by `finish`. Every chunk's
    ciphertext sits at its final offset in a local file (`fd`), which is what reads it back
    (`get_into`): on a local store the object's temp file itself, reopened read-write; on a
    store sent in parts (S3) an unnamed file in `mirror_dir`, from which each whole part goes
    out as soon as it is written (`send_parts`, on a thread) and the first part, which holds
    the header and the chunks a muxer patches at the end, goes last (`finish`). Nothing is
    visible under the object's key before `finish`; a crash leaves a temp file or an upload
    that gc removes past its grace (FORMAT.md §3)."""

    def __init__(self, v: VaultLike, mirror_dir: str | None = None) -> None:
        self.object_id = os.urandom(16).hex()
        fk = v.new_file_key(self.object_id)  # derived where the identity is held (§2.2)
        if fk is None:
            fk = new_file_key()
        try:
            self.header = Header.build(wrap_all(fk, v.recipients), fk)
            nonce = os.urandom(NONCE_SIZE)
            self._aead = payload_aead(fk, nonce)
        finally:
            wipe(fk)
        head = self.header.encode() + nonce
        self.payload = len(head)
        self.put_chunks: set[int] = set()
        self._ct = bytearray(CT_CHUNK)
        self._low = -1  # the first chunk put() put: the ones before it go at finish
        self._high = 0  # chunks [_low, _high) put in order by put() (the stream's front)
        self._cm: contextlib.AbstractContextManager[BinaryIO] | None = None
        self.parts: PartWriter | None = None
        self._next_part = 2  # the next part send_parts sends (the first goes at finish)
        self._written_back = 0  # where write_behind got to (a local store)
        self.fd = -1
        self._open = True  # neither finished nor given up
        key = object_key(self.object_id)
        self.parts = v.storage.part_writer(key, exclusive=True)
        if self.parts is not None:
            if mirror_dir is None:
                raise CannotStream("a store written in parts needs a local directory")
            if self.parts.part_size < self.payload + CT_CHUNK:
                raise CannotStream("parts too small for the header")
            self.fd = os.open(mirror_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        else:
            self._cm = v.storage.writer(key, exclusive=True, durable=False)
            f = self._cm.__enter__()
            try:
                if not hasattr(f, "fileno"):
                    raise CannotStream("this store takes no positional writes")
                # Its own descriptor, readable too (the writer's is write-only): the same
                # file, opened again through /proc, so what was put reads back even once the
                # writer's temp name is gone.
                self.fd = os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDWR | os.O_CLOEXEC)
            except BaseException as e:
                self._cm.__exit__(type(e), e, e.__traceback__)
                raise
        try:
            fd_pwriter(self.fd)(head, 0)
        except BaseException as e:
            self._exit(e)
            self._close_fd()
            raise

    def put(self, index: int, plaintext: memoryview | bytes | bytearray) -> None:
        """Chunk `index` (a full chunk that is not the last), encrypted at its offset. One
        caller at a time (the mount's loop, under the file's lock)."""
        self._encrypt_at(index, plaintext, last=False)
        self._high = max(self._high, index + 1)
        if self._low < 0:
            self._low = index

    def _encrypt_at(self, index: int, pt: memoryview | bytes | bytearray, last: bool) -> None:
        """Chunk `index` encrypted at its final offset, once (the class's invariant)."""
        if index in self.put_chunks:
            raise VaultError(f"chunk {index} of a new object put twice (a nonce would repeat)")
        self.put_chunks.add(index)
        ct = memoryview(self._ct)
        n = encrypt_chunk_into(self._aead, index, last, memoryview(pt), ct)
        fd_pwriter(self.fd)(ct[:n], self.payload + index * CT_CHUNK)

    def parts_ready(self) -> bool:
        """Whether a part is written whole and not sent yet (send_parts has work): one that
        begins past the chunks before the first put (those go at finish, and so does the
        part holding any of them)."""
        p = self.parts
        if p is None or self._low < 0:
            return False
        n = self._next_part
        return n * p.part_size <= self._front() and (n - 1) * p.part_size >= self._start()

    def behind(self) -> bool:
        """Whether write_behind has work: on a local store, at least STREAM_WRITE_BEHIND bytes
        put in order since it last ran."""
        if self.parts is not None or self._low < 0:
            return False
        return self._front() - max(self._written_back, self._start()) >= STREAM_WRITE_BEHIND

    def write_behind(self) -> None:
        """On a thread: start sending to the disk what the stream put since the last call
        (files.start_writeback: the commit's make_durable then waits for the last few MiB,
        not for the whole file)."""
        start, end = max(self._written_back, self._start()), self._front()
        if end > start:
            start_writeback(self.fd, start, end - start)
            self._written_back = end

    def _start(self) -> int:
        return self.payload + self._low * CT_CHUNK

    def _front(self) -> int:
        return self.payload + self._high * CT_CHUNK

    def send_parts(self) -> None:
        """On a thread: send every part written whole so far (but the first), in order; waits
        while the store has too many in flight (the writer's backpressure)."""
        p = self.parts
        assert p is not None
        while self._open and self.parts_ready():
            n = self._next_part
            p.put_part(n, os.pread(self.fd, p.part_size, (n - 1) * p.part_size))
            self._next_part = n + 1

    def get_into(self, index: int, out: memoryview) -> int:
        """Chunk `index` as put (authenticated) into `out`; its length. Any thread."""
        ct = bytearray(CT_CHUNK)
        n = preadfull(self.fd, memoryview(ct), self.payload + index * CT_CHUNK)
        return decrypt_chunk_into(self._aead, index, False, memoryview(ct)[:n], out)

    def finish(
        self, chunks: Sequence[tuple[int, memoryview | bytes | bytearray]], size: int
    ) -> None:
        """Put the remaining `chunks` (index, plaintext), the last of them the final one, and
        make the object visible under its key (not durable on a local store: the caller's
        make_durable). A failure leaves the object unfinished for good (what was put still
        reads back until close)."""
        assert self._open
        last = chunks[-1][0] if chunks else -1
        if not chunks or size != last * (CT_CHUNK - TAG) + len(chunks[-1][1]) or size < 0:
            raise VaultError("an object is finished with its last chunk")
        try:
            for index, pt in chunks:
                self._encrypt_at(index, pt, last=index == last)
            total = self.payload + last * CT_CHUNK + len(chunks[-1][1]) + TAG
            os.ftruncate(self.fd, total)  # (nothing past the last chunk)
            if self.parts is not None:
                self._send_rest(self.parts, total)
        except BaseException as e:
            self._exit(e)
            raise
        self._open = False
        if self._cm is not None:
            self._cm.__exit__(None, None, None)

    def _send_rest(self, p: PartWriter, total: int) -> None:
        """The parts not sent yet, the first one last, then the upload completed (one PUT
        for an object that fits in a part and sent none)."""
        ps = p.part_size
        if self._next_part == 2 and total <= ps:
            p.write(os.pread(self.fd, total, 0))
        else:
            for n in range(self._next_part, -(-total // ps) + 1):
                p.put_part(n, os.pread(self.fd, ps, (n - 1) * ps))
            p.put_part(1, os.pread(self.fd, ps, 0))
        p.finish()

    def abort(self) -> None:
        """Give the object up (its temp file removed, its upload aborted); reading what was
        put still works until close()."""
        if self._open:
            self._exit(VaultError("aborted"))

    def _exit(self, e: BaseException) -> None:
        self._open = False
        if self._cm is not None:
            with contextlib.suppress(BaseException):
                self._cm.__exit__(type(e), e, e.__traceback__)
        if self.parts is not None:
            with contextlib.suppress(Exception):  # (gc aborts it past its grace otherwise)
                self.parts.abort()

    def close(self) -> None:
        """abort() if not finished, and let go of the local file (on a thread: closing the
        last descriptor of a removed large file frees its blocks there and then, and an
        abort is a request)."""
        self.abort()
        self._close_fd()
        self._aead = None  # type: ignore[assignment]  # OpenSSL clears its context when freed

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
