#!/usr/bin/env python3
"""Side-by-side benchmark of three encrypted FUSE mounts: pqfs, gocryptfs and rclone crypt.

  python contrib/bench/bench_mount.py [--size 1G] [--rounds 5] [--systems pqfs,gocryptfs,rclone]

Needs root (it writes /proc/sys/vm/drop_caches). One random file of --size and --files small
random files are encrypted into each system (untimed setup, in /tmp/bench-mount-*). Then the
page cache the setup filled is dropped and the benchmark waits, every vCPU kept busy, until 15 s
pass with at most 10 ms of host steal (at most --quiet-host seconds, default 240; the header
says how long it took): on a VM the host takes back freed memory and writes the setup's GiB
back on its own schedule, with time taken from the vCPUs, and no round should measure that.
Then each round mounts every system afresh, one after the other (round r: pqfs, gocryptfs,
rclone), and measures on that fresh mount, in this order:

  cold open    open + pread(64 KiB) + close of --latency-files small files, page cache dropped
               and right after the mount (pqfs has no file key cached yet); median per round
  random read  --random-reads preads of 64 KiB at random unaligned offsets of the big file (fixed
               --seed, same offsets for every system and round), page cache dropped; p50, p99
  (remount, so that no daemon-side cache filled by the random reads helps what follows)
  seq read     the whole big file with 1 MiB os.read calls, page cache dropped; GB/s (1e9 B/s)
  daemon CPU   utime+stime of the mount daemon across the sequential read, per GiB read
  daemon RSS   VmRSS after the sequential read, then while all --files small files are held
               open (64 KiB read from each, then --settle seconds)

Figures are medians over rounds; the ratios are pqfs's median divided by the peer's, so for
"higher is better" metrics a ratio above 1 favours pqfs, for "lower is better" below 1 does.
Dropping caches (sync; echo 3 > drop_caches) evicts both the mounts' page cache and that of the
encrypted backing files, which live on the disk under /tmp: every measurement reads from disk.
A peer tool that is not installed is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
READ = 64 << 10  # random and first-read size
SEQ_BLOCK = 1 << 20  # sequential read size
PASSPHRASE = "bench"
ALL_SYSTEMS = ("pqfs", "gocryptfs", "rclone")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G)")
    n = int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return n


def human(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a setup or control command; its stdout, or an error naming the command.

    Output goes to files, not pipes: a daemonizing mount command leaves a child behind that may
    keep inherited pipes open, and reading them to EOF would wait for the unmount."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(
            cmd, env=env, stdout=out, stderr=err, timeout=timeout, stdin=subprocess.DEVNULL
        )
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        msg = (stderr or stdout).strip()
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {msg}")
    return stdout


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ------------------------------------------------------------------- daemon process ----


def find_daemon(mountpoint: str) -> int:
    """The pid of the FUSE daemon serving `mountpoint`: the one live process whose command
    line names it (the mount commands of all three systems fork and their parent exits)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or not args or b"fusermount" in os.path.basename(args[0]):
            continue
        if os.fsencode(mountpoint) in args:
            found.append(int(entry))
    if len(found) != 1:
        raise RuntimeError(f"expected one daemon process for {mountpoint}, found {found}")
    return found[0]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def reset_rss_peak(pid: int) -> bool:
    """Restart the kernel's count of the process's peak RSS (VmHWM) from its current RSS
    (root, Linux >= 4.0); False if that is refused, and VmHWM then counts from its start."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def rss_peak_mib(pid: int) -> float:
    """The process's peak RSS (VmHWM, kept by the kernel: no spike is missed) in MiB, since its
    start or the last reset_rss_peak."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------------- systems ----


