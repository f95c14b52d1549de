"""encrypt_stream's two input paths: positional (regular files, workers read their own batch)
and sequential (pipes, BytesIO); both must give age files that decrypt to the input."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from pqfs.format.agefile import AgeReader, BytesSource, decrypt_stream, encrypt_stream
from pqfs.format.keys import X25519Identity
from pqfs.format.stream import CHUNK
from pqfs.runtime import pools

BATCH = pools.BATCH
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, BATCH * CHUNK, BATCH * CHUNK + 1, 2 * BATCH * CHUNK]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("positional", [True, False])
def test_encrypt_round_trip(tmp_path: Path, size: int, positional: bool) -> None:
    ident = X25519Identity.generate()
    data = os.urandom(size)
    src_path = tmp_path / "src"
    src_path.write_bytes(b"skipped prefix" + data)
    out = io.BytesIO()
    with open(src_path, "rb") as f:
        f.seek(len(b"skipped prefix"))
        src = f if positional else io.BytesIO(f.read())
        _, total = encrypt_stream(src, out.write, [ident.recipient()])
    assert total == size
    blob = out.getvalue()
    plain: list[bytes] = []
    decrypt_stream(io.BytesIO(blob), [ident], plain.append)
    assert b"".join(plain) == data
    reader = AgeReader(BytesSource(blob), identities=[ident])
    assert reader.size == size and reader.read(0, size) == data


def test_positional_write_matches_sequential_write(tmp_path: Path) -> None:
    """The pwrite sink (workers write at their own offsets) yields a complete, valid file."""
    from pqfs.runtime.files import fd_pwriter

    ident = X25519Identity.generate()
    data = os.urandom(3 * BATCH * CHUNK + 12345)
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    src_path.write_bytes(data)
    with open(src_path, "rb") as f, open(dst_path, "wb") as out:
        encrypt_stream(f, out.write, [ident.recipient()], pwrite=fd_pwriter(out.fileno()))
    plain: list[bytes] = []
    with open(dst_path, "rb") as f:
        decrypt_stream(f, [ident], plain.append)
    assert b"".join(plain) == data
