"""What only an S3 vault does: a vault copied into a bucket, request counting, the disk cache of
ciphertext, faults between pqfs and a real SeaweedFS, and S3 error messages. (What every backend
does is in test_conformance.py.)"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from pqfs.format.stream import CHUNK, CT_CHUNK, ciphertext_size

from .conftest import daemon_pid, mount_stats, mounted, run_pqfs, sha_file
from .s3server import RESET_MID_RESPONSE

pytestmark = pytest.mark.s3

MiB = 1 << 20


@pytest.fixture
def s3env(seaweed: Any, cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, **seaweed.env()}


def drop_page_cache(path: Path) -> None:
    """Forget the kernel's cached pages of one file of the mount, so reads reach the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def s3_vault(s3_bucket: str, s3env: dict[str, str], tmp_path: Path) -> tuple[str, Path]:
    """An S3 vault holding one 24 MiB file and a small one; returns (location, source dir)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(4)
    (src / "film.mkv").write_bytes(rng.randbytes(24 * MiB + 999))
    (src / "small.flac").write_bytes(rng.randbytes(60_000))
    loc = f"s3://{s3_bucket}/vault"
    run_pqfs("init", loc, env=s3env)
    run_pqfs("add", loc, str(src), "lib", env=s3env)
    return loc, src


@pytest.mark.fuse
def test_local_vault_copied_into_a_bucket_opens_unchanged(
    seaweed: Any, s3_bucket: str, s3env: dict[str, str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "clip.mp4").write_bytes(os.urandom(3 * MiB + 5))
    (src / "notes.txt").write_bytes(b"hello")
    local = tmp_path / "vault"
    run_pqfs("init", str(local), env=cli_env)
    run_pqfs("add", str(local), str(src), env=cli_env)
    client = seaweed.client()
    for p in local.rglob("*"):
        if p.is_file():
            key = f"media/vault/{p.relative_to(local).as_posix()}"
            client.put_object(Bucket=s3_bucket, Key=key, Body=p.read_bytes())
    loc = f"s3://{s3_bucket}/media/vault"
    assert b"every chunk authentic" in run_pqfs("verify", loc, env=s3env).stdout
    assert run_pqfs("cat", loc, "src/notes.txt", env=s3env).stdout == b"hello"
    with mounted(loc, tmp_path / "mnt", s3env) as mp:
        assert sha_file(mp / "src/a/clip.mp4") == sha_file(src / "a/clip.mp4")


@pytest.mark.fuse
def test_open_and_first_read_is_one_request(
    s3_vault: tuple[str, Path], s3env: dict[str, str], tmp_path: Path
) -> None:
    """Opening an object fetches its header and first chunk in one ranged GET: a small file's
    open + first read costs exactly one request (counted, not timed). Its one chunk is also
    its final chunk, authenticated by the open from that fetch: the first read finds it
    cached, without another thread hop."""
    loc, src = s3_vault
    with mounted(loc, tmp_path / "mnt", s3env) as mp:
        before = mount_stats(mp, s3env)
        with open(mp / "lib/small.flac", "rb") as f:
            assert f.read(65536) == (src / "small.flac").read_bytes()[:65536]
        after = mount_stats(mp, s3env)
        assert after["s3_gets"] - before["s3_gets"] == 1
        assert after["cache_hits"] - before["cache_hits"] == 1
        assert after["reads_waited"] == before["reads_waited"]


@pytest.mark.fuse
def test_random_reads_get_from_the_loop_and_fall_back_to_workers(
    s3_vault: tuple[str, Path], s3env: dict[str, str], fault_proxy: Any, s3: Any, tmp_path: Path
) -> None:
    """A random read's GET is sent from the mount's loop (no thread hop: s3async); when that
    one attempt fails (connections cut mid-response) a worker reads instead, with retries:
    every read returns the right bytes either way."""
    loc, src = s3_vault
    env = {**s3env, **s3.env(fault_proxy.endpoint)}
    want = (src / "film.mkv").read_bytes()
    rng = random.Random(12)
    with mounted(loc, tmp_path / "mnt", env) as mp:
        fd = os.open(mp / "lib/film.mkv", os.O_RDONLY)
        try:
            os.pread(fd, 4096, 0)  # opened: the object's presigned URL is known from here on
            for phase in ("clean", "faults"):
                if phase == "faults":
                    fault_proxy.drop_modes = (RESET_MID_RESPONSE,)
                    fault_proxy.drop_rate = 0.5
                before = mount_stats(mp, env)
                for _ in range(30):
                    off = rng.randrange(CHUNK, len(want) - 65536)
                    assert os.pread(fd, 65536, off) == want[off : off + 65536]
                after = mount_stats(mp, env)
                loop_gets = after["s3_loop_gets"] - before["s3_loop_gets"]
                fallbacks = after["s3_loop_fallbacks"] - before["s3_loop_fallbacks"]
                if phase == "clean":
                    assert loop_gets >= 25 and fallbacks == 0
                else:
                    assert fallbacks > 0 and after["read_errors"] == before["read_errors"]
        finally:
            os.close(fd)


@pytest.mark.fuse
def test_a_tampered_chunk_read_from_the_loop_is_eio(
    s3_vault: tuple[str, Path], s3env: dict[str, str], s3: Any, s3_bucket: str, tmp_path: Path
) -> None:
    """A chunk fetched and decrypted on the loop (s3async) that fails authentication gives EIO
    for that read only, counted; reads elsewhere in the file still work."""
    loc, src = s3_vault
    want = (src / "film.mkv").read_bytes()
    client = s3.client()
    objects = client.list_objects_v2(Bucket=s3_bucket, Prefix="vault/objects/")["Contents"]
    key = max(objects, key=lambda o: o["Size"])["Key"]
    raw = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    payload = len(raw) - ciphertext_size(len(want))
    raw[payload + 200 * CT_CHUNK + 1000] ^= 0x10  # inside chunk 200
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(raw))
    with mounted(loc, tmp_path / "mnt", s3env) as mp:
        fd = os.open(mp / "lib/film.mkv", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == want[:4096]
            before = mount_stats(mp, s3env)
            with pytest.raises(OSError) as e:
                os.pread(fd, 65536, 200 * CHUNK + 5000)
            assert e.value.errno == errno.EIO
            off = 100 * CHUNK + 123
            assert os.pread(fd, 65536, off) == want[off : off + 65536]
            after = mount_stats(mp, s3env)
            assert after["auth_failures"] - before["auth_failures"] >= 1
            assert after["s3_loop_gets"] > before["s3_loop_gets"]
        finally:
            os.close(fd)


@pytest.mark.fuse
def test_sequential_reads_use_merged_range_requests(
    s3_vault: tuple[str, Path], s3env: dict[str, str], tmp_path: Path
) -> None:
    loc, src = s3_vault
    with mounted(loc, tmp_path / "mnt", s3env) as mp:
        assert sha_file(mp / "lib/film.mkv") == sha_file(src / "film.mkv")
        s = mount_stats(mp, s3env)
        # 24 MiB is 385 chunks; merged requests carry many chunks each.
        print(f"24 MiB read in {s['s3_gets']} GETs, {s['s3_get_bytes']} bytes fetched")
        assert s["s3_gets"] <= 40
        assert s["s3_get_bytes"] < 26 * MiB  # nothing fetched twice


@pytest.mark.fuse
def test_disk_cache_second_pass_sends_no_request(
    s3_vault: tuple[str, Path], s3env: dict[str, str], tmp_path: Path
) -> None:
    """With a plaintext cache too small to hold the file, a second pass over the same ranges is
    served from the disk cache: zero GETs (counted)."""
    loc, src = s3_vault
    dc = tmp_path / "dc"
    dc.mkdir()
    data = (src / "film.mkv").read_bytes()
    rng = random.Random(8)
    ranges = [(rng.randrange(0, len(data) - 65536), 65536) for _ in range(40)]
    args = ["--cache-size", "4M", "--disk-cache", str(dc), "--disk-cache-size", "64M"]
    with mounted(loc, tmp_path / "mnt", s3env, *args) as mp:
        film = mp / "lib/film.mkv"
        passes = []
        for _ in range(2):
            drop_page_cache(film)
            assert sha_file(film) == sha_file(src / "film.mkv")
            with open(film, "rb") as f:
                for off, n in ranges:
                    f.seek(off)
                    assert f.read(n) == data[off : off + n]
            passes.append(mount_stats(mp, s3env))
        first, second = passes
        assert second["bytes_decrypted"] > first["bytes_decrypted"]  # it was not all cached
        assert second["s3_gets"] == first["s3_gets"]
        assert second["disk_cache_hits"] > first["disk_cache_hits"]
        assert second["disk_cache_bytes"] <= 64 * MiB


@pytest.mark.fuse
def test_disk_cache_holds_only_ciphertext(
    s3_vault: tuple[str, Path], s3env: dict[str, str], tmp_path: Path
) -> None:
    loc, src = s3_vault
    dc = tmp_path / "dc"
    dc.mkdir()
    with mounted(loc, tmp_path / "mnt", s3env, "--disk-cache", str(dc)) as mp:
        assert sha_file(mp / "lib/film.mkv") == sha_file(src / "film.mkv")
        assert list(dc.iterdir()) == []  # unlinked: nothing to find by name, gone after a crash
        pid = daemon_pid(mp)
        cache_files = [
            fd for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).startswith(str(dc))
        ]
        assert len(cache_files) == 1
        blob = cache_files[0].read_bytes()
    assert len(blob) >= 24 * MiB
    plain = (src / "film.mkv").read_bytes()
    for off in range(0, len(plain) - 64, len(plain) // 50):
        assert plain[off : off + 64] not in blob


def s3_storage(
    s3: Any, bucket: str, endpoint: str, monkeypatch: pytest.MonkeyPatch, data: bytes | None
) -> Any:
    """An S3Storage on `bucket`/v through `endpoint` (the server or a fault proxy in front of
    it), credentials from the environment as a user's; `data` stored as its object "obj"."""
    from pqfs.storage import StorageOptions, open_storage
    from pqfs.storage import s3 as s3mod

    for name, value in s3.env(endpoint).items():
        monkeypatch.setenv(name, value)
    if data is not None:
        s3.client().put_object(Bucket=bucket, Key="v/obj", Body=data)
    st = open_storage(f"s3://{bucket}/v", StorageOptions(endpoint_url=endpoint))
    assert isinstance(st, s3mod.S3Storage) and st._http is not None
    return st


