"""Writes through a real FUSE mount of a local vault: POSIX semantics as programs use them,
when a write becomes part of the vault, and what staging leaves behind (nothing readable).

Each test checks the vault itself after the mount (`pqfs cat`, `ls`, `verify`, a remount),
not only what the mount answers: a write the mount shows but never commits is a failure.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pqfs.vault.vault import Vault
from tests.conftest import PASSPHRASE, daemon_pid, mount_stats, mounted, run_pqfs

pytestmark = pytest.mark.fuse

FAST = ("--commit-delay", "0.2")


@pytest.fixture
def vault_dir(tmp_path: Path, cli_env: dict[str, str]) -> Path:
    v = tmp_path / "vault"
    run_pqfs("init", str(v), env=cli_env)
    return v


def vault_files(v: Path, env: dict[str, str]) -> dict[str, bytes]:
    """Every file of the vault and its plaintext, read from the store (not the mount)."""
    vault = Vault.open(str(v))
    vault.unlock(PASSPHRASE)
    out = {}
    for e in vault.catalog().files():
        out[e.path] = run_pqfs("cat", str(v), e.path, env=env).stdout
    vault.lock()
    return out


def vault_dirs(v: Path) -> set[str]:
    vault = Vault.open(str(v))
    vault.unlock(PASSPHRASE)
    try:
        cat = vault.catalog()
        return {p for p, e in cat.entries.items() if e.type == "dir" and p}
    finally:
        vault.lock()


def wait_for(cond: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    AT_FDCWD = -100
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ------------------------------------------------------------------ semantics ----


def test_files_written_read_back_and_land_in_the_vault(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    rng = random.Random(1)
    small = rng.randbytes(3000)
    big = rng.randbytes(3 * 1024 * 1024 + 123)  # past the per-file memory: spilled
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        (mp / "small.txt").write_bytes(small)
        (mp / "dir" / "sub").mkdir(parents=True)
        (mp / "dir" / "sub" / "big.bin").write_bytes(big)
        (mp / "empty").write_bytes(b"")
        # read back at once, before any commit
        assert (mp / "small.txt").read_bytes() == small
        assert (mp / "dir" / "sub" / "big.bin").read_bytes() == big
        assert (mp / "dir" / "sub" / "big.bin").stat().st_size == len(big)
        assert (mp / "empty").stat().st_size == 0
        run_pqfs("sync", str(mp), env=cli_env)
        s = mount_stats(mp, cli_env)
        assert s["pending_files"] == 0 and s["files_committed"] == 3
        assert s["commit_failures"] == 0
        # committed: still the same through the mount
        assert (mp / "dir" / "sub" / "big.bin").read_bytes() == big
    assert vault_files(vault_dir, cli_env) == {
        "small.txt": small,
        "dir/sub/big.bin": big,
        "empty": b"",
    }
    run_pqfs("verify", str(vault_dir), env=cli_env)


def test_a_file_written_in_order_streams_into_the_vault_as_it_is_written(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """The stream tier: while a file written from nothing in order is still open, only its
    head and its last chunk are staged (the rest is already its new object's ciphertext); a
    header patch at the end costs nothing, and the commit finishes that object. A patch in the
    middle afterwards is staged over it, and the commit makes a fresh object."""
    rng = random.Random(5)
    film = bytearray(rng.randbytes(8 * 1024 * 1024 + 77))
    other = bytearray(rng.randbytes(6 * 1024 * 1024))
    with mounted(vault_dir, tmp_path / "mnt", cli_env, "--commit-delay", "3600") as mp:
        fd = os.open(mp / "film.mp4", os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        for off in range(0, len(film), 1 << 20):
            os.write(fd, film[off : off + (1 << 20)])
        s = mount_stats(mp, cli_env)
        assert s["staged_memory"] <= 1 << 20 and s["staged_spill"] == 0
        os.pwrite(fd, b"moov", 24)  # a muxer patching its header once the data is out
        film[24:28] = b"moov"
        os.close(fd)
        (mp / "other.mkv").write_bytes(other)
        fd = os.open(mp / "other.mkv", os.O_WRONLY)
        os.pwrite(fd, b"PATCHED", 5_000_000)  # (ffmpeg's +faststart moves everything)
        other[5_000_000:5_000_007] = b"PATCHED"
        os.close(fd)
        assert (mp / "film.mp4").read_bytes() == film
        assert (mp / "other.mkv").read_bytes() == other
        run_pqfs("sync", str(mp), env=cli_env)
        s = mount_stats(mp, cli_env)
        assert s["files_streamed"] == 1 and s["bytes_streamed"] >= 7 << 20
        assert s["files_committed"] == 2 and s["commit_failures"] == 0
        assert (mp / "film.mp4").read_bytes() == film
        # a streamed file deleted before its commit: its temp object goes (off the loop)
        (mp / "gone.bin").write_bytes(bytes(film[: 3 << 20]))
        assert list(vault_dir.rglob(".tmp-*"))
        (mp / "gone.bin").unlink()
        wait_for(lambda: not list(vault_dir.rglob(".tmp-*")), "the stream's temp file to go")
    assert vault_files(vault_dir, cli_env) == {"film.mp4": film, "other.mkv": other}
    assert not list(vault_dir.rglob(".tmp-*"))  # the stream given up was removed
    run_pqfs("verify", str(vault_dir), env=cli_env)


def test_overwrite_append_pwrite_truncate(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    rng = random.Random(2)
    base = rng.randbytes(300_000)
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        f = mp / "f.bin"
        f.write_bytes(base)
        run_pqfs("sync", str(mp), env=cli_env)
        expect = bytearray(base)
        # a patch inside a committed file (read-modify-write of its chunk)
        with open(f, "r+b") as h:
            h.seek(70_000)
            h.write(b"PATCH" * 10)
        expect[70_000:70_050] = b"PATCH" * 10
        with open(f, "ab") as h:  # append
            h.write(b"tail")
        expect += b"tail"
        assert f.read_bytes() == expect
        run_pqfs("sync", str(mp), env=cli_env)
        assert f.read_bytes() == expect
        # shrink, then grow: what was cut reads as zeros, never as the old bytes
        os.truncate(f, 100_000)
        os.truncate(f, 200_000)
        expect = expect[:100_000] + bytes(100_000)
        assert f.read_bytes() == expect
        # a write far past the end leaves a hole of zeros
        fd = os.open(f, os.O_WRONLY)
        os.pwrite(fd, b"X", 5_000_000)
        os.close(fd)
        expect += bytes(5_000_000 - len(expect)) + b"X"
        assert f.stat().st_size == len(expect)
        assert f.read_bytes() == expect
        # O_TRUNC: a new empty file
        with open(mp / "g.txt", "w") as h:
            h.write("first version, longer")
        with open(mp / "g.txt", "w") as h:
            h.write("second")
        assert (mp / "g.txt").read_text() == "second"
    got = vault_files(vault_dir, cli_env)
    assert got["f.bin"] == bytes(expect)
    assert got["g.txt"] == b"second"


def test_namespace_operations(vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        (mp / "a").mkdir()
        (mp / "a" / "one.txt").write_text("one")
        (mp / "a" / "two.txt").write_text("two")
        (mp / "b.txt").write_text("bee")
        run_pqfs("sync", str(mp), env=cli_env)
        # rename over an existing file replaces it atomically
        os.rename(mp / "b.txt", mp / "a" / "two.txt")
        assert (mp / "a" / "two.txt").read_text() == "bee"
        assert not (mp / "b.txt").exists()
        # RENAME_NOREPLACE refuses an existing target; RENAME_EXCHANGE is not supported
        (mp / "c.txt").write_text("sea")
        with pytest.raises(OSError) as e:
            renameat2(mp / "c.txt", mp / "a" / "one.txt", 1)
        assert e.value.errno == errno.EEXIST
        renameat2(mp / "c.txt", mp / "d.txt", 1)
        with pytest.raises(OSError) as e:
            renameat2(mp / "d.txt", mp / "a" / "one.txt", 2)
        assert e.value.errno == errno.EINVAL
        # a directory moves with what it holds, committed or not
        (mp / "a" / "new.txt").write_text("new")
        os.rename(mp / "a", mp / "z")
        assert sorted(os.listdir(mp / "z")) == ["new.txt", "one.txt", "two.txt"]
        with pytest.raises(OSError) as e:
            os.rename(mp / "z", mp / "z" / "inside")
        assert e.value.errno == errno.EINVAL
        # rmdir of a non-empty directory; rename of a directory over a non-empty one
        with pytest.raises(OSError) as e:
            os.rmdir(mp / "z")
        assert e.value.errno == errno.ENOTEMPTY
        (mp / "y").mkdir()
        with pytest.raises(OSError) as e:
            os.rename(mp / "y", mp / "z")
        assert e.value.errno == errno.ENOTEMPTY
        os.rmdir(mp / "y")
        # an empty directory stays, also once its last file is gone
        (mp / "keep" / "deep").mkdir(parents=True)
        (mp / "gone").mkdir()
        (mp / "gone" / "f").write_text("x")
        run_pqfs("sync", str(mp), env=cli_env)
        os.remove(mp / "gone" / "f")
        # what the vault cannot hold
        for attempt, code in [
            (lambda: os.link(mp / "d.txt", mp / "hard"), errno.EPERM),
            (lambda: os.symlink("d.txt", mp / "sym"), errno.EPERM),
            (lambda: os.mkfifo(mp / "fifo"), errno.EPERM),
            (lambda: os.chown(mp / "d.txt", 12345, -1), errno.EPERM),
        ]:
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == code
        os.chown(mp / "d.txt", os.getuid(), os.getgid())  # unchanged: allowed
        # chmod and utime are kept
        os.chmod(mp / "d.txt", 0o600)
        os.utime(mp / "d.txt", ns=(1_000_000_000, 1_234_567_890_123_456_789))
        os.chmod(mp / "keep", 0o750)
        before = {p: (p.stat().st_mode, p.stat().st_mtime_ns) for p in [mp / "d.txt", mp / "keep"]}
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        assert sorted(os.listdir(mp)) == ["d.txt", "gone", "keep", "z"]
        assert os.listdir(mp / "gone") == []
        assert os.listdir(mp / "keep") == ["deep"]
        assert sorted(os.listdir(mp / "z")) == ["new.txt", "one.txt", "two.txt"]
        assert (mp / "z" / "two.txt").read_text() == "bee"
        assert (mp / "d.txt").read_text() == "sea"
        after = {
            mp / n: ((mp / n).stat().st_mode, (mp / n).stat().st_mtime_ns)
            for n in ("d.txt", "keep")
        }
        assert list(after.values()) == list(before.values())
    assert {"gone", "keep", "keep/deep", "z"} <= vault_dirs(vault_dir)
    run_pqfs("verify", str(vault_dir), env=cli_env)


def test_inodes_stay_across_rename_and_commit(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        (mp / "d").mkdir()
        fd = os.open(mp / "d" / "f", os.O_CREAT | os.O_RDWR)
        os.write(fd, b"abc")
        ino = os.fstat(fd).st_ino
        os.fsync(fd)  # committed: a new object, the same inode
        assert os.fstat(fd).st_ino == ino
        os.rename(mp / "d", mp / "e")
        assert (mp / "e" / "f").stat().st_ino == ino
        os.write(fd, b"def")
        os.fsync(fd)
        assert (mp / "e" / "f").stat().st_ino == ino
        assert os.pread(fd, 10, 0) == b"abcdef"
        os.close(fd)
        dino = (mp / "e").stat().st_ino
        run_pqfs("sync", str(mp), env=cli_env)
        # a refresh of the catalog (nothing pending) keeps both
        time.sleep(0.1)
        assert (mp / "e").stat().st_ino == dino
        assert (mp / "e" / "f").stat().st_ino == ino


def test_unlinked_open_file_stays_readable_and_writable(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        (mp / "f").write_bytes(b"committed content")
        run_pqfs("sync", str(mp), env=cli_env)
        fd = os.open(mp / "f", os.O_RDWR)
        os.remove(mp / "f")
        assert not (mp / "f").exists()
        assert os.pread(fd, 100, 0) == b"committed content"
        os.pwrite(fd, b"C", 0)
        assert os.pread(fd, 100, 0) == b"Committed content"
        assert os.fstat(fd).st_size == 17
        os.close(fd)
        run_pqfs("sync", str(mp), env=cli_env)
        (mp / "f").write_bytes(b"again")
    assert vault_files(vault_dir, cli_env) == {"f": b"again"}


# ------------------------------------------------------------------ durability ----


def test_fsync_commits_before_it_returns(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    with mounted(vault_dir, tmp_path / "mnt", cli_env, "--commit-delay", "3600") as mp:
        fd = os.open(mp / "log.txt", os.O_CREAT | os.O_WRONLY)
        os.write(fd, b"line 1\n")
        os.fsync(fd)
        # in the vault now, read from the store by another process
        assert run_pqfs("cat", str(vault_dir), "log.txt", env=cli_env).stdout == b"line 1\n"
        os.write(fd, b"line 2\n")
        os.close(fd)
        # not fsynced, and the delay is an hour: still pending, served by the mount
        assert (mp / "log.txt").read_bytes() == b"line 1\nline 2\n"
        assert mount_stats(mp, cli_env)["pending_files"] == 1
        assert run_pqfs("cat", str(vault_dir), "log.txt", env=cli_env).stdout == b"line 1\n"
    # pqfs umount committed it
    assert vault_files(vault_dir, cli_env) == {"log.txt": b"line 1\nline 2\n"}


def test_a_closed_file_commits_after_the_delay(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    with mounted(vault_dir, tmp_path / "mnt", cli_env, "--commit-delay", "0.5") as mp:
        (mp / "a.nfo").write_text("<movie/>")
        wait_for(lambda: mount_stats(mp, cli_env)["pending_files"] == 0, "the commit")
        assert run_pqfs("cat", str(vault_dir), "a.nfo", env=cli_env).stdout == b"<movie/>"


def test_sigterm_drains_pending_commits(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    with mounted(vault_dir, tmp_path / "mnt", cli_env, "--commit-delay", "3600") as mp:
        for i in range(20):
            (mp / f"f{i}.txt").write_text(f"file {i}")
        (mp / "d").mkdir()
        pid = daemon_pid(mp)
        os.kill(pid, 15)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon to stop")
    assert vault_files(vault_dir, cli_env) == {f"f{i}.txt": f"file {i}".encode() for i in range(20)}
    assert "d" in vault_dirs(vault_dir)


def test_lock_commits_first_and_then_refuses_writes(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    with mounted(vault_dir, tmp_path / "mnt", cli_env, "--commit-delay", "3600") as mp:
        (mp / "a.txt").write_text("written before the lock")
        run_pqfs("lock", str(mp), env=cli_env)
        assert run_pqfs("cat", str(vault_dir), "a.txt", env=cli_env).stdout == (
            b"written before the lock"
        )
        for attempt in (
            lambda: (mp / "b.txt").write_text("x"),
            lambda: os.mkdir(mp / "d"),
            lambda: (mp / "a.txt").read_text(),
        ):
            with pytest.raises(PermissionError):
                attempt()
        run_pqfs("unlock", str(mp), env=cli_env)
        (mp / "b.txt").write_text("after")
    assert vault_files(vault_dir, cli_env) == {
        "a.txt": b"written before the lock",
        "b.txt": b"after",
    }


# ------------------------------------------------------------------ staging ----


def test_staging_full_makes_writers_wait_not_fail(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A 12 MiB file through 1 MiB of memory and 4 MiB of write cache: writers wait for
    commits to free room (backpressure), the file comes out whole."""
    data = random.Random(3).randbytes(12 * 1024 * 1024)
    cache = tmp_path / "wcache"
    cache.mkdir()
    args = ("--write-buffer", "1M", "--write-cache", str(cache), "--write-cache-size", "4M")
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *args, *FAST) as mp:
        # its last byte first: not written in order, so staged (not the stream tier)
        fd = os.open(mp / "big.bin", os.O_CREAT | os.O_WRONLY)
        os.pwrite(fd, data[-1:], len(data) - 1)
        for off in range(0, len(data), 1 << 20):
            os.pwrite(fd, data[off : off + (1 << 20)], off)
        os.close(fd)
        assert (mp / "big.bin").read_bytes() == data
        s = mount_stats(mp, cli_env)
        assert s["staging_waits"] > 0 and s["files_streamed"] == 0
        assert s["staged_spill"] <= 4 * 1024 * 1024
    assert vault_files(vault_dir, cli_env) == {"big.bin": data}


