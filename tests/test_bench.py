"""The benchmarks still run end to end (tiny sizes; no figure is asserted), and the mount
benchmark's wait for a quiet host ends both ways and leaves no spinner behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "contrib" / "bench"
sys.path.insert(0, str(BENCH))

import bench_mount  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark drops the page cache")


@pytest.mark.fuse
def test_bench_mount_runs_and_reports(tmp_path: Path) -> None:
    args = [
        *("--size", "4M", "--small-size", "64K", "--files", "4", "--latency-files", "2"),
        *("--random-reads", "10", "--rounds", "2", "--systems", "pqfs", "--quiet-host", "0"),
    ]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    before = set(Path("/tmp").glob("bench-mount-*"))  # another run's, or one killed earlier
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_mount.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # a bound for a hung run, not a figure: the machine may be busy
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "host steal after the setup (both vCPUs kept busy): not waited for" in out
    assert "seq read GB/s (1 MiB reads)" in out
    # two rounds measured, each with its own figure
    seq = next(line for line in out.splitlines() if "seq read GB/s" in line and "pqfs " in line)
    *_, name, first, second = seq.split()
    assert name == "pqfs" and float(first) > 0 and float(second) > 0, seq
    assert "pqfs longest event-loop stall over all rounds" in out
    left = set(Path("/tmp").glob("bench-mount-*")) - before
    assert not left, f"work directory left behind: {left}"


def test_quiet_host_wait_ends_when_quiet() -> None:
    # any steal counts as quiet here: the wait ends after one window (its first sample, taken
    # after a 1 s sleep that a busy machine may stretch: the seconds shown are not asserted)
    got = bench_mount.wait_for_quiet_host(limit=30, window=1, allowed_ms=1e9)
    shape = r"quiet after \d+ s \(\d+ ms of steal while waiting, \d+ ms in the last 1 s\)"
    assert re.fullmatch(shape, got), got


def test_quiet_host_wait_gives_up_at_its_limit() -> None:
    # no steal is ever quiet enough here: the wait gives up at its limit (2 s, or the first
    # sample after it on a busy machine) and says so
    got = bench_mount.wait_for_quiet_host(limit=2, window=1, allowed_ms=-1)
    m = re.fullmatch(r"NOT quiet after (\d+) s \(\d+ ms of steal in the last 1 s\): .+", got)
    assert m is not None and int(m.group(1)) >= 2, got


def test_quiet_host_wait_can_be_skipped() -> None:
    assert bench_mount.wait_for_quiet_host(limit=0) == "not waited for (--quiet-host 0)"


def _spinners(parent: int) -> list[int]:
    """The spinners started by the benchmark process `parent` (not another run's)."""
    mine = f"parent = {parent}\nwhile os.getppid() == parent".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if mine in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_quiet_host_spinners_stop_when_the_benchmark_is_killed() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import bench_mount; "
        "bench_mount.wait_for_quiet_host(limit=60, window=60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120  # it syncs and drops the page cache first
        while not _spinners(proc.pid):
            assert time.monotonic() < deadline, "no spinner started"
            time.sleep(0.1)
    finally:
        proc.kill()  # no finally of the benchmark's runs
        proc.wait()
    deadline = time.monotonic() + 120  # a killed nice-19 process still has to be scheduled
    while left := _spinners(proc.pid):
        assert time.monotonic() < deadline, f"spinners outlived the benchmark: {left}"
        time.sleep(0.1)


def test_bench_trust_runs_and_reports(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, str(BENCH / "bench_trust.py")),
            *("--files", "40", "--films", "1", "--rounds", "1", "--dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=600,  # a bound for a hung run, not a figure: the machine may be busy
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"hybrid signature: sign \d+ us, verify \d+ us", out), out
    assert re.search(r"bytes per delta, signed - unsigned: \d+", out), out
    assert re.search(r"rekey local: [\d.]+ s vs re-encrypt [\d.]+ s = [\d.]+x", out), out
    assert list(tmp_path.iterdir()) == [], "work directory left behind"


@pytest.mark.fuse
def test_bench_library_runs_and_reports(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(
        [
            *(sys.executable, str(BENCH / "bench_library.py")),
            *("--files", "60", "--rounds", "1", "--systems", "pqfs", "--dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # a bound for a hung run, not a figure: the machine may be busy
    )
    assert proc.returncode == 0, proc.stderr
    for figure in ("ingest_files_s", "scan1_files_s", "scan4_files_s", "cp_MiB_s", "mount_s"):
        assert re.search(rf"^{figure} +[\d.e+]+", proc.stdout, re.M), proc.stdout
    assert list(tmp_path.iterdir()) == [], "work directory left behind"


@pytest.mark.fuse
def test_bench_writes_runs_and_reports(tmp_path: Path) -> None:
    # every system installed (a peer that is not is skipped by the script): rclone's wait for
    # its uploads is the part most worth running
    work, out = tmp_path / "work", tmp_path / "writes.json"
    work.mkdir()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(
        [
            *(sys.executable, str(BENCH / "bench_writes.py")),
            *("--big-size", "8M", "--small-files", "50", "--rounds", "1", "--quiet-host", "0"),
            *("--dir", str(work), "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # a bound for a hung run, not a figure: the machine may be busy
    )
    assert proc.returncode == 0, proc.stderr
    figures = ("big_MiB_s", "small_files_s", "small_rm_files_s", "edit_s", "big_rss_peak_MiB")
    for figure in (*figures, "loop_stall_max_ms", "gc_pause_max_ms", "edit_committed_MiB"):
        assert re.search(rf"^{figure} +[\d.e+]+", proc.stdout, re.M), proc.stdout
    data = json.loads(out.read_text())
    (row,) = data["rounds"]["pqfs"]
    assert all(row[k] > 0 for k in figures), row
    for peer in set(data["versions"]) - {"pqfs"}:  # each peer measured has its ratios
        assert data["ratios_pqfs_over_peer"]["big_MiB_s"][peer] > 0, data
    assert list(work.iterdir()) == [], "work directory left behind"
