"""Whole age files: encrypt a stream to recipients, and read any age file at random offsets.

`AgeReader` is the random-access reader the vault builds on: it authenticates the final chunk on
open (so the plaintext size is trusted), then maps any (offset, length) to the chunks covering
it; the mount decrypts through `decrypt_chunks` and `decrypt_read_chunks`. `decrypt_stream` is
the sequential reader with age's streaming semantics (the authenticated prefix is released, then
the error), kept as the reference the conformance tests check the others against (test_vectors,
test_properties).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Protocol

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pqfs.errors import FormatError, PayloadError, PqfsError
from pqfs.format.header import MAX_HEADER, Header, TruncatedHeader, parse_header
from pqfs.format.keys import Identity, Recipient, new_file_key, unwrap, wrap_all
from pqfs.format.stream import (
    CHUNK,
    CT_CHUNK,
    NONCE_SIZE,
    TAG,
    chunk_count,
    ciphertext_span,
    decrypt_chunk_into,
    decrypt_read_chunks,
    encrypt_chunk_into,
    payload_aead,
    plaintext_size,
)
from pqfs.runtime import pools
from pqfs.runtime.files import preadfull
from pqfs.runtime.memory import scratch, wipe


class RangeSource(Protocol):
    """Random access to the bytes of one age file (a local file, an S3 object, bytes in
    memory): all that reading the format needs. Where the bytes are stored, and the faster
    ways a mount reads them, are the storage layer's (storage/base.ObjectSource)."""

    size: int

    def preadinto(self, offset: int, buf: memoryview) -> int: ...

    def will_need(self, offset: int, length: int) -> None:
        """A hint that [offset, offset+length) will be read soon (start fetching, don't wait)."""

    def close(self) -> None: ...


