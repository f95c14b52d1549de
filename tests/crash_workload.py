"""The writer of the crash test (tests/test_crash.py), run as its own process against a mount
until the mount dies under it: `python -m tests.crash_workload MOUNT JOURNAL SEED`.

It writes versions of a few files in the ways programs do (a new small file, an O_TRUNC
rewrite, a large streamed file, a patch in place, a temp file renamed over the target), and
journals each version's SHA-256 when it begins, and `fsynced` once an fsync (and, after a
rename, an fsync of the directory) has returned. The test then knows every content a file may
have after the crash, and which ones it must have.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
from pathlib import Path

FILES = [f"f{i}" for i in range(6)] + [f"d/g{i}" for i in range(3)]
SIZES = (0, 100, 5000, 16384, 70_000, 300_000, 2_500_000)
# A file written in order (the stream tier); on S3 past two parts (PQFS_CRASH_STREAM_SIZE), so
# that a kill can land while its multipart upload has parts sent.
STREAM = int(os.environ.get("PQFS_CRASH_STREAM_SIZE", "3000000"))


def content(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def main(mount: str, journal: str, seed: int) -> None:
    rng = random.Random(seed)
    mp = Path(mount)
    (mp / "d").mkdir(exist_ok=True)
    current: dict[str, bytes] = {}
    for f in FILES:
        with contextlib.suppress(FileNotFoundError):
            current[f] = (mp / f).read_bytes()
    with open(journal, "a", buffering=1) as j:
        n = 0
        while True:
            n += 1
            f = rng.choice(FILES)
            kind = rng.choice(["new", "trunc", "stream", "patch", "rename"])
            sync = rng.random() < 0.3
            if kind == "patch" and f in current and current[f]:
                old = current[f]
                off = rng.randrange(len(old))
                patch = rng.randbytes(min(rng.choice((4, 4096, 100_000)), len(old) - off))
                data = old[:off] + patch + old[off + len(patch) :]
            else:
                size = STREAM if kind == "stream" else rng.choice(SIZES)
                data = content(rng, size)
                if kind == "patch":
                    kind = "trunc"
            digest = hashlib.sha256(data).hexdigest()
            target = mp / f
            j.write(f"begin {f} {digest} {len(data)} {kind}\n")
            if kind == "rename":
                tmp = mp / (f + ".tmp")
                j.write(f"begin {f}.tmp {digest} {len(data)} {kind}\n")
                with open(tmp, "wb") as h:
                    h.write(data)
                    if sync:
                        h.flush()
                        os.fsync(h.fileno())
                os.rename(tmp, target)
                if sync:
                    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
                    os.fsync(dfd)
                    os.close(dfd)
            elif kind == "patch":
                with open(target, "r+b") as h:
                    h.seek(off)
                    h.write(patch)
                    if sync:
                        h.flush()
                        os.fsync(h.fileno())
            else:
                with open(target, "wb") as h:
                    step = 128 * 1024 if kind == "stream" else max(1, len(data))
                    for i in range(0, len(data), step):
                        h.write(data[i : i + step])
                    if sync:
                        h.flush()
                        os.fsync(h.fileno())
            current[f] = data
            if sync:
                j.write(f"fsynced {f} {digest}\n")
            j.write(f"closed {f} {digest}\n")


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    except OSError:
        sys.exit(0)  # the mount died under it: what the test is for