class System:
    """One encrypted filesystem: untimed setup, then mount/unmount per round."""

    name = ""
    tool = ""
    probe = "big.bin"  # the file whose size tells that a fresh mount answers

    def __init__(self, work: Path) -> None:
        self.work = work / self.name
        self.mnt = str(self.work / "mnt")
        self.pid: int | None = None
        self.pids: set[int] = set()  # every daemon this run started, for the cleanup

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None if shutil.which(self.tool) else f"{self.tool} not found in PATH"

    def version(self) -> str:
        raise NotImplementedError

    def setup(self, plain: Path) -> None:
        """Encrypt the plaintext tree `plain` into this system (untimed)."""
        raise NotImplementedError

    def _mount(self) -> None:
        raise NotImplementedError

    def _umount(self) -> None:
        run([fusermount(), "-u", self.mnt])

    def mount(self, size: int) -> None:
        os.makedirs(self.mnt, exist_ok=True)
        self._mount()
        wait_answers(self.mnt, size, self.probe)
        self.pid = find_daemon(self.mnt)
        self.pids.add(self.pid)

    def umount(self) -> None:
        self._umount()
        if self.pid is not None:
            deadline = time.monotonic() + 15
            while alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pid = None

    def cleanup(self) -> None:
        """Best effort, never raises: unmount (lazily if need be), stop leftover daemons."""
        if os.path.ismount(self.mnt) or stale_mount(self.mnt):
            try:
                self._umount()
            except Exception:
                subprocess.run([fusermount(), "-u", "-z", self.mnt], capture_output=True)
        for pid in self.pids:
            deadline = time.monotonic() + 5
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)

    def extra_stats(self) -> dict[str, float]:
        return {}


def fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"


def stale_mount(path: str) -> bool:
    """A FUSE mount whose daemon is gone: stat fails with ENOTCONN."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def wait_answers(mnt: str, size: int, name: str = "big.bin", timeout: float = 60) -> None:
    """Poll until the mount is up and serves `name` at its full size."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if (
                os.path.ismount(mnt)
                and name in os.listdir(mnt)
                and os.stat(os.path.join(mnt, name)).st_size == size
            ):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} did not answer within {timeout:.0f} s")
        time.sleep(0.05)


class Pqfs(System):
    name = "pqfs"
    tool = "pqfs"

    def __init__(self, work: Path, cache_size: str, extra: Sequence[str] = ()) -> None:
        self.extra = list(extra)  # more `pqfs mount` options, for A/B runs
        super().__init__(work)
        self._steal0 = 0.0
        self.cache_size = cache_size
        self.vault = str(self.work / "vault")
        self.env = dict(os.environ, PQFS_PASSPHRASE=PASSPHRASE, PQFS_SCRYPT_LOG_N="12")
        self.stats: list[dict[str, float]] = []

    def cmd(self) -> list[str]:
        exe = shutil.which("pqfs")
        if exe is None:  # the checkout's own virtualenv
            venv = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "pqfs"
            exe = str(venv) if venv.exists() else "pqfs"
        return [exe]

    def missing(self) -> str | None:
        exe = self.cmd()[0]
        return None if os.access(exe, os.X_OK) else "pqfs not found in PATH nor in .venv/bin"

    def version(self) -> str:
        return run([*self.cmd(), "--version"]).strip()

    def setup(self, plain: Path) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        run([*self.cmd(), "init", self.vault], env=self.env)
        run([*self.cmd(), "add", self.vault, str(plain / "big.bin"), "big.bin"], env=self.env)
        run([*self.cmd(), "add", self.vault, str(plain / "small"), "small"], env=self.env)

    def _mount(self) -> None:
        run(
            [
                *self.cmd(),
                "mount",
                self.vault,
                self.mnt,
                "--cache-size",
                self.cache_size,
                *self.extra,
            ],
            env=self.env,
        )
        self._steal0 = steal_ms()

    def _umount(self) -> None:
        run([*self.cmd(), "umount", self.mnt])

    def extra_stats(self) -> dict[str, float]:
        data = json.loads(run([*self.cmd(), "stats", self.mnt, "--json"]))
        if float(data.get("loop_stall_max_ms") or 0) > 10:
            log(
                f"pqfs: loop stall of {data['loop_stall_max_ms']} ms in "
                f"{data.get('loop_stall_task')} ({data.get('loop_stall_max_cpu_ms')} ms on CPU"
                + (
                    f", {data['stall_detail_sleeps']} sleeps, "
                    f"{data['stall_detail_preemptions']} preemptions, "
                    f"{data['stall_detail_faults']} page faults; longest stall with the host's "
                    f"share taken out {data['stall_detail_own_max_ms']} ms)"
                    if "stall_detail_sleeps" in data
                    else ")"
                )
            )
        out = {k: float(data[k]) for k in PQFS_STATS if isinstance(data.get(k), int | float)}
        # Time the host took the vCPUs away while this mount served (all CPUs): a loop stall
        # can be the host's, not the daemon's.
        out["steal_ms"] = steal_ms() - self._steal0
        self.stats.append(out)
        return out


