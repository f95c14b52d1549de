"""Large-file tier (marked slow): a 1 GiB round trip through the real CLI, byte slices at the
edges, and constant memory for 4 GiB files. Deselect locally with -m 'not slow'."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_pqfs

pytestmark = pytest.mark.slow

GIB = 1 << 30
CHUNK = 65536


def _write_random(path: Path, size: int, block: int = 1 << 20, unique: bool = True) -> str:
    """Write `size` bytes; with unique=False one random MiB repeats (fast for RSS tests)."""
    h = hashlib.sha256()
    rep = os.urandom(block)
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(block, left)) if unique else rep[: min(block, left)]
            f.write(data)
            h.update(data)
            left -= len(data)
    return h.hexdigest()


# Runs the real CLI entry point, then records the peak RSS of this process's own address space.
# (wait4's ru_maxrss is no good here: Linux folds the parent's peak RSS into the child's at exec.)
_HWM_WRAPPER = """
import sys
from pqfs.cli.main import main
rc = main(sys.argv[2:])
with open("/proc/self/status") as f:
    hwm = next(line for line in f if line.startswith("VmHWM:"))
with open(sys.argv[1], "w") as out:
    out.write(hwm.split()[1])
sys.exit(rc)
"""


def _max_rss_mib(
    args: list[str], env: dict[str, str], tmp: Path, stdout: int | None = None
) -> float:
    """Run `pqfs ARGS`; return its peak RSS in MiB (VmHWM, read by the process itself)."""
    hwm_file = tmp / "hwm"
    proc = subprocess.run(
        [sys.executable, "-c", _HWM_WRAPPER, str(hwm_file), *args],
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return int(hwm_file.read_text()) / 1024


def test_one_gib_round_trip_and_slices(tmp_path: Path, cli_env: dict[str, str]) -> None:
    src = tmp_path / "big.bin"
    digest = _write_random(src, GIB)
    vault = str(tmp_path / "v")
    run_pqfs("init", vault, env=cli_env)
    run_pqfs("add", vault, str(src), "big", env=cli_env)

    cat = subprocess.Popen(
        [sys.executable, "-m", "pqfs", "cat", vault, "big"], env=cli_env, stdout=subprocess.PIPE
    )
    h = hashlib.sha256()
    assert cat.stdout is not None
    for block in iter(lambda: cat.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
        h.update(block)
    assert cat.wait() == 0
    assert h.hexdigest() == digest

    with open(src, "rb") as f:

        def original(off: int, length: int) -> bytes:
            f.seek(off)
            return f.read(length)

        cases = [
            (0, 1),
            (0, CHUNK + 1),
            (CHUNK - 1, 2),
            (CHUNK, CHUNK),
            (5 * CHUNK - 7, 3 * CHUNK + 14),
            (GIB // 2 - 3, 6),
            (GIB - CHUNK - 1, CHUNK + 1),
            (GIB - 1, 1),
            (GIB - 1, 100),
            (GIB, 10),
        ]
        for off, length in cases:
            out = run_pqfs(
                "cat", vault, "big", "--offset", str(off), "--length", str(length), env=cli_env
            ).stdout
            assert out == original(off, length), (off, length)


def test_four_gib_add_and_cat_stay_under_100_mib(tmp_path: Path, cli_env: dict[str, str]) -> None:
    src = tmp_path / "huge.bin"
    digest = _write_random(src, 4 * GIB, unique=False)
    vault = str(tmp_path / "v")
    run_pqfs("init", vault, env=cli_env)

    rss_add = _max_rss_mib(["add", vault, str(src), "huge"], cli_env, tmp_path)
    src.unlink()  # free the space and the page cache; the digest is kept

    out = tmp_path / "out.bin"
    with open(out, "wb") as f:
        rss_cat = _max_rss_mib(["cat", vault, "huge"], cli_env, tmp_path, stdout=f.fileno())
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == digest
    print(f"peak RSS: add {rss_add:.0f} MiB, cat {rss_cat:.0f} MiB")
    assert rss_add < 100, rss_add
    assert rss_cat < 100, rss_cat
