#!/usr/bin/env python3
"""Writes into encrypted FUSE mounts, pqfs against gocryptfs and rclone crypt, side by side in
one run, every figure taken until what was written is durable (needs root: it drops the page
cache).

  python contrib/bench/bench_writes.py [--big-size 1G] [--small-files 10000] [--rounds 3]
      [--edit-size SIZE] [--systems pqfs,gocryptfs,rclone] [--json FILE]

Setup, untimed: a random file of --big-size on the local disk (what `cp` copies in), and a
FLAC-like file of --edit-size (default: --big-size; "fLaC", a STREAMINFO block, a PADDING block
up to 16 KiB, then random "audio frames"), put into every system and durable there (`pqfs add`;
a copy into the gocryptfs mount; `rclone copy` to the crypt remote); then --quiet-host. Then,
per round, figure after figure, the systems one after the other (the order reversed every
other round), every figure on a fresh mount with the page cache dropped right before it:

  big     `cp` of the local file into the mount, then durable: MiB/s over both (and both
          parts, in seconds)
  small   --small-files files of 1-16 KiB (random) in --small-files/10 directories (at most
          100): a Python loop of mkdir, then open/write/close per file, then durable: files/s;
          then `rm -r` of them (shutil.rmtree), until durable, files/s
  edit    open, a 4 KiB pwrite at offset 4096 (in the FLAC padding, where a tag editor writes),
          close, durable: seconds from the open to durable. pqfs's commit writes the whole file
          again as a new object (edit_committed_MiB: pqfs stats bytes_committed); gocryptfs
          rewrites the 4 KiB block; rclone, after the close, fetches the rest of the file
          into its VFS cache (empty at the mount) and uploads all of it
  memory  the mount daemon's peak RSS during each figure (VmHWM, which the kernel keeps, reset
          through /proc/PID/clear_refs right before the figure: no spike between two samples
          is missed), and for pqfs `pqfs stats --json` before each unmount: longest event-loop
          stall and GC pause (table: the most of the round's mounts), commits, bytes committed,
          staging waits; a stall over 10 ms is logged with its task. small's include its rm -r

Durable means: pqfs: `pqfs sync MNT` returned (a commit is fsynced); gocryptfs: sync(1)
returned (gocryptfs writes through to its backing files); rclone: its log (-v) shows every
file's upload done ("Copied"), then sync(1) (the local backend does not fsync). rclone mounts
with --vfs-cache-mode writes --vfs-write-back 0s (uploads start at the close rather than 5 s
after it) and an empty --cache-dir per mount. Its rc `vfs/stats` upload counters were tried
first: on rclone v1.60.1 they stay 0 while an upload runs, so they cannot tell when it ended.
After every figure, untimed: the files are checked in the mount (sizes; the copy at sampled
offsets; the edit read back), pqfs has nothing pending, and rclone's backend holds exactly the
encrypted sizes of the files the mount holds.

Medians over the rounds and ratios pqfs / peer (rates: above 1 favours pqfs; times and memory:
below 1 does). --json FILE also writes the results, every round included. A tiny run takes
seconds: --big-size 8M --small-files 50 --rounds 1 --quiet-host 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mount import (
    ALL_SYSTEMS,
    Gocryptfs,
    Pqfs,
    Rclone,
    System,
    add_quiet_host_argument,
    drop_caches,
    host_wait_line,
    human,
    interrupts_as_keyboard,
    log,
    machine,
    parse_size,
    pick_systems,
    pqfs_stats,
    ratio_table,
    remove_work,
    reset_rss_peak,
    rss_peak_mib,
    run,
    wait_for_quiet_host,
)

MiB = 1 << 20
GiB = 1 << 30
EDIT_NAME = "edit.flac"
EDIT_AT, EDIT_LEN = 4096, 4096
DURABLE_TIMEOUT = 3600.0  # a bound for a hung system, not a figure

# Figures kept from `pqfs stats --json` before each unmount (per figure, in the rounds).
PQFS_STATS = (
    "loop_stall_max_ms",
    "gc_pause_max_ms",
    "commits",
    "files_committed",
    "bytes_committed",
    "ops_committed",
    "staging_waits",
    "commit_failures",
)
PENDING = ("pending_files", "pending_ops", "pending_bytes", "commit_failures")

# The report's rows, in order: key, better, what it is.
FIGURES = [
    ("big_MiB_s", "higher", "cp of the big file into the mount + durable, MiB/s"),
    ("big_cp_s", "lower", "  of which cp, s"),
    ("big_durable_s", "lower", "  of which durable after cp exited, s"),
    ("small_files_s", "higher", "small files created + durable, files/s"),
    ("small_write_s", "lower", "  of which the create loop, s"),
    ("small_durable_s", "lower", "  of which durable after the loop, s"),
    ("small_rm_files_s", "higher", "rm -r of the small files + durable, files/s"),
    ("edit_s", "lower", "4 KiB edit at 4096 of the FLAC-like file, open to durable, s"),
    ("edit_write_s", "lower", "  of which open + pwrite + close, s"),
    ("edit_durable_s", "lower", "  of which durable after the close, s"),
    ("big_rss_peak_MiB", "lower", "daemon peak RSS during big, MiB"),
    ("small_rss_peak_MiB", "lower", "daemon peak RSS during small (rm -r included), MiB"),
    ("edit_rss_peak_MiB", "lower", "daemon peak RSS during edit, MiB"),
    ("loop_stall_max_ms", "lower", "pqfs: longest event-loop stall, most of the 3 mounts, ms"),
    ("gc_pause_max_ms", "lower", "pqfs: longest GC pause, most of the 3 mounts, ms"),
    ("edit_committed_MiB", "lower", "pqfs: bytes the edit's commit wrote, MiB"),
]
HIGHER_IS_BETTER = {k for k, better, _ in FIGURES if better == "higher"}


def crypt_size(n: int) -> int:
    """The size of rclone crypt's encryption of n bytes: a 32-byte header, then 64 KiB blocks
    with 16 bytes of overhead each."""
    return 32 + n + 16 * -(-n // 65536)


# ------------------------------------------------------------------------- systems ----


class WPqfs(Pqfs):
    probe = EDIT_NAME

    def setup(self, plain: Path) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        run([*self.cmd(), "init", self.vault], env=self.env)
        run([*self.cmd(), "add", self.vault, str(plain / EDIT_NAME), EDIT_NAME], env=self.env)

    def mark(self) -> None:
        pass

    def durable(self, uploads: int) -> None:
        run([*self.cmd(), "sync", self.mnt], timeout=DURABLE_TIMEOUT)

    def check(self, sizes: list[int]) -> None:
        left = pqfs_stats(self, PENDING, log_stall=False)
        if any(left.values()):
            raise RuntimeError(f"pqfs: `pqfs sync {self.mnt}` returned, and still: {left}")


class WGocryptfs(Gocryptfs):
    probe = EDIT_NAME

    def _mount(self) -> None:  # read-write: Gocryptfs mounts -ro
        run([self.tool, "-q", "-passfile", self.passfile, self.cipher, self.mnt])

    def mark(self) -> None:
        pass

    def durable(self, uploads: int) -> None:
        run(["sync"], timeout=DURABLE_TIMEOUT)

    def check(self, sizes: list[int]) -> None:
        pass


class WRclone(Rclone):
    probe = EDIT_NAME

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.cache = self.work / "vfs-cache"
        self.logfile = self.work / "rclone.log"
        self._mark = 0

    def _mount(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True)
        run(
            [
                *(self.tool, "mount", f"{self.remote}:", self.mnt, "--daemon"),
                *("--vfs-cache-mode", "writes", "--vfs-write-back", "0s"),
                *("--cache-dir", str(self.cache), "-v", "--log-file", str(self.logfile)),
            ],
            env=self.env,
        )

    def umount(self) -> None:
        super().umount()
        shutil.rmtree(self.cache, ignore_errors=True)

    def mark(self) -> None:
        """What the log holds now: durable() counts the uploads logged after it."""
        self._mark = self.logfile.stat().st_size

    def durable(self, uploads: int) -> None:
        self.wait_uploads(uploads)
        run(["sync"], timeout=DURABLE_TIMEOUT)

    def wait_uploads(self, n: int) -> None:
        """Until the log shows n uploads done since mark(): rclone logs "NAME: Copied (new)" or
        "(replaced existing)" once an upload has been written to the backend."""
        deadline = time.monotonic() + DURABLE_TIMEOUT
        done, pos, rest = 0, self._mark, b""
        with open(self.logfile, "rb") as f:
            while done < n:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
                *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    if b": Copied (" in line:
                        done += 1
                    elif b"ERROR" in line:
                        raise RuntimeError(f"rclone: {line.decode(errors='replace')}")
                if done >= n:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"rclone: {done} of {n} uploads done after {DURABLE_TIMEOUT:.0f} s"
                    )
                time.sleep(0.005)

    def check(self, sizes: list[int]) -> None:
        """The backend holds exactly the encryptions of the mount's files: every upload is done
        and nothing else is there."""
        got = sorted(
            os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(self.store)
            for f in files
        )
        want = sorted(crypt_size(n) for n in sizes)
        if got != want:
            raise RuntimeError(
                f"rclone: backend holds {len(got)} files, {sum(got)} bytes; "
                f"expected {len(want)} files, {sum(want)} bytes"
            )


Writer = WPqfs | WGocryptfs | WRclone


# ------------------------------------------------------------------------ the data ----


def write_random(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(head)
        left = size - len(head)
        while left > 0:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def flac_head() -> bytes:
    """The head of a FLAC file: "fLaC", a STREAMINFO block (44.1 kHz, 2 channels, 16 bits) and a last PADDING block up
    to 16 KiB: a tag editor writes its new tags into that padding, in place."""
    info = struct.pack(">HH", 4096, 4096) + b"\0\0\0" * 2  # block sizes, frame sizes unknown
    info += ((44100 << 44) | (1 << 41) | (15 << 36)).to_bytes(8, "big") + os.urandom(16)
    blocks = b"\x00" + len(info).to_bytes(3, "big") + info
    pad = 16384 - 4 - len(blocks) - 4
    return b"fLaC" + blocks + b"\x81" + pad.to_bytes(3, "big") + b"\0" * pad


def small_plan(n: int, seed: int) -> tuple[list[str], list[tuple[str, int]]]:
    """Directories and (path, size) of n files of 1-16 KiB."""
    rng = random.Random(seed)
    ndirs = max(1, min(100, n // 10))
    dirs = [f"d{i:03d}" for i in range(ndirs)]
    files = [(f"{dirs[i % ndirs]}/f{i:06d}.nfo", rng.randint(1 << 10, 16 << 10)) for i in range(n)]
    return dirs, files


# ---------------------------------------------------------------------- the figures ----


class Figure:
    """One figure on a fresh mount: the page cache dropped, the daemon's peak RSS reset, the
    log marked; afterwards its peak RSS and pqfs's stats, prefixed with the figure's name."""

    def __init__(self, s: Writer, name: str, edit_size: int) -> None:
        self.s, self.name, self.edit_size = s, name, edit_size
        self.row: dict[str, float] = {}

    def __enter__(self) -> Figure:
        self.s.mount(self.edit_size)
        try:
            self.start()
        except BaseException:
            self.s.umount()
            raise
        return self

    def start(self) -> None:
        drop_caches()
        assert self.s.pid is not None
        self.peak_reset = reset_rss_peak(self.s.pid)
        self.s.mark()

    def measured(self) -> None:
        """The figure is taken: its peak RSS and pqfs's stats, before any untimed work."""
        assert self.s.pid is not None
        self.row[f"{self.name}_rss_peak_MiB"] = rss_peak_mib(self.s.pid)
        for k, v in pqfs_stats(self.s, PQFS_STATS).items():
            self.row[f"{self.name}_{k}"] = v

    def __exit__(self, *exc: object) -> None:
        self.s.umount()