# Figures kept from each pqfs mount's `pqfs stats --json`, printed per round; the
# stall_detail ones only with --pqfs-args=--stall-detail.
PQFS_STATS = (
    "loop_stall_max_ms",
    "loop_stall_max_cpu_ms",
    "stall_detail_sleeps",
    "stall_detail_preemptions",
    "stall_detail_faults",
    "stall_detail_own_max_ms",
    "loop_step_cpu_max_ms",
    "gc_pause_max_ms",
    "read_p50_ms",
    "read_p99_ms",
    "cache_hit_rate",
    "reads_direct",
    "reads_direct_refused",
    "idle_polls",
    "idle_poll_hits",
    "idle_poll_ms",
)


def steal_ms() -> float:
    """Steal time of all CPUs so far (/proc/stat, USER_HZ ticks), in ms."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[8]) * 1000 / hz if len(fields) > 8 else 0.0


class Gocryptfs(System):
    name = "gocryptfs"
    tool = "gocryptfs"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.cipher = str(self.work / "cipher")
        self.passfile = str(self.work / "passfile")

    def version(self) -> str:
        return run([self.tool, "-version"]).strip().splitlines()[0]

    def setup(self, plain: Path) -> None:
        os.makedirs(self.cipher)
        os.makedirs(self.mnt)
        with open(os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(PASSPHRASE + "\n")
        run([self.tool, "-init", "-q", "-passfile", self.passfile, self.cipher])
        run([self.tool, "-q", "-passfile", self.passfile, self.cipher, self.mnt])
        self.pids.add(find_daemon(self.mnt))
        try:
            shutil.copytree(plain, self.mnt, dirs_exist_ok=True)
        finally:
            self._umount()

    def _mount(self) -> None:
        # -ro: pqfs and the rclone mount are read-only too
        run([self.tool, "-q", "-ro", "-passfile", self.passfile, self.cipher, self.mnt])


class Rclone(System):
    name = "rclone"
    tool = "rclone"
    remote = "benchcrypt"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.store = str(self.work / "rclone-store")
        self.env = dict(os.environ)

    def version(self) -> str:
        return run([self.tool, "version"]).strip().splitlines()[0]

    def setup(self, plain: Path) -> None:
        os.makedirs(self.store)
        prefix = f"RCLONE_CONFIG_{self.remote.upper()}_"
        self.env.update(
            {
                prefix + "TYPE": "crypt",
                prefix + "REMOTE": self.store,
                prefix + "PASSWORD": run([self.tool, "obscure", PASSPHRASE]).strip(),
            }
        )
        run([self.tool, "copy", str(plain), f"{self.remote}:"], env=self.env)

    def _mount(self) -> None:
        run(
            [
                self.tool,
                "mount",
                f"{self.remote}:",
                self.mnt,
                "--daemon",
                "--vfs-cache-mode",
                "off",
                "--read-only",
                "--log-file",
                str(self.work / "rclone.log"),
            ],
            env=self.env,
        )


# ---------------------------------------------------------------------- measurement ----


def remove_work(systems: list[System], work: Path) -> None:
    """Delete the work directory, unless a mount below it survived the cleanup."""
    if any(os.path.ismount(s.mnt) or stale_mount(s.mnt) for s in systems):
        print(f"bench: a mount under {work} is still there; not removing it", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


def cold_opens(s: System, names: list[str], heads: dict[str, bytes]) -> list[float]:
    """Open + first 64 KiB of each small file: latencies (checked against the original)."""
    lat = []
    for name in names:
        t0 = time.perf_counter()
        fd = os.open(Path(s.mnt) / "small" / name, os.O_RDONLY)
        data = os.pread(fd, READ, 0)
        os.close(fd)
        lat.append(time.perf_counter() - t0)
        if data != heads[name]:
            raise RuntimeError(f"{s.name}: small/{name} differs from the original")
    return lat


def preads(fd: int, offsets: list[int]) -> tuple[list[float], list[bytes]]:
    """pread 64 KiB at every offset of an open file: latencies and data."""
    times, got = [], []
    for off in offsets:
        t0 = time.perf_counter()
        got.append(os.pread(fd, READ, off))
        times.append(time.perf_counter() - t0)
    return times, got


def check_preads(s: System, plain: Path, offsets: list[int], got: list[bytes]) -> None:
    with open(plain / "big.bin", "rb") as f:  # untimed check against the plaintext
        for off, data in zip(offsets, got, strict=True):
            f.seek(off)
            if data != f.read(READ):
                raise RuntimeError(f"{s.name}: random read at {off} differs from the original")


def p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[98]


def read_through(s: System, size: int) -> float:
    """Read big.bin start to end in SEQ_BLOCK reads: seconds (its size checked)."""
    t0 = time.perf_counter()
    fd = os.open(Path(s.mnt) / "big.bin", os.O_RDONLY)
    total = 0
    try:
        while block := os.read(fd, SEQ_BLOCK):
            total += len(block)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    if total != size:
        raise RuntimeError(f"{s.name}: read {total} bytes of big.bin, expected {size}")
    return elapsed


def rss_with_files_open(s: System, pid: int, names: list[str], settle: float) -> float:
    """Daemon RSS (MiB) with every small file open and its first 64 KiB read."""
    fds = []
    try:
        for name in names:
            fds.append(os.open(Path(s.mnt) / "small" / name, os.O_RDONLY))
            os.pread(fds[-1], READ, 0)
        time.sleep(settle)
        return rss_mib(pid)
    finally:
        for fd in fds:
            os.close(fd)


def measure(
    s: System, args: argparse.Namespace, offsets: list[int], plain: Path, heads: dict[str, bytes]
) -> dict[str, float]:
    """One round of one system, in two phases, each on a fresh mount: (a) cold open and random
    reads, (b) sequential read, daemon CPU and RSS. The remount keeps chunks cached in the
    daemon by the random reads (pqfs has such a cache) out of the sequential read."""
    res: dict[str, float] = {}
    small = sorted(heads)
    mnt = Path(s.mnt)

    s.mount(args.size)
    try:
        # cold open + first 64 KiB, right after the mount: no file key cached yet
        drop_caches()
        lat = cold_opens(s, small[: args.latency_files], heads)
        res["open_ms"] = statistics.median(lat) * 1e3

        # random 64 KiB preads; the file is opened before the caches are dropped, so the
        # timed reads see no open or file-key cost
        fd = os.open(mnt / "big.bin", os.O_RDONLY)
        try:
            drop_caches()
            times, got = preads(fd, offsets)
        finally:
            os.close(fd)
        res["rand_p50_ms"] = statistics.median(times) * 1e3
        res["rand_p99_ms"] = p99(times) * 1e3
        for k, v in s.extra_stats().items():
            res["xa_" + k] = v
    finally:
        s.umount()
    check_preads(s, plain, offsets, got)
    del got

    s.mount(args.size)
    try:
        assert s.pid is not None
        pid = s.pid
        # sequential read, daemon CPU
        drop_caches()
        cpu0 = cpu_seconds(pid)
        elapsed = read_through(s, args.size)
        cpu1 = cpu_seconds(pid)
        res["seq_gbps"] = args.size / elapsed / 1e9
        res["cpu_s_per_gib"] = (cpu1 - cpu0) / (args.size / GiB)
        res["rss_read_mib"] = rss_mib(pid)
        # RSS with every small file held open, after the sequential read
        res["rss_open_mib"] = rss_with_files_open(s, pid, small, args.settle)
        for k, v in s.extra_stats().items():
            res["xb_" + k] = v
    finally:
        s.umount()
    return res


METRICS = [  # key, label, better, format
    ("seq_gbps", "seq read GB/s (1 MiB reads)", "higher", "{:.3f}"),
    ("rand_p50_ms", "random 64 KiB read p50 ms", "lower", "{:.3f}"),
    ("rand_p99_ms", "random 64 KiB read p99 ms", "lower", "{:.3f}"),
    ("open_ms", "cold open+64 KiB read ms (median)", "lower", "{:.3f}"),
    ("cpu_s_per_gib", "daemon CPU s per GiB read", "lower", "{:.3f}"),
    ("rss_read_mib", "daemon RSS MiB after seq read", "lower", "{:.1f}"),
    ("rss_open_mib", "daemon RSS MiB, N files open", "lower", "{:.1f}"),
]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pqfs_stats(s: System, keep: Sequence[str], log_stall: bool = True) -> dict[str, float]:
    """The numeric figures named in `keep` from `pqfs stats --json` of a pqfs mount ({} for a
    peer); an event-loop stall over 10 ms is logged with the task it was in."""
    if not isinstance(s, Pqfs):
        return {}
    data = json.loads(run([*s.cmd(), "stats", s.mnt, "--json"]))
    if log_stall and float(data.get("loop_stall_max_ms") or 0) > 10:
        log(
            f"pqfs: loop stall of {data['loop_stall_max_ms']} ms in "
            f"{data.get('loop_stall_task')} ({data.get('loop_stall_max_cpu_ms')} ms on CPU)"
        )
    return {k: float(data[k]) for k in keep if isinstance(data.get(k), int | float)}


# ------------------------------------------------------------------------- reporting ----


def ratio_table(
    results: dict[str, list[dict[str, float]]],
    names: list[str],
    higher_is_better: set[str],
    keys: Sequence[str] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Print one line per figure: each system's median over its rounds, then pqfs / peer for
    every peer (above 1 favours pqfs for the figures in `higher_is_better`, below 1 for the
    others). Figures a system has no value for are left blank. Returns the medians, by figure
    and system."""
    if keys is None:
        keys = sorted({k for rows in results.values() for row in rows for k in row})
    peers = [x for x in names if x != "pqfs"] if "pqfs" in names else []
    print(
        f"\n{'figure':28}"
        + "".join(f"{x:>14}" for x in names)
        + "".join(f"{'pqfs/' + p:>17}" for p in peers)
    )
    medians: dict[str, dict[str, float | None]] = {}
    for k in keys:
        meds: dict[str, float | None] = {}
        for x in names:
            vals = [row[k] for row in results[x] if k in row]
            meds[x] = statistics.median(vals) if vals else None
        medians[k] = meds
        cells = "".join(f"{'' if meds[x] is None else f'{meds[x]:.4g}':>14}" for x in names)
        mine, ratios = meds.get("pqfs"), ""
        for p in peers:
            theirs = meds.get(p)
            ratios += f"{f'{mine / theirs:.3f}x' if mine is not None and theirs else '':>17}"
        if ratios.strip():
            ratios += " (higher favours pqfs)" if k in higher_is_better else " (lower favours pqfs)"
        print(f"{k:28}{cells}{ratios}")
    return medians


