"""Writes when something fails: the vault's disk full, the write cache's disk full, the S3
server resetting connections and going away during commits. In every case the writer (or
`pqfs sync`) gets a clear error, the old version stays whole, nothing written is lost, and the
commit goes through once the cause is gone."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import mount_stats, mounted, run_pqfs
from tests.s3server import DROP_MODES
from tests.test_writes import vault_files, wait_for

pytestmark = pytest.mark.fuse


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a disk that fills up."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_vault_disk_full_keeps_the_data_and_commits_once_there_is_room(
    small_fs: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    vault = small_fs / "vault"
    run_pqfs("init", str(vault), env=cli_env)
    rng = random.Random(1)
    old = rng.randbytes(2 * 1024 * 1024)
    new = rng.randbytes(30 * 1024 * 1024)  # more than the disk holds
    with mounted(vault, tmp_path / "mnt", cli_env, "--commit-delay", "3600") as mp:
        (mp / "film.mkv").write_bytes(old)
        run_pqfs("sync", str(mp), env=cli_env)
        (mp / "film.mkv").write_bytes(new)
        proc = run_pqfs("sync", str(mp), env=cli_env, check=False)
        assert proc.returncode != 0
        err = proc.stderr.decode().strip()
        assert "could not commit film.mkv" in err and "No space left" in err
        assert len(err.splitlines()) == 1
        assert mount_stats(mp, cli_env)["commit_failures"] >= 1
        # the old version is what the vault holds; the new one is still served
        assert run_pqfs("cat", str(vault), "film.mkv", env=cli_env).stdout == old
        assert (mp / "film.mkv").read_bytes() == new
        # fsync says so too
        fd = os.open(mp / "film.mkv", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        # no leftover of the failed commits fills the disk: the one temp file is the new
        # version's stream (the file was written in order: the stream tier), which the disk
        # filling stopped, and which holds the part streamed until then
        assert len([p for p in (vault / "objects").rglob(".tmp-*")]) <= 1
        subprocess.run(["mount", "-o", "remount,size=128m", str(small_fs)], check=True)
        run_pqfs("sync", str(mp), env=cli_env)
        assert mount_stats(mp, cli_env)["pending_files"] == 0
        assert not [p for p in (vault / "objects").rglob(".tmp-*")]
    assert vault_files(vault, cli_env) == {"film.mkv": new}


def test_write_cache_disk_full_is_enospc_to_the_writer(
    small_fs: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    vault = tmp_path / "vault"
    run_pqfs("init", str(vault), env=cli_env)
    args = ("--write-cache", str(small_fs), "--write-cache-size", "1G", "--commit-delay", "3600")
    old = b"the old version"
    data = random.Random(3).randbytes(40 * 1024 * 1024)
    with mounted(vault, tmp_path / "mnt", cli_env, *args) as mp:
        (mp / "a.bin").write_bytes(old)
        run_pqfs("sync", str(mp), env=cli_env)
        # Rewritten in place, not O_TRUNC: a file written from nothing would stream into the
        # vault (the stream tier), past the write cache.
        fd = os.open(mp / "a.bin", os.O_WRONLY)
        written = 0
        with pytest.raises(OSError) as e:
            while written < len(data):
                written += os.write(fd, data[written : written + 1024 * 1024])
        os.close(fd)
        assert e.value.errno == errno.ENOSPC
        assert 0 < written < len(data)
        # The file holds what the writer was told it wrote (the failed write may have left
        # part of its bytes), whole up to there; the vault still the old version.
        got = (mp / "a.bin").read_bytes()
        assert written <= len(got) < written + 1024 * 1024
        assert got == data[: len(got)]
        assert run_pqfs("cat", str(vault), "a.bin", env=cli_env).stdout == old
        (mp / "b.bin").write_bytes(b"still writable")
        run_pqfs("sync", str(mp), env=cli_env)
    assert vault_files(vault, cli_env) == {"a.bin": got, "b.bin": b"still writable"}
    run_pqfs("verify", str(vault), env=cli_env)


def test_s3_faults_during_commits_are_retried(
    s3_bucket: str, seaweed: Any, fault_proxy: Any, s3: Any, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """Connections reset mid-request while files commit, then the server unreachable: commits
    retry, `pqfs sync` reports the outage, and once the server is back everything lands; no
    catalog entry ever names an object that is not there (verify)."""
    env = {**cli_env, **seaweed.env(), **s3.env(fault_proxy.endpoint)}
    loc = f"s3://{s3_bucket}/vault"
    run_pqfs("init", loc, env=env)
    rng = random.Random(2)
    files = {
        f"d/f{i}.bin": rng.randbytes(rng.choice((100, 70_000, 6 * 1024 * 1024))) for i in range(8)
    }
    args = ("--commit-delay", "0.2", "--timeout", "5")
    with mounted(loc, tmp_path / "mnt", env, *args) as mp:
        (mp / "d").mkdir()
        fault_proxy.drop_modes = DROP_MODES
        fault_proxy.drop_rate = 0.3
        for name, data in files.items():
            (mp / name).write_bytes(data)
        wait_for(lambda: mount_stats(mp, env)["pending_files"] == 0, "commits through faults")
        fault_proxy.drop_rate = 0.0
        fault_proxy.down = True
        (mp / "late.txt").write_bytes(b"written while the server is down")
        proc = run_pqfs("sync", str(mp), env=env, check=False)
        assert proc.returncode != 0 and "could not commit late.txt" in proc.stderr.decode()
        assert (mp / "late.txt").read_bytes() == b"written while the server is down"
        fault_proxy.down = False
        wait_for(lambda: run_pqfs("sync", str(mp), env=env, check=False).returncode == 0, "sync")
    env_direct = {**cli_env, **seaweed.env()}
    assert b"every chunk authentic" in run_pqfs("verify", loc, env=env_direct).stdout
    for name, data in {**files, "late.txt": b"written while the server is down"}.items():
        assert run_pqfs("cat", loc, name, env=env_direct).stdout == data


def test_s3_free_space_is_the_write_caches_room(
    s3_bucket: str, seaweed: Any, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """An S3 store has no free space to ask for: df of a writable mount shows what staging can
    take (Sonarr and Radarr check it before an import), a read-only one 1 PiB."""
    env = {**cli_env, **seaweed.env()}
    loc = f"s3://{s3_bucket}/vault"
    run_pqfs("init", loc, env=env)
    with mounted(loc, tmp_path / "mnt", env, "--write-cache-size", "100M") as mp:
        st = os.statvfs(mp)
        assert st.f_bavail * st.f_frsize == 100 * 1024 * 1024
    with mounted(loc, tmp_path / "mnt", env, "--read-only") as mp:
        st = os.statvfs(mp)
        assert st.f_bavail * st.f_frsize == 1 << 50
