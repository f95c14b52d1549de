"""Real FUSE mounts through the `pqfs` command: files, metadata, integrity, lock, lifecycle."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pqfs.format.stream import CT_CHUNK, ciphertext_size
from pqfs.storage import pagecache

from .conftest import (
    daemon_pid,
    foreground_mount,
    mount_stats,
    mount_type,
    mounted,
    notify_socket,
    run_pqfs,
    sha_file,
    stop_with_sigterm,
    wait_gone,
)

NAMES = {
    "movies/Big Buck Bunny (2008)/film.mkv": 3 * 1024 * 1024 + 123,
    "movies/naïve café.mp4": 65537,
    "music/album/01 - track.flac": 65536,
    "music/album/cover.jpg": 1,
    "empty.txt": 0,
    "deep/a/b/c/d/e/f.bin": 200_000,
}


@pytest.fixture
def library(tmp_path: Path, cli_env: dict[str, str]) -> tuple[Path, Path]:
    """A source tree and a vault holding it (under the vault path `lib`)."""
    src = tmp_path / "lib"
    rng = random.Random(3)
    for name, size in NAMES.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
        os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_000_000_000 + size))
    (src / "empty dir").mkdir()
    vault = tmp_path / "vault"
    run_pqfs("init", str(vault), env=cli_env)
    run_pqfs("add", str(vault), str(src), env=cli_env)
    return src, vault


def tamper_chunk(vault: Path, size: int, chunk: int) -> None:
    """Flip one bit inside chunk `chunk` of the vault's largest object (plaintext size `size`)."""
    obj = max((vault / "objects").rglob("*.age"), key=lambda p: p.stat().st_size)
    raw = bytearray(obj.read_bytes())
    payload = len(raw) - ciphertext_size(size)
    raw[payload + chunk * CT_CHUNK + 77] ^= 0x04
    obj.write_bytes(raw)


# ------------------------------------------------------------------------ content ----