def machine() -> str:
    info: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first CPU is enough
    cpu = info.get("model name", "unknown CPU")
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']} model {info.get('model', '?')})"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (
        f"{platform.node()}: {cpu}, nproc {len(os.sched_getaffinity(0))}, {mem:.0f} GiB RAM, "
        f"kernel {platform.release()}"
    )


def report(
    args: argparse.Namespace,
    systems: list[System],
    results: dict[str, list[dict[str, float]]],
    versions: dict[str, str],
    skipped: dict[str, str],
    work: Path,
) -> None:
    names = [s.name for s in systems]
    print(f"encrypted FUSE mount benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}")
    for name in names:
        print(f"version: {versions[name]}")
    for name, why in skipped.items():
        print(f"skipped: {name}: {why}")
    print(
        f"data: {human(args.size)} random file + {args.files} x {human(args.small_size)} random "
        f"files, backing store on {work.parent} (disk); {args.rounds} alternating rounds "
        f"({' -> '.join(names)}), two fresh mounts per system per round (open+random, then seq+CPU+RSS), page cache dropped before every "
        f"measurement"
    )
    print(host_wait_line(args))
    described = {
        "pqfs": f"pqfs --cache-size {args.pqfs_cache_size} {args.pqfs_args} (read-only)",
        "gocryptfs": "gocryptfs -ro (defaults otherwise)",
        "rclone": "rclone crypt remote (RCLONE_CONFIG_* variables) over a local directory, "
        "mount --vfs-cache-mode off --read-only (defaults otherwise)",
    }
    print(f"mounts: {'; '.join(described[n] for n in names)}")
    print(
        f"random reads: {args.random_reads} x 64 KiB at unaligned offsets (seed {args.seed}); "
        f"cold open: {args.latency_files} files; N = {args.files} open files, "
        f"RSS read {args.settle:g} s after a 64 KiB read from each"
    )
    print()
    peers = [n for n in names if n != "pqfs"] if "pqfs" in names else []
    cols = [f"{n:>10}" for n in names] + [f"{'pqfs/' + p:>15}" for p in peers]
    print(f"{'metric (median of rounds)':<36} {'better':<6} {' '.join(cols)}")
    for key, label, better, fmt in METRICS:
        label = label.replace("N files", f"{args.files} files")
        med = {n: statistics.median(r[key] for r in results[n]) for n in names}
        cells = [f"{fmt.format(med[n]):>10}" for n in names]
        for p in peers:
            ratio = med["pqfs"] / med[p] if med[p] else float("inf")
            cells.append(f"{ratio:>14.2f}x")
        print(f"{label:<36} {better:<6} {' '.join(cells)}")
    if peers:
        print()
        print(
            "ratios are pqfs / peer: for 'higher' metrics > 1 means pqfs is better, "
            "for 'lower' metrics < 1 means pqfs is better"
        )
    print()
    print("all rounds:")
    for key, label, _better, fmt in METRICS:
        label = label.replace("N files", f"{args.files} files")
        for n in names:
            shown = " ".join(fmt.format(r[key]) for r in results[n])
            print(f"  {label:<36} {n:<10} {shown}")
    if "pqfs" in names:
        print()
        print("pqfs mount stats before each unmount (pqfs stats --json), per round:")
        for phase, what in (("xa_", "open+random mount"), ("xb_", "seq+RSS mount")):
            for key in (*PQFS_STATS, "steal_ms"):
                vals = [r[phase + key] for r in results["pqfs"] if phase + key in r]
                if not vals and key.startswith("stall_detail"):
                    continue  # pqfs mounted without --stall-detail
                if not vals:
                    print(f"  {what:<17} {key:<18} -")
                    continue
                shown = " ".join(f"{v:.3f}" for v in vals)
                print(
                    f"  {what:<17} {key:<18} {shown}   "
                    f"(max {max(vals):.3f}, median {statistics.median(vals):.3f})"
                )
        stalls = [
            max(r.get("xa_loop_stall_max_ms", 0.0), r.get("xb_loop_stall_max_ms", 0.0))
            for r in results["pqfs"]
        ]
        print(f"pqfs longest event-loop stall over all rounds: {max(stalls):.3f} ms")
        own = [
            r[k]
            for r in results["pqfs"]
            for k in ("xa_stall_detail_own_max_ms", "xb_stall_detail_own_max_ms")
            if k in r
        ]
        if own:
            print(f"  the same with the time the host took the vCPU taken out: {max(own):.3f} ms")


