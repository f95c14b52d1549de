"""What a mount says when something is wrong, through real mounts: a failed start names its
cause; a damaged object is EIO at open with one log line naming the file; a locked vault is
EACCES for every read; df shows real sizes."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pqfs.errors import VaultError
from pqfs.format.stream import CHUNK, CT_CHUNK
from pqfs.mount.daemon import _describe
from pqfs.vault.objects import object_key
from pqfs.vault.vault import Vault

from .conftest import PASSPHRASE, mount_stats, mount_type, mounted, run_pqfs

MiB = 1 << 20


def _make_vault(tmp_path: Path, env: dict[str, str], files: dict[str, int], *init: str) -> Path:
    """A vault holding `files` (name -> size, random bytes) under the vault path `lib`."""
    src = tmp_path / "lib"
    src.mkdir()
    rng = random.Random(15)
    for name, size in files.items():
        (src / name).write_bytes(rng.randbytes(size))
    vault = tmp_path / "vault"
    run_pqfs("init", str(vault), *init, env=env)
    run_pqfs("add", str(vault), str(src), env=env)
    return vault


def _object(vault: Path, path: str) -> tuple[Path, Any]:
    """The object file of a vault path, and its catalog entry."""
    v = Vault.open(str(vault))
    v.unlock(bytearray(PASSPHRASE))
    e = v.entry(path)
    return vault / object_key(e.object), e


def _log_lines(log: Path, needle: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if needle in line]


# ------------------------------------------------------------------------ failed start ----


@pytest.mark.fuse
def test_a_failed_start_names_the_cause_as_ls_does(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A damaged catalog segment: `pqfs ls` names it; a mount, in the background (the waiting
    parent and the daemon's log) and in the foreground, says the same, not "ExceptionGroup"."""
    vault = _make_vault(tmp_path, cli_env, {"a.bin": 100})
    seg = sorted((vault / "catalog").iterdir())[-1]
    raw = bytearray(seg.read_bytes())
    raw[raw.index(b"\n--- ") + 6] ^= 0x01  # the header's MAC (a stanza changed would be a
    seg.write_bytes(raw)  # segment for other keys: ignored, and a rollback on this host)
    ls = run_pqfs("ls", str(vault), env=cli_env, check=False)
    assert ls.returncode == 1
    line = ls.stderr.decode()
    assert line.startswith("pqfs: error: catalog segment") and line.count("\n") == 1, line
    cause = line.removeprefix("pqfs: error: ").strip()

    mp = tmp_path / "mnt"
    mp.mkdir()
    log = tmp_path / "pqfs.log"
    proc = run_pqfs("mount", str(vault), str(mp), "--log-file", str(log), env=cli_env, check=False)
    assert (proc.returncode, proc.stderr.decode()) == (1, line)
    assert mount_type(mp) is None
    lines = _log_lines(log, "mount failed")
    assert len(lines) == 1 and lines[0].endswith(f"ERROR: mount failed: {cause}"), lines
    assert "ExceptionGroup" not in log.read_text()

    fg = subprocess.run(
        [sys.executable, "-m", "pqfs", "mount", "-f", str(vault), str(mp)],
        env=cli_env,
        capture_output=True,
        timeout=300,
    )
    assert fg.returncode == 1
    assert fg.stderr.decode().splitlines()[-1] == line.strip()
    assert "ExceptionGroup" not in fg.stderr.decode() and "Traceback" not in fg.stderr.decode()
    assert mount_type(mp) is None


def test_describe_unwraps_exception_groups() -> None:
    """The line for a failed start: a single cause however deeply trio's nurseries wrapped it,
    an OSError as the CLI words it (strerror and path), several causes each named."""
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [VaultError("catalog is bad")])])
    assert _describe(nested) == "catalog is bad"
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/srv/vault/objects")
    assert _describe(ExceptionGroup("g", [denied])) == "Permission denied: /srv/vault/objects"
    two = ExceptionGroup("g", [VaultError("first cause"), ExceptionGroup("h", [denied])])
    assert _describe(two) == (
        "mount failed: 2 errors: first cause; Permission denied: /srv/vault/objects"
    )


