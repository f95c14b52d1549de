"""A media-server day: 8 players stream different files while a scanner ffprobes 100 files.

Everything must complete without an error and with the right bytes. Per-stream throughput is
printed (pytest -s) and recorded in docs/PERFORMANCE.md; it is not asserted here, since the
suite holds no timed assertions.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import mounted, run_pqfs

pytestmark = [pytest.mark.fuse, pytest.mark.media]

STREAMS = 8
STREAM_SIZE = 48 * 1024 * 1024
SCANNED = 100


def test_eight_streams_while_ffprobe_scans_a_hundred_files(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    src = tmp_path / "library"
    (src / "streams").mkdir(parents=True)
    (src / "scan").mkdir()
    rng = random.Random(11)
    digests = {}
    for i in range(STREAMS):
        data = rng.randbytes(STREAM_SIZE)
        digests[i] = hashlib.sha256(data).hexdigest()
        (src / "streams" / f"movie{i}.bin").write_bytes(data)
    clip = tmp_path / "clip.mkv"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i",
         "testsrc2=duration=2:size=320x240:rate=25", "-c:v", "libx264", "-preset", "ultrafast",
         str(clip)],
        check=True,
    )  # fmt: skip
    clip_bytes = clip.read_bytes()
    for i in range(SCANNED):  # same content, but each is its own object with its own key
        (src / "scan" / f"episode{i:03}.mkv").write_bytes(clip_bytes)
    vault = tmp_path / "vault"
    run_pqfs("init", str(vault), env=cli_env)
    run_pqfs("add", str(vault), str(src), env=cli_env)

    with mounted(vault, tmp_path / "mnt", cli_env) as mp:
        root = mp / "library"
        rates: dict[int, float] = {}
        errors: list[BaseException] = []

        def stream(i: int) -> None:
            try:
                h = hashlib.sha256()
                t0 = time.perf_counter()
                with open(root / "streams" / f"movie{i}.bin", "rb", buffering=0) as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                rates[i] = STREAM_SIZE / (time.perf_counter() - t0) / 1e6
                assert h.hexdigest() == digests[i], f"stream {i} read wrong bytes"
            except BaseException as e:
                errors.append(e)

        durations: list[str] = []

        def scan() -> None:
            try:
                for i in range(SCANNED):
                    out = subprocess.run(
                        ["ffprobe", "-v", "error", "-show_entries", "format=duration",
                         "-of", "csv=p=0", str(root / "scan" / f"episode{i:03}.mkv")],
                        capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    durations.append(out.stdout.strip())
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        threads.append(threading.Thread(target=scan))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        assert len(rates) == STREAMS
        assert len(durations) == SCANNED and all(abs(float(d) - 2.0) < 0.1 for d in durations)
        print("per-stream MB/s:", " ".join(f"{rates[i]:.0f}" for i in range(STREAMS)))
        s = run_pqfs("stats", str(mp), env=cli_env).stdout.decode()
        print(s)
        assert os.listdir(root / "scan").__len__() == SCANNED