# ---------------------------------------------------------------------------- main ----


def prepare(systems: list[System], plain: Path, args: argparse.Namespace) -> dict[str, bytes]:
    """Write the random plaintext and encrypt it into every system (untimed), then wait for the
    host to settle (--quiet-host); the first 64 KiB of every small file."""
    log(
        f"writing {human(args.size)} + {args.files} x {human(args.small_size)} of random data in {plain}"
    )
    heads = make_plain(plain, args.size, args.files, args.small_size)
    for s in systems:
        log(f"setup {s.name} (untimed)")
        t0 = time.perf_counter()
        s.setup(plain)
        log(f"setup {s.name} done in {time.perf_counter() - t0:.1f} s")
    args.host_wait = wait_for_quiet_host(args.quiet_host)
    log(host_wait_line(args))
    return heads


def add_quiet_host_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--quiet-host",
        type=float,
        default=240,
        metavar="SECONDS",
        help="after the setup, drop the page cache and wait up to this long for the host's "
        "steal to stop (default 240; 0: don't)",
    )


def host_wait_line(args: argparse.Namespace) -> str:
    """How the wait for a quiet host went (prepare() sets args.host_wait), for log and report."""
    return f"host steal after the setup (both vCPUs kept busy): {args.host_wait}"


def wait_for_quiet_host(limit: float, window: int = 15, allowed_ms: float = 10.0) -> str:
    """Drop the page cache, keep every vCPU busy and wait until a `window` of seconds passes
    with at most `allowed_ms` of host steal, or `limit` seconds; a one-line account of it.

    Why, measured on this VM (Firecracker, virtio-balloon with free page reporting): dropping
    4 GiB of page cache costs the guest ~1.1 s of steal over the next ~12 s (410 ms in the
    worst second, in steps 2 s apart: the host taking back the freed pages), against 0.1 s
    without the drop. The setup leaves ~5 GiB cached; left alone, round 1's first drop frees
    it and round 1's sequential read runs in that storm (nearly every loop stall over 10 ms
    seen before this wait was there). The host's writeback of the setup's writes adds steal of
    its own for up to ~2 min. Steal only shows while a vCPU wants to run, hence the busy
    loops (nice 19; nothing else runs meanwhile)."""
    if limit <= 0:
        return "not waited for (--quiet-host 0)"
    drop_caches()
    # The spinners die with this process even without its finally (SIGKILL): the kernel kills
    # them when their parent exits (PR_SET_PDEATHSIG), whatever else loads the machine; the
    # ppid check catches a parent that died before the prctl.
    spin = (
        "import ctypes, os\nctypes.CDLL(None).prctl(1, 9)\nos.nice(19)\nparent = "
        f"{os.getpid()}\nwhile os.getppid() == parent:\n    for _ in range(100000): pass"
    )
    burners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in os.sched_getaffinity(0)]
    try:
        t0 = time.monotonic()
        samples: list[float] = []
        last = steal_ms()
        while True:
            time.sleep(1)
            now = steal_ms()
            samples.append(now - last)
            last = now
            waited = time.monotonic() - t0
            recent = sum(samples[-window:])
            if len(samples) >= window and recent <= allowed_ms:
                return (
                    f"quiet after {waited:.0f} s ({sum(samples):.0f} ms of steal while waiting, "
                    f"{recent:.0f} ms in the last {window} s)"
                )
            if waited >= limit:
                return (
                    f"NOT quiet after {waited:.0f} s ({recent:.0f} ms of steal in the last "
                    f"{window} s): figures may include the host's work"
                )
            if len(samples) % 5 == 0:
                log(
                    f"waiting for the host to settle: {recent:.0f} ms of steal in the last "
                    f"{min(window, len(samples))} s"
                )
    finally:
        for b in burners:
            b.kill()
            b.wait()