@pytest.mark.fuse
def test_files_metadata_and_browsing(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    src, vault = library
    with mounted(vault, tmp_path / "mnt", cli_env) as mp:
        root = mp / "lib"
        for name in NAMES:
            orig, seen = src / name, root / name
            assert sha_file(seen) == sha_file(orig), name
            st, so = seen.stat(), orig.stat()
            assert st.st_size == so.st_size
            assert st.st_mtime_ns == so.st_mtime_ns
            assert st.st_uid == os.getuid()
            assert not os.access(seen, os.X_OK) or os.getuid() == 0
        assert sorted(os.listdir(root)) == sorted(os.listdir(src))
        assert (root / "empty dir").is_dir() and os.listdir(root / "empty dir") == []
        found = subprocess.run(
            ["find", str(root)], capture_output=True, text=True, check=True
        ).stdout.split("\n")
        expect = {str(root / p.relative_to(src)) for p in src.rglob("*")} | {str(root)}
        assert set(filter(None, found)) == expect
        ls = subprocess.run(
            ["ls", "-l", str(root / "movies")], capture_output=True, text=True, check=True
        ).stdout
        assert "naïve café.mp4" in ls and " 65537 " in ls
        out = subprocess.run(
            ["stat", "-c", "%s %F", str(root / "empty.txt")], capture_output=True, text=True
        )
        assert out.stdout.strip() == "0 regular empty file"
        # Seeks: arbitrary preads equal the original's bytes.
        first = next(iter(NAMES))
        data = (src / first).read_bytes()
        fd = os.open(root / first, os.O_RDONLY)
        try:
            rng = random.Random(5)
            for _ in range(50):
                off, n = rng.randrange(len(data)), rng.randrange(1, 400_000)
                assert os.pread(fd, n, off) == data[off : off + n]
        finally:
            os.close(fd)


@pytest.mark.fuse
def test_writes_get_erofs_on_a_read_only_mount(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    _, vault = library
    with mounted(vault, tmp_path / "mnt", cli_env, "--read-only") as mp:
        root = mp / "lib"
        attempts = [
            lambda: os.open(root / "new.txt", os.O_WRONLY | os.O_CREAT),
            lambda: os.open(root / "empty.txt", os.O_WRONLY | os.O_APPEND),
            lambda: os.open(root / "empty.txt", os.O_RDWR),
            lambda: os.mkdir(root / "d"),
            lambda: os.remove(root / "empty.txt"),
            lambda: os.rename(root / "empty.txt", root / "e.txt"),
            lambda: os.truncate(root / "empty.txt", 5),
            lambda: os.symlink("x", root / "link"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS
        assert (root / "empty.txt").stat().st_size == 0


@pytest.mark.fuse
def test_tampered_chunk_is_eio_and_mount_stays_up(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    src, vault = library
    name = "movies/Big Buck Bunny (2008)/film.mkv"
    tamper_chunk(vault, NAMES[name], 20)
    log = tmp_path / "pqfs.log"
    with mounted(vault, tmp_path / "mnt", cli_env, "--log-file", str(log)) as mp:
        data = (src / name).read_bytes()
        fd = os.open(mp / "lib" / name, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.pread(fd, 4096, 20 * 65536 + 1000)
            assert exc.value.errno == errno.EIO
            assert os.pread(fd, 65536, 0) == data[:65536]  # before the bad chunk
            assert os.pread(fd, 65536, 30 * 65536) == data[30 * 65536 : 31 * 65536]  # after
        finally:
            os.close(fd)
        with pytest.raises(OSError) as exc:
            (mp / "lib" / name).read_bytes()
        assert exc.value.errno == errno.EIO
        for other in NAMES:
            if other != name:
                assert sha_file(mp / "lib" / other) == sha_file(src / other)
        assert mount_stats(mp, cli_env)["auth_failures"] >= 1
    text = log.read_text()
    assert "film.mkv: chunk 20 failed authentication" in text
    assert cli_env["PQFS_PASSPHRASE"] not in text and "AGE-SECRET-KEY" not in text.upper()


# ------------------------------------------------------------------------ lock ----


@pytest.mark.parametrize("args", [[], ["--page-cache"]], ids=["default", "page-cache"])
@pytest.mark.fuse
def test_lock_then_unlock(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str], args: list[str]
) -> None:
    src, vault = library
    name = "deep/a/b/c/d/e/f.bin"
    with mounted(vault, tmp_path / "mnt", cli_env, *args) as mp:
        f = mp / "lib" / name
        assert f.read_bytes() == (src / name).read_bytes()
        before = mount_stats(mp, cli_env)
        assert before["key_entries"] == 1 and before["cache_bytes"] > 0

        out = run_pqfs("lock", str(mp), env=cli_env)
        assert b"locked" in out.stderr
        after = mount_stats(mp, cli_env)
        assert after["locked"] is True
        assert after["key_entries"] == 0 and after["cache_bytes"] == 0
        with pytest.raises(PermissionError):
            f.read_bytes()  # not from the kernel's page cache either
        time.sleep(1.1)  # the kernel's name cache expires (attr_timeout)
        with pytest.raises(PermissionError):
            os.listdir(mp / "lib")

        bad = dict(cli_env, PQFS_PASSPHRASE="not the passphrase")
        proc = run_pqfs("unlock", str(mp), env=bad, check=False)
        assert (
            proc.returncode == 1 and proc.stderr.decode().strip() == "pqfs: error: wrong passphrase"
        )
        with pytest.raises(PermissionError):
            f.read_bytes()

        run_pqfs("unlock", str(mp), env=cli_env)
        assert f.read_bytes() == (src / name).read_bytes()
        assert mount_stats(mp, cli_env)["locked"] is False


@pytest.mark.fuse
def test_by_default_plaintext_stays_out_of_the_kernel_page_cache(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """By default (--direct-io) reads bypass the kernel's page cache (plaintext lives only in
    pqfs's own wiped cache): after a read, no page of the file is cached; MAP_SHARED mmap is
    then refused (ENODEV, as documented) and MAP_PRIVATE works; the kernel refuses it without
    asking the daemon, so the log says at mount time that shared maps need --page-cache. With
    --page-cache the kernel caches pages, and both kinds of mmap work."""
    src, vault = library
    name = "movies/Big Buck Bunny (2008)/film.mkv"
    want = (src / name).read_bytes()
    for args in (["--page-cache"], [], ["--direct-io"]):
        log = tmp_path / f"pqfs{len(args)}{''.join(args)}.log"
        with mounted(vault, tmp_path / "mnt", cli_env, "--log-file", str(log), *args) as mp:
            fd = os.open(mp / "lib" / name, os.O_RDONLY)
            try:
                assert os.pread(fd, len(want) + 1, 0) == want
                cached = pagecache.cached_pages(fd, 0, 0)
                assert cached is not None
                with mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) as m:  # MAP_PRIVATE
                    assert m[:] == want
                if args == ["--page-cache"]:
                    assert cached >= len(want) // mmap.PAGESIZE
                    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:  # MAP_SHARED
                        assert m[:] == want
                else:
                    assert cached == 0
                    with pytest.raises(OSError) as e:
                        mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                    assert e.value.errno == errno.ENODEV
            finally:
                os.close(fd)
        hint = [line for line in log.read_text().splitlines() if "ENODEV" in line]
        if args == ["--page-cache"]:
            assert hint == []
        else:
            assert len(hint) == 1 and "mount with --page-cache" in hint[0], hint


@pytest.mark.fuse
def test_idle_poll_waits_for_the_next_request_and_can_be_turned_off(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """The loop polls, instead of sleeping, for a moment after each answer (idlepoll.py): reads
    from two threads at once then find it polling (the other thread's request is often queued
    already), and their bytes are right. With --idle-poll 0 it never polls. The poll is the
    longest the option allows (10 ms), so that a busy machine's slow readers still hit it."""
    src, vault = library
    name = "movies/Big Buck Bunny (2008)/film.mkv"
    want = (src / name).read_bytes()
    rng = random.Random(9)
    offsets = [rng.randrange(len(want)) for _ in range(200)]

    def read_all(fd: int, part: list[int]) -> None:
        for off in part:
            assert os.pread(fd, 4096, off) == want[off : off + 4096]

    for args in (["--idle-poll", "10000"], ["--idle-poll", "0"]):
        with mounted(vault, tmp_path / "mnt", cli_env, *args) as mp:
            fd = os.open(mp / "lib" / name, os.O_RDONLY | os.O_DIRECT)  # every read reaches us
            try:
                with ThreadPoolExecutor(2) as pool:
                    for done in [pool.submit(read_all, fd, offsets[k::2]) for k in (0, 1)]:
                        done.result()
            finally:
                os.close(fd)
            s = mount_stats(mp, cli_env)
            if args[1] == "0":
                assert s["idle_polls"] == s["idle_poll_hits"] == 0
                assert s["idle_poll_ms"] == 0
            else:
                assert s["idle_polls"] >= 1 and s["idle_poll_hits"] >= 1, s


@pytest.mark.fuse
def test_stall_detail_is_opt_in_and_shown_by_stats(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """--stall-detail adds the loop thread's sleeps, preemptions and page faults in the longest
    stall to `pqfs stats` (JSON and text); without it neither shows them."""
    src, vault = library
    name = "movies/Big Buck Bunny (2008)/film.mkv"
    for args in ([], ["--stall-detail"]):
        with mounted(vault, tmp_path / "mnt", cli_env, *args) as mp:
            assert (mp / "lib" / name).read_bytes() == (src / name).read_bytes()
            s = mount_stats(mp, cli_env)
            text = run_pqfs("stats", str(mp), env=cli_env).stdout.decode()
            keys = [
                "stall_detail_sleeps",
                "stall_detail_preemptions",
                "stall_detail_faults",
                "stall_detail_own_max_ms",
            ]
            if args:
                assert all(isinstance(s[k], int | float) and s[k] >= 0 for k in keys), s
                assert 0 < s["stall_detail_own_max_ms"] <= s["loop_stall_max_ms"]
                for label in (
                    "sleeps in it:",
                    "preemptions in it:",
                    "page faults in it:",
                    "without host steal:",
                ):
                    assert label in text, text
            else:
                assert not any(k in s for k in keys), s
                assert "sleeps in it" not in text


# ------------------------------------------------------------------------ lifecycle ----


@pytest.mark.fuse
def test_sigterm_unmounts_cleanly(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    _, vault = library
    mp = tmp_path / "mnt"
    with mounted(vault, mp, cli_env):
        pid = daemon_pid(mp)
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
        assert mount_type(mp) is None
        assert os.listdir(mp) == []


@pytest.mark.fuse
def test_kill9_leaves_stale_mount_that_umount_clears(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    _, vault = library
    mp = tmp_path / "mnt"
    with mounted(vault, mp, cli_env):
        pid = daemon_pid(mp)
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        with pytest.raises(OSError) as exc:
            os.stat(mp)
        assert exc.value.errno == errno.ENOTCONN
        proc = run_pqfs("mount", str(vault), str(mp), env=cli_env, check=False)
        assert proc.returncode == 1
        assert f"run: pqfs umount {mp}" in proc.stderr.decode()
        out = run_pqfs("umount", str(mp), env=cli_env)
        assert b"cleared stale mount" in out.stderr
        assert mount_type(mp) is None
    with mounted(vault, mp, cli_env):  # and it mounts again
        assert (mp / "lib" / "empty.txt").stat().st_size == 0


def test_command_errors_are_one_line(
    tmp_path: Path, library: tuple[Path, Path], cli_env: dict[str, str]
) -> None:
    _, vault = library
    cases = [
        (["umount", str(tmp_path)], "is not mounted"),
        (["stats", str(tmp_path)], "is not a pqfs mount"),
        (["lock", str(tmp_path)], "is not a pqfs mount"),
        (["mount", str(vault), str(tmp_path / "missing")], "No such file or directory"),
        (["mount", str(vault), str(tmp_path / "lib" / "empty.txt")], "is not a directory"),
        (["mount", str(tmp_path / "novault"), str(tmp_path)], "novault"),
        (["mount", str(vault), str(tmp_path), "--cache-size", "lots"], "not a size"),
        (["mount", str(vault), str(tmp_path), "--key-ttl", "-1"], "must not be negative"),
        (["mount", str(vault), str(tmp_path), "--idle-poll", "-5"], "between 0 and 10000"),
        (["mount", str(vault), str(tmp_path), "--idle-poll", "20000"], "between 0 and 10000"),
        (["mount", str(vault), str(tmp_path), "--idle-poll", "0.5"], "whole number"),
        (["mount", str(vault), str(tmp_path), "--page-cache", "--direct-io"], "not allowed with"),
    ]
    for argv, msg in cases:
        proc = run_pqfs(*argv, env=cli_env, check=False)
        err = proc.stderr.decode()
        assert proc.returncode in (1, 2), argv
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    bad = dict(cli_env, PQFS_PASSPHRASE="wrong")
    proc = run_pqfs("mount", str(vault), str(tmp_path / "lib" / "empty dir"), env=bad, check=False)
    assert proc.returncode == 1 and proc.stderr.decode() == "pqfs: error: wrong passphrase\n"
    assert mount_type(tmp_path / "lib" / "empty dir") is None


@pytest.mark.fuse
def test_readiness_is_notified_only_once_the_mount_answers(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    _, vault = library
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = dict(cli_env, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    with (
        notify_socket(tmp_path / "notify.sock") as sock,
        foreground_mount(["mount", "-f", str(vault), str(mp)], env, mp) as proc,
    ):
        msg = sock.recv(4096).decode()
        # At the moment READY=1 arrives, the mount already answers stat and lookups.
        st = os.stat(mp)
        assert "READY=1" in msg.splitlines()
        assert mount_type(mp) == "fuse.pqfs"
        assert st.st_dev != os.stat(tmp_path).st_dev
        assert (mp / "lib" / "empty.txt").exists()
        stop_with_sigterm(proc, sock, mp)


@pytest.mark.fuse
def test_unlock_with_an_identity_file(
    library: tuple[Path, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    src, vault = library
    key = tmp_path / "vault.key"
    run_pqfs("identity", str(vault), "-o", str(key), env=cli_env)
    other = tmp_path / "other.key"
    run_pqfs("keygen", "-o", str(other), env=cli_env)
    with mounted(vault, tmp_path / "mnt", cli_env, "--identity", str(key)) as mp:
        f = mp / "lib" / "music" / "album" / "cover.jpg"
        assert f.read_bytes() == (src / "music" / "album" / "cover.jpg").read_bytes()
        run_pqfs("lock", str(mp), env=cli_env)
        with pytest.raises(PermissionError):
            f.read_bytes()
        proc = run_pqfs("unlock", str(mp), "--identity", str(other), env=cli_env, check=False)
        assert proc.returncode == 1
        assert "holds no identity of this vault" in proc.stderr.decode()
        run_pqfs("unlock", str(mp), "--identity", str(key), env=cli_env)
        assert f.read_bytes() == (src / "music" / "album" / "cover.jpg").read_bytes()


@pytest.mark.fuse
def test_copies_read_in_the_largest_requests_the_mount_takes(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A film's st_blksize is max_read (1 MiB): `cp` then asks for 1 MiB a request, not 128
    KiB; a small file keeps 128 KiB (what a buffered reader reads at each seek)."""
    src = tmp_path / "film.mkv"
    src.write_bytes(os.urandom(8 << 20))
    vault = tmp_path / "vault"
    run_pqfs("init", str(vault), env=cli_env)
    run_pqfs("add", str(vault), str(src), "film.mkv", env=cli_env)
    small = tmp_path / "song.flac"
    small.write_bytes(b"x" * 1000)
    run_pqfs("add", str(vault), str(small), "song.flac", env=cli_env)
    with mounted(vault, tmp_path / "mnt", cli_env, "--large-blksize-from", "8M") as mp:
        assert (mp / "film.mkv").stat().st_blksize == 1 << 20
        assert (mp / "song.flac").stat().st_blksize == 128 << 10
        before = mount_stats(mp, cli_env)
        subprocess.run(["cp", str(mp / "film.mkv"), str(tmp_path / "copy.mkv")], check=True)
        after = mount_stats(mp, cli_env)
    assert sha_file(tmp_path / "copy.mkv") == sha_file(src)
    reads = after["reads"] - before["reads"]
    assert after["bytes_read"] - before["bytes_read"] == 8 << 20
    assert reads <= 10, reads  # 8 of 1 MiB (and the read that finds the end); 64 at 128 KiB
    assert after["decrypted_per_byte_read"] is not None
