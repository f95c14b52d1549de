"""The mount benchmark still runs end to end (tiny sizes, pqfs only; no figure is asserted), and
its wait for a quiet host ends both ways and leaves no spinner behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "contrib" / "bench"
sys.path.insert(0, str(BENCH))

import bench_mount  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark drops the page cache")


def test_bench_mount_runs_and_reports(tmp_path: Path) -> None:
    args = [
        *("--size", "4M", "--small-size", "64K", "--files", "4", "--latency-files", "2"),
        *("--random-reads", "10", "--rounds", "2", "--systems", "pqfs", "--quiet-host", "0"),
    ]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_mount.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
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
    assert not list(Path("/tmp").glob("bench-mount-*/vault")), "work directory left behind"


def test_quiet_host_wait_ends_when_quiet() -> None:
    # any steal counts as quiet here: the wait ends after one window
    got = bench_mount.wait_for_quiet_host(limit=30, window=1, allowed_ms=1e9)
    assert got.startswith("quiet after 1 s"), got


def test_quiet_host_wait_gives_up_at_its_limit() -> None:
    # no steal is ever quiet enough here: the wait gives up at its limit and says so
    got = bench_mount.wait_for_quiet_host(limit=2, window=1, allowed_ms=-1)
    assert got.startswith("NOT quiet after 2 s"), got


def test_quiet_host_wait_can_be_skipped() -> None:
    assert bench_mount.wait_for_quiet_host(limit=0) == "not waited for (--quiet-host 0)"


def _spinners() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"while os.getppid() == parent" in f.read():
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
        deadline = time.monotonic() + 20
        while not _spinners():
            assert time.monotonic() < deadline, "no spinner started"
            time.sleep(0.1)
    finally:
        proc.kill()  # no finally of the benchmark's runs
        proc.wait()
    deadline = time.monotonic() + 120  # a killed nice-19 process still has to be scheduled
    while _spinners():
        assert time.monotonic() < deadline, f"spinners outlived the benchmark: {_spinners()}"
        time.sleep(0.1)