@pytest.mark.parametrize("transport", ["presigned", "boto3"])
def test_range_gets_read_into_the_buffer_and_keep_their_connection(
    s3: Any, s3_bucket: str, fault_proxy: Any, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """Bodies are read straight into the caller's buffer (for boto3: beneath urllib3, which
    would copy them), and the connection goes back to the pool: 40 GETs in a row, one connection.
    A response cut short is retried on a new connection, never reused half-read. Both ways of
    sending a range GET: presigned URLs over our http.client pool, and boto3 (behind a proxy)."""
    from pqfs.storage import s3requests

    data = random.Random(9).randbytes(3 * MiB + 17)
    st = s3_storage(s3, s3_bucket, fault_proxy.endpoint, monkeypatch, data)
    if transport == "boto3":
        st._http = None
    try:
        rng = random.Random(10)
        for _ in range(40):
            off, n = rng.randrange(0, len(data)), rng.choice([1, 65552, 131104, 1 * MiB])
            buf = bytearray(n)
            got, size = st.get_range("obj", off, memoryview(buf))
            assert size == len(data) and bytes(buf[:got]) == data[off : off + n]
        assert fault_proxy.accepted == 1
        r = st._client.get_object(Bucket=s3_bucket, Key="v/obj", Range="bytes=0-9")  # type: ignore[attr-defined]
        raw, _ = s3requests._body_reader(r["Body"], r)
        r["Body"].close()
        assert raw is not None  # botocore still has http.client beneath it: the direct reader
        fault_proxy.drop_modes = (RESET_MID_RESPONSE,)
        fault_proxy.drop_rate = 0.5
        for _ in range(10):
            buf = bytearray(MiB)
            assert st.get_range("obj", 5, memoryview(buf))[0] == MiB
            assert bytes(buf) == data[5 : 5 + MiB]
        assert fault_proxy.dropped > 0 and fault_proxy.accepted > 1
    finally:
        st.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_retry(
    s3: Any, s3_bucket: str, fault_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep-alive connections die while idle (server timeouts, restarts): the next GET notices
    before sending on it, opens a new one, and costs no retry (no backoff pause)."""
    data = random.Random(5).randbytes(300_000)
    st = s3_storage(s3, s3_bucket, fault_proxy.endpoint, monkeypatch, data)
    try:
        buf = bytearray(5000)
        assert st.get_range("obj", 100, memoryview(buf))[0] == 5000
        fault_proxy.down = True  # cuts every open connection
        fault_proxy.down = False
        time.sleep(0.2)
        assert st.get_range("obj", 200_000, memoryview(buf))[0] == 5000
        assert bytes(buf) == data[200_000:205_000]
        assert st.counters["s3_retries"] == 0 and fault_proxy.accepted == 2
    finally:
        st.close()


def test_idle_connections_stay_bounded(
    s3: Any, s3_bucket: str, fault_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More GETs at once than CONNECTIONS open more connections (the proxy's latency keeps
    them all in flight together), but only CONNECTIONS are kept idle afterwards; close()
    closes those."""
    from pqfs.storage.base import S3Bounds

    data = random.Random(6).randbytes(100_000)
    st = s3_storage(s3, s3_bucket, fault_proxy.endpoint, monkeypatch, data)
    fault_proxy.latency = 0.2
    n = S3Bounds.connections + 8
    barrier = threading.Barrier(n)
    got: list[bytes] = []

    def read(i: int) -> None:
        buf = bytearray(1000)
        barrier.wait()
        st.get_range("obj", i * 1000, memoryview(buf))
        got.append(bytes(buf) if bytes(buf) == data[i * 1000 : i * 1000 + 1000] else b"")

    threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(got) == n and all(got)
        assert fault_proxy.accepted == n  # one connection per GET in flight
        idle = [c for conns in st._http._idle.values() for c in conns]
        assert len(idle) == S3Bounds.connections
    finally:
        st.close()
    assert not st._http._idle and all(c.sock is None for c in idle)


def test_ctrl_c_as_an_upload_is_created_leaves_no_upload(
    s3: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands just as the server answers CreateMultipartUpload, before the id is
    known (it happened in CI, in test_ctrl_c_during_add_cleans_up[s3]): the upload is still
    aborted, not left behind unseen and billed."""
    st = s3_storage(s3, s3_bucket, s3.endpoint, monkeypatch, None)
    create = st._client.create_multipart_upload
    created: list[str] = []

    def create_then_ctrl_c(**kw: Any) -> Any:
        r = create(**kw)
        created.append(r["UploadId"])
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        time.sleep(0.05)  # the interrupt is seen before the answer is handed back
        return r

    st._client.create_multipart_upload = create_then_ctrl_c
    try:
        with pytest.raises(KeyboardInterrupt), st.writer("objects/x", exclusive=True) as f:
            for _ in range(12):  # one part and a half: the first part creates the upload
                f.write(os.urandom(MiB))
    finally:
        st.close()
    assert len(created) == 1
    uploads = s3.client().list_multipart_uploads(Bucket=s3_bucket, Prefix="v/")
    assert uploads.get("Uploads", []) == []
    assert st.list("objects/") == []


def test_an_expired_presigned_url_is_signed_again(
    s3: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 403 for a presigned GET (expired URL, expired session credentials) gets one new
    signature and a retry; the read succeeds."""
    data = random.Random(3).randbytes(200_000)
    st = s3_storage(s3, s3_bucket, s3.endpoint, monkeypatch, data)
    try:
        stale = st._client.generate_presigned_url(
            "get_object", Params={"Bucket": s3_bucket, "Key": "v/obj"}, ExpiresIn=1
        )
        time.sleep(2.1)
        u = urllib.parse.urlsplit(stale)
        target = f"{u.path}?{u.query}"
        st._urls["obj"] = (u.scheme, u.netloc, target, time.monotonic() + 3600)  # "valid"
        buf = bytearray(1000)
        assert st.get_range("obj", 500, memoryview(buf)) == (1000, len(data))
        assert bytes(buf) == data[500:1500]
        assert st.counters["s3_retries"] == 1
        assert st._urls["obj"][2] != target
    finally:
        st.close()


@pytest.mark.parametrize("transport", ["presigned", "boto3"])
def test_range_get_of_a_missing_object_is_not_found(
    s3: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    st = s3_storage(s3, s3_bucket, s3.endpoint, monkeypatch, None)
    if transport == "boto3":
        st._http = None
    try:
        with pytest.raises(FileNotFoundError):
            st.get_range("nothing-here", 0, memoryview(bytearray(10)))
        assert st.counters["s3_retries"] == 0
    finally:
        st.close()


# ------------------------------------------------------------------------ faults ----


@pytest.mark.fuse
def test_reads_survive_dropped_connections_and_latency(
    s3_vault: tuple[str, Path], s3env: dict[str, str], fault_proxy: Any, tmp_path: Path
) -> None:
    """10% of HTTP exchanges reset (before or in the middle of a response) and 5 ms added to each:
    playback-style reads and seeks still return exactly the right bytes, through retries."""
    loc, src = s3_vault
    want = (src / "film.mkv").read_bytes()
    fault_proxy.latency = 0.005
    args = ["--endpoint-url", fault_proxy.endpoint, "--cache-size", "4M"]
    with mounted(loc, tmp_path / "mnt", s3env, *args) as mp:
        fault_proxy.drop_rate = 0.1
        film = mp / "lib/film.mkv"
        for _ in range(3):  # the 4M cache cannot hold the film: every pass fetches it again
            drop_page_cache(film)
            with open(film, "rb") as f:
                got = bytearray()
                while block := f.read(MiB):  # in order, 1 MiB at a time
                    got += block
            assert got == want
        rng = random.Random(6)
        with open(film, "rb") as f:
            for _ in range(100):  # seeks
                off = rng.randrange(0, len(want) - 65536)
                f.seek(off)
                assert f.read(65536) == want[off : off + 65536]
        s = mount_stats(mp, s3env)
    print(
        f"{fault_proxy.dropped} of {fault_proxy.exchanges} exchanges reset; {s['s3_retries']} retries"
    )
    assert fault_proxy.dropped > 0
    assert s["s3_retries"] > 0
    assert s["read_errors"] == 0


@pytest.mark.fuse
def test_a_slow_object_does_not_block_other_files(
    s3_vault: tuple[str, Path], s3env: dict[str, str], fault_proxy: Any, tmp_path: Path
) -> None:
    """Every response for one object is held back 3 s while 16 readers hammer it; meanwhile
    reads of another file are served: all of them finish before any read of the slow one, and
    the slow reads still succeed (3 s is within the per-attempt read timeout of --timeout 12)."""
    loc, src = s3_vault
    small = (src / "small.flac").read_bytes()
    want = (src / "film.mkv").read_bytes()
    film_key = next(k for k, size in _objects(loc, s3env) if size > 20 * MiB)
    # A short budget: readahead still waiting when the proxy closes ends soon after the test.
    args = ["--endpoint-url", fault_proxy.endpoint, "--timeout", "12"]
    with mounted(loc, tmp_path / "mnt", s3env, *args) as mp:
        film = open(mp / "lib/film.mkv", "rb")  # noqa: SIM115 - closed below
        try:
            fault_proxy.slow_down(film_key.rpartition("/")[2].encode(), 3.0)
            done: list[tuple[str, float]] = []

            def read_film(i: int) -> None:
                off = (i + 1) * 1_300_001
                if os.pread(film.fileno(), 65536, off) == want[off : off + 65536]:
                    done.append(("film", time.monotonic()))

            threads = [threading.Thread(target=read_film, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            time.sleep(0.5)  # the film's reads now hold every worker they may have
            for _ in range(3):
                drop_page_cache(mp / "lib/small.flac")
                assert (mp / "lib/small.flac").read_bytes() == small
                done.append(("small", time.monotonic()))
            for t in threads:
                t.join()
        finally:
            fault_proxy.slow_down(None)
            film.close()
    order = [name for name, _t in sorted(done, key=lambda x: x[1])]
    assert order == ["small"] * 3 + ["film"] * 16, order


def _objects(loc: str, env: dict[str, str]) -> list[tuple[str, int]]:
    from pqfs.storage import open_storage

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    try:
        return open_storage(loc).list("objects/")
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.fuse
def test_stopped_server_gives_eio_then_recovers_without_remount(
    s3_vault: tuple[str, Path], s3env: dict[str, str], seaweed: Any, tmp_path: Path
) -> None:
    loc, src = s3_vault
    want = (src / "film.mkv").read_bytes()
    timeout = 3.0
    with mounted(loc, tmp_path / "mnt", s3env, "--timeout", str(timeout)) as mp:
        f = open(mp / "lib/film.mkv", "rb")  # noqa: SIM115 - held across the outage
        try:
            assert f.read(65536) == want[:65536]
            seaweed.stop()
            t0 = time.monotonic()
            f.seek(20 * MiB)
            with pytest.raises(OSError) as e:
                f.read(65536)
            elapsed = time.monotonic() - t0
            assert e.value.errno == errno.EIO
            print(f"EIO after {elapsed:.2f} s with --timeout {timeout}")
            assert elapsed < 2 * timeout  # bounded by the budget, not a hang
            assert sorted(os.listdir(mp / "lib")) == ["film.mkv", "small.flac"]  # still serving
            seaweed.restart()
            time.sleep(
                2.0
            )  # reads fail fast for 2 s after an outage (MountOptions.unavailable_hold)
            f.seek(20 * MiB)
            assert f.read(65536) == want[20 * MiB : 20 * MiB + 65536]
        finally:
            f.close()
        assert mount_stats(mp, s3env)["read_errors"] >= 1


# ------------------------------------------------------------------------ errors ----


def _one_line_error(proc: Any) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_s3_errors_are_one_line(
    seaweed: Any, s3_bucket: str, s3env: dict[str, str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    err = _one_line_error(run_pqfs("ls", "s3://", env=s3env, check=False))
    assert "not an S3 vault location" in err
    err = _one_line_error(run_pqfs("ls", "s3://no-such-bucket/v", env=s3env, check=False))
    assert err == "pqfs: error: S3 bucket no-such-bucket does not exist"
    err = _one_line_error(run_pqfs("ls", f"s3://{s3_bucket}/none", env=s3env, check=False))
    assert err == f"pqfs: error: no pqfs vault at s3://{s3_bucket}/none"
    nocreds = {k: v for k, v in s3env.items() if not k.startswith("AWS_")}
    nocreds |= {"AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    nocreds |= {"AWS_EC2_METADATA_DISABLED": "true"}
    err = _one_line_error(
        run_pqfs(
            "ls",
            f"s3://{s3_bucket}/v",
            "--endpoint-url",
            seaweed.endpoint,
            env=nocreds,
            check=False,
        )
    )
    assert "no credentials" in err
    wrong = {**s3env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    err = _one_line_error(run_pqfs("ls", f"s3://{s3_bucket}/v", env=wrong, check=False))
    assert "S3 refused" in err and "wrong-secret" not in err
    t0 = time.monotonic()
    dead = {**s3env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens on discard
    err = _one_line_error(
        run_pqfs("ls", f"s3://{s3_bucket}/v", "--timeout", "1", env=dead, check=False)
    )
    assert "no answer within 1 s" in err
    assert time.monotonic() - t0 < 30
    err = _one_line_error(
        run_pqfs(
            "mount",
            str(tmp_path / "v"),
            str(tmp_path),
            "--disk-cache",
            str(tmp_path),
            env=cli_env,
            check=False,
        )
    )
    assert "--disk-cache is for s3:// vaults" in err