class BytesSource:
    """An age file held in memory (a catalog segment, a test's object)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def preadinto(self, offset: int, buf: memoryview) -> int:
        part = self.data[offset : offset + len(buf)]
        buf[: len(part)] = part
        return len(part)

    def will_need(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        pass


def pread(src: RangeSource, offset: int, length: int) -> bytes:
    buf = bytearray(max(0, min(length, src.size - offset)))
    n = src.preadinto(offset, memoryview(buf))
    return bytes(buf[:n])


def read_header(src: RangeSource, hint: int = 4096) -> Header:
    """Parse the header at the start of `src`, reading more only if the first read ends inside it."""
    want = hint
    while True:
        data = pread(src, 0, want)
        try:
            return parse_header(data)
        except TruncatedHeader:
            if len(data) < want or want >= MAX_HEADER:
                raise FormatError("age header is truncated") from None
            want *= 4


def decrypt_chunks(
    aead: ChaCha20Poly1305,
    src: RangeSource,
    payload_start: int,
    chunks: int,
    first: int,
    outs: Sequence[memoryview],
    *,
    ct_buf: memoryview | None = None,
) -> list[int]:
    """Decrypt chunks first, first+1, ... of a payload of `chunks` chunks, chunk k into outs[k]
    (each at least CHUNK long); returns the plaintext length of each.

    One backend read covers them all. If any chunk fails, every output written so far is wiped
    before PayloadError propagates, so no caller ever sees unauthenticated or partial plaintext.
    """
    count = len(outs)
    if count == 0:
        return []
    ct_len = ciphertext_span(payload_start, src.size, chunks, first, count)
    ct_start = payload_start + first * CT_CHUNK
    if ct_buf is None or len(ct_buf) < ct_len:
        ct_buf = scratch(ct_len)
    got = src.preadinto(ct_start, ct_buf[:ct_len])
    if got != ct_len:
        raise PayloadError(f"chunk {first} could not be read in full (truncated object)", first)
    return decrypt_read_chunks(aead, ct_buf[:ct_len], chunks, first, outs)


class AgeReader:
    """Random-access plaintext view of one age file. Thread-safe for concurrent reads."""

    def __init__(
        self,
        src: RangeSource,
        file_key: bytes | bytearray | None = None,
        identities: Sequence[Identity] = (),
        header: Header | None = None,
    ) -> None:
        self.src = src
        self.header = header if header is not None else read_header(src)
        own_key = file_key is None
        if file_key is None:
            file_key = unwrap(self.header, identities)
        else:
            self.header.verify_mac(file_key)
        try:
            self._open_payload(src, file_key)
        finally:
            if own_key and isinstance(file_key, bytearray):
                wipe(file_key)  # unwrapped here: the payload AEAD holds the only key now

    def _open_payload(self, src: RangeSource, file_key: bytes | bytearray) -> None:
        hlen = self.header.length
        if src.size < hlen + NONCE_SIZE:
            raise FormatError("payload nonce is missing (truncated file)")
        nonce = pread(src, hlen, NONCE_SIZE)
        self.aead = payload_aead(file_key, nonce)
        self.payload_start = hlen + NONCE_SIZE
        self.size = plaintext_size(src.size - self.payload_start)
        self.chunks = chunk_count(self.size)
        # Authenticate the final chunk now: only then is `size` (from the object size) trusted.
        last = bytearray(CHUNK)
        try:
            self.read_chunks_into(self.chunks - 1, 1, memoryview(last))
        finally:
            wipe(last)

    def read_chunks_into(
        self, first: int, count: int, out: memoryview, ct_buf: memoryview | None = None
    ) -> int:
        """Decrypt chunks [first, first+count) into `out`; returns plaintext bytes written.

        One backend read covers all the chunks. On a failed chunk, everything this call wrote
        into `out` is wiped before PayloadError propagates.
        """
        n = max(0, min(first + count, self.chunks) - max(first, 0))
        outs = [out[k * CHUNK : (k + 1) * CHUNK] for k in range(n)]
        return sum(
            decrypt_chunks(
                self.aead, self.src, self.payload_start, self.chunks, first, outs, ct_buf=ct_buf
            )
        )

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes [offset, offset+length), clipped to the file size."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        first, last = offset // CHUNK, (end - 1) // CHUNK
        buf = bytearray((last - first + 1) * CHUNK)
        try:
            self.read_chunks_into(first, last - first + 1, memoryview(buf))
            return bytes(buf[offset - first * CHUNK : end - first * CHUNK])
        finally:
            wipe(buf)

    def iter_range(self, offset: int, length: int) -> Iterator[memoryview]:
        """Yield the plaintext of [offset, offset+length) in order, decrypted in parallel batches.
        Each yielded view is valid only until the next one is requested."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(self.size, offset + length)
        if offset >= end:
            return
        first, last = offset // CHUNK, (end - 1) // CHUNK
        batch = pools.BATCH
        pt_pool = pools.BufferPool(batch * CHUNK, pools.DEPTH + 2)
        ct_pool = pools.BufferPool(batch * CT_CHUNK, pools.DEPTH + 2)

        def job(start: int, count: int) -> Callable[[], tuple[int, bytearray, int]]:
            def run() -> tuple[int, bytearray, int]:
                pt, ct = pt_pool.get(), ct_pool.get()
                try:
                    n = self.read_chunks_into(start, count, memoryview(pt), memoryview(ct))
                except BaseException:
                    pt_pool.put(pt)
                    raise
                finally:
                    ct_pool.put(ct, dirty=False)
                return start, pt, n

            return run

        jobs = (job(s, min(batch, last + 1 - s)) for s in range(first, last + 1, batch))
        try:
            for start, pt, n in pools.ordered(jobs):
                base = start * CHUNK
                lo = max(offset, base) - base
                hi = min(end, base + n) - base
                try:
                    yield memoryview(pt)[lo:hi]
                finally:
                    pt_pool.put(pt)
        finally:
            pt_pool.close()
            ct_pool.close()


def open_age(src: RangeSource, identities: Sequence[Identity]) -> AgeReader:
    return AgeReader(src, identities=identities)


# ------------------------------------------------------------------------- encryption ----


def _readfull(f: BinaryIO, buf: memoryview) -> int:
    total = 0
    while total < len(buf):
        n = f.readinto(buf[total:])  # type: ignore[attr-defined]
        if not n:
            break
        total += n
    return total