def fig_big(s: Writer, src: Path, size: int, edit_size: int, r: int) -> dict[str, float]:
    dest = Path(s.mnt) / f"big-{r}.bin"
    with Figure(s, "big", edit_size) as fig:
        t0 = time.perf_counter()
        run(["cp", str(src), str(dest)], timeout=DURABLE_TIMEOUT)
        t1 = time.perf_counter()
        s.durable(1)
        t2 = time.perf_counter()
        fig.measured()
        check_copy(s, src, dest, size)
        s.check([size, edit_size])
        os.unlink(dest)  # untimed: every round starts from the same vault
        s.mark()
        s.durable(0)
    fig.row.update(big_cp_s=t1 - t0, big_durable_s=t2 - t1, big_MiB_s=size / MiB / (t2 - t0))
    return fig.row


def check_copy(s: Writer, src: Path, dest: Path, size: int, samples: int = 16) -> None:
    """The copy has the size of the original, and its bytes at sampled offsets (first and last
    64 KiB included)."""
    if os.stat(dest).st_size != size:
        raise RuntimeError(f"{s.name}: {dest} has {os.stat(dest).st_size} bytes, not {size}")
    rng = random.Random(size)
    n = min(size, 64 << 10)
    offsets = [0, size - n] + [rng.randrange(0, size - n + 1) for _ in range(samples)]
    with open(src, "rb") as a, open(dest, "rb") as b:
        for off in offsets:
            if os.pread(a.fileno(), n, off) != os.pread(b.fileno(), n, off):
                raise RuntimeError(f"{s.name}: {dest} differs from {src} at {off}")