def make_plain(plain: Path, size: int, files: int, small_size: int) -> dict[str, bytes]:
    """Write the random plaintext; return the first 64 KiB of every small file."""
    (plain / "small").mkdir(parents=True)
    with open(plain / "big.bin", "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    heads = {}
    for i in range(files):
        data = os.urandom(small_size)
        name = f"f{i:02d}.bin"
        (plain / "small" / name).write_bytes(data)
        heads[name] = data[:READ]
    return heads


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so that the finally blocks unmount."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def pick_systems(
    names: Sequence[str], wanted: Sequence[str], factories: dict[str, Callable[[], Any]]
) -> tuple[list[Any], dict[str, str], dict[str, str]]:
    """The wanted systems that can run here, in `names`' order (fixed within a round): each
    made by its factory, skipped with the reason its `missing()` gives (or no fusermount3 for a
    peer); returns (systems, skipped: name -> why, versions: name -> version)."""
    systems: list[Any] = []
    skipped: dict[str, str] = {}
    versions: dict[str, str] = {}
    for name in names:
        if name not in wanted:
            continue
        s = factories[name]()
        why = s.missing()
        if why is None and shutil.which("fusermount3") is None and name != "pqfs":
            why = "fusermount3 not found (apt-get install fuse3)"
        if why:
            print(f"bench: skipping {name}: {why}", file=sys.stderr)
            skipped[name] = why
            continue
        versions[name] = s.version()
        systems.append(s)
    return systems, skipped, versions


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=parse_size, default=GiB, help="big file size (default 1G)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help="comma-separated subset of pqfs,gocryptfs,rclone (default: all)",
    )
    ap.add_argument("--files", type=int, default=50, help="small files, all held open for RSS")
    ap.add_argument("--latency-files", type=int, default=20, help="small files for cold open")
    ap.add_argument("--small-size", type=parse_size, default=4 * MiB)
    ap.add_argument("--random-reads", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds before the open-files RSS")
    add_quiet_host_argument(ap)
    ap.add_argument("--pqfs-cache-size", default="64M", help="pqfs mount --cache-size")
    ap.add_argument(
        "--pqfs-args", default="", help="more pqfs mount options, e.g. --pqfs-args='--idle-poll 0'"
    )
    args = ap.parse_args()

    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(ALL_SYSTEMS))
    if unknown or not wanted:
        ap.error(f"--systems: unknown {unknown}; choose from {','.join(ALL_SYSTEMS)}")
    if args.size < MiB or args.small_size < READ:
        ap.error("--size must be at least 1M and --small-size at least 64K")
    if args.rounds < 1 or not 1 <= args.latency_files <= args.files <= 100:
        ap.error("need --rounds >= 1 and 1 <= --latency-files <= --files <= 100")
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK) or os.geteuid() != 0:
        print("bench: must run as root (writes /proc/sys/vm/drop_caches)", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="bench-mount-", dir="/tmp"))
    factories: dict[str, Callable[[], System]] = {
        "pqfs": lambda: Pqfs(work, args.pqfs_cache_size, args.pqfs_args.split()),
        "gocryptfs": lambda: Gocryptfs(work),
        "rclone": lambda: Rclone(work),
    }
    systems, skipped, versions = pick_systems(ALL_SYSTEMS, wanted, factories)
    if not systems:
        print("bench: no system to measure", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 1

    try:
        with interrupts_as_keyboard():
            plain = work / "plain"
            heads = prepare(systems, plain, args)
            rng = random.Random(args.seed)
            offsets = [rng.randrange(0, args.size - READ + 1) for _ in range(args.random_reads)]
            results: dict[str, list[dict[str, float]]] = {s.name: [] for s in systems}
            for r in range(args.rounds):
                for s in systems:
                    log(f"round {r + 1}/{args.rounds}: {s.name}")
                    res = measure(s, args, offsets, plain, heads)
                    results[s.name].append(res)
                    log(
                        f"  seq {res['seq_gbps']:.3f} GB/s, rand p50 {res['rand_p50_ms']:.3f} ms "
                        f"p99 {res['rand_p99_ms']:.3f} ms, open {res['open_ms']:.3f} ms, "
                        f"cpu {res['cpu_s_per_gib']:.2f} s/GiB, rss {res['rss_read_mib']:.0f}/"
                        f"{res['rss_open_mib']:.0f} MiB"
                    )
            print()
            report(args, systems, results, versions, skipped, work)
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted; unmounting", file=sys.stderr)
        return 130
    finally:
        for s in systems:
            s.cleanup()
        remove_work(systems, work)


if __name__ == "__main__":
    sys.exit(main())
