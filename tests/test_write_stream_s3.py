"""The stream tier on S3 (SeaweedFS): a file written in order goes out as a multipart upload
while it is written, its first part (the header, the head a muxer patches) last; a change to
what was sent makes a fresh object and aborts the upload. Nothing readable is kept locally:
the ciphertext the upload is made of waits in the write cache, unnamed."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import mount_stats, mounted, run_pqfs
from tests.test_concurrent_writers import vault_files
from tests.test_writes import wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

MiB = 1 << 20


def _uploads(seaweed: Any, bucket: str) -> list[dict[str, Any]]:
    page = seaweed.client().list_multipart_uploads(Bucket=bucket)
    return list(page.get("Uploads", []))


def _parts(seaweed: Any, bucket: str, up: dict[str, Any]) -> int:
    c = seaweed.client()
    got = c.list_parts(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    return len(got.get("Parts", []))


def test_a_file_written_in_order_is_uploaded_as_it_is_written(
    s3_bucket: str, seaweed: Any, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    env = {**cli_env, **seaweed.env()}
    loc = f"s3://{s3_bucket}/vault"
    run_pqfs("init", loc, env=env)
    cache = tmp_path / "wcache"
    cache.mkdir()
    rng = random.Random(7)
    film = bytearray(rng.randbytes(30 * MiB + 5))
    other = bytearray(rng.randbytes(20 * MiB))
    marker = b"S3-STREAM-PLAINTEXT-MARKER"
    film[12 * MiB : 12 * MiB + len(marker)] = marker
    args = ("--commit-delay", "3600", "--write-cache", str(cache))
    with mounted(loc, tmp_path / "mnt", env, *args) as mp:
        fd = os.open(mp / "film.mkv", os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        for off in range(0, len(film), MiB):
            os.write(fd, film[off : off + MiB])
        # still open: parts 2 and 3 (8 MiB each) are sent (or on their way) already
        (up,) = _uploads(seaweed, s3_bucket)
        wait_for(lambda: _parts(seaweed, s3_bucket, up) >= 2, "parts 2 and 3 on the server")
        s = mount_stats(mp, env)
        assert s["staged_memory"] <= MiB
        assert 0 < s["staged_spill"] <= 32 * MiB  # the ciphertext the parts are cut from
        assert not list(cache.iterdir())  # in a file with no name
        os.pwrite(fd, b"SEEKHEAD", 40)  # a muxer patching its head at the end
        film[40:48] = b"SEEKHEAD"
        os.close(fd)
        # a second file changed where it was sent already: a fresh object, its upload aborted
        (mp / "other.mp4").write_bytes(other)
        fd = os.open(mp / "other.mp4", os.O_WRONLY)
        os.pwrite(fd, b"PATCH", 10 * MiB)
        other[10 * MiB : 10 * MiB + 5] = b"PATCH"
        os.close(fd)
        assert (mp / "film.mkv").read_bytes() == film
        assert (mp / "other.mp4").read_bytes() == other
        run_pqfs("sync", str(mp), env=env)
        s = mount_stats(mp, env)
        assert s["files_streamed"] == 1 and s["bytes_streamed"] >= 29 * MiB
        assert s["commit_failures"] == 0 and s["staged_spill"] == 0
        assert not _uploads(seaweed, s3_bucket)  # completed, and the given-up one aborted
        assert not list(cache.iterdir())
    assert vault_files(loc, env) == {"film.mkv": film, "other.mp4": other}
    run_pqfs("verify", loc, env=env)