def fig_small(
    s: Writer, plan: tuple[list[str], list[tuple[str, int]]], edit_size: int, r: int
) -> dict[str, float]:
    dirs, files = plan
    total = sum(size for _, size in files)
    blob = memoryview(os.urandom(total))  # every file's bytes its own
    root = os.path.join(s.mnt, f"small-{r}")
    with Figure(s, "small", edit_size) as fig:
        t0 = time.perf_counter()
        os.mkdir(root)
        for d in dirs:
            os.mkdir(os.path.join(root, d))
        off = 0
        for rel, size in files:
            with open(os.path.join(root, rel), "wb") as f:
                f.write(blob[off : off + size])
            off += size
        t1 = time.perf_counter()
        s.durable(len(files))
        t2 = time.perf_counter()
        found = sorted(
            (os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
            for d, _, names in os.walk(root)
            for f in names
        )
        if found != sorted(files):
            raise RuntimeError(f"{s.name}: {root} holds {len(found)} files, not as written")
        s.check([edit_size, *(size for _, size in files)])
        # rm -r, also timed, on the same mount (the page cache dropped again)
        drop_caches()
        s.mark()
        t3 = time.perf_counter()
        shutil.rmtree(root)
        s.durable(0)
        t4 = time.perf_counter()
        fig.measured()
        s.check([edit_size])
    n = len(files)
    fig.row.update(
        small_write_s=t1 - t0,
        small_durable_s=t2 - t1,
        small_files_s=n / (t2 - t0),
        small_rm_files_s=n / (t4 - t3),
    )
    return fig.row


def fig_edit(s: Writer, edit_size: int) -> dict[str, float]:
    path = os.path.join(s.mnt, EDIT_NAME)
    data = os.urandom(EDIT_LEN)
    with Figure(s, "edit", edit_size) as fig:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.pwrite(fd, data, EDIT_AT) != EDIT_LEN:
                raise RuntimeError(f"{s.name}: short write into {path}")
        finally:
            os.close(fd)
        t1 = time.perf_counter()
        s.durable(1)
        t2 = time.perf_counter()
        fig.measured()
        with open(path, "rb") as f:
            if os.pread(f.fileno(), EDIT_LEN, EDIT_AT) != data:
                raise RuntimeError(f"{s.name}: the edit does not read back from {path}")
        if os.stat(path).st_size != edit_size:
            raise RuntimeError(f"{s.name}: {path} changed size with the edit")
        s.check([edit_size])
    fig.row.update(edit_write_s=t1 - t0, edit_durable_s=t2 - t1, edit_s=t2 - t0)
    if "edit_bytes_committed" in fig.row:
        fig.row["edit_committed_MiB"] = fig.row["edit_bytes_committed"] / MiB
    return fig.row


def round_maxima(row: dict[str, float]) -> None:
    """The round's longest stall and GC pause: the most of its figures' mounts."""
    for k in ("loop_stall_max_ms", "gc_pause_max_ms"):
        vals = [row[f"{fig}_{k}"] for fig in ("big", "small", "edit") if f"{fig}_{k}" in row]
        if vals:
            row[k] = max(vals)


# ------------------------------------------------------------------------- reporting ----


def report(
    args: argparse.Namespace,
    systems: list[Writer],
    results: dict[str, list[dict[str, float]]],
    versions: dict[str, str],
    skipped: dict[str, str],
    work: Path,
) -> dict[str, dict[str, float | None]]:
    names = [s.name for s in systems]
    print(f"pqfs writes benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}")
    for name in names:
        print(f"version: {versions[name]}")
    for name, why in skipped.items():
        print(f"skipped: {name}: {why}")
    ndirs = len(small_plan(args.small_files, args.seed)[0])
    print(
        f"data: cp of a {human(args.big_size)} random file from {work.parent}; "
        f"{args.small_files} files of 1-16 KiB in {ndirs} directories; a 4 KiB edit at offset "
        f"{EDIT_AT} of a {human(args.edit_size)} FLAC-like file; backing stores on "
        f"{work.parent}; {args.rounds} rounds, systems alternated ({' -> '.join(names)}, "
        f"reversed every other round), a fresh mount per figure, page cache dropped before each"
    )
    print(host_wait_line(args))
    described = {
        "pqfs": f"pqfs mount --cache-size {args.pqfs_cache_size} {args.pqfs_args} (writable; "
        "durable: pqfs sync)".replace("  ", " "),
        "gocryptfs": "gocryptfs (defaults; durable: sync)",
        "rclone": "rclone crypt over a local directory, mount --vfs-cache-mode writes "
        "--vfs-write-back 0s, fresh --cache-dir (durable: uploads logged done, then sync)",
    }
    print(f"mounts: {'; '.join(described[n] for n in names)}")
    medians = ratio_table(results, names, HIGHER_IS_BETTER, [k for k, _, _ in FIGURES])
    print()
    print("ratios are pqfs / peer: for rates (higher favours pqfs) > 1 favours pqfs, for times")
    print("and memory (lower favours pqfs) < 1 does. The figures:")
    for k, _, what in FIGURES:
        print(f"  {k:<20} {what}")
    print()
    print("all rounds:")
    for k, _, _ in FIGURES:
        for n in names:
            vals = [row[k] for row in results[n] if k in row]
            if vals:
                print(f"  {k:<20} {n:<10} {' '.join(f'{v:.4g}' for v in vals)}")
    if "pqfs" in names:
        print()
        print("pqfs stats --json before each unmount, per figure, all rounds:")
        for fig in ("big", "small", "edit"):
            for k in PQFS_STATS:
                vals = [row[f"{fig}_{k}"] for row in results["pqfs"] if f"{fig}_{k}" in row]
                if vals:
                    print(f"  {fig:<6} {k:<18} {' '.join(f'{v:.6g}' for v in vals)}")
        committed = medians["edit_committed_MiB"]["pqfs"]
        if committed is not None:
            print(
                f"pqfs: the 4 KiB edit's commit wrote {committed:.1f} MiB (median): the whole "
                f"{human(args.edit_size)} file, as a new object"
            )
    return medians


def pqfs_ratios(medians: dict[str, float | None]) -> dict[str, float]:
    """pqfs / peer of one figure's medians, for every peer that has one."""
    mine = medians.get("pqfs")
    out = {}
    for peer, theirs in medians.items():
        if peer != "pqfs" and mine is not None and theirs:
            out[peer] = mine / theirs
    return out


# ---------------------------------------------------------------------------- main ----


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--big-size", type=parse_size, default=GiB, help="file cp copies (1G)")
    ap.add_argument("--small-files", type=int, default=10_000, help="small files created")
    ap.add_argument(
        "--edit-size", type=parse_size, help="size of the edited FLAC-like file (--big-size)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help="comma-separated subset of pqfs,gocryptfs,rclone (default: all)",
    )
    ap.add_argument("--seed", type=int, default=1, help="of the small files' sizes")
    ap.add_argument("--dir", help="work directory (default: one under /var/tmp)")
    add_quiet_host_argument(ap)
    ap.add_argument("--pqfs-cache-size", default="64M", help="pqfs mount --cache-size")
    ap.add_argument("--pqfs-args", default="", help="more pqfs mount options")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args()
    args.edit_size = args.edit_size or args.big_size

    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(ALL_SYSTEMS))
    if unknown or not wanted:
        ap.error(f"--systems: unknown {unknown}; choose from {','.join(ALL_SYSTEMS)}")
    if args.edit_size < 64 << 10 or args.big_size < 64 << 10:
        ap.error("--edit-size and --big-size must be at least 64K")
    if args.rounds < 1 or args.small_files < 1:
        ap.error("need --rounds >= 1 and --small-files >= 1")
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK) or os.geteuid() != 0:
        print("bench: must run as root (writes /proc/sys/vm/drop_caches)", file=sys.stderr)
        return 1

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-writes-", dir=args.dir or "/var/tmp"))
    os.environ.setdefault("PQFS_STATE_DIR", str(work / "state"))
    pqfs_log = work / "pqfs" / "mount.log"
    factories: dict[str, Callable[[], Writer]] = {
        "pqfs": lambda: WPqfs(
            work, args.pqfs_cache_size, ["--log-file", str(pqfs_log), *args.pqfs_args.split()]
        ),
        "gocryptfs": lambda: WGocryptfs(work),
        "rclone": lambda: WRclone(work),
    }
    systems: list[Writer]
    systems, skipped, versions = pick_systems(ALL_SYSTEMS, wanted, factories)
    if not systems:
        print("bench: no system to measure", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 1

    try:
        with interrupts_as_keyboard():
            src, plain = work / "src" / "big.bin", work / "plain"
            src.parent.mkdir()
            plain.mkdir()
            log(f"writing {human(args.big_size)} and {human(args.edit_size)} of random data")
            write_random(src, args.big_size)
            write_random(plain / EDIT_NAME, args.edit_size, flac_head())
            for s in systems:
                log(f"setup {s.name} (untimed)")
                s.setup(plain)
            plain_edit = plain / EDIT_NAME
            plain_edit.unlink()  # the systems have it; the rounds edit their copies
            args.host_wait = wait_for_quiet_host(args.quiet_host)
            log(host_wait_line(args))
            plan = small_plan(args.small_files, args.seed)
            results: dict[str, list[dict[str, float]]] = {s.name: [] for s in systems}
            for r in range(args.rounds):
                order = systems if r % 2 == 0 else systems[::-1]
                rows: dict[str, dict[str, float]] = {s.name: {} for s in systems}
                for s in order:
                    log(f"round {r + 1}/{args.rounds}: {s.name}: cp {human(args.big_size)}")
                    row = fig_big(s, src, args.big_size, args.edit_size, r)
                    log(f"  {row['big_MiB_s']:.1f} MiB/s (cp {row['big_cp_s']:.2f} s, durable "
                        f"{row['big_durable_s']:.2f} s), peak RSS {row['big_rss_peak_MiB']:.0f} MiB")  # fmt: skip
                    rows[s.name].update(row)
                for s in order:
                    log(f"round {r + 1}/{args.rounds}: {s.name}: {args.small_files} small files")
                    row = fig_small(s, plan, args.edit_size, r)
                    log(f"  {row['small_files_s']:.0f} files/s (loop {row['small_write_s']:.2f} s, "
                        f"durable {row['small_durable_s']:.2f} s), rm -r "
                        f"{row['small_rm_files_s']:.0f} files/s, peak RSS "
                        f"{row['small_rss_peak_MiB']:.0f} MiB")  # fmt: skip
                    rows[s.name].update(row)
                for s in order:
                    log(f"round {r + 1}/{args.rounds}: {s.name}: 4 KiB edit")
                    row = fig_edit(s, args.edit_size)
                    log(f"  {row['edit_s']:.2f} s (write {row['edit_write_s']:.3f} s, durable "
                        f"{row['edit_durable_s']:.2f} s), peak RSS {row['edit_rss_peak_MiB']:.0f} MiB")  # fmt: skip
                    rows[s.name].update(row)
                for s in systems:
                    round_maxima(rows[s.name])
                    results[s.name].append(rows[s.name])
            print()
            medians = report(args, systems, results, versions, skipped, work)
            if args.json:
                ratios = {k: pqfs_ratios(m) for k, m in medians.items()}
                with open(args.json, "w") as f:
                    json.dump(
                        {
                            "date": datetime.now(UTC).isoformat(timespec="seconds"),
                            "machine": machine(),
                            "versions": versions,
                            "skipped": skipped,
                            "args": {k: v for k, v in vars(args).items() if k != "json"},
                            "runtime_s": round(time.monotonic() - started, 1),
                            "higher_is_better": sorted(HIGHER_IS_BETTER),
                            "medians": medians,
                            "ratios_pqfs_over_peer": ratios,
                            "rounds": results,
                        },
                        f,
                        indent=1,
                    )
                print(f"\nJSON: {args.json}")
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted; unmounting", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        if pqfs_log.exists():
            tail = pqfs_log.read_text(errors="replace").splitlines()[-20:]
            print("bench: the pqfs mount log ends:\n  " + "\n  ".join(tail), file=sys.stderr)
        return 1
    finally:
        for s in systems:
            s.cleanup()
        remove_work(list[System](systems), work)


if __name__ == "__main__":
    sys.exit(main())