def test_no_plaintext_in_staging_store_or_log(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A marker written into a small file (memory) and a large one (spilled) is found in none
    of: the daemon's spill files (read through /proc/PID/fd, since they have no name), the
    vault directory, the write cache directory, the log."""
    marker = b"PQFS-PLAINTEXT-MARKER-7f3a"
    filler = random.Random(4).randbytes(2 * 1024 * 1024)
    big = filler[:1_000_000] + marker + filler[1_000_000:]
    cache = tmp_path / "wcache"
    cache.mkdir()
    log = tmp_path / "mount.log"
    args = ("--write-cache", str(cache), "--log-file", str(log), "--commit-delay", "3600")
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *args) as mp:
        (mp / "small.txt").write_bytes(b"note: " + marker)
        fd = os.open(mp / "big.bin", os.O_CREAT | os.O_WRONLY)
        os.write(fd, big)  # still open: staged, not committed
        pid = daemon_pid(mp)
        spills = []
        for link in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(link)
            if target.startswith(str(cache)):
                spills.append(Path(link).read_bytes())
        assert spills and sum(len(s) for s in spills) >= 1_000_000  # the big file is there
        for s in spills:
            assert marker not in s
        assert list(cache.iterdir()) == []  # unlinked from the start
        os.close(fd)
        run_pqfs("sync", str(mp), env=cli_env)
    for p in vault_dir.rglob("*"):
        if p.is_file():
            assert marker not in p.read_bytes(), p
    assert marker not in log.read_bytes()
    assert vault_files(vault_dir, cli_env)["big.bin"] == big


def test_write_cache_that_cannot_hold_files_is_a_clear_error(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = run_pqfs(
        "mount",
        str(vault_dir),
        str(mp),
        "--write-cache",
        str(tmp_path / "nope"),
        env=cli_env,
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert err.startswith("pqfs: error: --write-cache ") and "No such file" in err
    assert len(err.strip().splitlines()) == 1


def test_age_opens_files_written_through_the_mount(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A file written through the mount is a standard age file: the age tool (installed by
    scripts/install.sh; Debian's has no post-quantum recipients, so a vault that also holds an
    X25519 identity) decrypts it with the vault's identity."""
    vault_dir = tmp_path / "vault"
    run_pqfs("init", str(vault_dir), "--classic", env=cli_env)
    rng = random.Random(5)
    files = {"x.bin": rng.randbytes(200_000), "d/small.txt": b"tiny", "empty": b""}
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        (mp / "d").mkdir()
        for name, data in files.items():
            (mp / name).write_bytes(data)
        with open(mp / "x.bin", "r+b") as f:  # a patch: its commit rewrites the object
            f.write(b"HEAD")
        files["x.bin"] = b"HEAD" + files["x.bin"][4:]
        run_pqfs("sync", str(mp), env=cli_env)
    ident = tmp_path / "id.txt"
    run_pqfs("identity", str(vault_dir), "--classic-only", "-o", str(ident), env=cli_env)
    vault = Vault.open(str(vault_dir))
    vault.unlock(PASSPHRASE)
    objects = {name: vault.entry(name).object for name in files}
    vault.lock()
    for name, obj in objects.items():
        path = vault_dir / "objects" / obj[:2] / f"{obj}.age"
        out = subprocess.run(["age", "-d", "-i", str(ident), str(path)], capture_output=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout == files[name], name


def test_uid_gid_umask_let_a_media_server_account_write(
    vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """--allow-other with --uid/--gid/--umask: the kernel checks the modes shown against the
    account a media server runs as, which may then write (and others may not)."""
    server = 4321
    args = ("--allow-other", "--uid", str(server), "--gid", str(server), "--umask", "007")
    # (pytest's tmp_path is private to root: the other accounts could not reach a mount there)
    reachable = Path(tempfile.mkdtemp(prefix="pqfs-uid-"))
    os.chmod(reachable, 0o755)
    with mounted(vault_dir, reachable / "mnt", cli_env, *args, *FAST) as mp:
        (mp / "lib").mkdir()
        os.chmod(mp / "lib", 0o777)
        st = (mp / "lib").stat()
        assert (st.st_uid, st.st_gid) == (server, server)
        assert st.st_mode & 0o777 == 0o770
        for uid, ok in ((server, True), (server + 1, False)):
            proc = subprocess.run(
                ["/bin/sh", "-c", 'printf "<movie/>" > "$1/lib/movie.nfo"', "sh", str(mp)],
                user=uid,
                group=uid,
                capture_output=True,
            )
            assert (proc.returncode == 0) == ok, proc.stderr
        assert (mp / "lib" / "movie.nfo").read_text() == "<movie/>"
    os.rmdir(reachable / "mnt")
    os.rmdir(reachable)
    assert vault_files(vault_dir, cli_env) == {"lib/movie.nfo": b"<movie/>"}
