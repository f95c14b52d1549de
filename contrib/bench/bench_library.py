#!/usr/bin/env python3
"""A media library as users have one, pqfs against gocryptfs, side by side in one run (needs
root: it drops the page cache).

  python contrib/bench/bench_library.py [--files 100000] [--rounds 3] [--systems pqfs,gocryptfs]

The library: --files files in --files/20 directories (90 % of 1-16 KiB: .nfo, .srt, covers;
9 % of 16-128 KiB; 1 % of 1-8 MiB media under media/) and one 64 MiB film, big.bin. Setup
puts it into each system, timed: `pqfs add` against `cp -r` into the gocryptfs mount and
`sync` (both end durable), as files/s. Then, per round (systems alternated, fresh mounts, the
page cache dropped before every figure):
- mount: from the command to the mount answering a stat of big.bin;
- `find MNT -type f` and `ls -lR MNT`;
- a scan as a media server does one: open, read the first 4 KiB, read the last 4 KiB, close,
  of every file, on one thread and on 4;
- `cp -r` of media/ (and big.bin) out of the mount, MiB/s;
- for pqfs: the daemon's RSS, its longest event-loop stall and GC pause, and what it
  decrypted per byte read.
Medians over the rounds and ratios pqfs / gocryptfs (above 1 favours pqfs for rates, below 1
for times). mpv seeks, mutagen and ffprobe passes (issue 18) are not in it yet.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mount import (
    Gocryptfs,
    Pqfs,
    System,
    drop_caches,
    log,
    machine,
    pqfs_stats,
    ratio_table,
    rss_mib,
    run,
    timed,
)

MiB = 1 << 20
FILM = 64 * MiB


def make_library(root: Path, n: int, seed: int = 1) -> tuple[list[str], int]:
    """The library's files (relative paths) and total bytes."""
    rng = random.Random(seed)
    names, total = [], 0
    dirs = max(1, n // 20)
    for i in range(n):
        r = rng.random()
        if r < 0.01 or i == 0:  # (at least one: media/ is what cp copies out)
            rel, size = f"media/m{i % 50:02d}/{i:06d}.flac", rng.randrange(1 * MiB, 8 * MiB)
        elif r < 0.10:
            rel, size = f"lib/d{i % dirs:05d}/{i:06d}.jpg", rng.randrange(16 << 10, 128 << 10)
        else:
            rel, size = f"lib/d{i % dirs:05d}/{i:06d}.nfo", rng.randrange(1 << 10, 16 << 10)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        names.append(rel)
        total += size
    (root / "big.bin").write_bytes(rng.randbytes(FILM))
    names.append("big.bin")
    return names, total + FILM


class LibPqfs(Pqfs):
    def setup(self, plain: Path) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        run([*self.cmd(), "init", self.vault], env=self.env)
        t0 = time.perf_counter()
        for entry in sorted(os.listdir(plain)):
            run(
                [*self.cmd(), "add", self.vault, str(plain / entry), entry],
                env=self.env,
                timeout=7200,
            )
        self.ingest_s = time.perf_counter() - t0


class LibGocryptfs(Gocryptfs):
    def setup(self, plain: Path) -> None:
        os.makedirs(self.cipher)
        os.makedirs(self.mnt)
        with open(os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write("bench passphrase\n")
        run([self.tool, "-init", "-q", "-passfile", self.passfile, self.cipher])
        run([self.tool, "-q", "-passfile", self.passfile, self.cipher, self.mnt])
        try:
            t0 = time.perf_counter()
            for entry in os.listdir(plain):
                run(["cp", "-r", str(plain / entry), self.mnt], timeout=7200)
            run(["sync"])
            self.ingest_s = time.perf_counter() - t0
        finally:
            self._umount()


def scan_one(path: str) -> int:
    """What a media server's scanner does to a file: open, head, tail, close."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, 4096, 0)
        size = os.fstat(fd).st_size
        tail = os.pread(fd, 4096, max(0, size - 4096))
        return len(head) + len(tail)
    finally:
        os.close(fd)


def scan(mnt: str, names: list[str], threads: int) -> float:
    paths = [os.path.join(mnt, n) for n in names]
    t0 = time.perf_counter()
    if threads == 1:
        for p in paths:
            scan_one(p)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(scan_one, paths, chunksize=64))
    return len(paths) / (time.perf_counter() - t0)


PQFS_STATS = ("loop_stall_max_ms", "gc_pause_max_ms", "decrypted_per_byte_read", "opens")


def one_round(s: System, names: list[str], media_bytes: int, out: Path) -> dict[str, float]:
    drop_caches()
    t0 = time.perf_counter()
    s.mount(FILM)
    row: dict[str, float] = {"mount_s": time.perf_counter() - t0}
    try:
        drop_caches()
        row["find_s"] = timed(
            lambda: subprocess.run(["find", s.mnt, "-type", "f"], capture_output=True, check=True)
        )
        drop_caches()
        row["ls_lR_s"] = timed(
            lambda: subprocess.run(["ls", "-lR", s.mnt], capture_output=True, check=True)
        )
        drop_caches()
        row["scan1_files_s"] = scan(s.mnt, names, 1)
        drop_caches()
        row["scan4_files_s"] = scan(s.mnt, names, 4)
        drop_caches()
        dest = out / f"cp-{s.name}"
        took = timed(
            lambda: (
                subprocess.run(["cp", "-r", os.path.join(s.mnt, "media"), str(dest)], check=True),
                subprocess.run(["cp", os.path.join(s.mnt, "big.bin"), str(dest)], check=True),
            )
        )
        shutil.rmtree(dest)
        row["cp_MiB_s"] = (media_bytes + FILM) / MiB / took
        if s.pid is not None:
            row["rss_MiB"] = rss_mib(s.pid)
        row.update(pqfs_stats(s, PQFS_STATS))
    finally:
        s.umount()
    return row


HIGHER_IS_BETTER = {"scan1_files_s", "scan4_files_s", "cp_MiB_s", "ingest_files_s"}


def report(results: dict[str, list[dict[str, float]]], systems: list[System], n: int) -> None:
    names = [s.name for s in systems]
    ratio_table(results, names, HIGHER_IS_BETTER)
    print(f"\n({n} files; every round: {', '.join(names)} alternated)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", default="pqfs,gocryptfs")
    ap.add_argument("--dir", help="work directory (default: one under /var/tmp)")
    ap.add_argument("--cache-size", default="64M", help="pqfs mount --cache-size")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_library needs root (it drops the page cache)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-library-", dir=a.dir or "/var/tmp"))
    os.environ.setdefault("PQFS_STATE_DIR", str(work / "state"))
    avail: dict[str, Callable[[], System]] = {
        "pqfs": lambda: LibPqfs(work, a.cache_size),
        "gocryptfs": lambda: LibGocryptfs(work),
    }
    systems: list[System] = []
    for name in a.systems.split(","):
        s = avail[name]()
        why = s.missing()
        if why:
            log(f"{name}: skipped ({why}; scripts/install.sh --bench installs the peers)")
            continue
        systems.append(s)
    try:
        print(f"# bench_library {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
        plain = work / "plain"
        log(f"making a library of {a.files} files")
        names, total = make_library(plain, a.files)
        media = sum((plain / n).stat().st_size for n in names if n.startswith("media/"))
        print(f"# {len(names)} files, {total / MiB:.0f} MiB; systems: "
              + ", ".join(s.version() for s in systems))  # fmt: skip
        results: dict[str, list[dict[str, float]]] = {s.name: [] for s in systems}
        for s in systems:
            log(f"{s.name}: ingest")
            s.setup(plain)
            results[s.name].append({"ingest_files_s": len(names) / s.ingest_s})  # type: ignore[attr-defined]
        for r in range(a.rounds):
            order = systems if r % 2 == 0 else list(reversed(systems))
            for s in order:
                log(f"round {r + 1}: {s.name}")
                results[s.name].append(one_round(s, names, media, work))
        report(results, systems, len(names))
        return 0
    finally:
        for s in systems:
            s.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
