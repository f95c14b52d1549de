#!/usr/bin/env python3
"""Side-by-side benchmark of the pqfs core against Debian's age, in one run.

  python contrib/bench/bench_core.py [--size-mib 1024] [--rounds 5] [--dir DIR]

On one random file: `pqfs add` vs `age -e`, and `pqfs cat VAULT big > /dev/null` vs
`age -d > /dev/null` (rounds alternate between the two tools; medians and ratios printed),
then the file-key unwrap latency (cold, with the identity loaded; and from the key cache).

Both tools read an unencrypted identity file, so neither pays a passphrase KDF. The default
work directory is on tmpfs (/dev/shm) so that the figures compare the software, not the disk;
pass --dir to measure on a disk (pqfs add then also pays its fsync, age -e does not fsync).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO


def run(
    cmd: list[str], stdout: int | IO[bytes] = subprocess.DEVNULL, env: dict[str, str] | None = None
) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, check=True, env=env)
    return time.perf_counter() - t0


def warm_memory(work: Path, mib: int) -> None:
    """This machine is a VM whose memory is slow the first time a page is touched; write and
    delete a scratch file first so neither tool pays that cost in its rounds."""
    scratch = work / "scratch"
    block = os.urandom(1 << 20)
    with open(scratch, "wb") as f:
        for _ in range(mib):
            f.write(block)
    scratch.unlink()


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"


def unwrap_latency(n: int = 2000) -> tuple[float, float]:
    from pqfs.format.encoding import b64encode
    from pqfs.format.header import Header
    from pqfs.format.keys import HybridIdentity, new_file_key
    from pqfs.vault.keycache import KeyCache
    from pqfs.vault.schema import Entry
    from pqfs.vault.vault import Vault

    ident = HybridIdentity.generate()
    fk = new_file_key()
    header = Header.build([ident.recipient().wrap(fk)], fk)
    v = Vault.__new__(Vault)
    v._identities = [ident]  # identity loaded, as in a mounted or unlocked vault
    v.key_cache = KeyCache(ttl=300)
    e = Entry("f", "file", 0o644, 0, 0, "0" * 32, header.length, b64encode(header.mac))
    cold = []
    for _ in range(n // 4):
        v.key_cache.clear()
        t0 = time.perf_counter()
        v.file_key(e, header)
        cold.append(time.perf_counter() - t0)
    hot = []
    for _ in range(n):
        t0 = time.perf_counter()
        v.file_key(e, header)
        hot.append(time.perf_counter() - t0)
    return statistics.median(cold), statistics.median(hot)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = ap.parse_args()
    for tool in ("age", "age-keygen"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found (apt-get install age)", file=sys.stderr)
            return 1
    pqfs = [sys.executable, "-m", "pqfs"]
    work = Path(tempfile.mkdtemp(prefix="pqfs-bench-", dir=args.dir))
    try:
        size = args.size_mib << 20
        big = work / "big.bin"
        with open(big, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        warm_memory(work, 4 * args.size_mib)
        key = work / "age.key"
        subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
        recipient = subprocess.run(
            ["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True
        ).stdout.strip()
        env = dict(os.environ, PQFS_PASSPHRASE="bench", PQFS_SCRYPT_LOG_N="12")
        vault = work / "vault"
        subprocess.run([*pqfs, "init", str(vault)], env=env, check=True, capture_output=True)
        ident = work / "pqfs.key"
        subprocess.run(
            [*pqfs, "identity", str(vault), "-o", str(ident)],
            env=env,
            check=True,
            capture_output=True,
        )
        env.pop("PQFS_PASSPHRASE")

        enc: dict[str, list[float]] = {"age -e": [], "pqfs add": []}
        dec: dict[str, list[float]] = {"age -d": [], "pqfs cat": []}
        age_file = work / "big.age"
        for r in range(args.rounds):
            enc["age -e"].append(run(["age", "-e", "-r", recipient, "-o", str(age_file), str(big)]))
            enc["pqfs add"].append(run([*pqfs, "add", str(vault), str(big), f"big{r}"], env=env))
            dec["age -d"].append(run(["age", "-d", "-i", str(key), str(age_file)]))
            dec["pqfs cat"].append(
                run([*pqfs, "cat", "-i", str(ident), str(vault), f"big{r}"], env=env)
            )
            # Untimed: the copy must be the original; then free its space so that every round
            # writes into memory the same way (see warm_memory).
            check = subprocess.run(
                [*pqfs, "cat", "-i", str(ident), str(vault), f"big{r}"],
                env=env,
                check=True,
                capture_output=True,
            ).stdout
            assert check == big.read_bytes(), "pqfs cat output differs from the original"
            del check
            subprocess.run(
                [*pqfs, "rm", "-i", str(ident), str(vault), f"big{r}"],
                env=env,
                check=True,
                capture_output=True,
            )
            age_file.unlink()

        cold, hot = unwrap_latency()
        print(f"pqfs core benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        print(f"machine: {machine()}")
        print(
            f"file: {args.size_mib} MiB random, {args.rounds} alternating rounds, work dir {work.parent}"
        )
        print()
        print(f"{'operation':<12} {'median s':>9} {'MB/s':>8} {'best s':>8}  all rounds (s)")
        for group in (enc, dec):
            for name, times in group.items():
                m = statistics.median(times)
                rounds = " ".join(f"{t:.2f}" for t in times)
                print(f"{name:<12} {m:9.3f} {size / m / 1e6:8.0f} {min(times):8.3f}  {rounds}")
        ratio_enc = statistics.median(enc["age -e"]) / statistics.median(enc["pqfs add"])
        ratio_dec = statistics.median(dec["age -d"]) / statistics.median(dec["pqfs cat"])
        best_enc = min(enc["age -e"]) / min(enc["pqfs add"])
        best_dec = min(dec["age -d"]) / min(dec["pqfs cat"])
        print()
        print(f"best-of-rounds ratios: add/age -e {best_enc:.2f}x, cat/age -d {best_dec:.2f}x")
        print(f"pqfs add is {ratio_enc:.2f}x the speed of age -e")
        print(f"pqfs cat is {ratio_dec:.2f}x the speed of age -d")
        print(
            f"file-key unwrap (mlkem768x25519), median: cold {cold * 1e6:.0f} us, cached {hot * 1e6:.2f} us"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