# ------------------------------------------------------------------------ damaged objects ----

SIZE = 3 * CHUNK + 1000  # four chunks


def _flip(path: Path, pos: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= mask
    path.write_bytes(raw)


def _damage_stanza(obj: Path, kind: bytes) -> None:
    """Change one base64 character in the middle of the body of the stanza of type `kind`
    (to another base64 character: the header still parses)."""
    raw = bytearray(obj.read_bytes())
    pos = raw.index(b"\n", raw.index(b"\n-> " + kind + b" ") + 1) + 21
    raw[pos] = ord("B") if raw[pos] == ord("A") else ord("A")
    obj.write_bytes(raw)


def _damage(vault: Path, how: str, path: str) -> str:
    """Damage the object of `path` in one way; the reason its open must log."""
    obj, e = _object(vault, path)
    raw = obj.read_bytes()
    payload = e.hlen + 16
    if how == "header does not parse":
        _flip(obj, 0, 0x02)  # "age-encryption.org/v1" -> "cge-..."
        return "damaged header: not an age file (bad version line)"
    if how == "no stanza opens":
        _damage_stanza(obj, b"mlkem768x25519")
        _damage_stanza(obj, b"X25519")
        return "damaged header: no stanza opens with the vault identity"
    if how == "bad header MAC":  # the X25519 stanza damaged: the other one opens, the MAC fails
        _damage_stanza(obj, b"X25519")
        return "damaged header: header MAC does not verify (header modified)"
    if how == "not the catalog's object":
        other, _ = _object(vault, "lib/intact.bin")
        obj.write_bytes(other.read_bytes())
        return "content object does not match the catalog (swapped or replaced)"
    if how == "missing":
        obj.unlink()
        return "content object is missing"
    if how == "truncated":
        obj.write_bytes(raw[:-1000])
        return f"damaged payload: object is {len(raw) - 1000} bytes, the catalog's size needs"
    if how == "bytes appended":
        obj.write_bytes(raw + b"\0" * 100)
        return f"damaged payload: object is {len(raw) + 100} bytes, the catalog's size needs"
    assert how == "final chunk fails"
    _flip(obj, payload + 3 * CT_CHUNK + 500)
    return "damaged payload: chunk 3 failed authentication"


DAMAGE = [
    "header does not parse",
    "no stanza opens",
    "bad header MAC",
    "not the catalog's object",
    "missing",
    "truncated",
    "bytes appended",
    "final chunk fails",
]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.fuse
def test_a_damaged_object_fails_to_open_with_eio_and_one_log_line(
    tmp_path: Path, cli_env: dict[str, str], how: str
) -> None:
    """Each way an object can be damaged is EIO at open (EACCES would say "locked"), with one
    log line naming the file and what is wrong; the mount serves the other files meanwhile.
    An object with bytes appended, or whose final chunk fails, fails at open (FORMAT.md §2.1):
    none of its first chunks is served."""
    vault = _make_vault(tmp_path, cli_env, {"film.mkv": SIZE, "intact.bin": SIZE}, "--classic")
    intact = (tmp_path / "lib" / "intact.bin").read_bytes()
    reason = _damage(vault, how, "lib/film.mkv")
    log = tmp_path / "pqfs.log"
    with mounted(vault, tmp_path / "mnt", cli_env, "--log-file", str(log)) as mp:
        with pytest.raises(OSError) as exc:
            os.open(mp / "lib" / "film.mkv", os.O_RDONLY)
        assert exc.value.errno == errno.EIO, exc.value
        assert (mp / "lib" / "intact.bin").read_bytes() == intact
        assert mount_stats(mp, cli_env)["open_files"] == 0
    lines = _log_lines(log, "film.mkv")
    assert len(lines) == 1, lines
    assert f"ERROR: lib/film.mkv: cannot open (EIO): {reason}" in lines[0], lines
    assert not _log_lines(log, "intact.bin")
    text = log.read_text()
    assert cli_env["PQFS_PASSPHRASE"] not in text and "AGE-SECRET-KEY" not in text.upper()


@pytest.mark.fuse
def test_final_chunk_is_authenticated_at_open_and_kept_for_the_tail_reader(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """An intact file's open authenticates its final chunk and keeps it decrypted: a tag
    reader's read of the end right after the open is a cache hit."""
    vault = _make_vault(tmp_path, cli_env, {"film.mkv": 40 * CHUNK + 123})
    data = (tmp_path / "lib" / "film.mkv").read_bytes()
    with mounted(vault, tmp_path / "mnt", cli_env) as mp:
        before = mount_stats(mp, cli_env)
        with open(mp / "lib" / "film.mkv", "rb") as f:
            f.seek(len(data) - 100)
            assert f.read() == data[-100:]
        after = mount_stats(mp, cli_env)
        assert after["cache_hits"] - before["cache_hits"] == 1
        assert after["cache_misses"] == before["cache_misses"]


# ------------------------------------------------------------------------ S3 ----


@pytest.mark.fuse
def test_s3_open_checks_the_final_chunk_alongside_the_opening_get(
    s3: Any, s3_bucket: str, cli_env: dict[str, str], fault_proxy: Any, tmp_path: Path
) -> None:
    """On S3 the final chunk's GET goes out with the opening one (the catalog gives its
    place): with every response held back `latency` seconds, open + first read + a read of
    the end take one round trip, not two, in two GETs. An object with bytes appended in the
    bucket fails at open (EIO, logged)."""
    env = {**cli_env, **s3.env()}
    src = tmp_path / "lib"
    src.mkdir()
    rng = random.Random(7)
    big = rng.randbytes(8 * MiB + 77)
    (src / "big.bin").write_bytes(big)
    (src / "extended.bin").write_bytes(rng.randbytes(2 * MiB + 5))
    loc = f"s3://{s3_bucket}/v"
    run_pqfs("init", loc, env=env)
    run_pqfs("add", loc, str(src), env=env)
    client = s3.client()
    objects = client.list_objects_v2(Bucket=s3_bucket, Prefix="v/objects/")["Contents"]
    ext = next(o for o in objects if o["Size"] < 4 * MiB)["Key"]
    body = client.get_object(Bucket=s3_bucket, Key=ext)["Body"].read()
    client.put_object(Bucket=s3_bucket, Key=ext, Body=body + b"\0" * 100)

    log = tmp_path / "pqfs.log"
    proxied = {**env, **s3.env(fault_proxy.endpoint)}
    with mounted(loc, tmp_path / "mnt", proxied, "--log-file", str(log)) as mp:
        start = mount_stats(mp, env)["s3_gets"]
        with pytest.raises(OSError) as exc:
            os.open(mp / "lib" / "extended.bin", os.O_RDONLY)
        assert exc.value.errno == errno.EIO
        # The open failed on the opening GET's size; the tail's GET, sent alongside, may still
        # be on its way (GETs are counted as they complete): let it land before counting.
        deadline = time.monotonic() + 60
        while mount_stats(mp, env)["s3_gets"] - start < 2:
            assert time.monotonic() < deadline, "the failed open's two GETs never completed"
            time.sleep(0.05)
        latency = 5.0  # against the loop's own time on a busy machine: a second trip is 5 s more
        fault_proxy.latency = latency
        before = mount_stats(mp, env)
        t0 = time.monotonic()
        with open(mp / "lib" / "big.bin", "rb") as f:
            assert f.read(65536) == big[:65536]
            f.seek(len(big) - 50)  # inside the final chunk (77 bytes)
            assert f.read() == big[-50:]
        took = time.monotonic() - t0
        fault_proxy.latency = 0.0
        after = mount_stats(mp, env)
        assert after["s3_gets"] - before["s3_gets"] == 2  # the opening GET and the tail's
        assert latency <= took < 2 * latency - 0.5, took
        # a remote store: free is the write cache's room (never 0, so df is not "100 % full";
        # tests/test_write_faults.py checks its value)
        st = os.statvfs(mp)
        assert st.f_bavail > 0 and st.f_files - st.f_ffree == 4
    lines = _log_lines(log, "lib/extended.bin")
    assert len(lines) == 1 and "cannot open (EIO): damaged payload" in lines[0], lines
    assert "(extended)" in lines[0]


# ------------------------------------------------------------------------ lock ----


@pytest.mark.parametrize("args", [[], ["--page-cache"]], ids=["default", "page-cache"])
@pytest.mark.fuse
def test_a_locked_mount_is_eacces_for_every_read(
    tmp_path: Path, cli_env: dict[str, str], args: list[str]
) -> None:
    """After `pqfs lock`, mid-stream (readahead in flight or done), every read of a file
    already open is EACCES, as is every new open: the errno the README documents. After
    unlock the same open file reads on (a player can carry on, or re-open)."""
    size = 24 * MiB + 5
    vault = _make_vault(tmp_path, cli_env, {"film.mkv": size, "other.bin": 3 * CHUNK})
    data = (tmp_path / "lib" / "film.mkv").read_bytes()
    with mounted(vault, tmp_path / "mnt", cli_env, *args) as mp:
        film = mp / "lib" / "film.mkv"
        fd = os.open(film, os.O_RDONLY)
        try:
            pos = 0
            while pos < 4 * MiB:  # sequential: the mount and the kernel read ahead
                block = os.read(fd, 256 << 10)
                assert block == data[pos : pos + len(block)]
                pos += len(block)
            run_pqfs("lock", str(mp), env=cli_env)
            for off in (pos, pos + (64 << 10), 0, 12 * MiB, size - 10):
                with pytest.raises(OSError) as exc:
                    os.pread(fd, 128 << 10, off)
                assert exc.value.errno == errno.EACCES, off
            with pytest.raises(OSError) as exc:
                os.read(fd, 256 << 10)
            assert exc.value.errno == errno.EACCES
            for name in ("film.mkv", "other.bin"):
                with pytest.raises(OSError) as exc:
                    os.open(mp / "lib" / name, os.O_RDONLY)
                assert exc.value.errno == errno.EACCES
            run_pqfs("unlock", str(mp), env=cli_env)
            assert os.pread(fd, 128 << 10, pos) == data[pos : pos + (128 << 10)]
        finally:
            os.close(fd)


# ------------------------------------------------------------------------ statfs ----


@pytest.mark.fuse
def test_statfs_reports_the_tree_and_the_free_room_of_the_store(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """df of a local vault's mount: used = the tree's files, free = the vault file system's
    free room (not 0: "100 % full"), inodes used = the tree's entries. Locked: still free
    room, no files."""
    sizes = {"a.bin": 3 * MiB + 1, "b.bin": 4097, "c.bin": 0}
    vault = _make_vault(tmp_path, cli_env, sizes)
    with mounted(vault, tmp_path / "mnt", cli_env) as mp:
        st, store = os.statvfs(mp), os.statvfs(vault)
        assert st.f_bfree > 0 and st.f_bavail > 0
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        assert used == sum(-(-n // 4096) * 4096 for n in sizes.values())
        free, store_free = st.f_bavail * st.f_frsize, store.f_bavail * store.f_frsize
        assert abs(free - store_free) <= max(store_free // 20, 256 * MiB), (free, store_free)
        assert st.f_files - st.f_ffree == 2 + len(sizes)  # root, lib and the files
        df = subprocess.run(
            ["df", "--output=pcent,used", str(mp)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert df[2] != "100%", df
        run_pqfs("lock", str(mp), env=cli_env)
        st = os.statvfs(mp)
        assert st.f_bavail > 0 and st.f_files - st.f_ffree == 0 and st.f_blocks == st.f_bfree