def encrypt_stream(
    src: BinaryIO,
    write: Callable[[memoryview | bytes], object],
    recipients: Sequence[Recipient],
    progress: Callable[[int], None] | None = None,
    file_key: bytearray | None = None,
    pwrite: Callable[[memoryview | bytes, int], None] | None = None,
) -> tuple[Header, int]:
    """Encrypt all of `src` as one age file, in constant memory; returns (header, plaintext size).

    Reads one batch ahead so the final chunk (nonce flag 0x01) is known when it is encrypted.
    With `pwrite(data, offset)` (a sink with positional writes: a local file, a multipart
    upload), each worker writes its own batch at its final offset, so the sink's work runs in
    parallel too; otherwise `write` receives the batches in order.
    """
    if not recipients:
        raise FormatError("no recipients to encrypt to")
    fk = file_key if file_key is not None else new_file_key()
    try:
        header = Header.build(wrap_all(fk, recipients), fk)
        nonce = os.urandom(NONCE_SIZE)
        aead = payload_aead(fk, nonce)
    finally:
        wipe(fk)
    head = header.encode() + nonce
    if pwrite is not None:
        pwrite(head, 0)
    else:
        write(head)
    base = len(head)

    positional = _positional(src)
    batch = pools.BATCH
    if positional is not None:
        # A small file gets buffers of its own size, not a batch's 2 MiB: they are wiped at the
        # end, and wiping 4 MiB for a 4 KiB file cost more than encrypting it.
        batch = max(1, min(batch, -(-positional[2] // CHUNK)))
    pt_pool = pools.BufferPool(batch * CHUNK, pools.DEPTH + 3)
    ct_pool = pools.BufferPool(batch * CT_CHUNK, pools.DEPTH + 3)
    total = 0

    def job(
        first: int, pt: bytearray | None, n: int, final: bool, src_off: int = 0
    ) -> Callable[[], tuple[bytearray, int, int]]:
        def run() -> tuple[bytearray, int, int]:
            if pt is None:  # positional source: this worker reads its own batch
                buf = pt_pool.get()
                assert positional is not None
                got = positional[0](memoryview(buf)[:n], src_off)
                if got != n:
                    pt_pool.put(buf, dirty=False)
                    raise PqfsError("the source file shrank while it was being encrypted")
            else:
                buf = pt
            ct = ct_pool.get()
            out = memoryview(ct)
            src_mv = memoryview(buf)
            count = chunk_count(n) if final else n // CHUNK
            pos = 0
            for k in range(count):
                lo = k * CHUNK
                hi = min(n, lo + CHUNK)
                pos += encrypt_chunk_into(
                    aead, first + k, final and k == count - 1, src_mv[lo:hi], out[pos:]
                )
            # Not wiped per batch: the input is the caller's plaintext and the buffer is overwritten
            # by the next batch; the pool wipes every buffer when it closes.
            pt_pool.put(buf, dirty=False)
            if pwrite is not None:
                pwrite(out[:pos], base + first * CT_CHUNK)
            return ct, pos, n

        return run

    def positional_jobs() -> Iterator[Callable[[], tuple[bytearray, int, int]]]:
        # A regular file's size is known, so the final batch is known without reading ahead and
        # every worker can read, encrypt and write its batch independently.
        assert positional is not None
        _read, start, size, _fd = positional
        span = batch * CHUNK
        batches = max(1, -(-size // span))
        for b in range(batches):
            off = b * span
            yield job(b * batch, None, min(span, size - off), b == batches - 1, start + off)

    def jobs() -> Iterator[Callable[[], tuple[bytearray, int, int]]]:
        nonlocal total
        index = 0
        cur = pt_pool.get()
        n = _readfull(src, memoryview(cur))
        while True:
            if n < len(cur):  # short read: end of input, this batch holds the final chunk
                total += n
                yield job(index, cur, n, True)
                return
            nxt = pt_pool.get()
            m = _readfull(src, memoryview(nxt))
            total += n
            if m == 0:
                pt_pool.put(nxt, dirty=False)
                yield job(index, cur, n, True)
                return
            yield job(index, cur, n, False)
            index += n // CHUNK
            cur, n = nxt, m

    source = positional_jobs() if positional else jobs()
    # One batch (every file up to 2 MiB): run here, not on the pool, saving two thread hops.
    single = positional is not None and positional[2] <= batch * CHUNK
    try:
        for ct, length, plain in (j() for j in source) if single else pools.ordered(source):
            if pwrite is None:
                write(memoryview(ct)[:length])
            ct_pool.put(ct, dirty=False)
            if progress is not None:
                progress(plain)
    finally:
        pt_pool.close()
        ct_pool.close()
    if positional is not None:
        _read, start, size, fd = positional
        # A file's size was taken from fstat: what lies past it must be the end of the file.
        if fd is not None and (
            os.fstat(fd).st_size != start + size or os.pread(fd, 1, start + size)
        ):
            raise PqfsError("the source file changed size while it was being encrypted")
        total = size
    return header, total


ReadAt = Callable[[memoryview, int], int]  # (buffer, offset) -> bytes read into it


def _positional(src: BinaryIO) -> tuple[ReadAt, int, int, int | None] | None:
    """(read_at, start offset, bytes to read, fd or None) when `src` can be read at any offset
    and its size is known: a regular file (_regular_file), or an object with `size` and
    `read_at(buf, offset)` (staged content: mount/staging.py), which encrypt_stream's
    workers then read in parallel, each its own batch. Else None."""
    read_at = getattr(src, "read_at", None)
    if read_at is not None:
        return read_at, 0, int(src.size), None  # type: ignore[attr-defined]
    reg = _regular_file(src)
    if reg is None:
        return None
    fd, start, size = reg

    def from_file(buf: memoryview, offset: int) -> int:
        return preadfull(fd, buf, offset)

    return from_file, start, size, fd


def _regular_file(src: BinaryIO) -> tuple[int, int, int] | None:
    """(fd, start offset, bytes to read) when `src` is a regular file whose size can be
    trusted, else None (then it is read sequentially, to EOF). A size of 0 is not trusted:
    /proc and other pseudo-files report 0 and still hold bytes (an empty file reads the same
    either way)."""
    try:
        fd = src.fileno()
        st = os.fstat(fd)
        start = src.tell()
    except (AttributeError, OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    return fd, start, max(0, st.st_size - start)


def decrypt_stream(
    src: BinaryIO, identities: Sequence[Identity], write: Callable[[bytes], object]
) -> int:
    """Sequentially decrypt an age file of unknown origin (age's own semantics): each chunk is
    released once authenticated; a missing final chunk or trailing data is a PayloadError after
    the valid prefix. Returns the plaintext size."""
    data = b""
    header: Header | None = None
    while header is None:
        more = src.read(4096)
        data += more
        try:
            header = parse_header(data)
        except TruncatedHeader:
            if not more:
                raise FormatError("age header is truncated") from None
    fk = unwrap(header, identities)
    try:
        buf = data[header.length :]
        while len(buf) < NONCE_SIZE:
            more = src.read(NONCE_SIZE - len(buf))
            if not more:
                raise FormatError("payload nonce is missing (truncated file)")
            buf += more
        aead = payload_aead(fk, buf[:NONCE_SIZE])
    finally:
        wipe(fk)
    buf = buf[NONCE_SIZE:]
    out = bytearray(CHUNK)
    index = total = 0

    def take(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            more = src.read(n - len(buf))
            if not more:
                break
            buf += more
        got, buf = buf[:n], buf[n:]
        return got

    try:
        while True:
            ct = take(CT_CHUNK)
            if not ct:
                raise PayloadError("payload ended without a final chunk (truncated)", index)
            if len(ct) < TAG:
                raise PayloadError(f"chunk {index} is truncated", index)
            last = len(ct) < CT_CHUNK
            try:
                n = decrypt_chunk_into(aead, index, last, ct, memoryview(out))
            except PayloadError:
                if last:
                    raise
                # A full chunk may be the final one: age tries the final flag second.
                last = True
                n = decrypt_chunk_into(aead, index, last, ct, memoryview(out))
            write(bytes(out[:n]))
            total += n
            index += 1
            if last:
                if take(1):
                    raise PayloadError("trailing data after the final chunk", index)
                return total
    finally:
        wipe(out)
